"""A pre-alignment is reproducible: the same pair gives the same transform every run. A follow-up whose anatomy lies
far from the reference's is pre-aligned by a rigid transform by default (--prealign auto); fitted with --prealign none,
it is named in the log with the way out."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from STNeRPLib.geometry import Grid
from STNeRPLib.phantom import breathing_series
from STNeRPLib.preprocessing import (CT_WINDOW, PREALIGNMENT_SAMPLES, PREALIGNMENT_SHRINKS, IntensityWindow,
                                     _block_means, _on_blocks, apparent_shift_mm, prealignment, rigid_estimate,
                                     sampled_shares, turn_degrees)
from test_padding import padded
from test_warping import blobs
from worker_cli import stnerp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import data  # noqa: E402


@pytest.fixture
def two_itk_threads():
    """ITK at two threads (the suite's workers run it at one each), as a run on two cores does."""
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    yield
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


FINDERS = {"affine": lambda reference, image, window: prealignment(reference, image, np.zeros(3), window),
           "rigid": lambda reference, image, window: prealignment(reference, image, np.zeros(3), window, rigid=True),
           "rigid estimate": lambda reference, image, window: rigid_estimate(reference, image, np.zeros(3), window,
                                                                             None)}


@pytest.mark.parametrize("finder", FINDERS)
def test_a_prealignment_is_the_same_to_the_last_bit_every_run(finder, two_itk_threads):
    """Mattes MI samples voxels at random: SimpleITK's seed 0 means "the wall clock", which made two
    runs of the same command differ (matrices up to 2.6 apart); a fixed seed makes them identical. ITK's
    threads summed the metric in the order they finished, so the transforms still differed in their last
    bits (up to 6e-6 here), which a fit after them follows to a different result (a sliding abdomen's
    pair: mean TRE 1.20-1.24 mm over runs of one command). Nor does ITK's thread count change it."""
    series = breathing_series(size=(32, 32, 24), spacing=(9.0, 9.0, 10.0), n_phases=4, noise_hu=10)
    moved = sitk.Image(series.images[2])
    moved.SetOrigin(tuple(o + d for o, d in zip(moved.GetOrigin(), (6.0, -4.0, 5.0))))
    found = [FINDERS[finder](series.images[0], moved, IntensityWindow(*CT_WINDOW)) for _ in range(4)]
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    found.append(FINDERS[finder](series.images[0], moved, IntensityWindow(*CT_WINDOW)))
    parameters = [np.array(t.GetMatrix() + t.GetTranslation()) for t in found]
    for other in parameters[1:]:
        np.testing.assert_array_equal(other, parameters[0])


def _abdomen_moved(folder: Path, shift: tuple[float, float, float], *options: str, turn: float = 0.0,
                   field_of_view: float | None = None) -> tuple[dict, list[str], float]:
    """The sliding abdomen's reference and peak phase, the latter's grid turned by `turn` degrees about z and its
    centre and moved by `shift` (LPS mm: the scanner's frame or the couch differing), with `field_of_view` padded
    with -3024 outside a cylinder of that share of its width (a CBCT's), trained on for 5 iterations with `options`:
    the run's time 1 entry, its log's lines that name the shift or a position, and the mean distance (mm) at which
    the entry's pre-alignment alone puts the reference's landmarks from their true places (None: none)."""
    if not data.abdomen_available():
        pytest.skip(f"no abdomen CT in {data.ABDOMEN_CT}")
    series = data.Series(data.abdomen_series(folder / "abdomen", n_phases=2, heldout=1))
    reference, follow_up = (sitk.Cast(sitk.Round(series.image(k)), sitk.sitkInt16) for k in (0, 1))
    if field_of_view is not None:
        follow_up = padded(follow_up, -3024.0, field_of_view)
    angle = np.radians(turn)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    centre = np.array(follow_up.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in follow_up.GetSize()]))
    follow_up.SetDirection((rotation @ np.reshape(follow_up.GetDirection(), (3, 3))).ravel().tolist())
    follow_up.SetOrigin((rotation @ (np.array(follow_up.GetOrigin()) - centre) + centre + shift).tolist())
    sitk.WriteImage(reference, str(folder / "reference.nrrd"))
    sitk.WriteImage(follow_up, str(folder / "1.nrrd"))
    result = stnerp("train", "--reference", folder / "reference.nrrd", "--follow-up", folder / "1.nrrd", 1,
                    "--output", folder / "run", "--iterations", "5", "--threads", "1", "--no-report", *options)
    assert result.returncode == 0, result.stderr
    entry = next(e for e in json.loads((folder / "run" / "run.json").read_text())["time_points"] if e["time"] == 1)
    said = [line for line in result.stderr.splitlines() if "anatomy lies" in line or "position" in line]
    if entry["prealignment"] is None:
        return entry, said, None
    points, at_reference = series.landmarks(1)
    points = (points - centre) @ rotation.T + centre + shift
    matrix = np.asarray(entry["prealignment"])
    return entry, said, float(np.linalg.norm(at_reference @ matrix[:3, :3].T + matrix[:3, 3] - points, axis=1).mean())


def _shift_said(line: str) -> list[float]:
    """The LPS shift (mm) a log line names, "(moved +35, -30, +20 mm LPS, turned 5.0°)"."""
    return [float(v) for v in line.split("(moved ")[1].split(" mm")[0].split(", ")]


def _turn_degrees(matrix: np.ndarray) -> float:
    """The angle (degrees) of a rotation matrix."""
    return float(np.degrees(np.arccos(np.clip((np.trace(matrix) - 1) / 2, -1.0, 1.0))))


@pytest.mark.parametrize("shift", [(0.0, 0.0, 0.0), (35.0, -30.0, 20.0)])
def test_a_follow_up_far_from_the_reference_is_pre_aligned_by_default(tmp_path, shift):
    """Moved 50 mm and turned 5 degrees, the sliding abdomen's peak phase scored 93.6 mm mean TRE and 142 614 folded
    voxels fitted without a pre-alignment, marked complete; pre-aligned by a translation, 1.94 mm (11.2 max), by a
    rigid transform 1.58 (5.5). By default (--prealign auto) a follow-up further than FAR_MM is pre-aligned by a
    rigid transform, said, and a predicted time is said to lie in the reference's position; in place, as every
    benchmark series (no shift found), it is fitted as it lies and nothing is said."""
    entry, said, error = _abdomen_moved(tmp_path, shift, "--predict-times", "0.5", turn=5.0 if any(shift) else 0.0)
    if shift == (0.0, 0.0, 0.0):
        assert not said and entry["prealignment"] is None
    else:
        assert len(said) == 2 and "time 1: its anatomy lies up to " in said[0], said
        assert "by a rigid transform" in said[0], said
        assert said[1] == "the predicted times lie in the reference's position: the pre-alignment of time 1 is not " \
                          "carried to them", said
        matrix = np.asarray(entry["prealignment"])[:3, :3]
        np.testing.assert_allclose(matrix @ matrix.T, np.eye(3), atol=1e-9)   # a rotation: no scale, no shear
        assert error < 6.0, error   # the pre-alignment alone: 4.2 mm; a translation's, 9.3; unregistered 49.4


def test_a_follow_up_turned_in_place_is_pre_aligned_by_default(tmp_path):
    """Turned 10 degrees about z and its grid's centre, not moved, the sliding abdomen's peak phase showed no shift (the
    grids' blocks match at the centre) and was fitted as it lies: 2.89 mm mean TRE, 16.8 max, against 1.55 (5.1)
    pre-aligned by a rigid transform. The rigid estimate at the coarsest level finds its anatomy up to 30 mm away: it is
    pre-aligned and said."""
    entry, said, error = _abdomen_moved(tmp_path, (0.0, 0.0, 0.0), turn=10.0)
    assert len(said) == 1 and "time 1: its anatomy lies up to " in said[0] and "by a rigid transform" in said[0], said
    assert "turned 10" in said[0] or "turned 9." in said[0], said
    matrix = np.asarray(entry["prealignment"])[:3, :3]
    assert abs(_turn_degrees(matrix) - 10.0) < 1.0, matrix
    assert error < 6.0, error   # the pre-alignment alone: 4.2 mm (the breathing motion is left to Def-Net)


@pytest.mark.parametrize("grid", ["9 mm", "12 mm, padded"])
def test_a_follow_up_neither_moved_nor_turned_is_fitted_as_it_lies_on_coarse_grids(tmp_path, grid):
    """The rigid estimate that decides --prealign auto saw the test phantoms turned or moved that are not: on a random
    fifth of the 9 mm phantom's voxels it found 12.9 mm (a pre-alignment that cost the unscanned time's image 4 dB),
    and shrunk 4 voxels on 12 mm ones with the follow-up's -3024 padding seen by the metric, 42.7 mm. On voxels of about
    12 mm, every one inside both fields of view, 1.0 and 1.6 mm: both are fitted as they lie, nothing said."""
    if grid == "9 mm":
        series = breathing_series(size=(32, 32, 24), spacing=(9.0, 9.0, 10.0), n_phases=4, noise_hu=0)
        follow_ups = {float(k): series.images[k] for k in (1, 2, 3)}
    else:
        series = breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=2, noise_hu=0)
        follow_ups = {1.0: padded(series.images[1], -3024.0)}
    sitk.WriteImage(series.images[0], str(tmp_path / "reference.nrrd"))
    arguments: list = []
    for t, image in follow_ups.items():
        sitk.WriteImage(image, str(tmp_path / f"{t:g}.nrrd"))
        arguments += ["--follow-up", tmp_path / f"{t:g}.nrrd", t]
    result = stnerp("train", "--reference", tmp_path / "reference.nrrd", *arguments, "--output", tmp_path / "run",
                    "--iterations", "3", "--threads", "1", "--no-report")
    assert result.returncode == 0, result.stderr
    assert "anatomy lies" not in result.stderr, result.stderr
    entries = json.loads((tmp_path / "run" / "run.json").read_text())["time_points"]
    assert [e["prealignment"] for e in entries if e["time"] in follow_ups] == [None] * len(follow_ups)


@pytest.mark.parametrize("shift, turn", [((0.0, 0.0, 0.0), 10.0), ((35.0, -30.0, 20.0), 5.0)])
def test_a_cbct_with_a_small_field_of_view_is_pre_aligned_by_its_anatomy_not_its_edge(tmp_path, shift, turn):
    """The abdomen's peak phase padded with -3024 outside a cylinder of 0.3 x its width (a CBCT's field of view, 240
    mm across), turned and moved: mutual information, on the whole of both scans, put the reference's landmarks 20-35
    mm from their places (the fit 27.3 and 47.4 mm mean TRE, 39 587 folded voxels). Masked to the follow-up's field of
    view, to the reference's voxels that the start carries into it, and on both scans in the intensity window (-3024
    smoothed into the field of view otherwise makes an edge), 4.4 and 4.6 mm."""
    entry, said, error = _abdomen_moved(tmp_path, shift, turn=turn, field_of_view=0.3)
    assert len(said) == 1 and "pre-aligned by a rigid transform" in said[0], said
    assert error < 6.0, error


def test_a_follow_up_far_from_the_reference_without_prealignment_is_named_with_the_way_out(tmp_path):
    """With --prealign none the follow-up moved 50 mm is fitted as it lies, and the log says how far it lies and how to
    pre-align it."""
    shift = (35.0, -30.0, 20.0)
    entry, said, _ = _abdomen_moved(tmp_path, shift, "--prealign", "none")
    assert entry["prealignment"] is None
    assert len(said) == 1 and "time 1: its anatomy lies up to " in said[0] and "--prealign auto" in said[0], said
    np.testing.assert_allclose(_shift_said(said[0]), shift, atol=6.0)


def test_the_apparent_shift_of_a_scan_thinner_than_a_block_is_found_across_its_slices():
    """Four slices 1 mm apart (the fewest a scan may have) are thinner than the 6 mm block the scans are compared on:
    the slices make one block (it failed: no block filled), and a shift of 12 mm across them is found."""
    array = np.full((4, 60, 60), -1000, np.int16)
    array[:, 15:40, 10:30] = 40
    reference = sitk.GetImageFromArray(array)
    moved = sitk.GetImageFromArray(np.roll(array, 12, axis=2))
    moved.CopyInformation(reference)
    window = IntensityWindow(*CT_WINDOW)
    np.testing.assert_allclose(apparent_shift_mm(reference, moved, window), (12.0, 0.0, 0.0), atol=6.0)


def test_an_affine_prealignment_starts_from_the_apparent_shift_of_anatomy_moved_within_the_grid(tmp_path):
    """The abdomen's peak phase moved 50 mm inside an unmoved grid (a patient lying elsewhere in the field of view):
    started from the grids' centres, mutual information ran off (89.5 mm from the landmarks' true positions against
    49.0 unregistered; the fit 174 mm mean TRE, 16 366 folded voxels); started from the apparent shift it finds them
    (4.0 mm)."""
    if not data.abdomen_available():
        pytest.skip(f"no abdomen CT in {data.ABDOMEN_CT}")
    series = data.Series(data.abdomen_series(tmp_path / "abdomen", n_phases=2, heldout=1))
    reference, follow_up = (sitk.Cast(sitk.Round(series.image(k)), sitk.sitkInt16) for k in (0, 1))
    move = np.array([35.0, -30.0, 20.0])
    moved = sitk.Resample(follow_up, follow_up, sitk.TranslationTransform(3, (-move).tolist()), sitk.sitkLinear,
                          -1024.0, sitk.sitkInt16)
    sitk.WriteImage(reference, str(tmp_path / "reference.nrrd"))
    sitk.WriteImage(moved, str(tmp_path / "1.nrrd"))
    result = stnerp("train", "--reference", tmp_path / "reference.nrrd", "--follow-up", tmp_path / "1.nrrd", 1,
                    "--prealign", "affine", "--output", tmp_path / "run", "--iterations", "5", "--threads", "1",
                    "--no-report")
    assert result.returncode == 0, result.stderr
    affine = np.asarray(json.loads((tmp_path / "run" / "run.json").read_text())["time_points"][1]["prealignment"])
    points, at_reference = series.landmarks(1)
    points = points + move
    unregistered = np.linalg.norm(at_reference - points, axis=1).mean()
    error = np.linalg.norm(at_reference @ affine[:3, :3].T + affine[:3, 3] - points, axis=1).mean()
    assert error < 0.2 * unregistered, (error, unregistered)


def test_a_clinical_size_prealignment_samples_at_most_its_bound_of_voxels_a_level():
    """A fifth of a 512 x 512 x 200 reference's voxels is 10.5 M at full resolution: ITK's metric over them took two
    minutes a follow-up at two threads; a fifth of a small grid's is sampled as before."""
    size = (512, 512, 200)
    voxels = [math.prod(size) / shrink ** 3 for shrink in PREALIGNMENT_SHRINKS]
    samples = [share * count for share, count in zip(sampled_shares(size), voxels)]
    assert max(samples) <= PREALIGNMENT_SAMPLES * (1 + 1e-9)
    assert samples[-1] == pytest.approx(PREALIGNMENT_SAMPLES)
    assert sampled_shares((96, 96, 64)) == [0.2] * len(PREALIGNMENT_SHRINKS)


def _oblique(image: sitk.Image, degrees: float) -> sitk.Image:
    """`image` on its grid turned `degrees` about x, y and z in turn (no direction entry 0), its voxels as they are."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    turn = (np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
            @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]))
    turned = sitk.Image(image)
    turned.SetDirection(turn.ravel().tolist())
    return turned


def test_the_blocks_the_rigid_estimate_compares_lie_at_the_centres_of_the_voxels_they_average():
    """rigid_estimate compares the scans' means over blocks of voxels: each block's mean stands at its voxels' centre
    (a scan linear in LPS mm averages to its value there), on an oblique grid of 2 x 3 x 5 mm voxels in blocks that
    differ along each axis (6 x 4 x 2 voxels); its last voxels along an axis that fill no block are left out."""
    reference = _oblique(sitk.Image(27, 21, 11, sitk.sitkFloat32), 20.0)
    reference.SetSpacing((2.0, 3.0, 5.0))
    reference.SetOrigin((-30.0, 12.0, 7.0))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in reference.GetSize()], indexing="ij"), -1).reshape(-1, 3)
    points = np.array([reference.TransformIndexToPhysicalPoint(index.tolist()) for index in grid])
    gradient = np.array([4.0, -3.0, 2.0])       # HU a mm: -990 to 400 HU over the grid, inside the CT window
    values = (-300.0 + points @ gradient).reshape(reference.GetSize()).transpose(2, 1, 0)
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.CopyInformation(reference)
    window = IntensityWindow(*CT_WINDOW)
    blocks = (2, 4, 6)
    means = _on_blocks(_block_means(image, blocks, window, None), image, blocks)
    assert means.GetSize() == (4, 5, 5)
    centres = np.array([means.TransformIndexToPhysicalPoint(index) for index in np.ndindex(means.GetSize())])
    expected = window.normalise(-300.0 + centres @ gradient)
    found = sitk.GetArrayViewFromImage(means).transpose(2, 1, 0).reshape(-1)
    np.testing.assert_allclose(found, expected, atol=1e-5)


def test_a_follow_up_moved_and_turned_is_found_by_the_rigid_estimate_on_an_oblique_grid_of_thick_slices():
    """The breathing phantom's reference, turned 6 degrees about the grid's centre and moved (8, -5, 4) mm, on an
    oblique grid of 3 x 3 x 5 mm voxels: the estimate puts the reference's anatomy within 0.5 mm of where the known
    transform carries it (0.12 mm; compared on its points' own 12 mm blocks, 1.39: interpolated between blocks on the
    points' grid, mutual information pulled towards the grids' alignment)."""
    series = breathing_series(size=(64, 64, 40), spacing=(3.0, 3.0, 5.0), n_phases=2, noise_hu=0)
    reference = _oblique(series.images[0], 15.0)
    known = sitk.Euler3DTransform()
    known.SetCenter(reference.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in reference.GetSize()]))
    known.SetRotation(0.0, 0.0, math.radians(6.0))
    known.SetTranslation((8.0, -5.0, 4.0))
    follow_up = sitk.Resample(reference, reference, known.GetInverse(), sitk.sitkLinear, -1000.0)
    window = IntensityWindow(*CT_WINDOW)
    estimate = rigid_estimate(reference, follow_up, apparent_shift_mm(reference, follow_up, window), window, None)
    body = np.argwhere(sitk.GetArrayViewFromImage(reference)[::2, ::4, ::4] > -500) * (2, 4, 4)
    anatomy = np.array([reference.TransformIndexToPhysicalPoint(index[::-1].tolist()) for index in body])
    truth = np.array([known.TransformPoint(p) for p in anatomy])
    found = np.array([estimate.TransformPoint(p) for p in anatomy])
    assert np.linalg.norm(found - truth, axis=1).max() < 0.5


def test_a_rigid_estimate_with_no_block_inside_both_fields_of_view_is_the_apparent_shift():
    """Two scans that share a field of view thinner than one of the blocks whose means the estimate compares have
    nothing to compare: the estimate is the apparent shift alone, no turn."""
    series = breathing_series(size=(32, 32, 24), spacing=(1.0, 1.0, 1.0), n_phases=2, noise_hu=0)
    view = np.zeros(sitk.GetArrayViewFromImage(series.images[0]).shape, bool)
    view[:, :, 10:12] = True                      # 2 mm across x: no block of 3 voxels (9-11, 12-14) lies inside
    shift = np.array([3.0, -2.0, 1.0])
    estimate = rigid_estimate(series.images[0], series.images[1], shift, IntensityWindow(*CT_WINDOW), view)
    np.testing.assert_array_equal(estimate.GetMatrix(), np.eye(3).ravel())
    np.testing.assert_array_equal(estimate.GetTranslation(), shift)


def test_a_small_scan_moved_a_few_mm_is_estimated_moved_not_turned():
    """Blobs moved (3, -2, 2.5) mm on an oblique grid 56 x 58 x 60 mm across: compared only every 12 mm or more (some
    60 points) the estimate read them turned 3.4 degrees (6.1 before the block means; 14 on unsmoothed means, and 12
    mm away: pre-aligned); compared at enough points (RIGID_ESTIMATE_POINTS), the move is found and no turn."""
    grid = Grid((28, 24, 20), (2.0, 2.4, 3.0), (-27.0, -31.0, -22.0),
                sitk.VersorTransform((0.3, -1, 0.5), 0.35).GetMatrix())
    move = np.array([3.0, -2.0, 2.5])
    estimate = rigid_estimate(blobs(grid), blobs(grid, tuple(move)), np.zeros(3), IntensityWindow(*CT_WINDOW), None)
    assert turn_degrees(estimate) < 1.0
    np.testing.assert_allclose(estimate.GetTranslation(), move, atol=0.7)
