"""The learning-rate schedule (schedule.DecaySchedule) and stopping on convergence
(preset stop_on_convergence): constant until the loss plateaus, then a cosine decay that ends the fit."""
from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch

from STNeRPLib.checkpoint import Checkpoint
from STNeRPLib.optimizer import Adam
from STNeRPLib.phantom import breathing_series, write_series
from STNeRPLib.pipeline import fit
from STNeRPLib.presets import DEFAULT, Options
from STNeRPLib.progress import Reporter
from STNeRPLib.schedule import PLATEAU_PATIENCE, PLATEAU_WINDOW, DecaySchedule
from STNeRPLib.training import _deformation_schedule
from worker_cli import stnerp


def _rates(schedule: DecaySchedule, losses) -> list[float]:
    """The rate of each iteration until the schedule's end; losses(iteration) -> {time index: loss}."""
    optimizer = schedule.optimizer
    rates, iteration = [], 0
    while iteration < schedule.end:
        iteration += 1
        rates.append(optimizer.param_groups[0]["lr"])
        drawn = losses(iteration)
        schedule.observe(iteration, list(drawn), torch.tensor(list(drawn.values()), dtype=torch.float64))
        optimizer.step()
        schedule.step()
    return rates


def _schedule(iterations: int, **kwargs) -> DecaySchedule:
    optimizer = Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    return DecaySchedule(optimizer, iterations, 0.1, **kwargs)


def test_cosine_runs_from_the_initial_rate_to_the_final_one_at_the_last_iteration():
    rates = _rates(_schedule(10), lambda iteration: {0: 1.0})
    assert len(rates) == 10
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-4)
    assert all(later < earlier for earlier, later in zip(rates, rates[1:]))


def test_a_hold_keeps_the_initial_rate_then_the_cosine_reaches_the_final_rate_at_the_last_iteration():
    rates = _rates(_schedule(10, hold=4), lambda iteration: {0: 1.0})
    assert len(rates) == 10
    assert rates[:5] == pytest.approx([1e-3] * 5) and rates[-1] == pytest.approx(1e-4)
    assert all(later < earlier for earlier, later in zip(rates[4:], rates[5:]))


def test_def_nets_rate_is_held_for_the_presets_lr_hold_of_its_iterations():
    preset = dataclasses.replace(DEFAULT, def_iterations=100, lr_hold=0.3, lr_final=0.1)
    optimizer = Adam([torch.zeros(1, requires_grad=True)], lr=preset.def_lr)
    rates = _rates(_deformation_schedule(optimizer, preset), lambda iteration: {0: 1.0})
    assert rates[:31] == pytest.approx([preset.def_lr] * 31) and rates[31] < preset.def_lr
    assert rates[-1] == pytest.approx(preset.lr_final * preset.def_lr) and len(rates) == 100


def test_a_plateau_begins_the_decay_and_ends_the_fit_decay_iterations_later():
    schedule = _schedule(1000, decay=300)
    rates = _rates(schedule, lambda iteration: {0: 0.5, 1: 2.0, 2: 1.0})
    plateau = PLATEAU_WINDOW * (PLATEAU_PATIENCE + 1)   # the first check sets the best, then patience
    assert schedule.decay_start == plateau and schedule.end == plateau + 300 == len(rates)
    assert rates[:plateau + 1] == pytest.approx([1e-3] * (plateau + 1))
    assert rates[-1] == pytest.approx(1e-4)


def test_a_loss_still_falling_is_no_plateau_and_the_decay_takes_the_last_iterations():
    schedule = _schedule(1000, decay=300)
    rates = _rates(schedule, lambda iteration: {0: 0.998 ** iteration})   # 9.5 % in 50 iterations
    assert schedule.end == 1000 == len(rates) and schedule.decay_start == 700
    assert rates[699] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-4)


def test_a_change_in_which_time_points_are_drawn_is_not_progress():
    """Each time point's loss is constant: 100 at time 0, 1 at time 1. The draws move from time 0 to time 1
    at iteration 176; a running mean over the drawn losses would take that fall for progress."""
    def drawn(iteration: int) -> dict[int, float]:
        if iteration <= 2:
            return {0: 100.0, 1: 1.0}
        return {0: 100.0} if iteration <= 175 else {1: 1.0}
    schedule = _schedule(1000, decay=300)
    _rates(schedule, drawn)
    assert schedule.decay_start == PLATEAU_WINDOW * (PLATEAU_PATIENCE + 1)


def test_no_plateau_is_taken_before_the_earliest_iteration():
    schedule = _schedule(1000, decay=300, earliest=420)
    _rates(schedule, lambda iteration: {0: 1.0})
    assert schedule.decay_start == 450 and schedule.end == 750


@pytest.fixture(scope="module")
def tiny():
    return breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3, noise_hu=0)


# One velocity level: with the default's adaptive levels the plateau is looked for only after the level
# decision (Preset.levels_settled; at 2000 iterations, after iteration 600), which these tests do not need.
CONVERGING = dataclasses.replace(DEFAULT, stop_on_convergence=True, decay_iterations=40, def_iterations=2000,
                                 velocity_levels=1, adaptive_levels=False)


class _Totals(Reporter):
    """Records Def-Net's (iteration, total) reports; optionally stops the fit after one iteration."""

    def __init__(self, stop_after: int | None = None):
        super().__init__(interval=0.0)
        self.reports: list[tuple[int, int]] = []
        self.stop_after = stop_after

    def progress(self, stage, iteration, total, loss=None) -> None:
        if stage == "defnet":
            self.reports.append((iteration, total))
            if iteration == self.stop_after:
                raise KeyboardInterrupt


def _fit(series, reporter, checkpoint=None):
    follow_ups = [(series.times[k], series.images[k]) for k in (1, 2)]
    return fit(series.images[0], series.times[0], follow_ups, None, Options(CONVERGING, seed=0), reporter,
               checkpoint=checkpoint)


def test_a_converging_fit_stops_early_and_reports_its_new_total(tiny):
    reporter = _Totals()
    _fit(tiny, reporter)
    last, total = reporter.reports[-1]
    assert last == total < CONVERGING.def_iterations
    start = total - CONVERGING.decay_iterations
    assert [t for i, t in reporter.reports if i < start] == [CONVERGING.def_iterations] * (start - 1)
    assert [t for i, t in reporter.reports if i >= start] == [total] * (CONVERGING.decay_iterations + 1)


def test_a_converging_fit_interrupted_in_its_decay_resumes_bit_identical(tiny, tmp_path):
    uninterrupted = _Totals()
    whole = _fit(tiny, uninterrupted)
    end = uninterrupted.reports[-1][0]
    checkpoint_path = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        _fit(tiny, _Totals(stop_after=end - 5), Checkpoint(checkpoint_path, every=end - 10))
    resumed_reports = _Totals()
    resumed = _fit(tiny, resumed_reports, Checkpoint(checkpoint_path, every=10_000))
    assert resumed_reports.reports[0] == (end - 9, end)     # restored inside the decay, with its end
    for name, value in whole.deformation.state_dict().items():
        assert torch.equal(value, resumed.deformation.state_dict()[name]), name


def test_worker_stops_on_convergence_when_asked_and_records_it(tmp_path):
    """`stnerp train --stop-on-convergence --iterations 2000` on a small noise-free phantom: Def-Net's
    losses end long before 2000 iterations, and run.json's preset says it stopped on convergence and
    `defnet_iterations` how many it ran (a fixed count runs all of --iterations:
    test_adaptive_levels' worker test)."""
    files = write_series(breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3, noise_hu=0),
                         tmp_path / "data")
    output = tmp_path / "converging"
    result = stnerp("train", "--reference", files["images"][0], "--follow-up", files["images"][1], 1,
                    "--follow-up", files["images"][2], 2, "--iterations", 2000, "--output", output,
                    "--no-report", "--stop-on-convergence", "--velocity-levels", 1)
    assert result.returncode == 0, result.stderr
    record = json.loads((output / "run.json").read_text())
    assert record["parameters"]["preset"]["stop_on_convergence"] is True
    with open(output / "losses.csv") as handle:
        ran = sum(row["stage"] == "defnet" for row in csv.DictReader(handle))
    assert record["defnet_iterations"] == ran
    assert PLATEAU_WINDOW * (PLATEAU_PATIENCE + 1) + DEFAULT.decay_iterations <= ran < 2000


@pytest.mark.parametrize("similarity", ["mse", "lncc"])
def test_a_converging_fit_to_scans_with_a_smaller_field_of_view_stops_early(tiny, similarity):
    """Follow-ups that cover 10 of the reference's 16 slices take both losses' weighted path (each time
    point's loss over the voxels inside its field of view); the plateau is still found and the fit ends
    before its most iterations."""
    cropped = [image[:, :, 3:13] for image in tiny.images[1:]]             # 10 of 16 slices
    reporter = _Totals()
    preset = dataclasses.replace(CONVERGING, similarity=similarity)
    fit(tiny.images[0], tiny.times[0], list(zip(tiny.times[1:], cropped)), None, Options(preset, seed=0), reporter)
    last, total = reporter.reports[-1]
    assert last == total < CONVERGING.def_iterations
