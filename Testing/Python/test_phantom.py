"""Tests of the thorax phantom: geometry, determinism and that its ground truth is exact."""

import csv

import numpy as np
import pytest
import SimpleITK as sitk

from STNeRPLib import phantom

COARSE = dict(size=(48, 48, 32), spacing=(6.0, 6.0, 8.0))  # whole thorax, coarse voxels
FINE = dict(size=(48, 48, 32), spacing=(3.0, 3.0, 4.0))  # default voxels, central crop with the tumour


@pytest.fixture(scope="module")
def breathing():
    return phantom.breathing_series(**COARSE, noise_hu=0.0)


@pytest.fixture(scope="module")
def breathing_fine():
    return phantom.breathing_series(**FINE, noise_hu=0.0)


@pytest.fixture(scope="module")
def longitudinal():
    return phantom.longitudinal_series(**FINE, noise_hu=0.0)


def array(image):
    return sitk.GetArrayFromImage(image)


def transform(displacement, sign=1.0):
    """ITK transform of a displacement image (a copy: the constructor consumes its argument)."""
    field = sitk.GetImageFromArray(sign * array(displacement), isVector=True)
    field.CopyInformation(displacement)
    return sitk.DisplacementFieldTransform(field)


def displacement_at_point(displacement, point):
    return np.array(transform(displacement).TransformPoint(tuple(float(v) for v in point))) - point


def jacobian_determinant(displacement):
    """det(I + grad u) with central differences in mm; u components (x, y, z), array axes [z, y, x]."""
    u = array(displacement)
    sx, sy, sz = displacement.GetSpacing()
    jac = np.empty(u.shape[:3] + (3, 3))
    for c in range(3):
        dz, dy, dx = np.gradient(u[..., c], sz, sy, sx)
        jac[..., c, 0], jac[..., c, 1], jac[..., c, 2] = dx, dy, dz
    return np.linalg.det(jac + np.eye(3))


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_geometry_and_pixel_types(breathing):
    assert breathing.times == [float(k) for k in range(10)]
    for images in (breathing.images, breathing.labelmaps, breathing.displacements):
        assert len(images) == 10
        for image in images:
            assert image.GetSize() == (48, 48, 32)
            assert image.GetSpacing() == (6.0, 6.0, 8.0)
            assert np.allclose(image.GetOrigin(), (-141.0, -158.5, -118.0))
            assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert breathing.images[0].GetPixelID() == sitk.sitkFloat32
    assert breathing.labelmaps[0].GetPixelID() == sitk.sitkUInt8
    assert breathing.displacements[0].GetPixelID() == sitk.sitkVectorFloat64
    assert breathing.displacements[0].GetNumberOfComponentsPerPixel() == 3
    assert set(np.unique(array(breathing.labelmaps[0]))) == {0, 1, 2, 3}


def test_anatomy_intensities(breathing_fine):
    image, labels = array(breathing_fine.images[0]), array(breathing_fine.labelmaps[0])
    assert image[0, 0, 0] == pytest.approx(-1000.0, abs=1.0)  # air in the corner
    assert -900 < np.median(image[np.isin(labels, (2, 3))]) < -600  # lung with vessels
    assert np.percentile(image[np.isin(labels, (2, 3))], 95) > -550  # vessels are brighter
    i, j, k = breathing_fine.images[0].TransformPhysicalPointToIndex(tuple(phantom.TUMOUR_CENTRE))
    assert labels[k, j, i] == 1 and abs(image[k, j, i] - 30.0) < 40.0  # tumour core (blurred edge)
    assert image.max() > 600  # bone


def test_default_grid():
    """The default phantom's grid (its build time is a benchmark figure, not a test)."""
    series = phantom.breathing_series()
    assert series.images[0].GetSize() == (96, 96, 64)
    assert np.allclose(series.images[0].GetOrigin(), (-142.5, -160.0, -120.0))


def test_deterministic():
    first = phantom.breathing_series(**COARSE, n_phases=4)
    again = phantom.breathing_series(**COARSE, n_phases=4)
    other = phantom.breathing_series(**COARSE, n_phases=4, seed=1)
    for k in range(4):
        for name in ("images", "labelmaps", "displacements"):
            assert np.array_equal(array(getattr(first, name)[k]), array(getattr(again, name)[k]))
        assert all(np.array_equal(a, b) for a, b in zip(first.landmarks[k], again.landmarks[k]))
    assert not np.array_equal(array(first.images[0]), array(other.images[0]))
    clean = phantom.breathing_series(**COARSE, n_phases=4, noise_hu=0.0)
    noise = array(first.images[1]) - array(clean.images[1])
    assert 8.0 < noise.std() < 12.0  # noise_hu = 10 by default, images only


def test_reference_is_identity(breathing):
    assert np.all(array(breathing.displacements[0]) == 0.0)
    assert np.array_equal(array(breathing.labelmap_at(0.0)), array(breathing.labelmaps[0]))
    assert np.array_equal(array(breathing.image_at(0.0)), array(breathing.images[0]))
    q, ref = breathing.landmarks[0]
    assert np.array_equal(q, ref)


def test_at_any_time(breathing):
    assert np.array_equal(array(breathing.image_at(3.0)), array(breathing.images[3]))
    assert np.array_equal(array(breathing.displacement_at(7.0)), array(breathing.displacements[7]))
    periodic = array(breathing.displacement_at(12.5)) - array(breathing.displacement_at(2.5))
    assert np.abs(periodic).max() < 1e-9
    between = array(breathing.image_at(2.5))
    assert not np.array_equal(between, array(breathing.images[2]))
    assert not np.array_equal(between, array(breathing.images[3]))
    dome = np.array([-58.0, 5.0, -45.0])
    uz = [displacement_at_point(breathing.displacement_at(t), dome)[2] for t in (2.0, 2.5, 3.0)]
    assert uz[0] < uz[1] < uz[2]


@pytest.mark.parametrize("name", ["breathing_fine", "longitudinal"])
def test_displacement_direction_reproduces_images(name, request):
    """Resampling the reference with the field (ITK convention) gives the time-t image; -u does not."""
    series = request.getfixturevalue(name)
    k = len(series.times) // 2 if name == "breathing_fine" else -1
    target, lungs = array(series.images[k]), array(series.labelmaps[k]) > 0
    scores = []
    for sign in (1.0, -1.0):
        field = transform(series.displacements[k], sign)
        warped = sitk.Resample(series.images[0], series.images[k], field, sitk.sitkLinear, float("nan"))
        warped = array(warped)
        inside = np.isfinite(warped)  # points mapped outside the reference grid have no value
        body = inside & (target > -900)
        correlation = np.corrcoef(warped[lungs & inside], target[lungs & inside])[0, 1]
        scores.append((correlation, np.abs(warped - target)[body].mean()))
    (corr, mad), (corr_negated, mad_negated) = scores
    assert corr > 0.95 and mad < 25.0  # HU, against ~900 HU lung/tissue contrast
    assert corr_negated < 0.6 and mad_negated > 3 * mad


@pytest.mark.parametrize("name", ["breathing", "longitudinal"])
def test_diffeomorphic(name, request):
    series = request.getfixturevalue(name)
    fields = series.displacements + [series.displacement_at(series.times[1] / 2)]
    assert min(jacobian_determinant(field).min() for field in fields) > 0.2


def test_breathing_amplitude(breathing):
    peak = breathing.displacements[5]
    magnitude = np.linalg.norm(array(peak), axis=-1)
    assert 8.0 < magnitude.max() < 20.0
    dome = displacement_at_point(peak, np.array([-58.0, 5.0, -45.0]))
    assert 8.0 < dome[2] < 20.0  # diaphragm lies inferior at inhale: u points superior (+z)
    assert np.linalg.norm(dome) < 20.0
    assert np.linalg.norm(displacement_at_point(peak, np.array([-58.0, 5.0, 100.0]))) < 2.0  # apex
    peaks = [np.linalg.norm(array(d), axis=-1).max() for d in breathing.displacements]
    assert np.argmax(peaks) == 5 and peaks[1] < peaks[3] < peaks[5]


def test_tumour_shrinks_with_exact_ground_truth(longitudinal):
    assert longitudinal.times == [0.0, 7.0, 14.0, 21.0, 28.0]
    voxel_mm3 = np.prod(longitudinal.labelmaps[0].GetSpacing())
    volumes = [(array(labels) == 1).sum() * voxel_mm3 for labels in longitudinal.labelmaps]
    assert all(a > b for a, b in zip(volumes, volumes[1:]))
    assert volumes[-1] < 0.5 * volumes[0]
    radius = phantom.TUMOUR_RADIUS
    assert volumes[0] == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.15)
    assert volumes[-1] == pytest.approx(4 / 3 * np.pi * (0.6 * radius) ** 3, rel=0.3)
    for k in range(1, 5):  # label_t = L_ref(q + u_t(q)): the reference labelmap pulled through u_t
        carried = sitk.Resample(longitudinal.labelmaps[0], longitudinal.labelmaps[k],
                                transform(longitudinal.displacements[k]), sitk.sitkNearestNeighbor, 0)
        carried, truth = array(carried), array(longitudinal.labelmaps[k])
        assert dice(carried == 1, truth == 1) > 0.7
        assert dice(carried == 2, truth == 2) > 0.95


@pytest.mark.parametrize("name", ["breathing", "longitudinal"])
def test_landmarks(name, request):
    series = request.getfixturevalue(name)
    for displacement, labels, (q, ref) in zip(series.displacements, series.labelmaps, series.landmarks):
        assert q.shape == ref.shape and 50 <= len(q) <= 100
        interpolated = np.array([p + displacement_at_point(displacement, p) for p in q])
        assert np.abs(interpolated - ref).max() < 0.1
        index = np.array([labels.TransformPhysicalPointToIndex(tuple(p)) for p in q])
        assert np.isin(array(labels)[index[:, 2], index[:, 1], index[:, 0]], (1, 2, 3)).mean() > 0.9
    if name == "breathing":
        q, ref = series.landmarks[5]
        tre = np.linalg.norm(ref - q, axis=1)  # no registration
        assert tre.mean() > 3.0 and tre.max() > 8.0


def test_write_series(longitudinal, tmp_path):
    paths = phantom.write_series(longitudinal, tmp_path / "series")
    assert [p.name for p in paths["images"]] == [f"image_{k}.nrrd" for k in range(5)]
    for name in ("images", "labelmaps", "displacements"):
        for written, original in zip(paths[name], getattr(longitudinal, name)):
            image = sitk.ReadImage(str(written))
            assert image.GetSize() == original.GetSize()
            assert image.GetPixelID() == original.GetPixelID()
            assert np.allclose(image.GetOrigin(), original.GetOrigin())
            assert np.allclose(image.GetSpacing(), original.GetSpacing())
            assert np.allclose(image.GetDirection(), original.GetDirection())
            assert np.array_equal(array(image), array(original))
    with open(paths["landmarks"], newline="") as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == ["time", "x", "y", "z", "ref_x", "ref_y", "ref_z"]
    table = np.array(rows[1:], dtype=float)
    assert len(table) == sum(len(q) for q, _ in longitudinal.landmarks)
    last = table[table[:, 0] == 28.0]
    q, ref = longitudinal.landmarks[-1]
    assert np.allclose(last[:, 1:4], q, atol=1e-5) and np.allclose(last[:, 4:], ref, atol=1e-5)


def test_supersampled_voxel_is_the_mean_of_its_sub_voxel_samples_and_the_rest_is_unchanged(longitudinal):
    """supersampling 2: each voxel the mean of F_ref(p + u_t(p)) at the 8 points a quarter voxel either side of its
    centre along each axis (computed here from the anatomy and the motion); labels, displacements and landmarks
    stay the centre's."""
    series = phantom.longitudinal_series(**FINE, noise_hu=0.0, supersampling=2)
    t, k = series.times[3], 3
    grid = series.images[k]
    points = np.array([grid.TransformIndexToPhysicalPoint(index) for index in ((10, 20, 5), (30, 17, 21))])
    spacing = np.array(grid.GetSpacing())
    source = series._phantom
    expected = []
    for point in points:
        offsets = np.array([[i, j, m] for i in (-0.25, 0.25) for j in (-0.25, 0.25) for m in (-0.25, 0.25)]) * spacing
        p = point + offsets
        expected.append(source.anatomy.sample(p + source.motion(p, t))[0].mean())
    got = [array(grid)[z, y, x] for x, y, z in ((10, 20, 5), (30, 17, 21))]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-3)
    assert not np.allclose(array(grid), array(longitudinal.images[k]), atol=1.0)     # the point samples differ
    np.testing.assert_array_equal(array(series.labelmaps[k]), array(longitudinal.labelmaps[k]))
    np.testing.assert_array_equal(array(series.displacements[k]), array(longitudinal.displacements[k]))
    np.testing.assert_array_equal(series.landmarks[k][0], longitudinal.landmarks[k][0])


def test_supersampling_below_one_is_refused():
    with pytest.raises(ValueError, match="supersampling must be at least 1"):
        phantom.breathing_series(**COARSE, supersampling=0)


@pytest.mark.parametrize("radius", [phantom.TUMOUR_RADIUS, 6.0, 31.0])
def test_shrinkage_carries_the_ball_of_s_times_the_radius_onto_the_reference_ball_without_folding(radius):
    """phantom.shrinkage at the benchmark's GTV sizes as at the phantom's: a point s R from the centre at time t maps
    to R (the reference tumour's surface); along a ray the map r -> |d + v(d)| rises (det J > 0) for s down to
    SHRINK_FLOOR; far out v vanishes."""
    direction = np.array([0.48, -0.6, 0.64])
    for s in (phantom.SHRINK_LAST, phantom.SHRINK_FLOOR, 0.9):
        d = s * radius * direction
        assert np.linalg.norm(d + phantom.shrinkage(d, s, radius)) == pytest.approx(radius, rel=1e-12)
        r = np.linspace(0.0, 6 * radius, 2001)[:, None] * direction
        mapped = np.linalg.norm(r + phantom.shrinkage(r, s, radius), axis=1)
        assert np.all(np.diff(mapped) > 0)
        assert np.linalg.norm(phantom.shrinkage(r[-1], s, radius)) < 1e-3 * radius
    progress, s = phantom.tumour_response(28.0)(28.0)
    assert progress == pytest.approx(1.0) and s == pytest.approx(phantom.SHRINK_LAST)
    assert phantom.tumour_response(28.0)(0.0) == pytest.approx((0.0, 1.0))
