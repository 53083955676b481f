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


class ImagePrior(nn.Module):
    """A volume [D, H, W] on the reference grid, interpolated "linear" (trilinear) or "cubic"
    (cubic B-spline). Points outside the grid take the border value.

    Cubic is the more faithful: trilinear interpolation blurs by an amount that depends on the
    sub-voxel position and its gradient jumps at voxel faces, which biases the registration
    towards whole-voxel shifts.
    """

    def __init__(self, volume: torch.Tensor, interpolation: str):
        super().__init__()
        if interpolation not in ("linear", "cubic"):
            raise ValueError(f"unknown prior interpolation {interpolation!r}: use 'linear' or 'cubic'")
        self.shape, self.cubic = tuple(volume.shape), interpolation == "cubic"
        if not self.cubic:
            self.register_buffer("volume", volume[None, None])
            return
        coefficients = ndimage.spline_filter(volume.detach().cpu().double().numpy(), order=3, mode="mirror")
        padded = torch.from_numpy(np.pad(coefficients, [(1, 2)] * 3, mode="reflect")).to(volume)
        # rows[(z, y, x)] = the 4 coefficients x-1 .. x+2 of padded row (z, y): one contiguous read per row
        self.register_buffer("rows", padded.unfold(2, 4, 1).reshape(-1, 4).contiguous())
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
        taps = torch.arange(4, device=c.device)
        row = ((z[:, None, None] + taps[:, None]) * (height + 3) + y[:, None, None] + taps) * width + x[:, None, None]
        values = self.rows.index_select(0, row.reshape(-1)).reshape(len(c), 4, 4, 4)  # z, y, x taps
        values = torch.einsum("nzyx,nx->nzy", values, weights[:, 0])
        values = torch.einsum("nzy,ny->nz", values, weights[:, 1])
        return torch.einsum("nz,nz->n", values, weights[:, 2])


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
