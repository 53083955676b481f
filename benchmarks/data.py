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
- lung_tumour, lung_nodule: "real anatomy, simulated tumour response": a lung-tumour CT and its GTV from the
  radiomics phantom of the pycerr wheel (fetched from PyPI, never kept in the project), warped as the longitudinal
  phantom's tumour shrinks and its setup drifts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from STNeRPLib import phantom  # noqa: E402
from STNeRPLib.geometry import Grid  # noqa: E402
from STNeRPLib.metrics import jacobian_determinant  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable

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
# chest_native: crop margin around the lungs; an air component is a lung if at least this fraction of the largest.
NATIVE_MARGIN_MM, LUNG_MIN_FRACTION = 6.0, 0.2

ABDOMEN_CT = SHARED_DATA / "abdomen_ct"
# TotalSegmentator v2 "total" class ids (totalsegmentator/map_to_binary.py): the labels scored, and the
# organs that slide against the wall (spleen, kidneys, gallbladder, liver, stomach, pancreas, adrenals,
# small bowel, duodenum, colon, portal and splenic vein).
ABDOMEN_LABELS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", 31: "vertebrae_L1", 52: "aorta"}
ABDOMEN_SLIDING = (1, 2, 3, 4, 5, 6, 7, 8, 9, 18, 19, 20, 64)
# Abdomen motion (mm): organs SI, anterior wall AP; sliding band (Gaussian sigma); tapers.
ABDOMEN_SI_AMP, ABDOMEN_AP_AMP, ABDOMEN_BAND_MM = 10.0, 3.0, 3.0
ABDOMEN_TAPER_MM, ABDOMEN_AP_RAMP_MM, ABDOMEN_LANDMARKS = 25.0, 60.0, 100

RADIOMICS_PACKAGE, RADIOMICS_FOLDER = "pycerr==2.5.1", "cerr/datasets/radiomics_phantom_dicom"
RADIOMICS_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stnerp" / "pycerr-2.5.1"
"""Where the radiomics phantom's lung-tumour CTs (pat_1 .. pat_4: a CT series and an RT Structure Set with GTV-1
each; CC BY-NC 3.0) are unpacked from the pycerr wheel on first use: outside the project, as its licence asks."""
TUMOUR_PATIENTS = {"lung_tumour": 3, "lung_nodule": 2}
"""The tumour-response series and their radiomics patients: pat_3, a 12 cc tumour against the mediastinum (136 x 137
x 46 voxels); pat_2, a 6 cc nodule inside the lung (141 x 138 x 41); both 0.98 x 0.98 x 3 mm, cropped inside the
thorax (no air around the patient in their fields of view)."""


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


def cbct_like(image: sitk.Image, scale: float = 0.9, offset: float = 80.0, cupping: float = 80.0,
              noise: float = 0.0, seed: int = 0) -> sitk.Image:
    """The scan as a cone-beam CT might number it (int16): scale x HU + offset, less `cupping` HU at the axial
    centre falling to 0 at the middle of the grid's edges (a bowl: a paraboloid), plus Gaussian noise (HU)."""
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    half_height, half_width = hu.shape[1] / 2, hu.shape[2] / 2
    y, x = np.ogrid[:hu.shape[1], :hu.shape[2]]
    radius2 = ((y - half_height + 0.5) / half_height) ** 2 + ((x - half_width + 0.5) / half_width) ** 2
    hu *= scale
    hu += (offset - cupping * (1 - radius2)).astype(np.float32)
    if noise:
        hu += np.random.default_rng(seed).normal(0.0, noise, hu.shape).astype(np.float32)
    result = sitk.GetImageFromArray(np.rint(hu).astype(np.int16))
    result.CopyInformation(image)
    return result


def write_series(folder: Path, name: str, description: str, times: list[float], images: list[sitk.Image],
                 labelmaps: list[sitk.Image], displacements: list[sitk.Image], bodies: list[np.ndarray],
                 landmarks: list[tuple[np.ndarray, np.ndarray]], labels: dict[int, str], heldout: int,
                 extra: dict | None = None) -> Path:
    """Write a series folder: per time index k the image, labelmap, ground-truth displacement, body mask and
    landmarks, and meta.json (times, label names, the held-out index, size, spacing, `extra`); the folder."""
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

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.times = self.meta["times"]

    def image(self, k: int) -> sitk.Image:
        """The image of time index k (float32 HU)."""
        return sitk.ReadImage(str(self.folder / f"image_{k}.nrrd"), sitk.sitkFloat32)

    def labelmap(self, k: int) -> sitk.Image:
        """The structure labelmap of time index k (uint8)."""
        return sitk.ReadImage(str(self.folder / f"labelmap_{k}.nrrd"), sitk.sitkUInt8)

    def displacement(self, k: int) -> sitk.Image:
        """The ground-truth u_k of time index k: mm, LPS, time-k grid, mapping a time-k point q to q + u_k(q)."""
        return sitk.ReadImage(str(self.folder / f"displacement_{k}.nrrd"), sitk.sitkVectorFloat64)

    def body(self, k: int) -> np.ndarray:
        """The body mask of time index k, where the dense displacement error is measured: [z, y, x] bool."""
        return sitk.GetArrayFromImage(sitk.ReadImage(str(self.folder / f"body_{k}.nrrd"))) > 0

    def landmarks(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The landmarks of time index k: (points in the time-k image, matching reference points), mm, LPS."""
        data = np.load(self.folder / f"landmarks_{k}.npz")
        return data["points"], data["reference"]


# ----------------------------------------------------------------------------- phantoms


PSF_SUPERSAMPLING = 3
"""Sub-voxel samples per axis of a phantom voxel rendered through a box point-spread function one voxel wide
(`compare.py --psf`, preset_study.py's -psf series): each voxel the mean of 27 values instead of its centre's."""


def phantom_series(folder: Path, kind: str, size: tuple[int, int, int], spacing: tuple[float, float, float],
                   count: int, heldout: int, seed: int = 0, supersampling: int = 1) -> Path:
    """The breathing (count phases) or longitudinal (count weekly fractions) phantom of `seed`
    (anatomy, noise, landmarks) written as a benchmark series; with supersampling n > 1 each voxel rendered as
    the mean of n^3 sub-voxel samples (phantom.py: a box point-spread function one voxel wide)."""
    if kind == "breathing":
        s = phantom.breathing_series(size=size, spacing=spacing, n_phases=count, seed=seed,
                                     supersampling=supersampling)
        description = f"breathing phantom, {count} phases, seed {seed}"
    else:
        s = phantom.longitudinal_series(size=size, spacing=spacing, n_fractions=count, seed=seed,
                                        supersampling=supersampling)
        description = f"longitudinal phantom, {count} weekly fractions, seed {seed}"
    if supersampling > 1:
        description += f", each voxel the mean of {supersampling}^3 sub-voxel samples (a one-voxel box PSF)"
    bodies = [body_mask(image) for image in s.images]
    return write_series(folder, kind, description, s.times, s.images, s.labelmaps, s.displacements, bodies,
                        s.landmarks, PHANTOM_LABELS, heldout,
                        {"seed": seed, "count": count, "supersampling": supersampling})


# ----------------------------------------------------------------------------- CT with simulated motion


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _require_axis_aligned(image: sitk.Image, what: str) -> np.ndarray:
    """The direction matrix of `image`, which must be diagonal (+-1): the motions below are written
    per LPS axis and the anterior face is found by the sign of the y axis."""
    direction = np.reshape(image.GetDirection(), (3, 3))
    if np.abs(np.abs(direction) - np.eye(3)).max() > 1e-6:
        raise ValueError(f"{what} with an oblique direction is not handled")
    return direction


def _bounds(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest LPS coordinates (mm) of the voxel centres of an axis-aligned grid."""
    corners = grid.to_physical(np.array([[0, 0, 0], np.asarray(grid.size) - 1], float))
    return corners.min(axis=0), corners.max(axis=0)


def _spline(array: np.ndarray) -> np.ndarray:
    """Cubic B-spline coefficients of an array for _sample (order 3), with the boundary condition
    _sample evaluates them with ('nearest'): the spline then passes through every sample, the
    faces included (the default 'mirror' prefilter is off by tens of HU at the faces)."""
    return ndimage.spline_filter(np.asarray(array, np.float64), order=3, mode="nearest")


def _sample(volume: np.ndarray, source: Grid, points: np.ndarray, order: int) -> np.ndarray:
    """Values of a [z, y, x] array on grid `source` at LPS points (..., 3) mm. Order 3 expects
    _spline coefficients; points outside the grid take the border value."""
    index = source.to_index(points.reshape(-1, 3))[:, ::-1].T  # (k, j, i) rows for [z, y, x]
    values = ndimage.map_coordinates(volume, index, order=order, mode="nearest", prefilter=False)
    return values.reshape(points.shape[:-1])


def _pick(groups: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """Sorted indices of candidates: from each boolean group in turn, the first candidates not yet
    taken until `total` are taken (totals are cumulative)."""
    taken = np.zeros(len(groups[0][0]), bool)
    for mask, total in groups:
        taken[np.flatnonzero(mask & ~taken)[:max(0, total - int(taken.sum()))]] = True
    return np.flatnonzero(taken)


def _warped_series(source: sitk.Image, phases: list[tuple[sitk.Image, np.ndarray]], labels: np.ndarray,
                   body: np.ndarray, bounds: tuple[np.ndarray, np.ndarray],
                   motion: Callable[[np.ndarray, float], np.ndarray],
                   choose: Callable[[np.ndarray, np.ndarray, float], np.ndarray], seed: int, noise_hu: float
                   ) -> tuple[list[float], list[sitk.Image], list[sitk.Image], list[sitk.Image], list[np.ndarray],
                              list[tuple[np.ndarray, np.ndarray]], float]:
    """Phase k (time k) of a real CT warped by `motion`: image_k(q) = CT(q + u_k(q)) + noise, on its grid.

    `phases`: per phase its grid and the cubic spline coefficients of the CT it is sampled from ([z, y, x] on
    `source`'s grid, as `labels` and `body` are). Landmarks: uniform candidates inside `bounds` (LPS mm;
    TAPER_MM / 3 from its faces), mapped to the reference by u_k; `choose(candidates, reference_points, t)`
    picks their indices. Returns (times, images, labelmaps, fields, bodies, landmarks, minimum det J)."""
    src = Grid.of(source)
    low, high = bounds
    rng = np.random.default_rng(seed)
    candidates = low + TAPER_MM / 3 + rng.uniform(0, 1, (20000, 3)) * (high - low - 2 * TAPER_MM / 3)
    times, images, labelmaps, fields, bodies, marks = [], [], [], [], [], []
    for k, (grid, coefficients) in enumerate(phases):
        t = float(k)
        target = Grid.of(grid)
        points = target.points().reshape(*target.shape, 3)
        u = motion(points, t)
        hu = _sample(coefficients, src, points + u, 3)
        hu += noise_hu * np.random.default_rng([seed, 1, k]).standard_normal(hu.shape)
        images.append(target.image(hu.astype(np.float32)))
        labelmaps.append(target.image(_sample(labels, src, points + u, 0).astype(np.uint8)))
        fields.append(target.image(u, vector=True))
        bodies.append(_sample(body.astype(np.uint8), src, points + u, 0) > 0)
        ref_points = candidates + motion(candidates, t)
        keep = choose(candidates, ref_points, t)
        times.append(t)
        marks.append((candidates[keep], ref_points[keep]))
    jac_min = min(float(sitk.GetArrayFromImage(jacobian_determinant(f)).min()) for f in fields)
    return times, images, labelmaps, fields, bodies, marks, jac_min


# ----------------------------------------------------------------------------- chest CT


def chest_available() -> bool:
    """Whether the chest CT (../shared/data/chest_ct/ct_cropped.nii.gz) is there."""
    return (CHEST_CT / "ct_cropped.nii.gz").exists()


def chest_motion(bounds: tuple[np.ndarray, np.ndarray], n_phases: int) -> Callable[[np.ndarray, float], np.ndarray]:
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


def _chest_ct() -> sitk.Image:
    ct = sitk.ReadImage(str(CHEST_CT / "ct_cropped.nii.gz"), sitk.sitkFloat32)
    if np.abs(np.reshape(ct.GetDirection(), (3, 3)) - np.eye(3)).max() > 1e-6:
        raise ValueError("chest CT with a non-identity direction is not handled")  # chest_motion assumes it
    return ct


def _chest_labels(lungs: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """Labelmap [z, y, x] of the chest CT: the lung mask, then the TotalSegmentator structures."""
    labels = np.where(lungs, CHEST_LUNG_LABEL, 0).astype(np.uint8)
    for name, value in CHEST_STRUCTURES:
        labels[sitk.GetArrayFromImage(sitk.ReadImage(str(CHEST_CT / f"{name}.nii.gz"))) > 0] = value
    return labels, {value: name for name, value in CHEST_STRUCTURES}


def _lung_landmarks(labels: np.ndarray, source: Grid, body: np.ndarray | None = None
                    ) -> Callable[[np.ndarray, np.ndarray, float], np.ndarray]:
    """Landmark chooser: CHEST_LANDMARKS / 2 whose reference point is in the lungs, the rest
    outside them (and inside `body` when given)."""
    def choose(candidates: np.ndarray, ref_points: np.ndarray, t: float) -> np.ndarray:
        lung = _sample(labels, source, ref_points, 0) == CHEST_LUNG_LABEL
        rest = ~lung if body is None else ~lung & (_sample(body.astype(np.uint8), source, ref_points, 0) > 0)
        return _pick([(lung, CHEST_LANDMARKS // 2), (rest, CHEST_LANDMARKS)])
    return choose


def chest_series(folder: Path, spacing_mm: float, n_phases: int, heldout: int, seed: int = 0,
                 own_grids_mm: float | None = None) -> Path:
    """Real chest CT (1.5 mm) resampled to `spacing_mm` and warped by chest_motion: exact ground
    truth for the images, the structure labelmaps and the landmarks. With `own_grids_mm`, every phase
    after the reference is sampled on a grid of its own (own_grid: that spacing, moved off the reference's
    by a fraction of a voxel), as a follow-up CT or a CBCT is reconstructed: series "chest_own_grids"."""
    ct = _chest_ct()
    origin, fine = np.asarray(ct.GetOrigin()), np.asarray(ct.GetSpacing())
    ct_array = sitk.GetArrayFromImage(ct).astype(np.float64)
    labels, names = _chest_labels(ndimage.gaussian_filter(ct_array, 1.0) < CHEST_LUNG_HU)
    extent = (np.asarray(ct.GetSize()) - 1) * fine
    bounds = (origin, origin + extent)
    reference = (own_grid(bounds, spacing_mm, 0), _antialiased_spline(ct_array, spacing_mm / fine[0]))
    phases = [reference] * n_phases
    if own_grids_mm is not None:
        own = _antialiased_spline(ct_array, own_grids_mm / fine[0])
        phases[1:] = [(own_grid(bounds, own_grids_mm, k), own) for k in range(1, n_phases)]
    times, images, labelmaps, fields, _, marks, jac_min = _warped_series(
        ct, phases, labels, np.ones(labels.shape, bool), bounds, chest_motion(bounds, n_phases),
        _lung_landmarks(labels, Grid.of(ct)), seed, CHEST_NOISE_HU)
    bodies = [np.ones(Grid.of(image).shape, bool) for image in images]  # the crop lies inside the body
    names[CHEST_LUNG_LABEL] = f"lung (HU < {CHEST_LUNG_HU:g})"
    grids = "" if own_grids_mm is None else (f"; each phase after the reference on a {own_grids_mm:g} mm grid of its "
                                             "own, moved off the reference's by a fraction of a voxel")
    description = (f"real anatomy, simulated motion: TotalSegmentator chest CT resampled to {spacing_mm:g} mm, "
                   f"{n_phases} phases of a known smooth breathing-like diffeomorphism "
                   f"(SI {CHEST_SI_AMP:g} mm, AP {CHEST_AP_AMP:g} mm, LR {CHEST_LR_AMP:g} mm; min det J {jac_min:.2f})"
                   + grids)
    extra = {"ground_truth_min_jacobian": jac_min, **({} if own_grids_mm is None else {"own_grids_mm": own_grids_mm})}
    return write_series(folder, "chest" if own_grids_mm is None else "chest_own_grids", description, times, images,
                        labelmaps, fields, bodies, marks, names, heldout, extra)


OWN_GRID_SHIFTS = (0.38, 0.62, 0.21)
"""Fraction of a voxel per phase (x, y, z) by which own_grid moves a phase's grid off the reference's, modulo 1:
phase k by k times these, so no two phases share a grid."""


def own_grid(bounds: tuple[np.ndarray, np.ndarray], spacing_mm: float, k: int) -> sitk.Image:
    """Phase k's grid (an empty float32 image, identity direction) of `spacing_mm` voxels within `bounds` (LPS mm):
    its first voxel centre k * OWN_GRID_SHIFTS (modulo 1) of a voxel past the lowest corner (phase 0: on it)."""
    low, high = bounds
    start = low + spacing_mm * np.mod(k * np.asarray(OWN_GRID_SHIFTS), 1.0)
    grid = sitk.Image([int(n) for n in np.floor((high - start) / spacing_mm) + 1], sitk.sitkFloat32)
    grid.SetOrigin(tuple(float(v) for v in start))
    grid.SetSpacing((spacing_mm,) * 3)
    return grid


def _antialiased_spline(array: np.ndarray, factor: float) -> np.ndarray:
    """_spline coefficients of a CT [z, y, x] smoothed for sampling `factor` times coarser than its voxels: a Gaussian
    of 0.5 factor - 0.5 voxels (none at factor 1 or finer)."""
    sigma = max(0.0, 0.5 * factor - 0.5)
    return _spline(ndimage.gaussian_filter(array, sigma) if sigma > 0 else array)


# ----------------------------------------------------------------------------- chest CT, native 1.5 mm


def lungs_and_body(ct: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Lungs and body of a chest CT whose lungs may touch the faces of its field of view.

    Air: HU < CHEST_LUNG_HU after a Gaussian of 1 voxel. Air components touching the anterior face
    are the air in front of the patient (outside the body); the lungs are the largest remaining
    components (those at least LUNG_MIN_FRACTION the size of the largest: both lungs when the
    airways do not join them; not the stomach's or the bowel's gas). Body: all but the outside air.
    [z, y, x] bool each."""
    direction = _require_axis_aligned(ct, "chest CT")
    components, sizes = _air_components(sitk.GetArrayFromImage(ct))
    anterior = components[:, 0 if direction[1, 1] > 0 else -1, :]  # LPS: anterior is the smallest y
    outside = np.isin(components, np.unique(anterior[anterior > 0]))
    sizes[np.unique(anterior[anterior > 0]) - 1] = 0
    return _largest(components, sizes), ~outside


def _air_components(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The connected components of air in a CT [z, y, x] (HU < CHEST_LUNG_HU after a Gaussian of 1 voxel), numbered
    from 1, and their sizes (voxels; entry k - 1 for component k)."""
    components, count = ndimage.label(ndimage.gaussian_filter(np.asarray(hu, np.float64), 1.0) < CHEST_LUNG_HU)
    return components, ndimage.sum(components > 0, components, np.arange(1, count + 1))


def _largest(components: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The voxels of the components at least LUNG_MIN_FRACTION the size of the largest: the lungs among air components
    (both when the airways do not join them; not the stomach's or the bowel's gas)."""
    return np.isin(components, 1 + np.flatnonzero(sizes >= LUNG_MIN_FRACTION * sizes.max()))


def chest_native_series(folder: Path, n_phases: int = 10, heldout: int = 3, seed: int = 0) -> Path:
    """The chest CT at its native 1.5 mm, cropped to the lungs' bounding box + NATIVE_MARGIN_MM, warped
    by chest_motion (on the crop's field of view): exact ground truth as chest_series; body = all
    but the air in front of the patient; lung label = the lungs found by lungs_and_body."""
    ct = _chest_ct()
    lungs, body = lungs_and_body(ct)
    labels, names = _chest_labels(lungs)
    margin = int(round(NATIVE_MARGIN_MM / ct.GetSpacing()[0]))
    found = np.argwhere(lungs)
    low = np.maximum(found.min(axis=0) - margin, 0)[::-1]                       # (i, j, k)
    high = np.minimum(found.max(axis=0) + margin, np.asarray(lungs.shape) - 1)[::-1]
    grid = sitk.Image([int(n) for n in high - low + 1], sitk.sitkFloat32)
    grid.SetSpacing(ct.GetSpacing())
    grid.SetDirection(ct.GetDirection())
    grid.SetOrigin(ct.TransformIndexToPhysicalPoint([int(i) for i in low]))
    bounds = _bounds(Grid.of(grid))
    times, images, labelmaps, fields, bodies, marks, jac_min = _warped_series(
        ct, [(grid, _spline(sitk.GetArrayFromImage(ct)))] * n_phases, labels, body, bounds,
        chest_motion(bounds, n_phases), _lung_landmarks(labels, Grid.of(ct), body), seed, CHEST_NOISE_HU)
    names[CHEST_LUNG_LABEL] = "lungs (largest air components inside the body)"
    description = (f"real anatomy, simulated motion: TotalSegmentator chest CT at its native 1.5 mm, cropped to "
                   f"the lungs + {NATIVE_MARGIN_MM:g} mm ({' x '.join(str(n) for n in grid.GetSize())} voxels), "
                   f"{n_phases} phases of the chest series' breathing-like diffeomorphism "
                   f"(SI {CHEST_SI_AMP:g} mm, AP {CHEST_AP_AMP:g} mm, LR {CHEST_LR_AMP:g} mm; min det J {jac_min:.2f})")
    return write_series(folder, "chest_native", description, times, images, labelmaps, fields, bodies, marks,
                        names, heldout, {"ground_truth_min_jacobian": jac_min,
                                         "crop_index": [int(i) for i in low]})


# ----------------------------------------------------------------------------- abdomen CT with sliding


def abdomen_available() -> bool:
    """Whether the abdomen CT and its TotalSegmentator segmentation are in ../shared/data/abdomen_ct."""
    return (ABDOMEN_CT / "example_ct_sm.nii.gz").exists() and (ABDOMEN_CT / "example_seg.nii.gz").exists()


def sliding_region(segmentation: np.ndarray) -> np.ndarray:
    """In-plane indicator [y, x] of the organs that slide (ABDOMEN_SLIDING): their union over all
    slices, closed, holes filled. The motion smooths it by a Gaussian of ABDOMEN_BAND_MM."""
    projected = np.isin(segmentation, ABDOMEN_SLIDING).any(axis=0)
    closed = ndimage.binary_closing(projected, iterations=2, border_value=0)
    return ndimage.binary_fill_holes(closed)


def sliding_indicator(grid: Grid, region: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """s(p) in [0, 1] at LPS points (..., 3): the in-plane `region` [y, x] of the axis-aligned `grid`
    smoothed by a Gaussian of ABDOMEN_BAND_MM, cubic splines in x and y, independent of z."""
    sigma = ABDOMEN_BAND_MM / np.asarray(grid.spacing)[[1, 0]]
    coefficients = _spline(ndimage.gaussian_filter(region.astype(np.float64), sigma))

    def s(p: np.ndarray) -> np.ndarray:
        index = grid.to_index(p.reshape(-1, 3))[:, [1, 0]].T  # (j, i) rows for [y, x]
        values = ndimage.map_coordinates(coefficients, index, order=3, mode="nearest", prefilter=False)
        return values.reshape(p.shape[:-1])

    return s


def abdomen_motion(grid: Grid, s: Callable[[np.ndarray], np.ndarray], body_centre_y: float, n_phases: int
                   ) -> Callable[[np.ndarray, float], np.ndarray]:
    """u(p, t) (mm) of the abdomen series on `grid` (axis-aligned), a(t) = sin^2(pi t / n):

    - sliding: u_z = ABDOMEN_SI_AMP a s(x, y) w(z) (s: sliding_indicator): the organs move
      inferiorly against the still wall, spine and aorta, u_z changing by the full amplitude across
      a band of ~4 ABDOMEN_BAND_MM; w tapers to zero over ABDOMEN_TAPER_MM at the inferior and
      superior faces;
    - the anterior wall rises: u_y = ABDOMEN_AP_AMP a r(y), r = 1 anterior of the body's centre,
      0 posterior of it, over ABDOMEN_AP_RAMP_MM; tapered to zero at the anterior face.

    u_x = 0 and u_y depends on y alone, so det J = (1 + du_y/dy)(1 + du_z/dz) >= (1 - 0.26)(1 - 0.6)
    at peak: the shear du_z/dx, du_z/dy does not change det J however steep it is."""
    low, high = _bounds(grid)

    def motion(p: np.ndarray, t: float) -> np.ndarray:
        a = np.sin(np.pi * t / n_phases) ** 2
        z, y = p[..., 2], p[..., 1]
        w = _smoothstep((z - low[2]) / ABDOMEN_TAPER_MM) * _smoothstep((high[2] - z) / ABDOMEN_TAPER_MM)
        r = _smoothstep((body_centre_y - y) / ABDOMEN_AP_RAMP_MM) * _smoothstep((y - low[1]) / ABDOMEN_TAPER_MM)
        return a * np.stack([np.zeros_like(z), ABDOMEN_AP_AMP * r, ABDOMEN_SI_AMP * s(p) * w], axis=-1)

    return motion


def abdomen_series(folder: Path, n_phases: int = 10, heldout: int = 3, seed: int = 0) -> Path:
    """Real abdomen CT (122 x 101 x 30 at 3 mm, its own NIfTI geometry read into LPS) warped by
    abdomen_motion on its own grid: exact ground truth; labels ABDOMEN_LABELS (TotalSegmentator
    ids); body = body_mask of the CT; ABDOMEN_LANDMARKS landmarks a phase: 40 % in the liver,
    spleen or kidneys, 40 % in the sliding band (0.1 < s < 0.9), the rest in the body."""
    ct = sitk.ReadImage(str(ABDOMEN_CT / "example_ct_sm.nii.gz"), sitk.sitkFloat32)
    segmentation = sitk.ReadImage(str(ABDOMEN_CT / "example_seg.nii.gz"))
    _require_axis_aligned(ct, "abdomen CT")
    if not Grid.of(ct).matches(Grid.of(segmentation)):
        raise ValueError("abdomen CT and segmentation are on different grids")
    seg = sitk.GetArrayFromImage(segmentation)
    labels = np.where(np.isin(seg, list(ABDOMEN_LABELS)), seg, 0).astype(np.uint8)
    body = body_mask(ct)
    source = Grid.of(ct)
    centre_y = float(source.to_physical(np.argwhere(body)[:, ::-1].mean(axis=0, keepdims=True).astype(float))[0, 1])
    s = sliding_indicator(source, sliding_region(seg))
    motion = abdomen_motion(source, s, centre_y, n_phases)
    organs = [k for k, v in ABDOMEN_LABELS.items() if v in ("spleen", "kidney_right", "kidney_left", "liver")]

    def choose(candidates: np.ndarray, ref_points: np.ndarray, t: float) -> np.ndarray:
        inside = _sample(body.astype(np.uint8), source, ref_points, 0) > 0
        organ = np.isin(_sample(labels, source, ref_points, 0), organs) & inside
        band = (s(candidates) > 0.1) & (s(candidates) < 0.9) & inside
        n = ABDOMEN_LANDMARKS
        return _pick([(organ, int(0.4 * n)), (band, int(0.8 * n)), (inside, n)])

    times, images, labelmaps, fields, bodies, marks, jac_min = _warped_series(
        ct, [(ct, _spline(sitk.GetArrayFromImage(ct)))] * n_phases, labels, body, _bounds(source), motion, choose,
        seed, CHEST_NOISE_HU)
    description = (f"real anatomy, simulated motion with sliding: TotalSegmentator abdomen CT (3 mm), "
                   f"{n_phases} phases: organs slide {ABDOMEN_SI_AMP:g} mm inferiorly against the wall across a "
                   f"{ABDOMEN_BAND_MM:g} mm (Gaussian sigma) band, anterior wall {ABDOMEN_AP_AMP:g} mm "
                   f"anteriorly; min det J {jac_min:.2f}")
    return write_series(folder, "abdomen", description, times, images, labelmaps, fields, bodies, marks,
                        ABDOMEN_LABELS, heldout, {"ground_truth_min_jacobian": jac_min})


# ----------------------------------------------------------------------------- lung tumours, tumour response


def radiomics_patient(patient: int) -> Path | None:
    """The DICOM folder of the radiomics phantom's pat_<patient>, fetched into RADIOMICS_CACHE on first use (pip
    download of RADIOMICS_PACKAGE, its folder unpacked); None when pip cannot fetch it."""
    folder = RADIOMICS_CACHE / f"pat_{patient}"
    if not folder.is_dir():
        _fetch_radiomics()
    return folder if folder.is_dir() else None


def _fetch_radiomics() -> None:
    """Unpack the wheel's radiomics folder into a fresh folder beside RADIOMICS_CACHE, then rename it into place (a
    second process fetching at the same time loses the rename and keeps the first's)."""
    RADIOMICS_CACHE.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=RADIOMICS_CACHE.parent) as work:
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", work,
                                  RADIOMICS_PACKAGE], capture_output=True, text=True)
        wheels = list(Path(work).glob("pycerr-*.whl"))
        if fetched.returncode != 0 or not wheels:
            print(f"[data] pip could not fetch {RADIOMICS_PACKAGE}: {fetched.stderr.strip()[-300:]}", file=sys.stderr)
            return
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(work, [m for m in wheel.namelist() if m.startswith(RADIOMICS_FOLDER + "/")])
        try:
            os.rename(Path(work) / RADIOMICS_FOLDER, RADIOMICS_CACHE)
        except OSError:
            pass                                                   # another process unpacked it first


def radiomics_ct(patient: int) -> tuple[sitk.Image, np.ndarray]:
    """pat_<patient>'s CT (float32 HU, LPS, as its DICOM series lies) and its GTV-1 filled on the CT's voxels
    ([z, y, x] bool), both read by the engine's own DICOM reader (the structure set: the folder's file beside the
    series); ValueError when the data cannot be fetched."""
    from STNeRPLib import dicom_in
    folder = radiomics_patient(patient)
    if folder is None:
        raise ValueError(f"the radiomics phantom's pat_{patient} is not in {RADIOMICS_CACHE}; pip could not fetch it")
    _, files = dicom_in.image_series(folder, "CT")
    ct = sitk.ReadImage(list(files), sitk.sitkFloat32)
    series = {Path(f).name for f in files}
    path = next(f for f in sorted(folder.glob("*.dcm")) if f.name not in series)
    structures = dicom_in.structure_file(path)
    if structures is None:
        raise ValueError(f"{path}, beside pat_{patient}'s CT series, is not its structure set")
    gtv = dicom_in.structures_labelmap(structures, Grid.of(ct), path, "GTV")
    return ct, sitk.GetArrayFromImage(gtv) > 0                    # its one ROI, GTV-1


def tumour_motion(bounds: tuple[np.ndarray, np.ndarray], centre: np.ndarray, radius: float, last: float
                  ) -> Callable[[np.ndarray, float], np.ndarray]:
    """u(p, t) (mm) at fraction t of 0 .. last: the longitudinal phantom's tumour response without its weight loss
    (a crop inside the thorax has no skin): u = w + v(p + w), w the setup drift progress(t) SETUP_DRIFT_MM, v the
    tumour's shrinkage about `centre` (its radius mm becomes s(t) radius; phantom.tumour_response, shrinkage);
    tapered to zero over TAPER_MM at every face of the field of view [low, high] (LPS mm)."""
    low, high = bounds
    schedule = phantom.tumour_response(last)

    def motion(p: np.ndarray, t: float) -> np.ndarray:
        progress, s = schedule(t)
        w = progress * phantom.SETUP_DRIFT_MM + np.zeros_like(p)
        taper = np.prod(_smoothstep(np.minimum(p - low, high - p) / TAPER_MM), axis=-1)
        return taper[..., None] * (w + phantom.shrinkage(p + w - centre, s, radius))

    return motion


def tumour_response_series(folder: Path, name: str, n_fractions: int = 5, heldout: int = 2, seed: int = 0) -> Path:
    """Series `name` of TUMOUR_PATIENTS: the radiomics phantom's pat_<patient> (its CT as acquired, 0.98 x 0.98 x 3 mm)
    warped by tumour_motion about its GTV's centroid and equivalent-sphere radius, fraction k at time k: exact ground
    truth as chest_series. Labels: 1 the GTV, CHEST_LUNG_LABEL the lungs (air components of at least LUNG_MIN_FRACTION
    of the largest); body: the whole crop, which lies inside the thorax; landmarks as the chest's (half in the
    lungs)."""
    patient = TUMOUR_PATIENTS[name]
    ct, gtv = radiomics_ct(patient)
    source = Grid.of(ct)
    array = sitk.GetArrayFromImage(ct).astype(np.float64)
    labels = np.where(_largest(*_air_components(array)), CHEST_LUNG_LABEL, 0).astype(np.uint8)
    labels[gtv] = 1
    body = np.ones(gtv.shape, bool)
    centre = source.to_physical(np.argwhere(gtv)[:, ::-1].mean(axis=0, keepdims=True))[0]
    radius = float((3 * gtv.sum() * np.prod(source.spacing) / (4 * np.pi)) ** (1 / 3))
    bounds = _bounds(source)
    times, images, labelmaps, fields, bodies, marks, jac_min = _warped_series(
        ct, [(ct, _spline(array))] * n_fractions, labels, body, bounds, tumour_motion(bounds, centre, radius,
                                                                                    n_fractions - 1),
        _lung_landmarks(labels, source, body), seed, CHEST_NOISE_HU)
    description = (f"real anatomy, simulated tumour response: lung-tumour CT pat_{patient} of pycerr's radiomics "
                   f"phantom ({' x '.join(str(n) for n in ct.GetSize())} voxels of "
                   f"{' x '.join(f'{s:.2f}' for s in ct.GetSpacing())} mm), {n_fractions} "
                   f"weekly fractions: its GTV ({radius:.1f} mm equivalent radius) shrinks to "
                   f"{100 * phantom.SHRINK_LAST:.0f} % of its radius and "
                   f"the patient drifts {np.linalg.norm(phantom.SETUP_DRIFT_MM):.1f} mm (setup), as the longitudinal "
                   f"phantom's without its weight loss; min det J {jac_min:.2f}")
    return write_series(folder, name, description, times, images, labelmaps, fields, bodies,
                        marks, {1: "GTV", CHEST_LUNG_LABEL: "lungs"}, heldout,
                        {"ground_truth_min_jacobian": jac_min, "gtv_centre_mm": centre.tolist(),
                         "gtv_radius_mm": radius})


def write_rtstruct(path: Path, rois: dict[int, tuple[str, list[list[float]]]]) -> None:
    """An RT Structure Set file holding `rois`, ROI Number -> (ROI Name, closed planar contours, each as DICOM's
    Contour Data: x, y, z, ... in LPS mm), as a planning system writes one: implicit VR little endian, where a
    contour of over 64 KB of text (some 8 000 points) fits."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import UID, ImplicitVRLittleEndian, generate_uid

    from STNeRPLib.dicom_in import RTSTRUCT_STORAGE

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UID(RTSTRUCT_STORAGE), generate_uid()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = RTSTRUCT_STORAGE, meta.MediaStorageSOPInstanceUID, "RTSTRUCT"
    ds.StructureSetROISequence, ds.ROIContourSequence = Sequence(), Sequence()
    for number, (name, contours) in rois.items():
        roi, item = Dataset(), Dataset()
        roi.ROINumber, roi.ROIName = number, name
        ds.StructureSetROISequence.append(roi)
        item.ReferencedROINumber, item.ContourSequence = number, Sequence()
        for data in contours:
            contour = Dataset()
            contour.ContourGeometricType, contour.NumberOfContourPoints = "CLOSED_PLANAR", len(data) // 3
            contour.ContourData = data
            item.ContourSequence.append(contour)
        ds.ROIContourSequence.append(item)
    ds.save_as(str(path), enforce_file_format=True)
