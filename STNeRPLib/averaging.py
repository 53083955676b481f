"""Tail averaging of a network's weights (Polyak-Ruppert averaging): the mean of the weights over a fit's
last iterations, which a stochastic fit's last iterate only scatters around."""
from __future__ import annotations

import torch
from torch import nn


class WeightAverage(nn.Module):
    """The running mean of `module`'s parameters over the iterations `add` was called at.

    The mean and its count are buffers, so a checkpoint holding this module resumes the mean exactly
    (training.fit_deformation saves it beside the network)."""

    count: torch.Tensor

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._sources = list(module.parameters())   # a plain list: the module's own, not registered here
        for index, parameter in enumerate(self._sources):
            self.register_buffer(f"mean{index}", torch.zeros_like(parameter, requires_grad=False))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def _pairs(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, its running mean) for each of the module's parameters."""
        return [(parameter, getattr(self, f"mean{index}")) for index, parameter in enumerate(self._sources)]

    def add(self) -> None:
        """Take the module's present weights into the mean."""
        self.count += 1
        weight = 1.0 / int(self.count)
        with torch.no_grad():
            for parameter, mean in self._pairs():
                mean.lerp_(parameter, weight)

    def load_into_module(self) -> None:
        """Set the module's weights to the mean (nothing when no iteration was added)."""
        if int(self.count) == 0:
            return
        with torch.no_grad():
            for parameter, mean in self._pairs():
                parameter.copy_(mean)
