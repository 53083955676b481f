"""Benchmark series with exact ground truth, written to a folder so every method (each in its own
process) reads the very same images.

A series folder holds meta.json and, per time index k: image_k.nrrd (float32 HU), labelmap_k.nrrd
(uint8), displacement_k.nrrd (ground-truth u_k: VectorFloat64 mm, LPS, time-k grid, mapping a
time-k point q to the reference point q + u_k(q)), body_k.nrrd (uint8 mask where the dense
displacement error is measured) and landmarks_k.npz (points in the time-k image, matching
reference points; mm, LPS). Index 0 is the reference.

Series:
- breathing: STNeRPLib.phantom.breathing_series (10 phases).
- longitudinal: STNeRPLib.phantom.longitudinal_series (5 weekly fractions).
- chest: "real anatomy, simulated motion": the TotalSegmentator chest CT from ../shared/data
  warped by a known smooth breathing-like diffeomorphic field (below), image_t(q) = CT(q + u_t(q)).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from STNeRPLib import phantom  # noqa: E402
from STNeRPLib.geometry import Grid  # noqa: E402
from STNeRPLib.metrics import jacobian_determinant  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"
CHEST_CT = SHARED_DATA / "chest_ct"
CHEST_STRUCTURES = (("aorta", 1), ("brachiocephalic_trunk", 2), ("common_carotid_artery_left", 3),
                    ("subclavian_artery_left", 4), ("vertebrae_T12", 5))
CHEST_LUNG_LABEL, CHEST_LUNG_HU = 6, -500.0
PHANTOM_LABELS = {1: "tumour", 2: "right lung", 3: "left lung"}

# Chest motion (mm): a(t) = sin^2(pi t / n) as the phantom; SI motion largest at the inferior
# (diaphragm) end and smaller near the midline, anterior chest wall rising, lateral expansion;
# tapered to zero over TAPER_MM at every face of the field of view so no point leaves it.
CHEST_SI_AMP, CHEST_SI_WIDTH, CHEST_MIDLINE_STILL, CHEST_MIDLINE_WIDTH = 12.0, 70.0, 0.5, 35.0
CHEST_AP_AMP, CHEST_AP_EDGE, CHEST_LR_AMP, CHEST_LR_WIDTH, CHEST_CHEST_WIDTH = 4.0, 25.0, 2.0, 60.0, 90.0
TAPER_MM, CHEST_NOISE_HU, CHEST_LANDMARKS = 30.0, 10.0, 100


def body_mask(image: sitk.Image, threshold: float = -500.0) -> np.ndarray:
    """Body of a CT with air around it: voxels above threshold, holes (lungs) filled per axial
    slice, largest connected component. [z, y, x] bool."""
    array = sitk.GetArrayViewFromImage(image) > threshold
    filled = np.stack([ndimage.binary_fill_holes(s) for s in array])
    labels, count = ndimage.label(filled)
    if count == 0:
        return filled
    sizes = ndimage.sum(filled, labels, range(1, count + 1))
    return labels == (1 + int(np.argmax(sizes)))


def write_series(folder: Path, name: str, description: str, times, images, labelmaps, displacements,
                 bodies, landmarks, labels: dict[int, str], heldout: int, extra: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k, (image, labelmap, field, body, marks) in enumerate(zip(images, labelmaps, displacements, bodies, landmarks)):
        sitk.WriteImage(image, str(folder / f"image_{k}.nrrd"))
        sitk.WriteImage(labelmap, str(folder / f"labelmap_{k}.nrrd"))
        sitk.WriteImage(field, str(folder / f"displacement_{k}.nrrd"))
        mask = sitk.GetImageFromArray(body.astype(np.uint8))
        mask.CopyInformation(image)
        sitk.WriteImage(mask, str(folder / f"body_{k}.nrrd"))
        np.savez(folder / f"landmarks_{k}.npz", points=marks[0], reference=marks[1])
    meta = {"name": name, "description": description, "times": [float(t) for t in times],
            "labels": {str(k): v for k, v in labels.items()}, "heldout": heldout,
            "size": list(images[0].GetSize()), "spacing": list(images[0].GetSpacing()), **(extra or {})}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return folder


class Series:
    """A series folder read back: meta, and lazily the images of each time index."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.times = self.meta["times"]

    def image(self, k: int) -> sitk.Image:
        return sitk.ReadImage(str(self.folder / f"image_{k}.nrrd"), sitk.sitkFloat32)

    def labelmap(self, k: int) -> sitk.Image:
        return sitk.ReadImage(str(self.folder / f"labelmap_{k}.nrrd"), sitk.sitkUInt8)

    def displacement(self, k: int) -> sitk.Image:
        return sitk.ReadImage(str(self.folder / f"displacement_{k}.nrrd"), sitk.sitkVectorFloat64)

    def body(self, k: int) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(self.folder / f"body_{k}.nrrd"))) > 0

    def landmarks(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        data = np.load(self.folder / f"landmarks_{k}.npz")
        return data["points"], data["reference"]


# ----------------------------------------------------------------------------- phantoms


def phantom_series(folder: Path, kind: str, size, spacing, count: int, heldout: int) -> Path:
    if kind == "breathing":
        s = phantom.breathing_series(size=size, spacing=spacing, n_phases=count)
        description = f"breathing phantom, {count} phases"
    else:
        s = phantom.longitudinal_series(size=size, spacing=spacing, n_fractions=count)
        description = f"longitudinal phantom, {count} weekly fractions"
    bodies = [body_mask(image) for image in s.images]
    return write_series(folder, kind, description, s.times, s.images, s.labelmaps, s.displacements,
                        bodies, s.landmarks, PHANTOM_LABELS, heldout)


# ----------------------------------------------------------------------------- chest CT


def chest_available() -> bool:
    return (CHEST_CT / "ct_cropped.nii.gz").exists()


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def chest_motion(bounds: tuple[np.ndarray, np.ndarray], n_phases: int):
    """u(p, t) (mm) on the chest CT's field of view [low, high] (LPS mm)."""
    low, high = bounds
    centre = (low + high) / 2

    def motion(p: np.ndarray, t: float) -> np.ndarray:
        x, y, z = p[..., 0], p[..., 1], p[..., 2]
        a = np.sin(np.pi * t / n_phases) ** 2
        taper = np.prod(_smoothstep(np.minimum(p - low, high - p) / TAPER_MM), axis=-1)
        midline = 1.0 - CHEST_MIDLINE_STILL * np.exp(-0.5 * ((x - centre[0]) / CHEST_MIDLINE_WIDTH) ** 2)
        si = CHEST_SI_AMP * np.exp(-0.5 * ((z - low[2] - TAPER_MM) / CHEST_SI_WIDTH) ** 2) * midline
        chest = np.exp(-0.5 * ((z - centre[2]) / CHEST_CHEST_WIDTH) ** 2)
        ap = CHEST_AP_AMP * chest / (1.0 + np.exp((y - centre[1]) / CHEST_AP_EDGE))  # anterior: y small
        lr = -CHEST_LR_AMP * chest * np.tanh((x - centre[0]) / CHEST_LR_WIDTH)
        return (a * taper)[..., None] * np.stack([lr, ap, si], axis=-1)

    return motion


def chest_series(folder: Path, spacing_mm: float, n_phases: int, heldout: int, seed: int = 0) -> Path:
    """Real chest CT (1.5 mm) resampled to `spacing_mm` and warped by chest_motion: exact ground
    truth for the images, the structure labelmaps and the landmarks."""
    ct = sitk.ReadImage(str(CHEST_CT / "ct_cropped.nii.gz"), sitk.sitkFloat32)
    if np.abs(np.reshape(ct.GetDirection(), (3, 3)) - np.eye(3)).max() > 1e-6:
        raise ValueError("chest CT with a non-identity direction is not handled")
    origin, fine = np.asarray(ct.GetOrigin()), np.asarray(ct.GetSpacing())
    # Anti-aliased continuous version of the CT (cubic splines of the smoothed 1.5 mm volume).
    sigma = max(0.0, 0.5 * spacing_mm / fine[0] - 0.5)
    ct_array = sitk.GetArrayFromImage(ct).astype(np.float64)
    smooth = ndimage.gaussian_filter(ct_array, sigma) if sigma > 0 else ct_array
    coefficients = ndimage.spline_filter(smooth, order=3)
    labels = np.zeros(ct_array.shape, np.uint8)
    labels[ndimage.gaussian_filter(ct_array, 1.0) < CHEST_LUNG_HU] = CHEST_LUNG_LABEL
    for name, value in CHEST_STRUCTURES:
        labels[sitk.GetArrayFromImage(sitk.ReadImage(str(CHEST_CT / f"{name}.nii.gz"))) > 0] = value
    extent = (np.asarray(ct.GetSize()) - 1) * fine
    size = [int(np.floor(e / spacing_mm)) + 1 for e in extent]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetOrigin(tuple(origin))
    grid.SetSpacing((spacing_mm,) * 3)
    high = origin + extent
    motion = chest_motion((origin, high), n_phases)
    points = Grid.of(grid).points().reshape(*Grid.of(grid).shape, 3)

    def lookup(volume, p, order):
        index = np.moveaxis(((p - origin) / fine)[..., ::-1], -1, 0)  # (k, j, i) for [z, y, x]
        return ndimage.map_coordinates(volume, index, order=order, mode="nearest", prefilter=False)

    rng = np.random.default_rng(seed)
    candidates = origin + TAPER_MM / 3 + rng.uniform(0, 1, (20000, 3)) * (extent - 2 * TAPER_MM / 3)
    times, images, labelmaps, fields, bodies, marks = [], [], [], [], [], []
    for k in range(n_phases):
        t = float(k)
        u = motion(points, t)
        hu = lookup(coefficients, points + u, 3)
        hu += CHEST_NOISE_HU * np.random.default_rng([seed, 1, k]).standard_normal(hu.shape)
        image = sitk.GetImageFromArray(hu.astype(np.float32))
        image.CopyInformation(grid)
        labelmap = sitk.GetImageFromArray(lookup(labels, points + u, 0).astype(np.uint8))
        labelmap.CopyInformation(grid)
        field = sitk.GetImageFromArray(u, isVector=True)
        field.CopyInformation(grid)
        ref_points = candidates + motion(candidates, t)
        ref_labels = lookup(labels, ref_points, 0)
        lung = np.flatnonzero(ref_labels == CHEST_LUNG_LABEL)[:CHEST_LANDMARKS // 2]
        other = np.flatnonzero(ref_labels != CHEST_LUNG_LABEL)[:CHEST_LANDMARKS - len(lung)]
        keep = np.sort(np.concatenate([lung, other]))
        times.append(t)
        images.append(image)
        labelmaps.append(labelmap)
        fields.append(field)
        bodies.append(np.ones(hu.shape, bool))  # the crop lies inside the body
        marks.append((candidates[keep], ref_points[keep]))
    jac_min = min(float(sitk.GetArrayFromImage(jacobian_determinant(f)).min()) for f in fields)
    names = {value: name for name, value in CHEST_STRUCTURES}
    names[CHEST_LUNG_LABEL] = f"lung (HU < {CHEST_LUNG_HU:g})"
    description = (f"real anatomy, simulated motion: TotalSegmentator chest CT resampled to {spacing_mm:g} mm, "
                   f"{n_phases} phases of a known smooth breathing-like diffeomorphism "
                   f"(SI {CHEST_SI_AMP:g} mm, AP {CHEST_AP_AMP:g} mm, LR {CHEST_LR_AMP:g} mm; min det J {jac_min:.2f})")
    return write_series(folder, "chest", description, times, images, labelmaps, fields, bodies, marks, names,
                        heldout, {"ground_truth_min_jacobian": jac_min})
