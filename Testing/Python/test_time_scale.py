"""Def-Net's Fourier scale of time follows the series' length (Preset.time_sigma_halved_below, for_scans)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from STNeRPLib.model import SeriesModel
from STNeRPLib.phantom import breathing_series
from STNeRPLib.pipeline import fit
from STNeRPLib.presets import DEFAULT, PAPER, Options
from STNeRPLib.progress import Reporter


@pytest.mark.parametrize("scans, share", [(2, 0.5), (3, 0.5), (4, 0.5), (5, 1.0), (10, 1.0), (40, 1.0)])
def test_a_series_of_fewer_than_time_sigma_halved_below_scans_gets_half_the_time_scale(scans, share):
    resolved = DEFAULT.for_scans(scans)
    assert resolved.def_time_sigma == pytest.approx(DEFAULT.def_time_sigma * share)
    assert resolved.time_sigma_halved_below == 0 and resolved.for_scans(2) == resolved      # resolved once only
    assert dataclasses.replace(resolved, def_time_sigma=DEFAULT.def_time_sigma, time_sigma_halved_below=5) == DEFAULT


def test_a_preset_without_time_sigma_halved_below_keeps_its_time_scale():
    assert PAPER.for_scans(3) == PAPER
    assert dataclasses.replace(DEFAULT, time_sigma_halved_below=0).for_scans(3).def_time_sigma == DEFAULT.def_time_sigma


def test_the_fit_of_a_short_series_varies_half_as_fast_in_time_and_its_model_keeps_that(tmp_path, capsys):
    """Three scans: Def-Net's time frequencies are half those the preset's own scale draws from the same
    generator (the space ones unchanged), in the fitted model and in the model saved and loaded."""
    series = breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3, noise_hu=0)
    follow_ups = [(1.0, series.images[1]), (2.0, series.images[2])]
    options = Options(DEFAULT.with_iterations(2), seed=0)
    model = fit(series.images[0], 0.0, follow_ups, None, options, Reporter())
    assert "3 scans, fewer than 5: Def-Net's time scale halved to 0.25\n" in capsys.readouterr().err
    unresolved = fit(series.images[0], 0.0, follow_ups, None,
                     Options(dataclasses.replace(options.preset, time_sigma_halved_below=0), seed=0), Reporter())
    model.save(tmp_path / "model.pt")
    loaded = SeriesModel.load(tmp_path / "model.pt", torch.device("cpu"))
    for fitted in (model, loaded):
        assert fitted.preset.def_time_sigma == pytest.approx(DEFAULT.def_time_sigma / 2)
        frequencies = fitted.deformation.nets[0].encoding.B
        reference = unresolved.deformation.nets[0].encoding.B
        torch.testing.assert_close(frequencies[:, 3], reference[:, 3] / 2)
        torch.testing.assert_close(frequencies[:, :3], reference[:, :3])
