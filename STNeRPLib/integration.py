"""Scaling and squaring of a stationary velocity field on a grid (Arsigny 2006; paper eq. 5).

Fields are tensors [B, 3, D, H, W] whose channels are (x, y, z) displacements in
torch.grid_sample units over the grid (align_corners=True: -1 and 1 are the first and
last voxel centres). A displacement d maps a grid point c to c + d(c).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def identity_grid(shape: tuple[int, int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Coordinates [1, D, H, W, 3] (x, y, z) of the grid points of a (D, H, W) grid, in [-1, 1]."""
    axes = [torch.linspace(-1, 1, n, device=device, dtype=dtype) for n in shape]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y, z], dim=-1).unsqueeze(0)


def sample(volume: torch.Tensor, points: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Trilinear (or nearest) samples of volume [B, C, D, H, W] at points [B, N, 3] -> [B, N, C].

    Points outside the grid take the value at the nearest border.
    """
    grid = points[:, :, None, None, :]
    values = F.grid_sample(volume, grid, mode=mode, padding_mode="border", align_corners=True)
    return values[:, :, :, 0, 0].transpose(1, 2)


def compose(first: torch.Tensor, second: torch.Tensor, identity: torch.Tensor | None = None) -> torch.Tensor:
    """Displacement of c -> c + first(c) followed by x -> x + second(x): first + second(c + first).
    `identity`: identity_grid of the fields' grid, if the caller holds it."""
    if identity is None:
        identity = identity_grid(first.shape[2:], first.device, first.dtype)
    grid = identity + first.permute(0, 2, 3, 4, 1)
    moved = F.grid_sample(second, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return first + moved


def scaling_and_squaring(velocity: torch.Tensor, steps: int) -> torch.Tensor:
    """Displacement exp(v) - Id of a stationary velocity field [B, 3, D, H, W], by 2**steps composition."""
    identity = identity_grid(velocity.shape[2:], velocity.device, velocity.dtype)
    displacement = velocity / (2 ** steps)
    for _ in range(steps):
        displacement = compose(displacement, displacement, identity)
    return displacement
