"""Tests of STNeRPLib.metrics against closed-form values, SimpleITK and scikit-image."""

import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.transform import Rotation

from STNeRPLib import metrics

SIZE = (12, 10, 8)  # (x, y, z) voxels
ANISO_SPACING = (0.7, 1.3, 2.5)
ORIGIN = (-31.0, 12.5, 104.0)
OBLIQUE = Rotation.from_euler("zyx", [25.0, -15.0, 10.0], degrees=True).as_matrix()
AFFINE = np.array([[1.10, 0.05, -0.02], [0.03, 0.92, 0.04], [-0.06, 0.02, 1.05]])
OFFSET = np.array([2.0, -1.5, 0.75])


def make_field(displacement_of_points, size=SIZE, spacing=ANISO_SPACING, origin=ORIGIN, direction=OBLIQUE):
    """Vector image whose value at each voxel is displacement_of_points(physical points (..., 3))."""
    direction = np.asarray(direction)
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    index = np.stack([i, j, k], axis=-1).astype(np.float64)  # [z, y, x, (i, j, k)]
    points = np.asarray(origin) + (index * np.asarray(spacing)) @ direction.T
    field = sitk.GetImageFromArray(displacement_of_points(points), isVector=True)
    field.SetSpacing(spacing)
    field.SetOrigin(origin)
    field.SetDirection(direction.ravel().tolist())
    return field


def affine_displacement(points):
    return points @ (AFFINE - np.eye(3)).T + OFFSET


def smooth_volume(rng, shape=(24, 26, 22)):
    return ndimage.gaussian_filter(rng.random(shape), sigma=2.0)


# --- psnr -----------------------------------------------------------------------------


def test_psnr_of_constant_offset_is_exact():
    reference = np.random.default_rng(0).random((6, 7, 8))
    assert metrics.psnr(reference + 0.1, reference) == pytest.approx(20.0, abs=1e-9)
    assert metrics.psnr(reference + 0.1, reference, data_range=10.0) == pytest.approx(40.0, abs=1e-9)
    assert metrics.psnr(reference, reference) == math.inf


def test_psnr_respects_mask():
    reference = np.zeros((4, 5, 6))
    image = reference.copy()
    image[:2] += 0.01  # MSE 1e-4 -> 40 dB inside the mask
    image[2:] += 0.5  # large error outside the mask must be ignored
    mask = np.zeros(reference.shape, dtype=bool)
    mask[:2] = True
    assert metrics.psnr(image, reference, mask=mask) == pytest.approx(40.0, abs=1e-9)
    assert metrics.psnr(image, reference) < 40.0


# --- ssim -----------------------------------------------------------------------------


def test_ssim_identical_is_one_and_noise_lowers_it():
    rng = np.random.default_rng(1)
    volume = smooth_volume(rng)
    assert metrics.ssim(volume, volume) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim(volume + 0.05 * rng.standard_normal(volume.shape), volume) < 0.9


@pytest.mark.parametrize("shape, noise, data_range", [((24, 26, 22), 0.02, 1.0), ((30, 28), 0.1, 2.0)])
def test_ssim_matches_scikit_image(shape, noise, data_range):
    import skimage.metrics as skmetrics
    rng = np.random.default_rng(2)
    reference = smooth_volume(rng, shape)
    image = reference + noise * rng.standard_normal(shape)
    expected = skmetrics.structural_similarity(
        image, reference, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range
    )
    assert metrics.ssim(image, reference, data_range=data_range) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("shape", [(31, 26, 22), (30, 28)])
def test_ssims_local_values_are_those_of_scipys_gaussian_filter_of_the_whole_volume_to_the_bit(shape):
    """_ssim_map smooths by scipy's one-axis passes, the halo planes dropped after the first: its local values are
    those computed with ndimage.gaussian_filter over the whole volume, bit for bit, beyond the window's radius from
    either end of the first axis (a slab's interior)."""
    rng = np.random.default_rng(3)
    x = smooth_volume(rng, shape).astype(np.float32)
    y = (x + np.float32(0.05) * rng.standard_normal(shape).astype(np.float32)).astype(np.float32)

    def smooth(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, sigma=1.5, truncate=3.5, mode="reflect")

    mx, my = smooth(x), smooth(y)
    vx, vy, vxy = smooth(x * x) - mx * mx, smooth(y * y) - my * my, smooth(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    whole = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    local = metrics._ssim_map(x, y, 1.0)
    assert local.dtype == np.float32 and local.shape == (shape[0] - 10, *shape[1:])
    assert np.array_equal(local, whole[5:-5]) and 0.1 < local.mean() < 0.99


# --- dice -----------------------------------------------------------------------------


def test_dice_of_half_overlapping_cubes():
    prediction = np.zeros((10, 10, 10), dtype=np.uint8)
    truth = np.zeros_like(prediction)
    prediction[2:6, 2:6, 2:6] = 1
    truth[2:6, 2:6, 4:8] = 1  # shares half of its voxels with the prediction
    assert metrics.dice_per_label(prediction, truth) == {1: pytest.approx(0.5)}


def test_dice_multi_label_and_missing_labels():
    prediction = np.array([[1, 1, 2, 2], [0, 3, 3, 0]])
    truth = np.array([[1, 1, 2, 0], [0, 0, 0, 4]])
    scores = metrics.dice_per_label(prediction, truth)
    assert set(scores) == {1, 2, 3, 4}
    assert scores[1] == pytest.approx(1.0)
    assert scores[2] == pytest.approx(2 * 1 / (2 + 1))
    assert scores[3] == 0.0  # only in the prediction
    assert scores[4] == 0.0  # only in the truth
    given = metrics.dice_per_label(prediction, truth, labels=[2, 7])
    assert set(given) == {2, 7}
    assert math.isnan(given[7])  # absent from both


def label_by_label(prediction: np.ndarray, truth: np.ndarray, labels) -> dict[int, float]:
    """Dice's definition, one label at a time: 2 |P and T| / (|P| + |T|) of the boolean masks."""
    scores = {}
    for label in labels:
        p, t = prediction == label, truth == label
        total = int(p.sum()) + int(t.sum())
        scores[int(label)] = 2.0 * int((p & t).sum()) / total if total else float("nan")
    return scores


@pytest.mark.parametrize("dtype, high", [(np.uint8, 40), (np.uint16, 60000), (np.int32, 90000), (np.int16, 30)])
def test_dice_counted_in_one_pass_equals_the_definition_label_by_label(dtype, high, monkeypatch):
    """dice_per_label counts every label's voxels in one pass of chunks (a chunk here 1000 voxels, the arrays not a
    multiple of it): the definition's numbers exactly, labels found, given (some absent from both, 0 among them), up to
    60000 and beyond the 0..65535 the table takes, and negative (int16)."""
    monkeypatch.setattr(metrics, "LABEL_COUNT_CHUNK", 1000)
    rng = np.random.default_rng(5)
    low = -5 if dtype == np.int16 else 0
    choices = rng.choice(np.arange(low, high), size=12, replace=False)
    truth = rng.choice(np.append(choices, 0), size=(13, 17, 19)).astype(dtype)
    prediction = np.where(rng.random(truth.shape) < 0.7, truth, rng.choice(choices, size=truth.shape)).astype(dtype)
    found = np.union1d(np.unique(prediction), np.unique(truth))
    found = found[found != 0]
    scores = metrics.dice_per_label(prediction, truth)
    assert list(scores) == [int(v) for v in found] and scores == label_by_label(prediction, truth, found)
    given = [int(choices[0]), high + 7, 0, int(choices[3])]
    expected = label_by_label(prediction, truth, given)
    scores = metrics.dice_per_label(prediction, truth, labels=given)
    assert list(scores) == given and math.isnan(scores[high + 7])
    assert {k: v for k, v in scores.items() if k != high + 7} == {k: v for k, v in expected.items() if k != high + 7}
    assert 0.3 < np.nanmean(list(scores.values())) < 0.95


def test_dice_of_empty_labelmaps_is_empty_or_nan():
    empty = np.zeros((0, 4, 4), np.uint8)
    assert metrics.dice_per_label(empty, empty) == {}
    assert math.isnan(metrics.dice_per_label(empty, empty, labels=[3])[3])


# --- jacobian -------------------------------------------------------------------------


def test_jacobian_of_affine_field_on_oblique_anisotropic_grid():
    field = make_field(affine_displacement)
    jacobian = metrics.jacobian_determinant(field)
    assert jacobian.GetPixelID() == sitk.sitkFloat32
    assert jacobian.GetNumberOfComponentsPerPixel() == 1
    assert jacobian.GetSize() == field.GetSize()
    assert np.allclose(jacobian.GetSpacing(), field.GetSpacing())
    assert np.allclose(jacobian.GetOrigin(), field.GetOrigin())
    assert np.allclose(jacobian.GetDirection(), field.GetDirection())
    values = sitk.GetArrayFromImage(jacobian)
    assert np.abs(values - np.linalg.det(AFFINE)).max() < 1e-6


def test_jacobian_of_affine_field_on_a_sheared_grid():
    """A grid whose axes are not orthogonal (a NRRD's space directions may shear, as a gantry-tilted CT's slices
    do): du/dx is du/di times the inverse of direction @ diag(spacing), not its transpose."""
    sheared = OBLIQUE @ np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.2], [0.0, 0.0, 1.0]])
    sheared /= np.linalg.norm(sheared, axis=0)                     # unit columns, as ITK keeps them
    field = make_field(affine_displacement, direction=sheared)
    values = sitk.GetArrayFromImage(metrics.jacobian_determinant(field))
    assert np.abs(values - np.linalg.det(AFFINE)).max() < 1e-6


def test_jacobian_of_a_float32_field_is_float32_accurate():
    """The outputs' fields are float32 and their Jacobian is computed in float32: an affine field of
    up to 10 mm on the oblique anisotropic grid, rounded to float32, still gives det J to 2e-6."""
    field = sitk.Cast(make_field(affine_displacement), sitk.sitkVectorFloat32)
    values = sitk.GetArrayFromImage(metrics.jacobian_determinant(field))
    assert np.abs(sitk.GetArrayViewFromImage(field)).max() > 9
    assert np.abs(values - np.linalg.det(AFFINE)).max() < 2e-6


def test_jacobian_matches_simpleitk_on_smooth_nonlinear_field():
    def bumpy(points):
        x, y, z = points[..., 0], points[..., 1], points[..., 2]
        return np.stack(
            [
                2.0 * np.sin(0.25 * x) + 0.8 * np.sin(0.15 * y) * np.cos(0.1 * z),
                1.5 * np.sin(0.2 * y + 0.07 * z) + 0.025 * x,
                2.5 * np.cos(0.12 * z + 0.05 * x),
            ],
            axis=-1,
        )

    field = make_field(bumpy, size=(20, 18, 16), direction=np.eye(3))
    ours = sitk.GetArrayFromImage(metrics.jacobian_determinant(field))
    reference = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    interior = (slice(1, -1),) * 3
    assert np.abs(ours - 1.0).max() > 0.05  # the field really deforms
    assert np.abs(ours[interior] - reference[interior]).max() < 1e-6


@pytest.mark.skipif(metrics.compiling.numba is None, reason="numba is not installed: numpy's gradients compute det J")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size, direction", [((9, 7, 6), OBLIQUE), ((5, 2, 4), np.eye(3)),
                                             ((2, 6, 3), np.diag([1.0, -1.0, -1.0]))])
def test_the_kernels_jacobian_is_numpys_to_the_bit(dtype, size, direction):
    """numba's kernel (voxel by voxel) and numpy's gradients (a slab at a time: the path without numba) give the same
    determinants on rough fields (a random displacement of up to ~5 mm a voxel, folds included), inside the grid
    and on every face, on an oblique grid and on axis-aligned ones (whose zero index-per-mm entries are skipped),
    down to two voxels along an axis."""
    rng = np.random.default_rng(sum(size))
    field = make_field(lambda points: rng.normal(0, 2, points.shape).astype(dtype), size=size, direction=direction)
    u = sitk.GetArrayViewFromImage(field)
    index_per_mm = np.linalg.inv(metrics.Grid.of(field).index_to_mm).astype(dtype)
    numpy = np.empty(u.shape[:3], np.float32)
    metrics._numpy_determinants(u, index_per_mm, numpy, 0, u.shape[0])
    kernel = sitk.GetArrayFromImage(metrics.jacobian_determinant(field, slab=2))
    assert u.dtype == dtype and (numpy <= 0).sum() > 10
    np.testing.assert_array_equal(kernel, numpy)


# --- folding --------------------------------------------------------------------------


def test_folding_statistics_counts_folded_voxels():
    jacobian = np.full((6, 6, 6), 1.2)
    jacobian[1:3, 1:3, 1:4] = -0.5  # 12 folded voxels
    jacobian[5, 5, 5] = 0.0  # a collapsed voxel counts as folded
    jacobian[0, 0, 0] = 3.0
    stats = metrics.folding_statistics(jacobian)
    assert stats == {"folded_voxels": 13, "jacobian_min": -0.5, "jacobian_max": 3.0}
    mask = np.zeros(jacobian.shape, dtype=bool)
    mask[2:, 2:, 2:] = True  # keeps 1x1x2 of the folded block and the collapsed voxel
    masked = metrics.folding_statistics(jacobian, mask)
    assert masked == {"folded_voxels": 3, "jacobian_min": -0.5, "jacobian_max": 1.2}


# --- landmarks ------------------------------------------------------------------------


def test_target_registration_error_of_known_distances():
    reference = np.array([[0.0, 0.0, 0.0], [10.0, -5.0, 2.0], [1.0, 2.0, 3.0]])
    mapped = reference + np.array([[3.0, 4.0, 0.0], [0.0, 0.0, -1.0], [2.0, 0.0, 0.0]])  # 5, 1, 2 mm
    tre = metrics.target_registration_error(mapped, reference)
    assert tre["tre_mean"] == pytest.approx(8.0 / 3.0)
    assert tre["tre_std"] == pytest.approx(np.sqrt(((5 - 8 / 3) ** 2 + (1 - 8 / 3) ** 2 + (2 - 8 / 3) ** 2) / 3))
    assert tre["tre_max"] == pytest.approx(5.0)


def interior_points(field, count, rng):
    """Random physical points strictly inside the field's grid."""
    size = np.asarray(field.GetSize())
    index = rng.uniform(1.0, size - 2.0, size=(count, 3))
    return np.array([field.TransformContinuousIndexToPhysicalPoint(tuple(i)) for i in index])


@pytest.mark.parametrize("pixel_type", [sitk.sitkVectorFloat64, sitk.sitkVectorFloat32])
def test_map_points_constant_field_leaves_input_intact(pixel_type):
    shift = np.array([1.5, -2.0, 0.25])
    field = sitk.Cast(make_field(lambda p: np.broadcast_to(shift, p.shape).copy()), pixel_type)
    before = sitk.GetArrayFromImage(field).copy()
    points = interior_points(field, 7, np.random.default_rng(3))
    mapped = metrics.map_points(field, points)
    assert np.allclose(mapped, points + shift, atol=1e-5)
    assert field.GetSize() == SIZE
    assert np.array_equal(sitk.GetArrayFromImage(field), before)
    assert np.allclose(metrics.map_points(field, points), mapped)  # still usable afterwards


def test_map_points_affine_field_on_oblique_grid():
    field = make_field(affine_displacement)
    points = interior_points(field, 20, np.random.default_rng(4))
    expected = points @ AFFINE.T + OFFSET  # linear interpolation is exact for an affine field
    assert np.abs(metrics.map_points(field, points) - expected).max() < 1e-9
    assert metrics.map_points(field, np.empty((0, 3))).shape == (0, 3)


def test_score_time_point_gives_each_known_part_its_closed_form_and_none_for_the_rest():
    """A uniform 2 mm shift in L: det J = 1, landmarks land 2 mm along x; images 0.1 apart give
    PSNR 20 dB; two 4-voxel-deep boxes overlapping by half give Dice 0.5; nothing given scores None."""
    shape = (12, 14, 16)
    u = np.zeros(shape + (3,))
    u[..., 0] = 2.0
    field = sitk.GetImageFromArray(u, isVector=True)
    field.SetSpacing((1.5, 1.0, 2.0))
    points = np.array([[3.0, 4.0, 5.0], [6.0, 2.0, 8.0]])
    reference = points + [2.0, 0.0, 0.0]
    reference[1, 2] += 3.0
    actual = np.full(shape, 0.5)
    truth, propagated = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    truth[0:4], propagated[2:6] = 1, 1  # slices 2-3 shared: 2 * 2 / (4 + 4)
    jacobian = sitk.GetArrayFromImage(metrics.jacobian_determinant(field))
    scores = metrics.score_time_point(field=field, jacobian=jacobian, images=(actual + 0.1, actual),
                                      labelmaps=(propagated, truth), landmarks=(points, reference))
    assert set(scores) == set(metrics.METRIC_KEYS)
    assert (scores["folded_voxels"], scores["jacobian_min"], scores["jacobian_max"]) == (0, pytest.approx(1.0),
                                                                                         pytest.approx(1.0))
    assert scores["psnr"] == pytest.approx(20.0)
    assert scores["dice"] == {"1": pytest.approx(0.5)}
    assert (scores["tre_mean"], scores["tre_max"]) == (pytest.approx(1.5), pytest.approx(3.0))
    nothing = metrics.score_time_point(images=(actual, actual))
    assert nothing["folded_voxels"] is None and nothing["tre_mean"] is None and nothing["dice"] == {}
    with pytest.raises(ValueError, match="landmarks need the field"):
        metrics.score_time_point(landmarks=(points, reference))
