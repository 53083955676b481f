"""The prior that Def-Net deforms: Ref-Net itself, or a volume on the reference grid (the
reference image, or Ref-Net's rendering) sampled by trilinear or cubic B-spline interpolation.

Every prior maps reference-grid coordinates c in [-1, 1]^3 (N, 3) to normalised intensities (N,).
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import cubic_lookup
from .integration import identity_grid, sample

if TYPE_CHECKING:
    from torch.autograd.function import FunctionCtx

TABLE_BYTES = 256 * 2 ** 20
"""The most memory the table of the cubic prior's coefficients that torch's passes read may take. Its entries are the
contiguous coefficients a look-up reads: a 4 x 4 x 4 cube per voxel while that fits (one gather of 256 bytes per
point), else a 4 x 4 (y, x) block (4 gathers of 64 bytes: a 2.4-million-voxel reference, the benchmark's 1.5 mm chest,
takes 151 MB), else a run of 4 along x (16 gathers), read from the padded coefficients themselves, each run
overlapping the next: no copy (a 512 x 512 x 300 CT: 0.3 GB, where separate runs took 1.2 GB and cubes 20 GB).
Numba's kernel reads the runs at every size: as fast in a fit, and a 64th of the memory (cubic_lookup)."""

LAYOUTS = ((4, 4), (1, 4), (1, 1))
"""The (z, y) taps of an entry of the cubic table, in order of preference (4 x taps each); (1, 1), runs of 4, is the
padded coefficients themselves, what the kernel reads."""
RUNS = LAYOUTS[-1]
"""Runs of 4 along x: the layout numba's kernel reads, at every size (cubic_lookup.reads)."""


class ImagePrior(nn.Module):
    """A volume [D, H, W] on the reference grid, interpolated "linear" (trilinear) or "cubic"
    (cubic B-spline). Points outside the grid take the border value.

    Cubic is the more faithful: trilinear interpolation blurs by an amount that depends on the
    sub-voxel position and its gradient jumps at voxel faces, which biases the registration
    towards whole-voxel shifts.

    The cubic look-up reads 4 x 4 x 4 B-spline coefficients per point from a table whose entries are
    contiguous runs of them: numba's kernel from the padded coefficients themselves (runs of 4), torch's passes from
    the largest runs that fit TABLE_BYTES (`LAYOUTS`: one gather a point for cubes). Every layout gives the same
    numbers. The intensities and their slopes in the coordinates are then formed in one pass (look_up), without
    autograd's graph of the look-up.
    """

    volume: torch.Tensor
    table: torch.Tensor
    extent: torch.Tensor

    def __init__(self, volume: torch.Tensor, interpolation: str) -> None:
        super().__init__()
        if interpolation not in ("linear", "cubic"):
            raise ValueError(f"unknown prior interpolation {interpolation!r}: use 'linear' or 'cubic'")
        self.shape, self.cubic = tuple(volume.shape), interpolation == "cubic"
        self._workspace: torch.Tensor | None = None             # the cubic look-up's, kept between calls
        if not self.cubic:
            self.register_buffer("volume", volume[None, None])
            return
        coefficients = cubic_lookup.padded_coefficients(volume.detach().cpu().double().numpy(), np.float64)
        padded = torch.from_numpy(coefficients).to(volume)
        self.taps = _layout(self.shape, padded.element_size(), cubic_lookup.reads(padded.device, padded.dtype))
        self.step, self.columns = _steps(self.shape, self.taps)
        self.register_buffer("table", _table(padded, self.taps), persistent=False)
        self.register_buffer("extent", torch.tensor(self.shape[::-1], dtype=volume.dtype) - 1)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """Intensities (N,) at coordinates c (N, 3) in [-1, 1], (x, y, z) order; differentiable in c."""
        if not self.cubic:
            return sample(self.volume, c[None])[0, :, 0]
        return _CubicLookUp.apply(c, self)

    def look_up(self, c: torch.Tensor, slopes: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cubic B-spline's intensities (N,) at coordinates c (N, 3) in [-1, 1], (x, y, z) order, and with
        `slopes` their derivatives (N, 3) in c; no autograd. Outside the grid the border value holds and the slope
        across the border is 0 (a point there is looked up at the end node, where the mirror-boundary spline is flat).
        Taps and points are laid out points last, so that each product with a tap's weights runs along them. Where
        numba is installed its kernel computes the same numbers (cubic_lookup)."""
        if self.taps == RUNS and cubic_lookup.compiled(self.table, c):
            return cubic_lookup.look_up(self.table, self.shape, self.extent, c, slopes)
        scale = self.extent / 2                                                # voxels per unit of c
        index = torch.minimum((c + 1) * scale, self.extent).clamp(min=0)
        base = torch.floor(index)
        values = self._coefficients(base.long())                               # (4, 4, 4, N): z, y, x taps
        weights, derivatives = _cubic_bspline_weights((index - base).t())     # (4, 3, N): taps, x y z
        (wx, wy, wz), (dx, dy, dz) = weights.unbind(1), derivatives.unbind(1)
        along_x = _along(values, wx)                                           # (4, 4, N): z, y taps
        along_xy = _along(along_x, wy)
        value = _along(along_xy, wz)
        if not slopes:
            return value, None
        slope = torch.stack([_along(_along(_along(values, dx), wy), wz), _along(_along(along_x, dy), wz),
                             _along(along_xy, dz)], dim=1)
        return value, slope * scale

    @property
    def entries(self) -> torch.Tensor:
        """The table an entry a row (a view): the taps_z x taps_y x 4 coefficients a look-up reads together."""
        span = self.taps[0] * self.taps[1] * 4
        return self.table.as_strided(((len(self.table) - span) // self.step + 1, span), (self.step, 1))

    def _coefficients(self, voxel: torch.Tensor) -> torch.Tensor:
        """The 4 x 4 x 4 coefficients about voxel indices (N, 3) (x, y, z) as (4, 4, 4, N): z, y, x taps, then
        the points. They are gathered and transposed in a workspace kept from call to call: buffers of this size
        made afresh were mapped and page-faulted at every call (1.1 million minor faults in a chest fit, not 0.15)."""
        height = self.shape[1]
        x, y, z = voxel.unbind(1)
        taps_z, taps_y = self.taps
        z_taps = torch.arange(0, 4, taps_z, device=voxel.device)[:, None]
        y_taps = torch.arange(0, 4, taps_y, device=voxel.device)
        entry = ((z[:, None, None] + z_taps) * (height + 4 - taps_y) + y[:, None, None] + y_taps) * self.columns
        entry = (entry + x[:, None, None]).reshape(-1)
        size = 64 * len(voxel)
        if self._workspace is None or len(self._workspace) < 2 * size or self._workspace.device != voxel.device:
            self._workspace = torch.empty(2 * size, dtype=self.table.dtype, device=voxel.device)
        gathered = torch.index_select(self.entries, 0, entry, out=self._workspace[:size].view(len(entry), -1))
        values = self._workspace[size:2 * size].view(64, len(voxel))
        values.copy_(gathered.view(len(voxel), 64).t())
        return values.view(4, 4, 4, len(voxel))


class _CubicLookUp(torch.autograd.Function):
    """ImagePrior's cubic look-up as one operation: its forward pass forms the intensities and their
    derivatives in c together (ImagePrior.look_up), its backward multiplies. Autograd's own graph of the
    look-up (batched products of 4 taps and their backward) took 1.5 to 2 times as long."""

    @staticmethod
    def forward(ctx: FunctionCtx, c: torch.Tensor, prior: ImagePrior) -> torch.Tensor:
        """The intensities (N,) at c (N, 3), keeping their derivatives when c needs a gradient."""
        value, slope = prior.look_up(c, slopes=ctx.needs_input_grad[0])  # type: ignore[attr-defined]
        if slope is not None:
            ctx.save_for_backward(slope)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The gradient with respect to c (N, 3); none for the prior (frozen)."""
        slope, = ctx.saved_tensors  # type: ignore[attr-defined]  # torch's backward ctx has saved_tensors
        return grad[:, None] * slope, None


def _along(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k values[..., k, :] weights[k]: the 4 taps of values [..., 4, N] (the axis before the points) weighted
    per point by weights [4, N]."""
    total = values[..., 0, :] * weights[0]
    for k in range(1, 4):
        total.addcmul_(values[..., k, :], weights[k])
    return total


def table_bytes(shape: tuple[int, ...], element_size: int = 4) -> int:
    """Bytes of the cubic prior's coefficient table of a (D, H, W) volume of `element_size`-byte values, as laid out
    on the CPU (by numba's kernel where it is installed, else by torch's passes)."""
    kernel = cubic_lookup.reads(torch.device("cpu"), torch.float32 if element_size == 4 else torch.float64)
    return _table_bytes(shape, _layout(shape, element_size, kernel), element_size)


def _table(padded: torch.Tensor, taps: tuple[int, int]) -> torch.Tensor:
    """The table of a layout (`taps`), flat: the entry of voxel (z, y, x), the coefficients (z-1 .. z-2+taps_z,
    y-1 .. y-2+taps_y, x-1 .. x+2) of the padded coefficients (D + 3, H + 3, W + 3), one after the other; runs of 4
    are the padded coefficients themselves (each entry starts one value after the last)."""
    if taps == RUNS:
        return padded.contiguous().reshape(-1)
    return padded.unfold(0, taps[0], 1).unfold(1, taps[1], 1).unfold(2, 4, 1).contiguous().reshape(-1)


def _steps(shape: tuple[int, ...], taps: tuple[int, int]) -> tuple[int, int]:
    """Where the entries of a layout lie in its table: values from one entry to the next along x, and entries from one
    y to the next; (1, W + 3) for runs of 4, read from the padded coefficients."""
    if taps == RUNS:
        return 1, shape[2] + 3
    return taps[0] * taps[1] * 4, shape[2]


def _layout(shape: tuple[int, ...], element_size: int, kernel: bool) -> tuple[int, int]:
    """RUNS for numba's `kernel`; for torch's passes the first of LAYOUTS whose table fits TABLE_BYTES (the last if
    none does)."""
    if kernel:
        return RUNS
    return next((taps for taps in LAYOUTS if _table_bytes(shape, taps, element_size) <= TABLE_BYTES), RUNS)


def _table_bytes(shape: tuple[int, ...], taps: tuple[int, int], element_size: int) -> int:
    depth, height, width = shape
    if taps == RUNS:
        return (depth + 3) * (height + 3) * (width + 3) * element_size
    taps_z, taps_y = taps
    return (depth + 4 - taps_z) * (height + 4 - taps_y) * width * taps_z * taps_y * 4 * element_size


def _cubic_bspline_weights(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of the four taps at offsets -1, 0, 1, 2 for fractional positions f (...), and their derivatives
    in f: each (4, ...)."""
    g = 1 - f
    f2, g2 = f * f, g * g
    weights = torch.stack([g2 * g, 4 - 6 * f2 + 3 * f2 * f, 4 - 6 * g2 + 3 * g2 * g, f2 * f]) / 6
    derivatives = torch.stack([-0.5 * g2, 1.5 * f2 - 2 * f, 2 * g - 1.5 * g2, 0.5 * f2])
    return weights, derivatives


def evaluate_on_grid(prior: nn.Module, shape: tuple[int, int, int], chunk: int = 65536) -> torch.Tensor:
    """The prior at every voxel centre of a (D, H, W) grid spanning [-1, 1]^3, without gradients."""
    device = next(itertools.chain(prior.parameters(), prior.buffers()), torch.empty(0)).device
    points = identity_grid(shape, device).reshape(-1, 3)
    with torch.no_grad():
        values = torch.cat([prior(points[i:i + chunk]) for i in range(0, len(points), chunk)])
    return values.reshape(shape)
