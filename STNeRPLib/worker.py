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
from pathlib import Path
from typing import Callable

from . import commands, contract, threads
from .commands import is_number
from .errors import InputError
from .pipeline import EXTRAPOLATION_LIMIT
from .progress import Reporter


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    reporter = Reporter(json_events="--json-events" in argv)
    contract.stop_on_interruption(contract.STDIN_CANCEL_FLAG in argv)
    try:
        args = parser().parse_args(_negative_numbers_as_values(argv))
    except InputError as error:
        reporter.error(str(error))
        return contract.EXIT_BAD_INPUT
    args.argv = argv
    if "threads" in vars(args):   # every command but batch, whose series take --threads-per-worker
        reporter.message(f"computing with {threads.use(args.threads).describe()}")
    return args.command(args, reporter)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are InputErrors, so they reach --json-events as error events."""

    def error(self, message: str):
        raise InputError(f"{self.prog}: {message} (see {self.prog} --help)")


def _negative_numbers_as_values(argv: list[str]) -> list[str]:
    """argparse takes a token such as -1e3 or -inf for an option; a leading space keeps every
    negative number a value (float() ignores the space)."""
    return [f" {a}" if a.startswith("-") and is_number(a) else a for a in argv]


def parser() -> argparse.ArgumentParser:
    main_parser = _Parser(prog="stnerp", description=__doc__.splitlines()[0])
    subcommands = main_parser.add_subparsers(required=True, metavar="COMMAND")
    train = _command(subcommands, "train", commands.train_command, "fit ST-NeRP to a series and write every output")
    train.add_argument("--reference", required=True, metavar="PATH", help="reference image (the planning CT, or phase 0)")
    train.add_argument("--reference-time", type=float, default=0.0, metavar="T", help="time of the reference (default 0)")
    train.add_argument("--follow-up", nargs=2, action="append", default=[], metavar=("PATH", "TIME"),
                       help="a follow-up image and its time (phase or days); repeat for each")
    train.add_argument("--segmentation", metavar="PATH", help="reference labelmap to propagate")
    train.add_argument("--landmarks", metavar="CSV", help="landmark pairs for TRE: time,x,y,z,ref_x,ref_y,ref_z (LPS mm)")
    train.add_argument("--ground-truth", nargs=2, action="append", default=[], metavar=("PATH", "TIME"),
                       help="a ground-truth labelmap at a scanned time, for Dice")
    add_fit_options(train)
    train.add_argument("--resume", action="store_true",
                       help="continue an interrupted, failed or killed run in --output (same arguments)")
    train.add_argument("--dicom-out", type=Path, metavar="DIR",
                       help="also write, per follow-up, an RT Structure Set and a Deformable Spatial "
                            "Registration (inputs must be DICOM series folders)")
    predict = _command(subcommands, "predict", commands.predict_command, "query a trained run at new times, without retraining")
    predict.add_argument("--run", required=True, type=Path, metavar="DIR", help="folder of a complete training run")
    predict.add_argument("--times", required=True, nargs="+", type=float, metavar="T")
    demo = _command(subcommands, "demo", commands.demo_command, "run the whole pipeline on the built-in phantom and print metrics")
    demo.add_argument("--preset", choices=contract.PRESET_NAMES, default=contract.DEFAULT_PRESET)
    demo.add_argument("--iterations", type=int, metavar="N")
    demo.add_argument("--size", nargs=3, type=int, default=[96, 96, 64], metavar=("X", "Y", "Z"),
                      help="voxels per axis (the field of view stays the whole thorax: the spacing scales)")
    demo.add_argument("--longitudinal", action="store_true", help="the shrinking-tumour fractions instead of breathing")
    demo.add_argument("--no-report", action="store_true", help="do not write report/index.html at the end")
    report = _command(subcommands, "report", commands.report_command, "write RUN/report/index.html: figures and tables of a run")
    report.add_argument("--run", required=True, type=Path, metavar="DIR", help="folder of a run")
    report.add_argument("--label-names", metavar="JSON", help='names of the labels, e.g. {"1": "GTV"}')
    report.add_argument("--curve-times", type=int, default=50, metavar="N",
                        help="times at which the model is queried for the curves over time (default 50)")
    dicom = _command(subcommands, "dicom", commands.dicom_command, "write a run's contours and deformations as DICOM (RTSTRUCT, REG)")
    dicom.add_argument("--run", required=True, type=Path, metavar="DIR", help="folder of a complete run on DICOM series")
    dicom.add_argument("--dicom-out", required=True, type=Path, metavar="DIR")
    dicom.add_argument("--label-names", metavar="JSON", help='names of the labels, e.g. {"1": "GTV"}')
    evaluate = _command(subcommands, "evaluate", commands.evaluate_command, "compare a run's outputs with ground truth")
    evaluate.add_argument("--run", required=True, type=Path, metavar="DIR")
    evaluate.add_argument("--image", nargs=2, action="append", default=[], metavar=("PATH", "TIME"),
                          help="the real image at a time of the run (PSNR, SSIM)")
    evaluate.add_argument("--ground-truth", nargs=2, action="append", default=[], metavar=("PATH", "TIME"),
                          help="a ground-truth labelmap at a time of the run (Dice)")
    evaluate.add_argument("--landmarks", metavar="CSV", help="landmark pairs (TRE)")
    batch = _command(subcommands, "batch", _batch, "train every series of a cohort on Dask (one run folder per patient)")
    batch.add_argument("--cohort", required=True, type=Path, metavar="CSV",
                       help="cohort manifest: patient,role,path,time rows (see README, Cohorts)")
    batch.add_argument("--output", required=True, type=Path, metavar="DIR",
                       help="folder of the cohort: DIR/<patient>/ per series, summary.csv and summary.json")
    batch.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler (default: a local cluster)")
    batch.add_argument("--workers", type=int, metavar="N", help="local cluster: worker processes (default: cores / K)")
    batch.add_argument("--threads-per-worker", type=int, metavar="K",
                       help="local cluster: torch and ITK threads of each worker's series (default: 1)")
    add_fit_options(batch)
    batch.set_defaults(dicom_out=None, resume=False)   # the batch decides per series whether to resume
    return main_parser


def add_fit_options(command: argparse.ArgumentParser) -> None:
    """How to fit a series: the options of train, which batch applies to every series of a cohort."""
    command.add_argument("--predict-times", nargs="+", type=float, default=[], metavar="T",
                         help="also write outputs at these times (e.g. never scanned); at most "
                              f"{EXTRAPOLATION_LIMIT:g} scanned spans outside the scanned times")
    command.add_argument("--preset", choices=contract.PRESET_NAMES, default=contract.DEFAULT_PRESET)
    command.add_argument("--iterations", type=int, metavar="N", help="iterations of each network (overrides the preset)")
    command.add_argument("--prior", choices=contract.PRIORS,
                         help="what Def-Net deforms: Ref-Net (the paper; the paper preset's) or the reference "
                              "image ('w/o prior'; the default preset's, sampled by cubic B-spline)")
    command.add_argument("--pairwise", action="store_true", help="one network per follow-up, no time input ('w/o t')")
    command.add_argument("--scheme", choices=contract.SCHEMES, default="long",
                         help="long: reference -> each; short: previous -> next")
    command.add_argument("--prealign", choices=contract.PREALIGNMENTS, default="none",
                         help="affine pre-alignment of each follow-up to the reference")
    command.add_argument("--intensity", choices=contract.INTENSITIES, default="ct",
                         help="normalisation: CT window -1000..500 HU, or 0.5-99.5 percentiles (non-CT)")
    command.add_argument("--device", choices=contract.DEVICES, default="auto")
    command.add_argument("--seed", type=int, default=0, help=f"random seed, 0..{commands.MAX_SEED}")
    command.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                         help="save a training checkpoint in the output folder every N iterations "
                              "(and when interrupted); 0: none")
    command.add_argument("--label-names", metavar="JSON", help='names of the labels, e.g. {"1": "GTV"} (for the report)')
    command.add_argument("--no-report", action="store_true", help="do not write report/index.html at the end")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number >= 1")
    return int(text)


def _command(subcommands, name: str, function: Callable, text: str) -> argparse.ArgumentParser:
    command = subcommands.add_parser(name, help=text, description=text)
    command.set_defaults(command=function)
    if name in ("train", "predict"):
        command.add_argument("--output", required=True, type=Path, metavar="DIR",
                             help="new folder for the run's outputs")
    if name == "demo":
        command.add_argument("--output", type=Path, metavar="DIR",
                             help="new folder for the phantom and the run (default runs/demo-<date>)")
    command.add_argument("--json-events", action="store_true",
                         help="print newline-delimited JSON events on stdout (for the Slicer module)")
    command.add_argument(contract.STDIN_CANCEL_FLAG, action="store_true",
                         help="stop as on Ctrl-C when standard input closes (for the Slicer module)")
    if name != "batch":
        command.add_argument("--threads", type=_positive, metavar="N",
                             help="threads to compute with (default: the usable CPUs, less those other "
                                  "processes keep busy)")
    return command


def _batch(args, reporter: Reporter) -> int:
    from .cohort import run_batch
    return run_batch(args, reporter)


if __name__ == "__main__":
    sys.exit(main())
