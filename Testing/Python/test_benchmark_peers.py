"""The benchmark's peers (benchmarks/peers.py) must return STNeRP's displacement convention:
u on the time-t grid maps a time-t point q to the reference point q + u(q), in mm (LPS).

A tiny synthetic pair with a known shift: reference(p) = blobs(p), target(q) = blobs(q + s), so
the exact field is u = s everywhere. Each peer registers fixed = target, moving = reference; its
field must be s (sign included) in the interior, and warping the reference with it must
reproduce the target better than warping with -u. Each on an identity and an oblique grid.

A peer whose package is missing is skipped, except under STNERP_PEERS_REQUIRED=1 (CI runs these
tests so in .venv-peers, made by `bash setup.sh peers`: antspyx and itk-elastix need an older numpy
than .venv's).
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import peers  # noqa: E402

SHIFT = np.array([2.5, -3.0, 3.5])   # mm, LPS (x, y, z): a few voxels, not a whole number of them
SIZE, SPACING, ORIGIN = (36, 32, 28), (2.0, 2.25, 2.5), (-31.0, 12.0, 40.0)
DIRECTIONS = {"identity": np.eye(3),
              # rotations of 20 degrees about z and -12 degrees about x
              "oblique": np.array([[np.cos(0.35), -np.sin(0.35), 0], [np.sin(0.35), np.cos(0.35), 0], [0, 0, 1]])
              @ np.array([[1, 0, 0], [0, np.cos(-0.2), -np.sin(-0.2)], [0, np.sin(-0.2), np.cos(-0.2)]])}


def _need(package: str):
    """The package, or skip (fail under STNERP_PEERS_REQUIRED=1)."""
    if os.environ.get("STNERP_PEERS_REQUIRED") == "1":
        return importlib.import_module(package)
    return pytest.importorskip(package)


def _texture(points: np.ndarray) -> np.ndarray:
    """A smooth CT-like random texture (HU) defined everywhere in mm: Gaussian-smoothed noise on a
    fixed 1.5 mm lattice, sampled with cubic splines."""
    from scipy import ndimage
    rng = np.random.default_rng(3)
    lattice_origin, lattice_step = np.asarray(ORIGIN) - 20.0, 1.5
    noise = ndimage.gaussian_filter(rng.standard_normal((90, 90, 90)), 3.0)
    noise *= 350.0 / noise.std()
    index = np.moveaxis((points - lattice_origin) / lattice_step, -1, 0)
    return -300.0 + ndimage.map_coordinates(noise, index, order=3, mode="mirror")


def _image(shift: np.ndarray, direction: np.ndarray, size: tuple[int, ...] = SIZE,
           spacing: tuple[float, ...] = SPACING, origin: tuple[float, ...] = ORIGIN) -> sitk.Image:
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetOrigin(origin)
    grid.SetDirection(direction.flatten().tolist())
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    points = (np.stack([i, j, k], -1) * np.asarray(spacing)) @ direction.T + np.asarray(origin)
    image = sitk.GetImageFromArray(_texture(points + shift).astype(np.float32))
    image.CopyInformation(grid)
    return image


@pytest.fixture(scope="module", params=sorted(DIRECTIONS))
def pair(request):
    """Reference (moving) and time-t image (fixed); the shift is physical (LPS), whatever the grid."""
    direction = DIRECTIONS[request.param]
    return _image(np.zeros(3), direction), _image(SHIFT, direction)


def _warp(reference: sitk.Image, field: sitk.Image, like: sitk.Image) -> np.ndarray:
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    return sitk.GetArrayFromImage(sitk.Resample(reference, like, transform, sitk.sitkLinear, -300.0))


def _negated(field: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(-sitk.GetArrayFromImage(field), isVector=True)
    out.CopyInformation(field)
    return out


CASES = [("ants_syn", "ants", 0.6), ("ants_synonly_cc", "ants", 0.6),
         ("elastix_bspline", "itk", 0.6), ("sitk_demons", "SimpleITK", 0.8)]


@pytest.mark.parametrize("name,package,tolerance", CASES, ids=[c[0] for c in CASES])
def test_peer_field_is_the_known_shift(pair, name, package, tolerance):
    _check_shift(pair, name, package, tolerance)


@pytest.mark.parametrize("name,package,tolerance", CASES, ids=[c[0] for c in CASES])
def test_peer_registers_a_time_point_on_a_grid_of_its_own(name, package, tolerance):
    """The time-t image on a finer grid than the reference's, moved off it by a fraction of a voxel (a follow-up CT
    or a CBCT as reconstructed): the field lies on the time-t grid and is the shift."""
    direction = DIRECTIONS["identity"]
    spacing = tuple(0.8 * s for s in SPACING)
    origin = tuple(o + 0.37 * s for o, s in zip(ORIGIN, spacing))
    size = tuple(int(n / 0.8) - 1 for n in SIZE)
    _check_shift((_image(np.zeros(3), direction), _image(SHIFT, direction, size, spacing, origin)), name, package,
                 tolerance)


def _check_shift(pair: tuple[sitk.Image, sitk.Image], name: str, package: str, tolerance: float) -> None:
    """The peer's field for `pair` (reference, time-t image) lies on the time-t grid, is SHIFT in the interior
    and carries the reference onto the time-t image, where its negation does not."""
    module = _need(package)
    if package == "itk" and not hasattr(module, "ElastixRegistrationMethod"):
        if os.environ.get("STNERP_PEERS_REQUIRED") == "1":
            pytest.fail("itk-elastix is not installed")
        pytest.skip("itk-elastix is not installed")
    reference, target = pair
    if name == "elastix_bspline":
        # elastix spends ~15 ms an iteration whatever the image size: a short schedule keeps the
        # test fast; what is tested is the conversion of transformix's field, not the schedule.
        field = peers.elastix_register(target, reference, "default", NumberOfResolutions=2,
                                       GridSpacingSchedule=(2, 1), MaximumNumberOfIterations=100)
    else:
        field = peers.register(name, target, reference)
    assert field.GetSize() == target.GetSize()
    assert np.allclose(field.GetSpacing(), target.GetSpacing())
    assert np.allclose(field.GetOrigin(), target.GetOrigin())
    assert np.allclose(field.GetDirection(), target.GetDirection())
    u = sitk.GetArrayFromImage(field)                        # [z, y, x, 3] mm
    interior = u[6:-6, 6:-6, 6:-6].reshape(-1, 3)
    median = np.median(interior, axis=0)
    assert np.allclose(median, SHIFT, atol=tolerance), (name, median, SHIFT)
    # Warping the reference with u reproduces the target; with -u it does not.
    truth = sitk.GetArrayFromImage(target)[6:-6, 6:-6, 6:-6]
    error = np.abs(_warp(reference, field, target)[6:-6, 6:-6, 6:-6] - truth).mean()
    negated = np.abs(_warp(reference, _negated(field), target)[6:-6, 6:-6, 6:-6] - truth).mean()
    unmoved = sitk.GetArrayFromImage(sitk.Resample(reference, target, sitk.Transform(), sitk.sitkLinear, -300.0))
    before = np.abs(unmoved[6:-6, 6:-6, 6:-6] - truth).mean()
    assert error < 0.5 * before and error < 0.5 * negated, (name, error, negated, before)


PHANTOM_CASES = [("sitk_demons", "SimpleITK"), ("ants_syn", "ants")]


@pytest.fixture(scope="module")
def phantom_pair():
    from STNeRPLib import phantom
    series = phantom.breathing_series(size=(48, 48, 32), spacing=(6.0, 6.0, 8.0), n_phases=2)  # phase 1: peak inhale
    return series


@pytest.mark.parametrize("name,package", PHANTOM_CASES, ids=[c[0] for c in PHANTOM_CASES])
def test_peer_lowers_phantom_tre(phantom_pair, name, package):
    """On the breathing phantom, the peer's field maps landmarks closer to their reference points
    than no registration does, and closer than the negated field."""
    _need(package)
    from STNeRPLib.metrics import map_points, target_registration_error
    field = peers.register(name, phantom_pair.images[1], phantom_pair.images[0])
    points, reference_points = phantom_pair.landmarks[1]
    tre = target_registration_error(map_points(field, points), reference_points)["tre_mean"]
    before = target_registration_error(points, reference_points)["tre_mean"]
    negated = target_registration_error(map_points(_negated(field), points), reference_points)["tre_mean"]
    assert tre < 0.5 * before and tre < negated, (name, tre, before, negated)
