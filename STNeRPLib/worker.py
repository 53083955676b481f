"""The `stnerp` command: train on a series or a cohort, predict new times, evaluate, report, or run
the demo.

The Slicer module runs it in a background process with --json-events; batch users run it from a
shell. Choices, exit codes, events and the run folder are the worker contract (contract.py):
0 done, 2 bad input, 130 interrupted (SIGINT/SIGTERM, or standard input closed with
--cancel-on-stdin-close), 1 other failure.
"""
from __future__ import annotations

import argparse
import errno
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from . import contract, threads
from .errors import InputError
from .io import file_sha256
from .pipeline import EXTRAPOLATION_LIMIT, Options, load_series, run_prediction, run_training
from .presets import PRESETS, Preset
from .progress import Reporter
from .record import RunRecord, killed, load_record, require_complete

MAX_SEED = 2**63 - 1


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
    return [f" {a}" if a.startswith("-") and _is_number(a) else a for a in argv]


def parser() -> argparse.ArgumentParser:
    main_parser = _Parser(prog="stnerp", description=__doc__.splitlines()[0])
    commands = main_parser.add_subparsers(required=True, metavar="COMMAND")
    train = _command(commands, "train", train_command, "fit ST-NeRP to a series and write every output")
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
    predict = _command(commands, "predict", _predict, "query a trained run at new times, without retraining")
    predict.add_argument("--run", required=True, type=Path, metavar="DIR", help="folder of a complete training run")
    predict.add_argument("--times", required=True, nargs="+", type=float, metavar="T")
    demo = _command(commands, "demo", _demo, "run the whole pipeline on the built-in phantom and print metrics")
    demo.add_argument("--preset", choices=contract.PRESET_NAMES, default=contract.DEFAULT_PRESET)
    demo.add_argument("--iterations", type=int, metavar="N")
    demo.add_argument("--size", nargs=3, type=int, default=[96, 96, 64], metavar=("X", "Y", "Z"),
                      help="voxels per axis (the field of view stays the whole thorax: the spacing scales)")
    demo.add_argument("--longitudinal", action="store_true", help="the shrinking-tumour fractions instead of breathing")
    demo.add_argument("--no-report", action="store_true", help="do not write report/index.html at the end")
    report = _command(commands, "report", _report, "write RUN/report/index.html: figures and tables of a run")
    report.add_argument("--run", required=True, type=Path, metavar="DIR", help="folder of a run")
    report.add_argument("--label-names", metavar="JSON", help='names of the labels, e.g. {"1": "GTV"}')
    report.add_argument("--curve-times", type=int, default=50, metavar="N",
                        help="times at which the model is queried for the curves over time (default 50)")
    dicom = _command(commands, "dicom", _dicom, "write a run's contours and deformations as DICOM (RTSTRUCT, REG)")
    dicom.add_argument("--run", required=True, type=Path, metavar="DIR", help="folder of a complete run on DICOM series")
    dicom.add_argument("--dicom-out", required=True, type=Path, metavar="DIR")
    dicom.add_argument("--label-names", metavar="JSON", help='names of the labels, e.g. {"1": "GTV"}')
    evaluate = _command(commands, "evaluate", _evaluate, "compare a run's outputs with ground truth")
    evaluate.add_argument("--run", required=True, type=Path, metavar="DIR")
    evaluate.add_argument("--image", nargs=2, action="append", default=[], metavar=("PATH", "TIME"),
                          help="the real image at a time of the run (PSNR, SSIM)")
    evaluate.add_argument("--ground-truth", nargs=2, action="append", default=[], metavar=("PATH", "TIME"),
                          help="a ground-truth labelmap at a time of the run (Dice)")
    evaluate.add_argument("--landmarks", metavar="CSV", help="landmark pairs (TRE)")
    batch = _command(commands, "batch", _batch, "train every series of a cohort on Dask (one run folder per patient)")
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
    command.add_argument("--seed", type=int, default=0, help=f"random seed, 0..{MAX_SEED}")
    command.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                         help="save a training checkpoint in the output folder every N iterations "
                              "(and when interrupted); 0: none")
    command.add_argument("--label-names", metavar="JSON", help='names of the labels, e.g. {"1": "GTV"} (for the report)')
    command.add_argument("--no-report", action="store_true", help="do not write report/index.html at the end")


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
    command.add_argument(contract.STDIN_CANCEL_FLAG, action="store_true",
                         help="stop as on Ctrl-C when standard input closes (for the Slicer module)")
    if name != "batch":
        command.add_argument("--threads", type=_positive, metavar="N",
                             help="threads to compute with (default: the usable CPUs, less those other "
                                  "processes keep busy)")
    return command


def _preset(args) -> Preset:
    """The chosen preset, with --iterations (at least 1) applied to both networks."""
    if args.iterations is None:
        return PRESETS[args.preset]
    if args.iterations < 1:
        raise InputError(f"--iterations {args.iterations} is not a positive number: give at least 1, "
                         "or leave it out for the preset's")
    return PRESETS[args.preset].with_iterations(args.iterations)


def train_options(args) -> Options:
    """The Options of a train run (or of each series of a batch) from its command-line arguments;
    InputError for a value out of range."""
    if not 0 <= args.seed <= MAX_SEED:
        raise InputError(f"--seed {args.seed} is out of range: give a whole number from 0 to {MAX_SEED}")
    if args.checkpoint_every < 0:
        raise InputError("--checkpoint-every must be 0 (no checkpoints) or a positive number of iterations")
    return Options(_preset(args), args.prior, not args.pairwise, args.scheme, args.prealign == "affine",
                   args.intensity, args.device, args.seed)


def train_inputs(args) -> dict:
    """The inputs of a train run as its run.json records them: absolute paths, each file's SHA-256."""
    follow_ups, ground_truth = _timed(args.follow_up), _timed(args.ground_truth)
    paths = [args.reference, *(p for p, _ in follow_ups), args.segmentation, args.landmarks,
             *(p for p, _ in ground_truth)]
    return {"reference": _absolute(args.reference), "reference_time": args.reference_time,
            "follow_ups": [[_absolute(p), t] for p, t in follow_ups], "segmentation": _absolute(args.segmentation),
            "landmarks": _absolute(args.landmarks), "ground_truth": [[_absolute(p), t] for p, t in ground_truth],
            "predict_times": args.predict_times, "label_names": args.label_names,
            "sha256": {_absolute(p): file_sha256(p) for p in paths if p}}


def _absolute(path: str | None) -> str | None:
    return str(Path(path).absolute()) if path else None


def train_command(args, reporter: Reporter) -> int:
    """The train command: one series into args.output, new or resumed (batch runs it per series)."""
    try:
        options, inputs = train_options(args), train_inputs(args)
    except InputError as error:
        reporter.error(str(error))
        return contract.EXIT_BAD_INPUT

    def body(record: RunRecord) -> None:
        series = load_series(args.reference, args.reference_time, _timed(args.follow_up),
                             args.segmentation, args.landmarks, _timed(args.ground_truth))
        run_training(series, options, args.output, reporter, args.predict_times, record, args.checkpoint_every)
        if not args.no_report:
            _report_quietly(record, reporter)
    if args.dicom_out:
        from .dicom_out import check_dicom_inputs
        status = _guarded(lambda: check_dicom_inputs(args.reference, _timed(args.follow_up)), reporter)
        if status:
            return status
    status = _recorded(args.output, "train", inputs, options.to_dict(), body, reporter, args, resume=args.resume)
    if status == contract.EXIT_OK and args.dicom_out:      # the run stays complete whatever happens here
        return _dicom_from(args.output, args.dicom_out, args.label_names, reporter)
    return status


def _dicom(args, reporter: Reporter) -> int:
    return _dicom_from(args.run, args.dicom_out, args.label_names, reporter)


def _dicom_from(run: Path, folder: Path, label_names: str | None, reporter: Reporter) -> int:
    from .dicom_out import write_dicom
    return _guarded(lambda: reporter.message(f"DICOM: {len(write_dicom(run, folder, label_names))} files in {folder}"),
                    reporter)


def _report_quietly(record: RunRecord, reporter: Reporter) -> None:
    """Write the report of a complete run; a failure is a warning, never a failed run."""
    from .report import write_report
    reporter.message("writing the report")
    try:
        page = write_report(record.folder)
    except Exception as error:  # the run's outputs are whole: only the report is missing
        traceback.print_exc(file=sys.stderr)
        reporter.message(f"warning: the report was not written: {type(error).__name__}: {error}")
        return
    record.set(report=str(page.relative_to(record.folder)))


def _report(args, reporter: Reporter) -> int:
    from .report import write_report
    return _guarded(lambda: reporter.message(f"report: {write_report(args.run, args.curve_times, args.label_names)}"),
                    reporter)


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
        return contract.EXIT_BAD_INPUT
    folder = args.output or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    series, held_out = demo_series(args.longitudinal, tuple(args.size))
    inputs = {"phantom": "longitudinal" if args.longitudinal else "breathing", "size": args.size,
              "held_out_time": series.times[held_out]}

    def body(record: RunRecord) -> None:
        run_demo(folder, series, held_out, preset, record, reporter)
        if not args.no_report:
            _report_quietly(record, reporter)
    return _recorded(folder / "run", "demo", inputs, preset.to_dict(), body, reporter, args, root=folder)


def _batch(args, reporter: Reporter) -> int:
    from .cohort import run_batch
    return run_batch(args, reporter)


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
        return contract.EXIT_BAD_INPUT
    except OSError as error:
        reporter.error(f"cannot write the output folder {folder}: {error.strerror or error}: "
                       "choose a folder you can write to")
        return contract.EXIT_BAD_INPUT
    status = _guarded(lambda: body(record), reporter, record)
    if status == contract.EXIT_OK:
        reporter.done(contract.STATUS_COMPLETE, str(folder))
    return status


def _guarded(body: Callable[[], object], reporter: Reporter, record: RunRecord | None = None) -> int:
    """Run body; report bad input (2), an interruption (130) or a failure (1) in one line."""
    try:
        body()
        return contract.EXIT_OK
    except InputError as error:
        return _fail(reporter, record, contract.STATUS_FAILED, str(error), contract.EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        return _fail(reporter, record, contract.STATUS_INTERRUPTED, "interrupted: outputs are incomplete",
                     contract.EXIT_INTERRUPTED)
    except Exception as error:  # the log keeps the details; the user gets one line
        traceback.print_exc(file=sys.stderr)
        return _fail(reporter, record, contract.STATUS_FAILED, _failure(error), contract.EXIT_FAILURE)


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
    if contract.RUN_FILE in names:
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
    if data["status"] == contract.STATUS_COMPLETE:
        raise InputError(f"run {folder} is already complete: nothing to resume")
    if data["status"] == contract.STATUS_RUNNING and not killed(data):
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


if __name__ == "__main__":
    sys.exit(main())
