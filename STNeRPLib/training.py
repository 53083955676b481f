"""Fitting Ref-Net to the reference (paper eq. 3) and Def-Net to the series (paper eq. 6)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .deformation import Deformation
from .integration import identity_grid, sample
from .networks import RefNet
from .presets import Preset

Progress = Callable[[str, int, int, float], None]
"""progress(stage, iteration, total, loss): called after every iteration."""


def fit_reference(net: RefNet, volume: torch.Tensor, preset: Preset, progress: Progress,
                  generator: torch.Generator) -> float:
    """Fit Ref-Net to a normalised volume [D, H, W] by MSE (Adam); returns the last loss."""
    points = identity_grid(volume.shape, volume.device).reshape(-1, 3)
    values = volume.reshape(-1)
    optimizer = torch.optim.Adam(net.parameters(), lr=preset.ref_lr)
    loss = torch.tensor(float("nan"))
    for iteration in range(1, preset.ref_iterations + 1):
        chosen = _choose(len(values), preset.ref_points, generator, volume.device)
        loss = torch.mean((net(points[chosen]) - values[chosen]) ** 2)
        _step(optimizer, loss)
        progress("refnet", iteration, preset.ref_iterations, loss.item())
    return loss.item()


def fit_deformation(deformation: Deformation, prior: nn.Module,
                    targets: list[tuple[float, torch.Tensor]], preset: Preset,
                    progress: Progress, generator: torch.Generator) -> float:
    """Fit Def-Net so that prior(c + u(c, t)) matches every target f_t(c) (paper eq. 6).

    targets: (normalised time, volume [D, H, W] on the reference grid, normalised intensities).
    The prior is frozen. Returns the last loss (mean squared error over all sampled voxels).
    """
    prior.requires_grad_(False)
    times = [t for t, _ in targets]
    volumes = torch.stack([v.reshape(-1) for _, v in targets])
    shape = targets[0][1].shape
    points = identity_grid(shape, volumes.device).reshape(-1, 3)
    optimizer = torch.optim.Adam(deformation.parameters(), lr=preset.def_lr)
    loss = torch.tensor(float("nan"))
    for iteration in range(1, preset.def_iterations + 1):
        chosen = torch.stack([_choose(volumes.shape[1], preset.def_points, generator, volumes.device)
                              for _ in times])
        c = points[chosen]                                   # [T, N, 3]
        u = sample(deformation.displacement(times), c)       # [T, N, 3]
        predicted = prior((c + u).reshape(-1, 3)).reshape(c.shape[:2])
        loss = torch.mean((predicted - torch.gather(volumes, 1, chosen)) ** 2)
        _step(optimizer, loss)
        progress("defnet", iteration, preset.def_iterations, loss.item())
    return loss.item()


def _choose(count: int, wanted: int, generator: torch.Generator, device) -> torch.Tensor:
    """`wanted` random voxel indices (with replacement), or every index when wanted is 0."""
    if wanted <= 0 or wanted >= count:
        return torch.arange(count, device=device)
    return torch.randint(count, (wanted,), generator=generator).to(device)


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
