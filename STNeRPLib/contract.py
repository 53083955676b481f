"""The worker contract: what the `stnerp` command accepts and says, and the run folder it writes.

One definition shared by the worker (its argparse), the Slicer module (its combo boxes, the
command line it builds, the events it reads, the run folders it imports) and the test stand-in
worker. Torch-free and Qt-free, so Slicer's own Python can import it. See ARCHITECTURE.md,
"The worker contract".
"""
from __future__ import annotations

import _thread
import argparse
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence, Sized
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import InputError
from .presets import LABEL_INTERPOLATIONS, PRESETS

if TYPE_CHECKING:
    from types import FrameType

# -- choices ---------------------------------------------------------------------------------
PRESET_NAMES: tuple[str, ...] = tuple(sorted(PRESETS))
DEFAULT_PRESET = "default"
DEVICES = ("auto", "cpu", "cuda")
#: what Def-Net deforms: Ref-Net (the paper) or the reference image ("w/o prior")
PRIORS = ("refnet", "image")
#: pre-alignment of the follow-ups: auto (a rigid transform of each whose anatomy lies, moved or turned, more than
#: preprocessing.FAR_MM from the reference's), none, affine (an affine transform of every one)
PREALIGNMENTS = ("auto", "none", "affine")
#: intensity normalisation: auto (the CT window for scans in Hounsfield units, else percentiles), ct, percentile
INTENSITIES = ("auto", "ct", "percentile")
SCHEMES = ("long", "short")
#: Def-Net's loss: mean squared error (the paper), the Charbonnier penalty (squared error for small
#: residuals, absolute for large) or local normalised cross-correlation
SIMILARITIES = ("mse", "charbonnier", "lncc")

# -- structures: the worker takes one labelmap, one label per voxel ---------------------------


def paint_order(voxels: Sequence[Sized]) -> list[int]:
    """Positions of overlapping structures (each its voxels) in the order to paint them into one labelmap,
    a later one taking the shared voxels: largest first, so each shared voxel ends in the smallest structure
    holding it (a GTV inside its lung keeps its whole extent); equal sizes keep the given order (the later
    one wins, as in 3D Slicer's merged export). The panel's segments and an RTSTRUCT's ROIs are merged so."""
    return sorted(range(len(voxels)), key=lambda i: -len(voxels[i]))


# -- exit codes ------------------------------------------------------------------------------
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

# -- events (one JSON object per stdout line with --json-events) -----------------------------
EVENT_PROGRESS = "progress"   # stage, iteration, total, loss, eta (s)
EVENT_DONE = "done"           # status, output
EVENT_ERROR = "error"         # message (one line)
STAGE_REFNET = "refnet"
STAGE_DEFNET = "defnet"
STAGE_OUTPUTS = "outputs"
STAGES = (STAGE_REFNET, STAGE_DEFNET, STAGE_OUTPUTS)

#: with this flag the worker stops as on SIGINT when its standard input closes: the Slicer module
#: cancels by closing the pipe (Windows has no SIGTERM for a windowless process), and a worker
#: whose parent died stops too
STDIN_CANCEL_FLAG = "--cancel-on-stdin-close"


def stop_on_interruption(stdin_cancel: bool) -> None:
    """Turn SIGTERM, SIGINT (installed explicitly: a background job inherits it ignored) and, with
    stdin_cancel, the end of standard input into one KeyboardInterrupt in the main thread."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _interrupt)
    if stdin_cancel:
        threading.Thread(target=_interrupt_when_stdin_closes, daemon=True).start()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """Stop once: later signals are ignored, so they cannot cut short the writing of the run
    folder as interrupted."""
    for other in (signal.SIGTERM, signal.SIGINT):
        signal.signal(other, signal.SIG_IGN)
    raise KeyboardInterrupt


def _interrupt_when_stdin_closes() -> None:
    """Read standard input to its end, then interrupt the main thread as Ctrl-C would (through
    the SIGINT handler, so only once)."""
    for _ in sys.stdin:
        pass
    _thread.interrupt_main()


# -- the run folder --------------------------------------------------------------------------
RUN_FILE = "run.json"
STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"
STATUS_INTERRUPTED = "interrupted"
STATUS_FAILED = "failed"
#: files of one time point, keys of its run.json entry (paths relative to the run folder):
#: u_t (time t -> reference, on the time-t grid), its Jacobian determinant, the propagated
#: labelmap, the predicted image, and the exact inverse map (reference -> time t, on the reference grid)
TIME_POINT_FILES = ("displacement", "jacobian", "labelmap", "image", "inverse_displacement")
#: the run's report page, relative to the run folder (run.json "report" once written)
REPORT_FOLDER = "report"
REPORT_PAGE = f"{REPORT_FOLDER}/index.html"
#: what else a run writes at the top of its folder: the model, the metrics table, the training losses
MODEL_FILE, METRICS_FILE, LOSSES_FILE = "model.pt", "metrics.csv", "losses.csv"
#: the training checkpoint, while a run is unfinished (train --resume continues from it)
CHECKPOINT_FILE = "checkpoint.pt"
RUN_FILES = (RUN_FILE, RUN_FILE + ".tmp", MODEL_FILE, METRICS_FILE, LOSSES_FILE, CHECKPOINT_FILE,
             CHECKPOINT_FILE + ".tmp")


def holds_only_a_run(folder: str | os.PathLike) -> bool:
    """Whether a folder holds nothing but a run's own files: those above, its report folder and
    its t_<time>/ folders of images (so that removing it loses nothing else)."""
    for entry in Path(folder).iterdir():
        if entry.is_dir() and entry.name.startswith("t_"):
            if not all(file.is_file() and file.suffix == ".nrrd" for file in entry.iterdir()):
                return False
        elif not ((entry.is_file() and entry.name in RUN_FILES) or (entry.is_dir() and entry.name == REPORT_FOLDER)):
            return False
    return True


def time_point_folder(t: float) -> str:
    """Folder of the outputs at time t: 't_' and the shortest text that reads back as t."""
    return "t_" + format_time(t)


def format_time(t: float) -> str:
    """Shortest text of a time that reads back as the same number: 1.0 -> '1', 2.5 -> '2.5'."""
    t = float(t)
    return str(int(t)) if t.is_integer() and abs(t) < 1e15 else repr(t)


def read_run(folder: str | os.PathLike) -> dict:
    """The run.json of a run folder; OSError or ValueError when it is missing or unreadable. A pre-alignment recorded
    as a bool (before --prealign auto, 2026-12-06) reads as the choice it was: false none, true affine."""
    with open(Path(folder) / RUN_FILE, encoding="utf-8") as handle:
        record = json.load(handle)
    if not isinstance(record, dict):
        raise ValueError(f"{Path(folder) / RUN_FILE} is not a run record")
    parameters = record.get("parameters")
    if isinstance(parameters, dict) and isinstance(parameters.get("prealign"), bool):
        parameters["prealign"] = "affine" if parameters["prealign"] else "none"
    return record


def write_run(folder: str | os.PathLike, record: dict) -> None:
    """Write a run folder's run.json atomically (write_json)."""
    write_json(record, Path(folder) / RUN_FILE)


def write_json(data: dict, path: str | os.PathLike) -> None:
    """Write JSON atomically (a reader sees the old or the new file, never half of one); NaN and
    infinity are written as null, so the file is strict JSON."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(finite_or_none(data), indent=2, default=_plain, allow_nan=False),
                         encoding="utf-8")
    os.replace(temporary, path)


def json_line(event: dict) -> str:
    """One event as one line of strict JSON (NaN and infinity as null)."""
    return json.dumps(finite_or_none(event), default=_plain, allow_nan=False)


def finite_or_none(value: object) -> Any:
    """The same data with every NaN or infinite float replaced by None (JSON null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def _plain(value: object) -> object:
    """numpy scalars and paths, which json cannot write by itself."""
    if hasattr(value, "item"):
        return finite_or_none(value.item())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def intensity_calibrations(record: dict) -> dict[float, dict]:
    """Time -> how the fit calibrated that follow-up's CT numbers onto the reference's (run.json's
    intensity_calibrations: the run's, or with --scheme short each pair's in its time point)."""
    pairs = [*record.get("intensity_calibrations", []),
             *(pair for p in record.get("time_points") or [] for pair in p.get("intensity_calibrations", []))]
    return {float(t): calibration for t, calibration in pairs}


def numbering(calibration: dict | None, scanned: bool | None) -> str:
    """How a time point's CT numbers were fitted, as the report's and the panel's tables say it (HU): "0.867 × the
    reference's +8, a bias of -0 to +61 (calibrated: 172 off)" for a calibrated follow-up, "as scanned" for
    another scan, "" where no scan was taken."""
    if calibration is None:
        return "as scanned" if scanned else ""
    low, high = calibration["bias_hu"]
    return (f"{calibration['scale']:.3f} × the reference's {calibration['offset_hu']:+.0f}, a bias of {low:+.0f} to "
            f"{high:+.0f} (calibrated: {calibration['change_hu']:.0f} off)")


def is_complete(record: dict) -> bool:
    """Whether a run record's status is complete (only then are its outputs whole)."""
    return record.get("status") == STATUS_COMPLETE


def killed(record: dict) -> bool:
    """Whether a "running" record's process is gone (killed without a chance to record it): no
    process has its `pid`, or the one that has it is not the one that wrote the record (its
    `process_start` differs: the PID was reused, or the machine restarted)."""
    if record.get("status") != STATUS_RUNNING or not record.get("pid"):
        return False
    pid = int(record["pid"])
    if not process_alive(pid):
        return True
    started, recorded = process_start(pid), record.get("process_start")
    return started is not None and recorded is not None and started != recorded


def process_alive(pid: int) -> bool:
    """Whether a process with this PID exists, without signalling it. (On Windows, os.kill(pid, 0)
    is not a check: signal 0 is CTRL_C_EVENT, a Ctrl+C to the process group.)"""
    if sys.platform == "win32":
        import _winapi
        try:
            handle = _winapi.OpenProcess(_SYNCHRONIZE, False, pid)
        except OSError as error:          # no such process (87), or another user's (5): alive
            return getattr(error, "winerror", None) == _ACCESS_DENIED
        try:
            return _winapi.WaitForSingleObject(handle, 0) == _winapi.WAIT_TIMEOUT
        finally:
            _winapi.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # alive, another user's
        return True
    return True


_SYNCHRONIZE, _ACCESS_DENIED = 0x00100000, 5


def process_start(pid: int) -> str | None:
    """Identity of the process now holding `pid`: the boot's id and the process's start time in
    clock ticks since boot ("boot/ticks"), from Linux's /proc; None where that cannot be read."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{boot}/{stat[stat.rindex(')') + 2:].split()[19]}"     # field 22, after "pid (comm) "


def resumable(record: dict) -> bool:
    """Whether `train --resume` can continue a run: a training run (either scheme) that was
    interrupted, failed, or killed (see killed)."""
    unfinished = record.get("status") in (STATUS_INTERRUPTED, STATUS_FAILED) or killed(record)
    return record.get("command") == "train" and unfinished


# -- command lines ---------------------------------------------------------------------------
def _number(value: float) -> str:
    """A number as command-line text: positional notation (argparse takes '-1e-05' for an option,
    '-0.00001' for a value), no trailing '.0', reading back as the same float."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"time {value} is not a finite number")
    text = format(Decimal(repr(value)), "f")
    return text[:-2] if text.endswith(".0") else text


def train_arguments(reference: str, reference_time: float, follow_ups: Sequence[tuple[str, float]],
                    output: str, *, segmentation: str | None = None, landmarks: str | None = None,
                    ground_truth: Sequence[tuple[str, float]] = (), predict_times: Sequence[float] = (),
                    preset: str = DEFAULT_PRESET, iterations: int | None = None, device: str = "auto",
                    prior: str | None = None, prealign: str = "auto", similarity: str | None = None,
                    intensity: str = "auto",
                    label_interpolation: str | None = None, velocity_levels: int | str | None = None,
                    anchor_reference: bool | None = None, stop_on_convergence: bool | None = None,
                    structure_points: float | None = None, calibrate_intensities: bool | None = None,
                    resume: bool = False,
                    json_events: bool = True, stdin_cancel: bool = False) -> list[str]:
    """Arguments of `stnerp train` (after `python -m STNeRPLib`). Paths must be absolute: the
    worker may run in another working directory. velocity_levels: a count or "auto"; intensity "auto" passes no
    flag. prior, similarity,
    label_interpolation, velocity_levels, anchor_reference, stop_on_convergence, structure_points and
    calibrate_intensities None: the preset's own (no flag); structure_points needs a segmentation."""
    if not follow_ups:
        raise ValueError("at least one follow-up image is needed")
    _check_choice("preset", preset, PRESET_NAMES)
    _check_choice("device", device, DEVICES)
    _check_choice("prealign", prealign, PREALIGNMENTS)
    if prior is not None:
        _check_choice("prior", prior, PRIORS)
    if similarity is not None:
        _check_choice("similarity", similarity, SIMILARITIES)
    _check_choice("intensity", intensity, INTENSITIES)
    if label_interpolation is not None:
        _check_choice("label_interpolation", label_interpolation, LABEL_INTERPOLATIONS)
    paths = [reference, output, segmentation, landmarks] + [p for p, _ in follow_ups] + [p for p, _ in ground_truth]
    _check_absolute(paths)
    args = ["train", "--reference", reference, f"--reference-time={_number(reference_time)}"]
    for path, t in follow_ups:
        args += ["--follow-up", path, _number(t)]
    for flag, optional_path in (("--segmentation", segmentation), ("--landmarks", landmarks)):
        if optional_path:
            args += [flag, optional_path]
    for path, t in ground_truth:
        args += ["--ground-truth", path, _number(t)]
    if predict_times:
        args += ["--predict-times"] + [_number(t) for t in predict_times]
    args += ["--output", output, "--preset", preset, "--device", device, "--prealign", prealign]
    if iterations:
        args += ["--iterations", str(int(iterations))]
    if prior is not None:
        args += ["--prior", prior]
    if similarity is not None:
        args += ["--similarity", similarity]
    if intensity != "auto":
        args += ["--intensity", intensity]
    if label_interpolation is not None:
        args += ["--label-interpolation", label_interpolation]
    if velocity_levels is not None:
        args += ["--velocity-levels", "auto" if velocity_levels == "auto" else str(int(velocity_levels))]
    if anchor_reference is not None:
        args += ["--anchor-reference" if anchor_reference else "--no-anchor-reference"]
    if stop_on_convergence is not None:
        args += ["--stop-on-convergence" if stop_on_convergence else "--no-stop-on-convergence"]
    if structure_points is not None:
        args += ["--structure-points", _number(structure_points)]
    if calibrate_intensities is not None:
        args += ["--calibrate-intensities" if calibrate_intensities else "--no-calibrate-intensities"]
    if resume:
        args += ["--resume"]
    return args + _flags(json_events, stdin_cancel)


def predict_arguments(run: str, times: Sequence[float], output: str, *, json_events: bool = True,
                      stdin_cancel: bool = False) -> list[str]:
    """Arguments of `stnerp predict`: query a complete run at `times` (absolute paths)."""
    if not times:
        raise ValueError("at least one time is needed")
    _check_absolute([run, output])
    return (["predict", "--run", run, "--times"] + [_number(t) for t in times] + ["--output", output]
            + _flags(json_events, stdin_cancel))


def _flags(json_events: bool, stdin_cancel: bool) -> list[str]:
    return (["--json-events"] if json_events else []) + ([STDIN_CANCEL_FLAG] if stdin_cancel else [])


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


def _check_absolute(paths: Sequence[str | None]) -> None:
    relative = [p for p in paths if p and not os.path.isabs(p)]
    if relative:
        raise ValueError(f"path {relative[0]!r} is relative: the worker needs absolute paths")


# -- the command line ------------------------------------------------------------------------
MAX_SEED = 2**63 - 1
EXTRAPOLATION_LIMIT = 10.0
"""How far outside the scanned times a prediction may go, in scanned spans (last - first time)."""


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """The parsed command line (InputError with one line for a usage error); `command` is the
    command's name and `argv` the arguments as given."""
    args = parser().parse_args(_negative_numbers_as_values(list(argv)))
    args.argv = list(argv)
    return args


def is_number(text: str) -> bool:
    """Whether float() reads the text as a number ('inf' and 'nan' included)."""
    try:
        float(text)
        return True
    except ValueError:
        return False


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are InputErrors, so they reach --json-events as error events."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{self.prog}: {message} (see {self.prog} --help)")


def _negative_numbers_as_values(argv: list[str]) -> list[str]:
    """argparse takes a token such as -1e3 or -inf for an option; a leading space keeps every
    negative number a value (float() ignores the space)."""
    return [f" {a}" if a.startswith("-") and is_number(a) else a for a in argv]


def parser() -> argparse.ArgumentParser:
    """The stnerp command line; each command's `command` default is its name (worker.py maps it to
    what the command does)."""
    main_parser = _Parser(prog="stnerp",
                          description="The stnerp command: train on a series or a cohort, predict, evaluate, report, "
                                      "run the demo.")
    subcommands = main_parser.add_subparsers(required=True, metavar="COMMAND")
    train = _command(subcommands, "train", "fit ST-NeRP to a series and write every output")
    train.add_argument("--reference", required=True, metavar="PATH",
                       help="reference image (the planning CT, or phase 0)")
    train.add_argument("--reference-time", type=float, default=0.0, metavar="T",
                       help="time of the reference (default 0)")
    train.add_argument("--follow-up", nargs=2, action="append", default=[], metavar=("PATH", "TIME"),
                       help="a follow-up image and its time (phase or days); repeat for each")
    train.add_argument("--segmentation", metavar="PATH",
                       help="reference labelmap to propagate, a 3D Slicer .seg.nrrd, or the RT Structure Set or SEG "
                            "(.dcm file) drawn on it")
    train.add_argument("--landmarks", metavar="CSV",
                       help="landmark pairs for TRE: time,x,y,z,ref_x,ref_y,ref_z (LPS mm)")
    train.add_argument("--ground-truth", nargs=2, action="append", default=[], metavar=("PATH", "TIME"),
                       help="a ground-truth labelmap (or .seg.nrrd, RTSTRUCT or SEG) at a scanned time, for Dice")
    add_fit_options(train)
    train.add_argument("--resume", action="store_true",
                       help="continue an interrupted, failed or killed run in --output (same arguments)")
    train.add_argument("--dicom-out", type=Path, metavar="DIR",
                       help="also write, per follow-up, an RT Structure Set and a Deformable Spatial "
                            "Registration (inputs must be DICOM series: folders, or one file of each)")
    predict = _command(subcommands, "predict", "query a trained run at new times, without retraining")
    predict.add_argument("--run", required=True, type=Path, metavar="DIR", help="folder of a complete training run")
    predict.add_argument("--times", required=True, nargs="+", type=float, metavar="T")
    demo = _command(subcommands, "demo", "run the whole pipeline on the built-in phantom and print metrics")
    demo.add_argument("--preset", choices=PRESET_NAMES, default=DEFAULT_PRESET)
    demo.add_argument("--iterations", type=int, metavar="N")
    demo.add_argument("--size", nargs=3, type=int, default=[96, 96, 64], metavar=("X", "Y", "Z"),
                      help="voxels per axis (the field of view stays the whole thorax: the spacing scales)")
    demo.add_argument("--longitudinal", action="store_true", help="the shrinking-tumour fractions instead of breathing")
    demo.add_argument("--no-report", action="store_true", help="do not write report/index.html at the end")
    report = _command(subcommands, "report", "write RUN/report/index.html: figures and tables of a run")
    report.add_argument("--run", required=True, type=Path, metavar="DIR", help="folder of a run")
    report.add_argument("--label-names", metavar="JSON", help='names of the labels, e.g. {"1": "GTV"}')
    report.add_argument("--curve-times", type=int, default=50, metavar="N",
                        help="times at which the model is queried for the curves over time (default 50)")
    dicom = _command(subcommands, "dicom", "write a run's contours and deformations as DICOM (RTSTRUCT, REG)")
    dicom.add_argument("--run", required=True, type=Path, metavar="DIR",
                       help="folder of a complete run on DICOM series")
    dicom.add_argument("--dicom-out", required=True, type=Path, metavar="DIR")
    dicom.add_argument("--label-names", metavar="JSON", help='names of the labels, e.g. {"1": "GTV"}')
    evaluate = _command(subcommands, "evaluate", "compare a run's outputs with ground truth")
    evaluate.add_argument("--run", required=True, type=Path, metavar="DIR")
    evaluate.add_argument("--image", nargs=2, action="append", default=[], metavar=("PATH", "TIME"),
                          help="the real image at a time of the run (PSNR, SSIM)")
    evaluate.add_argument("--ground-truth", nargs=2, action="append", default=[], metavar=("PATH", "TIME"),
                          help="a ground-truth labelmap (or .seg.nrrd, RTSTRUCT or SEG) at a time of the run (Dice)")
    evaluate.add_argument("--landmarks", metavar="CSV", help="landmark pairs (TRE)")
    batch = _command(subcommands, "batch", "train every series of a cohort on Dask (one run folder per patient)")
    batch.add_argument("--cohort", required=True, type=Path, metavar="CSV",
                       help="cohort manifest: patient,role,path,time rows (see README, Cohorts)")
    batch.add_argument("--output", required=True, type=Path, metavar="DIR",
                       help="folder of the cohort: DIR/<patient>/ per series, summary.csv and summary.json")
    batch.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler (default: a local cluster)")
    batch.add_argument("--workers", type=int, metavar="N", help="local cluster: worker processes (default: cores / K)")
    batch.add_argument("--threads-per-worker", type=int, metavar="K",
                       help="local cluster: torch and ITK threads of each worker's series (default: 1)")
    batch.add_argument("--dicom-out", type=Path, metavar="DIR",
                       help="also write each patient's RT Structure Set and Deformable Spatial Registration per "
                            "follow-up into DIR/<patient>/ (its images must be DICOM series), for runs complete "
                            "before too")
    add_fit_options(batch)
    batch.set_defaults(resume=False)   # the batch decides per series whether to resume
    return main_parser


def add_fit_options(command: argparse.ArgumentParser) -> None:
    """How to fit a series: the options of train, which batch applies to every series of a cohort."""
    command.add_argument("--predict-times", nargs="+", type=float, default=[], metavar="T",
                         help="also write outputs at these times (e.g. never scanned); at most "
                              f"{EXTRAPOLATION_LIMIT:g} scanned spans outside the scanned times")
    command.add_argument("--preset", choices=PRESET_NAMES, default=DEFAULT_PRESET)
    command.add_argument("--iterations", type=int, metavar="N",
                         help="iterations of each network (overrides the preset; with --stop-on-convergence, "
                              "the most Def-Net runs)")
    command.add_argument("--prior", choices=PRIORS,
                         help="what Def-Net deforms: Ref-Net (the paper; the paper preset's) or the reference "
                              "image ('w/o prior'; the default preset's, sampled by cubic B-spline)")
    command.add_argument("--similarity", choices=SIMILARITIES,
                         help="Def-Net's loss: mse, the mean squared error (the presets' without a segmentation); "
                              "charbonnier, squared error for small residuals and absolute for large (motion no smooth "
                              "field follows: organs sliding, skin moving; the default preset's with a segmentation); "
                              "or lncc, local normalised cross-correlation (for intensities that change between "
                              "scans: CBCT, contrast)")
    command.add_argument("--structure-points", type=float, metavar="F",
                         help="fraction of Def-Net's voxels drawn about the segmentation's structure boundaries "
                              "(9 mm either side, as many per structure), so a small structure's contour weighs "
                              "in the fit (default: the preset's: 0.1 in default, 0 in paper; 0: uniformly)")
    command.add_argument("--smoothing-sigma", type=float, metavar="VOXELS",
                         help="Gaussian smoothing of the scans as Def-Net's fit sees them, in voxels along each axis "
                              "(the outputs carry the scans unsmoothed); against detail finer than the grid resolves, "
                              "which helped coarse phantoms and hurt CT at its native resolution (default: the "
                              "preset's; 0: none, as the paper)")
    command.add_argument("--body-mask", action=argparse.BooleanOptionalAction,
                         help="draw Def-Net's voxels only in and about the body, not in the air around it, where "
                              "they have no motion to follow (default: the preset's: on in default, off in paper)")
    command.add_argument("--calibrate-intensities", action=argparse.BooleanOptionalAction,
                         help="fit a CT follow-up whose CT numbers differ from the reference's (a CBCT's scale, offset "
                              "and smooth bias) in the reference's numbers; CT in HU only (default: the preset's: on "
                              "in default, off in paper; off: every scan as scanned)")
    command.add_argument("--label-interpolation", choices=LABEL_INTERPOLATIONS,
                         help="how the segmentation is carried to each time: linear, label-wise trilinear (the "
                              "default preset's), or nearest, the nearest voxel's label (the paper's)")
    command.add_argument("--anchor-reference", action=argparse.BooleanOptionalAction,
                         help="make the reference time the identity exactly: velocity Def-Net(x, t) - "
                              "Def-Net(x, t_ref) (default: the preset's: on in default, off in paper)")
    command.add_argument("--stop-on-convergence", action=argparse.BooleanOptionalAction,
                         help="end Def-Net's fit once its loss stops improving, after a decay of the learning "
                              "rate; --iterations is then the most it runs (default: the preset's; off in both "
                              "presets: a fixed count)")
    command.add_argument("--velocity-levels", metavar="L|auto",
                         help="coarse-to-fine velocity: L grids, each of half the previous spacing, the finer "
                              "ones switched on late in training; auto: two, the finer one kept only where it "
                              "lowers the loss (default: the preset's)")
    command.add_argument("--pairwise", action="store_true", help="one network per follow-up, no time input ('w/o t')")
    command.add_argument("--scheme", choices=SCHEMES, default="long",
                         help="long: reference -> each; short: previous -> next")
    command.add_argument("--prealign", choices=PREALIGNMENTS, default="auto",
                         help="pre-alignment of the follow-ups to the reference: auto: a rigid transform of each whose "
                              "anatomy lies more than 10 mm from the reference's (default); none; affine: an affine "
                              "transform of every one")
    command.add_argument("--intensity", choices=INTENSITIES, default="auto",
                         help="normalisation: ct: the window -1000..500 HU; percentile: the reference's 0.5-99.5 "
                              "percentiles (MR, CBCT in scanner units, CT stored without its rescale); auto: ct for "
                              "scans in Hounsfield units, else percentile (default)")
    command.add_argument("--device", choices=DEVICES, default="auto")
    command.add_argument("--seed", type=int, default=0, help=f"random seed, 0..{MAX_SEED}")
    command.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                         help="save a training checkpoint in the output folder every N iterations "
                              "(and when interrupted); 0: none")
    command.add_argument("--skip-memory-check", action="store_true",
                         help="start even when the series' estimated peak memory exceeds the memory available "
                              "(the out-of-memory killer may then stop it: continue with --resume)")
    command.add_argument("--label-names", metavar="JSON",
                         help='names of the labels, e.g. {"1": "GTV"} (for the report)')
    command.add_argument("--no-report", action="store_true", help="do not write report/index.html at the end")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number >= 1")
    return int(text)


def _command(subcommands: argparse._SubParsersAction[_Parser], name: str,
             text: str) -> argparse.ArgumentParser:
    command = subcommands.add_parser(name, help=text, description=text)
    command.set_defaults(command=name)
    if name in ("train", "predict"):
        command.add_argument("--output", required=True, type=Path, metavar="DIR",
                             help="new folder for the run's outputs")
    if name == "demo":
        command.add_argument("--output", type=Path, metavar="DIR",
                             help="new folder for the phantom and the run (default runs/demo-<date>)")
    command.add_argument("--json-events", action="store_true",
                         help="print newline-delimited JSON events on stdout (for the Slicer module)")
    command.add_argument(STDIN_CANCEL_FLAG, action="store_true",
                         help="stop as on Ctrl-C when standard input closes (for the Slicer module)")
    if name != "batch":
        command.add_argument("--threads", type=_positive, metavar="N",
                             help="threads to compute with (default: the usable CPUs, less those other "
                                  "processes keep busy)")
    return command
