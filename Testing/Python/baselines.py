"""What a registration must beat, scored the same way as the method: no registration (u = 0),
the sign flipped (-u), LPS/RAS mixed (x and y of u negated) and one time step off (u of the
neighbouring time), each built from the phantom's exact motion, so each is the best that a method
with that mistake could score.

Scores of a field u on the time-t grid (u maps a time-t point q to the reference point q + u(q)):
PSNR of the reference resampled through u against the time-t scan (CT window, [0, 1]); Dice of
the reference labelmap carried through u (label-wise linear, as the default preset carries it) against
the time-t labelmap; mean
TRE of the landmarks mapped through u. Computed here with SimpleITK and numpy only, not with the
engine's metric functions."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

CT_LOW, CT_HIGH = -1000.0, 500.0
MISTAKES = ("none", "flipped", "mixed", "off_by_one")


def vector_image(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    """A VectorFloat64 field with the geometry of `like`."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float64), isVector=True)
    image.CopyInformation(like)
    return image


def normalised(array: np.ndarray) -> np.ndarray:
    return np.clip((np.asarray(array, np.float64) - CT_LOW) / (CT_HIGH - CT_LOW), 0.0, 1.0)


def resampled(image: sitk.Image, field: sitk.Image, interpolator=sitk.sitkLinear) -> np.ndarray:
    """image at q + u(q) for every voxel q of the field's grid; outside the image, its lowest value
    (air for a CT, label 0 for a labelmap), as the engine pads."""
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    outside = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.GetArrayFromImage(sitk.Resample(image, field, transform, interpolator, outside, image.GetPixelID()))


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - b) ** 2)))


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    a, b = a == label, b == label
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def tre_mm(field: sitk.Image, points: np.ndarray, reference_points: np.ndarray) -> float:
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    mapped = np.array([transform.TransformPoint(tuple(map(float, p))) for p in points])
    return float(np.linalg.norm(mapped - reference_points, axis=1).mean())


def scores(series, t: float, field: sitk.Image, labels=(1, 2, 3)) -> dict:
    """PSNR (dB), Dice per label and mean TRE (mm) of `field` at phantom time t (scanned or not)."""
    scan = normalised(sitk.GetArrayFromImage(series.image_at(t)))
    warped = normalised(resampled(series.images[0], field))
    carried = resampled(series.labelmaps[0], field, sitk.sitkLabelLinear)
    truth = sitk.GetArrayFromImage(series.labelmap_at(t))
    return {"psnr": psnr_db(warped, scan), "dice": {label: dice(carried, truth, label) for label in labels},
            "tre": tre_mm(field, *series.landmarks_at(t))}


def mistake_fields(series, t: float) -> dict[str, sitk.Image]:
    """The exact field at time t with each mistake; off by one: the exact field at t minus or plus
    the series' time step, whichever scores the lower TRE (the stricter baseline), leaving out a
    neighbour whose motion is the same as at t (breathing is symmetric about its peak)."""
    like = series.images[0]
    exact = sitk.GetArrayFromImage(series.displacement_at(t))
    step = series.times[1] - series.times[0]
    arrays = [sitk.GetArrayFromImage(series.displacement_at(t + d)) for d in (-step, step)]
    neighbours = [vector_image(a, like) for a in arrays if np.abs(a - exact).max() > 1e-3]
    off = min(neighbours, key=lambda f: tre_mm(f, *series.landmarks_at(t)))
    return {"none": vector_image(np.zeros_like(exact), like), "flipped": vector_image(-exact, like),
            "mixed": vector_image(exact * np.array([-1.0, -1.0, 1.0]), like), "off_by_one": off}


def baseline_scores(series, t: float, labels=(1, 2, 3)) -> dict[str, dict]:
    """scores() of each mistake field at time t, and of the exact field ('exact')."""
    fields = mistake_fields(series, t) | {"exact": series.displacement_at(t)}
    return {name: scores(series, t, field, labels) for name, field in fields.items()}


def table(name: str, method: dict, baselines: dict[str, dict]) -> str:
    """One printable line per score kind: the method's figure beside every baseline's."""
    rows = [f"{name}: method " + _fmt(method)]
    rows += [f"  {b}: " + _fmt(s) for b, s in baselines.items()]
    return "\n".join(rows)


def _fmt(s: dict) -> str:
    dice_text = " ".join(f"{k}:{v:.3f}" for k, v in s["dice"].items())
    return f"PSNR {s['psnr']:.2f} dB, TRE {s['tre']:.2f} mm, Dice {dice_text}"
