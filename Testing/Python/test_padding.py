"""A follow-up padded outside its field of view (a CBCT or a cropped scan resampled onto the reference's grid, filled
with 0 HU as 3D Slicer's resampling modules fill by default, or with -1000) is fitted only where it holds anatomy: its
padding is found from the grid's edges inward and left out, as the voxels beyond a scan's own grid are. A scan's own
background (air the reference holds too, a phantom's exact -1000) is not padding. A reference padded where the
follow-ups hold anatomy has its padding found against them and left out of the fit the same way."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from STNeRPLib.phantom import breathing_series
from STNeRPLib.preprocessing import (IntensityWindow, confirmed_padding, extended, find_padding, on_grid,
                                     padding_candidate)
from worker_cli import stnerp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import data  # noqa: E402

WINDOW = IntensityWindow.for_image(sitk.Image(1, 1, 1, sitk.sitkInt16), "ct")


def cylinder(image: sitk.Image, radius: float = 0.4) -> np.ndarray:
    """bool [z, y, x]: inside a cylinder along z about the grid's centre, of radius `radius` x the grid's width."""
    depth, height, width = sitk.GetArrayViewFromImage(image).shape
    y, x = np.mgrid[:height, :width]
    inside = (x - (width - 1) / 2) ** 2 + (y - (height - 1) / 2) ** 2 <= (radius * width) ** 2
    return np.broadcast_to(inside, (depth, height, width))


def padded(image: sitk.Image, value: float, radius: float = 0.4) -> sitk.Image:
    """`image` with `value` outside its cylinder(radius)."""
    array = sitk.GetArrayFromImage(image)
    array[~cylinder(image, radius)] = value
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(image)
    return result


NOISY_TIMES = [0.0, 1.0, 2.0]


@pytest.fixture(scope="module")
def noisy():
    series = breathing_series(size=(48, 48, 32), spacing=(6.0, 6.0, 7.5), n_phases=3, noise_hu=10)
    assert list(series.times) == NOISY_TIMES
    return series


@pytest.mark.parametrize("value", [0.0, -1000.0, -3024.0])
def test_padding_outside_a_cylinder_is_found_on_the_reference_grid(noisy, value):
    reference, follow_up = noisy.images[0], noisy.images[2]
    found = find_padding(padded(follow_up, value), reference, WINDOW)
    assert found is not None
    padding, mask, _ = found
    outside = ~cylinder(follow_up)
    assert padding == value
    assert mask[outside].all()
    assert np.count_nonzero(mask & ~outside) <= 0.01 * np.count_nonzero(~outside)


def test_padding_of_a_scan_on_its_own_grid_is_placed_on_the_reference_grid(noisy):
    """A CBCT on its own grid (here a crop of the padded follow-up: 40 of 48 columns, 36 of 48 rows, 24 of 32
    slices) is padded beyond its circle; the padding is found on its grid and placed on the reference's."""
    reference = noisy.images[0]
    crop = sitk.RegionOfInterest(padded(noisy.images[2], 0.0), (40, 36, 24), (4, 6, 5))
    value, mask, _ = find_padding(crop, reference, WINDOW)
    covered = np.zeros(mask.shape, bool)
    covered[5:29, 6:42, 4:44] = True
    assert value == 0.0
    assert np.array_equal(mask, covered & ~cylinder(reference))


@pytest.mark.parametrize("turn", [0.0, 10.0])
def test_a_scan_between_the_references_voxels_leaves_none_of_its_padding_in_its_field_of_view(noisy, turn):
    """A CBCT on its own grid, here half a voxel off the reference's (or turned 10 degrees, as pre-aligned): the
    reference's voxels at its field of view's edge are interpolated from the scan and its padding. Taken for the scan
    (nearest voxel), -3024 mixed into them made an edge of false air: the abdomen as such a CBCT scored 5.96 mm mean
    TRE against 1.88 on the reference's own grid. None of them is left in the field of view."""
    reference, follow_up = noisy.images[0], padded(noisy.images[2], -3024.0)
    follow_up.SetOrigin(tuple(o + s / 2 for o, s in zip(follow_up.GetOrigin(), follow_up.GetSpacing())))
    centre = reference.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in reference.GetSize()])
    transform = sitk.Euler3DTransform(centre, 0.0, 0.0, np.radians(turn))
    value, mask, runs = find_padding(follow_up, reference, WINDOW, transform)
    placed, covered = on_grid(extended(follow_up, runs), reference, transform, -1000.0)
    inside = ~mask if covered is None else covered & ~mask
    assert value == -3024.0 and inside.mean() > 0.4
    assert sitk.GetArrayViewFromImage(placed)[inside].min() > -1100.0   # air with noise of 10 HU: about -1040


def test_a_cbcts_padding_around_the_whole_body_is_not_taken_for_air_and_calibrated(noisy, tmp_path):
    """-3024 outside a cylinder of 0.45 x the width, which holds the whole body: over the reference's air it was the
    same in the window (both its floor), so not padding, and a CBCT on a grid of its own was then calibrated by it:
    "CT numbers 1653 HU off the reference's (scale 1.153, offset +316 HU...)". In HU it is no air."""
    reference = noisy.images[0]
    follow_up = sitk.Resample(noisy.images[1], [40, 40, 28], sitk.Transform(), sitk.sitkLinear,
                              tuple(np.array(reference.GetOrigin()) + (1.1, 0.7, 2.3)), (7.2, 7.2, 8.6),
                              reference.GetDirection(), -1000.0, sitk.sitkInt16)
    follow_up = padded(follow_up, -3024.0, 0.45)
    assert find_padding(follow_up, reference, WINDOW) is not None
    sitk.WriteImage(reference, str(tmp_path / "reference.nrrd"))
    sitk.WriteImage(follow_up, str(tmp_path / "cbct.nrrd"))
    result = stnerp("train", "--reference", tmp_path / "reference.nrrd", "--follow-up", tmp_path / "cbct.nrrd", 1,
                    "--output", tmp_path / "run", "--iterations", "5", "--threads", "1", "--no-report")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["intensity_calibrations"] == [] and "CT numbers" not in result.stderr, result.stderr
    assert record["time_points"][1]["field_of_view"] < 0.8


def test_a_scans_own_background_is_not_padding():
    """Air exactly -1000 in every phase of a noise-free phantom, and noisy air, are the scans' background."""
    for noise in (0, 10):
        series = breathing_series(size=(48, 48, 32), spacing=(6.0, 6.0, 7.5), n_phases=3, noise_hu=noise)
        for image in series.images[1:]:
            assert find_padding(image, series.images[0], WINDOW) is None


def inside_landmarks(series, folder, times) -> str:
    """landmarks.csv of the series' landmarks at `times` that lie inside the cylinder (the follow-ups' field of
    view)."""
    inside = cylinder(series.images[0])
    lines = ["time,x,y,z,ref_x,ref_y,ref_z"]
    for t, (points, reference) in zip(series.times, series.landmarks):
        for point, at in zip(points, reference) if t in times else ():
            x, y, z = series.images[0].TransformPhysicalPointToIndex(point.tolist())
            if inside[z, y, x]:
                lines.append(",".join(f"{v:.6f}" for v in (t, *point, *at)))
    (folder / "landmarks.csv").write_text("\n".join(lines) + "\n")
    return str(folder / "landmarks.csv")


def train(folder, reference: sitk.Image, follow_ups: list[sitk.Image], landmarks: str, report: bool = False):
    """stnerp train (200 iterations, the image prior) of `reference` and `follow_ups` at the noisy series' times,
    written into `folder`: its stderr and run.json's time points."""
    folder.mkdir()
    sitk.WriteImage(reference, str(folder / "reference.nrrd"))
    arguments = []
    for t, image in zip(NOISY_TIMES[1:], follow_ups):
        sitk.WriteImage(image, str(folder / f"{t:g}.nrrd"))
        arguments += ["--follow-up", folder / f"{t:g}.nrrd", t]
    result = stnerp("train", "--reference", folder / "reference.nrrd", *arguments, "--output", folder / "run",
                    "--iterations", "200", "--prior", "image", "--landmarks", landmarks,
                    *([] if report else ["--no-report"]))
    assert result.returncode == 0, result.stderr
    return result.stderr, json.loads((folder / "run" / "run.json").read_text())["time_points"]


def scores(points) -> list[tuple[float, int]]:
    """(mean TRE mm, folded voxels) at each follow-up."""
    return [(p["metrics"]["tre_mean"], p["metrics"]["folded_voxels"]) for p in points[1:]]


@pytest.fixture(scope="module")
def as_scanned(noisy, tmp_path_factory):
    """The noisy series as scanned, scored at the landmarks inside the cylinder: (landmarks.csv, scores)."""
    folder = tmp_path_factory.mktemp("as_scanned")
    landmarks = inside_landmarks(noisy, folder, noisy.times[1:])
    said, points = train(folder / "fit", noisy.images[0], noisy.images[1:], landmarks)
    assert "padding" not in said and [p.get("field_of_view") for p in points] == [None] * 3
    return landmarks, scores(points)


def test_follow_ups_padded_with_0_hu_on_the_reference_grid_register_as_well_as_unpadded(noisy, as_scanned, tmp_path):
    """Padding of 0 HU (water) beside the body was taken for anatomy: 28-44 mm TRE inside the field of view and
    45 000-72 000 folded voxels in a probe of 500 iterations."""
    landmarks, unpadded = as_scanned
    said, points = train(tmp_path / "padded", noisy.images[0], [padded(image, 0.0) for image in noisy.images[1:]],
                         landmarks, report=True)
    assert "padding (0) outside the scan's field of view" in said and "the reference:" not in said
    inside = float(np.mean(cylinder(noisy.images[0])))
    assert [p.get("field_of_view") for p in points] == [None, pytest.approx(inside), pytest.approx(inside)]
    for (before, _), (tre, folded) in zip(unpadded, scores(points)):
        assert folded == 0 and tre <= before + 0.1
    page = (tmp_path / "padded" / "run" / "report" / "index.html").read_text()   # the report's reader sees it
    assert "field of view (of the grid)" in page and f"<td>{inside:.0%}</td>" in page


def test_follow_ups_on_finer_grids_of_their_own_register_better_than_on_the_references(noisy, as_scanned, tmp_path):
    """The follow-ups on 4 mm grids of their own, the anatomy in place, against the same scans on the reference's 6 mm
    grid (0.67 and 0.83 mm mean TRE): fitted through copies resampled onto the reference's grid linearly they scored
    0.93 and 1.14 mm (blurred), by a cubic B-spline 0.70 and 0.82; fitted at their own voxels, which hold more than
    the coarser grid, 0.55 and 0.63."""
    landmarks, on_the_references = as_scanned

    def own(image: sitk.Image) -> sitk.Image:
        grid = sitk.Image([int(n * s / 4.0) for n, s in zip(image.GetSize(), image.GetSpacing())], sitk.sitkFloat32)
        grid.SetSpacing((4.0, 4.0, 4.0))
        grid.SetOrigin(tuple(np.array(image.GetOrigin()) + (1.3, 0.7, 2.1)))
        return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkBSpline, -1000.0, image.GetPixelID())

    said, points = train(tmp_path / "own", noisy.images[0], [own(image) for image in noisy.images[1:]], landmarks)
    for (before, _), (tre, folded) in zip(on_the_references, scores(points)):
        assert folded == 0 and tre <= before - 0.08, (before, tre)


def test_cbcts_on_their_own_grids_register_as_well_as_unpadded_on_those_grids(noisy, as_scanned, tmp_path):
    """Follow-ups padded with -3024 outside their field of view, each on a grid half a voxel off the reference's (a
    CBCT's own grid), scored 1.97 and 2.27 mm mean TRE, the same scans unpadded on those grids 0.96 and 1.06 (linear
    resampling half a voxel off blurs them; on the reference's grid 0.66 and 0.83): an edge of false air where the
    padding was interpolated into the field of view. Through cubic copies on the reference's grid 0.64 and 0.78
    (unpadded 0.72 and 0.83); fitted at their own voxels 0.58 and 0.71 (unpadded 0.65 and 0.79)."""
    half = np.array(noisy.images[0].GetSpacing()) / 2
    rows = np.loadtxt(as_scanned[0], delimiter=",", skiprows=1)
    rows[:, 1:4] += half                                      # the follow-ups' points, where their grids put them
    np.savetxt(tmp_path / "landmarks.csv", rows, "%.6f", ",", header="time,x,y,z,ref_x,ref_y,ref_z", comments="")
    fitted = {}
    for value in (None, -3024.0):
        follow_ups = [sitk.Image(image) if value is None else padded(image, value) for image in noisy.images[1:]]
        for image in follow_ups:
            image.SetOrigin(tuple(np.array(image.GetOrigin()) + half))
        said, points = train(tmp_path / f"{value}", noisy.images[0], follow_ups, str(tmp_path / "landmarks.csv"))
        assert ("padding (-3024) outside the scan's field of view" in said) == (value is not None)
        fitted[value] = scores(points)
    for (unpadded, _), (tre, folded) in zip(fitted[None], fitted[-3024.0]):
        assert folded == 0 and tre <= unpadded + 0.3, (unpadded, tre)


@pytest.mark.parametrize("value", [0.0, -1000.0])
def test_padding_of_the_reference_is_found_against_a_follow_up_that_holds_anatomy_there(noisy, value):
    """The roles swapped: the reference padded outside its circle, a follow-up holding the body there."""
    reference, follow_up = padded(noisy.images[0], value), noisy.images[2]
    found = find_padding(reference, follow_up, WINDOW)
    assert found is not None and found.value == value
    assert np.array_equal(found.where, ~cylinder(reference))


def test_a_follow_ups_padding_is_no_evidence_that_the_references_own_air_is_padding():
    """A noise-free reference's air is exactly -1000 from the grid's edges inward; a follow-up padded with 0 HU
    differs from it there, but only in its padding: inside its field of view (`seen`) it holds the same air."""
    series = breathing_series(size=(48, 48, 32), spacing=(6.0, 6.0, 7.5), n_phases=3, noise_hu=0)
    reference, follow_up = series.images[0], padded(series.images[2], 0.0)
    assert find_padding(reference, follow_up, WINDOW) is not None       # the follow-up's padding counted: air taken
    assert confirmed_padding(padding_candidate(reference), reference, follow_up, WINDOW,
                             seen=cylinder(reference)) is None


def test_a_noise_free_reference_beside_padded_follow_ups_keeps_its_air_in_the_fit(tmp_path):
    """The pipeline counts only what each follow-up saw as evidence: the reference's exact air stays in the fit."""
    series = breathing_series(size=(48, 48, 32), spacing=(6.0, 6.0, 7.5), n_phases=3, noise_hu=0)
    sitk.WriteImage(series.images[0], str(tmp_path / "reference.nrrd"))
    follow_ups = []
    for t, image in zip(series.times[1:], series.images[1:]):
        sitk.WriteImage(padded(image, 0.0), str(tmp_path / f"{t:g}.nrrd"))
        follow_ups += ["--follow-up", tmp_path / f"{t:g}.nrrd", t]
    result = stnerp("train", "--reference", tmp_path / "reference.nrrd", *follow_ups, "--output", tmp_path / "run",
                    "--iterations", "5", "--prior", "image", "--no-report")
    assert result.returncode == 0, result.stderr
    assert "padding (0) outside the scan's field of view" in result.stderr
    assert "the reference:" not in result.stderr


def test_a_reference_padded_with_0_hu_registers_its_follow_ups_as_well_as_unpadded(noisy, as_scanned, tmp_path):
    """A reference padded outside its field of view (a scan resampled onto a larger grid in 3D Slicer, 0 HU beyond
    it) against follow-ups that hold the body there: its padding was deformed as anatomy (20.8 and 27.0 mm TRE,
    11 817 and 17 041 folded voxels). It is found against the follow-ups and left out of the fit as theirs is."""
    landmarks, unpadded = as_scanned
    said, points = train(tmp_path / "padded", padded(noisy.images[0], 0.0), noisy.images[1:], landmarks)
    assert "the reference: 50% of its grid is padding (0) outside its field of view" in said, said
    for (before, _), (tre, folded) in zip(unpadded, scores(points)):
        assert folded == 0 and tre <= before + 0.1, scores(points)


def test_a_follow_up_that_overlaps_only_the_references_padding_is_refused_saying_so(noisy, tmp_path):
    """A follow-up cropped to a corner of the grid, where the reference is padding: it overlaps the reference's grid
    but none of its anatomy, and the refusal says that rather than "does not overlap the reference in space"."""
    sitk.WriteImage(padded(noisy.images[0], 0.0), str(tmp_path / "reference.nrrd"))
    sitk.WriteImage(noisy.images[1], str(tmp_path / "1.nrrd"))
    sitk.WriteImage(sitk.RegionOfInterest(noisy.images[2], (8, 8, 32), (0, 0, 0)), str(tmp_path / "2.nrrd"))
    result = stnerp("train", "--reference", tmp_path / "reference.nrrd", "--follow-up", tmp_path / "1.nrrd", 1,
                    "--follow-up", tmp_path / "2.nrrd", 2, "--output", tmp_path / "run", "--iterations", "5",
                    "--prior", "image", "--no-report")
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert "time 2 overlaps only the reference's padding (0)" in error, error
    assert "no anatomy of the reference to register it to" in error


def test_an_affine_prealignment_compares_the_scans_inside_the_references_field_of_view(tmp_path):
    """The sliding abdomen (real anatomy) with its reference padded with -1000 HU beyond a cylinder, as a scan
    resampled onto a larger grid with air as the fill: mutual information matched the follow-up's body beside the
    cylinder to that air, an affine 14 % too large along one axis, 40 mm off (14.3 mm from the landmarks' true
    positions against 6.4 unregistered). It now compares the scans inside the reference's field of view alone."""
    if not data.abdomen_available():
        pytest.skip(f"no abdomen CT in {data.ABDOMEN_CT}")
    series = data.Series(data.abdomen_series(tmp_path / "abdomen", n_phases=2, heldout=1))
    reference, follow_up = (sitk.Cast(sitk.Round(series.image(k)), sitk.sitkInt16) for k in (0, 1))
    sitk.WriteImage(padded(reference, -1000.0), str(tmp_path / "reference.nrrd"))
    sitk.WriteImage(follow_up, str(tmp_path / "1.nrrd"))
    result = stnerp("train", "--reference", tmp_path / "reference.nrrd", "--follow-up", tmp_path / "1.nrrd", 1,
                    "--prealign", "affine", "--output", tmp_path / "run", "--iterations", "5", "--threads", "1",
                    "--no-report")
    assert result.returncode == 0, result.stderr
    assert "the reference: 39% of its grid is padding (-1000)" in result.stderr
    affine = np.asarray(json.loads((tmp_path / "run" / "run.json").read_text())["time_points"][1]["prealignment"])
    points, at_reference = series.landmarks(1)
    unregistered = np.linalg.norm(at_reference - points, axis=1).mean()
    error = np.linalg.norm(at_reference @ affine[:3, :3].T + affine[:3, 3] - points, axis=1).mean()
    assert error < 0.7 * unregistered, (error, unregistered)
