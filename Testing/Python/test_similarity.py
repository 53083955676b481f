"""Def-Net's similarity and its batched evaluation.

--similarity lncc registers follow-ups whose intensities changed (a linear change of intensity
between scans, as CBCT or contrast give), where the mean squared error is drawn to the wrong
intensities. Measured (4-phase 32 x 32 x 24 phantom at 9 x 9 x 10 mm, follow-ups 0.6 x HU plus up to
200 HU, 150 iterations): TRE 1.1 / 1.5 / 0.9 mm with lncc, 8.1 / 15.4 / 24.3 mm with mse, 2.8 / 5.6 /
2.8 mm unregistered."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from STNeRPLib.deformation import Deformation
from STNeRPLib.metrics import target_registration_error
from STNeRPLib.phantom import breathing_series, write_series
from STNeRPLib.presets import DEFAULT
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
