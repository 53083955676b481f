"""A small default fit's Def-Net state, and the check that two such states are the same to the bit: what the tests of
the compiled kernels (trilinear, cubic_lookup) compare, with each kernel and with torch's code."""
from __future__ import annotations

import torch

from STNeRPLib import phantom
from STNeRPLib.pipeline import fit
from STNeRPLib.presets import Options, Preset
from STNeRPLib.progress import Reporter


def fitted_state(preset: Preset) -> dict[str, torch.Tensor]:
    """Def-Net's state after fitting `preset` to a 3-phase, 24 x 24 x 16 breathing phantom (series seed 2)."""
    made = phantom.breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3, seed=2)
    follow_ups = list(zip(made.times[1:], made.images[1:]))
    model = fit(made.images[0], made.times[0], follow_ups, made.labelmaps[0], Options(preset), Reporter(interval=1e9))
    return model.deformation.state_dict()


def assert_same_state(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    """The same tensors under the same names, to the bit (NaN where NaN)."""
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.allclose(value, second[key], rtol=0, atol=0, equal_nan=True), key
