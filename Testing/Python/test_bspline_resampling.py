"""A scan's cubic B-spline resampling at continuous indices by numba's kernel (STNeRPLib.cubic_lookup.resample), as
SimpleITK resamples it for the predicted image (warping.resample_onto: B-spline, mirror boundary, the nearest voxel's
value beyond the scan), and the padded coefficients that both the kernel and the prior read."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from STNeRPLib import cubic_lookup
from STNeRPLib.geometry import Grid
from STNeRPLib.warping import resample_onto


def _scan(shape: tuple[int, int, int], pixel: type, seed: int) -> sitk.Image:
    """A smooth volume of CT numbers (-1000 to 3000) with a sharp edge, on an oblique grid of anisotropic voxels."""
    rng = np.random.default_rng(seed)
    values = ndimage.gaussian_filter(rng.normal(size=shape), 1.0) * 4000
    values[:, : shape[1] // 3] = -1000                                 # air: an edge as sharp as a body's
    grid = Grid(shape[::-1], (0.8, 1.1, 2.5), (-40.0, 12.0, 3.0),
                tuple(sitk.VersorTransform((0.3, 0.2, 1.0), 0.4).GetMatrix()))
    return grid.image(np.clip(values, -1000, 3000).astype(pixel))


def _indices(size: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Continuous indices (x, y, z): a third anywhere from 3 voxels before the scan to 3 beyond it, a third on voxel
    centres, a third in the half voxel about each border node (where the spline is mirrored, not clamped)."""
    n = np.asarray(size, float)
    anywhere = rng.uniform(-3, n + 2, (3000, 3))
    centres = rng.integers(0, size, (3000, 3)).astype(float)
    border = rng.uniform(0, n - 1, (3000, 3))
    axis = rng.integers(0, 3, 3000)
    side = rng.integers(0, 2, 3000)
    border[np.arange(3000), axis] = np.where(side, n[axis] - 1 + rng.uniform(-0.499, 0.499, 3000),
                                             rng.uniform(-0.499, 0.499, 3000))
    return np.concatenate([anywhere, centres, border])


def _sitks(scan: sitk.Image, index: np.ndarray) -> np.ndarray:
    """SimpleITK's resampling of `scan` at those indices, as the predicted image has resampled it: each index a voxel
    of a target of N x 1 x 1 voxels mapped onto it by a displacement field."""
    grid = Grid.of(scan)
    target = Grid((len(index), 1, 1), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    displacement = grid.to_physical(index) - target.points()
    transform = sitk.DisplacementFieldTransform(target.image(displacement.reshape(1, 1, -1, 3), vector=True))
    return resample_onto(scan, transform, target).reshape(-1)


@pytest.mark.parametrize("pixel", [np.int16, np.float32])
@pytest.mark.parametrize("shape", [(7, 9, 11), (3, 6, 5)])
def test_the_kernel_resamples_a_scan_as_sitk_does_inside_on_its_borders_and_beyond(shape: tuple[int, int, int],
                                                                                     pixel: type) -> None:
    scan = _scan(shape, pixel, seed=sum(shape))
    index = _indices(Grid.of(scan).size, np.random.default_rng(len(shape)))
    samples = sitk.GetArrayViewFromImage(scan)
    coefficients = cubic_lookup.padded_coefficients(samples, np.float32)
    resampled = cubic_lookup.resample(coefficients, samples, index)
    expected = _sitks(scan, index)
    assert resampled.dtype == np.float32 and np.ptp(expected) > 1500
    np.testing.assert_allclose(resampled, expected, rtol=0, atol=0.01)           # HU
    beyond = np.any((index < -0.5) | (index > np.asarray(Grid.of(scan).size) - 0.5), axis=1)
    assert 300 < beyond.sum() < 3000                                             # each case is tried


def test_on_an_axis_of_two_voxels_the_half_voxel_beyond_the_last_is_the_mirror_image_of_the_half_before_it() -> None:
    """Two slices: from the last node on (z in [1, 1.5)) the spline is its mirror image about it (z -> 2 - z), which
    SimpleITK computes from z in (0.5, 1]; at z in [1, 1.5) itself SimpleITK reflects a tap only once and reads a
    coefficient before its buffer (measured: up to 43 HU off, and +-3.4e38 on the last node), so it is compared there
    at the mirrored point."""
    scan = _scan((2, 6, 5), np.float32, seed=13)
    samples = sitk.GetArrayViewFromImage(scan)
    index = _indices(Grid.of(scan).size, np.random.default_rng(3))
    index = index[np.all((index >= -0.5) & (index < np.asarray(Grid.of(scan).size) - 0.5), axis=1)]
    beyond = index[:, 2] >= 1
    mirrored = index.copy()
    mirrored[beyond, 2] = np.minimum(2 - index[beyond, 2], 1 - 1e-6)     # below 1: SimpleITK's taps stay in
    resampled = cubic_lookup.resample(cubic_lookup.padded_coefficients(samples, np.float32), samples, index)
    assert beyond.sum() > 200
    np.testing.assert_allclose(resampled, _sitks(scan, mirrored), rtol=0, atol=0.01)


def test_padded_coefficients_are_scipys_mirrored_spline_coefficients_reflected_into_the_padding() -> None:
    """In float64, what the prior was built from before: ndimage.spline_filter (mirror) padded 1 before and 2 after by
    reflection, to the bit; in float32, within float32's rounding of each axis's pass."""
    volume = np.random.default_rng(3).normal(size=(6, 9, 8)).astype(np.float32) * 500
    expected = np.pad(ndimage.spline_filter(volume.astype(np.float64), order=3, mode="mirror"), [(1, 2)] * 3,
                      mode="reflect")
    assert np.array_equal(cubic_lookup.padded_coefficients(volume, np.float64), expected)
    single = cubic_lookup.padded_coefficients(volume, np.float32)
    assert single.dtype == np.float32 and single.flags.c_contiguous
    np.testing.assert_allclose(single, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_a_scan_one_voxel_thick_resamples_to_its_nearest_voxel_along_that_axis() -> None:
    scan = _scan((1, 6, 5), np.float32, seed=2)
    samples = sitk.GetArrayViewFromImage(scan)
    index = np.array([[2.0, 3.0, 0.0], [2.0, 3.0, 0.4], [2.0, 3.0, -0.3], [1.3, 2.7, 0.2]])
    resampled = cubic_lookup.resample(cubic_lookup.padded_coefficients(samples, np.float32), samples, index)
    np.testing.assert_allclose(resampled[:3], samples[0, 3, 2], atol=1e-3)
    np.testing.assert_allclose(resampled, _sitks(scan, index), atol=0.01)
