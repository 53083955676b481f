"""The preset option displacement_spacing: the integrated displacement refined by cubic B-spline through the
velocity grid's nodes, then interpolated trilinearly by training and every output alike."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from STNeRPLib.deformation import Deformation
from STNeRPLib.integration import refine, scaling_and_squaring
from STNeRPLib.model import SeriesModel
from STNeRPLib.phantom import breathing_series
from STNeRPLib.pipeline import fit
from STNeRPLib.presets import DEFAULT, Options
from STNeRPLib.progress import Reporter

LINEAR = dataclasses.replace(DEFAULT, velocity_levels=1, adaptive_levels=False, displacement_spacing=0.0)


@pytest.mark.parametrize("shape", [(2, 5, 6), (4, 7, 3)])
def test_refined_field_is_the_interpolating_cubic_bspline_through_its_nodes(shape):
    """At every refined node, scipy's cubic B-spline (order 3, whole-sample mirror boundary) of the nodes."""
    field = torch.randn(1, 2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    refined = refine(field, 3)
    assert refined.shape[2:] == tuple(3 * (n - 1) + 1 for n in shape)
    at = np.meshgrid(*[np.arange(3 * (n - 1) + 1) / 3 for n in shape], indexing="ij")
    for channel in range(2):
        expected = ndimage.map_coordinates(field[0, channel].numpy(), at, order=3, mode="mirror")
        np.testing.assert_allclose(refined[0, channel].numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(refined[..., ::3, ::3, ::3].numpy(), field.numpy(), atol=1e-12)


def test_refined_field_follows_a_smooth_bump_closer_than_the_trilinear_nodes():
    """A Gaussian of sigma 10 mm on nodes 16 mm apart, looked up on a 1 mm lattice: refined to 4 mm and
    interpolated trilinearly, it errs by at most 0.6 of the nodes' trilinear interpolation (measured: 1.27
    against 2.48 mm at the peak of 5 mm; the cubic spline itself 1.17)."""
    axis = np.arange(9) * 16.0
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    bump = 5 * np.exp(-((z - 61) ** 2 + (y - 67) ** 2 + (x - 70) ** 2) / (2 * 10.0 ** 2))
    nodes = torch.tensor(bump)[None, None]
    fine = np.arange(0, 128.5, 1.0)
    at = np.meshgrid(fine, fine, fine, indexing="ij")
    truth = 5 * np.exp(-((at[0] - 61) ** 2 + (at[1] - 67) ** 2 + (at[2] - 70) ** 2) / (2 * 10.0 ** 2))
    trilinear = ndimage.map_coordinates(bump, [a / 16 for a in at], order=1)
    refined = ndimage.map_coordinates(refine(nodes, 4)[0, 0].numpy(), [a / 4 for a in at], order=1)
    assert np.abs(refined - truth).max() < 0.6 * np.abs(trilinear - truth).max()


@pytest.mark.parametrize("velocity, displacement, factors", [
    (32.0, 8.0, [1, 2, 1]), (32.0, 5.0, [1, 4, 2]), (32.0, 0.0, [1, 1, 1]), (0.0, 8.0, [1, 1, 1]),
    (16.0, 32.0, [1, 1, 1])])
def test_a_finer_levels_displacement_is_refined_to_at_most_displacement_spacing_and_the_coarsest_never(
        velocity, displacement, factors):
    preset = dataclasses.replace(DEFAULT, velocity_spacing=velocity, displacement_spacing=displacement)
    assert [preset.refinement(level) for level in range(3)] == factors


def test_refined_deformation_keeps_the_integrated_displacement_at_the_velocity_nodes():
    preset = dataclasses.replace(DEFAULT, displacement_spacing=8.0, adaptive_levels=False)
    deformation = Deformation(preset, (4, 5, 6), None, torch.Generator().manual_seed(0), 0.0)
    with torch.no_grad():
        for parameter in deformation.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)))
        for levels, factor in ((1, 1), (2, 2)):
            velocity = deformation.velocity([0.6], levels=levels)
            field = deformation.displacement([0.6], levels=levels)
            assert field.shape[2:] == tuple(factor * (n - 1) + 1 for n in velocity.shape[2:])
            integrated = scaling_and_squaring(velocity, preset.squaring_steps)
            assert float(integrated.abs().max()) > 1e-3 and (factor == 1) == torch.equal(field, integrated)
            np.testing.assert_allclose(field[..., ::factor, ::factor, ::factor].numpy(), integrated.numpy(), atol=1e-6)
    assert deformation.displacement_shape == field.shape[2:]


def test_model_saved_before_displacement_spacing_existed_keeps_its_trilinear_field(tmp_path):
    series = breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=2, noise_hu=0)
    model = fit(series.images[0], series.times[0], [(series.times[1], series.images[1])], None,
                Options(LINEAR.with_iterations(5), seed=0), Reporter())
    model.save(tmp_path / "model.pt")
    data = torch.load(tmp_path / "model.pt", weights_only=True)
    del data["preset"]["displacement_spacing"]
    torch.save(data, tmp_path / "old.pt")
    loaded = SeriesModel.load(tmp_path / "old.pt", torch.device("cpu"))
    assert loaded.preset.displacement_spacing == 0.0
    assert loaded.displacement_grid(1.0).shape[2:] == loaded.deformation.velocity_shape
    assert torch.equal(loaded.displacement_grid(1.0), model.displacement_grid(1.0))
