"""Preset.smoothing_sigma: Def-Net's fit sees the scans smoothed by a Gaussian of that many voxels along each
axis; the model keeps, and every output carries, the scans as given."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from STNeRPLib.phantom import breathing_series, write_series
from STNeRPLib.pipeline import fit
from STNeRPLib.preprocessing import smoothed
from STNeRPLib.presets import DEFAULT, Options
from STNeRPLib.progress import Reporter
from worker_cli import stnerp


def test_smoothing_spreads_an_impulse_by_sigma_voxels_along_each_axis_whatever_the_spacing():
    array = np.zeros((21, 21, 21), np.float32)
    array[10, 10, 10] = 1000
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 1.5, 4.0))
    image.SetOrigin((-3.0, 12.5, 40.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    result = smoothed(image, 1.0)
    spread = sitk.GetArrayFromImage(result).astype(np.float64)
    assert np.isclose(spread.sum(), 1000.0, rtol=1e-4)
    offsets = np.arange(21) - 10.0
    for axis in range(3):
        profile = spread.sum(axis=tuple(a for a in range(3) if a != axis))
        assert np.isclose((profile * offsets).sum(), 0.0, atol=1e-6)
        assert np.isclose((profile * offsets ** 2).sum() / 1000.0, 1.0, atol=0.02), axis     # variance: sigma^2
    assert (result.GetSpacing(), result.GetOrigin(), result.GetDirection()) == \
        (image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    assert smoothed(image, 0.0) is image


def test_a_smoothed_integer_scan_stays_in_its_pixel_type_rounded():
    array = np.zeros((9, 9, 9), np.int16)
    array[4, 4, 4], array[0, 0, 0] = 1000, -1000
    image = sitk.GetImageFromArray(array)
    result = smoothed(image, 0.7)
    assert result.GetPixelID() == sitk.sitkInt16
    exact = smoothed(sitk.Cast(image, sitk.sitkFloat32), 0.7)
    difference = sitk.GetArrayFromImage(result) - sitk.GetArrayFromImage(exact)
    assert np.abs(difference).max() <= 0.5 and sitk.GetArrayFromImage(result)[4, 4, 4] < 1000


def test_a_smoothed_fit_is_the_fit_of_the_smoothed_scans_and_keeps_the_scans_as_given():
    """The same Def-Net, parameter for parameter, as a fit without smoothing of scans smoothed beforehand; yet
    the model holds the scans it was given (the outputs resample those)."""
    series = breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3, seed=2)
    preset = replace(DEFAULT, def_iterations=15, velocity_levels=1, adaptive_levels=False)
    follow_ups = list(zip(series.times[1:], series.images[1:]))

    def fitted(sigma: float, images: list[sitk.Image]):
        options = Options(replace(preset, smoothing_sigma=sigma), device="cpu")
        model = fit(images[0], series.times[0], list(zip(series.times[1:], images[1:])), series.labelmaps[0],
                    options, Reporter(interval=1e9))
        return model

    smoothed_fit = fitted(0.8, series.images)
    beforehand = fitted(0.0, [smoothed(image, 0.8) for image in series.images])
    unsmoothed = fitted(0.0, series.images)
    ours, theirs, plain = (dict(m.deformation.named_parameters()) for m in (smoothed_fit, beforehand, unsmoothed))
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert not all(torch.equal(ours[name], plain[name]) for name in ours)
    for t, image in [(series.times[0], series.images[0])] + follow_ups:
        assert np.array_equal(sitk.GetArrayViewFromImage(smoothed_fit.scan(t)), sitk.GetArrayViewFromImage(image))


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    series = breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3)
    return write_series(series, tmp_path_factory.mktemp("series"))


def _train(files, output, *extra):
    return stnerp("train", "--reference", files["images"][0], "--follow-up", files["images"][1], 1,
                  "--iterations", 5, "--output", output, "--no-report", *extra)


@pytest.mark.parametrize("extra, recorded", [((), DEFAULT.smoothing_sigma), (("--smoothing-sigma", 0), 0.0),
                                             (("--smoothing-sigma", 1.25), 1.25)])
def test_train_records_the_smoothing_it_fitted_with(on_disk, tmp_path, extra, recorded):
    result = _train(on_disk, tmp_path / "run", *extra)
    assert result.returncode == 0, result.stderr
    preset = json.loads((tmp_path / "run" / "run.json").read_text())["parameters"]["preset"]
    assert preset["smoothing_sigma"] == recorded


@pytest.mark.parametrize("value", [-0.5, 3.5, "nan"])
def test_smoothing_out_of_range_is_refused_in_one_line(on_disk, tmp_path, value):
    result = _train(on_disk, tmp_path / "run", "--smoothing-sigma", value)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"--smoothing-sigma {value}" in errors[0] and "from 0 (none)" in errors[0], errors
    record = tmp_path / "run" / "run.json"
    assert not record.exists() or '"complete"' not in record.read_text()
