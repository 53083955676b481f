"""Outputs of a trained model on any grid: the displacement field (mm, LPS), the propagated
labelmap (propagate_labels: label-wise trilinear, or nearest neighbour as the paper's eq. 7-8) and the
predicted image. The field and labels are evaluated in slabs of slices, so memory stays bounded on
large grids.

The predicted image is made from the scans, resampled with cubic B-splines (numba's kernel on each scan's coefficients,
cubic_lookup.resample; SimpleITK's resampling, the same numbers to 0.01 HU, where numba is missing):
- at an unscanned time t between two scans a < t < b: motion-compensated interpolation, each
  scan carried to t through the learned deformation (point q -> phi_s^-1(q + u_t(q)), s = a, b,
  phi_s^-1 the fixed-point inverse of scan s's own map, as in inverse_displacement.nrrd) and the two
  blended linearly in time, each only where it lies inside that scan's field of view;
- beyond the scanned range: the mean of the reference and the scan nearest t, each carried to t in the same
  way (the reference's own map is the identity, with the default's anchor) (image_sources);
- at a scanned time: the reference resampled through u_t.
Ref-Net is the prior Def-Net is trained against (paper eq. 6), not the renderer: the default
preset's Ref-Net reproduces the reference to ~36 dB, which would cap every predicted image.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple, cast

import numpy as np
import SimpleITK as sitk
import torch

from . import cubic_lookup, label_lookup, threads, trilinear
from .geometry import Grid, affine_transform, inverted, transformed
from .integration import GridPoints, sample
from .model import SeriesModel
from .presets import LABEL_INTERPOLATIONS

SLAB_VOXELS = 1 << 22
"""Voxels per slab of slices in which every output is evaluated (memory: the outputs and one slab)."""
SPLINE_MARGIN = 24
"""Slices of the scan kept beyond those a slab samples when it is resampled: the cubic B-spline
coefficients of the cropped scan then equal the whole scan's to 0.27**24 ~ 1e-14 of the intensities
(the prefilter's pole is sqrt(3) - 2), far below float32 rounding."""


@dataclass
class Warped:
    """Per voxel of the target grid, [z, y, x]: displacement u (…, 3) in mm (LPS) to the reference
    point, the predicted image in the scans' units, and the propagated labelmap (or None).
    `image_sources` are the scanned times whose images the predicted image is made from."""

    displacement: np.ndarray
    image: np.ndarray
    labelmap: np.ndarray | None
    image_sources: list[float]


def affine_matrix(transform: sitk.Transform) -> np.ndarray:
    """4x4 homogeneous matrix of a SimpleITK affine transform (points in mm)."""
    affine = sitk.AffineTransform(transform)
    a = np.reshape(affine.GetMatrix(), (3, 3))
    centre = np.asarray(affine.GetCenter())
    matrix = np.eye(4)
    matrix[:3, :3] = a
    matrix[:3, 3] = centre + np.asarray(affine.GetTranslation()) - a @ centre
    return matrix


def warp(model: SeriesModel, t: float, target: Grid, prealignment: np.ndarray | None = None) -> Warped:
    """Evaluate the model at user time t on every voxel of `target`, in slabs of slices (memory: the
    outputs and one slab; the same numbers as at once, up to float32 rounding of the image).

    prealignment: 4x4 affine mapping reference-grid points to points of the time-t image (the
    training data were resampled through it); the returned displacement includes it, so
    q + u(q) is the reference point of the time-t image's own point q.
    At the anchored reference time on the reference grid the map is the identity: the outputs are the reference
    scan and labelmap themselves (what resampling them through u = 0 gives, bit for bit; tested), not evaluated.
    """
    if prealignment is None and target.matches(model.grid) and model.identity_at(t):
        return _identity(model)
    displacement = model.displacement_grid(t)
    sources = image_sources(model, t) if prealignment is None else {}
    inverses = [None if model.identity_at(s) else inverse_map(model, s) for s in sources]
    inverse = inverted(prealignment)
    scans = _Scans(model)
    field = np.empty((*target.shape, 3), np.float32)
    image = np.empty(target.shape, np.float32)
    labels = np.empty(target.shape, model.labelmap.dtype) if model.labelmap is not None else None
    for z0, z1 in slabs(target):
        slab = target.slab(z0, z1)
        moved, *carried = _mapped(model, target, (z0, z1), inverse, displacement, inverses)
        if labels is not None:
            labels[z0:z1] = propagate_labels(cast(np.ndarray, model.labelmap), moved.index,
                                             model.preset.label_interpolation).reshape(slab.shape)
        field[z0:z1] = moved.mm.reshape(*slab.shape, 3)
        if sources:
            image[z0:z1] = _blend(scans, sources, [(c.mm.reshape(*slab.shape, 3), c.index) for c in carried],
                                  (field[z0:z1], moved.index), slab)
        else:
            image[z0:z1] = scans.at(model.reference_time, moved.index, field[z0:z1], slab)
        del moved, carried                   # before the next slab's are made
    return Warped(field, image, labels, list(sources) or [model.reference_time])


def _identity(model: SeriesModel) -> Warped:
    """The outputs of the identity map on the reference grid: u = 0, the reference scan (float32), its labelmap."""
    labels = model.labelmap.copy() if model.labelmap is not None else None
    image = sitk.GetArrayFromImage(model.reference).astype(np.float32, copy=False)
    return Warped(np.zeros((*model.grid.shape, 3), np.float32), image, labels, [model.reference_time])


@dataclass(frozen=True)
class _Mapped:
    """Points of a slab mapped onto the reference grid: their continuous indices (x, y, z) there, (N, 3)
    float64, and their displacement in mm (LPS) from the slab's voxel centres, (N, 3) float32."""

    index: np.ndarray
    mm: np.ndarray


def _mapped(model: SeriesModel, target: Grid, rows: tuple[int, int], inverse: np.ndarray | None,
            displacement: torch.Tensor, then: list[InverseMap | None]) -> list[_Mapped]:
    """The voxel centres q of slices rows[0]..rows[1] of `target` mapped by q -> q + u(q) (`displacement`,
    after undoing the pre-alignment `inverse`), then that point on through each inverse map of `then` (None: the
    identity, the anchored reference's map, whose inversion adds -0.0 to every coordinate: the point itself, bit
    for bit).

    On the reference grid itself without a pre-alignment (every output of a series on one grid) the
    points are unit coordinates and each displacement is scaled to mm directly (_on_reference_grid); otherwise q is
    taken in mm and mapped through the reference grid's index space. The two agree to float32 rounding (tested)."""
    if inverse is None and target.matches(model.grid):
        return _on_reference_grid(model.grid, rows, displacement, then)
    with torch.no_grad():
        q = target.points(*rows)             # as the whole grid computes them (not slab.points())
        moved = _moved(model, displacement, q, inverse)
        points = [moved] + [moved if inverse_s is None else moved + invert(*inverse_s, moved[None])[0]
                            for inverse_s in then]
    indices = [_to_index(model.grid, p) for p in points]
    return [_Mapped(index, _mm_from(model.grid, index, q)) for index in indices]


def _on_reference_grid(grid: Grid, rows: tuple[int, int], displacement: torch.Tensor,
                       then: list[InverseMap | None]) -> list[_Mapped]:
    """_mapped for the voxels of the reference grid itself, from their unit coordinates c: c + u(c), then c + u(c) + w
    for each inverse map's w at c + u(c) (an identity's (None): c + u(c) itself). By numba's kernel where installed
    (trilinear.mapped: each point in one pass, the same numbers to the bit), else by torch's sampling and products over
    the whole slab."""
    points = GridPoints(grid.shape, displacement.device)
    inverses = [inverse_s for inverse_s in then if inverse_s is not None]
    if trilinear.maps(displacement, inverses):
        def by_kernel(inverse_s: InverseMap | None) -> _Mapped:
            return _Mapped(*trilinear.mapped(displacement, inverse_s, points.axes, rows, grid.unit_scale() / 2,
                                             _per_unit(grid), INVERSE_STEPS, INVERSE_TOLERANCE))
        first = by_kernel(None)
        return [first] + [first if inverse_s is None else by_kernel(inverse_s) for inverse_s in then]
    with torch.no_grad():
        c = points.slices(*rows)
        shift = sample(displacement, c[None])[0]
        moved = c + shift
        first = _Mapped(_to_index(grid, moved), _unit_to_mm(grid, shift))
        mapped = [first]
        for inverse_s in then:
            if inverse_s is None:
                mapped.append(first)
                continue
            onward = shift + invert(*inverse_s, moved[None])[0]
            mapped.append(_Mapped(_to_index(grid, c + onward), _unit_to_mm(grid, onward)))
    return mapped


def slabs(grid: Grid) -> list[tuple[int, int]]:
    """(first, end) slice of each slab of about SLAB_VOXELS voxels of the grid (at least one slice)."""
    depth = max(1, SLAB_VOXELS // (grid.size[0] * grid.size[1]))
    return [(z, min(z + depth, grid.size[2])) for z in range(0, grid.size[2], depth)]


INVERSE_STEPS = 20
"""Most fixed-point iterations of the inverse; a point stops earlier once converged. A point still moving after
them takes as many damped ones, each the mean of the point and its plain step: where the map expands nearly
twofold (grad u 0.82-0.97 inside a shrinking tumour's fit) the plain iteration falls into a 2-cycle (7 and 38
voxels of the longitudinal phantom, series seed 4 fitted without day 14, at days 21 and 28, up to 6e-3 units,
~0.85 mm, off); damped, those converge to 1e-7. Elsewhere damping would slow it (a contraction of 0.5
becomes 0.75), so it is only the fallback."""
INVERSE_TOLERANCE = 1e-5
"""A point's inverse has converged when one iteration moves it by at most this, in grid_sample units
(1e-5 x (n - 1) / 2 voxels: 1.5e-3 mm on 512 voxels of 0.6 mm). On the native 1.5 mm chest (120 x 123 x
160 voxels) the map's largest residual was 5.3e-4 mm and the inversion took 0.69 s; at 1e-6, 5.7e-5 mm
and 0.88 s (1 thread): the last decade of float32 precision bought nothing a contour can show."""


class InverseMap(NamedTuple):
    """What `invert` needs to invert one time's map: its forward displacement [1, 3, D, H, W] on the displacement
    grid and a start, an inverse on a coarser grid (both grid_sample units): exp(-v) on the displacement grid
    (`sparse_inverse_map`), or the inverse found from it on every INVERSE_STRIDE-th voxel (`inverse_map`)."""

    forward: torch.Tensor
    start: torch.Tensor


INVERSE_STRIDE = 4
"""The inverse is first found on every INVERSE_STRIDE-th voxel along each axis of the reference grid, from exp(-v);
that field, interpolated, then starts each voxel's or point's iteration. On a breathing model fitted at 150 x 256 x
256 voxels: 1.4-1.6 steps a voxel instead of 2.1-2.5, the inverse field in 2.0-2.5 s instead of 2.7-3.0 (1 thread).
A stride of 2 saved no more, 8 less."""


def sparse_inverse_map(model: SeriesModel, t: float) -> InverseMap:
    """The map q -> q + u_t(q) ready to be inverted at a few points by `invert` (reference points -> time-t points),
    each started from exp(-v): for thousands of points, where inverse_map's start would cost more than they do."""
    return InverseMap(model.displacement_grid(t), model.displacement_grid(t, inverse=True))


def inverse_map(model: SeriesModel, t: float) -> InverseMap:
    """The map q -> q + u_t(q) ready to be inverted at any points by `invert` (reference points -> time-t points),
    each started from the inverse on every INVERSE_STRIDE-th voxel of the reference grid: for a grid's voxels."""
    sparse = sparse_inverse_map(model, t)
    shape = cast("tuple[int, int, int]", tuple(max(2, (n - 1) // INVERSE_STRIDE + 1) for n in model.grid.shape))
    with torch.no_grad():
        c = GridPoints(shape, model.device).slices(0, shape[0])
        w = invert(*sparse, c[None])[0]
    return InverseMap(sparse.forward, w.reshape(*shape, 3).permute(3, 0, 1, 2)[None].contiguous())


def inverse_displacement(model: SeriesModel, t: float, prealignment: np.ndarray | None = None) -> np.ndarray:
    """Per voxel r of the reference grid, [z, y, x, 3]: displacement w in mm (LPS) to the matching
    time-t point r + w(r), the inverse of the map q -> q + u_t(q) that `warp` evaluates.

    exp(-v) by scaling and squaring inverts exp(v) only up to its discretisation (0.6 mm on a
    32 mm velocity grid with 10 mm motion); it starts the fixed-point iteration w <- -u(r + w)
    (inverse_map), which converges where |grad u| < 1 (every diffeomorphism the model makes here),
    to the inverse of the forward field itself.
    prealignment: as in `warp`; it is included, so r + w(r) is a point of the time-t image itself.
    Evaluated in slabs of slices (memory: the output and one slab); 0 at the anchored reference time.
    """
    grid = model.grid
    if prealignment is None and model.identity_at(t):
        return np.zeros((*grid.shape, 3), np.float32)
    inverse_t = inverse_map(model, t)
    field = np.empty((*grid.shape, 3), np.float32)
    for z0, z1 in slabs(grid):
        if prealignment is None:
            _inverse_on_reference_grid(grid, (z0, z1), inverse_t, field[z0:z1].reshape(-1, 3))
            continue
        with torch.no_grad():
            c = GridPoints(grid.shape, model.device).slices(z0, z1)
            w = invert(*inverse_t, c[None])[0]
        r = grid.points(z0, z1)
        p = grid.to_physical(_to_index(grid, c + w))
        moved = p @ prealignment[:3, :3].T + prealignment[:3, 3] - r
        field[z0:z1] = moved.reshape(z1 - z0, *grid.shape[1:], 3)
    return field


def _inverse_on_reference_grid(grid: Grid, rows: tuple[int, int], inverse_t: InverseMap, out: np.ndarray) -> None:
    """Into out (N, 3) float32: the inverse map's w at the voxels c of slices rows[0]..rows[1] of the reference grid,
    in mm. By numba's kernel where installed (trilinear.inverse_in_mm: each point in one pass, the same numbers to
    the bit), else by torch's sampling and product over the whole slab."""
    points = GridPoints(grid.shape, inverse_t.forward.device)
    if trilinear.maps(inverse_t.forward, [inverse_t]):
        trilinear.inverse_in_mm(inverse_t, points.axes, rows, _per_unit(grid), INVERSE_STEPS, INVERSE_TOLERANCE, out)
        return
    with torch.no_grad():
        out[:] = _unit_to_mm(grid, invert(*inverse_t, points.slices(*rows)[None])[0])


def invert(forward: torch.Tensor, start: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Displacement w at unit points c [1, N, 3] such that c + w + forward(c + w) = c: the inverse
    of the forward displacement [1, 3, D, H, W], by fixed-point iteration from `start` (a field on any grid:
    exp(-v), or inverse_map's inverse on a coarser grid).
    Each point iterates until a step moves it by at most INVERSE_TOLERANCE (at most INVERSE_STEPS
    times), so a point's result does not depend on which other points are inverted with it; hence
    the points are taken INVERSE_CHUNK at a time, whose iterations stay in the CPU's cache. Where numba is installed its
    kernel iterates each point on its own, the same numbers (trilinear.inverse)."""
    if trilinear.inverts(forward, start, c):
        return trilinear.inverse(forward, start, c, INVERSE_STEPS, INVERSE_TOLERANCE)
    return torch.cat([_invert(forward, start, c[:, i:i + INVERSE_CHUNK])
                      for i in range(0, c.shape[1], INVERSE_CHUNK)], dim=1)


INVERSE_CHUNK = 1 << 18
"""Points inverted together (3 MB per coordinate array): 4 million points took 1.6 s in chunks of this
size against 2.3 s at once (1 thread), the same numbers."""


def _invert(forward: torch.Tensor, start: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    w = sample(start, c)
    active, c_active, w_active = torch.arange(c.shape[1], device=c.device), c, w.clone()
    for count in range(2 * INVERSE_STEPS):
        step = -sample(forward, c_active + w_active)
        if count >= INVERSE_STEPS:
            step = 0.5 * (step + w_active)
        going = (step - w_active).abs().amax(dim=2)[0] > INVERSE_TOLERANCE
        w[:, active] = step
        active, c_active, w_active = active[going], c_active[:, going], step[:, going]
        if len(active) == 0:
            break
    return w


def _blend(scans: _Scans, sources: dict[float, float], carried: list[tuple[np.ndarray, np.ndarray]],
           reference: tuple[np.ndarray, np.ndarray], slab: Grid) -> np.ndarray:
    """Weighted sum of the carried scans on one slab, each counted only inside its field of view (the nearest voxel of
    its mask; weights renormalised) and in the reference's CT numbers where the fit calibrated it; where no scan saw
    the point, the reference resampled through u_t.
    carried: per source, the displacement (mm, [z, y, x, 3] on the slab) to its points and their
    reference-grid indices; reference: the same for u_t."""
    model = scans.model
    total, weight = np.zeros(slab.shape), np.zeros(slab.shape)
    for (s, w), (displacement, index) in zip(sources.items(), carried):
        seen = w if s not in model.views else w * _nearest_label(model.views[s], np.floor(index + 0.5)).reshape(
            slab.shape)
        values = scans.at(s, index, displacement, slab)
        if s in model.calibrations:                  # a CBCT's numbers, in the reference's as Def-Net fitted them
            values = model.calibrations[s].corrected_at(values.ravel(), index).reshape(slab.shape)
        total += seen * values
        weight += seen
    image = np.divide(total, weight, out=np.zeros(slab.shape), where=weight > 0)
    unseen = weight <= 0
    if unseen.any():
        displacement, index = reference
        image[unseen] = scans.at(model.reference_time, index, displacement, slab)[unseen]
    return image


def image_sources(model: SeriesModel, t: float) -> dict[float, float]:
    """The scans the predicted image at user time t is made from, each with its weight (`warp` carries each to t
    through the inverse of its own map): between two scans those two, weighted in time (interpolation_weights);
    beyond the scanned range the reference and the scan nearest t, half each (together they beat either alone on
    every series measured, docs/presets.md); none at a scanned time or where the nearest scan is the reference
    (the reference resampled through u_t)."""
    scanned = model.scanned_times
    if scanned[0] <= t <= scanned[-1]:
        return interpolation_weights(scanned, t)
    nearest = scanned[0] if t < scanned[0] else scanned[-1]
    return {} if nearest == model.reference_time else {model.reference_time: 0.5, nearest: 0.5}


def interpolation_weights(scanned: list[float], t: float) -> dict[float, float]:
    """{a: (b - t) / (b - a), b: (t - a) / (b - a)} for the scans a < t < b around an unscanned
    time t; empty when t is scanned or outside the scanned range."""
    before = [s for s in scanned if s < t]
    after = [s for s in scanned if s > t]
    if t in scanned or not before or not after:
        return {}
    a, b = before[-1], after[0]
    return {a: (b - t) / (b - a), b: (t - a) / (b - a)}


def linear_interpolation(scans: dict[float, np.ndarray], t: float) -> np.ndarray:
    """The baseline for a predicted image at an unscanned time t: the two scans around t blended
    voxel by voxel with interpolation_weights, in the scans' own units and without motion. Normalise
    (clip) the blend afterwards, as the predicted image is: both are blends of scans, windowed once."""
    weights = interpolation_weights(sorted(scans), t)
    if not weights:
        raise ValueError(f"time {t:g} does not lie between two scans")
    return cast(np.ndarray, sum(w * np.asarray(scans[s], np.float64) for s, w in weights.items()))


def map_to_reference(model: SeriesModel, t: float, points: np.ndarray,
                     prealignment: np.ndarray | None = None) -> np.ndarray:
    """The model's map q -> q + u_t(q) at LPS points q (N, 3) of the time-t image, in mm, exactly as
    `warp` evaluates it (no interpolation of a sampled field)."""
    inverse = inverted(prealignment)
    with torch.no_grad():
        moved = _moved(model, model.displacement_grid(t), np.asarray(points, float), inverse)
    return model.grid.to_physical(_to_index(model.grid, moved))


def _moved(model: SeriesModel, displacement: torch.Tensor, q: np.ndarray, inverse: np.ndarray | None) -> torch.Tensor:
    """Unit coordinates of the reference points of time-t points q (undoing the pre-alignment)."""
    c = _to_unit(model.grid, transformed(q, inverse), model.device)
    return c + sample(displacement, c[None])[0]


def _to_unit(grid: Grid, points: np.ndarray, device: torch.device) -> torch.Tensor:
    """LPS points (N, 3) in mm -> grid_sample coordinates of `grid` (in place on one array: these
    are whole slabs of points)."""
    unit = grid.to_index(points)
    unit *= 2 / grid.unit_scale()
    unit -= 1
    return torch.as_tensor(unit, dtype=torch.float32, device=device)


def _unit_to_mm(grid: Grid, shift: torch.Tensor) -> np.ndarray:
    """Displacements [N, 3] in grid_sample units of `grid` -> LPS mm, float32 (index steps of (size - 1) / 2
    per unit, then direction @ diag(spacing)).

    Summed x, y, z in that order, each product and sum rounded, as trilinear's kernels do: torch's matrix product
    fuses them (FMA) on some CPUs (AVX-512 Xeons) and not on others, so the two paths' last bits would depend on
    the machine."""
    shift, per_unit = shift.cpu(), torch.from_numpy(_per_unit(grid))
    return (shift[:, :1] * per_unit[0] + shift[:, 1:2] * per_unit[1] + shift[:, 2:] * per_unit[2]).numpy()


def _per_unit(grid: Grid) -> np.ndarray:
    """(3, 3) float32: row a is the LPS step in mm of one grid_sample unit along axis a of `grid`."""
    return (grid.index_to_mm * (grid.unit_scale() / 2)).T.astype(np.float32)


def _to_index(grid: Grid, c: torch.Tensor) -> np.ndarray:
    """grid_sample coordinates [N, 3] of `grid` -> continuous indices (x, y, z), float64."""
    index = c.cpu().numpy().astype(np.float64)
    index += 1
    index *= grid.unit_scale() / 2
    return index


def _mm_from(grid: Grid, index: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Displacement in mm from the points q to the points at continuous `index` of `grid`."""
    return (grid.to_physical(index) - q).astype(np.float32)


def _transform(displacement: np.ndarray, slab: Grid) -> sitk.DisplacementFieldTransform:
    """A displacement (mm, [z, y, x, 3] on `slab`) as the ITK transform q -> q + displacement(q)."""
    return sitk.DisplacementFieldTransform(slab.image(displacement.astype(np.float64), vector=True))


class _Scans:
    """The scans of one `warp`, read at any points: by numba's kernel from their cubic B-spline coefficients, each
    scan's made once a warp when first read (the reference's kept by the model, SeriesModel.coefficients), or where
    numba is missing by SimpleITK's resampling."""

    def __init__(self, model: SeriesModel) -> None:
        self.model = model
        self.coefficients: dict[float, np.ndarray] = {}

    def at(self, s: float, index: np.ndarray, displacement: np.ndarray, slab: Grid) -> np.ndarray:
        """The scan at scanned time s (SeriesModel.carried: as acquired, through its pre-alignment) at the points of
        `slab` whose continuous indices (x, y, z) on the reference grid are `index` (N, 3), their displacement from
        the slab's voxels `displacement` (mm, [z, y, x, 3]): cubic B-spline, beyond the scan its nearest voxel."""
        if not cubic_lookup.resamples():
            return _resample(self.model, s, _transform(displacement, slab), index, slab)
        if s not in self.coefficients:
            self.coefficients[s] = self.model.coefficients(s)
        samples = sitk.GetArrayViewFromImage(self.model.carried(s))
        return cubic_lookup.resample(self.coefficients[s], samples, _in_scan(self.model, s, index)).reshape(slab.shape)


def _in_scan(model: SeriesModel, s: float, index: np.ndarray) -> np.ndarray:
    """Continuous indices (N, 3) of reference-grid points, `index`, in the scan carried at scanned time s: on a grid of
    its own, through its pre-alignment (reference LPS -> the scan's), else the same."""
    if s not in model.acquired:
        return index
    points = transformed(model.grid.to_physical(index), model.prealignments.get(s))
    return Grid.of(model.acquired[s]).to_index(points)


def _resample(model: SeriesModel, s: float, transform: sitk.Transform, index: np.ndarray, slab: Grid) -> np.ndarray:
    """_Scans.at by SimpleITK (numba missing): the scan at transform(q) for every voxel q of `slab`; only the slices of
    the scan that `index` reaches, plus SPLINE_MARGIN, are taken from it."""
    scan = model.carried(s)
    depth = scan.GetSize()[2]
    if s in model.acquired:                   # on a grid of its own: the corners of the points' box, indexed there
        corners = model.grid.to_physical(np.array(list(itertools.product(*zip(index.min(axis=0), index.max(axis=0))))))
        if s in model.prealignments:          # reference LPS -> the scan's, after the transform's own map
            corners = transformed(corners, model.prealignments[s])
            transform = sitk.CompositeTransform([affine_transform(model.prealignments[s]), transform])
        index = Grid.of(scan).to_index(corners)
    low = int(np.clip(np.floor(index[:, 2].min()) - SPLINE_MARGIN, 0, depth - 1))
    high = int(np.clip(np.ceil(index[:, 2].max()) + SPLINE_MARGIN, low, depth - 1)) + 1
    return resample_onto(scan[:, :, low:high], transform, slab)


def resample_onto(scan: sitk.Image, transform: sitk.Transform, target: Grid,
                  interpolator: int = sitk.sitkBSpline) -> np.ndarray:
    """`scan` at transform(q) for every voxel q of `target`, float32 (cubic B-spline by default; beyond
    the scan, its nearest border value): how the predicted image carries a scan."""
    resampled = sitk.Resample(scan, target.size, transform, interpolator, target.origin, target.spacing,
                              target.direction, 0.0, sitk.sitkFloat32, True)
    return sitk.GetArrayFromImage(resampled)


def propagate_labels(labelmap: np.ndarray, index: np.ndarray, interpolation: str) -> np.ndarray:
    """The reference labelmap [z, y, x] at continuous indices (N, 3), (x, y, z), of its grid.

    "nearest": the label of the nearest voxel (paper eq. 7-8). "linear": label-wise trilinear, the
    label whose indicator, interpolated trilinearly from the 8 voxels around the point, is largest
    (ties to the smallest label), as ITK's LabelImageGenericInterpolateImageFunction with a linear
    interpolator (SimpleITK's sitkLabelLinear, ANTs' GenericLabel): a boundary follows the half level
    of the structure's trilinearly interpolated indicator, which cuts across voxel corners, instead of
    the staircase of voxel faces that "nearest" makes (with the exact motion of the longitudinal
    phantom, a 12 mm tumour on 3 mm voxels scores Dice 0.88-0.91 nearest, 0.91-0.98 linear).
    Both give 0 where the nearest voxel lies outside the grid; "linear" takes the border voxels' labels
    for the corners beyond it. Carried by numba's kernel (label_lookup) where installed, else by numpy: the same
    labels."""
    if interpolation not in LABEL_INTERPOLATIONS:
        raise ValueError(f"unknown label interpolation {interpolation!r}: use one of {', '.join(LABEL_INTERPOLATIONS)}")
    if label_lookup.carries():
        return label_lookup.carry(labelmap, index, interpolation == "linear")
    return _carried(labelmap, index, interpolation)


def _carried(labelmap: np.ndarray, index: np.ndarray, interpolation: str) -> np.ndarray:
    """propagate_labels by numpy, chunk by chunk (where numba is missing): label_lookup's numbers."""
    labels = np.empty(len(index), dtype=labelmap.dtype)

    def carry(start: int, end: int) -> None:
        part = index[start:end]
        nearest = np.rint(part)
        on_grid = np.all((nearest >= 0) & (nearest < labelmap.shape[::-1]), axis=1)
        carried = (_nearest_label(labelmap, nearest) if interpolation == "nearest"
                   else _label_wise_linear(labelmap, part))
        labels[start:end] = np.where(on_grid, carried, 0)

    threads.map_ranges(carry, len(index), LABEL_CHUNK)
    return labels


LABEL_CHUNK = 1 << 18
"""Points whose labels are carried together: their index arrays and 8 corner labels take ~60 MB per chunk
instead of ~200 bytes per voxel of a whole slab (the native chest's peak RSS 845 -> 1195 MB in one slab).
On several threads each takes a chunk this size / threads at once."""


def _index_type(volume: np.ndarray) -> type:
    """int32 flat indices where the volume's size allows them (half the memory traffic of int64)."""
    return np.int32 if volume.size < np.iinfo(np.int32).max else np.int64


def _corner_offsets(shape: tuple[int, int, int], low: np.ndarray) -> np.ndarray:
    """Flat indices [8, N] into a [z, y, x] volume of the 8 voxels around points whose floor indices (x, y, z)
    are `low` (N, 3), in CORNERS order, each axis clamped to the grid."""
    depth, rows, columns = shape
    x, y, z = low.T
    xs = (np.clip(x, 0, columns - 1), np.clip(x + 1, 0, columns - 1))
    ys = (np.clip(y, 0, rows - 1) * columns, np.clip(y + 1, 0, rows - 1) * columns)
    zs = (np.clip(z, 0, depth - 1) * (rows * columns), np.clip(z + 1, 0, depth - 1) * (rows * columns))
    return np.stack([zs[dz] + ys[dy] + xs[dx] for dz, dy, dx in CORNERS])


CORNERS = list(itertools.product((0, 1), repeat=3))
"""The 8 corners of a voxel cell as (dz, dy, dx) offsets from its lowest."""


def _nearest_label(labelmap: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    """propagate_labels' "nearest": the labels at the rounded indices `nearest` (N, 3), clamped to the grid
    (the caller zeroes the points whose nearest voxel is off it)."""
    depth, rows, columns = labelmap.shape
    x, y, z = nearest.astype(_index_type(labelmap)).T
    flat = (np.clip(z, 0, depth - 1) * rows + np.clip(y, 0, rows - 1)) * columns + np.clip(x, 0, columns - 1)
    return labelmap.reshape(-1).take(flat)


def _label_wise_linear(labelmap: np.ndarray, index: np.ndarray) -> np.ndarray:
    """propagate_labels' "linear" at indices (N, 3), the corners beyond the grid clamped to its border
    (the caller zeroes the points whose nearest voxel is off it). Where the 8 voxels around a point share
    one label (most points) that is its label; elsewhere each corner's label scores the summed trilinear
    weights of the corners holding it."""
    low = np.floor(index)
    fraction = index - low
    corners = labelmap.reshape(-1).take(_corner_offsets(labelmap.shape, low.astype(_index_type(labelmap))))  # [8, N]
    labels = corners[0].copy()
    mixed = np.flatnonzero(np.any(corners != labels, axis=0))
    if len(mixed) == 0:
        return labels
    corners, f = corners[:, mixed], fraction[mixed]
    weights = np.stack([np.prod(np.where(np.array([dx, dy, dz], bool), f, 1 - f), axis=1)
                        for dz, dy, dx in CORNERS])                                     # [8, M]
    scores = ((corners[:, None] == corners[None]) * weights[None]).sum(axis=1)          # corner c's label's weight
    candidates = scores >= scores.max(axis=0) - label_lookup.TIE
    labels[mixed] = np.where(candidates, corners, np.iinfo(corners.dtype).max).min(axis=0)
    return labels
