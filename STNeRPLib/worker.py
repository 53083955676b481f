"""The `stnerp` command: train on a series, predict new times, evaluate, or run the demo.

The Slicer module runs it in a background process with --json-events; batch users run it
from a shell. Exit codes: 0 done, 2 bad input, 130 interrupted (SIGINT/SIGTERM), 1 other failure.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from . import threads
from .errors import InputError
from .pipeline import Options, load_series, run_prediction, run_training
from .presets import PRESETS, Preset
from .progress import Reporter
from .record import RunRecord


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    reporter = Reporter(json_events=args.json_events)
    reporter.message(f"computing with {threads.use(args.threads).describe()}")
    signal.signal(signal.SIGTERM, _interrupt)
    return args.command(args, reporter)


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(prog="stnerp", description=__doc__.splitlines()[0])
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
                       help="also write outputs at these times (e.g. never scanned)")
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
    train.add_argument("--seed", type=int, default=0)
    predict = _command(commands, "predict", _predict, "query a trained run at new times, without retraining")
    predict.add_argument("--run", required=True, type=Path, metavar="DIR", help="folder of a complete training run")
    predict.add_argument("--times", required=True, nargs="+", type=float, metavar="T")
    demo = _command(commands, "demo", _demo, "run the whole pipeline on the built-in phantom and print metrics")
    demo.add_argument("--preset", choices=sorted(PRESETS), default="default")
    demo.add_argument("--iterations", type=int, metavar="N")
    demo.add_argument("--size", nargs=3, type=int, default=[96, 96, 64], metavar=("X", "Y", "Z"))
    demo.add_argument("--longitudinal", action="store_true", help="the shrinking-tumour fractions instead of breathing")
    evaluate = _command(commands, "evaluate", _evaluate, "compare a run's outputs with ground truth")
    evaluate.add_argument("--run", required=True, type=Path, metavar="DIR")
    evaluate.add_argument("--image", nargs=2, action="append", default=[], metavar=("PATH", "TIME"),
                          help="the real image at a time of the run (PSNR, SSIM)")
    evaluate.add_argument("--ground-truth", nargs=2, action="append", default=[], metavar=("PATH", "TIME"),
                          help="a ground-truth labelmap at a time of the run (Dice)")
    evaluate.add_argument("--landmarks", metavar="CSV", help="landmark pairs (TRE)")
    for command in (train, predict, demo, evaluate):
        command.add_argument("--threads", type=_positive, metavar="N",
                             help="threads to compute with (default: the usable CPUs, less those other "
                                  "processes keep busy)")
    return main_parser


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number >= 1")
    return int(text)


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


def _preset(args) -> Preset:
    """The chosen preset, with --iterations applied to both networks."""
    preset = PRESETS[args.preset]
    return preset.with_iterations(args.iterations) if args.iterations else preset


def _train(args, reporter: Reporter) -> int:
    options = Options(_preset(args), args.prior, not args.pairwise, args.scheme, args.prealign == "affine",
                      args.intensity, args.device, args.seed)
    inputs = {"reference": args.reference, "reference_time": args.reference_time,
              "follow_ups": [[p, t] for p, t in args.follow_up], "segmentation": args.segmentation,
              "landmarks": args.landmarks, "ground_truth": [[p, t] for p, t in args.ground_truth],
              "predict_times": args.predict_times}

    def body(record: RunRecord) -> None:
        series = load_series(args.reference, args.reference_time, _timed(args.follow_up),
                             args.segmentation, args.landmarks, _timed(args.ground_truth))
        run_training(series, options, args.output, reporter, args.predict_times, record)
    return _recorded(args.output, "train", inputs, options.to_dict(), body, reporter)


def _predict(args, reporter: Reporter) -> int:
    def body(record: RunRecord) -> None:
        run_prediction(_complete_model(args.run), args.times, args.output, reporter, record)
    return _recorded(args.output, "predict", {"run": str(args.run), "times": args.times}, {}, body, reporter)


def _demo(args, reporter: Reporter) -> int:
    from .demo import demo_series, run_demo
    preset = _preset(args)
    folder = args.output or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    series, held_out = demo_series(args.longitudinal, tuple(args.size))
    inputs = {"phantom": "longitudinal" if args.longitudinal else "breathing", "size": args.size,
              "held_out_time": series.times[held_out]}
    return _recorded(folder / "run", "demo", inputs, preset.to_dict(),
                     lambda record: run_demo(folder, series, held_out, preset, record, reporter), reporter)


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
    from .evaluation import load_record
    record = load_record(run)
    if record.get("status") != "complete" or not record.get("model"):
        raise InputError(f"run {run} is not complete (status: {record.get('status')}): train it again")
    return run / record["model"]


def _recorded(folder: Path, command: str, inputs: dict, parameters: dict,
              body: Callable[[RunRecord], None], reporter: Reporter) -> int:
    """Run body with a run record in `folder` that ends complete, failed or interrupted."""
    try:
        if (folder / "run.json").exists():
            raise InputError(f"output folder {folder} already holds a run: choose a new folder")
        record = RunRecord(folder, command, inputs, parameters)
    except InputError as error:
        reporter.error(str(error))
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
        return _fail(reporter, record, "failed", f"internal error: {type(error).__name__}: {error}", 1)


def _fail(reporter: Reporter, record: RunRecord | None, status: str, message: str, code: int) -> int:
    if record is not None:
        record.finish(status, message)
    reporter.error(message)
    return code


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
