"""Fitting Ref-Net to the reference (paper eq. 3) and Def-Net to the series (paper eq. 6)."""
from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any, Callable, NamedTuple, cast

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from .averaging import WeightAverage
from .checkpoint import Checkpoint
from .deformation import Deformation
from .integration import GridPoints, sample
from .networks import RefNet
from .optimizer import Adam
from .preprocessing import Calibration, IntensityWindow
from .presets import CHARBONNIER_EPSILON, LEVEL_GAIN, LEVEL_GAIN_TRILINEAR, LEVEL_TRIAL, Preset
from .sampling import OwnVoxels
from .schedule import DecaySchedule

Progress = Callable[[str, int, int, float], None]
"""progress(stage, iteration, total, loss): called after every iteration."""
LossFunction = Callable[[Deformation, nn.Module, "_Series", list[int], torch.Tensor, int],
                        tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
"""loss(deformation, prior, series, which, voxels, levels): Def-Net's loss over the drawn times and
voxels with the first `levels` velocity levels, (detached) its value at each drawn time, and (detached)
the residual prior(c + u(c, t)) - f_t(c) at each drawn voxel [T, N] (None for a loss over windows)."""


class Target(NamedTuple):
    """One scan to fit: normalised time, the scan on the reference grid (in its own units and pixel
    type, normalised by `window` only where sampled: no normalised copy of the series is held), the
    voxels inside the scan's field of view (bool [D, H, W]; None: all), the calibration of its CT
    numbers onto the reference's, applied where sampled (None: as scanned), and for a follow-up resampled onto the
    reference grid (on a grid of its own, or pre-aligned), that scan as acquired (OwnVoxels: then the voxels drawn for
    it, and the flat indices the methods below take, are its own grid's; the copy on the reference grid and `inside`
    give the body to draw from)."""

    time: float
    scan: sitk.Image
    window: IntensityWindow
    inside: np.ndarray | None = None
    calibration: Calibration | None = None
    own: OwnVoxels | None = None

    def values(self, index: torch.Tensor) -> torch.Tensor:
        """Normalised intensities at flat voxel indices (the same numbers as normalising it whole)."""
        flat = index.cpu().numpy()
        voxels = sitk.GetArrayViewFromImage(self.scan if self.own is None else self.own.scan).reshape(-1)[flat]
        if self.calibration is not None:
            voxels = (self.calibration.corrected(voxels, flat) if self.own is None
                      else self.calibration.corrected_at(voxels, self.own.at(flat)))
        return torch.from_numpy(self.window.normalise(voxels)).to(index.device)

    def weight(self, index: torch.Tensor) -> torch.Tensor:
        """1 at flat voxel indices inside the field of view, 0 outside (float32)."""
        inside = self.inside if self.own is None else self.own.inside
        if inside is None:
            return torch.ones(index.shape, device=index.device)
        return torch.from_numpy(inside.reshape(-1)[index.cpu().numpy()].astype(np.float32)).to(index.device)

    def points(self, index: torch.Tensor, grid: GridPoints) -> torch.Tensor:
        """The unit coordinates [N, 3] (x, y, z in [-1, 1] of the reference grid, `grid`) of the voxels at flat
        indices: the reference grid's, or the follow-up's own voxels' where they lie (through its pre-alignment)."""
        if self.own is None:
            return grid[index]
        unit = 2 * self.own.at(index.cpu().numpy()) / self.own.reference.unit_scale() - 1
        return torch.from_numpy(unit).to(index.device, grid.axes[0].dtype)


def fit_reference(net: RefNet, volume: torch.Tensor, preset: Preset, progress: Progress,
                  generator: torch.Generator, checkpoint: Checkpoint | None = None) -> float:
    """Fit Ref-Net to a normalised volume [D, H, W] by MSE (Adam); returns the last loss (nan when
    the checkpoint had it fitted already). With a checkpoint, start from its state and save into it."""
    points = GridPoints(cast("tuple[int, int, int]", volume.shape), volume.device)
    values = volume.reshape(-1)
    optimizer = Adam(net.parameters(), lr=preset.ref_lr)
    schedule = DecaySchedule(optimizer, preset.ref_iterations, preset.lr_final)
    loss = torch.tensor(float("nan"))
    start = _restore(checkpoint, "refnet", {"ref_net": net}, optimizer, schedule, generator, preset.ref_iterations)
    for iteration in range(start + 1, preset.ref_iterations + 1):
        chosen = _choose(len(values), preset.ref_points, generator, volume.device)
        loss = torch.mean((net(points[chosen]) - values[chosen]) ** 2)
        _step(optimizer, loss, schedule)
        progress("refnet", iteration, preset.ref_iterations, loss.item())
        if checkpoint is not None:
            checkpoint.after("refnet", iteration, optimizer, schedule, generator)
    return loss.item()


def fit_deformation(deformation: Deformation, prior: nn.Module, targets: list[Target], preset: Preset,
                    progress: Progress, generator: torch.Generator, checkpoint: Checkpoint | None = None,
                    message: Callable[[str], None] = lambda text: None, bands: list[np.ndarray] | None = None,
                    body: np.ndarray | None = None) -> float:
    """Fit Def-Net so that prior(c + u(c, t)) matches every target f_t(c) (paper eq. 6), over the
    voxels inside each target's field of view.

    The prior is frozen. Each iteration takes `preset.def_times` random time points (all when 0) and
    evaluates them as one batch, through the velocity levels switched on by then
    (Preset.level_iteration) and kept: with `preset.adaptive_levels` each finer level is kept or
    dropped at Preset.level_decision (_try_level) on the mean squared error with and without it over the
    uniformly drawn voxels, whatever the training loss (the bar is calibrated on it), and `message`
    receives the decision in words. With `bands` (sampling.structure_bands of the reference segmentation)
    and `preset.structure_points`, that fraction of each time's voxels is drawn from the bands. With `body`
    (sampling.body_voxels), the other draws come from those voxels only, as densely as over the grid. With
    `preset.stop_on_convergence`, def_iterations is the most: the fit ends `decay_iterations` after the
    loss stops improving (schedule.DecaySchedule), and progress reports the new total from then on.
    With `preset.average_last`, Def-Net ends with its weights averaged over the fit's last iterations
    (averaging.WeightAverage). Returns the last iteration's loss (`preset.similarity`: the mean squared
    error or Charbonnier penalty over the sampled voxels inside the fields of view, or 1 - LNCC over
    sampled windows). With a checkpoint, start from its state and save into it.
    """
    prior.requires_grad_(False)
    if preset.similarity not in SIMILARITY:
        raise ValueError(f"unknown similarity {preset.similarity!r}: use one of {', '.join(SIMILARITY)}")
    loss_of, wanted = SIMILARITY[preset.similarity], _draws(preset)
    series = _Series.of(targets, next(deformation.parameters()).device, bands,
                        int(round(preset.structure_points * wanted)) if wanted > 0 else 0, body)
    optimizer = _deformation_optimizer(deformation, preset)
    schedule = _deformation_schedule(optimizer, preset)
    loss = torch.tensor(float("nan"))
    average = WeightAverage(deformation)
    iteration = _restore(checkpoint, "defnet", {"deformation": deformation, "weight_average": average}, optimizer,
                         schedule, generator, preset.def_iterations)
    if preset.adaptive_levels:
        _warn_of_short_trials(preset, message)
    while iteration < schedule.end:
        iteration += 1
        which = _choose_times(len(series.times), preset.def_times, generator)
        voxels = series.choose_voxels(which, wanted, generator)
        levels = sum(iteration >= preset.level_iteration(level) for level in range(preset.velocity_levels))
        loss, per_time, residual = loss_of(deformation, prior, series, which, voxels, levels)
        if preset.adaptive_levels:
            uniform = voxels[:, series.band_draws:]
            squared = None if residual is None else _masked_mean(residual[:, series.band_draws:] ** 2, series, which,
                                                                 uniform)[0]
            _weigh_level(deformation, prior, series, _mean_squared_error, preset, iteration, (which, uniform, levels),
                         squared)
        schedule.observe(iteration, which, per_time)
        _step(optimizer, loss, schedule)
        if preset.adaptive_levels:
            _try_level(deformation, preset, iteration, message)
        if iteration > (1 - preset.average_last) * schedule.end:
            average.add()
        progress("defnet", iteration, schedule.end, loss.item())
        if checkpoint is not None:
            checkpoint.after("defnet", iteration, optimizer, schedule, generator)
    average.load_into_module()
    return loss.item()


def _deformation_optimizer(deformation: Deformation, preset: Preset) -> Adam:
    """Adam over Def-Net(s) at def_lr, the finer velocity levels' at level_lr_scale x def_lr."""
    finer = list(deformation.finer.parameters())
    groups: list[dict[str, Any]] = [{"params": list(deformation.nets.parameters())}]
    if finer:
        groups.append({"params": finer, "lr": preset.level_lr_scale * preset.def_lr})
    return Adam(groups, lr=preset.def_lr)


def _deformation_schedule(optimizer: Adam, preset: Preset) -> DecaySchedule:
    """Def-Net's learning rate: constant for lr_hold of def_iterations, then a cosine decay over the rest; or with
    stop_on_convergence constant until a plateau (looked for once the finest velocity level is on), then the decay."""
    decay = preset.decay_iterations if preset.stop_on_convergence else None
    return DecaySchedule(optimizer, preset.def_iterations, preset.lr_final, decay=decay,
                         earliest=preset.levels_settled(), hold=int(round(preset.lr_hold * preset.def_iterations)))


def _trial_level(deformation: Deformation, preset: Preset, iteration: int) -> int | None:
    """The finer level (>= 1, still kept) whose trial window (Preset.level_window) holds `iteration`."""
    return next((level for level in range(1, deformation.kept) if iteration in preset.level_window(level)), None)


def _weigh_level(deformation: Deformation, prior: nn.Module, series: "_Series", measure: LossFunction, preset: Preset,
                 iteration: int, drawn: tuple[list[int], torch.Tensor, int], loss: torch.Tensor | None) -> None:
    """Inside a finer level's trial window, add `measure` (the decision's loss function) of this iteration's
    drawn times and voxels with the level (`loss`: taken from the training pass's residuals where it has
    them; None: evaluated here) and without it (no gradient) to the level's trial sums."""
    level = _trial_level(deformation, preset, iteration)
    which, voxels, levels = drawn
    if level is None or levels != level + 1:
        return
    with torch.no_grad():
        if loss is None:
            loss = measure(deformation, prior, series, which, voxels, levels)[0]
        without = measure(deformation, prior, series, which, voxels, level)[0]
    deformation.add_trial_losses(level, loss.item(), without.item())


def _warn_of_short_trials(preset: Preset, message: Callable[[str], None]) -> None:
    """Say, for each finer level a fit this short tries for fewer than LEVEL_TRIAL iterations, that its ratio is
    not the one the bar was set on, and how many iterations would give it the whole trial."""
    for level in range(1, preset.velocity_levels):
        trial = preset.level_trial(level)
        if trial < LEVEL_TRIAL:
            enough = next(n for n in itertools.count(preset.def_iterations)
                          if replace(preset, def_iterations=n).level_trial(level) >= LEVEL_TRIAL)
            message(f"warning: with {preset.def_iterations} Def-Net iterations velocity level {level + 1} is tried for "
                    f"{trial}, not {LEVEL_TRIAL}: a level the series needs may be dropped (give at least {enough})")


def _try_level(deformation: Deformation, preset: Preset, iteration: int, message: Callable[[str], None]) -> None:
    """At the end of a finer level's trial (Preset.level_decision), drop it and every finer level unless
    its summed training loss over the trial's window is at or below keep_below(preset) of the same sum
    without it; say which, with the ratio, to `message`."""
    level = next((level for level in range(1, deformation.kept) if preset.level_decision(level) == iteration), None)
    if level is None:
        return
    ratio, bar = deformation.record_trial(level), keep_below(preset)
    kept = ratio <= bar
    if not kept:
        deformation.keep_levels(level)
    message(f"velocity level {level + 1} at Def-Net iteration {iteration}: the loss with it is {ratio:.3f} x "
            f"the loss without it (kept below {bar:.2f}): " + ("kept" if kept else "dropped"))


def keep_below(preset: Preset) -> float:
    """The adaptive rule's bar: a finer level whose trial gave summed loss with it / without it at or
    below this is kept (1 - LEVEL_GAIN, or 1 - LEVEL_GAIN_TRILINEAR when the preset's displacement is
    trilinear between the velocity nodes); run.json records it beside the ratios."""
    return 1 - (LEVEL_GAIN if preset.displacement_spacing > 0 else LEVEL_GAIN_TRILINEAR)


def _draws(preset: Preset) -> int:
    """Voxels (mse) or LNCC window centres drawn per chosen time, so that about `def_points` voxels
    are looked up per time (0: every voxel)."""
    if preset.def_points <= 0 or preset.similarity != "lncc":
        return preset.def_points
    return max(preset.def_points // len(WINDOW), 1)


class _Series(NamedTuple):
    """The targets as the training reads them: normalised times, the targets (raw scans, normalised
    where sampled: no stacked or normalised copy of the series), the grid points looked up by index,
    the grid's shape (D, H, W), whether any target has a field of view smaller than the grid, and the
    structure bands (flat voxel indices per structure, sampling.structure_bands) with how many of each
    time's drawn voxels come from them (Preset.structure_points; 0 without a segmentation)."""

    times: list[float]
    targets: list[Target]
    points: GridPoints
    shape: tuple[int, int, int]
    partial: bool
    bands: tuple[torch.Tensor, ...] = ()
    band_draws: int = 0
    body: torch.Tensor | None = None

    @classmethod
    def of(cls, targets: list[Target], device: torch.device, bands: list[np.ndarray] | None = None,
           band_draws: int = 0, body: np.ndarray | None = None) -> "_Series":
        shape = tuple(sitk.GetArrayViewFromImage(targets[0].scan).shape)
        points = GridPoints(shape, device)
        tensors = tuple(torch.from_numpy(band).to(device) for band in bands or () if len(band))
        return cls([target.time for target in targets], targets, points, shape,
                   any(target.inside is not None or target.own is not None for target in targets), tensors,
                   band_draws if tensors else 0,
                   torch.from_numpy(body).to(device) if body is not None and len(body) < points.count else None)

    def uniform_draws(self, wanted: int) -> int:
        """How many of a time's `wanted` draws are uniform: those not drawn from the structure bands, times the
        share of the grid drawn from (the same density of draws in the body as over the whole grid)."""
        share = 1.0 if self.body is None else len(self.body) / self.points.count
        return max(int(round((wanted - self.band_draws) * share)), 1)

    def _uniform(self, shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        """Flat voxel indices drawn uniformly from the grid, or from the body (sampling.body_voxels)."""
        device = self.points.axes[0].device
        if self.body is None:
            return torch.randint(self.points.count, shape, generator=generator).to(device)
        return self.body[torch.randint(len(self.body), shape, generator=generator).to(device)].long()

    def choose_voxels(self, which: list[int], wanted: int, generator: torch.Generator) -> torch.Tensor:
        """Voxel indices [len(which), N] into each chosen target's flattened grid: `wanted` random
        voxels (with replacement), or all of them when wanted is 0. The first band_draws of them are
        drawn from the structure bands, as many from each; the rest from the whole grid. A target fitted at its
        own voxels (OwnVoxels: on a grid of its own, or pre-aligned) takes its voxels nearest them (OwnVoxels.drawn:
        each a point drawn uniformly within the reference's voxel; nearest the voxels' centres when wanted is 0)."""
        count, device = self.points.count, self.points.axes[0].device
        if wanted <= 0 or wanted >= count:
            return self._on_own_grids(which, torch.arange(count, device=device).expand(len(which), count), None)
        drawn = [band[torch.randint(len(band), (len(which), share), generator=generator).to(device)]
                 for band, share in zip(self.bands, _shares(self.band_draws, len(self.bands)))]
        uniform = self._uniform((len(which), self.uniform_draws(wanted)), generator)
        return self._on_own_grids(which, torch.cat(drawn + [uniform], dim=1), generator)

    def _on_own_grids(self, which: list[int], voxels: torch.Tensor, generator: torch.Generator | None
                      ) -> torch.Tensor:
        """`voxels` (flat indices of the reference grid [T, N]) with the rows of targets fitted at their own voxels
        taken to their grids (OwnVoxels.drawn: about the voxels' centres by offsets drawn from `generator`, at
        them without one). No draw when no chosen target is."""
        own = [(k, scan) for k, i in enumerate(which) if (scan := self.targets[i].own) is not None]
        if not own:
            return voxels
        voxels = voxels.clone()
        for k, scan in own:
            offset = np.zeros((voxels.shape[1], 3)) if generator is None else \
                (torch.rand((voxels.shape[1], 3), generator=generator, dtype=torch.float64) - 0.5).numpy()
            voxels[k] = torch.from_numpy(scan.drawn(voxels[k].cpu().numpy(), offset)).to(voxels.device)
        return voxels

    def window_offsets(self, i: int) -> torch.Tensor:
        """The LNCC window's voxel offsets (dz, dy, dx) on target i's grid: WINDOW, or on the grid of a target fitted
        at its own voxels the same extent in mm, rounded to its voxels."""
        own = self.targets[i].own
        if own is None:
            return WINDOW
        return torch.round(WINDOW * torch.from_numpy(own.window_scale())).long()

    def shape_of(self, i: int) -> tuple[int, int, int]:
        """The array shape (D, H, W) of target i's voxels: the reference grid's, or its own (OwnVoxels)."""
        own = self.targets[i].own
        return self.shape if own is None else own.grid.shape

    def observed(self, which: list[int], voxels: torch.Tensor) -> torch.Tensor:
        """Normalised intensities [T, N] of the chosen targets at their voxels."""
        return torch.stack([self.targets[i].values(voxels[k]) for k, i in enumerate(which)])

    def weight(self, which: list[int], voxels: torch.Tensor) -> torch.Tensor:
        """1 where a chosen target's voxel is inside its field of view, else 0 ([T, ...] float32)."""
        return torch.stack([self.targets[i].weight(voxels[k]) for k, i in enumerate(which)])


def _squared(residual: torch.Tensor) -> torch.Tensor:
    """The squared residual (mean squared error, the paper's eq. 6)."""
    return residual ** 2


def _charbonnier(residual: torch.Tensor) -> torch.Tensor:
    """2 eps (sqrt(r^2 + eps^2) - eps), eps = CHARBONNIER_EPSILON: r^2 for |r| << eps, 2 eps |r| beyond,
    so a residual no smooth field can remove (skin moving at the body's edge, organs sliding) pulls
    no harder for being large."""
    return 2 * CHARBONNIER_EPSILON * (torch.sqrt(residual ** 2 + CHARBONNIER_EPSILON ** 2) - CHARBONNIER_EPSILON)


def _voxel_loss(penalty: Callable[[torch.Tensor], torch.Tensor]) -> LossFunction:
    """The loss whose value is the mean of penalty(prior(c + u(c, t)) - f_t(c)) over the chosen voxels."""

    def loss(deformation: Deformation, prior: nn.Module, series: _Series, which: list[int], voxels: torch.Tensor,
             levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean of the penalty of prior(c + u(c, t)) - f_t(c) over the chosen voxels (flattened indices
        [T, N]) inside their target's field of view, (detached) its mean at each chosen time [T], and the
        residual (detached); every chosen time in one batch; u of the first `levels` velocity levels."""
        predicted, observed = _predicted(deformation, prior, series, which, voxels, levels)
        residual = predicted - observed
        mean, per_time = _masked_mean(penalty(residual), series, which, voxels)
        return mean, per_time, residual.detach()

    return loss


def _masked_mean(error: torch.Tensor, series: _Series, which: list[int], voxels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of `error` [T, N] at the chosen voxels inside their target's field of view, and (detached) at each
    chosen time [T]."""
    if not series.partial:
        return error.mean(), error.detach().mean(dim=1)
    weight = series.weight(which, voxels)
    per_time = (weight * error.detach()).sum(dim=1) / weight.sum(dim=1).clamp(min=1)
    return torch.sum(weight * error) / weight.sum().clamp(min=1), per_time


_mean_squared_error = _voxel_loss(_squared)


WINDOW = torch.stack(torch.meshgrid(*[torch.arange(-2, 3, 2)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
"""Offsets (dz, dy, dx) in voxels of an LNCC window around its centre: 3 x 3 x 3 voxels, 2 apart."""


def _local_ncc_loss(deformation: Deformation, prior: nn.Module, series: _Series, which: list[int],
                    centres: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, None]:
    """1 - mean over windows of the squared normalised cross-correlation of prior(c + u(c, t)) and
    f_t(c) (LNCC), over WINDOW around each chosen centre (flattened indices [T, N]; windows clipped at
    the grid's faces), and (detached) the same at each chosen time [T]; windows reaching outside their
    target's field of view do not count. u of the first `levels` velocity levels."""
    voxels = torch.stack([_windows(centres[k], series.shape_of(i), series.window_offsets(i))
                          for k, i in enumerate(which)])                                          # [T, N, W]
    predicted, observed = _predicted(deformation, prior, series, which, voxels.reshape(len(which), -1), levels)
    predicted, observed = predicted.reshape(voxels.shape), observed.reshape(voxels.shape)
    p = predicted - predicted.mean(dim=-1, keepdim=True)
    f = observed - observed.mean(dim=-1, keepdim=True)
    ncc2 = (p * f).sum(-1) ** 2 / ((p * p).sum(-1) * (f * f).sum(-1) + 1e-5)
    if not series.partial:
        return 1 - ncc2.mean(), 1 - ncc2.detach().mean(dim=1), None
    weight = series.weight(which, voxels).reshape(voxels.shape).amin(dim=-1)
    per_time = 1 - (weight * ncc2.detach()).sum(dim=1) / weight.sum(dim=1).clamp(min=1)
    return 1 - torch.sum(weight * ncc2) / weight.sum().clamp(min=1), per_time, None


def _windows(centres: torch.Tensor, shape: tuple[int, int, int], offsets: torch.Tensor = WINDOW) -> torch.Tensor:
    """Flat voxel indices [..., W] of the LNCC window (voxel `offsets` [W, 3], dz, dy, dx) around each flat voxel
    index `centres` of a grid of `shape`."""
    zyx = torch.stack([centres // (shape[1] * shape[2]), centres // shape[2] % shape[1], centres % shape[2]], dim=-1)
    high = torch.tensor(shape, device=centres.device) - 1
    moved = torch.minimum((zyx[..., None, :] + offsets.to(centres.device)).clamp(min=0), high)
    return (moved[..., 0] * shape[1] + moved[..., 1]) * shape[2] + moved[..., 2]


def _predicted(deformation: Deformation, prior: nn.Module, series: _Series, which: list[int],
               voxels: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prior(c + u(c, t)) and f_t(c) at the chosen voxels (flat indices [T, N] into each chosen
    target's grid), every moving time of `which` in one batch; u of the first `levels` velocity levels.

    A time at which u is the identity by construction (the anchored reference, Deformation.identity_at)
    is not integrated: its rows are prior(c), without gradient, which is what the integration gave there
    (u = 0 exactly, so its loss depends on no parameter)."""
    c = torch.stack([series.targets[i].points(voxels[k], series.points) for k, i in enumerate(which)])  # [T, N, 3]
    fixed = [k for k, i in enumerate(which) if deformation.identity_at(series.times[i])]
    moving = [k for k in range(len(which)) if k not in fixed]
    predicted = torch.empty(voxels.shape, dtype=c.dtype, device=c.device)
    if fixed:
        with torch.no_grad():
            predicted[fixed] = prior(c[fixed].reshape(-1, 3)).reshape(len(fixed), -1)
    if moving:
        u = sample(deformation.displacement([series.times[which[k]] for k in moving], levels=levels), c[moving])
        predicted[moving] = prior((c[moving] + u).reshape(-1, 3)).reshape(len(moving), -1)
    return predicted, series.observed(which, voxels)


SIMILARITY = {"mse": _mean_squared_error, "charbonnier": _voxel_loss(_charbonnier), "lncc": _local_ncc_loss}


def _restore(checkpoint: Checkpoint | None, stage: str, modules: dict[str, nn.Module], optimizer: Adam,
             schedule: DecaySchedule, generator: torch.Generator, total: int) -> int:
    """The last iteration of `stage` already done (0 without a checkpoint)."""
    if checkpoint is None:
        return 0
    return checkpoint.restore(stage, modules, optimizer, schedule, generator, total)


def _choose(count: int, wanted: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """`wanted` random voxel indices (with replacement), or every index when wanted is 0."""
    if wanted <= 0 or wanted >= count:
        return torch.arange(count, device=device)
    return torch.randint(count, (wanted,), generator=generator).to(device)


def _shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` whole shares differing by at most one (the first ones larger)."""
    return [total // parts + (k < total % parts) for k in range(parts)] if parts else []


def _choose_times(count: int, wanted: int, generator: torch.Generator) -> list[int]:
    """`wanted` distinct random time indices of `count`, or every index when wanted is 0."""
    if wanted <= 0 or wanted >= count:
        return list(range(count))
    return torch.randperm(count, generator=generator)[:wanted].tolist()


def _step(optimizer: Adam, loss: torch.Tensor, schedule: DecaySchedule) -> None:
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    schedule.step()
