"""The stnerp command: train on a series or a cohort, predict, evaluate, report, run the demo.

This file is the command line; what each command does is in commands.py.

The Slicer module runs it in a background process with --json-events; batch users run it from a
shell. Choices, exit codes, events and the run folder are the worker contract (contract.py):
0 done, 2 bad input, 130 interrupted (SIGINT/SIGTERM, or standard input closed with
--cancel-on-stdin-close), 1 other failure.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from . import commands, contract, threads
from .errors import InputError
from .progress import Reporter


def main(argv: list[str] | None = None) -> int:
    """Run the stnerp command line (argv: sys.argv[1:] by default); return the worker contract's exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    reporter = Reporter(json_events="--json-events" in argv)
    contract.stop_on_interruption(contract.STDIN_CANCEL_FLAG in argv)
    try:
        args = contract.parse_arguments(argv)
    except InputError as error:
        reporter.error(str(error))
        return contract.EXIT_BAD_INPUT
    if "threads" in vars(args):   # every command but batch, whose series take --threads-per-worker
        reporter.message(f"computing with {threads.use(args.threads, _resumed_threads(args)).describe()}")
    return COMMANDS[args.command](args, reporter)


def _resumed_threads(args: argparse.Namespace) -> int | None:
    """With --resume, the thread count the run in --output started with (run.json's threads); None otherwise, or when
    it cannot be read (the train command then refuses the folder, saying why)."""
    if not getattr(args, "resume", False):
        return None
    try:
        recorded = contract.read_run(args.output).get("threads")
    except (OSError, ValueError):
        return None
    count = recorded.get("threads") if isinstance(recorded, dict) else None
    return count if isinstance(count, int) and count > 0 else None


def _batch(args: argparse.Namespace, reporter: Reporter) -> int:
    from .cohort import run_batch
    return run_batch(args, reporter)


#: what each command of the contract's command line does
COMMANDS: dict[str, Callable[[argparse.Namespace, Reporter], int]] = {
    "train": commands.train_command, "predict": commands.predict_command, "demo": commands.demo_command,
    "report": commands.report_command, "dicom": commands.dicom_command, "evaluate": commands.evaluate_command,
    "batch": _batch}


if __name__ == "__main__":
    sys.exit(main())
