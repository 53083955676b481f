"""Def-Net's and Ref-Net's optimiser (optimizer.Adam): torch.optim.Adam's numbers without torch.optim, whose first
optimiser imports torch._dynamo (1.2-1.5 s a process: every `stnerp train` and every Apply of the panel)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from STNeRPLib.optimizer import Adam
from STNeRPLib.schedule import DecaySchedule

ROOT = Path(__file__).resolve().parents[2]


def _parameters(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((7, 5), (5,), (3, 4))]


def _gradients(step: int, parameters: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    """The third parameter has no gradient for the first 4 steps (a velocity level not yet on)."""
    generator = torch.Generator().manual_seed(100 + step)
    return [None if (k == 2 and step < 4) else torch.randn(p.shape, generator=generator)
            for k, p in enumerate(parameters)]


def _run(optimizer, parameters: list[torch.nn.Parameter], steps: range) -> None:
    for step in steps:
        optimizer.zero_grad()                   # torch's: set_to_none=True by default
        for p, g in zip(parameters, _gradients(step, parameters)):
            p.grad = g
        for k, group in enumerate(optimizer.param_groups):
            group["lr"] = 1e-2 * (1 + k) / (1 + 0.1 * step)       # a schedule changing every step
        optimizer.step()


def _groups(parameters: list[torch.nn.Parameter]) -> list[dict]:
    return [{"params": parameters[:2]}, {"params": parameters[2:], "lr": 3e-2}]


def test_adam_takes_the_steps_torch_optim_adam_takes_bit_for_bit():
    ours, theirs = _parameters(0), _parameters(0)
    _run(Adam(_groups(ours), lr=1e-2), ours, range(30))
    _run(torch.optim.Adam(_groups(theirs), lr=1e-2), theirs, range(30))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert not torch.equal(ours[2], _parameters(0)[2])                       # it moved, once it had gradients


def test_adam_saved_and_loaded_mid_fit_goes_on_as_one_never_stopped():
    whole, first = _parameters(1), _parameters(1)
    _run(Adam(_groups(whole), lr=1e-2), whole, range(20))
    stopped = Adam(_groups(first), lr=1e-2)
    _run(stopped, first, range(8))
    saved = {"state": stopped.state_dict(), "values": [p.detach().clone() for p in first]}
    again = _parameters(7)                                                   # other values, loaded over
    with torch.no_grad():
        for p, value in zip(again, saved["values"]):
            p.copy_(value)
    resumed = Adam(_groups(again), lr=1e-2)
    resumed.load_state_dict(saved["state"])
    _run(resumed, again, range(8, 20))
    assert all(torch.equal(a, b) for a, b in zip(again, whole))


def test_adam_reads_the_state_torch_optim_adam_saved():
    """A checkpoint written by an earlier version (torch.optim.Adam's state) goes on with the same numbers."""
    ours, theirs = _parameters(2), _parameters(2)
    torch_adam = torch.optim.Adam(_groups(theirs), lr=1e-2)
    _run(torch_adam, theirs, range(6))
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            p.copy_(q)
    adam = Adam(_groups(ours), lr=1e-2)
    adam.load_state_dict(torch_adam.state_dict())
    _run(adam, ours, range(6, 15))
    _run(torch_adam, theirs, range(6, 15))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_the_schedule_sets_each_groups_rate_from_its_initial_one():
    parameters = _parameters(3)
    adam = Adam(_groups(parameters), lr=1e-2)
    schedule = DecaySchedule(adam, 5, 0.1)
    rates = []
    for _ in range(5):
        rates.append([group["lr"] for group in adam.param_groups])
        schedule.step()
    assert rates[0] == [1e-2, 3e-2]
    assert [round(r[1] / r[0], 12) for r in rates] == [3.0] * 5
    assert abs(rates[-1][0] - 1e-3) < 1e-15                                  # final x initial at the last


def test_a_fit_imports_no_torch_dynamo():
    code = ("import sys; from STNeRPLib.phantom import breathing_series; from STNeRPLib.pipeline import fit; "
            "from STNeRPLib.presets import DEFAULT, Options; from STNeRPLib.progress import Reporter; "
            "s = breathing_series(size=(16, 16, 12), spacing=(16.0, 16.0, 18.0), n_phases=2, noise_hu=0); "
            "fit(s.images[0], 0.0, [(1.0, s.images[1])], None, Options(DEFAULT.with_iterations(3)), Reporter()); "
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
