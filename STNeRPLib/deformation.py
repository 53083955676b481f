"""The spatial-temporal deformation: Def-Net's velocity on a grid, integrated to a displacement.

Displacements are in torch.grid_sample units of the reference grid ([-1, 1] spans it) and map
a point c at time t to its matching reference point c + u(c, t) (paper eq. 4).
"""
from __future__ import annotations

import torch
from torch import nn

from .integration import identity_grid, scaling_and_squaring
from .networks import DefNet
from .presets import Preset


class Deformation(nn.Module):
    """Def-Net(s) evaluated on a velocity grid of shape (D, H, W) and integrated over [0, 1].

    Continuous time: one Def-Net of (x, y, z, t); with the preset's anchor_reference, minus its value
    at `anchor` (the reference's normalised time), so the reference time is the identity exactly.
    Pairwise ("w/o t"): one Def-Net of (x, y, z) per training time, queried only at that time.
    """

    def __init__(self, preset: Preset, velocity_shape: tuple[int, int, int],
                 pairwise_times: list[float] | None, generator: torch.Generator, anchor: float | None = None):
        super().__init__()
        self.anchor = anchor if preset.anchor_reference and pairwise_times is None else None
        self.steps = preset.squaring_steps
        self.velocity_shape = tuple(velocity_shape)
        self.pairwise_times = pairwise_times
        count = len(pairwise_times) if pairwise_times else 1
        self.nets = nn.ModuleList(
            DefNet(preset.def_width, preset.def_depth, preset.def_fourier_width, preset.def_sigma,
                   preset.def_time_sigma, preset.def_omega, temporal=pairwise_times is None, generator=generator)
            for _ in range(count))
        self.register_buffer("grid", identity_grid(self.velocity_shape).reshape(-1, 3), persistent=False)

    def velocity(self, times: list[float], chunk: int | None = None) -> torch.Tensor:
        """Velocities [len(times), 3, D, H, W] at normalised times. Continuous time evaluates every
        time (and the anchor) in one batch of (grid point, time) rows (few large matrix products, not
        one set per time); `chunk` bounds the rows per network call."""
        if self.pairwise_times is not None:
            return torch.cat([self._evaluate(self.nets[self._net_index(t)], [t], chunk) for t in times])
        if self.anchor is None:
            return self._evaluate(self.nets[0], times, chunk)
        v = self._evaluate(self.nets[0], list(times) + [self.anchor], chunk)
        return v[:-1] - v[-1:]

    def _evaluate(self, net: DefNet, times: list[float], chunk: int | None) -> torch.Tensor:
        """net at every grid point and each time, as [len(times), 3, D, H, W]."""
        count = len(self.grid)
        c = self.grid.repeat(len(times), 1)
        t = torch.tensor(times, dtype=c.dtype, device=c.device).repeat_interleave(count)[:, None]
        chunk = chunk or len(c)
        v = torch.cat([net(c[i:i + chunk], t[i:i + chunk]) for i in range(0, len(c), chunk)])
        return v.reshape(len(times), count, 3).permute(0, 2, 1).reshape(len(times), 3, *self.velocity_shape)

    def displacement(self, times: list[float], chunk: int | None = None, inverse: bool = False) -> torch.Tensor:
        """Displacements [len(times), 3, D, H, W] at normalised times, by scaling and squaring.

        inverse: exp(-v) instead of exp(v), the inverse map (reference points -> time-t points).
        """
        velocity = self.velocity(times, chunk)
        return scaling_and_squaring(-velocity if inverse else velocity, self.steps)

    def _net_index(self, t: float) -> int:
        if self.pairwise_times is None:
            return 0
        for index, trained in enumerate(self.pairwise_times):
            if abs(trained - t) < 1e-9:
                return index
        raise ValueError("a pairwise (w/o t) model only knows the times it was trained on")
