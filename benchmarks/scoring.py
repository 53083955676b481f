"""How the benchmark scores a method: the same code for every method, from the files it wrote.

A method's result at time index k is the displacement u on the time-k grid mapping a time-k point
q to the reference point q + u(q) (mm, LPS; ARCHITECTURE.md). Its metrics there are the engine's
one definition (STNeRPLib.metrics.score_time_point: folding, PSNR/SSIM, Dice; its target_registration_error), fed with:
- images: the reference resampled through u (linear; beyond the image its nearest border value:
  the anatomy continues past the field of view) against the time-k image, both through the CT
  window [-1000, 500] HU -> [0, 1];
- labelmaps: the reference labelmap carried through u (label-wise linear, ITK's sitkLabelLinear: how
  STNeRP's default carries it, warping.propagate_labels; nearest neighbour until 2026-12-02, which capped a
  small tumour's Dice below 0.9 even with the exact motion) against the time-k one;
- landmarks: the series' exact correspondences;
plus one figure only a benchmark can have: the dense error |u - u_true| over the body mask; and where the landmark
error lies: each landmark's error beside its distance from the first structure of the reference labelmap (the
tumour, the aorta, the spleen), pooled over the time points by `summarise` into bands (tre_by_distance.py).

At a held-out time h (between scans a and b) the predicted image of every method follows the
recipe of STNeRP's own output (STNeRPLib.warping): each of the two scans is carried to h through
the method's motion and the two are blended linearly in time (`motion_compensated`).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from statistics import median

import numpy as np
import SimpleITK as sitk

from benchmarks import tre_by_distance
from benchmarks.data import Series
from STNeRPLib.geometry import Grid
from STNeRPLib.metrics import jacobian_determinant, map_points, score_time_point, target_registration_error
from STNeRPLib.preprocessing import CT_WINDOW, IntensityWindow
# warping's resampler and field->transform are the recipe of STNeRP's predicted image; the peers'
# motion-compensated interpolation uses the very same ones, so only the motion differs.
from STNeRPLib.warping import INVERSE_STEPS, interpolation_weights, linear_interpolation, resample_onto

WINDOW = IntensityWindow(*CT_WINDOW)


def windowed(array: np.ndarray) -> np.ndarray:
    """HU -> [0, 1] through the CT window (the one the engine scores with)."""
    return WINDOW.normalise(np.asarray(array, np.float64))


def resample_through(image: sitk.Image, field: sitk.Image, interpolator: int, default: float) -> sitk.Image:
    """`image` at q + u(q) for every voxel q of the field's grid (beyond the image: its nearest
    border value)."""
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    return sitk.Resample(image, field, transform, interpolator, default, image.GetPixelID(), True)


def dense_error(field: sitk.Image, truth: sitk.Image, body: np.ndarray) -> dict:
    """|u - u_true| (mm) over the body mask: mean and max."""
    error = np.linalg.norm(sitk.GetArrayFromImage(field) - sitk.GetArrayFromImage(truth), axis=-1)[body]
    return {"dense_error_mean": float(error.mean()), "dense_error_max": float(error.max())}


def largest_displacement(field: sitk.Image) -> float:
    """max |u| (mm) over the field's grid: at the reference time, how far the run's motion is from the identity."""
    return float(np.linalg.norm(sitk.GetArrayViewFromImage(field), axis=-1).max())


def score_field(series: Series, k: int, field: sitk.Image) -> dict:
    """Every metric of the field u at time index k (see the module's docstring)."""
    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    warped = resample_through(series.image(0), field, sitk.sitkLinear, -1000.0)
    labels = resample_through(series.labelmap(0), field, sitk.sitkLabelLinear, 0)
    scores = score_time_point(
        field=field, jacobian=sitk.GetArrayFromImage(jacobian_determinant(field)),
        images=(windowed(sitk.GetArrayFromImage(warped)), windowed(sitk.GetArrayFromImage(series.image(k)))),
        labelmaps=(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(series.labelmap(k))),
        labels=[int(i) for i in series.meta["labels"]])
    points, reference = series.landmarks(k)
    mapped = map_points(field, points)                  # once, for the TRE and for its bands
    return {"time": series.times[k], **scores, **target_registration_error(mapped, reference),
            **dense_error(field, series.displacement(k), series.body(k)), **landmark_errors(series, mapped, reference)}


def landmark_errors(series: Series, mapped: np.ndarray, reference: np.ndarray) -> dict:
    """Each landmark's error |q + u(q) - reference| (mm), from its mapped point q + u(q), and its reference point's
    distance (mm) from the surface of the series' first structure (0 inside it)."""
    errors = np.linalg.norm(mapped - reference, axis=1)
    distances = tre_by_distance.distances_at(_first_structure_distance(str(series.folder)), reference)
    return {"landmark_errors": errors.tolist(), "landmark_distances": distances.tolist()}


@lru_cache(maxsize=8)
def _first_structure_distance(folder: str) -> sitk.Image:
    """tre_by_distance.distance_from the first label of the series' reference labelmap (one per series)."""
    series = Series(Path(folder))
    return tre_by_distance.distance_from(series.labelmap(0), int(next(iter(series.meta["labels"]))))


def summarise(per_time: list[dict], labels: dict[str, str]) -> dict:
    """Over the registered time points: means (TRE std pooled within and between time points),
    the worst TRE and Jacobian, the sum of folded voxels, Dice per label and its mean over labels."""
    def mean(key: str) -> float:
        return float(np.mean([p[key] for p in per_time]))
    tre = [p["tre_mean"] for p in per_time]
    dice = {label: float(np.nanmean([p["dice"][label] for p in per_time])) for label in labels}
    return {"tre_mean": mean("tre_mean"),
            "tre_std": float(np.sqrt(np.mean([p["tre_std"] ** 2 for p in per_time]) + np.var(tre))),
            "tre_max": float(max(p["tre_max"] for p in per_time)), "dense_error_mean": mean("dense_error_mean"),
            "folded_voxels": int(sum(p["folded_voxels"] for p in per_time)),
            "jacobian_min": float(min(p["jacobian_min"] for p in per_time)),
            "psnr": mean("psnr"), "ssim": mean("ssim"), "dice": dice,
            "dice_mean": float(np.nanmean(list(dice.values()))),
            "tre_by_distance": tre_by_distance.binned(np.concatenate([p["landmark_errors"] for p in per_time]),
                                                      np.concatenate([p["landmark_distances"] for p in per_time]))}


def spread(values: list[float]) -> dict:
    """Median, min and max of repeated measurements, and how many there were."""
    return {"n": len(values), "median": float(median(values)), "min": float(min(values)), "max": float(max(values))}


def score_image(predicted: np.ndarray, actual: np.ndarray) -> dict:
    """PSNR / SSIM of a predicted image against the actual one (HU arrays, through the CT window)."""
    scores = score_time_point(images=(windowed(predicted), windowed(actual)))
    return {"psnr": scores["psnr"], "ssim": scores["ssim"]}


def invert(field: sitk.Image) -> sitk.Image:
    """w on the field's grid with r + w(r) + u(r + w(r)) = r: the inverse of q -> q + u(q), by the
    fixed-point iteration w <- -u(r + w) that STNeRPLib.warping.invert runs (converges where
    |grad u| < 1; the grids here are shared by every time point), from w = 0 for its full
    INVERSE_STEPS (a peer has no exp(-v) to start from)."""
    w = sitk.Image(field.GetSize(), sitk.sitkVectorFloat64)
    w.CopyInformation(field)
    for _ in range(INVERSE_STEPS):
        w = -resample_through(field, w, sitk.sitkLinear, 0.0)
    return w


def in_time(fields: dict[float, sitk.Image], t: float, like: sitk.Image) -> sitk.Image:
    """A pairwise method's u at an unscanned time t on the grid of `like`: its fields at the scans around t (each on
    its scan's grid, carried onto that one linearly, beyond a field its nearest border value) blended linearly in time
    (the method has no motion between scans of its own)."""
    grid = Grid.of(like)
    blend = np.zeros((*grid.shape, 3))
    for s, weight in interpolation_weights(sorted(fields), t).items():
        field = sitk.Cast(fields[s], sitk.sitkVectorFloat64)
        if not Grid.of(field).matches(grid):
            field = sitk.Resample(field, like, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64, True)
        blend += weight * sitk.GetArrayFromImage(field)
    return grid.image(blend, vector=True)


def motion_compensated(scans: dict[float, sitk.Image], inverses: dict[float, sitk.Image], u_t: sitk.Image,
                       t: float) -> np.ndarray:
    """Predicted image (HU) at an unscanned time t from the scans around it, as STNeRP's output:
    each scan s carried to t through q -> q + u_t(q) + w_s(q + u_t(q)) (w_s: the inverse of u_s,
    reference -> scan s), cubic B-spline, blended with interpolation_weights. The scans cover the field of view of
    u_t's grid, on it or on grids of their own (beyond a scan's grid, its nearest border value): no field-of-view
    weighting."""
    grid = Grid.of(u_t)
    u = sitk.Cast(u_t, sitk.sitkVectorFloat64)
    blend = np.zeros(grid.shape)
    for s, weight in interpolation_weights(sorted(scans), t).items():
        carried = u + resample_through(inverses[s], u, sitk.sitkLinear, 0.0)
        blend += weight * resample_onto(scans[s], sitk.DisplacementFieldTransform(carried), grid)
    return blend


def linear(scans: dict[float, sitk.Image], t: float, like: sitk.Image) -> np.ndarray:
    """The no-motion baseline at t on the grid of `like`: the two scans around t blended voxel by voxel (HU), each
    carried onto that grid first as the predicted image carries a scan (resample_onto; itself on that grid)."""
    grid = Grid.of(like)
    return linear_interpolation({s: sitk.GetArrayFromImage(image) if Grid.of(image).matches(grid) else
                                 resample_onto(image, sitk.Transform(), grid) for s, image in scans.items()}, t)
