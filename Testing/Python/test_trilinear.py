"""The training's trilinear sampling (STNeRPLib.trilinear): torch's 3-D grid_sample (bilinear, border,
align_corners) to the bit, forward and backward, by numba's compiled kernels; and a fit the same with them as
with torch's."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from STNeRPLib import compiling, phantom, trilinear
from STNeRPLib.pipeline import fit
from STNeRPLib.presets import DEFAULT, Options
from STNeRPLib.progress import Reporter

from same_fit import assert_same_state, fitted_state


def _torch(volume: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _points(shape: tuple[int, ...], grid_shape: tuple[int, ...], dtype: torch.dtype,
            generator: torch.Generator) -> torch.Tensor:
    """Points inside and up to 20 % beyond the grid, a third on nodes (x, y) and a third on a border (z)."""
    grid = torch.rand(*grid_shape, dtype=dtype, generator=generator) * 2.4 - 1.2
    flat = grid.view(-1, 3)
    third = len(flat) // 3
    depth, height, width = shape[2:]
    for axis, size in ((0, width), (1, height)):
        nodes = torch.randint(0, size, (third,), generator=generator).to(dtype)
        flat[:third, axis] = nodes / max(size - 1, 1) * 2 - 1
    flat[third:2 * third, 2] = torch.tensor([-1.0, 1.0], dtype=dtype)[torch.randint(0, 2, (third,),
                                                                                     generator=generator)]
    return grid


CASES = [((3, 3, 9, 7, 7), (3, 4095, 1, 1, 3)),          # a displacement sampled at drawn voxels
         ((3, 3, 7, 21, 25), (3, 7, 21, 25, 3)),         # a squaring step on its own grid
         ((2, 1, 5, 6, 7), (2, 300, 1, 1, 3)),
         ((1, 3, 1, 5, 5), (1, 4, 5, 6, 3))]             # an axis of one node


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, grid_shape", CASES)
@pytest.mark.parametrize("wanted", ["volume", "grid", "both"])
def test_kernels_give_torchs_values_and_gradients_to_the_bit(shape: tuple[int, ...], grid_shape: tuple[int, ...],
                                                             dtype: torch.dtype, wanted: str) -> None:
    generator = torch.Generator().manual_seed(sum(shape) + len(wanted))
    volume = torch.randn(*shape, dtype=dtype, generator=generator).requires_grad_(wanted != "grid")
    grid = _points(shape, grid_shape, dtype, generator).requires_grad_(wanted != "volume")
    inputs = [tensor for tensor in (volume, grid) if tensor.requires_grad]
    ours, theirs = trilinear.grid_sample(volume, grid), _torch(volume, grid)
    assert trilinear.compiled(volume, grid)
    assert torch.equal(ours, theirs)
    upstream = torch.randn(theirs.shape, dtype=dtype, generator=generator)
    for mine, torchs in zip(torch.autograd.grad(ours, inputs, upstream), torch.autograd.grad(theirs, inputs, upstream)):
        assert torch.equal(mine, torchs)


def test_a_misshapen_call_gets_torchs_error_not_the_kernels() -> None:
    volume = torch.randn(2, 3, 4, 5, 6, requires_grad=True)
    for grid in (torch.rand(3, 10, 1, 1, 3), torch.rand(2, 10, 1, 1, 2), torch.rand(2, 10, 1, 3)):
        assert not trilinear.compiled(volume, grid)
        with pytest.raises(RuntimeError):
            trilinear.grid_sample(volume, grid)
    assert not trilinear.compiled(torch.zeros(2, 3, 0, 5, 6, requires_grad=True), torch.rand(2, 10, 1, 1, 3))


def test_without_autograd_or_numba_torch_samples() -> None:
    volume, grid = torch.randn(1, 3, 4, 5, 6), torch.rand(1, 10, 1, 1, 3) * 2 - 1
    assert not trilinear.compiled(volume, grid)
    assert not trilinear.compiled(volume.requires_grad_(), grid.double())
    with torch.no_grad():
        assert not trilinear.compiled(volume, grid)


def test_a_fit_is_the_same_with_the_kernels_as_with_torchs(monkeypatch: pytest.MonkeyPatch) -> None:
    preset = dataclasses.replace(DEFAULT, def_iterations=24, velocity_levels=2, adaptive_levels=False, level_start=0.0)
    calls = []
    kernel = trilinear._forward
    monkeypatch.setattr(trilinear, "_forward", lambda *arrays: calls.append(1) or kernel(*arrays))
    with_kernels = fitted_state(preset)
    assert len(calls) >= 24 * 6                   # every iteration: 5 squaring steps, then the drawn voxels
    monkeypatch.setattr(trilinear, "compiled", lambda volume, grid: False)
    assert_same_state(with_kernels, fitted_state(preset))
    assert not torch.equal(with_kernels["finer.0.0.mlp.2.weight"], torch.zeros(3, DEFAULT.level_width))


class _Messages(Reporter):
    def __init__(self) -> None:
        super().__init__(interval=1e9)
        self.said: list[str] = []

    def message(self, text: str) -> None:
        self.said.append(text)


@pytest.mark.parametrize("installed", [True, False])
def test_a_fit_says_when_numba_is_missing(monkeypatch: pytest.MonkeyPatch, installed: bool) -> None:
    if not installed:
        monkeypatch.setattr(compiling, "numba", None)
    made = phantom.breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=2, seed=2)
    reporter = _Messages()
    fit(made.images[0], made.times[0], [(made.times[1], made.images[1])], None,
        Options(dataclasses.replace(DEFAULT, def_iterations=2)), reporter)
    said = [text for text in reporter.said if text.startswith("numba is not in use")]
    assert len(said) == (0 if installed else 1)


def test_stnerp_numba_0_runs_the_outputs_without_importing_numba() -> None:
    """STNERP_NUMBA=0 (the benchmark's peers' processes): numba is not imported at all, and det J and the labels are
    computed by numpy."""
    code = ("import sys; import numpy as np; import SimpleITK as sitk; "
            "from STNeRPLib import compiling, metrics, warping; "
            "metrics.jacobian_determinant(sitk.Image([3, 3, 3], sitk.sitkVectorFloat32, 3)); "
            "warping.propagate_labels(np.ones((2, 2, 2), np.uint8), np.zeros((1, 3)), 'linear'); "
            "print(compiling.numba is None, 'numba' in sys.modules)")
    for value, said in (("0", "True False"), ("1", "False True")):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env={**os.environ, "STNERP_NUMBA": value})
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == said.split(), value
