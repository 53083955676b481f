"""Voxels drawn about the reference segmentation's structure boundaries (Preset.structure_points,
sampling.structure_bands): a small structure's edge weighs in the fit as its contour does for the user."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from STNeRPLib import training
from STNeRPLib.phantom import breathing_series, longitudinal_series, write_series
from STNeRPLib.preprocessing import IntensityWindow
from STNeRPLib.presets import DEFAULT, PAPER
from STNeRPLib.sampling import structure_bands
from worker_cli import stnerp


def test_a_structures_band_holds_the_voxels_within_its_half_width_of_the_boundary_and_no_others():
    """A 10-voxel cube (label 3) and a 2-voxel one (label 7) on 3 x 3 x 6 mm voxels, band 6 mm: 2 voxels
    across the boundary in x and y, 1 in z."""
    labelmap = np.zeros((20, 30, 30), np.uint8)
    labelmap[5:15, 10:20, 10:20] = 3
    labelmap[2:4, 2:4, 25:27] = 7
    bands = structure_bands(labelmap, (3.0, 3.0, 6.0), band_mm=6.0)
    assert len(bands) == 2
    cube = np.zeros(labelmap.size, bool)
    cube[bands[0]] = True
    cube = cube.reshape(labelmap.shape)
    assert cube[10, 15, 10] and cube[10, 15, 8] and cube[10, 15, 11]       # 2 voxels out, 1 in, at x = 10
    assert not cube[10, 15, 7] and not cube[10, 15, 12]                      # 3 voxels out; 2 in
    assert cube[4, 15, 15] and cube[5, 15, 15] and not cube[3, 15, 15] and not cube[6, 15, 15]   # z: 1 voxel
    assert not cube[10, 15, 15]                                               # the interior
    small = np.unravel_index(bands[1], labelmap.shape)
    assert labelmap[small].max() == 7 and (labelmap[small] == 0).any()      # its whole body and its surround
    assert np.intersect1d(bands[0], bands[1]).size == 0


def test_each_band_is_the_structure_dilated_minus_eroded_by_itks_ball_over_the_whole_grid():
    """On the longitudinal phantom's reference (tumour and two lungs, 3 x 3 x 4 mm, band 9 mm): computed
    within each structure's bounding box, every band equals the whole grid's dilation minus erosion by the
    same ball (scipy, with ITK's ball; no structure touches the grid's faces)."""
    labelmap = sitk.GetArrayFromImage(longitudinal_series(n_fractions=2).labelmaps[0])
    single = np.zeros((5, 7, 7), np.uint8)
    single[2, 3, 3] = 1
    ball = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(single), [3, 3, 2])).astype(bool)
    bands = structure_bands(labelmap, (3.0, 3.0, 4.0))
    assert len(bands) == 3
    for label, band in zip((1, 2, 3), bands):
        structure = labelmap == label
        expected = ndimage.binary_dilation(structure, ball) & ~ndimage.binary_erosion(structure, ball)
        np.testing.assert_array_equal(band, np.flatnonzero(expected))


def _series(bands, band_draws):
    series = breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3, noise_hu=0)
    window = IntensityWindow.for_image(series.images[0], "ct")
    targets = [training.Target(t, image, window) for t, image in zip((0.0, 0.5, 1.0), series.images)]
    return training._Series.of(targets, torch.device("cpu"), bands, band_draws)


def test_the_first_draws_come_from_the_bands_in_equal_shares_and_the_rest_uniformly():
    bands = [np.arange(100, 110), np.arange(5000, 5003)]
    series = _series(bands, 7)
    voxels = series.choose_voxels([0, 2], 64, torch.Generator().manual_seed(0))
    assert voxels.shape == (2, 64)
    assert torch.isin(voxels[:, :4], torch.from_numpy(bands[0])).all()
    assert torch.isin(voxels[:, 4:7], torch.from_numpy(bands[1])).all()
    rest = voxels[:, 7:]
    assert not torch.isin(rest, torch.from_numpy(np.concatenate(bands))).all()
    assert int(rest.max()) > 5003                                            # drawn over the whole grid


def test_without_a_segmentation_the_draw_is_the_uniform_one_bit_for_bit():
    """The default preset's draws, and so its fits, do not change when structure_points is unused."""
    plain, unused = _series(None, 0), _series(None, 7)
    first = plain.choose_voxels([0, 1], 64, torch.Generator().manual_seed(3))
    second = unused.choose_voxels([0, 1], 64, torch.Generator().manual_seed(3))
    expected = torch.randint(plain.points.count, (2, 64), generator=torch.Generator().manual_seed(3))
    assert unused.band_draws == 0 and torch.equal(first, expected) and torch.equal(second, expected)


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    series = breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3, noise_hu=0)
    return series, write_series(series, tmp_path_factory.mktemp("series"))


def _train(files, output, *extra):
    return stnerp("train", "--reference", files["images"][0], "--follow-up", files["images"][1], 1,
                  "--follow-up", files["images"][2], 2, "--iterations", 20, "--output", output, "--no-report", *extra)


def test_train_draws_about_the_segmentations_structures_and_records_the_fraction(on_disk, tmp_path):
    _, files = on_disk
    result = _train(files, tmp_path / "run", "--segmentation", files["labelmaps"][0], "--structure-points", 0.1,
                    "--similarity", "charbonnier")
    assert result.returncode == 0, result.stderr
    preset = json.loads((tmp_path / "run" / "run.json").read_text())["parameters"]["preset"]
    assert preset["structure_points"] == 0.1 and preset["similarity"] == "charbonnier"


@pytest.mark.parametrize("extra, similarity, fraction", [
    (("--segmentation", None), "charbonnier", 0.1),                          # the default preset, guided
    ((), "mse", 0.0),                                                        # nothing to draw about
    (("--segmentation", None, "--similarity", "mse"), "mse", 0.1),           # an explicit loss wins
    (("--segmentation", None, "--structure-points", 0), "mse", 0.0),         # uniform draws: the plain loss
    (("--segmentation", None, "--preset", "paper", "--iterations", 2), "mse", 0.0),
])
def test_the_default_preset_is_guided_by_a_segmentation_and_records_what_it_ran(on_disk, tmp_path, extra,
                                                                                 similarity, fraction):
    _, files = on_disk
    extra = tuple(files["labelmaps"][0] if value is None else value for value in extra)
    result = _train(files, tmp_path / "run", *extra)
    assert result.returncode == 0, result.stderr
    preset = json.loads((tmp_path / "run" / "run.json").read_text())["parameters"]["preset"]
    assert (preset["similarity"], preset["structure_points"], preset["structure_similarity"]) == (
        similarity, fraction, None)
    guided = f"guided by the segmentation: 10% of the voxels drawn about its 3 structures, Def-Net's loss {similarity}"
    assert (guided in result.stderr) == (fraction > 0), result.stderr                 # the log says so


def test_a_preset_resolved_for_a_segmentation_stays_so():
    guided, plain = DEFAULT.for_segmentation(True), DEFAULT.for_segmentation(False)
    assert (guided.similarity, guided.structure_points) == ("charbonnier", 0.1)
    assert (plain.similarity, plain.structure_points) == ("mse", 0.0)
    assert guided.for_segmentation(True) == guided and plain.for_segmentation(True) == plain
    assert PAPER.for_segmentation(True).similarity == PAPER.for_segmentation(False).similarity == "mse"


@pytest.mark.parametrize("extra, says", [
    (("--structure-points", 0.1), "give --segmentation"),
    (("--structure-points", 1.5, "--segmentation", None), "--structure-points 1.5 is not a fraction"),
])
def test_structure_points_without_a_segmentation_or_out_of_range_is_refused(on_disk, tmp_path, extra, says):
    _, files = on_disk
    extra = tuple(files["labelmaps"][0] if value is None else value for value in extra)
    result = _train(files, tmp_path / "run", *extra)
    assert result.returncode == 2 and says in result.stderr, result.stderr
    record = tmp_path / "run" / "run.json"
    assert not record.exists() or '"complete"' not in record.read_text()
