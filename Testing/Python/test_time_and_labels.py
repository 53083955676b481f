"""Times and labels, directly: the engine's time normalisation, the interpolation weights and the
linear-interpolation baseline they define, lossless output folder names, the label range, and the
direction of det J on the phantom's exact fields (a shrinking tumour, inhaling lungs)."""
import numpy as np
import pytest
import SimpleITK as sitk

from STNeRPLib.errors import InputError
from STNeRPLib.geometry import Grid
from STNeRPLib.io import read_labelmap
from STNeRPLib.metrics import jacobian_determinant
from STNeRPLib.model import normalise_time
from STNeRPLib.contract import time_point_folder
from STNeRPLib.phantom import breathing_series, longitudinal_series
from STNeRPLib.warping import interpolation_weights, linear_interpolation


@pytest.mark.parametrize("t,time_range,expected", [
    (0.0, (0.0, 4.0), 0.0), (4.0, (0.0, 4.0), 1.0), (1.0, (0.0, 4.0), 0.25),
    (2.0, (0.0, 3.0), 2 / 3),                         # the reference in the middle of the range
    (-0.5, (0.0, 4.0), -0.125), (5.0, (0.0, 4.0), 1.25),  # extrapolation runs past [0, 1]
    (20260108.0, (20260101.0, 20260115.0), 0.5),      # dates: no precision lost
])
def test_normalise_time_maps_the_scanned_range_to_unit_interval(t, time_range, expected):
    assert normalise_time(t, time_range) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("scanned,t,expected", [
    ([0.0, 1.0, 3.0], 2.25, {1.0: 0.375, 3.0: 0.625}),
    ([3.0, 0.0, 1.0], 0.5, {0.0: 0.5, 1.0: 0.5}),     # order of the scans does not matter
    ([0.0, 7.0, 14.0], 10.5, {7.0: 0.5, 14.0: 0.5}),
    ([0.0, 1.0, 3.0], 1.0, {}),                       # a scanned time: no blend
    ([0.0, 1.0, 3.0], -0.5, {}), ([0.0, 1.0, 3.0], 3.5, {}),  # outside the scanned range
])
def test_interpolation_weights_blend_the_two_scans_around_t(scanned, t, expected):
    weights = interpolation_weights(sorted(scanned), t)
    assert weights == pytest.approx(expected)
    if weights:
        assert sum(weights.values()) == pytest.approx(1.0)


def test_linear_interpolation_blends_in_scan_units_before_any_window():
    """One definition of the benchmark's baseline: scans blended in HU, windowed afterwards. With a
    voxel at -1200 HU (below the window) and one at 0 HU, the blend is -600 HU (window value 0.267);
    clipping first would give 0.333."""
    scans = {1.0: np.array([-1200.0, 100.0]), 3.0: np.array([0.0, 300.0])}
    assert np.allclose(linear_interpolation(scans, 2.0), [-600.0, 200.0])
    assert np.allclose(linear_interpolation(scans, 1.5), [-900.0, 150.0])
    with pytest.raises(ValueError):
        linear_interpolation(scans, 3.0)


@pytest.mark.parametrize("t,name", [(0.0, "t_0"), (1.5, "t_1.5"), (2.25, "t_2.25"), (-0.5, "t_-0.5"),
                                    (20260101.0, "t_20260101"), (20260108.0, "t_20260108"),
                                    (0.1 + 0.2, "t_0.30000000000000004")])
def test_time_folder_is_short_where_lossless(t, name):
    assert time_point_folder(t) == name


def test_time_folders_of_distinct_times_never_collide():
    times = [20260101.0 + d for d in range(0, 60, 7)] + [1e7 + 0.5, 1e7 + 1.5, 1 / 3, 0.333333]
    assert len({time_point_folder(t) for t in times}) == len(times)


def test_labelmap_with_a_label_above_65535_is_refused(tmp_path):
    array = np.zeros((4, 5, 6), np.uint32)
    array[1, 2, 3] = 70000
    image = sitk.GetImageFromArray(array)
    path = tmp_path / "labels.nrrd"
    sitk.WriteImage(image, str(path))
    with pytest.raises(InputError, match="label 70000, above 65535"):
        read_labelmap(path, Grid.of(image), "segmentation")
    array[1, 2, 3] = 65535                                   # the largest label that is kept
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    assert sitk.GetArrayFromImage(read_labelmap(path, Grid.of(image), "segmentation")).max() == 65535


def test_shrinking_tumour_has_det_j_above_one_in_the_exact_field():
    """u_t maps a time-t point to its reference point. Where the tumour has shrunk at time t, a
    time-t voxel maps onto a larger reference volume: det J > 1 there (about 1 / s^3 with radius
    factor s; s = 0.6 on the last day gives ~4.6 at the centre, less over the sampled ball)."""
    series = longitudinal_series(size=(48, 48, 32), spacing=(6.0, 6.0, 8.0), n_fractions=3, noise_hu=0)
    for k in (1, 2):
        jacobian = sitk.GetArrayFromImage(jacobian_determinant(series.displacements[k]))
        tumour = sitk.GetArrayFromImage(series.labelmaps[k]) == 1
        assert tumour.any() and jacobian[tumour].min() > 1.5, (k, jacobian[tumour].min())
    # the ITK filter agrees (an independent finite-difference implementation)
    itk = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(series.displacements[2]))
    assert np.allclose(itk[1:-1, 1:-1, 1:-1], jacobian[1:-1, 1:-1, 1:-1], atol=1e-5)


def test_inhaling_lungs_have_det_j_below_one_in_the_exact_field():
    """At inhale the time-t lungs are larger than the reference's: a time-t voxel maps onto a
    smaller reference volume, det J < 1 in the lungs."""
    series = breathing_series(size=(32, 32, 24), spacing=(9.0, 9.0, 10.0), n_phases=4, noise_hu=0)
    jacobian = sitk.GetArrayFromImage(jacobian_determinant(series.displacements[2]))
    lungs = np.isin(sitk.GetArrayFromImage(series.labelmaps[2]), (2, 3))
    assert jacobian[lungs].mean() < 0.95
