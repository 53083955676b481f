"""Adaptive velocity levels (preset adaptive_levels, `--velocity-levels auto`): a finer level is tried for
LEVEL_TRIAL Def-Net iterations and kept only where it lowers the loss by more than LEVEL_GAIN."""
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
from STNeRPLib.presets import DEFAULT, LEVEL_GAIN, LEVEL_GAIN_TRILINEAR, LEVEL_TRIAL, Options
from STNeRPLib.progress import Reporter
from worker_cli import stnerp

ADAPTIVE = dataclasses.replace(DEFAULT, velocity_levels=2, adaptive_levels=True).with_iterations(40)
DECISION = ADAPTIVE.level_decision(1)


@pytest.mark.parametrize("iterations", [500, 600, 1000, 2000])
def test_a_level_is_tried_for_the_same_number_of_iterations_however_long_the_fit(iterations):
    """The trial's loss ratio depends on how long the level has learnt: with a fifth of a 600-iteration fit the
    shrinking tumour's level was dropped (docs/presets.md). Its trial is LEVEL_TRIAL iterations at any length
    that leaves room for it, its window the last half of them."""
    preset = DEFAULT.with_iterations(iterations)
    start = preset.level_iteration(1)
    assert preset.level_decision(1) - start + 1 == LEVEL_TRIAL == 200
    assert list(preset.level_window(1)) == list(range(start + 100, start + 200))
    assert preset.levels_settled() == start + 200


def test_in_a_short_fit_a_level_is_tried_for_half_the_iterations_left_after_it_comes_on():
    assert ADAPTIVE.level_iteration(1) == 9 and DECISION == 24          # 40 iterations: 32 left, 16 tried
    assert list(ADAPTIVE.level_window(1)) == list(range(17, 25))
    single = dataclasses.replace(ADAPTIVE, def_iterations=2, ref_iterations=2)
    assert single.level_decision(1) == single.level_iteration(1)         # always at least one


@pytest.mark.parametrize("iterations, warned", [(40, True), (300, True), (499, True), (500, False), (1000, False)])
def test_a_fit_too_short_for_a_whole_trial_warns_and_says_how_many_iterations_would_give_one(iterations, warned):
    """At 200 iterations the shrinking tumour's level was tried for 80 and dropped at one seed of two
    (docs/presets.md): a user who lowers --iterations that far is told, with the count that avoids it."""
    said = []
    training._warn_of_short_trials(DEFAULT.with_iterations(iterations), said.append)
    trial = DEFAULT.with_iterations(iterations).level_trial(1)
    assert said == ([f"warning: with {iterations} Def-Net iterations velocity level 2 is tried for {trial}, not 200: "
                     "a level the series needs may be dropped (give at least 500)"] if warned else [])


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
               reporter or Reporter(), checkpoint=checkpoint)


def _trial(tiny, with_level: dict[int, float]) -> tuple[Deformation, list[int], list[str]]:
    """Run the rule on its own from the level's switch-on to past its decision, with a training loss of
    with_level.get(iteration, 1.0) and a loss without the level of 1.0: the deformation, the iterations
    at which the loss without the level was asked for, and what was said."""
    deformation = Deformation(ADAPTIVE, (3, 3, 3), None, torch.Generator().manual_seed(0), 0.0)
    series = training._Series.of(_targets(tiny), torch.device("cpu"))
    asked, said = [], []
    for iteration in range(ADAPTIVE.level_iteration(1), DECISION + 3):
        def loss_of(deformation, prior, series, which, voxels, levels):
            assert levels == 1
            asked.append(iteration)
            return torch.tensor(1.0), torch.ones(len(which))

        drawn = ([0], series.choose_voxels([0], 8, torch.Generator().manual_seed(0)), 2)
        loss = torch.tensor(with_level.get(iteration, 1.0))
        training._weigh_level(deformation, None, series, loss_of, ADAPTIVE, iteration, drawn, loss)
        training._try_level(deformation, ADAPTIVE, iteration, said.append)
        assert (said == []) == (iteration < DECISION)
    return deformation, asked, said


WINDOW = ADAPTIVE.level_window(1)


@pytest.mark.parametrize("ratio, kept", [(1 - LEVEL_GAIN - 0.01, 2), (1 - LEVEL_GAIN + 0.01, 1), (1.10, 1)])
def test_finer_level_is_kept_only_if_it_lowers_the_trial_windows_loss_by_more_than_the_gain(tiny, ratio, kept):
    """Losses with the level `ratio` x those without it over the window: decided once, at the decision,
    from the window's iterations only (the loss without the level is computed there alone)."""
    deformation, asked, said = _trial(tiny, {iteration: ratio for iteration in WINDOW})
    assert asked == list(WINDOW) and WINDOW.stop - 1 == DECISION and len(WINDOW) > 1
    assert deformation.kept == kept and deformation.trial_ratios == [pytest.approx(ratio)]
    assert len(said) == 1 and f"{ratio:.3f} x the loss without it" in said[0]
    assert said[0].endswith("kept" if kept == 2 else "dropped")


@pytest.mark.parametrize("spacing, bar", [(8.0, 1 - LEVEL_GAIN), (0.0, 1 - LEVEL_GAIN_TRILINEAR)])
def test_a_level_between_the_two_bars_is_kept_with_a_trilinear_displacement_and_dropped_with_a_refined_one(
        spacing, bar):
    """The bar follows the displacement's representation: 0.97 for a trilinear one, 0.94 for the finer
    level's cubic refinement, under which the level lowers the chest's loss by 4-5 % without helping it."""
    preset = dataclasses.replace(ADAPTIVE, displacement_spacing=spacing)
    assert training.keep_below(preset) == pytest.approx(bar)
    deformation = Deformation(preset, (3, 3, 3), None, torch.Generator().manual_seed(0), 0.0)
    deformation.add_trial_losses(1, 0.95, 1.0)
    training._try_level(deformation, preset, DECISION, lambda line: None)
    assert deformation.kept == (2 if spacing == 0 else 1)


def test_the_decision_sums_the_window_rather_than_reading_its_last_iteration(tiny):
    """A level that lowers the loss by 20 % over its window but not at the decision's own iteration is
    kept; losses before the window (here 3x) count for nothing."""
    losses = {iteration: 0.8 for iteration in WINDOW} | {DECISION: 1.0}
    losses |= {iteration: 3.0 for iteration in range(ADAPTIVE.level_iteration(1), WINDOW.start)}
    deformation, _, said = _trial(tiny, losses)
    expected = (0.8 * (len(WINDOW) - 1) + 1.0) / len(WINDOW)
    assert deformation.kept == 2 and deformation.trial_ratios == [pytest.approx(expected)], said


@pytest.mark.parametrize("segmented", [False, True])
def test_with_charbonnier_the_decision_reads_the_squared_error_with_and_without_the_level(tiny, monkeypatch,
                                                                                         segmented):
    """The bar is calibrated on squared errors (under the Charbonnier penalty the shrinking tumour's ratio,
    0.988, lies above the chest's, 0.981): the recorded ratio is the mean squared error's over the window's
    own uniform draws, whatever the training loss, also when the default's segmentation guides the draws
    (the squared error with the level then comes from the training pass's residuals)."""
    sums = torch.zeros(2, dtype=torch.float64)
    weigh = training._weigh_level

    def summing(deformation, prior, series, measure, preset, iteration, drawn, loss):
        which, voxels, levels = drawn
        if training._trial_level(deformation, preset, iteration) == 1 and levels == 2:
            with torch.no_grad():
                sums[0] += training._mean_squared_error(deformation, prior, series, which, voxels, 2)[0].item()
                sums[1] += training._mean_squared_error(deformation, prior, series, which, voxels, 1)[0].item()
        weigh(deformation, prior, series, measure, preset, iteration, drawn, loss)

    monkeypatch.setattr(training, "_weigh_level", summing)
    follow_ups = [(tiny.times[k], tiny.images[k]) for k in (1, 2)]
    preset = dataclasses.replace(ADAPTIVE, similarity="charbonnier")
    segmentation = tiny.labelmaps[0] if segmented else None
    model = fit(tiny.images[0], tiny.times[0], follow_ups, segmentation, Options(preset, seed=0), Reporter())
    assert model.preset.structure_points == (0.1 if segmented else 0.0)
    assert float(sums[1]) > 0
    assert model.deformation.trial_ratios == [pytest.approx(float(sums[0] / sums[1]), rel=1e-6)]


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
    assert dropped.deformation.velocity_shape == dropped.deformation.shapes[0]
    assert field.shape[2:] == dropped.deformation.displacement_shape
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
    assert kept.deformation.velocity_shape == kept.deformation.shapes[1]
    assert kept.displacement_grid(1.0).shape[2:] == kept.deformation.displacement_shape


@pytest.mark.parametrize("stop", [WINDOW.start, DECISION + 3])
def test_a_fit_interrupted_inside_or_after_its_level_trial_resumes_bit_identical(tiny, tmp_path, monkeypatch, stop):
    """Inside the trial's window the sums so far are in the checkpoint: the resumed fit records the
    same ratio (level_ratios is in the compared state)."""
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
    assert "warning: with 40 Def-Net iterations velocity level 2 is tried for 16, not 200" in result.stderr
    said = [line for line in result.stderr.splitlines()
            if line.startswith(f"velocity level 2 at Def-Net iteration {DECISION}:")]
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
    saved.add_trial_losses(1, 0.98, 1.0)
    saved.record_trial(1)
    state = {k: v for k, v in saved.state_dict().items() if k not in ("levels_kept", "level_ratios", "trial_losses")}
    loaded = Deformation(ADAPTIVE, (3, 3, 3), None, generator, 0.0)
    loaded.load_state_dict(state)
    assert loaded.kept == 2 and loaded.trial_ratios == [None]
    loaded.load_state_dict(saved.state_dict())
    assert loaded.kept == 1 and loaded.trial_ratios == [pytest.approx(0.98)]


def test_short_range_run_records_and_reports_each_pairs_level_decision(tmp_path):
    """The short-range scheme fits one model per pair: each pair's time point records what its fit did,
    as the long-range run records it for the whole series, and the report gives every pair's decision."""
    files = write_series(breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3, noise_hu=0),
                         tmp_path / "data")
    output = tmp_path / "run"
    result = stnerp("train", "--reference", files["images"][0], "--follow-up", files["images"][1], 1,
                    "--follow-up", files["images"][2], 2, "--iterations", 40, "--velocity-levels", "auto",
                    "--scheme", "short", "--output", output)
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("velocity level 2 at Def-Net iteration")]
    entries = json.loads((output / "run.json").read_text())["time_points"]
    page = (output / "report" / "index.html").read_text()
    assert [entry["time"] for entry in entries] == [1, 2] and len(said) == 2
    for entry, line in zip(entries, said):
        ratio, = entry["velocity_level_ratios"]
        kept = entry["velocity_levels_kept"]
        assert entry["defnet_iterations"] == 40 and entry["velocity_level_keep_below"] == pytest.approx(1 - LEVEL_GAIN)
        assert f"the loss with it is {ratio:.3f} x" in line and line.endswith("kept" if kept == 2 else "dropped")
        pair = f"pair {entry['reference_time']:g} → {entry['time']:g}: "
        assert f"<td>{pair}velocity levels kept</td><td>{kept} of 2</td>" in page
        decision = "kept" if kept == 2 else "dropped"
        assert (f"<td>{pair}velocity level 2: loss with it / without it at its trial</td>"
                f"<td>{ratio:.3f} ({decision}") in page
