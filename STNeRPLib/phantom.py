"""Deterministic thorax-like 4D CT phantom with exact ground truth.

Conventions (ARCHITECTURE.md): millimetres, ITK LPS physical space (x = patient Left, y = Posterior,
z = Superior); numpy arrays from SimpleITK are indexed [z, y, x]. A ground-truth displacement
u_t maps a point q of the time-t image to the matching point q + u_t(q) of the reference image.

Exact by construction: the reference anatomy is a continuous function F_ref(p) (analytic shapes
plus a fixed smoothed random texture, sampled by trilinear interpolation), u_t(p) is analytic,
and every image is sampled as image_t(q) = F_ref(q + u_t(q)) at the voxel centres, labels as
label_t(q) = L_ref(q + u_t(q)). Noise is added to images only. With `supersampling` n > 1 each voxel is
instead the mean of F_ref(p + u_t(p)) over n^3 points p spread evenly over it (a box point-spread function
one voxel wide, as a scanner's detector integrates; the lung vessels, finer than the 3 mm grid, are then not
aliased); labels, landmarks and displacements stay those of the voxel centres.

The anatomy is fixed in millimetres: the default grid (96 x 96 x 64 voxels of 3 x 3 x 4 mm) holds
the whole thorax. For a coarser phantom keep the field of view, e.g. size=(48, 48, 32) with
spacing=(6, 6, 8); a smaller field of view crops the anatomy.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.special import expit

from .geometry import Grid

Motion = Callable[[np.ndarray, float], np.ndarray]  # (points (..., 3) mm, t) -> u (..., 3) mm

# Grid: the volume is centred on this point (mm), so the origin is non-zero and not symmetric.
GRID_CENTRE = np.array([0.0, -17.5, 6.0])

# Intensities (HU).
AIR_HU, FAT_HU, TISSUE_HU, LIVER_HU = -1000.0, -100.0, 40.0, 60.0
LUNG_HU, VESSEL_HU, TUMOUR_HU, BONE_HU = -850.0, 650.0, 30.0, 700.0  # VESSEL_HU: added to lung
PARENCHYMA_HU, SOFT_TEXTURE_HU = 25.0, 12.0  # amplitudes of the fine blob textures

# Reference anatomy (mm, LPS). Intensity edges rise from 10 % to 90 % over EDGE_MM (about the
# partial-volume blur of the default grid, so sampled images interpolate well); labels use the
# sharp surfaces.
EDGE_MM = 4.0
BODY_AXES = (125.0, 95.0)  # body: elliptic cylinder along z, centred at x = y = 0
FAT_SCALE = 0.93  # inner edge of the subcutaneous fat ring, relative to the body ellipse
LUNGS = (((-58.0, 5.0), (40.0, 55.0)), ((62.0, 8.0), (36.0, 52.0)))  # right (-x), left: centre, axes
DOME_TOP, DOME_DROP = -40.0, 35.0  # diaphragm dome: top z, and drop at the lung's lateral edge
APEX_TOP, APEX_DROP = 105.0, 40.0  # lung apex: top z, and drop at the lung's lateral edge
TUMOUR_CENTRE, TUMOUR_RADIUS = np.array([-62.0, 10.0, -10.0]), 12.0  # lower right lung
SPINE_CENTRE, SPINE_RADIUS = (0.0, 55.0), 15.0  # vertebral column along z
RIB_LEVELS, RIB_SLOPE = (-30.0, 0.0, 30.0, 60.0, 90.0), 0.25  # rib z at y = 0, dz/dy (mm/mm)
RIB_RING, RIB_RADIUS, STERNAL_GAP = 0.885, 4.5, 25.0  # ring scale of body ellipse; mm; mm

# Texture: a fixed random volume on its own grid, independent of the image grid.
TEXTURE_ORIGIN, TEXTURE_SPACING, TEXTURE_SHAPE = np.array([-130.0, -100.0, -150.0]), 2.5, (105, 81, 121)
VESSEL_SCALES, VESSEL_WIDTH = ((7.0, 1.0), (4.5, 0.6)), 0.35  # (sigma mm, weight) of vessel networks
VESSEL_BLUR_MM, PARENCHYMA_SIGMA_MM, SOFT_SIGMA_MM = 2.0, 3.5, 4.0

# Breathing: u = a(t) * (LR, AP, SI profiles); a(t) = sin^2(pi t / n_phases), peak at mid-cycle.
SI_AMP, SI_PEAK_Z, SI_WIDTH_Z, SI_WIDTH_X = 14.0, -50.0, 45.0, 80.0  # mm
SI_SPINE_WIDTH, SI_SPINE_STILL = 20.0, 0.9  # SI motion reduced by 90 % on the spine axis
AP_AMP, AP_Z, AP_WIDTH_Z, AP_EDGE_Y = 4.0, 0.0, 60.0, 30.0  # chest wall rises anteriorly
LR_AMP, LR_WIDTH_X = 2.0, 60.0  # lateral rib-cage expansion

# Longitudinal: tumour radius factor s(t) = 0.5 + 0.5 exp(-t / tau), s(last day) = 0.6, realised
# as a radial Gaussian-windowed field; plus weight loss near the skin and a slow setup drift.
SHRINK_FLOOR, SHRINK_LAST, SHRINK_WINDOW_MM = 0.5, 0.6, 10.0
WEIGHT_LOSS_MM, WEIGHT_LOSS_RING, WEIGHT_LOSS_EDGE = 3.0, 0.8, 0.05
SETUP_DRIFT_MM = np.array([1.5, -2.0, 2.5])
FRACTION_INTERVAL_DAYS = 7.0

N_LANDMARKS, N_LANDMARK_CANDIDATES, LANDMARK_VESSEL_MIN = 75, 20000, 0.5
_NOISE_STREAM, _LANDMARK_STREAM = 1, 2


def _soft(distance: np.ndarray) -> np.ndarray:
    """Smooth inside-indicator of a signed distance (mm, positive inside)."""
    return expit(distance * (2 * np.log(9.0) / EDGE_MM))


def _blend(value: np.ndarray, weight: np.ndarray, target: np.ndarray | float) -> np.ndarray:
    """Paint target over value with a weight in [0, 1]."""
    return value + weight * (target - value)


def _ellipse(x: np.ndarray, y: np.ndarray, centre: tuple[float, float],
             axes: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Elliptic radius r (1 on the ellipse) and the ray length (mm) from the centre to the ellipse.

    (s - r) * ray is the signed distance (mm, positive inside) to the ellipse scaled by s, exact
    along rays from the centre.
    """
    dx, dy = x - centre[0], y - centre[1]
    r = np.sqrt((dx / axes[0]) ** 2 + (dy / axes[1]) ** 2)
    return r, np.where(r > 1e-9, np.hypot(dx, dy) / np.maximum(r, 1e-9), min(axes))


def _lung_distance(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: tuple[float, float],
                   axes: tuple[float, float]) -> np.ndarray:
    """Signed distance (mm, positive inside) of one lung: elliptic column, domed base and apex."""
    rho, ray = _ellipse(x, y, centre, axes)
    side = (1.0 - rho) * ray
    return np.minimum(np.minimum(side, z - _dome(x, y, centre, axes)), APEX_TOP - APEX_DROP * rho**2 - z)


def _dome(x: np.ndarray, y: np.ndarray, centre: tuple[float, float], axes: tuple[float, float]) -> np.ndarray:
    """Diaphragm surface height z (mm) under one lung."""
    rho2 = ((x - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2
    return DOME_TOP - DOME_DROP * rho2


def _smoothed_noise(rng: np.random.Generator, sigma_mm: float) -> np.ndarray:
    """Unit-variance Gaussian-smoothed white noise on the texture grid, indexed [x, y, z]."""
    white = rng.standard_normal(TEXTURE_SHAPE)
    field_ = ndimage.gaussian_filter(white, sigma_mm / TEXTURE_SPACING, mode="wrap")
    return field_ / field_.std()


def _tubes(rng: np.random.Generator, sigma_mm: float) -> np.ndarray:
    """Random tubular network in [0, 1]: where two independent smooth random fields are both ~0."""
    n1, n2 = _smoothed_noise(rng, sigma_mm), _smoothed_noise(rng, sigma_mm)
    return np.exp(-(n1**2 + n2**2) / (2 * VESSEL_WIDTH**2))


class _Anatomy:
    """The reference anatomy: F_ref (HU) and L_ref (labels) as functions of LPS points (mm)."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        vessels = sum(weight * _tubes(rng, sigma) for sigma, weight in VESSEL_SCALES)
        self._vessels = ndimage.gaussian_filter(vessels, VESSEL_BLUR_MM / TEXTURE_SPACING, mode="wrap")
        parenchyma = _smoothed_noise(rng, PARENCHYMA_SIGMA_MM)
        self._lung = LUNG_HU + VESSEL_HU * self._vessels + PARENCHYMA_HU * parenchyma
        self._soft = SOFT_TEXTURE_HU * _smoothed_noise(rng, SOFT_SIGMA_MM)

    @staticmethod
    def _texture(volume: np.ndarray, p: np.ndarray) -> np.ndarray:
        coords = np.moveaxis((p - TEXTURE_ORIGIN) / TEXTURE_SPACING, -1, 0)
        return ndimage.map_coordinates(volume, coords, order=1, mode="mirror")

    def vessels(self, p: np.ndarray) -> np.ndarray:
        """Vessel texture (>= 0, ~1 on a vessel centreline) at points p (..., 3) mm."""
        return self._texture(self._vessels, p)

    def sample(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """F_ref and L_ref at points p (..., 3) mm, LPS.

        Returns (HU, labels): labels uint8 0 background, 1 tumour, 2 right lung, 3 left lung,
        from the sharp surfaces; HU blends the same surfaces over ~EDGE_MM.
        """
        x, y, z = p[..., 0], p[..., 1], p[..., 2]
        body_r, ray = _ellipse(x, y, (0.0, 0.0), BODY_AXES)
        lungs = [_lung_distance(x, y, z, centre, axes) for centre, axes in LUNGS]
        tumour = TUMOUR_RADIUS - np.linalg.norm(p - TUMOUR_CENTRE, axis=-1)
        soft = self._texture(self._soft, p)
        dome = np.maximum(*(_dome(x, y, centre, axes) for centre, axes in LUNGS))
        value = _blend(np.full(x.shape, AIR_HU), _soft((1.0 - body_r) * ray), FAT_HU + soft)
        value = _blend(value, _soft((FAT_SCALE - body_r) * ray), TISSUE_HU + soft)
        value = _blend(value, _soft(np.minimum((FAT_SCALE - body_r) * ray, dome - z)), LIVER_HU + soft)
        value = _blend(value, _bone(x, y, z, (body_r - RIB_RING) * ray), BONE_HU)
        value = _blend(value, _soft(np.maximum(*lungs)), self._texture(self._lung, p))
        value = _blend(value, _soft(tumour), TUMOUR_HU + soft)
        labels = np.zeros(x.shape, np.uint8)
        for label, lung in zip((2, 3), lungs):
            labels[lung > 0] = label
        labels[tumour > 0] = 1
        return value, labels


def _bone(x: np.ndarray, y: np.ndarray, z: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """Smooth bone indicator: vertebral column and rib arcs open anteriorly (ring: mm from the rib ring)."""
    spine = SPINE_RADIUS - np.hypot(x - SPINE_CENTRE[0], y - SPINE_CENTRE[1])
    rib_z = np.min([np.abs(z - level - RIB_SLOPE * y) for level in RIB_LEVELS], axis=0)
    open_front = np.minimum(_soft(np.abs(x) - STERNAL_GAP) + _soft(y), 1.0)
    ribs = _soft(RIB_RADIUS - np.hypot(ring, rib_z)) * open_front
    return np.maximum(_soft(spine), ribs)


def _breathing_motion(n_phases: int) -> Motion:
    """Breathing u_t (mm): periodic in t with period n_phases, zero at t = 0, peak at n_phases / 2.

    At inhale the diaphragm lies inferior in the time-t image, so u points superior (+z) there;
    the chest wall lies anterior, so u points posterior (+y); the ribs lie lateral, so u points
    medially.
    """

    def motion(p: np.ndarray, t: float) -> np.ndarray:
        x, y, z = p[..., 0], p[..., 1], p[..., 2]
        chest = np.exp(-0.5 * ((z - AP_Z) / AP_WIDTH_Z) ** 2)
        si = SI_AMP * np.exp(-0.5 * ((z - SI_PEAK_Z) / SI_WIDTH_Z) ** 2 - 0.5 * (x / SI_WIDTH_X) ** 2)
        spine2 = (x - SPINE_CENTRE[0]) ** 2 + (y - SPINE_CENTRE[1]) ** 2
        si = si * (1.0 - SI_SPINE_STILL * np.exp(-0.5 * spine2 / SI_SPINE_WIDTH**2))
        ap = AP_AMP * chest * expit(-y / AP_EDGE_Y)
        lr = -LR_AMP * chest * np.tanh(x / LR_WIDTH_X)
        return np.sin(np.pi * t / n_phases) ** 2 * np.stack([lr, ap, si], axis=-1)

    return motion


def tumour_response(last_day: float) -> Callable[[float], tuple[float, float]]:
    """The schedule of a tumour's response over days t (clamped at t >= 0): (progress, s). progress rises from 0 at
    day 0 to 1 at last_day; s, the tumour's radius factor, falls from 1 to SHRINK_LAST at last_day and saturates at
    SHRINK_FLOOR, s(t) = SHRINK_FLOOR + (1 - SHRINK_FLOOR) exp(-t / tau)."""
    tau = last_day / np.log((1.0 - SHRINK_FLOOR) / (SHRINK_LAST - SHRINK_FLOOR))

    def schedule(t: float) -> tuple[float, float]:
        decay = np.exp(-max(t, 0.0) / tau)
        return (1.0 - decay) / (1.0 - np.exp(-last_day / tau)), SHRINK_FLOOR + (1.0 - SHRINK_FLOOR) * decay

    return schedule


def shrinkage(d: np.ndarray, s: float, radius: float) -> np.ndarray:
    """The radial field (mm) at offsets d (..., 3) mm from a tumour's centre under which a ball of `radius` mm at the
    reference is a ball of s * radius at time t: u(d) = k d exp(-|d|^2 / (2 w^2)), maps time-t points to reference
    points. The window w is SHRINK_WINDOW_MM at TUMOUR_RADIUS and scales with the radius (the same shape at every
    size: det J > 0 for s >= SHRINK_FLOOR)."""
    window = SHRINK_WINDOW_MM * radius / TUMOUR_RADIUS
    k = (1.0 / s - 1.0) * np.exp((s * radius) ** 2 / (2 * window**2))
    return k * d * np.exp(-np.sum(d**2, axis=-1) / (2 * window**2))[..., None]


def _longitudinal_motion(last_day: float) -> Motion:
    """Longitudinal u_t (mm) over days t: u(q) = w(q) + v(q + w(q)).

    w: weight loss near the skin (the time-t body is smaller, u points outward) plus a setup
    drift; v: the tumour's shrinkage about its centre (radius R becomes s(t) R, tumour_response).
    """
    schedule = tumour_response(last_day)

    def motion(p: np.ndarray, t: float) -> np.ndarray:
        progress, s = schedule(t)
        body_r, _ = _ellipse(p[..., 0], p[..., 1], (0.0, 0.0), BODY_AXES)
        skin = progress * WEIGHT_LOSS_MM * expit((body_r - WEIGHT_LOSS_RING) / WEIGHT_LOSS_EDGE)
        w = progress * SETUP_DRIFT_MM + np.zeros_like(p)
        w[..., 0] += skin * p[..., 0] / BODY_AXES[0]
        w[..., 1] += skin * p[..., 1] / BODY_AXES[1]
        return w + shrinkage(p + w - TUMOUR_CENTRE, s, TUMOUR_RADIUS)

    return motion


def _grid(size: tuple[int, int, int], spacing: tuple[float, float, float]) -> sitk.Image:
    """Geometry template: identity direction, volume centred on GRID_CENTRE (mm, LPS)."""
    grid = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetOrigin(GRID_CENTRE - (np.array(size) - 1) * np.array(spacing) / 2)
    return grid


def _voxel_centres(grid: sitk.Image) -> np.ndarray:
    """LPS points (mm) of all voxel centres, shape (nz, ny, nx, 3)."""
    geometry = Grid.of(grid)
    return geometry.points().reshape(*geometry.shape, 3)


def _image(array: np.ndarray, grid: sitk.Image, is_vector: bool = False) -> sitk.Image:
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    image.CopyInformation(grid)
    return image


class _Phantom:
    """Samples the anatomy through a motion model on one image grid."""

    def __init__(self, size: tuple[int, int, int], spacing: tuple[float, float, float], motion: Motion,
                 noise_hu: float, seed: int, supersampling: int = 1) -> None:
        if supersampling < 1:
            raise ValueError(f"supersampling must be at least 1, not {supersampling}")
        self.grid = _grid(size, spacing)
        self.points = _voxel_centres(self.grid)
        self.anatomy = _Anatomy(seed)
        self.motion, self.noise_hu, self.seed, self.supersampling = motion, noise_hu, seed, supersampling

    def frame(self, t: float) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
        """(image float32 HU, labelmap uint8, displacement VectorFloat64 mm) at time t."""
        u = self.motion(self.points, t)
        hu, labels = self.anatomy.sample(self.points + u)
        if self.supersampling > 1:
            hu = self._integrated(t)
        time_key = int(np.float64(t).view(np.uint64))
        rng = np.random.default_rng([self.seed, _NOISE_STREAM, time_key])
        image = _image((hu + self.noise_hu * rng.standard_normal(hu.shape)).astype(np.float32), self.grid)
        return image, _image(labels, self.grid), _image(u, self.grid, is_vector=True)

    def _integrated(self, t: float) -> np.ndarray:
        """HU of every voxel at time t as the mean of F_ref(p + u_t(p)) over supersampling^3 points p spread
        evenly over the voxel (offsets (i + 1/2) / n - 1/2 of a voxel along each axis)."""
        n, spacing = self.supersampling, np.array(self.grid.GetSpacing())
        total = np.zeros(self.points.shape[:-1])
        for offset in itertools.product((np.arange(n) + 0.5) / n - 0.5, repeat=3):
            p = self.points + np.array(offset) * spacing
            total += self.anatomy.sample(p + self.motion(p, t))[0]
        return total / n ** 3

    def landmarks(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Vessel points inside the lungs at time t, and their exact reference points."""
        rng = np.random.default_rng([self.seed, _LANDMARK_STREAM])
        index = rng.uniform(0.0, np.array(self.grid.GetSize()) - 1.0, (N_LANDMARK_CANDIDATES, 3))
        q = Grid.of(self.grid).to_physical(index)
        ref = q + self.motion(q, t)
        lung = np.isin(self.anatomy.sample(ref)[1], (2, 3))
        keep = np.flatnonzero(lung & (self.anatomy.vessels(ref) > LANDMARK_VESSEL_MIN))[:N_LANDMARKS]
        return q[keep], ref[keep]


@dataclass
class PhantomSeries:
    """Phantom series with exact ground truth (mm, LPS; u_t maps time-t points to reference points)."""

    times: list[float]  # time of each image; times[0] is the reference
    images: list[sitk.Image]  # float32 HU, one per time
    labelmaps: list[sitk.Image]  # uint8: 0 background, 1 tumour, 2 right lung, 3 left lung
    displacements: list[sitk.Image]  # ground truth u_t, VectorFloat64, mm, LPS, time-t grid
    landmarks: list[tuple[np.ndarray, np.ndarray]]  # per time: (time-t points, reference points), (N, 3)
    _phantom: _Phantom = field(repr=False, compare=False)

    def image_at(self, t: float) -> sitk.Image:
        """Phantom image (float32 HU) at any real time t; noise is fixed by (seed, t), so t = times[k]
        gives images[k] exactly."""
        return self._phantom.frame(t)[0]

    def labelmap_at(self, t: float) -> sitk.Image:
        """Ground-truth labelmap (uint8) at any real time t."""
        return self._phantom.frame(t)[1]

    def displacement_at(self, t: float) -> sitk.Image:
        """Ground-truth displacement u_t (VectorFloat64, mm, LPS) at any real time t."""
        return self._phantom.frame(t)[2]

    def landmarks_at(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Landmarks at any real time t: (time-t points, their exact reference points), (N, 3) mm."""
        return self._phantom.landmarks(t)


def _series(phantom: _Phantom, times: list[float]) -> PhantomSeries:
    images, labelmaps, displacements = zip(*(phantom.frame(t) for t in times))
    landmarks = [phantom.landmarks(t) for t in times]
    return PhantomSeries(times, list(images), list(labelmaps), list(displacements), landmarks, phantom)


def breathing_series(
    size: tuple[int, int, int] = (96, 96, 64),
    spacing: tuple[float, float, float] = (3.0, 3.0, 4.0),
    n_phases: int = 10,
    noise_hu: float = 10.0,
    seed: int = 0,
    supersampling: int = 1,
) -> PhantomSeries:
    """4D CT breathing cycle: times are phase indices 0..n_phases-1, phase 0 is the reference.

    size is (x, y, z) voxels, spacing mm. Peak inhale (SI motion ~14 mm at the diaphragm) at
    phase n_phases / 2; the motion is periodic in t with period n_phases. supersampling: see the module.
    """
    phantom = _Phantom(size, spacing, _breathing_motion(n_phases), noise_hu, seed, supersampling)
    return _series(phantom, [float(k) for k in range(n_phases)])


def longitudinal_series(
    size: tuple[int, int, int] = (96, 96, 64),
    spacing: tuple[float, float, float] = (3.0, 3.0, 4.0),
    n_fractions: int = 5,
    noise_hu: float = 10.0,
    seed: int = 0,
    supersampling: int = 1,
) -> PhantomSeries:
    """Weekly radiotherapy fractions: times in days 0, 7, ..., the first is the reference.

    The tumour radius shrinks to 60 % by the last fraction; the body loses ~3 mm near the skin and
    drifts by a few mm (setup). Needs n_fractions >= 2. supersampling: see the module.
    """
    if n_fractions < 2:
        raise ValueError("longitudinal_series needs n_fractions >= 2")
    times = [FRACTION_INTERVAL_DAYS * k for k in range(n_fractions)]
    motion = _longitudinal_motion(times[-1])
    return _series(_Phantom(size, spacing, motion, noise_hu, seed, supersampling), times)


def write_series(series: PhantomSeries, folder: Path) -> dict:
    """Write image_<k>.nrrd, labelmap_<k>.nrrd, displacement_<k>.nrrd and landmarks.csv.

    landmarks.csv columns: time,x,y,z,ref_x,ref_y,ref_z (mm, LPS; (x, y, z) in the time-t image).
    Returns {"images": [...], "labelmaps": [...], "displacements": [...], "landmarks": path}.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict = {"images": [], "labelmaps": [], "displacements": []}
    for key, prefix in (("images", "image"), ("labelmaps", "labelmap"), ("displacements", "displacement")):
        for k, image in enumerate(getattr(series, key)):
            paths[key].append(folder / f"{prefix}_{k}.nrrd")
            sitk.WriteImage(image, str(paths[key][-1]), useCompression=True)
    paths["landmarks"] = folder / "landmarks.csv"
    with open(paths["landmarks"], "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["time", "x", "y", "z", "ref_x", "ref_y", "ref_z"])
        for t, (points, reference) in zip(series.times, series.landmarks):
            writer.writerows([t, *(f"{v:.6f}" for v in row)] for row in np.hstack([points, reference]))
    return paths
