"""Fitting Ref-Net to the reference (paper eq. 3) and Def-Net to the series (paper eq. 6)."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import nn

from .checkpoint import Checkpoint
from .deformation import Deformation
from .integration import identity_grid, sample
from .networks import RefNet
from .presets import Preset

Progress = Callable[[str, int, int, float], None]
"""progress(stage, iteration, total, loss): called after every iteration."""


class Target(NamedTuple):
    """One scan to fit: normalised time, volume [D, H, W] on the reference grid (normalised
    intensities), and the voxels inside the scan's field of view (bool [D, H, W]; None: all)."""

    time: float
    volume: torch.Tensor
    inside: torch.Tensor | None = None


def fit_reference(net: RefNet, volume: torch.Tensor, preset: Preset, progress: Progress,
                  generator: torch.Generator, checkpoint: Checkpoint | None = None) -> float:
    """Fit Ref-Net to a normalised volume [D, H, W] by MSE (Adam); returns the last loss (nan when
    the checkpoint had it fitted already). With a checkpoint, start from its state and save into it."""
    points = identity_grid(volume.shape, volume.device).reshape(-1, 3)
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

    The prior is frozen. Each iteration takes `preset.def_times` random time points (all when 0) and
    evaluates them as one batch. Returns the last loss (`preset.similarity`: mean squared error over
    the sampled voxels inside the fields of view, or 1 - LNCC over sampled windows).
    With a checkpoint, start from its state and save into it.
    """
    prior.requires_grad_(False)
    series = _Stacked.of(targets)
    if preset.similarity not in SIMILARITY:
        raise ValueError(f"unknown similarity {preset.similarity!r}: use one of {', '.join(SIMILARITY)}")
    loss_of, wanted = SIMILARITY[preset.similarity], _draws(preset)
    optimizer = torch.optim.Adam(deformation.parameters(), lr=preset.def_lr)
    schedule = _cosine(optimizer, preset.def_iterations, preset.lr_final)
    loss = torch.tensor(float("nan"))
    start = _restore(checkpoint, "defnet", ("deformation", deformation), optimizer, schedule, generator,
                     preset.def_iterations)
    for iteration in range(start + 1, preset.def_iterations + 1):
        which = _choose_times(len(series.times), preset.def_times, generator)
        voxels = series.choose_voxels(which, wanted, generator)
        loss = loss_of(deformation, prior, series, which, voxels)
        _step(optimizer, loss, schedule)
        progress("defnet", iteration, preset.def_iterations, loss.item())
        if checkpoint is not None:
            checkpoint.after("defnet", iteration, optimizer, schedule, generator)
    return loss.item()


def _draws(preset: Preset) -> int:
    """Voxels (mse) or LNCC window centres drawn per chosen time, so that about `def_points` voxels
    are looked up per time (0: every voxel)."""
    if preset.def_points <= 0 or preset.similarity != "lncc":
        return preset.def_points
    return max(preset.def_points // len(WINDOW), 1)


class _Stacked(NamedTuple):
    """The targets as one tensor: times, volumes [T, V] (V voxels each), the inside masks [T, V]
    (None when every target covers the whole grid), the grid points [V, 3] in [-1, 1] and the
    grid's shape (D, H, W)."""

    times: list[float]
    volumes: torch.Tensor
    inside: torch.Tensor | None
    points: torch.Tensor
    shape: tuple[int, int, int]

    @classmethod
    def of(cls, targets: list[Target]) -> "_Stacked":
        volumes = torch.stack([target.volume.reshape(-1) for target in targets])
        inside = None
        if any(target.inside is not None for target in targets):
            inside = torch.stack([torch.ones_like(target.volume.reshape(-1), dtype=torch.bool) if target.inside is None
                                  else target.inside.reshape(-1) for target in targets])
        points = identity_grid(targets[0].volume.shape, volumes.device).reshape(-1, 3)
        return cls([target.time for target in targets], volumes, inside, points, tuple(targets[0].volume.shape))

    def choose_voxels(self, which: list[int], wanted: int, generator: torch.Generator) -> torch.Tensor:
        """Indices [len(which), N] into the flattened volumes: `wanted` random voxels of each chosen
        target (with replacement), or all of them when wanted is 0."""
        count = self.volumes.shape[1]
        offsets = torch.tensor(which, device=self.volumes.device)[:, None] * count
        if wanted <= 0 or wanted >= count:
            return offsets + torch.arange(count, device=self.volumes.device)
        return offsets + torch.randint(count, (len(which), wanted), generator=generator).to(self.volumes.device)


def _mean_squared_error(deformation: Deformation, prior: nn.Module, series: _Stacked, which: list[int],
                        voxels: torch.Tensor) -> torch.Tensor:
    """Mean of (prior(c + u(c, t)) - f_t(c))^2 over the chosen voxels (flattened indices [T, N])
    inside their target's field of view; every chosen time in one batch."""
    predicted, observed = _predicted(deformation, prior, series, which, voxels)
    error = (predicted - observed) ** 2
    if series.inside is None:
        return error.mean()
    weight = series.inside.reshape(-1)[voxels].to(error.dtype)
    return torch.sum(weight * error) / weight.sum().clamp(min=1)


WINDOW = torch.stack(torch.meshgrid(*[torch.arange(-2, 3, 2)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
"""Offsets (dz, dy, dx) in voxels of an LNCC window around its centre: 3 x 3 x 3 voxels, 2 apart."""


def _local_ncc_loss(deformation: Deformation, prior: nn.Module, series: _Stacked, which: list[int],
                    centres: torch.Tensor) -> torch.Tensor:
    """1 - mean over windows of the squared normalised cross-correlation of prior(c + u(c, t)) and
    f_t(c) (LNCC), over WINDOW around each chosen centre (flattened indices [T, N]; windows clipped at
    the grid's faces); windows reaching outside their target's field of view do not count."""
    voxels = _windows(centres, series.shape)                                      # [T, N, W]
    predicted, observed = _predicted(deformation, prior, series, which, voxels.reshape(len(which), -1))
    predicted, observed = predicted.reshape(voxels.shape), observed.reshape(voxels.shape)
    p = predicted - predicted.mean(dim=-1, keepdim=True)
    f = observed - observed.mean(dim=-1, keepdim=True)
    ncc2 = (p * f).sum(-1) ** 2 / ((p * p).sum(-1) * (f * f).sum(-1) + 1e-5)
    if series.inside is None:
        return 1 - ncc2.mean()
    weight = series.inside.reshape(-1)[voxels].all(dim=-1).to(ncc2.dtype)
    return 1 - torch.sum(weight * ncc2) / weight.sum().clamp(min=1)


def _windows(centres: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Flattened voxel indices [..., W] of the LNCC window around each flattened index `centres`."""
    count = shape[0] * shape[1] * shape[2]
    target, voxel = centres // count, centres % count
    zyx = torch.stack([voxel // (shape[1] * shape[2]), voxel // shape[2] % shape[1], voxel % shape[2]], dim=-1)
    high = torch.tensor(shape, device=centres.device) - 1
    moved = torch.minimum((zyx[..., None, :] + WINDOW.to(centres.device)).clamp(min=0), high)
    return target[..., None] * count + (moved[..., 0] * shape[1] + moved[..., 1]) * shape[2] + moved[..., 2]


def _predicted(deformation: Deformation, prior: nn.Module, series: _Stacked, which: list[int],
               voxels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """prior(c + u(c, t)) and f_t(c) at the chosen voxels (flattened indices [T, N]), every time of
    `which` in one batch."""
    c = series.points[voxels % series.volumes.shape[1]]                            # [T, N, 3]
    u = sample(deformation.displacement([series.times[i] for i in which]), c)      # [T, N, 3]
    predicted = prior((c + u).reshape(-1, 3)).reshape(voxels.shape)
    return predicted, series.volumes.reshape(-1)[voxels]


SIMILARITY = {"mse": _mean_squared_error, "lncc": _local_ncc_loss}


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
