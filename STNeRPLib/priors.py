"""The prior that Def-Net deforms: Ref-Net itself, or the reference image sampled trilinearly.

Both map reference-grid coordinates c in [-1, 1]^3 (N, 3) to normalised intensities (N,).
"""
from __future__ import annotations

import torch
from torch import nn

from .integration import identity_grid, sample


class ImagePrior(nn.Module):
    """A volume [D, H, W] on the reference grid, sampled trilinearly ("w/o prior" in the paper)."""

    def __init__(self, volume: torch.Tensor):
        super().__init__()
        self.register_buffer("volume", volume[None, None])

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return sample(self.volume, c[None])[0, :, 0]


def evaluate_on_grid(prior: nn.Module, shape: tuple[int, int, int], chunk: int = 65536) -> torch.Tensor:
    """The prior at every voxel centre of a (D, H, W) grid spanning [-1, 1]^3, without gradients."""
    device = next(prior.parameters(), torch.empty(0)).device
    points = identity_grid(shape, device).reshape(-1, 3)
    with torch.no_grad():
        values = torch.cat([prior(points[i:i + chunk]) for i in range(0, len(points), chunk)])
    return values.reshape(shape)
