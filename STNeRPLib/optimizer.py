"""Adam (Kingma and Ba, 2015), the optimiser of Ref-Net and Def-Net, as torch.optim.Adam computes it with its
defaults (betas 0.9 and 0.999, eps 1e-8, no weight decay; its single-tensor path, the CPU's): the same numbers bit for
bit (tested), and its state_dict's layout, so a checkpoint written with torch.optim.Adam goes on.

Not torch.optim itself: its first optimiser imports torch._dynamo (1.2-1.5 s and some 800 modules here), which every
`stnerp train` and every Apply of the Slicer panel paid before its first iteration.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

BETAS = (0.9, 0.999)
"""Decay of the running means of the gradient and of its square."""
EPS = 1e-8
"""Added to the root of the running mean square, against division by zero."""


class Adam:
    """Adam over parameter groups, each {"params": [...], "lr": its rate (default `lr`)}; a schedule sets each
    group's "lr" between steps. A parameter's moments start at its first step with a gradient (one without a
    gradient, as a velocity level not yet on, is left as it is and its step count does not advance)."""

    def __init__(self, groups: Iterable[dict[str, Any]] | Iterable[torch.Tensor], lr: float) -> None:
        given: list[Any] = list(groups)
        if given and not isinstance(given[0], dict):
            given = [{"params": given}]
        self.param_groups: list[dict[str, Any]] = [{**group, "params": list(group["params"]),
                                                    "lr": group.get("lr", lr)} for group in given]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def _parameters(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self) -> None:
        """Let every gradient go (as torch's zero_grad(set_to_none=True)): a parameter the next backward does not
        reach has none, and step leaves it as it is."""
        for p in self._parameters():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step of every parameter that has a gradient, at its group's current rate."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, group["lr"])

    def _update(self, p: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        beta1, beta2 = BETAS
        state = self.state.get(p)
        if state is None:
            state = self.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                     "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                     "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        state["step"] += 1
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = state["step"].item()
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        denominator = (state["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(EPS)
        p.addcdiv_(state["exp_avg"], denominator, value=-(lr / (1 - beta1 ** step)))

    def state_dict(self) -> dict[str, Any]:
        """The moments and step counts by parameter index and each group's rate, in torch.optim.Adam's layout."""
        index = {p: k for k, p in enumerate(self._parameters())}
        groups, start = [], 0
        for group in self.param_groups:
            count = len(group["params"])
            groups.append({"lr": group["lr"], "betas": BETAS, "eps": EPS, "params": list(range(start, start + count))})
            start += count
        return {"state": {index[p]: dict(s) for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Take up a state_dict (this class's or torch.optim.Adam's) of the same parameter groups: a copy of its
        moments on each parameter's device and dtype, its step counts, and each group's rate."""
        parameters = self._parameters()
        if [len(g["params"]) for g in saved["param_groups"]] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the saved optimiser state is of other parameter groups")
        for group, saved_group in zip(self.param_groups, saved["param_groups"]):
            group["lr"] = saved_group["lr"]
        self.state = {}
        for k, s in saved["state"].items():
            p = parameters[int(k)]
            self.state[p] = {"step": s["step"].detach().to(torch.float32, copy=True).cpu(),
                             "exp_avg": s["exp_avg"].detach().to(p, copy=True),
                             "exp_avg_sq": s["exp_avg_sq"].detach().to(p, copy=True)}
