"""The prior that Def-Net deforms: Ref-Net itself, or a volume on the reference grid (the
reference image, or Ref-Net's rendering) sampled by trilinear or cubic B-spline interpolation.

Every prior maps reference-grid coordinates c in [-1, 1]^3 (N, 3) to normalised intensities (N,).
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from .integration import identity_grid, sample

TABLE_BYTES = 256 * 2 ** 20
"""The most memory the cubic prior's coefficient table may take. Its entries are the contiguous
coefficients a look-up reads: a 4 x 4 x 4 cube per voxel while that fits (one read of 256 bytes per point),
else a 4 x 4 (y, x) block (4 reads of 64 bytes: a 2.4-million-voxel reference, the benchmark's 1.5 mm chest,
takes 151 MB), else a run of 4 along x (16 reads; a 512 x 512 x 300 CT: 1.3 GB instead of 5 GB)."""

LAYOUTS = ((4, 4), (1, 4), (1, 1))
"""The (z, y) taps of an entry of the cubic table, in order of preference (4 x taps each)."""


class ImagePrior(nn.Module):
    """A volume [D, H, W] on the reference grid, interpolated "linear" (trilinear) or "cubic"
    (cubic B-spline). Points outside the grid take the border value.

    Cubic is the more faithful: trilinear interpolation blurs by an amount that depends on the
    sub-voxel position and its gradient jumps at voxel faces, which biases the registration
    towards whole-voxel shifts.

    The cubic look-up reads 4 x 4 x 4 B-spline coefficients per point from a table whose entries are
    contiguous runs of them (`LAYOUTS`: the largest that fits TABLE_BYTES). Every layout gives the same
    numbers; training is bound by these reads' cache misses, fewer the longer the runs.
    """

    volume: torch.Tensor
    entries: torch.Tensor
    extent: torch.Tensor

    def __init__(self, volume: torch.Tensor, interpolation: str) -> None:
        super().__init__()
        if interpolation not in ("linear", "cubic"):
            raise ValueError(f"unknown prior interpolation {interpolation!r}: use 'linear' or 'cubic'")
        self.shape, self.cubic = tuple(volume.shape), interpolation == "cubic"
        if not self.cubic:
            self.register_buffer("volume", volume[None, None])
            return
        coefficients = ndimage.spline_filter(volume.detach().cpu().double().numpy(), order=3, mode="mirror")
        padded = torch.from_numpy(np.pad(coefficients, [(1, 2)] * 3, mode="reflect")).to(volume)
        self.taps = _layout(self.shape, padded.element_size())
        # entries[(z, y, x)] = the coefficients (z-1 .. z-2+taps_z, y-1 .. y-2+taps_y, x-1 .. x+2) of `padded`
        entries = padded.unfold(0, self.taps[0], 1).unfold(1, self.taps[1], 1).unfold(2, 4, 1)
        self.register_buffer("entries", entries.reshape(-1, self.taps[0] * self.taps[1] * 4).contiguous(),
                             persistent=False)
        self.register_buffer("extent", torch.tensor(self.shape[::-1], dtype=volume.dtype) - 1)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """Intensities (N,) at coordinates c (N, 3) in [-1, 1], (x, y, z) order; differentiable in c."""
        if not self.cubic:
            return sample(self.volume, c[None])[0, :, 0]
        _, height, width = self.shape
        index = torch.minimum((c + 1) / 2 * self.extent, self.extent).clamp(min=0)
        base = torch.floor(index)
        weights = _cubic_bspline_weights(index - base)  # (N, 3, 4): x, y, z taps
        x, y, z = base.long().unbind(1)
        taps_z, taps_y = self.taps
        z_taps = torch.arange(0, 4, taps_z, device=c.device)[:, None]
        y_taps = torch.arange(0, 4, taps_y, device=c.device)
        entry = ((z[:, None, None] + z_taps) * (height + 4 - taps_y) + y[:, None, None] + y_taps) * width
        entry = entry + x[:, None, None]
        values = self.entries.index_select(0, entry.reshape(-1)).reshape(len(c), 4, 4, 4)  # z, y, x taps
        values = torch.einsum("nzyx,nx->nzy", values, weights[:, 0])
        values = torch.einsum("nzy,ny->nz", values, weights[:, 1])
        return torch.einsum("nz,nz->n", values, weights[:, 2])


def table_bytes(shape: tuple[int, ...], element_size: int = 4) -> int:
    """Bytes of the cubic prior's coefficient table of a (D, H, W) volume of `element_size`-byte values, as laid out."""
    return _table_bytes(shape, _layout(shape, element_size), element_size)


def _layout(shape: tuple[int, ...], element_size: int) -> tuple[int, int]:
    """The first of LAYOUTS whose table fits TABLE_BYTES (the last if none does)."""
    return next((taps for taps in LAYOUTS if _table_bytes(shape, taps, element_size) <= TABLE_BYTES), LAYOUTS[-1])


def _table_bytes(shape: tuple[int, ...], taps: tuple[int, int], element_size: int) -> int:
    depth, height, width = shape
    taps_z, taps_y = taps
    return (depth + 4 - taps_z) * (height + 4 - taps_y) * width * taps_z * taps_y * 4 * element_size


def _cubic_bspline_weights(f: torch.Tensor) -> torch.Tensor:
    """Weights of the four taps at offsets -1, 0, 1, 2 for fractional positions f (...) -> (..., 4)."""
    g = 1 - f
    return torch.stack([g ** 3, 4 - 6 * f ** 2 + 3 * f ** 3, 4 - 6 * g ** 2 + 3 * g ** 3, f ** 3], dim=-1) / 6


def evaluate_on_grid(prior: nn.Module, shape: tuple[int, int, int], chunk: int = 65536) -> torch.Tensor:
    """The prior at every voxel centre of a (D, H, W) grid spanning [-1, 1]^3, without gradients."""
    device = next(itertools.chain(prior.parameters(), prior.buffers()), torch.empty(0)).device
    points = identity_grid(shape, device).reshape(-1, 3)
    with torch.no_grad():
        values = torch.cat([prior(points[i:i + chunk]) for i in range(0, len(points), chunk)])
    return values.reshape(shape)
