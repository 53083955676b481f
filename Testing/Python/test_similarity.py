"""Def-Net's similarity and its batched evaluation.

--similarity lncc registers follow-ups whose intensities changed (a linear change of intensity
between scans, as CBCT or contrast give), where the mean squared error is drawn to the wrong
intensities. Measured (4-phase 32 x 32 x 24 phantom at 9 x 9 x 10 mm, follow-ups 0.6 x HU plus up to
200 HU, 150 iterations): TRE 1.1 / 1.5 / 0.9 mm with lncc, 8.1 / 15.4 / 24.3 mm with mse, 2.8 / 5.6 /
2.8 mm unregistered; since the default calibrates such follow-ups onto the reference's numbers
(preprocessing.intensity_calibration), 0.87 / 1.41 / 1.21 with lncc and 1.29 / 1.77 / 1.59 with mse.

--similarity charbonnier is held by a residual no motion removes. Measured on the same phantom with a
36 mm cube of +600 HU in the right lung of every follow-up (150 iterations): TRE 0.96 / 1.52 / 1.10 mm
with charbonnier, 1.37 / 1.86 / 1.60 mm with mse; without the cube 0.90 / 1.44 / 1.00 and 1.02 / 1.54 /
1.26 mm."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from STNeRPLib import training
from STNeRPLib.deformation import Deformation
from STNeRPLib.metrics import target_registration_error
from STNeRPLib.phantom import breathing_series, write_series
from STNeRPLib.presets import CHARBONNIER_EPSILON, DEFAULT
from worker_cli import stnerp


@pytest.fixture(scope="module")
def contrast_changed(tmp_path_factory):
    """The 4-phase phantom on disk, each follow-up k at 0.6 x HU + 200 k / 3 HU (the reference as is)."""
    folder = tmp_path_factory.mktemp("contrast")
    series = breathing_series(size=(32, 32, 24), spacing=(9.0, 9.0, 10.0), n_phases=4, noise_hu=0)
    files = write_series(series, folder)
    for k, path in enumerate(files["images"][1:], 1):
        image = series.images[k]
        changed = sitk.GetImageFromArray(0.6 * sitk.GetArrayFromImage(image) + 200.0 * k / 3)
        changed.CopyInformation(image)
        sitk.WriteImage(changed, str(path))
    return series, files


@pytest.fixture(scope="module")
def structure_appeared(tmp_path_factory):
    """The 4-phase phantom on disk, each follow-up with a 36 mm cube of +600 HU about its right lung's
    centre: a change of intensity that no motion of the reference explains."""
    folder = tmp_path_factory.mktemp("appeared")
    series = breathing_series(size=(32, 32, 24), spacing=(9.0, 9.0, 10.0), n_phases=4, noise_hu=0)
    files = write_series(series, folder)
    for k, path in enumerate(files["images"][1:], 1):
        array = sitk.GetArrayFromImage(series.images[k])
        z, y, x = np.argwhere(sitk.GetArrayFromImage(series.labelmaps[k]) == 2).mean(axis=0).astype(int)
        array[z - 2:z + 2, y - 2:y + 2, x - 2:x + 2] += 600.0
        changed = sitk.GetImageFromArray(array)
        changed.CopyInformation(series.images[k])
        sitk.WriteImage(changed, str(path))
    return series, files


def _train(series, files, output, similarity: str) -> dict:
    args = ["train", "--reference", files["images"][0], "--reference-time", series.times[0], "--output", output,
            "--landmarks", files["landmarks"], "--iterations", 150, "--prior", "image", "--similarity", similarity,
            "--no-report"]
    for path, t in zip(files["images"][1:], series.times[1:]):
        args += ["--follow-up", path, t]
    result = stnerp(*args)
    assert result.returncode == 0, result.stderr
    return json.loads((output / "run.json").read_text())


def test_lncc_registers_follow_ups_whose_contrast_changed(contrast_changed, tmp_path):
    """With lncc every follow-up's TRE is below 0.6 x unregistered and below what mse reaches."""
    series, files = contrast_changed
    lncc, mse = (_train(series, files, tmp_path / name, name) for name in ("lncc", "mse"))
    assert lncc["parameters"]["preset"]["similarity"] == "lncc"
    for k in (1, 2, 3):
        points, reference_points = series.landmarks[k]
        unregistered = target_registration_error(points, reference_points)["tre_mean"]
        with_lncc, with_mse = ({p["time"]: p["metrics"]["tre_mean"] for p in run["time_points"]}[series.times[k]]
                               for run in (lncc, mse))
        assert with_lncc < 0.6 * unregistered, (k, with_lncc, unregistered)
        assert with_lncc < with_mse, (k, with_lncc, with_mse)


def _tre(run: dict, t: float) -> float:
    return {p["time"]: p["metrics"]["tre_mean"] for p in run["time_points"]}[t]


def test_charbonnier_registers_follow_ups_in_which_a_structure_appeared_better_than_mse(structure_appeared, tmp_path):
    """The cube's large residual drags the mean squared error's field; the Charbonnier penalty's pull
    does not grow with the residual: every follow-up's TRE is lower with it, and below 0.6 x unregistered."""
    series, files = structure_appeared
    charbonnier, mse = (_train(series, files, tmp_path / name, name) for name in ("charbonnier", "mse"))
    assert charbonnier["parameters"]["preset"]["similarity"] == "charbonnier"
    for k in (1, 2, 3):
        unregistered = target_registration_error(*series.landmarks[k])["tre_mean"]
        with_charbonnier, with_mse = _tre(charbonnier, series.times[k]), _tre(mse, series.times[k])
        assert with_charbonnier < 0.6 * unregistered, (k, with_charbonnier, unregistered)
        assert with_charbonnier < with_mse, (k, with_charbonnier, with_mse)


def test_charbonnier_penalty_is_the_squared_error_for_small_residuals_and_pulls_no_harder_for_large_ones():
    residual = torch.tensor([1e-4, -1e-4, 0.1, 1.0, -1.0], requires_grad=True)
    penalty = training._charbonnier(residual)
    penalty.sum().backward()
    np.testing.assert_allclose(penalty[:2].detach().numpy(), [1e-8, 1e-8], rtol=1e-3)
    pull = residual.grad.abs()
    assert float(pull.max()) <= 2 * CHARBONNIER_EPSILON
    assert float(pull[3]) == pytest.approx(float(pull[2]), rel=0.01)    # 10 x the residual, the same pull
    assert float(penalty[3].detach()) == pytest.approx(2 * CHARBONNIER_EPSILON * (1.0 - CHARBONNIER_EPSILON), rel=1e-4)


@pytest.mark.parametrize("pairwise", [None, [0.0, 0.4, 1.0]])
def test_velocity_of_several_times_equals_each_time_alone(pairwise):
    """One batched evaluation of several times (and a chunked one) gives each time's own velocity, through
    both of the default's velocity levels."""
    torch.manual_seed(3)
    deformation = Deformation(DEFAULT, (5, 6, 7), pairwise, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for parameter in deformation.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape))
        times = [0.0, 0.4, 1.0]
        together = deformation.velocity(times)
        chunked = deformation.velocity(times, chunk=37)
        alone = torch.cat([deformation.velocity([t]) for t in times])
    assert together.shape == (3, 3, 9, 11, 13)          # the 16 mm level's grid
    assert float(alone.abs().max()) > 1e-3
    # float32 products of another blocking: up to 4e-5 relative on the finer level (|v| ~ 0.4)
    np.testing.assert_allclose(together.numpy(), alone.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(chunked.numpy(), alone.numpy(), rtol=1e-4, atol=1e-5)
