"""The preset option velocity_levels (--velocity-levels): a coarse-to-fine velocity, each finer level a
residual on a grid of half the spacing, switched on late in training and starting as no change."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from STNeRPLib import training
from STNeRPLib.deformation import Deformation
from STNeRPLib.model import SeriesModel
from STNeRPLib.phantom import breathing_series
from STNeRPLib.pipeline import fit
from STNeRPLib.preprocessing import IntensityWindow
from STNeRPLib.presets import DEFAULT, Options
from STNeRPLib.progress import Reporter
from worker_cli import stnerp

ONE_LEVEL = dataclasses.replace(DEFAULT, velocity_levels=1, adaptive_levels=False)
LEVELLED = dataclasses.replace(DEFAULT, velocity_levels=2, adaptive_levels=False)


@pytest.fixture(scope="module")
def tiny():
    return breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3, noise_hu=0)


def _fit(series, preset):
    follow_ups = [(series.times[k], series.images[k]) for k in (1, 2)]
    return fit(series.images[0], series.times[0], follow_ups, None, Options(preset, seed=0), Reporter())


class _Ramp(torch.nn.Module):
    """A prior whose intensity rises along x: every displacement changes the loss."""

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return 0.5 + 0.4 * points[..., 0]


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_finer_levels_learn_at_level_lr_scale_times_def_lr(tiny, scale):
    """Adam's first step moves each weight by its learning rate (g / |g|): the coarse output layer by
    def_lr, the finer one (the only finer weights with a gradient at its zero start) by scale x def_lr."""
    preset = dataclasses.replace(LEVELLED, level_start=0.0, level_lr_scale=scale, def_iterations=1)
    deformation = Deformation(preset, (3, 3, 3), None, torch.Generator().manual_seed(0), 0.0)
    coarse, fine = deformation.nets[0].mlp[-1].weight, deformation.finer[0][0].mlp[-1].weight
    before = coarse.detach().clone(), fine.detach().clone()
    window = IntensityWindow.for_image(tiny.images[0], "ct")
    targets = [training.Target(t, image, window) for t, image in zip(tiny.times, tiny.images)]
    training.fit_deformation(deformation, _Ramp(), targets, preset, lambda *args: None,
                             torch.Generator().manual_seed(1))
    coarse_step, fine_step = (float((w.detach() - b).abs().max()) for w, b in zip((coarse, fine), before))
    assert coarse_step == pytest.approx(preset.def_lr, rel=1e-3)
    assert fine_step == pytest.approx(scale * preset.def_lr, rel=1e-3)


def test_finer_level_starts_as_the_coarse_velocity_upsampled():
    torch.manual_seed(3)
    deformation = Deformation(LEVELLED, (5, 6, 7), None, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for parameter in deformation.nets.parameters():      # a coarse velocity far from zero
            parameter.add_(0.1 * torch.randn(parameter.shape))
        coarse = deformation.velocity([0.0, 0.7], levels=1)
        fine = deformation.velocity([0.0, 0.7])
    assert deformation.shapes == [(5, 6, 7), (9, 11, 13)] and fine.shape == (2, 3, 9, 11, 13)
    assert float(coarse.abs().max()) > 1e-2
    upsampled = F.interpolate(coarse, size=(9, 11, 13), mode="trilinear", align_corners=True)
    np.testing.assert_allclose(fine.numpy(), upsampled.numpy(), atol=1e-7)
    np.testing.assert_allclose(fine[:, :, ::2, ::2, ::2].numpy(), coarse.numpy(), atol=1e-7)   # nested nodes


def test_coarse_level_trains_as_a_single_grid_until_the_finer_level_is_switched_on(tiny):
    """With the switch after the last iteration the coarse network ends bit-identical to a one-level fit
    (the finer level draws nothing from the fit's generators) and the finer level is untouched."""
    single = _fit(tiny, ONE_LEVEL.with_iterations(12))
    never = _fit(tiny, dataclasses.replace(LEVELLED, level_start=1.0).with_iterations(12))
    for name, value in single.deformation.nets.state_dict().items():
        assert torch.equal(value, never.deformation.nets.state_dict()[name]), name
    assert float(never.deformation.finer[0][0].mlp[-1].weight.detach().abs().max()) == 0.0
    switched = _fit(tiny, LEVELLED.with_iterations(12))
    assert float(switched.deformation.finer[0][0].mlp[-1].weight.detach().abs().max()) > 0.0


def test_saved_levelled_model_gives_the_same_field_after_loading(tiny, tmp_path):
    model = _fit(tiny, LEVELLED.with_iterations(20))
    model.save(tmp_path / "model.pt")
    loaded = SeriesModel.load(tmp_path / "model.pt", torch.device("cpu"))
    before, after = model.displacement_grid(2.0), loaded.displacement_grid(2.0)
    assert model.deformation.velocity_shape == model.deformation.shapes[1]
    assert after.shape[2:] == model.deformation.displacement_shape
    assert torch.equal(before, after)
    with torch.no_grad():
        without_fine = loaded.deformation.displacement([loaded.normalised_time(2.0)], levels=1)
    assert float((F.interpolate(without_fine, size=after.shape[2:], mode="trilinear", align_corners=True)
                  - after).abs().max()) > 1e-6       # the finer level is part of what was saved


def test_model_saved_before_velocity_levels_loads_as_one_level(tiny, tmp_path):
    """A model file written before the options existed (no velocity_levels or adaptive_levels in its
    preset, no levels_kept or level_ratios in its state) still loads, as the one level it was."""
    model = _fit(tiny, ONE_LEVEL.with_iterations(5))
    model.save(tmp_path / "model.pt")
    data = torch.load(tmp_path / "model.pt", weights_only=True)
    for key in ("velocity_levels", "level_start", "level_width", "level_sigma", "adaptive_levels"):
        del data["preset"][key]
    del data["deformation"]["levels_kept"], data["deformation"]["level_ratios"]
    torch.save(data, tmp_path / "old.pt")
    loaded = SeriesModel.load(tmp_path / "old.pt", torch.device("cpu"))
    assert loaded.preset.velocity_levels == 1
    assert torch.equal(loaded.displacement_grid(2.0), model.displacement_grid(2.0))


def _files(series, folder):
    paths = []
    for k, image in enumerate(series.images):
        paths.append(folder / f"p{k}.nrrd")
        sitk.WriteImage(image, str(paths[-1]))
    return paths


def test_worker_trains_and_predicts_with_velocity_levels(tiny, tmp_path):
    p0, p1, p2 = _files(tiny, tmp_path)
    run = tmp_path / "run"
    trained = stnerp("train", "--reference", p0, "--follow-up", p1, 1, "--follow-up", p2, 2, "--iterations", 20,
                     "--velocity-levels", 2, "--no-report", "--output", run)
    assert trained.returncode == 0, trained.stderr
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "complete" and record["parameters"]["preset"]["velocity_levels"] == 2
    state = torch.load(run / "model.pt", weights_only=True)["deformation"]
    assert any(key.startswith("finer.0.0.") for key in state)
    predicted = stnerp("predict", "--run", run, "--times", 1.5, "--output", tmp_path / "p")
    assert predicted.returncode == 0, predicted.stderr
    field = sitk.ReadImage(str(tmp_path / "p" / "t_1.5" / "displacement.nrrd"))
    assert field.GetSize() == tiny.images[0].GetSize()
    assert float(np.abs(sitk.GetArrayFromImage(field)).max()) > 0.0


@pytest.mark.parametrize("arguments, named", [(["--velocity-levels", 0], "--velocity-levels 0"),
                                              (["--velocity-levels", "two"], "neither a positive number nor auto"),
                                              (["--velocity-levels", 2, "--preset", "paper"], "image grid")])
def test_worker_refuses_velocity_levels_it_cannot_make(tiny, tmp_path, arguments, named):
    p0, p1, _ = _files(tiny, tmp_path)
    refused = stnerp("train", "--reference", p0, "--follow-up", p1, 1, "--iterations", 2, "--no-report",
                     "--output", tmp_path / "run", *arguments)
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], refused.stderr


def test_anchored_levelled_velocity_is_zero_at_the_anchor_on_every_level():
    """With anchor_reference each level subtracts its own value at the reference time."""
    torch.manual_seed(3)
    preset = dataclasses.replace(LEVELLED, anchor_reference=True)
    deformation = Deformation(preset, (5, 6, 7), None, torch.Generator().manual_seed(0), 0.4)
    with torch.no_grad():
        for parameter in deformation.parameters():        # both levels far from zero
            parameter.add_(0.1 * torch.randn(parameter.shape))
        v = deformation.velocity([0.4, 0.9])
        finer_alone = deformation.velocity([0.9]) - F.interpolate(deformation.velocity([0.9], levels=1),
                                                                  size=(9, 11, 13), mode="trilinear",
                                                                  align_corners=True)
    assert float(v[0].abs().max()) == 0.0
    assert float(v[1].abs().max()) > 1e-2 and float(finer_alone.abs().max()) > 1e-3
