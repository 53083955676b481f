"""Comparing a finished run's outputs with ground truth: real images (PSNR, SSIM), labelmaps
(Dice) and landmark pairs (TRE), at any time the run wrote, scanned or predicted."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import Grid
from .contract import write_json
from .dicom_in import labels_by_name, named_structures, require_drawn_on, say_unscored
from .io import check_landmarks_inside, read_image, read_labelmap, read_landmarks
from .metrics import score_time_point, target_registration_error
from .preprocessing import IntensityWindow, in_hounsfield_units, require_unit
from .progress import Reporter
from .record import load_record, require_complete


def evaluate_run(run: Path, images: list[tuple[str, float]], ground_truth: list[tuple[str, float]],
                 landmarks: str | None, reporter: Reporter) -> list[dict]:
    """Metrics per time point of a complete run against the given truth; writes evaluation.json
    into the run folder, prints a table and returns the rows."""
    run = Path(run)
    record = load_record(run)
    require_complete(run, record)
    entries = {float(e["time"]): e for e in record["time_points"]}
    window = IntensityWindow(*record["intensity_window"])
    pairs = read_landmarks(landmarks) if landmarks else {}
    parts: dict[float, dict] = {t: {} for t in sorted(entries)}
    for path, t in images:
        predicted = _output(run, _entry(entries, t, path), "image")
        actual = read_image(path, f"image at time {t:g}")
        _same_grid(actual, predicted, path)
        require_unit(actual, in_hounsfield_units(predicted), f"image {path}", "the run's image at that time")
        parts[t]["images"] = tuple(window.normalise(sitk.GetArrayFromImage(i)) for i in (predicted, actual))
    for path, t in ground_truth:
        entry = _entry(entries, t, path)
        if not entry.get("labelmap"):
            raise InputError(f"run {run} propagated no labelmap: train it with --segmentation")
        predicted = _output(run, entry, "labelmap")
        truth = _ground_truth(path, t, Grid.of(predicted), record, reporter)
        parts[t]["labelmaps"] = (sitk.GetArrayFromImage(predicted), sitk.GetArrayFromImage(truth))
    for t, (points, reference_points) in pairs.items():
        field = _output(run, _entry(entries, t, landmarks), "displacement")
        check_landmarks_inside(points, Grid.of(field), f"landmark at time {t:g}", f"the run's time-{t:g} grid")
        parts[t].update(field=field, landmarks=(points, reference_points))
    rows = [_row(t, given) for t, given in parts.items() if given]
    written = _new_evaluation_path(run)
    write_json({"run": str(run), "rows": rows}, written)
    reporter.message(format_table(rows))
    reporter.message(f"evaluation written to {written}")
    return rows


def _ground_truth(path: str, t: float, grid: Grid, record: dict, reporter: Reporter) -> sitk.Image:
    """The ground-truth labelmap at time t on the run's grid there; one that names its structures (an RTSTRUCT, a
    SEG, a Slicer .seg.nrrd) is checked against the scan it outlines and its structures numbered by the run's
    segmentation's names (dicom_in.labels_by_name), the reporter told of those left out."""
    what = f"ground-truth labelmap at time {t:g}"
    if named_structures(path) is None:
        return read_labelmap(path, grid, what)
    inputs = _trained_inputs(record)
    scans = {float(s): p for p, s in [(inputs["reference"], inputs["reference_time"]), *inputs.get("follow_ups", [])]}
    require_drawn_on(path, scans.get(t), what)
    truth = read_labelmap(path, grid, what, labels_by_name(path, inputs.get("segmentation")))
    say_unscored(path, inputs.get("segmentation"), t, reporter.message)
    return truth


def _trained_inputs(record: dict) -> dict:
    """The inputs of the training a run's outputs come from: its own, or a prediction's run's."""
    inputs = record["inputs"]
    return load_record(Path(inputs["run"]))["inputs"] if "run" in inputs else inputs


def _row(t: float, given: dict) -> dict:
    """One evaluation row: the scores of what was given at time t, and the landmarks' error
    without registration (tre_none, mm) beside their TRE."""
    row = {"time": t, **score_time_point(**given)}
    if "landmarks" in given:
        row["tre_none"] = target_registration_error(*given["landmarks"])["tre_mean"]
    return row


def _new_evaluation_path(run: Path) -> Path:
    """evaluation.json, or evaluation-2.json, -3, ... when evaluated before: never overwritten."""
    path, number = run / "evaluation.json", 1
    while path.exists():
        number += 1
        path = run / f"evaluation-{number}.json"
    return path


def format_table(rows: list[dict]) -> str:
    """A markdown table of evaluation rows (blank where a metric was not computed)."""
    labels = sorted({k for r in rows for k in r.get("dice", {})}, key=int)
    head = ["time", "TRE mean mm", "TRE max mm", "TRE unregistered mm", "PSNR dB", "SSIM"]
    head += [f"Dice {k}" for k in labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['time']:g}", _cell(r.get("tre_mean")), _cell(r.get("tre_max")),
                 _cell(r.get("tre_none")), _cell(r.get("psnr")), _cell(r.get("ssim"), 3)]
        cells += [_cell(r.get("dice", {}).get(k), 3) for k in labels]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float | None, digits: int = 2) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def _entry(entries: dict, t: float, source: str | None) -> dict:
    if t not in entries:
        raise InputError(f"{source} is at time {t:g}, which the run did not write: use one of "
                         f"{', '.join(f'{k:g}' for k in entries)} or predict that time first")
    return entries[t]


def _output(run: Path, entry: dict, kind: str) -> sitk.Image:
    return sitk.ReadImage(str(run / entry[kind]))


def _same_grid(actual: sitk.Image, predicted: sitk.Image, path: str) -> None:
    if not Grid.of(actual).matches(Grid.of(predicted)):
        raise InputError(f"image {path} is on another grid than the run's output at its time: "
                         "resample it onto that grid first")
