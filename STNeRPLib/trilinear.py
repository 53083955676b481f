"""Trilinear sampling of 3-D fields for training: torch's grid_sample (mode "bilinear", padding "border",
align_corners=True) by numba's compiled kernels, the same numbers to the bit.

Training samples its displacement at the drawn voxels and composes it with itself in every squaring step, forward
and backward, at every iteration. Torch's CPU kernel for the 3-D case is generic code that computes the sampling
points' gradient even when only the field's is wanted (the drawn voxels need none); these kernels compute the
gradients asked for, with the same arithmetic in the same order (so a fit is the same with them as with torch's),
about twice as fast at the drawn voxels and 1.1-1.4 x in a squaring step (docs/presets.md). They run where training
needs them: float32 or float64 tensors on the CPU with autograd. Elsewhere (the outputs, which torch shares among
its threads; another device; numba not installed) torch's kernel samples. Grids are [N, C, D, H, W], points
[N, Do, Ho, Wo, 3] in (x, y, z) order, -1 and 1 the first and last node of each axis.

The outputs' inverse of a map (warping.invert) iterates a fixed point by sampling at each point again and again;
`inverse` does it point by point in one kernel, the same numbers to the bit as warping's passes of torch's sampling
(which gather and scatter the points still moving at every step), where numba is installed, on the CPU. `mapped`
maps a slab of the reference grid's voxels as the outputs do (u sampled, on through an inverse map, to indices and mm)
in one pass a point, torch's numbers to the bit.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import compiling, threads
from .compiling import inlined, kernel

if TYPE_CHECKING:
    from torch.autograd.function import FunctionCtx


def compiled(volume: torch.Tensor, grid: torch.Tensor) -> bool:
    """Whether grid_sample takes the compiled kernels: numba installed, both tensors float32 or both float64 on the
    CPU, shaped as grid_sample takes them (else torch's kernel says what is wrong: the kernels do not check their
    indices), and autograd recording a gradient of either."""
    return (compiling.numba is not None and volume.device.type == "cpu" and grid.device.type == "cpu"
            and volume.dtype == grid.dtype and volume.dtype in (torch.float32, torch.float64)
            and volume.dim() == 5 and grid.dim() == 5 and grid.shape[0] == volume.shape[0] and grid.shape[4] == 3
            and volume.numel() > 0
            and torch.is_grad_enabled() and (volume.requires_grad or grid.requires_grad))


def grid_sample(volume: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """torch.nn.functional.grid_sample(volume, grid, "bilinear", "border", align_corners=True) of a volume
    [N, C, D, H, W] at points [N, Do, Ho, Wo, 3]: [N, C, Do, Ho, Wo]."""
    if compiled(volume, grid):
        return cast(torch.Tensor, _Trilinear.apply(volume, grid))
    return F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=True)


class _Trilinear(torch.autograd.Function):
    """grid_sample by the compiled kernels; the backward computes the gradients autograd asks for."""

    @staticmethod
    def forward(ctx: FunctionCtx, volume: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """The samples [N, C, Do, Ho, Wo], keeping the volume and the points for the backward."""
        volume, points = volume.detach().contiguous(), grid.detach().reshape(len(grid), -1, 3).contiguous()
        out = torch.empty(*volume.shape[:2], points.shape[1], dtype=volume.dtype)
        _forward(volume.numpy(), points.numpy(), out.numpy())
        ctx.save_for_backward(volume, points)
        ctx.grid_shape = grid.shape  # type: ignore[attr-defined]  # torch's ctx carries saved values
        return out.view(*volume.shape[:2], *grid.shape[1:4])

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The gradients with respect to the volume and the points, each if asked for (else None)."""
        volume, points = ctx.saved_tensors  # type: ignore[attr-defined]  # torch's backward ctx has saved_tensors
        want_volume, want_grid = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad_volume = torch.zeros_like(volume) if want_volume else volume.new_empty((0,) * 5)
        grad_grid = torch.empty_like(points) if want_grid else points.new_empty((0, 0, 3))
        _backward(volume.numpy(), points.numpy(), grad.contiguous().view(*volume.shape[:2], -1).numpy(),
                  grad_volume.numpy(), grad_grid.numpy(), want_volume, want_grid)
        return (grad_volume if want_volume else None,
                grad_grid.view(ctx.grid_shape) if want_grid else None)  # type: ignore[attr-defined]


def inverts(forward: torch.Tensor, start: torch.Tensor, c: torch.Tensor) -> bool:
    """Whether `inverse` takes these: numba installed, all three float32 (or all float64) on the CPU, fields [1, 3, D,
    H, W] and points [1, N, 3]."""
    tensors = (forward, start, c)
    return (compiling.numba is not None and all(t.device.type == "cpu" and t.dtype == c.dtype for t in tensors)
            and c.dtype in (torch.float32, torch.float64) and forward.dim() == start.dim() == 5
            and forward.shape[:2] == start.shape[:2] == (1, 3) and c.dim() == 3 and c.shape[0] == 1
            and c.shape[2] == 3)


def inverse(forward: torch.Tensor, start: torch.Tensor, c: torch.Tensor, steps: int, tolerance: float) -> torch.Tensor:
    """warping.invert by the kernel: at each point c [1, N, 3] the displacement w [1, N, 3] with c + w + forward(c + w)
    = c, from w = start(c), each step w <- -forward(c + w), after `steps` of them damped (the mean of w and that), until
    a step moves w by at most `tolerance` along every axis or 2 x `steps` were taken. The points' ranges are shared
    among threads.current() threads."""
    fields = forward.detach().contiguous().numpy(), start.detach().contiguous().numpy()
    points = c.detach()[0].contiguous().numpy()
    w = torch.empty(c.shape, dtype=c.dtype)
    out = w[0].numpy()

    def part(begin: int, end: int) -> None:
        _inverse(*fields, points[begin:end], out[begin:end], steps, tolerance)

    threads.map_ranges(part, len(points), INVERSE_RANGE)
    return w


INVERSE_RANGE = 1 << 16
"""Points one call of the inverse's kernel takes: a range of them on each thread at once."""


def maps(displacement: torch.Tensor, inverses: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether `mapped` takes these: numba installed, the displacement and every inverse map's two fields float32 on the
    CPU, each [1, 3, D, H, W]."""
    fields = [displacement, *(field for pair in inverses for field in pair)]
    return compiling.numba is not None and all(
        f.device.type == "cpu" and f.dtype == torch.float32 and f.dim() == 5 and f.shape[:2] == (1, 3) for f in fields)


def mapped(displacement: torch.Tensor, inverse: tuple[torch.Tensor, torch.Tensor] | None, axes: Sequence[torch.Tensor],
           rows: tuple[int, int], half_scale: np.ndarray, per_unit: np.ndarray, steps: int,
           tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """The voxel centres c of slices rows[0]..rows[1] of a grid whose unit coordinates along z, y and x are `axes`
    (integration.GridPoints.axes), mapped as warping._mapped maps them by torch, to the bit: c -> c + u(c), u the
    `displacement` sampled at c, and with an `inverse` map (forward, start) on to c + u(c) + w, w its inverse at
    c + u(c) (as `inverse` finds it, with `steps` and `tolerance`). Returns the points' continuous indices (x, y, z),
    (N, 3) float64, (unit + 1) * half_scale; and their displacement from c in mm, (N, 3) float32, the displacement
    in units times `per_unit` (3 x 3, float32), summed x, y, z in that order as torch's product sums. The points'
    ranges are shared among threads.current() threads."""
    field = displacement.detach().contiguous().numpy()
    forward, start = (field, field) if inverse is None else tuple(f.detach().contiguous().numpy() for f in inverse)
    along_x, along_y, along_z = _along(axes)
    count = (rows[1] - rows[0]) * len(along_y) * len(along_x)
    index, mm = np.empty((count, 3)), np.empty((count, 3), np.float32)
    scale, per_unit = np.ascontiguousarray(half_scale, np.float64), np.ascontiguousarray(per_unit, np.float32)

    def part(begin: int, end: int) -> None:
        _mapped(field, forward, start, inverse is not None, along_x, along_y, along_z, rows[0], begin, end,
                scale, per_unit, steps, tolerance, index, mm)

    threads.map_ranges(part, count, INVERSE_RANGE)
    return index, mm


def inverse_in_mm(inverse: tuple[torch.Tensor, torch.Tensor], axes: Sequence[torch.Tensor], rows: tuple[int, int],
                  per_unit: np.ndarray, steps: int, tolerance: float, out: np.ndarray) -> None:
    """Into out (N, 3) float32: at the voxel centres c of slices rows[0]..rows[1] (axes as in `mapped`) the inverse
    map's w (forward, start; as `inverse` finds it, with `steps` and `tolerance`), times `per_unit` as in `mapped`:
    warping.inverse_displacement's numbers by torch, to the bit. The points' ranges are shared among threads."""
    forward, start = (f.detach().contiguous().numpy() for f in inverse)
    along_x, along_y, along_z = _along(axes)
    per_unit = np.ascontiguousarray(per_unit, np.float32)

    def part(begin: int, end: int) -> None:
        _inverse_in_mm(forward, start, along_x, along_y, along_z, rows[0], begin, end, per_unit, steps, tolerance,
                       out)

    threads.map_ranges(part, len(out), INVERSE_RANGE)


def _along(axes: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The unit coordinates along x, y and z of a grid, as numpy arrays, from GridPoints.axes (z, y, x)."""
    along_z, along_y, along_x = (a.cpu().numpy() for a in axes)
    return along_x, along_y, along_z


# The kernels follow torch's CPU kernel (aten/src/ATen/native/GridSampler.cpp, grid_sampler_3d_cpu_impl and its
# backward) operation by operation: the corners' weights as products of the same differences, the sums in the
# same order (corners z, then y, then x, first corner first), a corner beyond the grid's last node skipped. Halving
# is multiplying by 0.5 (the same rounding).


@kernel
def _forward(volume: np.ndarray, points: np.ndarray, out: np.ndarray) -> None:
    """out [N, C, P] = the volume [N, C, D, H, W] at points [N, P, 3]."""
    count, channels, depth, height, width = volume.shape
    size, stride = points.shape[1], depth * height * width
    values, coordinates, samples = volume.ravel(), points.ravel(), out.ravel()
    kind = volume.dtype.type
    for n in range(count):
        for p in range(size):
            k = 3 * (n * size + p)
            ix, iy, iz, _, _, _ = _source(coordinates, k, width, height, depth, kind)
            first, sx, sy, sz, w, _ = _cell(ix, iy, iz, width, height, depth, kind)
            for c in range(channels):
                samples[(n * channels + c) * size + p] = _corners(values, first + (n * channels + c) * stride, sx, sy,
                                                                  sz, w, kind)


@kernel
def _backward(volume: np.ndarray, points: np.ndarray, grad: np.ndarray, grad_volume: np.ndarray,
              grad_points: np.ndarray, want_volume: bool, want_points: bool) -> None:
    """With the gradient grad [N, C, P] of _forward's out: add the volume's into grad_volume [N, C, D, H, W] (zeros)
    and write the points' into grad_points [N, P, 3], each if wanted. A point's gradient sums, over the channels and
    the corners, each corner's value times the two other axes' weights times grad, added or subtracted as torch
    does."""
    count, channels, depth, height, width = volume.shape
    size, stride = points.shape[1], depth * height * width
    values, coordinates, upstream = volume.ravel(), points.ravel(), grad.ravel()
    into_volume, into_points = grad_volume.ravel(), grad_points.ravel()
    kind = volume.dtype.type
    for n in range(count):
        for p in range(size):
            k = 3 * (n * size + p)
            ix, iy, iz, scale_x, scale_y, scale_z = _source(coordinates, k, width, height, depth, kind)
            first, sx, sy, sz, w, (ax, bx, ay, by, az, bz) = _cell(ix, iy, iz, width, height, depth, kind)
            gx, gy, gz = kind(0.0), kind(0.0), kind(0.0)
            for c in range(channels):
                at = first + (n * channels + c) * stride
                g = upstream[(n * channels + c) * size + p]
                if want_volume:
                    _spread(into_volume, at, sx, sy, sz, w, g)
                if not want_points:
                    continue
                v = values[at]
                gx -= v * ay * az * g
                gy -= v * ax * az * g
                gz -= v * ax * ay * g
                if sx:
                    v = values[at + sx]
                    gx += v * ay * az * g
                    gy -= v * bx * az * g
                    gz -= v * bx * ay * g
                if sy:
                    v = values[at + sy]
                    gx -= v * by * az * g
                    gy += v * ax * az * g
                    gz -= v * ax * by * g
                if sx and sy:
                    v = values[at + sx + sy]
                    gx += v * by * az * g
                    gy += v * bx * az * g
                    gz -= v * bx * by * g
                if sz:
                    v = values[at + sz]
                    gx -= v * ay * bz * g
                    gy -= v * ax * bz * g
                    gz += v * ax * ay * g
                    if sx:
                        v = values[at + sz + sx]
                        gx += v * ay * bz * g
                        gy -= v * bx * bz * g
                        gz += v * bx * ay * g
                    if sy:
                        v = values[at + sz + sy]
                        gx -= v * by * bz * g
                        gy += v * ax * bz * g
                        gz += v * ax * by * g
                    if sx and sy:
                        v = values[at + sz + sx + sy]
                        gx += v * by * bz * g
                        gy += v * bx * bz * g
                        gz += v * bx * by * g
            if want_points:
                into_points[k], into_points[k + 1], into_points[k + 2] = scale_x * gx, scale_y * gy, scale_z * gz


@inlined
def _source(coordinates: np.ndarray, k: int, width: int, height: int, depth: int,
            kind: Any) -> tuple[Any, Any, Any, Any, Any, Any]:
    """The point at coordinates[k:k + 3] as source indices (x, y, z) clipped to the grid's border, and d index /
    d coordinate of each: (n - 1) / 2 inside, 0 at or beyond the border (torch's border counts as beyond)."""
    ix, sx = _axis(coordinates[k], width, kind)
    iy, sy = _axis(coordinates[k + 1], height, kind)
    iz, sz = _axis(coordinates[k + 2], depth, kind)
    return ix, iy, iz, sx, sy, sz


@inlined
def _axis(coordinate: Any, nodes: int, kind: Any) -> tuple[Any, Any]:
    """One coordinate's clipped source index on an axis of `nodes` nodes, and its slope (see _source)."""
    last, half, zero = kind(nodes - 1), kind(0.5), kind(0.0)
    index, slope = ((coordinate + kind(1.0)) * half) * last, last * half
    if index <= zero:
        return zero, slope * zero
    if index >= last:
        return last, slope * zero
    return index, slope


@inlined
def _cell(ix: Any, iy: Any, iz: Any, width: int, height: int, depth: int,
          kind: Any) -> tuple[int, int, int, int, tuple[Any, ...], tuple[Any, ...]]:
    """The flat index of the point's cell's first corner in a channel, the steps to its next node along x, y and z
    (0 where there is none: the point is on the last node), the 8 corners' weights, and the differences they are
    products of (_differences, which the points' gradient takes two at a time)."""
    x0, y0, z0 = int(np.floor(ix)), int(np.floor(iy)), int(np.floor(iz))
    differences = _differences(ix, iy, iz, kind)
    ax, bx, ay, by, az, bz = differences
    weights = (ax * ay * az, bx * ay * az, ax * by * az, bx * by * az,
               ax * ay * bz, bx * ay * bz, ax * by * bz, bx * by * bz)
    sx = 1 if x0 + 1 < width else 0
    sy = width if y0 + 1 < height else 0
    sz = width * height if z0 + 1 < depth else 0
    return (z0 * height + y0) * width + x0, sx, sy, sz, weights, differences


@inlined
def _differences(ix: Any, iy: Any, iz: Any, kind: Any) -> tuple[Any, Any, Any, Any, Any, Any]:
    """Along x, y, z: the distance to the cell's far node and from its near node."""
    fx, fy, fz = kind(np.floor(ix)), kind(np.floor(iy)), kind(np.floor(iz))
    one = kind(1.0)
    return fx + one - ix, ix - fx, fy + one - iy, iy - fy, fz + one - iz, iz - fz


@inlined
def _spread(into: np.ndarray, at: int, sx: int, sy: int, sz: int, w: tuple, g: Any) -> None:
    """Add each corner's weight times g to its node (corners in _forward's order)."""
    into[at] += w[0] * g
    if sx:
        into[at + sx] += w[1] * g
    if sy:
        into[at + sy] += w[2] * g
    if sx and sy:
        into[at + sx + sy] += w[3] * g
    if sz:
        into[at + sz] += w[4] * g
        if sx:
            into[at + sz + sx] += w[5] * g
        if sy:
            into[at + sz + sy] += w[6] * g
        if sx and sy:
            into[at + sz + sx + sy] += w[7] * g


@kernel
def _inverse(forward: np.ndarray, start: np.ndarray, points: np.ndarray, out: np.ndarray, steps: int,
             tolerance: float) -> None:
    """out [P, 3]: `inverse` at points [P, 3] of the fields forward and start [1, 3, D, H, W], each operation torch's
    (warping._invert's) in its order: its sampling (_forward's), c + w, the negation, the damped mean as 0.5 * (step
    + w), and the tolerance compared in the fields' precision."""
    kind = forward.dtype.type
    limit = kind(tolerance)
    for p in range(points.shape[0]):
        out[p, 0], out[p, 1], out[p, 2] = _inverse_at(forward, start, points[p, 0], points[p, 1], points[p, 2],
                                                      steps, limit, kind)


@inlined
def _inverse_at(forward: np.ndarray, start: np.ndarray, cx: Any, cy: Any, cz: Any, steps: int, limit: Any,
                kind: Any) -> tuple[Any, Any, Any]:
    """_inverse's w at one point (cx, cy, cz)."""
    wx, wy, wz = _field_at(start, cx, cy, cz, kind)
    for count in range(2 * steps):
        sx, sy, sz = _field_at(forward, cx + wx, cy + wy, cz + wz, kind)
        sx, sy, sz = -sx, -sy, -sz
        if count >= steps:
            sx, sy, sz = kind(0.5) * (sx + wx), kind(0.5) * (sy + wy), kind(0.5) * (sz + wz)
        moving = max(abs(sx - wx), abs(sy - wy), abs(sz - wz)) > limit
        wx, wy, wz = sx, sy, sz
        if not moving:
            break
    return wx, wy, wz


@kernel
def _mapped(displacement: np.ndarray, forward: np.ndarray, start: np.ndarray, inverting: bool, along_x: np.ndarray,
            along_y: np.ndarray, along_z: np.ndarray, first: int, begin: int, end: int, half_scale: np.ndarray,
            per_unit: np.ndarray, steps: int, tolerance: float, index: np.ndarray, mm: np.ndarray) -> None:
    """index and mm [N, 3] (see `mapped`) at the slab's points begin..end (array order; the slab's first slice is
    `first`), each operation torch's in warping._mapped's order: u sampled (_forward's), w (_inverse's) at c + u, then
    u + w, c + that, its float64 index, and the product's sums."""
    kind = displacement.dtype.type
    limit = kind(tolerance)
    for p in range(begin, end):
        x, y, z = _centre(along_x, along_y, along_z, first, p)
        ux, uy, uz = _field_at(displacement, x, y, z, kind)
        if inverting:
            wx, wy, wz = _inverse_at(forward, start, x + ux, y + uy, z + uz, steps, limit, kind)
            ux, uy, uz = ux + wx, uy + wy, uz + wz
        index[p, 0] = (np.float64(x + ux) + 1.0) * half_scale[0]
        index[p, 1] = (np.float64(y + uy) + 1.0) * half_scale[1]
        index[p, 2] = (np.float64(z + uz) + 1.0) * half_scale[2]
        _put_mm(mm, p, ux, uy, uz, per_unit)


@kernel
def _inverse_in_mm(forward: np.ndarray, start: np.ndarray, along_x: np.ndarray, along_y: np.ndarray,
                   along_z: np.ndarray, first: int, begin: int, end: int, per_unit: np.ndarray, steps: int,
                   tolerance: float, mm: np.ndarray) -> None:
    """mm [N, 3] (see `inverse_in_mm`) at the slab's points begin..end, as _mapped orders and reads them."""
    kind = forward.dtype.type
    limit = kind(tolerance)
    for p in range(begin, end):
        x, y, z = _centre(along_x, along_y, along_z, first, p)
        wx, wy, wz = _inverse_at(forward, start, x, y, z, steps, limit, kind)
        _put_mm(mm, p, wx, wy, wz, per_unit)


@inlined
def _centre(along_x: np.ndarray, along_y: np.ndarray, along_z: np.ndarray, first: int, p: int) -> tuple[Any, Any, Any]:
    """The unit coordinates (x, y, z) of point p of a slab, in array order, whose first slice is `first`."""
    width, height = along_x.shape[0], along_y.shape[0]
    return along_x[p % width], along_y[p // width % height], along_z[first + p // (width * height)]


@inlined
def _put_mm(mm: np.ndarray, p: int, ux: Any, uy: Any, uz: Any, per_unit: np.ndarray) -> None:
    """mm[p] = (ux, uy, uz) @ per_unit, each entry summed x, y, z in that order, each product and sum rounded (as
    warping._unit_to_mm, the path without numba)."""
    for r in range(3):
        mm[p, r] = ux * per_unit[0, r] + uy * per_unit[1, r] + uz * per_unit[2, r]


@inlined
def _field_at(field: np.ndarray, x: Any, y: Any, z: Any, kind: Any) -> tuple[Any, Any, Any]:
    """A field [1, 3, D, H, W] at the point (x, y, z) (grid_sample coordinates), as _forward samples it; a coordinate
    not a number taken as the axis' last node, as torch's border padding clips it (min(last, max(NaN, 0)) is last), so
    that a diverged fit's field never sends the kernel outside the field."""
    _, _, depth, height, width = field.shape
    values, stride = field.ravel(), depth * height * width
    ix, _ = _axis(x, width, kind)
    iy, _ = _axis(y, height, kind)
    iz, _ = _axis(z, depth, kind)
    ix, iy, iz = _clipped(ix, width, kind), _clipped(iy, height, kind), _clipped(iz, depth, kind)
    first, sx, sy, sz, w, _ = _cell(ix, iy, iz, width, height, depth, kind)
    return (_corners(values, first, sx, sy, sz, w, kind), _corners(values, first + stride, sx, sy, sz, w, kind),
            _corners(values, first + 2 * stride, sx, sy, sz, w, kind))


@inlined
def _clipped(index: Any, nodes: int, kind: Any) -> Any:
    """A source index from _axis, not a number taken as the last node (torch's border clip of a NaN coordinate)."""
    return kind(nodes - 1) if np.isnan(index) else index


@inlined
def _corners(values: np.ndarray, at: int, sx: int, sy: int, sz: int, w: tuple, kind: Any) -> Any:
    """One channel's sum over the cell's corners from values[at], torch's in its order (first corner first; a corner
    beyond the last node skipped)."""
    total = kind(0.0)                           # torch's sum starts at 0: -0.0 terms give +0.0
    total += values[at] * w[0]
    if sx:
        total += values[at + sx] * w[1]
    if sy:
        total += values[at + sy] * w[2]
    if sx and sy:
        total += values[at + sx + sy] * w[3]
    if sz:
        total += values[at + sz] * w[4]
        if sx:
            total += values[at + sz + sx] * w[5]
        if sy:
            total += values[at + sz + sy] * w[6]
        if sx and sy:
            total += values[at + sz + sx + sy] * w[7]
    return total
