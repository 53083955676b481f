"""Def-Net's voxels drawn only in and about the body (Preset.body_mask, sampling.body_voxels): the air around the
body, where a drawn voxel has no motion to follow, is not drawn, and the body keeps the density of draws the whole
grid had."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from STNeRPLib import training
from STNeRPLib.phantom import breathing_series, write_series
from STNeRPLib.preprocessing import IntensityWindow
from STNeRPLib.presets import DEFAULT, PAPER
from STNeRPLib.sampling import BODY_LEVEL, body_voxels
from worker_cli import stnerp

AIR, TISSUE = -1000, 40


def _mask(index: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(int(np.prod(shape)), bool)
    mask[index] = True
    return mask.reshape(shape)


def _box_with_a_lung(shape=(20, 30, 30)) -> np.ndarray:
    """Tissue at z 5-14, y 10-19, x 10-19 in air, with air (a lung) at z 8-11, y 13-16, x 13-16 inside it."""
    scan = np.full(shape, AIR, np.int16)
    scan[5:15, 10:20, 10:20] = TISSUE
    scan[8:12, 13:17, 13:17] = AIR
    return scan


def test_the_body_is_each_row_from_its_first_to_its_last_voxel_within_the_margin():
    """3 x 3 x 6 mm voxels, margin 6 mm: 2 voxels about the tissue in x and y, 1 in z; the lung inside is body."""
    body = _mask(body_voxels([_box_with_a_lung()], -900.0, (3.0, 3.0, 6.0), margin_mm=6.0), (20, 30, 30))
    expected = np.zeros((20, 30, 30), bool)
    expected[4:16, 8:22, 8:22] = True
    np.testing.assert_array_equal(body, expected)


def test_the_body_is_the_union_over_the_scans_and_the_threshold_is_in_the_scans_units():
    first = _box_with_a_lung()
    moved = np.full_like(first, AIR)
    moved[5:15, 10:20, 14:24] = TISSUE                            # the body 12 mm further along x
    faint = np.full_like(first, -950)                             # below -900 HU everywhere: no body
    body = _mask(body_voxels([first, moved, faint], -900.0, (3.0, 3.0, 6.0), margin_mm=6.0), first.shape)
    expected = np.zeros(first.shape, bool)
    expected[4:16, 8:22, 8:26] = True
    np.testing.assert_array_equal(body, expected)
    assert body_voxels([faint], -960.0, (3.0, 3.0, 6.0)).size == faint.size      # above -960: all body


def test_padding_outside_a_scans_field_of_view_is_no_body():
    """A follow-up padded with 0 HU (above the threshold) beyond its field of view x 5-24: the padding is not body,
    so it does not make every row of the grid body."""
    padded = _box_with_a_lung()
    padded[:, :, :5] = padded[:, :, 25:] = 0
    inside = np.zeros(padded.shape, bool)
    inside[:, :, 5:25] = True
    body = _mask(body_voxels([_box_with_a_lung(), padded], -900.0, (3.0, 3.0, 6.0), margin_mm=6.0,
                             insides=[None, inside]), padded.shape)
    expected = np.zeros(padded.shape, bool)
    expected[4:16, 8:22, 8:22] = True
    np.testing.assert_array_equal(body, expected)


def test_rows_between_two_bodies_are_drawn_whole_and_empty_rows_not_at_all():
    """Two blocks in one row, 15 voxels apart: everything between them is drawn (as the lungs between the chest
    walls); a row with no tissue near it has no voxel; the indices ascend in int32."""
    scan = np.full((3, 4, 40), AIR, np.int16)
    scan[1, 1, 5:10] = TISSUE
    scan[1, 1, 25:30] = TISSUE
    index = body_voxels([scan], -900.0, (1.0, 1.0, 1.0), margin_mm=1.0)
    body = _mask(index, scan.shape)
    assert body[1, 1, 4:31].all() and not body[1, 1, :4].any() and not body[1, 1, 31:].any()
    assert body[0:3, 0:3, 4:31].all() and not body[:, 3].any()
    assert index.dtype == np.int32 and (np.diff(index) > 0).all()


def _series(body):
    series = breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3, noise_hu=0)
    window = IntensityWindow.for_image(series.images[0], "ct")
    targets = [training.Target(t, image, window) for t, image in zip((0.0, 0.5, 1.0), series.images)]
    return training._Series.of(targets, torch.device("cpu"), None, 0, body)


def test_draws_come_from_the_body_only_evenly_and_as_densely_as_over_the_grid():
    """A body of a quarter of the 9216-voxel grid: 64 wanted draws become 16 (the same per voxel), every one of
    them in the body, and over many draws each body voxel is drawn as often as the others (within 5 Poisson
    standard deviations)."""
    body = np.arange(0, 9216, 4, dtype=np.int32)
    series = _series(body)
    generator = torch.Generator().manual_seed(0)
    voxels = series.choose_voxels([0, 2], 64, generator)
    assert voxels.shape == (2, 16) and voxels.dtype == torch.int64
    assert torch.isin(voxels, torch.from_numpy(body).long()).all()
    many = torch.cat([series.choose_voxels([0], 8000, generator).ravel() for _ in range(200)])   # 2000 each
    counts = np.bincount(many.numpy(), minlength=9216)
    assert counts[1::4].sum() == counts[2::4].sum() == counts[3::4].sum() == 0
    drawn = counts[::4]
    assert abs(drawn - drawn.mean()).max() < 5 * np.sqrt(drawn.mean())


def test_a_body_that_fills_the_grid_draws_as_the_whole_grid_bit_for_bit():
    whole, plain = _series(np.arange(9216, dtype=np.int32)), _series(None)
    first = whole.choose_voxels([0, 1], 64, torch.Generator().manual_seed(3))
    second = plain.choose_voxels([0, 1], 64, torch.Generator().manual_seed(3))
    assert whole.body is None and torch.equal(first, second)


def test_the_default_preset_draws_in_the_body_and_the_paper_everywhere():
    assert DEFAULT.body_mask and not PAPER.body_mask
    assert -1000 + BODY_LEVEL * 1500 == pytest.approx(-900, abs=1)           # the CT window's -900 HU


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    series = breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3, noise_hu=0)
    return write_series(series, tmp_path_factory.mktemp("series"))


@pytest.mark.parametrize("extra, masked", [((), True), (("--no-body-mask",), False),
                                           (("--preset", "paper", "--iterations", 2), False),
                                           (("--preset", "paper", "--iterations", 2, "--body-mask"), True)])
def test_train_draws_in_the_body_says_how_much_of_the_grid_and_records_it(on_disk, tmp_path, extra, masked):
    files = on_disk
    result = stnerp("train", "--reference", files["images"][0], "--follow-up", files["images"][1], 1,
                    "--follow-up", files["images"][2], 2, "--iterations", 20, "--output", tmp_path / "run",
                    "--no-report", *extra)
    assert result.returncode == 0, result.stderr
    preset = json.loads((tmp_path / "run" / "run.json").read_text())["parameters"]["preset"]
    assert preset["body_mask"] is masked
    said = [line for line in result.stderr.splitlines() if line.startswith("voxels drawn within 9 mm of the body: ")]
    assert len(said) == (1 if masked and preset["def_points"] > 0 else 0), result.stderr
