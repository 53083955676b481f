"""A follow-up on a grid of its own (a CBCT, a follow-up CT with voxels of its own), or pre-aligned, is compared by
Def-Net's fit where its voxels lie, at their values as acquired: not at a copy resampled onto the reference grid,
interpolated a second time (on the benchmark's chest_own_grids that cost 0.06 mm of mean TRE)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from STNeRPLib import pipeline, training
from STNeRPLib.geometry import Grid
from STNeRPLib.pipeline import fit
from STNeRPLib.preprocessing import Calibration, IntensityWindow
from STNeRPLib.presets import DEFAULT, Options
from STNeRPLib.progress import Reporter

QUIET = Reporter(interval=1e9)


def _turned(z_degrees: float, x_degrees: float) -> tuple[float, ...]:
    """A direction matrix (row-major): turned about z, then about x."""
    a, b = np.radians(z_degrees), np.radians(x_degrees)
    about_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((about_x @ about_z).ravel())


REFERENCE = Grid((16, 16, 16), (3.0, 3.0, 3.0), (-20.0, -26.0, -22.0), _turned(20.0, 10.0))
OWN = Grid((22, 22, 20), (2.0, 2.0, 2.1), (-21.3, -19.7, -24.4), _turned(-15.0, 0.0))
"""The follow-up's grid: 2 mm voxels turned against the reference's 3 mm ones, some of it beyond the reference grid."""


def _body(points: np.ndarray) -> np.ndarray:
    """A smooth body's HU at LPS points [n, 3] (mm)."""
    return -600.0 + 700.0 * np.exp(-np.sum((points - (2.0, -3.0, 1.0)) ** 2, axis=1) / (2 * 12.0 ** 2))


def _anatomy(grid: Grid, noise: np.random.Generator | None = None) -> sitk.Image:
    """The smooth body on `grid`, with voxel-by-voxel noise of +-150 HU when given a generator: values no copy of
    the scan on another grid holds."""
    value = _body(grid.points())
    if noise is not None:
        value += noise.uniform(-150.0, 150.0, len(value))
    return grid.image(np.rint(value).reshape(grid.shape).astype(np.int16))


def _series(follow_up: sitk.Image, calibration: Calibration | None = None, prealign: str = "none"
            ) -> tuple[training._Series, np.ndarray]:
    """Def-Net's series of the reference and the follow-up at time 1 (with its calibration), as the fit builds it,
    and the follow-up's pre-alignment (4 x 4, reference LPS mm -> the follow-up's; the identity without one)."""
    reference = _anatomy(REFERENCE)
    window = IntensityWindow.for_image(reference, "ct")
    scans = pipeline._onto_reference_grid(reference, [(1.0, follow_up)], Options(DEFAULT, prealign=prealign), window,
                                          QUIET)
    targets = pipeline._targets(reference, 0.0, scans, window, (0.0, 1.0),
                                {} if calibration is None else {1.0: calibration})
    return training._Series.of(targets, torch.device("cpu")), scans.prealignments.get(1.0, np.eye(4))


def _moved(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """LPS points [n, 3] through a 4 x 4 affine matrix."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


@pytest.fixture(scope="module", params=["none", "affine"])
def series(request):
    """The series of a follow-up on OWN holding noise, as it lies or pre-aligned by an affine transform; the follow-up
    and its pre-alignment."""
    follow_up = _anatomy(OWN, np.random.default_rng(3))
    fitted, prealignment = _series(follow_up, prealign=request.param)
    assert (request.param == "none") == np.array_equal(prealignment, np.eye(4))
    return fitted, follow_up, prealignment


def test_a_follow_up_on_a_grid_of_its_own_is_compared_at_its_own_voxels_as_acquired(series):
    """Every voxel drawn for it is one of its own voxels: the point compared is that voxel's centre (within 1e-4 of a
    voxel, through both grids' turns and origins and the pre-alignment) and the value is the scan's there,
    normalised, exactly."""
    fitted, follow_up, prealignment = series
    target = fitted.targets[1]
    voxels = fitted.choose_voxels([1], 4000, torch.Generator().manual_seed(0))[0]
    unit = target.points(voxels, fitted.points).double().numpy()
    at = (unit + 1) / 2 * (np.asarray(REFERENCE.size) - 1)                # continuous index (x, y, z)
    on_own = OWN.to_index(_moved(REFERENCE.to_physical(at), prealignment))
    expected = np.stack(np.unravel_index(voxels.numpy(), OWN.shape)[::-1], axis=1)
    assert np.abs(on_own - expected).max() < 1e-4
    scanned = sitk.GetArrayViewFromImage(follow_up).reshape(-1)[voxels.numpy()]
    np.testing.assert_array_equal(target.values(voxels).numpy(), target.window.normalise(scanned))


def test_a_follow_up_on_a_finer_grid_of_its_own_has_every_voxel_drawn_and_those_beyond_the_reference_left_out(series):
    """Points drawn uniformly within the reference's voxels reach every one of the finer follow-up's voxels that lies
    within the reference grid (its voxels nearest the reference's centres are 41 % of them); a
    voxel outside the reference grid weighs 0, one inside 1."""
    fitted, _, prealignment = series
    target, generator = fitted.targets[1], torch.Generator().manual_seed(1)
    drawn = torch.cat([fitted.choose_voxels([1], 4000, generator)[0] for _ in range(40)]).unique()
    index = REFERENCE.to_index(_moved(OWN.points(), np.linalg.inv(prealignment)))
    within = np.all((index > -0.5) & (index < np.asarray(REFERENCE.size) - 0.5), axis=1)
    inner = np.all((index > 0.5) & (index < np.asarray(REFERENCE.size) - 1.5), axis=1)
    assert 0.3 < within.mean() < 0.9                                  # the grids overlap in part
    hit = np.zeros(len(index), bool)
    hit[drawn.numpy()] = True
    assert hit[inner].mean() > 0.99, hit[inner].mean()
    every = torch.arange(len(index))
    weight = target.weight(every).numpy().astype(bool)
    edge = np.abs(np.abs(index - (np.asarray(REFERENCE.size) - 1) / 2) - np.asarray(REFERENCE.size) / 2).min(axis=1)
    clear = edge > 0.01                                               # not on the grid's face, where rounding decides
    np.testing.assert_array_equal(weight[clear], within[clear])


def test_a_local_window_on_a_grid_of_its_own_spans_the_same_millimetres_as_on_the_references(series):
    """LNCC's window on the reference grid spans 2 voxels either side (6 mm); on the follow-up's 2 mm (2.1 mm in z)
    voxels, 3 either side (6 and 6.3 mm)."""
    fitted = series[0]
    reach = training.WINDOW.abs().amax(dim=0).numpy() * np.asarray(REFERENCE.spacing)[::-1]
    own = fitted.window_offsets(1).abs().amax(dim=0).numpy() * np.asarray(OWN.spacing)[::-1]
    np.testing.assert_allclose(reach, 6.0)
    np.testing.assert_allclose(own, (6.3, 6.0, 6.0))


def test_a_follow_up_on_a_grid_of_its_own_is_calibrated_where_its_voxels_lie():
    """A follow-up in CBCT numbers (1.1 x the reference's + 80 HU + a bias of 40 HU x the reference grid's x position,
    -1 to 1 across it), on OWN: its values as compared are the reference's numbers at its voxels' points within
    0.5 HU (its integer rounding), the bias taken where each voxel lies on the reference grid."""
    points = OWN.points()
    across = 2 * REFERENCE.to_index(points)[:, 0] / (REFERENCE.size[0] - 1) - 1
    scanned = 1.1 * _body(points) + 80.0 + 40.0 * across
    follow_up = OWN.image(np.rint(scanned).reshape(OWN.shape).astype(np.int16))
    bias = (0.0, 0.0, 40.0) + (0.0,) * 6                                   # the monomials z, y, x, then degree 2
    calibration = Calibration(1.1, 80.0, bias, REFERENCE.shape, 80.0, (-40.0, 40.0))
    fitted = _series(follow_up, calibration)[0]
    target = fitted.targets[1]
    voxels = fitted.choose_voxels([1], 4000, torch.Generator().manual_seed(2))[0]
    compared = target.window.restore(target.values(voxels).numpy().astype(np.float64))
    inside = (compared > target.window.low + 1) & (compared < target.window.high - 1)   # not clipped by the window
    assert inside.mean() > 0.5
    error = np.abs(compared - _body(points[voxels.numpy()]))[inside]
    assert error.max() < 0.5, error.max()


@pytest.mark.parametrize("similarity", ["mse", "lncc"])
def test_each_similarity_fits_a_follow_up_on_a_grid_of_its_own(similarity):
    """A fit of 30 iterations by each similarity on a follow-up on OWN ends with a finite loss (the LNCC windows on its
    grid, the squared error at its voxels)."""
    reference, follow_up = _anatomy(REFERENCE), _anatomy(OWN, np.random.default_rng(4))
    preset = replace(DEFAULT, similarity=similarity).with_iterations(30)
    losses: list[tuple[str, int, float]] = []
    fit(reference, 0.0, [(1.0, follow_up)], None, Options(preset, prior="image", prealign="none"), QUIET, losses)
    last = [loss for stage, _, loss in losses if stage == "defnet"]
    assert len(last) >= 30 and np.isfinite(last[-1])
