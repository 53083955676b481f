"""ST-NeRP on the breathing phantom with the default preset: displacements close to the exact
ground truth at trained phases, the tumour propagated with high Dice, nothing folded, and the
motion at a held-out phase predicted from the neighbouring times.

Measured (6 phases, 4.5 x 4.5 x 6.4 mm, phase 2 held out): TRE 0.36-0.74 mm at trained phases
against 1.41-5.29 mm unregistered; 0.68 mm at the held-out phase against 4.02 mm; there the
predicted image scores 36.6 dB PSNR against 35.6 dB for linear interpolation of phases 1 and 3."""
import numpy as np
import pytest
import SimpleITK as sitk

from baselines import MISTAKES, baseline_scores, scores, table

from STNeRPLib.geometry import Grid
from STNeRPLib.metrics import (dice_per_label, folding_statistics, jacobian_determinant, map_points, psnr, ssim,
                               target_registration_error)
from STNeRPLib.phantom import breathing_series
from STNeRPLib.pipeline import fit
from STNeRPLib.presets import Options
from STNeRPLib.presets import DEFAULT
from STNeRPLib.progress import Reporter
from STNeRPLib.warping import linear_interpolation, warp

HELD_OUT = 2


@pytest.fixture(scope="module")
def result():
    """Six phases of a whole-thorax phantom at 4.5 x 4.5 x 6.4 mm; phase 2 held out."""
    series = breathing_series(size=(64, 64, 40), spacing=(4.5, 4.5, 6.4), n_phases=6)
    trained = [k for k in range(1, 6) if k != HELD_OUT]
    model = fit(series.images[0], 0.0, [(series.times[k], series.images[k]) for k in trained],
                series.labelmaps[0], Options(DEFAULT), Reporter(interval=1e9))
    grid = Grid.of(series.images[0])
    outputs = {k: warp(model, series.times[k], grid) for k in range(6)}
    return series, model, grid, trained, outputs


def field(grid, warped):
    return grid.image(warped.displacement.astype(np.float64), vector=True)


def tre(series, grid, outputs, k) -> tuple[float, float]:
    """(registered, unregistered) mean TRE in mm at phase k."""
    points, reference_points = series.landmarks[k]
    registered = target_registration_error(map_points(field(grid, outputs[k]), points), reference_points)
    return registered["tre_mean"], target_registration_error(points, reference_points)["tre_mean"]


@pytest.fixture(scope="module")
def mistakes(result):
    """Per phase 1-5: the run's scores and those of every mistake (baselines.py), printed."""
    series, _, grid, _, outputs = result
    out = {}
    for k in range(1, 6):
        t = series.times[k]
        out[k] = scores(series, t, field(grid, outputs[k])), baseline_scores(series, t)
        print(table(f"phase {k}{' (held out)' if k == HELD_OUT else ''}", *out[k]))
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_every_phase_beats_every_mistake(mistakes, k):
    """TRE below 0.6 x, and PSNR (reference through the field) 1 dB above, the best of no
    registration, sign flipped, LPS/RAS mixed and one phase off, at trained phases and at the
    held-out phase 2. Measured (default preset, anchored; TRE mm / PSNR dB, run vs best mistake):
    phase 1 0.36 / 37.23 vs 0.91 (mixed) / 33.22; held-out 2 0.61 / 34.54 vs 1.33 (one off) / 31.55;
    3 0.45 / 34.43 vs 1.33 / 31.35; 4 0.37 / 35.03 vs 1.33 / 31.54; 5 0.44 / 36.33 vs 0.91 / 33.23."""
    method, baselines = mistakes[k]
    for name in MISTAKES:
        assert method["tre"] < 0.6 * baselines[name]["tre"], (k, name, method, baselines[name])
        assert method["psnr"] > baselines[name]["psnr"] + 1.0, (k, name, method, baselines[name])


def test_landmarks_recovered_at_trained_phases(result):
    series, _, grid, trained, outputs = result
    errors = np.array([tre(series, grid, outputs, k) for k in trained])
    assert np.all(errors[:, 0] < 0.5 * errors[:, 1]), errors
    assert errors[:, 0].mean() < 0.25 * errors[:, 1].mean(), errors


def test_dense_displacement_close_to_ground_truth(result):
    series, _, _, trained, outputs = result
    errors, motions = [], []
    for k in trained:
        truth = sitk.GetArrayFromImage(series.displacements[k])
        lungs = sitk.GetArrayFromImage(series.labelmaps[k]) > 0
        errors.append(np.linalg.norm(outputs[k].displacement - truth, axis=-1)[lungs].mean())
        motions.append(np.linalg.norm(truth, axis=-1)[lungs].mean())
    assert np.mean(errors) < 0.25 * np.mean(motions), (errors, motions)


def test_tumour_propagated_and_nothing_folded(result, mistakes):
    """Dice of every label within 0.05 of what the exact motion scores (labels carried label-wise linear,
    as the default does: the ~5-voxel tumour scores 0.84-0.91 even with the exact motion on this grid).
    At phases 1 and 5 no registration scores as high (tumour 0.897), so Dice alone cannot tell; at phase
    3 it falls 0.33 short (0.517 vs 0.842), and there this test fails for no registration."""
    series, _, grid, trained, outputs = result
    assert mistakes[3][1]["exact"]["dice"][1] - mistakes[3][1]["none"]["dice"][1] > 0.05
    for k in trained + [HELD_OUT]:
        dice = dice_per_label(outputs[k].labelmap, sitk.GetArrayFromImage(series.labelmaps[k]))
        exact = mistakes[k][1]["exact"]["dice"]
        assert all(dice[label] > exact[label] - 0.05 for label in (1, 2, 3)), (k, dice, exact)
        jacobian = sitk.GetArrayFromImage(jacobian_determinant(field(grid, outputs[k])))
        assert folding_statistics(jacobian)["folded_voxels"] == 0


def test_held_out_phase_predicted_from_its_neighbours(result):
    series, model, grid, _, outputs = result
    registered, unregistered = tre(series, grid, outputs, HELD_OUT)
    assert registered < 0.3 * unregistered, (registered, unregistered)
    normal = lambda image: model.window.normalise(sitk.GetArrayFromImage(image))  # noqa: E731
    truth = normal(series.images[HELD_OUT])
    predicted = model.window.normalise(outputs[HELD_OUT].image)
    assert outputs[HELD_OUT].image_sources == [HELD_OUT - 1, HELD_OUT + 1]
    scans = {series.times[k]: sitk.GetArrayFromImage(series.images[k]) for k in (HELD_OUT - 1, HELD_OUT + 1)}
    linear = model.window.normalise(linear_interpolation(scans, series.times[HELD_OUT]))
    assert psnr(predicted, truth) > psnr(linear, truth) + 0.5, (psnr(predicted, truth), psnr(linear, truth))
    assert ssim(predicted, truth) > ssim(linear, truth)
