"""Def-Net's weights averaged over the fit's last iterations (Preset.average_last, averaging.WeightAverage):
the mean of the iterates, saved in the checkpoint so a resumed fit ends bit-identical."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from STNeRPLib import pipeline
from STNeRPLib.checkpoint import Checkpoint
from STNeRPLib.phantom import breathing_series
from STNeRPLib.presets import DEFAULT, Options
from STNeRPLib.progress import Reporter

ITERATIONS = 40
SHORT = dataclasses.replace(DEFAULT, def_iterations=ITERATIONS, velocity_levels=1, adaptive_levels=False)


@pytest.fixture(scope="module")
def tiny():
    return breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3, noise_hu=0)


class _Weights(Reporter):
    """Keeps a copy of Def-Net's weights after every iteration (`deformation`: the fit's, handed over by
    _fit's hook on pipeline._new_deformation); optionally stops the fit after one iteration."""

    def __init__(self, stop_after: int | None = None):
        super().__init__(interval=0.0)
        self.deformation = None
        self.iterates: dict[int, list[torch.Tensor]] = {}
        self.stop_after = stop_after

    def progress(self, stage, iteration, total, loss=None) -> None:
        if stage == "defnet" and self.deformation is not None:
            self.iterates[iteration] = [p.detach().clone() for p in self.deformation.parameters()]
        if iteration == self.stop_after:
            raise KeyboardInterrupt


def _fit(series, preset, reporter, monkeypatch, checkpoint=None):
    new_deformation = pipeline._new_deformation

    def keep(*args, **kwargs):
        reporter.deformation = new_deformation(*args, **kwargs)
        return reporter.deformation

    monkeypatch.setattr(pipeline, "_new_deformation", keep)
    follow_ups = [(series.times[k], series.images[k]) for k in (1, 2)]
    return pipeline.fit(series.images[0], series.times[0], follow_ups, None, Options(preset, seed=0), reporter,
                        checkpoint=checkpoint)


def test_def_net_ends_with_the_mean_of_its_weights_over_the_last_quarter(tiny, monkeypatch):
    reporter = _Weights()
    model = _fit(tiny, dataclasses.replace(SHORT, average_last=0.25), reporter, monkeypatch)
    tail = [reporter.iterates[i] for i in range(31, ITERATIONS + 1)]          # the last 10 of 40
    final = list(model.deformation.parameters())
    for index, parameter in enumerate(final):
        mean = torch.stack([weights[index] for weights in tail]).mean(dim=0)
        assert torch.allclose(parameter, mean, atol=1e-6, rtol=1e-5), index
    last = reporter.iterates[ITERATIONS]
    assert any(not torch.equal(p, q) for p, q in zip(final, last))           # not the last iterate


def test_without_averaging_def_net_ends_with_its_last_weights(tiny, monkeypatch):
    reporter = _Weights()
    model = _fit(tiny, dataclasses.replace(SHORT, average_last=0.0), reporter, monkeypatch)
    for parameter, last in zip(model.deformation.parameters(), reporter.iterates[ITERATIONS]):
        assert torch.equal(parameter, last)


def test_a_fit_interrupted_inside_the_averaged_iterations_resumes_bit_identical(tiny, tmp_path, monkeypatch):
    preset = dataclasses.replace(SHORT, average_last=0.25)
    whole = _fit(tiny, preset, _Weights(), monkeypatch)
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        _fit(tiny, preset, _Weights(stop_after=36), monkeypatch, Checkpoint(path, every=34))
    assert int(torch.load(path, weights_only=True)["modules"]["weight_average"]["count"]) == 4   # 31-34
    resumed = _fit(tiny, preset, _Weights(), monkeypatch, Checkpoint(path, every=10_000))
    for name, value in whole.deformation.state_dict().items():
        assert torch.equal(value, resumed.deformation.state_dict()[name]), name
