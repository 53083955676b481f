"""Fitting Ref-Net to the reference (paper eq. 3) and Def-Net to the series (paper eq. 6)."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from .checkpoint import Checkpoint
from .deformation import Deformation
from .integration import sample
from .networks import RefNet
from .preprocessing import IntensityWindow
from .presets import Preset

Progress = Callable[[str, int, int, float], None]
"""progress(stage, iteration, total, loss): called after every iteration."""


class Target(NamedTuple):
    """One scan to fit: normalised time, the scan on the reference grid (in its own units and pixel
    type, normalised by `window` only where sampled: no normalised copy of the series is held), and
    the voxels inside the scan's field of view (bool [D, H, W]; None: all)."""

    time: float
    scan: sitk.Image
    window: IntensityWindow
    inside: np.ndarray | None = None

    def values(self, index: torch.Tensor) -> torch.Tensor:
        """Normalised intensities at flat voxel indices (the same numbers as normalising it whole)."""
        voxels = sitk.GetArrayViewFromImage(self.scan).reshape(-1)[index.cpu().numpy()]
        return torch.from_numpy(self.window.normalise(voxels)).to(index.device)

    def weight(self, index: torch.Tensor) -> torch.Tensor:
        """1 at flat voxel indices inside the field of view, 0 outside (float32)."""
        if self.inside is None:
            return torch.ones(index.shape, device=index.device)
        return torch.from_numpy(self.inside.reshape(-1)[index.cpu().numpy()].astype(np.float32)).to(index.device)


def fit_reference(net: RefNet, volume: torch.Tensor, preset: Preset, progress: Progress,
                  generator: torch.Generator, checkpoint: Checkpoint | None = None) -> float:
    """Fit Ref-Net to a normalised volume [D, H, W] by MSE (Adam); returns the last loss (nan when
    the checkpoint had it fitted already). With a checkpoint, start from its state and save into it."""
    points = GridPoints(volume.shape, volume.device)
    values = volume.reshape(-1)
    optimizer = torch.optim.Adam(net.parameters(), lr=preset.ref_lr)
    schedule = _cosine(optimizer, preset.ref_iterations, preset.lr_final)
    loss = torch.tensor(float("nan"))
    start = _restore(checkpoint, "refnet", ("ref_net", net), optimizer, schedule, generator, preset.ref_iterations)
    for iteration in range(start + 1, preset.ref_iterations + 1):
        chosen = _choose(len(values), preset.ref_points, generator, volume.device)
        loss = torch.mean((net(points[chosen]) - values[chosen]) ** 2)
        _step(optimizer, loss, schedule)
        progress("refnet", iteration, preset.ref_iterations, loss.item())
        if checkpoint is not None:
            checkpoint.after("refnet", iteration, optimizer, schedule, generator)
    return loss.item()


def fit_deformation(deformation: Deformation, prior: nn.Module, targets: list[Target], preset: Preset,
                    progress: Progress, generator: torch.Generator, checkpoint: Checkpoint | None = None) -> float:
    """Fit Def-Net so that prior(c + u(c, t)) matches every target f_t(c) (paper eq. 6), over the
    voxels inside each target's field of view.

    The prior is frozen. Each iteration takes `preset.def_times` random time points (all when 0).
    Returns the last loss (mean squared error over the sampled voxels inside the fields of view).
    With a checkpoint, start from its state and save into it.
    """
    prior.requires_grad_(False)
    times = [target.time for target in targets]
    device = next(deformation.parameters()).device
    points = GridPoints(sitk.GetArrayViewFromImage(targets[0].scan).shape, device)
    count = points.count
    optimizer = torch.optim.Adam(deformation.parameters(), lr=preset.def_lr)
    schedule = _cosine(optimizer, preset.def_iterations, preset.lr_final)
    loss = torch.tensor(float("nan"))
    start = _restore(checkpoint, "defnet", ("deformation", deformation), optimizer, schedule, generator,
                     preset.def_iterations)
    for iteration in range(start + 1, preset.def_iterations + 1):
        which = _choose_times(len(times), preset.def_times, generator)
        chosen = torch.stack([_choose(count, preset.def_points, generator, device) for _ in which])
        c = points[chosen]                                                # [T, N, 3]
        u = sample(deformation.displacement([times[i] for i in which]), c)  # [T, N, 3]
        predicted = prior((c + u).reshape(-1, 3)).reshape(c.shape[:2])
        weight = torch.stack([targets[i].weight(chosen[k]) for k, i in enumerate(which)])
        actual = torch.stack([targets[i].values(chosen[k]) for k, i in enumerate(which)])
        error = (predicted - actual) ** 2
        loss = torch.sum(weight * error) / weight.sum().clamp(min=1)
        _step(optimizer, loss, schedule)
        progress("defnet", iteration, preset.def_iterations, loss.item())
        if checkpoint is not None:
            checkpoint.after("defnet", iteration, optimizer, schedule, generator)
    return loss.item()


class GridPoints:
    """The identity_grid coordinates of a (D, H, W) grid, [-1, 1] (x, y, z), looked up by flat voxel
    index without holding the whole grid (12 bytes per voxel): the same numbers as
    identity_grid(shape).reshape(-1, 3)[index]."""

    def __init__(self, shape: tuple[int, int, int], device):
        self.shape = tuple(shape)
        self.count = self.shape[0] * self.shape[1] * self.shape[2]
        self.axes = [torch.linspace(-1, 1, n, device=device) for n in self.shape]   # z, y, x

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        _, height, width = self.shape
        z, y, x = index // (height * width), index // width % height, index % width
        return torch.stack([self.axes[2][x], self.axes[1][y], self.axes[0][z]], dim=-1)


def _restore(checkpoint: Checkpoint | None, stage: str, module, optimizer, schedule, generator,
             total: int) -> int:
    """The last iteration of `stage` already done (0 without a checkpoint)."""
    if checkpoint is None:
        return 0
    return checkpoint.restore(stage, module, optimizer, schedule, generator, total)


def _choose(count: int, wanted: int, generator: torch.Generator, device) -> torch.Tensor:
    """`wanted` random voxel indices (with replacement), or every index when wanted is 0."""
    if wanted <= 0 or wanted >= count:
        return torch.arange(count, device=device)
    return torch.randint(count, (wanted,), generator=generator).to(device)


def _choose_times(count: int, wanted: int, generator: torch.Generator) -> list[int]:
    """`wanted` distinct random time indices of `count`, or every index when wanted is 0."""
    if wanted <= 0 or wanted >= count:
        return list(range(count))
    return torch.randperm(count, generator=generator)[:wanted].tolist()


def _cosine(optimizer: torch.optim.Optimizer, iterations: int,
            final: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay of the learning rate from its initial value to `final` times it at the last step."""
    def factor(step: int) -> float:
        progress = min(step / max(iterations - 1, 1), 1.0)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor,
          schedule: torch.optim.lr_scheduler.LambdaLR) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
