"""The spatial-temporal deformation: Def-Net's velocity on a grid, integrated to a displacement.

Displacements are in torch.grid_sample units of the reference grid ([-1, 1] spans it) and map
a point c at time t to its matching reference point c + u(c, t) (paper eq. 4). The velocity is
anchored at the reference time: v(c, t) = net(c, t) - net(c, t_ref), and exactly zero at t_ref,
so u(c, t_ref) = 0 by construction (the reference maps to itself), not only as well as training
manages.
"""
from __future__ import annotations

import torch
from torch import nn

from .integration import identity_grid, scaling_and_squaring
from .networks import DefNet
from .presets import Preset


class Deformation(nn.Module):
    """Def-Net(s) evaluated on a velocity grid of shape (D, H, W) and integrated over [0, 1].

    Continuous time: one Def-Net of (x, y, z, t), minus its value at the reference time.
    Pairwise ("w/o t"): one Def-Net of (x, y, z) per follow-up time, queried only at that time;
    the velocity at the reference time is zero. Times are normalised.
    """

    def __init__(self, preset: Preset, velocity_shape: tuple[int, int, int], reference_time: float,
                 pairwise_times: list[float] | None, generator: torch.Generator):
        super().__init__()
        self.steps = preset.squaring_steps
        self.velocity_shape = tuple(velocity_shape)
        self.reference_time = reference_time
        self.pairwise_times = pairwise_times
        if pairwise_times is not None and any(_same(t, reference_time) for t in pairwise_times):
            raise ValueError("pairwise times are the follow-ups' times: the reference time has no network")
        count = len(pairwise_times) if pairwise_times is not None else 1
        self.nets = nn.ModuleList(
            DefNet(preset.def_width, preset.def_depth, preset.def_fourier_width, preset.def_sigma,
                   preset.def_time_sigma, preset.def_omega, temporal=pairwise_times is None, generator=generator)
            for _ in range(count))
        self.register_buffer("grid", identity_grid(self.velocity_shape).reshape(-1, 3), persistent=False)

    def velocity(self, times: list[float], chunk: int | None = None) -> torch.Tensor:
        """Velocities [len(times), 3, D, H, W] at normalised times, exactly zero at the reference
        time (chunked evaluation of the grid points when chunk is given)."""
        if self.pairwise_times is None:
            raw = self._evaluate(self.nets[0], [*times, self.reference_time], chunk)
            fields = raw[:-1] - raw[-1:]
        else:
            fields = torch.cat([self._evaluate(self.nets[self._net_index(t)], [t], chunk)
                                if not _same(t, self.reference_time) else self._zero() for t in times])
        at_reference = torch.tensor([_same(t, self.reference_time) for t in times], device=fields.device)
        return torch.where(at_reference[:, None, None, None, None], 0.0, fields)

    def displacement(self, times: list[float], chunk: int | None = None, inverse: bool = False) -> torch.Tensor:
        """Displacements [len(times), 3, D, H, W] at normalised times, by scaling and squaring.

        inverse: exp(-v) instead of exp(v), the inverse map (reference points -> time-t points).
        """
        velocity = self.velocity(times, chunk)
        return scaling_and_squaring(-velocity if inverse else velocity, self.steps)

    def _evaluate(self, net: DefNet, times: list[float], chunk: int | None) -> torch.Tensor:
        """net at every grid point and each time, in one batch per chunk: [len(times), 3, D, H, W]."""
        count = len(self.grid)
        points = self.grid.repeat(len(times), 1)
        stamps = torch.tensor(times, dtype=self.grid.dtype, device=self.grid.device).repeat_interleave(count)[:, None]
        chunk = chunk or len(points)
        v = torch.cat([net(c, s) for c, s in zip(points.split(chunk), stamps.split(chunk))])
        return v.reshape(len(times), count, 3).transpose(1, 2).reshape(len(times), 3, *self.velocity_shape)

    def _zero(self) -> torch.Tensor:
        return self.grid.new_zeros(1, 3, *self.velocity_shape)

    def _net_index(self, t: float) -> int:
        for index, trained in enumerate(self.pairwise_times):
            if _same(trained, t):
                return index
        raise ValueError("a pairwise (w/o t) model only knows the times it was trained on")


def _same(a: float, b: float) -> bool:
    """Whether two normalised times are the same time."""
    return abs(a - b) < 1e-9
