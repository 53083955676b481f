"""The `stnerp` command: train on a series, predict new times, evaluate, or run the demo.

The Slicer module runs it in a background process with --json-events; batch users run it
from a shell. Exit codes: 0 done, 2 bad input, 130 interrupted (SIGINT/SIGTERM), 1 other failure.
"""
from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from .errors import InputError
from .io import file_sha256
from .pipeline import EXTRAPOLATION_LIMIT, Options, load_series, run_prediction, run_training
from .presets import PRESETS, Preset
from .progress import Reporter
from .record import RunRecord, killed, load_record, require_complete


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    reporter = Reporter(json_events="--json-events" in argv)
    for interrupt in (signal.SIGINT, signal.SIGTERM):   # explicitly: a background job inherits SIGINT ignored
        signal.signal(interrupt, _interrupt)
    try:
        args = parser().parse_args(_negative_numbers_as_values(argv))
    except InputError as error:
        reporter.error(str(error))
        return 2
    args.argv = argv
    return args.command(args, reporter)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are InputErrors, so they reach --json-events as error events."""

    def error(self, message: str):
        raise InputError(f"{self.prog}: {message} (see {self.prog} --help)")


def _negative_numbers_as_values(argv: list[str]) -> list[str]:
    """argparse takes a token such as -1e3 or -inf for an option; a leading space keeps every
    negative number a value (float() ignores the space)."""
    return [f" {a}" if a.startswith("-") and _is_number(a) else a for a in argv]


def parser() -> argparse.ArgumentParser:
    main_parser = _Parser(prog="stnerp", description=__doc__.splitlines()[0])
    commands = main_parser.add_subparsers(required=True, metavar="COMMAND")
    train = _command(commands, "train", _train, "fit ST-NeRP to a series and write every output")
    train.add_argument("--reference", required=True, metavar="PATH", help="reference image (the planning CT, or phase 0)")
    train.add_argument("--reference-time", type=float, default=0.0, metavar="T", help="time of the reference (default 0)")
    train.add_argument("--follow-up", nargs=2, action="append", default=[], metavar=("PATH", "TIME"),
                       help="a follow-up image and its time (phase or days); repeat for each")
    train.add_argument("--segmentation", metavar="PATH", help="reference labelmap to propagate")
    train.add_argument("--landmarks", metavar="CSV", help="landmark pairs for TRE: time,x,y,z,ref_x,ref_y,ref_z (LPS mm)")
    train.add_argument("--ground-truth", nargs=2, action="append", default=[], metavar=("PATH", "TIME"),
                       help="a ground-truth labelmap at a scanned time, for Dice")
    train.add_argument("--predict-times", nargs="+", type=float, default=[], metavar="T",
                       help="also write outputs at these times (e.g. never scanned); at most "
                            f"{EXTRAPOLATION_LIMIT:g} scanned spans outside the scanned times")
    train.add_argument("--preset", choices=sorted(PRESETS), default="default")
    train.add_argument("--iterations", type=int, metavar="N", help="iterations of each network (overrides the preset)")
    train.add_argument("--prior", choices=["refnet", "image"],
                       help="what Def-Net deforms: Ref-Net (the paper; the paper preset's) or the reference "
                            "image ('w/o prior'; the default preset's, sampled by cubic B-spline)")
    train.add_argument("--pairwise", action="store_true", help="one network per follow-up, no time input ('w/o t')")
    train.add_argument("--scheme", choices=["long", "short"], default="long",
                       help="long: reference -> each; short: previous -> next")
    train.add_argument("--prealign", choices=["none", "affine"], default="none",
                       help="affine pre-alignment of each follow-up to the reference")
    train.add_argument("--intensity", choices=["ct", "percentile"], default="ct",
                       help="normalisation: CT window -1000..500 HU, or 0.5-99.5 percentiles (non-CT)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    train.add_argument("--seed", type=int, default=0, help=f"random seed, 0..{MAX_SEED}")
    train.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                       help="save a training checkpoint in the output folder every N iterations "
                            "(and when interrupted); 0: none")
    train.add_argument("--resume", action="store_true",
                       help="continue an interrupted, failed or killed run in --output (same arguments)")
    predict = _command(commands, "predict", _predict, "query a trained run at new times, without retraining")
    predict.add_argument("--run", required=True, type=Path, metavar="DIR", help="folder of a complete training run")
    predict.add_argument("--times", required=True, nargs="+", type=float, metavar="T",
                         help=f"times to predict; at most {EXTRAPOLATION_LIMIT:g} scanned spans outside the scanned times")
    demo = _command(commands, "demo", _demo, "run the whole pipeline on the built-in phantom and print metrics")
    demo.add_argument("--preset", choices=sorted(PRESETS), default="default")
    demo.add_argument("--iterations", type=int, metavar="N")
    demo.add_argument("--size", nargs=3, type=int, default=[96, 96, 64], metavar=("X", "Y", "Z"),
                      help="voxels per axis (the field of view stays the same: the spacing scales)")
    demo.add_argument("--longitudinal", action="store_true", help="the shrinking-tumour fractions instead of breathing")
    evaluate = _command(commands, "evaluate", _evaluate, "compare a run's outputs with ground truth")
    evaluate.add_argument("--run", required=True, type=Path, metavar="DIR")
    evaluate.add_argument("--image", nargs=2, action="append", default=[], metavar=("PATH", "TIME"),
                          help="the real image at a time of the run (PSNR, SSIM)")
    evaluate.add_argument("--ground-truth", nargs=2, action="append", default=[], metavar=("PATH", "TIME"),
                          help="a ground-truth labelmap at a time of the run (Dice)")
    evaluate.add_argument("--landmarks", metavar="CSV", help="landmark pairs (TRE)")
    return main_parser


def _command(commands, name: str, function: Callable, text: str) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=text, description=text)
    command.set_defaults(command=function)
    if name in ("train", "predict"):
        command.add_argument("--output", required=True, type=Path, metavar="DIR",
                             help="new folder for the run's outputs")
    if name == "demo":
        command.add_argument("--output", type=Path, metavar="DIR",
                             help="new folder for the phantom and the run (default runs/demo-<date>)")
    command.add_argument("--json-events", action="store_true",
                         help="print newline-delimited JSON events on stdout (for the Slicer module)")
    return command


MAX_SEED = 2**63 - 1


def _preset(args) -> Preset:
    """The chosen preset, with --iterations (at least 1) applied to both networks."""
    if args.iterations is None:
        return PRESETS[args.preset]
    if args.iterations < 1:
        raise InputError(f"--iterations {args.iterations} is not a positive number: give at least 1, "
                         "or leave it out for the preset's")
    return PRESETS[args.preset].with_iterations(args.iterations)


def _train(args, reporter: Reporter) -> int:
    try:
        if not 0 <= args.seed <= MAX_SEED:
            raise InputError(f"--seed {args.seed} is out of range: give a whole number from 0 to {MAX_SEED}")
        if args.checkpoint_every < 0:
            raise InputError("--checkpoint-every must be 0 (no checkpoints) or a positive number of iterations")
        options = Options(_preset(args), args.prior, not args.pairwise, args.scheme, args.prealign == "affine",
                          args.intensity, args.device, args.seed)
        follow_ups, ground_truth = _timed(args.follow_up), _timed(args.ground_truth)
    except InputError as error:
        reporter.error(str(error))
        return 2
    paths = [args.reference, *(p for p, _ in follow_ups), args.segmentation, args.landmarks,
             *(p for p, _ in ground_truth)]
    inputs = {"reference": _absolute(args.reference), "reference_time": args.reference_time,
              "follow_ups": [[_absolute(p), t] for p, t in follow_ups], "segmentation": _absolute(args.segmentation),
              "landmarks": _absolute(args.landmarks), "ground_truth": [[_absolute(p), t] for p, t in ground_truth],
              "predict_times": args.predict_times,
              "sha256": {_absolute(p): file_sha256(p) for p in paths if p}}

    def body(record: RunRecord) -> None:
        series = load_series(args.reference, args.reference_time, follow_ups,
                             args.segmentation, args.landmarks, ground_truth)
        run_training(series, options, args.output, reporter, args.predict_times, record, args.checkpoint_every)
    return _recorded(args.output, "train", inputs, options.to_dict(), body, reporter, args, resume=args.resume)


def _absolute(path: str | None) -> str | None:
    return str(Path(path).absolute()) if path else None


def _predict(args, reporter: Reporter) -> int:
    def body(record: RunRecord) -> None:
        run_prediction(_complete_model(args.run), args.times, args.output, reporter, record)
    inputs = {"run": str(args.run.absolute()), "times": args.times}
    return _recorded(args.output, "predict", inputs, {}, body, reporter, args)


def _demo(args, reporter: Reporter) -> int:
    from .demo import demo_series, run_demo
    try:
        preset = _preset(args)
    except InputError as error:
        reporter.error(str(error))
        return 2
    folder = args.output or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    series, held_out = demo_series(args.longitudinal, tuple(args.size))
    inputs = {"phantom": "longitudinal" if args.longitudinal else "breathing", "size": args.size,
              "held_out_time": series.times[held_out]}
    return _recorded(folder / "run", "demo", inputs, preset.to_dict(),
                     lambda record: run_demo(folder, series, held_out, preset, record, reporter), reporter,
                     args, root=folder)


def _evaluate(args, reporter: Reporter) -> int:
    from .evaluation import evaluate_run
    return _guarded(lambda: evaluate_run(args.run, _timed(args.image), _timed(args.ground_truth),
                                         args.landmarks, reporter), reporter)


def _timed(pairs: list[list[str]]) -> list[tuple[str, float]]:
    """(path, time) pairs from the command line, with the time checked to be a number."""
    try:
        return [(path, float(time)) for path, time in pairs]
    except ValueError:
        bad = next(t for _, t in pairs if not _is_number(t))
        raise InputError(f"time '{bad}' is not a number: give each image's time as a number") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _complete_model(run: Path) -> Path:
    record = load_record(run)
    if record.get("command") == "predict":
        raise InputError(f"{run} holds a prediction (stnerp predict), not a trained model: give the "
                         "folder of the training run it came from")
    require_complete(run, record)
    if not record.get("model"):
        raise InputError(f"run {run} saved no model: train it again")
    return run / record["model"]


def _recorded(folder: Path, command: str, inputs: dict, parameters: dict, body: Callable[[RunRecord], None],
              reporter: Reporter, args, resume: bool = False, root: Path | None = None) -> int:
    """Run body with a run record in `folder` that ends complete, failed or interrupted. The folder
    (or `root`, the folder holding it) must be new or empty, unless resuming the run in it."""
    try:
        if resume:
            _check_resumable(folder, command, inputs, parameters)
            record = RunRecord.reopen(folder)
        else:
            _check_new_folder(root or folder)
            record = RunRecord(folder, command, inputs, parameters)
        record.set(command_line=[sys.executable, "-m", "STNeRPLib", *args.argv])
    except InputError as error:
        reporter.error(str(error))
        return 2
    except OSError as error:
        reporter.error(f"cannot write the output folder {folder}: {error.strerror or error}: "
                       "choose a folder you can write to")
        return 2
    status = _guarded(lambda: body(record), reporter, record)
    if status == 0:
        reporter.done("complete", str(folder))
    return status


def _guarded(body: Callable[[], object], reporter: Reporter, record: RunRecord | None = None) -> int:
    """Run body; report bad input (2), an interruption (130) or a failure (1) in one line."""
    try:
        body()
        return 0
    except InputError as error:
        return _fail(reporter, record, "failed", str(error), 2)
    except KeyboardInterrupt:
        return _fail(reporter, record, "interrupted", "interrupted: outputs are incomplete", 130)
    except Exception as error:  # the log keeps the details; the user gets one line
        traceback.print_exc(file=sys.stderr)
        return _fail(reporter, record, "failed", _failure(error), 1)


def _failure(error: Exception) -> str:
    """One line for an unexpected failure; a full disk (or file-size limit) says what to do."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return (f"cannot write {error.filename or 'an output'}: {error.strerror}: free disk space, then run "
                "again (train: the same arguments plus --resume)")
    return f"internal error: {type(error).__name__}: {error}"


def _check_new_folder(folder: Path) -> None:
    """Refuse an output path that is a file or a folder holding anything (a run, or the user's files)."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--output {folder} is a file: give the path of a new folder")
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if "run.json" in names:
        raise InputError(f"output folder {folder} already holds a run: choose a new folder "
                         "(or add --resume to continue an unfinished training run)")
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise InputError(f"output folder {folder} is not empty (it holds {shown}): choose a new or "
                         "empty folder; nothing was written")


def _check_resumable(folder: Path, command: str, inputs: dict, parameters: dict) -> None:
    """Refuse to resume a run that is not an unfinished run of the same inputs and parameters."""
    data = load_record(folder)
    if data.get("command") != command:
        raise InputError(f"{folder} holds a {data.get('command')} run, not a {command} run: nothing to resume")
    if data["status"] == "complete":
        raise InputError(f"run {folder} is already complete: nothing to resume")
    if data["status"] == "running" and not killed(data):
        raise InputError(f"run {folder} is still running (process {data.get('pid')}): wait for it or stop it first")
    if data["parameters"].get("scheme") == "short":
        raise InputError("--resume works for the long-range scheme only: run --scheme short again into a new folder")
    recorded = {"inputs": data["inputs"], "parameters": data["parameters"]}
    given = json.loads(json.dumps({"inputs": inputs, "parameters": parameters}))
    for part in ("inputs", "parameters"):
        for key in sorted(set(recorded[part]) | set(given[part])):
            if recorded[part].get(key) != given[part].get(key):
                raise InputError(f"--resume needs the arguments of the run in {folder}: {part[:-1]} '{key}' "
                                 "differs (or an input file changed); give the same arguments")


def _fail(reporter: Reporter, record: RunRecord | None, status: str, message: str, code: int) -> int:
    """Record the end (if the record can still be written) and report the error line, always."""
    if record is not None:
        try:
            record.finish(status, message)
        except OSError as error:
            message += f" (run.json could not be updated: {error.strerror or error})"
    reporter.error(message)
    return code


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
