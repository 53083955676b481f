"""The prior's cubic look-up by numba's kernel (STNeRPLib.cubic_lookup), from the padded coefficients: torch's
intensities and slopes to the bit, whichever table layout torch's passes read, and a fit the same with it as with
torch's passes."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from STNeRPLib import compiling, cubic_lookup, priors
from STNeRPLib.presets import DEFAULT

from same_fit import assert_same_state, fitted_state


def _points(shape: tuple[int, int, int], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Points inside and up to 20 % beyond the grid, a third on voxel centres (x, y) and a third on a border (z)."""
    c = torch.rand(3000, 3, dtype=dtype, generator=generator) * 2.4 - 1.2
    depth, height, width = shape
    for axis, size in ((0, width), (1, height)):
        c[:1000, axis] = torch.randint(0, size, (1000,), generator=generator).to(dtype) / max(size - 1, 1) * 2 - 1
    c[1000:2000, 2] = torch.tensor([-1.0, 1.0], dtype=dtype)[torch.randint(0, 2, (1000,), generator=generator)]
    return c


def _torchs(volume: torch.Tensor, c: torch.Tensor, slopes: bool, monkeypatch: pytest.MonkeyPatch,
            taps: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torch's passes' look-up of a prior of `volume` built without numba (its table of `taps`, if given)."""
    with monkeypatch.context() as patched:
        patched.setattr(compiling, "numba", None)
        prior = priors.ImagePrior(volume, "cubic")
        assert taps is None or prior.taps == taps
        assert not cubic_lookup.compiled(prior.table, c)
        return prior.look_up(c, slopes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, budget, taps", [((9, 11, 13), priors.TABLE_BYTES, (4, 4)),
                                                 ((9, 11, 13), 200_000, (1, 4)),
                                                 ((9, 11, 13), 50_000, (1, 1)),
                                                 ((1, 5, 6), priors.TABLE_BYTES, (4, 4))])
@pytest.mark.parametrize("slopes", [True, False])
def test_kernel_gives_torchs_intensities_and_slopes_to_the_bit(shape: tuple[int, int, int], budget: int,
                                                               taps: tuple[int, int], dtype: torch.dtype, slopes: bool,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(priors, "TABLE_BYTES", budget * dtype.itemsize // 4)
    generator = torch.Generator().manual_seed(sum(shape) + budget % 97)
    volume = torch.rand(*shape, dtype=dtype, generator=generator)
    prior = priors.ImagePrior(volume, "cubic")
    assert prior.taps == priors.RUNS                    # the kernel reads the padded coefficients, whatever the budget
    c = _points(shape, dtype, generator)
    assert cubic_lookup.compiled(prior.table, c)
    value, slope = prior.look_up(c, slopes)
    torchs_value, torchs_slope = _torchs(volume, c, slopes, monkeypatch, taps)
    assert torch.equal(value, torchs_value)
    if slopes:
        assert slope is not None and torchs_slope is not None and torch.equal(slope, torchs_slope)
        assert slope.abs().amax() > 0
    else:
        assert slope is None and torchs_slope is None


def test_the_kernel_takes_only_what_it_can_read() -> None:
    coefficients = torch.zeros(64)
    assert cubic_lookup.compiled(coefficients, torch.zeros(5, 3))
    assert not cubic_lookup.compiled(coefficients, torch.zeros(5, 3, dtype=torch.float64))
    assert not cubic_lookup.compiled(coefficients, torch.zeros(5, 2))
    assert not cubic_lookup.compiled(coefficients.half(), torch.zeros(5, 3).half())
    assert not cubic_lookup.reads(coefficients.device, torch.float16)


def test_a_prior_built_without_the_kernel_is_looked_up_by_torchs_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A table of cubes (numba absent when it was built) is never handed to the kernel, which reads runs only."""
    volume = torch.rand(9, 11, 13, generator=torch.Generator().manual_seed(6))
    with monkeypatch.context() as patched:
        patched.setattr(compiling, "numba", None)
        cubes = priors.ImagePrior(volume, "cubic")
    assert cubes.taps == (4, 4)
    calls = []
    kernel = cubic_lookup._look_up
    monkeypatch.setattr(cubic_lookup, "_look_up", lambda *arguments: calls.append(1) or kernel(*arguments))
    c = torch.rand(50, 3, generator=torch.Generator().manual_seed(7)) * 2 - 1
    value, _ = cubes.look_up(c, slopes=False)
    runs_value, _ = priors.ImagePrior(volume, "cubic").look_up(c, slopes=False)
    assert len(calls) == 1 and torch.equal(value, runs_value)


def test_a_point_not_a_number_looks_up_not_a_number_and_leaves_the_others_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    volume = torch.rand(9, 11, 13, generator=torch.Generator().manual_seed(4))
    prior = priors.ImagePrior(volume, "cubic")
    c = torch.rand(40, 3, generator=torch.Generator().manual_seed(5)) * 2 - 1
    nan = float("nan")
    c[3], c[7, 1], c[11, 2] = torch.tensor([nan, nan, nan]), nan, nan
    value, slope = prior.look_up(c, slopes=True)
    assert slope is not None
    broken = torch.zeros(40, dtype=torch.bool)
    broken[[3, 7, 11]] = True
    assert value[broken].isnan().all() and slope[broken].isnan().all()
    torchs_value, torchs_slope = _torchs(volume, c[~broken], True, monkeypatch)
    assert torch.equal(value[~broken], torchs_value) and torch.equal(slope[~broken], torchs_slope)


def test_a_fit_is_the_same_with_the_kernel_as_with_torchs_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    preset = dataclasses.replace(DEFAULT, def_iterations=24)
    calls = []
    kernel = cubic_lookup._look_up
    monkeypatch.setattr(cubic_lookup, "_look_up", lambda *arguments: calls.append(1) or kernel(*arguments))
    with_kernel = fitted_state(preset)
    assert len(calls) >= 24                       # every iteration looks the prior up at its drawn voxels
    monkeypatch.setattr(cubic_lookup, "reads", lambda device, dtype: False)   # torch's passes, on a table of cubes
    assert_same_state(with_kernel, fitted_state(preset))
