"""Scaling and squaring of a stationary velocity field on a grid (Arsigny 2006; paper eq. 5), and the
cubic B-spline refinement of the resulting displacement (`refine`).

Fields are tensors [B, 3, D, H, W] whose channels are (x, y, z) displacements in
torch.grid_sample units over the grid (align_corners=True: -1 and 1 are the first and
last voxel centres). A displacement d maps a grid point c to c + d(c).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from . import trilinear


def identity_grid(shape: tuple[int, ...], device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Coordinates [1, D, H, W, 3] (x, y, z) of the grid points of a (D, H, W) grid, in [-1, 1]."""
    axes = [torch.linspace(-1, 1, n, device=device, dtype=dtype) for n in shape]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y, z], dim=-1).unsqueeze(0)


class GridPoints:
    """The identity_grid coordinates of a (D, H, W) grid, [-1, 1] (x, y, z), looked up by flat voxel
    index without holding the whole grid (12 bytes per voxel): the same numbers as
    identity_grid(shape).reshape(-1, 3)[index]."""

    def __init__(self, shape: tuple[int, int, int], device: torch.device) -> None:
        self.shape = tuple(shape)
        self.count = self.shape[0] * self.shape[1] * self.shape[2]
        self.axes = [torch.linspace(-1, 1, n, device=device) for n in self.shape]   # z, y, x

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        _, height, width = self.shape
        z, y, x = index // (height * width), index // width % height, index % width
        return torch.stack([self.axes[2][x], self.axes[1][y], self.axes[0][z]], dim=-1)

    def slices(self, z_start: int, z_stop: int) -> torch.Tensor:
        """The coordinates [N, 3] of every voxel of slices z_start..z_stop, in array (z, y, x) order (those
        of their flat indices, without the index arithmetic)."""
        z, y, x = torch.meshgrid(self.axes[0][z_start:z_stop], self.axes[1], self.axes[2], indexing="ij")
        return torch.stack([x, y, z], dim=-1).reshape(-1, 3)


def sample(volume: torch.Tensor, points: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Trilinear (or nearest) samples of volume [B, C, D, H, W] at points [B, N, 3] -> [B, N, C].

    Points outside the grid take the value at the nearest border. Torch's 3-D grid_sample shares out
    the batch, never one batch's points, among its CPU threads; so many points of one batch, without
    autograd (the outputs), are sampled as one batch per thread: the same values, each point's alone.
    """
    pieces = _pieces(volume, points)
    if pieces > 1:
        count = points.shape[1]
        padded = F.pad(points, (0, 0, 0, -count % pieces))
        values = sample(volume.expand(pieces, -1, -1, -1, -1), padded.reshape(pieces, -1, 3), mode)
        return values.reshape(1, -1, values.shape[2])[:, :count]
    grid = points[:, :, None, None, :]
    values = (trilinear.grid_sample(volume, grid) if mode == "bilinear" else
              F.grid_sample(volume, grid, mode=mode, padding_mode="border", align_corners=True))
    return values[:, :, :, 0, 0].transpose(1, 2)


PARALLEL_POINTS = 1 << 16
"""Fewest points of one batch that `sample` shares out among torch's threads."""


def _pieces(volume: torch.Tensor, points: torch.Tensor) -> int:
    """Batches `sample` splits one batch of points into: one per torch thread for PARALLEL_POINTS or more
    points on the CPU without autograd, else 1."""
    if points.shape[1] < PARALLEL_POINTS or volume.shape[0] != 1 or points.shape[0] != 1 \
            or points.device.type != "cpu":
        return 1                        # checked first: training's calls end here
    if torch.is_grad_enabled() and (volume.requires_grad or points.requires_grad):
        return 1
    return torch.get_num_threads()


def compose(first: torch.Tensor, second: torch.Tensor, identity: torch.Tensor | None = None) -> torch.Tensor:
    """Displacement of c -> c + first(c) followed by x -> x + second(x): first + second(c + first).
    `identity`: identity_grid of the fields' grid, if the caller holds it."""
    if identity is None:
        identity = identity_grid(first.shape[2:], first.device, first.dtype)
    grid = identity + first.permute(0, 2, 3, 4, 1)
    moved = trilinear.grid_sample(second, grid)
    return first + moved


def scaling_and_squaring(velocity: torch.Tensor, steps: int) -> torch.Tensor:
    """Displacement exp(v) - Id of a stationary velocity field [B, 3, D, H, W], by 2**steps composition."""
    identity = identity_grid(velocity.shape[2:], velocity.device, velocity.dtype)
    displacement = velocity / (2 ** steps)
    for _ in range(steps):
        displacement = compose(displacement, displacement, identity)
    return displacement


def refine(field: torch.Tensor, factor: int) -> torch.Tensor:
    """The cubic B-spline through the nodes of a field [B, C, D, H, W] (interpolating: the node values
    prefiltered; mirror boundary), evaluated at `factor` times finer nodes: (n - 1) factor + 1 per axis,
    spanning the same extent, the old nodes among them. A field refined then interpolated trilinearly
    follows the cubic spline to within (spacing / factor)^2 / 8 of its second derivative."""
    if factor == 1:
        return field
    depth, height, width = field.shape[2:]
    along_z, along_y, along_x = (torch.as_tensor(_refinement_matrix(n, factor), dtype=field.dtype, device=field.device)
                                 for n in (depth, height, width))
    field = along_y @ (field @ along_x.T)                                 # [B, C, D, H', W'], contiguous
    batch, plane = field.shape[:2], field.shape[3:]
    return (along_z @ field.reshape(*batch, depth, -1)).reshape(*batch, -1, *plane)


@lru_cache(maxsize=64)
def _refinement_matrix(n: int, factor: int) -> np.ndarray:
    """((n - 1) factor + 1, n): the interpolating cubic B-spline (mirror boundary) of n node values at the
    refined nodes; column j is the spline through the j-th unit vector."""
    at = np.arange((n - 1) * factor + 1)[None] / factor
    return np.stack([ndimage.map_coordinates(unit, at, order=3, mode="mirror") for unit in np.eye(n)], axis=1)
