"""Cubic B-spline look-ups by numba compiled kernels: the prior's (priors.ImagePrior.look_up), torch's numbers to the
bit, and a scan's resampling for the predicted image (resample), SimpleITK's numbers to 0.01 HU; both read the padded
coefficients (padded_coefficients).

Every Def-Net iteration looks the prior up at its drawn voxels' moved positions, the intensities and their slopes in
the coordinates. Torch does it in passes over all the points (gather the 64 coefficients a point, transpose them to
taps x points, then 21 products along the taps), each pass reading and writing megabytes. The kernel forms each
point's intensity and slopes from its coefficients in registers, in torch's order of operations (its tap sums are
fused multiply-adds, as its vectorised addcmul_ computes them), and asks for the coefficients of the point PREFETCH
ahead while it computes: the table is read at random and a point's computation leaves the processor no room to run
ahead to the next point's reads by itself. About twice as fast in a fit (docs/presets.md). It reads the padded
coefficients themselves, 16 runs of 4 a point (4 bytes a voxel; torch's passes read a table of 4 x 4 x 4 cubes, 64
times that, where it fits: one gather a point). It runs where numba is installed, on the CPU; elsewhere torch's
passes give the same numbers.

The predicted image resamples the scans at millions of points mapped through the learned motion. SimpleITK's
resampling computes a scan's coefficients afresh for each slab of slices (and a margin beyond it) and reads its points
through a displacement-field transform; the kernel reads each point's indices directly from coefficients computed once
for the whole scan (docs/presets.md, *The predicted image resampled by a kernel*). Where numba is missing, SimpleITK
resamples (warping).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage

from . import compiling, threads
from .compiling import inlined, kernel

PREFETCH = 8
"""Points ahead whose coefficients the kernel asks for (4 to 32 measured alike on 12 285 points of the 3 mm chest's
table of cubes; none: slower than torch's passes when the table is not in the cache)."""


def reads(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel looks up a prior whose coefficients are of this dtype on this device: numba installed,
    float32 or float64 on the CPU (what the prior's layout and the memory estimate follow)."""
    return compiling.numba is not None and device.type == "cpu" and dtype in (torch.float32, torch.float64)


def resamples() -> bool:
    """Whether `resample` runs compiled (numba installed): else the predicted image is resampled by SimpleITK."""
    return compiling.numba is not None


def padded_coefficients(volume: np.ndarray, dtype: type) -> np.ndarray:
    """The cubic B-spline coefficients of a volume [D, H, W] with mirror boundaries (as SimpleITK's and scipy's
    interpolation compute them), each axis's pass in `dtype` (scipy filters each line in float64), padded by 1 before
    and 2 after along each axis with their mirror images (coefficient -1 is coefficient 1): contiguous, (D + 3, H + 3,
    W + 3) of `dtype`, every tap of a point at a continuous index in [0, n - 1] on each axis inside. Memory: that array
    alone (the volume's values are read, not copied)."""
    padded = np.empty(tuple(n + 3 for n in volume.shape), dtype)
    inner = padded[1:-2, 1:-2, 1:-2]
    source = volume
    for axis in range(3):
        ndimage.spline_filter1d(source, 3, axis, output=inner, mode="mirror")
        source = inner
    for axis, n in enumerate(volume.shape):
        for at in (0, n + 1, n + 2):         # padded position of coefficient at - 1, from its mirror image's
            padded[(slice(None),) * axis + (at,)] = padded[(slice(None),) * axis + (1 + _mirrored(at - 1, n),)]
    return padded


def _mirrored(k: int, n: int) -> int:
    """Index k of an axis of n values mirrored into 0..n - 1 about its first and last values (not repeated)."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    k = abs(k) % period
    return period - k if k >= n else k


def resample(coefficients: np.ndarray, samples: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The scan `samples` [D, H, W] (its padded_coefficients) at continuous indices (N, 3), (x, y, z), float32: its
    cubic B-spline where an index lies within half a voxel of the scan's nodes on every axis (mirrored about the
    border nodes within that half voxel), else the value of its nearest voxel, as SimpleITK resamples with a
    nearest-neighbour extrapolator (warping.resample_onto). The points' ranges are shared among threads.current()
    threads."""
    resampled = np.empty(len(index), np.float32)
    points = np.ascontiguousarray(index, np.float64)

    def part(start: int, end: int) -> None:
        _resample(coefficients, samples, points[start:end], resampled[start:end])

    threads.map_ranges(part, len(points), RESAMPLE_CHUNK)
    return resampled


RESAMPLE_CHUNK = 1 << 16
"""Points resampled by one call of the kernel: a range of them on each thread at once."""


def compiled(coefficients: torch.Tensor, c: torch.Tensor) -> bool:
    """Whether `look_up` takes the kernel: it `reads` the coefficients, and the points are (N, 3) of their dtype on
    the CPU."""
    return reads(coefficients.device, coefficients.dtype) and c.device.type == "cpu" and c.dtype == coefficients.dtype \
        and c.dim() == 2 and c.shape[1] == 3


def look_up(coefficients: torch.Tensor, shape: tuple[int, ...], extent: torch.Tensor, c: torch.Tensor,
            slopes: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ImagePrior.look_up's intensities (N,) at coordinates c (N, 3) in [-1, 1] (x, y, z), and with `slopes` their
    derivatives (N, 3) in c, from the cubic B-spline `coefficients` of a (D, H, W) volume, padded by 1 before and 2
    after along each axis and flat; the volume's last index along (x, y, z) is `extent`."""
    count = len(c)
    value = torch.empty(count, dtype=c.dtype)
    slope = torch.empty((count, 3) if slopes else (0, 3), dtype=c.dtype)
    _look_up(coefficients.numpy(), shape[1], shape[2], c.detach().contiguous().numpy(), extent.numpy(), value.numpy(),
             slope.numpy(), slopes, np.empty(count, np.int64))
    return value, slope if slopes else None


# torch's operations (priors.ImagePrior.look_up, _cubic_bspline_weights, _along) one by one: the index clipped to the
# grid, the weights and their derivatives as its products in its order, each tap sum its first product then three
# fused multiply-adds (addcmul_), x, then y, then z.


@kernel
def _look_up(table: np.ndarray, height: int, width: int, points: np.ndarray, extent: np.ndarray, value: np.ndarray,
             slope: np.ndarray, slopes: bool, first: np.ndarray) -> None:
    """value [N] (and with `slopes` slope [N, 3]) at points [N, 3]; the table: the coefficients padded, flat (the 4 x 4
    x 4 about voxel (z, y, x) are the runs of 4 from (z + tz, y + ty, x), tz and ty 0 to 3); first [N]: where each
    point's first run starts (workspace)."""
    kind = table.dtype.type
    rows, columns, count = height + 3, width + 3, points.shape[0]
    scale = (extent[0] / kind(2.0), extent[1] / kind(2.0), extent[2] / kind(2.0))
    for p in range(count):
        x, y, z = _index(points, p, scale, extent, kind)
        if np.isnan(x) or np.isnan(y) or np.isnan(z):  # read the first runs, never outside the table: the value is NaN
            x = y = z = kind(0.0)
        first[p] = (int(np.floor(z)) * rows + int(np.floor(y))) * columns + int(np.floor(x))
    for p in range(count):
        if p + PREFETCH < count:
            _prefetch(table, first[p + PREFETCH], rows, columns)
        x, y, z = _index(points, p, scale, extent, kind)
        fx, fy, fz = np.floor(x), np.floor(y), np.floor(z)
        wx, dx = _weights(x - fx, kind)
        wy, dy = _weights(y - fy, kind)
        wz, dz = _weights(z - fz, kind)
        total = along_x = along_y = along_z = kind(0.0)
        for tz in range(4):
            xy = xy_dx = xy_dy = kind(0.0)
            for ty in range(4):
                at = first[p] + (tz * rows + ty) * columns
                row = _taps(table, at, wx)
                xy, xy_dy = _tap(row, wy, ty, xy), _tap(row, dy, ty, xy_dy)
                if slopes:
                    xy_dx = _tap(_taps(table, at, dx), wy, ty, xy_dx)
            total, along_z = _tap(xy, wz, tz, total), _tap(xy, dz, tz, along_z)
            along_x, along_y = _tap(xy_dx, wz, tz, along_x), _tap(xy_dy, wz, tz, along_y)
        value[p] = total
        if slopes:
            slope[p, 0], slope[p, 1], slope[p, 2] = along_x * scale[0], along_y * scale[1], along_z * scale[2]


@inlined
def _index(points: np.ndarray, p: int, scale: tuple, extent: np.ndarray, kind: Any) -> tuple[Any, Any, Any]:
    """Point p's continuous voxel index (x, y, z), clipped to the grid."""
    zero, one = kind(0.0), kind(1.0)
    return (max(min((points[p, 0] + one) * scale[0], extent[0]), zero),
            max(min((points[p, 1] + one) * scale[1], extent[1]), zero),
            max(min((points[p, 2] + one) * scale[2], extent[2]), zero))


@inlined
def _weights(f: Any, kind: Any) -> tuple[tuple[Any, Any, Any, Any], tuple[Any, Any, Any, Any]]:
    """The four taps' B-spline weights at fraction f and their derivatives in f."""
    one, two, three, four, six = kind(1.0), kind(2.0), kind(3.0), kind(4.0), kind(6.0)
    g = one - f
    f2, g2 = f * f, g * g
    weights = (g2 * g / six, ((four - six * f2) + (three * f2) * f) / six,
               ((four - six * g2) + (three * g2) * g) / six, f2 * f / six)
    return weights, (kind(-0.5) * g2, kind(1.5) * f2 - two * f, two * g - kind(1.5) * g2, kind(0.5) * f2)


@inlined
def _taps(table: np.ndarray, at: int, weights: tuple) -> Any:
    """The four coefficients from table[at] along x weighted by `weights`."""
    total = table[at] * weights[0]
    for k in range(1, 4):
        total = compiling.fused_multiply_add(table[at + k], weights[k], total)
    return total


@inlined
def _tap(value: Any, weights: tuple, k: int, total: Any) -> Any:
    """A tap sum's running total after tap k of `value`: its first product, then a fused multiply-add."""
    return value * weights[0] if k == 0 else compiling.fused_multiply_add(value, weights[k], total)


@inlined
def _prefetch(table: np.ndarray, first: int, rows: int, columns: int) -> None:
    """Ask for the cache lines (64 bytes) of the 16 runs of 4 that start at `first`: each run's first and last value's
    (a run may straddle two lines)."""
    for tz in range(4):
        for ty in range(4):
            start = first + (tz * rows + ty) * columns
            compiling.prefetch(table, start)
            compiling.prefetch(table, start + 3)


@kernel
def _resample(table: np.ndarray, samples: np.ndarray, index: np.ndarray, out: np.ndarray) -> None:
    """out[p]: `resample`'s value at index[p] (x, y, z), from the padded coefficients `table` [D + 3, H + 3, W + 3] of
    `samples` [D, H, W], in float64 (SimpleITK's arithmetic) rounded once to out's type."""
    depth, height, width = samples.shape
    for p in range(index.shape[0]):
        x, y, z = index[p, 0], index[p, 1], index[p, 2]
        if not (_within(x, width) and _within(y, height) and _within(z, depth)):
            out[p] = samples[_nearest(z, depth), _nearest(y, height), _nearest(x, width)]
            continue
        x, y, z = _mirror(x, width), _mirror(y, height), _mirror(z, depth)
        fx, fy, fz = np.floor(x), np.floor(y), np.floor(z)
        wx, _ = _weights(x - fx, np.float64)
        wy, _ = _weights(y - fy, np.float64)
        wz, _ = _weights(z - fz, np.float64)
        ix, iy, iz = int(fx), int(fy), int(fz)
        total = 0.0
        for tz in range(4):
            plane = 0.0
            for ty in range(4):
                row = table[iz + tz, iy + ty]
                plane += wy[ty] * (wx[0] * np.float64(row[ix]) + wx[1] * np.float64(row[ix + 1])
                                   + wx[2] * np.float64(row[ix + 2]) + wx[3] * np.float64(row[ix + 3]))
            total += wz[tz] * plane
        out[p] = total


@inlined
def _within(i: float, n: int) -> bool:
    """Whether continuous index i lies in [-0.5, n - 0.5), where SimpleITK interpolates (else it extrapolates)."""
    return -0.5 <= i < n - 0.5


@inlined
def _nearest(i: float, n: int) -> int:
    """The voxel nearest continuous index i (halves up), clamped to 0..n - 1: SimpleITK's nearest-neighbour
    extrapolation; 0 for not a number."""
    if np.isnan(i):
        return 0
    return min(max(int(np.floor(i + 0.5)), 0), n - 1)


@inlined
def _mirror(i: float, n: int) -> float:
    """Continuous index i in [-0.5, n - 0.5) mirrored into [0, n - 1] about the border nodes (the spline of mirrored
    coefficients is symmetric about them); 0 on an axis of one voxel."""
    if n == 1:
        return 0.0
    if i < 0.0:
        return -i
    if i > n - 1:
        return 2.0 * (n - 1) - i
    return i
