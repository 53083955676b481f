"""What each `stnerp` command does, given its parsed arguments: train (also each series of a
batch), predict, demo, report, dicom, evaluate. Each ends with an exit code of the worker contract
and, for those that write a run folder, a run.json that ends complete, failed or interrupted;
bad input is one line (InputError) with exit code 2."""
from __future__ import annotations

import errno
import json
import sys
import time
import traceback
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import contract
from .contract import MAX_SEED, is_number
from .dicom_in import say_unscored
from .errors import InputError
from .io import file_sha256
from .pipeline import run_prediction, run_training
from .presets import AUTO_LEVELS, MAX_SMOOTHING_SIGMA, PRESETS, Options, Preset
from .progress import Reporter
from .record import RunRecord, load_record, require_complete
from .series import check_memory, estimate_peak_bytes, load_series

if TYPE_CHECKING:
    import argparse


def _preset(args: argparse.Namespace) -> Preset:
    """The chosen preset, with --iterations (at least 1) applied to both networks, --similarity,
    --structure-points, --smoothing-sigma, --label-interpolation, --anchor-reference, --body-mask,
    --calibrate-intensities, --stop-on-convergence and --velocity-levels."""
    preset = PRESETS[args.preset]
    if getattr(args, "similarity", None) is not None:
        preset = replace(preset, similarity=args.similarity, structure_similarity=None)
    if getattr(args, "structure_points", None) is not None:
        if not 0 <= args.structure_points < 1:
            raise InputError(f"--structure-points {args.structure_points:g} is not a fraction: give a number from 0 "
                             "to below 1 (e.g. 0.1), or leave it out for the preset's")
        preset = replace(preset, structure_points=args.structure_points)
    if getattr(args, "smoothing_sigma", None) is not None:
        if not 0 <= args.smoothing_sigma <= MAX_SMOOTHING_SIGMA:
            raise InputError(f"--smoothing-sigma {args.smoothing_sigma:g} is out of range: give voxels from 0 (none) "
                             f"to {MAX_SMOOTHING_SIGMA:g}, or leave it out for the preset's")
        preset = replace(preset, smoothing_sigma=args.smoothing_sigma)
    if getattr(args, "label_interpolation", None) is not None:
        preset = replace(preset, label_interpolation=args.label_interpolation)
    if getattr(args, "anchor_reference", None) is not None:
        preset = replace(preset, anchor_reference=args.anchor_reference)
    if getattr(args, "body_mask", None) is not None:
        preset = replace(preset, body_mask=args.body_mask)
    if getattr(args, "calibrate_intensities", None) is not None:
        preset = replace(preset, calibrate_intensities=args.calibrate_intensities)
    if getattr(args, "stop_on_convergence", None) is not None:
        preset = replace(preset, stop_on_convergence=args.stop_on_convergence)
    if getattr(args, "velocity_levels", None) is not None:
        preset = _velocity_levels(args.velocity_levels, preset)
    if args.iterations is None:
        return preset
    if args.iterations < 1:
        raise InputError(f"--iterations {args.iterations} is not a positive number: give at least 1, "
                         "or leave it out for the preset's")
    return preset.with_iterations(args.iterations)


def _velocity_levels(text: str, preset: Preset) -> Preset:
    """The preset with --velocity-levels: L levels, every one kept, or 'auto' (AUTO_LEVELS levels, each
    finer one kept where it lowers the loss: adaptive_levels); InputError for fewer than 1, or for a finer
    level where the preset's velocity grid is the image grid."""
    if text == "auto":
        levels, adaptive = AUTO_LEVELS, True
    elif text.isdigit() and int(text) >= 1:
        levels, adaptive = int(text), False
    else:
        raise InputError(f"--velocity-levels {text} is neither a positive number nor auto: give 1 (one grid), "
                         "2, or auto")
    if levels > 1 and preset.velocity_spacing <= 0:
        raise InputError(f"--velocity-levels {text}: the {preset.name} preset's velocity grid is the image grid "
                         "already, which has no finer level; leave --velocity-levels out or use --preset default")
    return replace(preset, velocity_levels=levels, adaptive_levels=adaptive)


def train_options(args: argparse.Namespace) -> Options:
    """The Options of a train run (or of each series of a batch) from its command-line arguments;
    InputError for a value out of range."""
    if not 0 <= args.seed <= MAX_SEED:
        raise InputError(f"--seed {args.seed} is out of range: give a whole number from 0 to {MAX_SEED}")
    if args.checkpoint_every < 0:
        raise InputError("--checkpoint-every must be 0 (no checkpoints) or a positive number of iterations")
    if getattr(args, "structure_points", None) and hasattr(args, "segmentation") and args.segmentation is None:
        raise InputError("--structure-points draws voxels about the segmentation's structures: give --segmentation, "
                         "or leave --structure-points out")
    preset = _preset(args).for_segmentation(getattr(args, "segmentation", None) is not None)
    return Options(preset, args.prior, not args.pairwise, args.scheme, args.prealign,
                   args.intensity, args.device, args.seed)


def train_inputs(args: argparse.Namespace) -> dict:
    """The inputs of a train run as its run.json records them: absolute paths, each file's SHA-256."""
    follow_ups, ground_truth = timed(args.follow_up), timed(args.ground_truth)
    paths = [args.reference, *(p for p, _ in follow_ups), args.segmentation, args.landmarks,
             *(p for p, _ in ground_truth)]
    return {"reference": _absolute(args.reference), "reference_time": args.reference_time,
            "follow_ups": [[_absolute(p), t] for p, t in follow_ups], "segmentation": _absolute(args.segmentation),
            "landmarks": _absolute(args.landmarks), "ground_truth": [[_absolute(p), t] for p, t in ground_truth],
            "predict_times": args.predict_times, "label_names": args.label_names,
            "sha256": {_absolute(p): file_sha256(p) for p in paths if p}}


def _check_memory(args: argparse.Namespace, options: Options, reporter: Reporter) -> None:
    """Refuse, before anything is read or written, a series whose estimated peak memory (from the
    image headers) exceeds the memory available now, fitted with `options`. An image whose header cannot
    be read is left to load_series, which reports it in the run's record."""
    try:
        estimate = estimate_peak_bytes(args.reference, timed(args.follow_up), args.segmentation,
                                       args.prealign == "affine", options.preset.smoothing_sigma > 0)
    except InputError:
        return
    note = check_memory(estimate)
    if note:
        reporter.message(note)


def _absolute(path: str | None) -> str | None:
    return str(Path(path).absolute()) if path else None


def train_command(args: argparse.Namespace, reporter: Reporter) -> int:
    """The train command: one series into args.output, new or resumed (batch runs it per series)."""
    try:
        options, inputs = train_options(args), train_inputs(args)
        if not args.skip_memory_check:
            _check_memory(args, options, reporter)
    except InputError as error:
        reporter.error(str(error))
        return contract.EXIT_BAD_INPUT

    def body(record: RunRecord) -> None:
        # The series is not kept beyond training: the report loads model.pt again, and the scans held
        # twice were the whole run's peak (512x512x300 x 10 int16: 1.6 GB more while reporting).
        run_training(load_series(args.reference, args.reference_time, timed(args.follow_up),
                                 args.segmentation, args.landmarks, timed(args.ground_truth)),
                     options, args.output, reporter, args.predict_times, record, args.checkpoint_every)
        for path, t in timed(args.ground_truth):
            say_unscored(path, args.segmentation, t, reporter.message)
        if not args.no_report:
            _report_quietly(record, reporter)
    export = None
    if args.dicom_out:
        from .dicom_out import check_dicom_inputs

        def checks() -> None:
            _check_new_folder(args.dicom_out, "--dicom-out")
            check_dicom_inputs(args.reference, timed(args.follow_up))
        status = _guarded(checks, reporter)
        if status:
            return status
        export = partial(_dicom_from, args.output, args.dicom_out, args.label_names, reporter)
    return _recorded(args.output, "train", inputs, options.to_dict(), body, reporter, args, resume=args.resume,
                     then=export)


def dicom_command(args: argparse.Namespace, reporter: Reporter) -> int:
    """The dicom command: a complete run's RT Structure Sets and Deformable Spatial Registrations into --dicom-out (a
    new or empty folder)."""
    return export_dicom(args.run, args.dicom_out, args.label_names, reporter)


def export_dicom(run: Path, folder: Path, label_names: str | None, reporter: Reporter) -> int:
    """A complete run's DICOM into a new or empty folder (stnerp dicom; batch, for a run complete before)."""
    status = _guarded(lambda: _check_new_folder(folder, "--dicom-out"), reporter)
    return status or _dicom_from(run, folder, label_names, reporter)


def _dicom_from(run: Path, folder: Path, label_names: str | None, reporter: Reporter) -> int:
    """Export a complete run's contours and fields as DICOM; a failure leaves the run complete."""
    from .dicom_out import write_dicom
    return _guarded(lambda: reporter.message(
        f"DICOM: {len(write_dicom(run, folder, label_names, reporter.message))} files in {folder}"), reporter)


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


def report_command(args: argparse.Namespace, reporter: Reporter) -> int:
    """The report command: write RUN/report/index.html with its PNGs and CSVs, and log its path."""
    from .report import write_report
    return _guarded(lambda: reporter.message(f"report: {write_report(args.run, args.curve_times, args.label_names)}"),
                    reporter)


def predict_command(args: argparse.Namespace, reporter: Reporter) -> int:
    """The predict command: query a complete training run at --times into a new run folder (--output), without
    retraining."""
    def body(record: RunRecord) -> None:
        run_prediction(_complete_model(args.run), args.times, args.output, reporter, record)
    inputs = {"run": str(args.run.absolute()), "times": args.times}
    return _recorded(args.output, "predict", inputs, {}, body, reporter, args)


def demo_command(args: argparse.Namespace, reporter: Reporter) -> int:
    """The demo command: train on the built-in phantom (breathing, or --longitudinal) into --output (default
    runs/demo-<date>), predict its held-out time and print the metrics."""
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

    options = Options(preset.for_segmentation(True))   # the phantoms come with their segmentation

    def body(record: RunRecord) -> None:
        run_demo(folder, series, held_out, options, record, reporter)
        if not args.no_report:
            _report_quietly(record, reporter)
    return _recorded(folder / "run", "demo", inputs, options.to_dict(), body, reporter, args, root=folder)


def evaluate_command(args: argparse.Namespace, reporter: Reporter) -> int:
    """The evaluate command: a complete run's outputs against real images (PSNR, SSIM), ground-truth labelmaps (Dice)
    and landmarks (TRE), written to RUN/evaluation.json and printed as a table."""
    from .evaluation import evaluate_run
    return _guarded(lambda: evaluate_run(args.run, timed(args.image), timed(args.ground_truth),
                                         args.landmarks, reporter), reporter)


def timed(pairs: list[list[str]]) -> list[tuple[str, float]]:
    """(path, time) pairs from the command line, with the time checked to be a number."""
    try:
        return [(path, float(time)) for path, time in pairs]
    except ValueError:
        bad = next(t for _, t in pairs if not is_number(t))
        raise InputError(f"time '{bad}' is not a number: give each image's time as a number") from None


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
              reporter: Reporter, args: argparse.Namespace, resume: bool = False, root: Path | None = None,
              then: Callable[[], int] | None = None) -> int:
    """Run body with a run record in `folder` that ends complete, failed or interrupted. The folder
    (or `root`, the folder holding it) must be new or empty, unless resuming the run in it. `then`
    runs after a complete body (its exit status is the command's; the run stays complete); the
    done event comes last, when everything the command was asked for is written."""
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
    if status == contract.EXIT_OK and then is not None:
        status = then()
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


def _check_new_folder(folder: Path, option: str = "--output") -> None:
    """Refuse an output path that is a file or a folder holding anything (a run, or the user's files), except the
    record alone of a run that failed (as on a bad input): it wrote nothing else, and the new run replaces it."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{option} {folder} is a file: give the path of a new folder")
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if names == [contract.RUN_FILE] and _failed_record(folder):
        return
    if contract.RUN_FILE in names:
        raise InputError(f"output folder {folder} already holds a run: choose a new folder "
                         "(or add --resume to continue an unfinished training run)")
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise InputError(f"{option} folder {folder} is not empty (it holds {shown}): choose a new or "
                         "empty folder; nothing was written")


def _failed_record(folder: Path) -> bool:
    """Whether the folder's run record is readable and says the run failed."""
    try:
        return load_record(folder).get("status") == contract.STATUS_FAILED
    except InputError:
        return False


def _check_resumable(folder: Path, command: str, inputs: dict, parameters: dict) -> None:
    """Refuse to resume a run that is not an unfinished run of the same inputs and parameters."""
    data = load_record(folder)
    if data.get("command") != command:
        raise InputError(f"{folder} holds a {data.get('command')} run, not a {command} run: nothing to resume")
    if data["status"] == contract.STATUS_COMPLETE:
        raise InputError(f"run {folder} is already complete: nothing to resume")
    if data["status"] == contract.STATUS_RUNNING and not contract.killed(data):
        raise InputError(f"run {folder} is still running (process {data.get('pid')}): wait for it or stop it first")
    difference = first_difference(data, {"inputs": inputs, "parameters": parameters})
    if difference is not None:
        raise InputError(_not_resumable(folder, *difference))


ABSENT = object()
"""A setting or argument that one side (the run's record, or this call) lacks; a resume error says "absent"."""


def first_difference(record: dict, given: dict) -> tuple[str, str, object, object] | None:
    """The first input or parameter in which `given` ({"inputs": ..., "parameters": ...}, as run.json records them)
    differs from a run's record: ("input" or "parameter", its key, its value then, now; ABSENT where one lacks it), or
    None when they agree."""
    given = json.loads(json.dumps(given))
    for part in ("inputs", "parameters"):
        recorded, now_part = record.get(part) or {}, given[part]
        for key in sorted(set(recorded) | set(now_part)):
            then, now = recorded.get(key, ABSENT), now_part.get(key, ABSENT)
            if then != now:
                return part[:-1], key, then, now
    return None


def difference_text(part: str, key: str, then: object, now: object) -> str:
    """A difference of first_difference in words: "parameter 'prealign' was "none" then, "auto" now"; of a setting
    holding settings (the preset), the first three that differ: "parameter 'preset' differs (def_iterations 10 then,
    20 now)"."""
    if isinstance(then, dict) and isinstance(now, dict):
        names = [name for name in sorted(set(then) | set(now)) if then.get(name, ABSENT) != now.get(name, ABSENT)]
        shown = "; ".join(f"{name} {_shown(then.get(name, ABSENT))} then, {_shown(now.get(name, ABSENT))} now"
                          for name in names[:3]) + (f"; {len(names) - 3} more" if len(names) > 3 else "")
        return f"{part} '{key}' differs ({shown})"
    return f"{part} '{key}' was {_shown(then)} then, {_shown(now)} now"


def _not_resumable(folder: Path, part: str, key: str, then: object, now: object) -> str:
    """One line on why the run in `folder` cannot be resumed with these arguments: the input file that
    changed, or the argument (or preset setting) that differs, its value then and now, and the way out."""
    if key == "sha256" and isinstance(then, dict) and isinstance(now, dict):
        changed = next(path for path in sorted(set(then) | set(now)) if then.get(path) != now.get(path))
        return (f"--resume cannot continue the run in {folder}: input file {changed} changed since the run "
                "started; restore it, or train again in a new folder")
    if key == "sha256" and then is ABSENT:
        return (f"--resume cannot continue the run in {folder}: its run.json holds no checksums of its input files "
                "(started by an older STNeRP, or edited), so they cannot be told unchanged; train again in a new "
                "folder")
    if isinstance(then, dict) and isinstance(now, dict):
        return (f"--resume needs the arguments of the run in {folder}: its {difference_text(part, key, then, now)}; "
                "give the arguments it was started with, or, if you did, another version of STNeRP started it: train "
                "again in a new folder")
    return (f"--resume needs the arguments of the run in {folder}: {difference_text(part, key, then, now)}; give the "
            "arguments it was started with, or train again in a new folder")


def _shown(value: object) -> str:
    """A recorded value as the user typed it (JSON, so a list reads [1.5, 4.0]); ABSENT as "absent"."""
    return "absent" if value is ABSENT else json.dumps(value)


def _fail(reporter: Reporter, record: RunRecord | None, status: str, message: str, code: int) -> int:
    """Record the end (if the record can still be written) and report the error line, always."""
    if record is not None:
        try:
            record.finish(status, message)
        except OSError as error:
            message += f" (run.json could not be updated: {error.strerror or error})"
    reporter.error(message)
    return code
