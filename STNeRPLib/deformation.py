"""The spatial-temporal deformation: Def-Net's velocity on a grid, integrated to a displacement.

Displacements are in torch.grid_sample units of the reference grid ([-1, 1] spans it) and map
a point c at time t to its matching reference point c + u(c, t) (paper eq. 4).
"""
from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .integration import identity_grid, refine, scaling_and_squaring
from .networks import DefNet
from .presets import Preset


class Deformation(nn.Module):
    """Def-Net(s) evaluated on a velocity grid and integrated over [0, 1].

    Continuous time: one Def-Net of (x, y, z, t); with the preset's anchor_reference, minus its value
    at `anchor` (the reference's normalised time), so the reference time is the identity exactly.
    Pairwise ("w/o t"): one Def-Net of (x, y, z) per training time, queried only at that time.

    Coarse to fine (preset.velocity_levels L > 1): `velocity_shape` (D, H, W) is the coarsest grid;
    level l has 2^l (n - 1) + 1 points per axis (half the spacing of level l - 1, its nodes among
    them) and its own smaller Def-Net(s) (preset.level_width, Fourier sigma level_sigma 2^(l-1)) whose
    output layer starts at zero. The velocity of the first `levels` levels is the coarser levels'
    velocity upsampled (trilinear) to the finest of them plus that level's residual, integrated on
    that finest grid: with one level it is the single-grid model exactly. `kept` levels (all unless
    keep_levels dropped finer ones) make the velocity when `levels` is not given; `trial_ratios` are
    the evidence of each adaptive decision, made on the losses its trial summed (add_trial_losses).
    All three are saved with the state, so a fit resumed inside a trial decides as one not stopped.
    """

    levels_kept: torch.Tensor
    level_ratios: torch.Tensor
    trial_losses: torch.Tensor

    def __init__(self, preset: Preset, velocity_shape: tuple[int, int, int],
                 pairwise_times: list[float] | None, generator: torch.Generator, anchor: float | None = None) -> None:
        super().__init__()
        self.anchor = anchor if preset.anchor_reference and pairwise_times is None else None
        self.steps = preset.squaring_steps
        self.shapes = [tuple(2 ** level * (n - 1) + 1 for n in velocity_shape)
                       for level in range(preset.velocity_levels)]
        self.factors = [preset.refinement(level) for level in range(preset.velocity_levels)]
        self.pairwise_times = pairwise_times
        count = len(pairwise_times) if pairwise_times else 1
        self.nets = nn.ModuleList(
            DefNet(preset.def_width, preset.def_depth, preset.def_fourier_width, preset.def_sigma,
                   preset.def_time_sigma, preset.def_omega, temporal=pairwise_times is None, generator=generator)
            for _ in range(count))
        # Finer levels draw their Fourier features from a generator of their own, so that adding them
        # leaves the coarse level's draws (and the training's samples) as with one level.
        finer = torch.Generator().manual_seed(generator.initial_seed() + 1)
        self.finer = nn.ModuleList(
            nn.ModuleList(_residual_net(preset, level, pairwise_times is None, finer) for _ in range(count))
            for level in range(1, preset.velocity_levels))
        for level, shape in enumerate(self.shapes):
            self.register_buffer(f"grid{level}", identity_grid(shape).reshape(-1, 3), persistent=False)
        self.register_buffer("levels_kept", torch.tensor(len(self.shapes)))
        self.register_buffer("level_ratios", torch.full((len(self.shapes) - 1,), float("nan")))
        self.register_buffer("trial_losses", torch.zeros(len(self.shapes) - 1, 2, dtype=torch.float64))

    @property
    def kept(self) -> int:
        """How many levels (coarsest first) the velocity is made of."""
        return int(self.levels_kept)

    @property
    def velocity_shape(self) -> tuple[int, int, int]:
        """The grid (D, H, W) on which the velocity is integrated: the finest kept level's."""
        return self.shapes[self.kept - 1]

    @property
    def displacement_shape(self) -> tuple[int, int, int]:
        """The grid (D, H, W) of `displacement`: the velocity grid, refined (preset.displacement_spacing)."""
        factor = self.factors[self.kept - 1]
        return cast("tuple[int, int, int]", tuple(factor * (n - 1) + 1 for n in self.velocity_shape))

    @property
    def trial_ratios(self) -> list[float | None]:
        """Per finer level (the second coarsest first): the loss with it / the loss without it at its
        adaptive trial, None where no trial was made."""
        return [None if math.isnan(ratio) else ratio for ratio in self.level_ratios.tolist()]

    def keep_levels(self, count: int) -> None:
        """Make the velocity of the `count` coarsest levels only, from now on."""
        self.levels_kept.fill_(count)

    def add_trial_losses(self, level: int, with_level: float, without: float) -> None:
        """Add one iteration's losses with and without finer level `level` (>= 1) to its trial's sums."""
        self.trial_losses[level - 1, 0] += with_level
        self.trial_losses[level - 1, 1] += without

    def record_trial(self, level: int) -> float:
        """Record and return the trial's summed loss with / without finer level `level` (>= 1)."""
        with_level, without = self.trial_losses[level - 1].tolist()
        self.level_ratios[level - 1] = with_level / max(without, 1e-12)
        return float(self.level_ratios[level - 1])

    def _load_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object,
                              **kwargs: object) -> None:
        # States saved before adaptive levels hold none of these: every level kept, none tried; before
        # the summed trial, no sums (a checkpoint inside a trial then decides on the iterations after it).
        for name in ("levels_kept", "level_ratios", "trial_losses"):
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def identity_at(self, time: float) -> bool:
        """Whether u is the identity at this normalised time by construction: the anchored reference time."""
        return self.anchor is not None and time == self.anchor

    def velocity(self, times: list[float], chunk: int | None = None, levels: int | None = None) -> torch.Tensor:
        """Velocities [len(times), 3, D, H, W] at normalised times on the grid of the finest of the first
        `levels` levels (None: the kept ones; never more than those). Continuous time evaluates every
        time (and the anchor) in one batch (DefNet.forward); `chunk` bounds the grid points per network pass."""
        levels = self._levels_used(levels)
        velocity = self._level(self.nets, 0, times, chunk)
        for level in range(1, levels):
            coarse = F.interpolate(velocity, size=self.shapes[level], mode="trilinear", align_corners=True)
            velocity = coarse + self._level(cast(nn.ModuleList, self.finer[level - 1]), level, times, chunk)
        return velocity

    def _level(self, nets: nn.ModuleList, level: int, times: list[float], chunk: int | None) -> torch.Tensor:
        """One level's velocity [len(times), 3, *shapes[level]] (minus its value at the anchor)."""
        if self.pairwise_times is not None:
            return torch.cat([self._evaluate(cast(DefNet, nets[self._net_index(t)]), level, [t], chunk) for t in times])
        if self.anchor is None:
            return self._evaluate(cast(DefNet, nets[0]), level, times, chunk)
        v = self._evaluate(cast(DefNet, nets[0]), level, list(times) + [self.anchor], chunk)
        return v[:-1] - v[-1:]

    def _evaluate(self, net: DefNet, level: int, times: list[float], chunk: int | None) -> torch.Tensor:
        """net at every point of the level's grid and each time, as [len(times), 3, *shapes[level]]."""
        grid = getattr(self, f"grid{level}")
        v = net(grid, torch.tensor(times, dtype=grid.dtype, device=grid.device), chunk)       # [T, N, 3]
        return v.permute(0, 2, 1).reshape(len(times), 3, *self.shapes[level])

    def displacement(self, times: list[float], chunk: int | None = None, inverse: bool = False,
                     levels: int | None = None) -> torch.Tensor:
        """Displacements [len(times), 3, D, H, W] at normalised times, by scaling and squaring of the
        velocity of the first `levels` levels (None: the kept ones) on the finest of their grids, then
        refined by that level's factor (preset.displacement_spacing): interpolate it trilinearly.

        inverse: exp(-v) instead of exp(v), the inverse map (reference points -> time-t points).
        """
        levels = self._levels_used(levels)
        velocity = self.velocity(times, chunk, levels)
        return refine(scaling_and_squaring(-velocity if inverse else velocity, self.steps), self.factors[levels - 1])

    def _levels_used(self, levels: int | None) -> int:
        """How many levels (coarsest first) make the velocity: `levels`, never more than the kept ones
        (None: the kept ones)."""
        return self.kept if levels is None else min(levels, self.kept)

    def _net_index(self, t: float) -> int:
        if self.pairwise_times is None:
            return 0
        for index, trained in enumerate(self.pairwise_times):
            if abs(trained - t) < 1e-9:
                return index
        raise ValueError("a pairwise (w/o t) model only knows the times it was trained on")


def _residual_net(preset: Preset, level: int, temporal: bool, generator: torch.Generator) -> DefNet:
    """Level `level`'s Def-Net: preset.level_width wide, Fourier sigma level_sigma 2^(level - 1), output
    layer zero (the level starts as no change to the coarser levels' velocity)."""
    net = DefNet(preset.level_width, preset.def_depth, preset.def_fourier_width, preset.level_sigma * 2 ** (level - 1),
                 preset.def_time_sigma, preset.def_omega, temporal=temporal, generator=generator)
    with torch.no_grad():
        cast(nn.Linear, net.mlp[-1]).weight.zero_()
    return net
