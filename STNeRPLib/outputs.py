"""Writing a model's outputs at one time point — displacement, Jacobian, labelmap, predicted
image — with their metrics against what is known there, and the run's metrics table."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict, cast

import numpy as np
import SimpleITK as sitk

from .contract import time_point_folder
from .geometry import Grid, inverted, transformed
from .io import write_image
from .metrics import folding_statistics, jacobian_determinant, score_time_point
from .model import SeriesModel, labels_in
from .warping import inverse_displacement, slabs, warp

if TYPE_CHECKING:
    from .series import Series
    from .warping import Warped


@dataclass
class TimePoint:
    """One time at which outputs are written: its grid, and what is known there."""

    time: float
    grid: Grid
    image: sitk.Image | None = None           # the scanned image, if any
    prealignment: np.ndarray | None = None


class _Files(TypedDict):
    displacement: str
    jacobian: str
    image: str
    inverse_displacement: str
    labelmap: str | None


@dataclass
class Written:
    """What write_time_point wrote: the run.json entry, and the labelmap still in memory (the short-range
    scheme carries it to the next pair)."""

    entry: dict
    labelmap: np.ndarray | None


def write_time_point(model: SeriesModel, point: TimePoint, folder: Path, series: Series | None,
                     structures: list[int] | None = None) -> Written:
    """Write displacement, Jacobian, labelmap, predicted image and the inverse displacement
    (reference -> time t, on the reference grid) at one time, with their metrics. Each whole-volume
    array is let go as soon as it is written and measured (memory: about two fields at a time).
    With a labelmap, the entry's labels_lost lists the structures (labels; default: SeriesModel.structures, those
    of the model's labelmap) that no voxel of the propagated labelmap holds; for a scan that covers part of the
    reference grid (its own grid smaller, or padded: find_padding), field_of_view is the share it covers."""
    name = time_point_folder(point.time)
    files: _Files = {"displacement": f"{name}/displacement.nrrd", "jacobian": f"{name}/jacobian.nrrd",
                     "image": f"{name}/image.nrrd", "inverse_displacement": f"{name}/inverse_displacement.nrrd",
                     "labelmap": f"{name}/labelmap.nrrd" if model.labelmap is not None else None}
    inverse = model.grid.image(inverse_displacement(model, point.time, point.prealignment), vector=True)
    write_image(inverse, folder / files["inverse_displacement"])
    del inverse
    warped = warp(model, point.time, point.grid, point.prealignment)
    field_image = point.grid.image(warped.displacement, vector=True)      # float32: as computed
    del warped.displacement                                              # the image holds it now
    write_image(field_image, folder / files["displacement"])
    jacobian = jacobian_determinant(field_image)
    write_image(jacobian, folder / files["jacobian"])
    folding = folding_statistics(sitk.GetArrayViewFromImage(jacobian))
    del jacobian
    write_image(point.grid.image(warped.image), folder / files["image"])
    if warped.labelmap is not None:
        write_image(point.grid.image(warped.labelmap.astype(np.uint16, copy=False)),
                    folder / cast(str, files["labelmap"]))
    metrics = {**time_point_metrics(model, point, warped, field_image, series), **folding}
    entry = {"time": point.time, "scanned": point.image is not None, **files,
             "image_sources": warped.image_sources, "metrics": metrics,
             "prealignment": point.prealignment.tolist() if point.prealignment is not None else None}
    if point.time in model.views:
        entry["field_of_view"] = float(np.mean(model.views[point.time]))
    if warped.labelmap is not None:
        expected = structures if structures is not None else model.structures
        entry["labels_lost"] = sorted(set(expected) - set(labels_in(warped.labelmap)))
    return Written(entry, warped.labelmap)


def time_point_metrics(model: SeriesModel, point: TimePoint, warped: Warped, field_image: sitk.Image,
                       series: Series | None) -> dict:
    """PSNR/SSIM against the scanned image (in the reference's CT numbers where the fit calibrated it); Dice and
    TRE where ground truth is given (folding statistics: None here, they come from the Jacobian, written and let
    go before). PSNR and SSIM are on intensities normalised to [0, 1]."""
    images = labelmaps = landmarks = None
    if point.image is not None:
        images = (model.window.normalise(warped.image), model.window.normalise(_as_fitted(model, point)))
    if series is not None and point.time in series.ground_truth and warped.labelmap is not None:
        labelmaps = (warped.labelmap, sitk.GetArrayViewFromImage(series.ground_truth[point.time]))
    if series is not None and point.time in series.landmarks:
        landmarks = series.landmarks[point.time]
    return score_time_point(field=field_image, images=images, labelmaps=labelmaps, landmarks=landmarks)


def _as_fitted(model: SeriesModel, point: TimePoint) -> np.ndarray:
    """The time point's scan on its own grid as Def-Net fitted it: as scanned, or, where the fit calibrated its CT
    numbers, in the reference's (each voxel q at reference-grid point prealignment^-1(q)), slab by slab."""
    scan = sitk.GetArrayViewFromImage(cast(sitk.Image, point.image))
    calibration = model.calibrations.get(point.time)
    if calibration is None:
        return scan
    inverse = inverted(point.prealignment)
    fitted = np.empty(scan.shape, np.float32)
    for z0, z1 in slabs(point.grid):
        p = transformed(point.grid.points(z0, z1), inverse)
        fitted[z0:z1] = calibration.corrected_at(scan[z0:z1].ravel(), model.grid.to_index(p)).reshape(
            scan[z0:z1].shape)
    return fitted


def write_metrics_table(entries: list[dict], path: Path) -> None:
    """metrics.csv: one row per time point; Dice columns per label. Column names carry their units
    (psnr_db, tre_*_mm); the run.json metrics keys are the names without them."""
    labels = sorted({label for e in entries for label in e["metrics"]["dice"]}, key=int)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["time", "scanned"] + [f"{key}{unit}" for key, unit in METRIC_UNITS.items()]
                        + [f"dice_{label}" for label in labels])
        for e in entries:
            m = e["metrics"]
            row = [e["time"], e["scanned"]] + [m[key] for key in METRIC_UNITS]
            writer.writerow(row + [m["dice"].get(label) for label in labels])


METRIC_UNITS = {"folded_voxels": "", "jacobian_min": "", "jacobian_max": "", "psnr": "_db", "ssim": "",
                "tre_mean": "_mm", "tre_std": "_mm", "tre_max": "_mm"}
"""metrics.csv columns after time and scanned: run.json metric key -> unit suffix of the column name."""
