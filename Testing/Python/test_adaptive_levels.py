"""Adaptive velocity levels (preset adaptive_levels, `--velocity-levels auto`): a finer level is tried for
LEVEL_TRIAL of Def-Net's iterations and kept only where it lowers the loss by more than LEVEL_GAIN."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from STNeRPLib import training
from STNeRPLib.checkpoint import Checkpoint
from STNeRPLib.deformation import Deformation
from STNeRPLib.model import SeriesModel
from STNeRPLib.phantom import breathing_series, write_series
from STNeRPLib.pipeline import fit
from STNeRPLib.preprocessing import IntensityWindow
from STNeRPLib.presets import DEFAULT, LEVEL_GAIN, Options
from STNeRPLib.progress import Reporter
from worker_cli import stnerp

ADAPTIVE = dataclasses.replace(DEFAULT, velocity_levels=2, adaptive_levels=True).with_iterations(40)
DECISION = ADAPTIVE.level_decision(1)


@pytest.fixture(scope="module")
def tiny():
    return breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3, noise_hu=0)


class _Stop(Reporter):
    """Stops the fit (as Ctrl-C would) after Def-Net iteration `after`."""

    def __init__(self, after: int):
        super().__init__(interval=0.0)
        self.after = after

    def progress(self, stage, iteration, total, loss=None) -> None:
        if stage == "defnet" and iteration == self.after:
            raise KeyboardInterrupt


def _fit(series, reporter=None, checkpoint=None) -> SeriesModel:
    follow_ups = [(series.times[k], series.images[k]) for k in (1, 2)]
    return fit(series.images[0], series.times[0], follow_ups, None, Options(ADAPTIVE, seed=0),
               reporter or Reporter(), checkpoint=checkpoint)[0]


@pytest.mark.parametrize("ratio, kept", [(1 - LEVEL_GAIN - 0.01, 2), (1 - LEVEL_GAIN + 0.01, 1), (1.10, 1)])
def test_finer_level_is_kept_only_if_it_lowers_the_loss_by_more_than_the_gain(tiny, ratio, kept):
    """The rule on its own: a loss whose value with the finer level is `ratio` x its value without it;
    nothing is decided before or after the level's decision iteration."""
    deformation = Deformation(ADAPTIVE, (3, 3, 3), None, torch.Generator().manual_seed(0), 0.0)
    asked = []

    def loss_of(deformation, prior, series, which, voxels, levels):
        asked.append(levels)
        per_time = torch.full((len(which),), ratio if levels == 2 else 1.0)
        return per_time.mean(), per_time

    targets = _targets(tiny)
    series = training._Series.of(targets, torch.device("cpu"))
    said = []
    for iteration in (DECISION - 1, DECISION + 1):
        training._try_level(deformation, None, series, loss_of, ADAPTIVE, iteration, 5, said.append)
    assert asked == [] and said == [] and deformation.kept == 2 and deformation.trial_ratios == [None]
    training._try_level(deformation, None, series, loss_of, ADAPTIVE, DECISION, 5, said.append)
    assert set(asked) == {1, 2} and deformation.kept == kept
    assert deformation.trial_ratios == [pytest.approx(ratio)]
    assert len(said) == 1 and f"{ratio:.3f} x the loss without it" in said[0]
    assert said[0].endswith("kept" if kept == 2 else "dropped")


def _targets(series) -> list[training.Target]:
    window = IntensityWindow.for_image(series.images[0], "ct")
    return [training.Target(t, image, window) for t, image in zip(series.times, series.images)]


def test_after_a_dropped_level_the_fit_and_its_saved_model_are_the_coarse_level_alone(tiny, tmp_path, monkeypatch):
    """A level that must lower the loss by 100 % is always dropped: the finer network stops changing at
    the decision, the fitted field is the coarse level's on the coarse grid, and the saved model loads
    as such."""
    monkeypatch.setattr(training, "LEVEL_GAIN", 1.0)
    at_decision = {}
    decide = training._try_level

    def recording(deformation, *args):
        decide(deformation, *args)
        if deformation.kept == 1 and not at_decision:
            at_decision.update({k: v.clone() for k, v in deformation.finer.state_dict().items()})

    monkeypatch.setattr(training, "_try_level", recording)
    dropped = _fit(tiny)
    assert dropped.deformation.kept == 1 and at_decision
    for name, value in dropped.deformation.finer.state_dict().items():
        assert torch.equal(value, at_decision[name]), name
    field = dropped.displacement_grid(1.0)
    assert field.shape[2:] == dropped.deformation.shapes[0]
    with torch.no_grad():
        coarse = dropped.deformation.displacement([dropped.normalised_time(1.0)], chunk=65536, levels=1)
    assert torch.equal(field, coarse)
    dropped.save(tmp_path / "model.pt")
    loaded = SeriesModel.load(tmp_path / "model.pt", torch.device("cpu"))
    assert loaded.deformation.kept == 1 and torch.equal(loaded.displacement_grid(1.0), field)


def test_a_kept_level_stays_in_the_field(tiny, monkeypatch):
    monkeypatch.setattr(training, "LEVEL_GAIN", -1.0)        # kept unless it doubles the loss
    kept = _fit(tiny)
    assert kept.deformation.kept == 2
    assert kept.displacement_grid(1.0).shape[2:] == kept.deformation.shapes[1]


@pytest.mark.parametrize("stop", [DECISION - 3, DECISION + 3])
def test_a_fit_interrupted_before_or_after_its_level_decision_resumes_bit_identical(tiny, tmp_path, monkeypatch,
                                                                                    stop):
    monkeypatch.setattr(training, "LEVEL_GAIN", 1.0)
    whole = _fit(tiny)
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        _fit(tiny, _Stop(after=stop + 1), Checkpoint(path, every=stop))
    resumed = _fit(tiny, checkpoint=Checkpoint(path, every=10_000))
    assert resumed.deformation.kept == whole.deformation.kept == 1
    for name, value in whole.deformation.state_dict().items():
        assert torch.equal(value, resumed.deformation.state_dict()[name]), name


def test_worker_with_auto_levels_records_and_says_how_many_it_kept(tmp_path):
    files = write_series(breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3, noise_hu=0),
                         tmp_path / "data")
    output = tmp_path / "run"
    result = stnerp("train", "--reference", files["images"][0], "--follow-up", files["images"][1], 1,
                    "--follow-up", files["images"][2], 2, "--iterations", 40, "--velocity-levels", "auto",
                    "--output", output, "--no-report")
    assert result.returncode == 0, result.stderr
    record = json.loads((output / "run.json").read_text())
    preset = record["parameters"]["preset"]
    assert preset["velocity_levels"] == 2 and preset["adaptive_levels"] is True
    assert record["velocity_levels_kept"] in (1, 2) and record["defnet_iterations"] == 40
    decision = "kept" if record["velocity_levels_kept"] == 2 else "dropped"
    assert f"velocity levels kept: {record['velocity_levels_kept']} of 2" in result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith(f"velocity level 2 at Def-Net iteration {DECISION}:")]
    assert len(said) == 1 and said[0].endswith(decision) and " x the loss without it" in said[0], result.stderr
    ratio, = record["velocity_level_ratios"]
    assert f": the loss with it is {ratio:.3f} x" in said[0]
    assert (ratio <= 1 - LEVEL_GAIN) == (decision == "kept")
    state = torch.load(output / "model.pt", weights_only=True)["deformation"]
    assert int(state["levels_kept"]) == record["velocity_levels_kept"]


def test_a_state_saved_before_adaptive_levels_loads_with_every_level_kept_and_none_tried():
    """Model files and checkpoints written before the decision was saved lack both buffers."""
    generator = torch.Generator().manual_seed(0)
    saved = Deformation(ADAPTIVE, (3, 3, 3), None, generator, 0.0)
    saved.keep_levels(1)
    saved.record_trial(1, 0.98)
    state = {k: v for k, v in saved.state_dict().items() if k not in ("levels_kept", "level_ratios")}
    loaded = Deformation(ADAPTIVE, (3, 3, 3), None, generator, 0.0)
    loaded.load_state_dict(state)
    assert loaded.kept == 2 and loaded.trial_ratios == [None]
    loaded.load_state_dict(saved.state_dict())
    assert loaded.kept == 1 and loaded.trial_ratios == [pytest.approx(0.98)]
