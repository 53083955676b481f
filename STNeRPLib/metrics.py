"""Image-similarity, overlap, deformation-regularity and landmark metrics.

Conventions (ARCHITECTURE.md): SimpleITK images live in LPS physical space (mm), a point is
``origin + direction @ (spacing * index)`` with index (i, j, k) = (x, y, z), and numpy arrays
from ``sitk.GetArrayFromImage`` are ordered [z, y, x]. A displacement field ``u`` is a
3-component SimpleITK vector image in mm (LPS) on the time-t grid; it maps a time-t point
``q`` to the reference point ``q + u(q)``.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from . import compiling, threads
from .compiling import inlined, kernel
from .geometry import Grid

_SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5  # gives the 11-tap window of Wang et al. 2004, as scikit-image does
SSIM_WINDOW_VOXELS = 2 * int(_SSIM_TRUNCATE * _SSIM_SIGMA + 0.5) + 1
"""The side of SSIM's window (11): a grid thinner than it along any axis has no SSIM."""
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def psnr(
    image: np.ndarray,
    reference: np.ndarray,
    data_range: float = 1.0,
    mask: np.ndarray | None = None,
) -> float:
    """Peak signal-to-noise ratio 10 log10(data_range^2 / MSE) in dB.

    The MSE is taken over the voxels where ``mask`` is true (all voxels if None), in float64,
    in slabs along the first axis (memory: one slab).
    Returns +inf when the images are identical there.
    """
    image, reference = np.asarray(image), np.asarray(reference)
    if image.shape != reference.shape:
        raise ValueError(f"shape mismatch: {image.shape} vs {reference.shape}")
    total, count = 0.0, 0
    step = max(1, SSIM_SLAB_VOXELS // max(1, int(np.prod(image.shape[1:]))))
    for a in range(0, max(len(image), 1), step):
        diff = np.asarray(image[a:a + step], dtype=np.float64) - np.asarray(reference[a:a + step], dtype=np.float64)
        if mask is not None:
            diff = diff[np.asarray(mask[a:a + step], dtype=bool)]
        total += float(np.sum(diff * diff))
        count += diff.size
    mse = total / count if count else float("nan")
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def ssim(image: np.ndarray, reference: np.ndarray, data_range: float = 1.0, slab: int | None = None) -> float:
    """Mean structural similarity (Wang et al. 2004) of a 2-D or 3-D array pair.

    Gaussian window with sigma 1.5 voxels (truncated at 3.5 sigma, reflective borders),
    K1 = 0.01, K2 = 0.03, population covariances; the mean excludes a border strip of the
    window radius. Matches ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=data_range)``. Computed in slabs of
    `slab` planes along the first axis (default: about SSIM_SLAB_VOXELS voxels each, with a halo
    of the window radius: the same local values as at once) so memory stays bounded; on the worker's
    threads (threads.map_ranges). The local values are computed in float32 and summed in float64 (the
    native chest's SSIM moved by 2e-8).
    """
    if np.shape(image) != np.shape(reference):
        raise ValueError(f"shape mismatch: {np.shape(image)} vs {np.shape(reference)}")
    shape = np.shape(image)
    pad = SSIM_WINDOW_VOXELS // 2
    if min(shape) < SSIM_WINDOW_VOXELS:
        raise ValueError(f"every axis must have at least {SSIM_WINDOW_VOXELS} voxels, got {shape}")
    slab = slab or max(1, SSIM_SLAB_VOXELS // int(np.prod(shape[1:])))

    def slab_sum(start: int, end: int) -> tuple[float, int]:
        a, b = start + pad, end + pad                 # the slab's interior planes
        local = _ssim_map(np.asarray(image[a - pad:b + pad], dtype=np.float32),
                          np.asarray(reference[a - pad:b + pad], dtype=np.float32), data_range)
        interior = local[(slice(None),) + tuple(slice(pad, n - pad) for n in shape[1:])]
        return float(interior.sum(dtype=np.float64)), interior.size

    sums = threads.map_ranges(slab_sum, shape[0] - 2 * pad, slab)
    return sum(total for total, _ in sums) / sum(count for _, count in sums)


SSIM_SLAB_VOXELS = 1 << 22
"""Voxels of the planes of one slab of `ssim`, read with the window's radius of planes either side (the halo). At
1 << 20, every pass of the smoothing over the halo too, a 512 x 512 slab was 4 planes (2 a thread on 2 threads) beside
the halo's 10, and a 512 x 512 x 300 pair took 26.2 s (23.3 s on 2 threads); at 1 << 22, the halo in the first pass only
(_ssim_map), 10.7 s (5.6-5.7), the peak RSS no higher (the same SSIM to 1e-16; 1 << 21 and 1 << 23 were slower)."""


def _ssim_map(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    """Local SSIM of x and y (reflective borders) at their planes along the first axis beyond the window's radius
    from either end (the others are a slab's halo). Each Gaussian smoothing is scipy's gaussian_filter's passes in
    its order and precision (the first axis first), the halo planes dropped after the first pass: the same numbers to
    the bit as gaussian_filter's of the whole slab, there."""
    pad = SSIM_WINDOW_VOXELS // 2

    def smooth(a: np.ndarray) -> np.ndarray:
        passed = ndimage.gaussian_filter1d(a, _SSIM_SIGMA, axis=0, truncate=_SSIM_TRUNCATE, mode="reflect")
        smoothed = passed[pad:len(a) - pad]
        for axis in range(1, a.ndim):
            smoothed = ndimage.gaussian_filter1d(smoothed, _SSIM_SIGMA, axis=axis, truncate=_SSIM_TRUNCATE,
                                                 mode="reflect")
        return smoothed

    mx, my = smooth(x), smooth(y)
    vx = smooth(x * x) - mx * mx
    vy = smooth(y * y) - my * my
    vxy = smooth(x * y) - mx * my
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def dice_per_label(
    prediction: np.ndarray, truth: np.ndarray, labels: Iterable[int] | None = None
) -> dict[int, float]:
    """Dice coefficient 2|P∩T| / (|P| + |T|) for each label.

    ``labels`` defaults to every non-zero label present in either array; a label absent
    from both gets nan. Every label's counts come from one pass over the voxels (each voxel's pair of predicted and
    true labels counted, LABEL_COUNT_CHUNK voxels at a time), so a structure set of a hundred labels costs what one
    does.
    """
    prediction = np.asarray(prediction)
    truth = np.asarray(truth)
    if prediction.shape != truth.shape:
        raise ValueError(f"shape mismatch: {prediction.shape} vs {truth.shape}")
    present = np.union1d(labels_present(prediction), labels_present(truth))
    wanted = present[present != 0] if labels is None else np.asarray(list(labels))
    universe = np.union1d(present, wanted)
    if not len(universe):
        return {}
    pairs = _label_pairs(prediction.reshape(-1), truth.reshape(-1), universe)
    predicted, true = pairs.sum(axis=1), pairs.sum(axis=0)
    scores = {}
    for label in wanted:
        k = int(np.searchsorted(universe, label))
        total = int(predicted[k]) + int(true[k])
        scores[int(label)] = 2.0 * int(pairs[k, k]) / total if total else float("nan")
    return scores


LABEL_COUNT_CHUNK = 1 << 20
"""Voxels of a labelmap counted at once (labels_present, dice_per_label): 8 MB of int64 (np.bincount copies what it
counts as int64). A 512 x 512 x 300 labelmap counted at once took 1.3-2.6 s the first time and raised the peak RSS by
525-600 MB (630 MB of int64); in chunks of this size 0.09 s, no rise."""


def labels_present(labelmap: np.ndarray) -> np.ndarray:
    """Every value a labelmap holds (0 among them if any voxel holds it), sorted: counted by np.bincount,
    LABEL_COUNT_CHUNK voxels at a time, where they are integers in 0..65535 (not np.unique's sort of the whole
    volume), else np.unique."""
    if labelmap.dtype.kind in "ui" and labelmap.size and 0 <= labelmap.min() and labelmap.max() < 1 << 16:
        counts = np.zeros(int(labelmap.max()) + 1, np.int64)
        flat = labelmap.reshape(-1)
        for start in range(0, flat.size, LABEL_COUNT_CHUNK):
            counts += np.bincount(flat[start:start + LABEL_COUNT_CHUNK], minlength=len(counts))
        return np.flatnonzero(counts)
    return np.unique(labelmap)


def _label_pairs(prediction: np.ndarray, truth: np.ndarray, universe: np.ndarray) -> np.ndarray:
    """[len(universe), len(universe)] voxel counts of each (predicted, true) pair of labels; every voxel's label is
    one of `universe` (sorted)."""
    size = len(universe)
    table = None                                    # label -> its position in universe, for labels 0..65535
    if universe.dtype.kind in "ui" and 0 <= universe[0] and universe[-1] < 1 << 16:
        table = np.zeros(int(universe[-1]) + 1, np.int64)
        table[universe] = np.arange(size)

    def positions(values: np.ndarray) -> np.ndarray:
        return table[values] if table is not None else np.searchsorted(universe, values)

    counts = np.zeros(size * size, np.int64)
    for start in range(0, prediction.size, LABEL_COUNT_CHUNK):
        end = start + LABEL_COUNT_CHUNK
        counts += np.bincount(positions(prediction[start:end]) * size + positions(truth[start:end]),
                              minlength=size * size)
    return counts.reshape(size, size)


def jacobian_determinant(displacement: sitk.Image, slab: int | None = None) -> sitk.Image:
    """Jacobian determinant det(I + du/dx) of the map x -> x + u(x) (3-D).

    Derivatives are taken in physical space (mm), honouring spacing and direction: du/dx = (du/di) (D S)^-1
    with D the direction matrix and S = diag(spacing) (Grid.index_to_mm; D^-1 is D^T unless the grid's axes
    are sheared); central differences inside the grid, one-sided at its borders, in the field's own precision
    (float32 fields: float32). Computed in slabs of `slab` slices (default: about JACOBIAN_SLAB_VOXELS voxels
    each) on the worker's threads (threads.map_ranges): by numba's kernel voxel by voxel where numba is installed,
    else by numpy a slab at a time with a one-slice halo (memory stays bounded); the same numbers either way, and as
    at once. Returns a float32 scalar image with the geometry of ``displacement``.
    """
    u = sitk.GetArrayViewFromImage(displacement)  # [z, y, x, component], not copied
    depth = u.shape[0]
    slab = slab or max(1, JACOBIAN_SLAB_VOXELS // (u.shape[1] * u.shape[2]))
    index_per_mm = np.linalg.inv(Grid.of(displacement).index_to_mm).astype(u.dtype)
    determinant = np.empty(u.shape[:3], dtype=np.float32)
    compiled = compiling.numba is not None and min(u.shape[:3]) >= 2      # numpy refuses an axis of one voxel
    determinants = _determinants if compiled else _numpy_determinants
    threads.map_ranges(lambda z0, z1: determinants(u, index_per_mm, determinant, z0, z1), depth, slab)
    out = sitk.GetImageFromArray(determinant)
    out.CopyInformation(displacement)
    return out


JACOBIAN_SLAB_VOXELS = 1 << 18


def _numpy_determinants(u: np.ndarray, index_per_mm: np.ndarray, out: np.ndarray, z0: int, z1: int) -> None:
    """out[z0:z1] = det(I + du/dx) of slices z0..z1 of the field u [z, y, x, 3] (jacobian_determinant), by numpy's
    gradients of those slices and one more each side."""
    low, high = max(z0 - 1, 0), min(z1 + 1, u.shape[0])
    rows = slice(z0 - low, z1 - low)
    # d[c][a] = d u_c / d index_a, index axes a = (i, j, k) are array axes reversed.
    d = [[g[rows] for g in np.gradient(u[low:high, :, :, c], axis=(2, 1, 0))] for c in range(3)]
    out[z0:z1] = _det3(_deformation_gradient(d, index_per_mm))


def _deformation_gradient(d: list[list[np.ndarray]], index_per_mm: np.ndarray) -> list[list[np.ndarray]]:
    """I + du/dx as a 3 x 3 nested list of arrays, from d[c][a] = du_c/d index_a and the index-per-mm matrix;
    the matrix's zero entries (every one off the diagonal on an axis-aligned grid) are skipped, which adds
    nothing but time."""
    def entry(c: int, b: int) -> np.ndarray:
        terms = [d[c][a] * index_per_mm[a, b] for a in range(3) if index_per_mm[a, b] != 0]
        total = sum(terms[1:], terms[0]) if terms else np.zeros_like(d[c][0])
        return total + 1 if c == b else total
    return [[entry(c, b) for b in range(3)] for c in range(3)]


def _det3(m: Any) -> Any:
    """Determinants of 3x3 matrices given entry by entry, m[row][column] an array each (or, in the kernel, a number
    each), by cofactors: a few times faster than np.linalg.det's LU, equal to it within rounding."""
    return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))


_voxel_det3 = inlined(_det3)


@kernel
def _determinants(u: np.ndarray, index_per_mm: np.ndarray, out: np.ndarray, z0: int, z1: int) -> None:
    """out[z0:z1] as _numpy_determinants computes it, voxel by voxel, each operation numpy's in its order and in the
    field's precision: np.gradient's differences (halved inside the grid), _deformation_gradient's sums, _det3."""
    _, rows, columns, _ = u.shape
    kind = u.dtype.type
    for z in range(z0, z1):
        for y in range(rows):
            for x in range(columns):
                m = (_row(u, z, y, x, 0, index_per_mm, kind), _row(u, z, y, x, 1, index_per_mm, kind),
                     _row(u, z, y, x, 2, index_per_mm, kind))
                out[z, y, x] = _voxel_det3(m)


@inlined
def _row(u: np.ndarray, z: int, y: int, x: int, c: int, index_per_mm: np.ndarray, kind: Any) -> tuple[Any, Any, Any]:
    """Row c of I + du/dx at voxel (x, y, z)."""
    slopes = (_slope(u, z, y, x, c, 0, kind), _slope(u, z, y, x, c, 1, kind), _slope(u, z, y, x, c, 2, kind))
    return (_entry(slopes, index_per_mm, 0, kind, c == 0), _entry(slopes, index_per_mm, 1, kind, c == 1),
            _entry(slopes, index_per_mm, 2, kind, c == 2))


@inlined
def _slope(u: np.ndarray, z: int, y: int, x: int, c: int, a: int, kind: Any) -> Any:
    """du_c / d index_a at voxel (x, y, z) as np.gradient takes it: (next - previous) / 2 inside the grid, one-sided
    at its first and last voxel along axis a (x, y, z for a = 0, 1, 2)."""
    at, n = (x, y, z)[a], u.shape[2 - a]
    before, after = max(at - 1, 0), min(at + 1, n - 1)
    if a == 0:
        difference = u[z, y, after, c] - u[z, y, before, c]
    elif a == 1:
        difference = u[z, after, x, c] - u[z, before, x, c]
    else:
        difference = u[after, y, x, c] - u[before, y, x, c]
    return difference / kind(2.0) if 0 < at < n - 1 else difference


@inlined
def _entry(slopes: Any, index_per_mm: np.ndarray, b: int, kind: Any, diagonal: bool) -> Any:
    """(I + du/dx)[c, b] from the slopes du_c / d index_a, as _deformation_gradient sums it: the terms whose
    index-per-mm entry is 0 skipped, the others added in order a = 0, 1, 2, then 1 on the diagonal."""
    total, first = kind(0.0), True
    for a in range(3):
        if index_per_mm[a, b] != 0:
            term = slopes[a] * index_per_mm[a, b]
            total, first = (term if first else total + term), False
    return total + kind(1.0) if diagonal else total


def folding_statistics(jacobian: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float | int]:
    """Folding summary of a Jacobian-determinant array, over ``mask`` if given.

    Returns ``folded_voxels`` (count of det J <= 0), ``jacobian_min`` and ``jacobian_max``.
    """
    values = np.asarray(jacobian)              # not copied: min and max are exact in any precision
    if mask is not None:
        values = values[np.asarray(mask, dtype=bool)]
    return {
        "folded_voxels": int(np.count_nonzero(values <= 0)),
        "jacobian_min": float(values.min()),
        "jacobian_max": float(values.max()),
    }


def target_registration_error(mapped_points: np.ndarray, reference_points: np.ndarray) -> dict[str, float]:
    """Landmark error in mm between mapped points q + u(q) and the true reference points.

    Both arrays are (N, 3) in LPS mm. Returns ``tre_mean``, ``tre_std`` (population) and
    ``tre_max`` of the per-landmark Euclidean distances.
    """
    mapped = np.asarray(mapped_points, dtype=np.float64)
    reference = np.asarray(reference_points, dtype=np.float64)
    if mapped.shape != reference.shape:
        raise ValueError(f"shape mismatch: {mapped.shape} vs {reference.shape}")
    distances = np.linalg.norm(mapped - reference, axis=1)
    return {
        "tre_mean": float(distances.mean()),
        "tre_std": float(distances.std()),
        "tre_max": float(distances.max()),
    }


def map_points(displacement: sitk.Image, points: np.ndarray) -> np.ndarray:
    """Map (N, 3) LPS mm points q of the time-t image to q + u(q) in the reference image.

    u is linearly interpolated from the field; points outside the field's grid get zero
    displacement (ITK's behaviour). ``displacement`` is left untouched.
    """
    points = np.asarray(points, dtype=np.float64)
    flat = points.reshape(-1, 3)
    size = np.asarray(displacement.GetSize())
    index = np.array([displacement.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in flat]).reshape(-1, 3)
    inside = np.all((index >= -0.5) & (index < size - 0.5), axis=1)      # ITK's IsInsideBuffer
    mapped = flat.copy()
    if inside.any():
        # Only the voxels around the points are read: the field cropped to their bounding box plus two
        # voxels (not a float64 copy of the whole field). The transform takes ownership of (and
        # empties) the image it is given: the crop is a copy.
        low = np.clip(np.floor(index[inside].min(axis=0)) - 2, 0, size - 1).astype(int)
        high = np.clip(np.ceil(index[inside].max(axis=0)) + 3, low + 1, size).astype(int)
        crop = displacement[int(low[0]):int(high[0]), int(low[1]):int(high[1]), int(low[2]):int(high[2])]
        transform = sitk.DisplacementFieldTransform(sitk.Cast(crop, sitk.sitkVectorFloat64))
        mapped[inside] = [transform.TransformPoint(tuple(p)) for p in flat[inside]]
    return mapped.reshape(points.shape)


METRIC_KEYS = ("folded_voxels", "jacobian_min", "jacobian_max", "psnr", "ssim", "dice", "tre_mean", "tre_std",
               "tre_max")
"""The metrics of a field at one time point, as run.json, metrics.csv, evaluation.json and the
benchmarks name them."""


def score_time_point(*, field: sitk.Image | None = None, jacobian: np.ndarray | None = None,
                     images: tuple[np.ndarray, np.ndarray] | None = None,
                     labelmaps: tuple[np.ndarray, np.ndarray] | None = None, labels: Iterable[int] | None = None,
                     landmarks: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Every metric of a field u at one time point, from the parts that are known there: the one
    definition used by a run's outputs, ``stnerp evaluate`` and the benchmarks.

    ``field``: u (mm, LPS, time-t grid, q -> q + u(q)); ``jacobian``: its det J array (folding
    statistics; not computed here, so a caller can let the Jacobian go once written). ``images``: (predicted, actual)
    intensities normalised to [0, 1] (PSNR; SSIM, None on a grid thinner than SSIM_WINDOW_VOXELS). ``labelmaps``:
    (propagated, true) label arrays, Dice over ``labels`` (default: every label present). ``landmarks``: (points q in
    the time-t image, their true reference points), TRE in mm through ``field``. Returns every key of METRIC_KEYS; a
    part not given scores None (Dice: an empty dict); Dice keys are label strings.
    """
    scores: dict = dict.fromkeys(METRIC_KEYS)
    scores["dice"] = {}
    if jacobian is not None:
        scores.update(folding_statistics(jacobian))
    if images is not None:
        predicted, actual = images
        scores.update(psnr=psnr(predicted, actual),
                      ssim=ssim(predicted, actual) if min(np.shape(actual)) >= SSIM_WINDOW_VOXELS else None)
    if labelmaps is not None:
        scores["dice"] = {str(k): v for k, v in dice_per_label(*labelmaps, labels).items()}
    if landmarks is not None:
        if field is None:
            raise ValueError("landmarks need the field that maps them")
        points, reference_points = landmarks
        scores.update(target_registration_error(map_points(field, points), reference_points))
    return scores
