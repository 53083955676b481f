"""The preset option anchor_reference (on in the default preset): the velocity is
Def-Net(x, t) - Def-Net(x, t_ref), so the reference time is the identity exactly, also after the
model is saved and loaded; --no-anchor-reference switches it off."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from STNeRPLib import training
from STNeRPLib.deformation import Deformation
from STNeRPLib.integration import sample
from STNeRPLib.model import SeriesModel
from STNeRPLib.phantom import breathing_series
from STNeRPLib.pipeline import fit
from STNeRPLib.preprocessing import IntensityWindow
from STNeRPLib.presets import DEFAULT, Options
from STNeRPLib.priors import ImagePrior
from STNeRPLib.progress import Reporter

ANCHORED = DEFAULT
FREE = dataclasses.replace(DEFAULT, anchor_reference=False)


def _perturbed(preset, anchor: float) -> Deformation:
    torch.manual_seed(3)              # biases are drawn by torch's global generator
    deformation = Deformation(preset, (5, 6, 7), None, torch.Generator().manual_seed(0), anchor)
    with torch.no_grad():
        for parameter in deformation.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape))
    return deformation


def test_anchored_velocity_is_zero_at_the_anchor_and_the_difference_elsewhere():
    anchored, free = _perturbed(ANCHORED, 0.4), _perturbed(FREE, 0.4)
    with torch.no_grad():
        v, w = anchored.velocity([0.0, 0.4, 1.0]), free.velocity([0.0, 0.4, 1.0])
        u = anchored.displacement([0.4])
    assert float(w[1].abs().max()) > 1e-3                 # the network alone is not zero there
    assert float(v[1].abs().max()) == 0.0 and float(u.abs().max()) == 0.0
    np.testing.assert_allclose(v[2].numpy(), (w[2] - w[1]).numpy(), atol=1e-6)


def test_saved_anchored_model_is_the_identity_at_the_reference_time(tmp_path):
    """Reference in the middle of the series (t = 2 of 1..3): |u| there < 0.01 mm after save and load."""
    series = breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3, noise_hu=0)
    follow_ups = [(1.0, series.images[1]), (3.0, series.images[2])]
    model = fit(series.images[0], 2.0, follow_ups, None,
                Options(ANCHORED.with_iterations(20), seed=0), Reporter())
    model.save(tmp_path / "model.pt")
    loaded = SeriesModel.load(tmp_path / "model.pt", torch.device("cpu"))
    at_reference = loaded.displacement_grid(2.0)
    assert float(at_reference.abs().max()) < 0.01 / max(series.images[0].GetSpacing())
    assert float(loaded.displacement_grid(3.0).abs().max()) > 1e-4
    unanchored = fit(series.images[0], 2.0, follow_ups, None, Options(FREE.with_iterations(20), seed=0), Reporter())
    assert float(unanchored.displacement_grid(2.0).abs().max()) > 1e-4     # what the anchor removes


def test_worker_with_anchor_reference_writes_the_identity_at_the_reference_time(tmp_path):
    """`stnerp train` (the default preset anchors): the reference time's displacement file is exactly zero
    everywhere, and the preset recorded in run.json says so; with --no-anchor-reference it is not."""
    import json

    import SimpleITK as sitk

    from STNeRPLib.phantom import write_series
    from worker_cli import stnerp

    files = write_series(breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 14.0), n_phases=3, noise_hu=0),
                         tmp_path / "data")
    largest = {}
    for flag in ([], ["--no-anchor-reference"]):
        output = tmp_path / ("free" if flag else "default")
        result = stnerp("train", "--reference", files["images"][0], "--follow-up", files["images"][1], 1,
                        "--follow-up", files["images"][2], 2, "--iterations", 30, "--output", output, "--no-report",
                        *flag)
        assert result.returncode == 0, result.stderr
        record = json.loads((output / "run.json").read_text())
        assert record["parameters"]["preset"]["anchor_reference"] is (not flag)
        at_reference = sitk.ReadImage(str(output / record["time_points"][0]["displacement"]))
        largest[not flag] = float(np.abs(sitk.GetArrayFromImage(at_reference)).max())
    assert largest[True] == 0.0 and largest[False] > 0.01


def test_training_skips_integrating_the_anchored_reference_with_the_same_loss_and_gradients(monkeypatch):
    """The reference is drawn among the training times; anchored, u is the identity there by construction,
    so Def-Net's loss does not integrate it (the integration sees the follow-ups alone), and the loss and
    every gradient equal those of integrating every drawn time."""
    series = breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3, noise_hu=0)
    window = IntensityWindow.for_image(series.images[0], "ct")
    targets = [training.Target(t, image, window) for t, image in zip((0.0, 0.5, 1.0), series.images)]
    drawn = training._Series.of(targets, torch.device("cpu"))
    prior = ImagePrior(torch.from_numpy(window.normalise(sitk.GetArrayFromImage(series.images[0]))).float(), "cubic")
    deformation = _perturbed(ANCHORED, 0.0)
    which, voxels = [2, 0, 1], drawn.choose_voxels([2, 0, 1], 512, torch.Generator().manual_seed(1))

    integrated = []
    displacement = deformation.displacement
    monkeypatch.setattr(deformation, "displacement",
                        lambda times, **kwargs: integrated.append(list(times)) or displacement(times, **kwargs))
    loss, per_time, _ = training._mean_squared_error(deformation, prior, drawn, which, voxels, 1)
    gradients = torch.autograd.grad(loss, list(deformation.parameters()), allow_unused=True)
    assert integrated == [[1.0, 0.5]]

    c = drawn.points[voxels]
    u = sample(displacement([drawn.times[i] for i in which], levels=1), c)
    every = ((prior((c + u).reshape(-1, 3)).reshape(voxels.shape) - drawn.observed(which, voxels)) ** 2)
    assert float(every[1].detach().abs().max()) < 1e-8                      # the reference's rows: no error left
    assert loss.item() == pytest.approx(every.mean().item(), rel=1e-6)
    np.testing.assert_allclose(per_time.numpy(), every.detach().mean(dim=1).numpy(), rtol=1e-5, atol=1e-9)
    expected = torch.autograd.grad(every.mean(), list(deformation.parameters()), allow_unused=True)
    compared = [(g, e) for g, e in zip(gradients, expected) if e is not None]
    scale = max(float(e.abs().max()) for _, e in compared)        # the output bias cancels: float noise
    assert compared and scale > 0 and all(torch.allclose(g, e, rtol=1e-4, atol=1e-6 * scale) for g, e in compared)


@pytest.mark.parametrize("preset", [ANCHORED, FREE], ids=["anchored", "free"])
def test_outputs_at_the_anchored_reference_time_are_the_reference_scan_and_its_labelmap_exactly(tmp_path, preset):
    """Anchored, the reference time's outputs are the reference itself, bit for bit: the predicted image is the
    reference scan (not its cubic B-spline resampling through a zero field), the labelmap the reference's, the
    displacement and the inverse 0, the Jacobian 1. Without the anchor the map there is only near the identity, and
    the outputs are evaluated through it (the image then differs from the scan)."""
    from STNeRPLib.geometry import Grid
    from STNeRPLib.outputs import TimePoint, write_time_point

    series = breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3, noise_hu=5)
    follow_ups = [(1.0, series.images[1]), (2.0, series.images[2])]
    model = fit(series.images[0], 0.0, follow_ups, series.labelmaps[0], Options(preset.with_iterations(20), seed=0),
                Reporter())
    entry = write_time_point(model, TimePoint(0.0, Grid.of(series.images[0]), series.images[0]), tmp_path, None).entry

    def read(key: str) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / entry[key])))

    reference = sitk.GetArrayFromImage(series.images[0]).astype(np.float32)
    if preset is FREE:
        assert float(np.abs(read("image") - reference).max()) > 1e-3
        return
    assert np.array_equal(read("image"), reference)
    assert np.array_equal(read("labelmap"), sitk.GetArrayFromImage(series.labelmaps[0]))
    assert not read("displacement").any() and not read("inverse_displacement").any()
    assert np.all(read("jacobian") == 1.0)
    assert entry["image_sources"] == [0.0] and entry["metrics"]["folded_voxels"] == 0
