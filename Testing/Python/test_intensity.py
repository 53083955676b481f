"""Intensity normalisation chosen for the scans' unit (preprocessing.intensity_method, `--intensity auto`, the
default): the CT window for CT in Hounsfield units, the reference's percentiles for scans in any other unit (a CT
stored without its rescale, MR, CBCT in scanner units), and a one-line refusal for a series mixing the two. Through
the CT window, an abdomen CT stored without its rescale (air 0, water 1024) loses its soft-tissue contrast: every
organ is above 500 and maps to 1."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from STNeRPLib.errors import InputError
from STNeRPLib.phantom import breathing_series
from STNeRPLib.preprocessing import IntensityWindow, intensity_method
from worker_cli import stnerp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import data  # noqa: E402


def without_rescale(image: sitk.Image) -> sitk.Image:
    """The CT as stored before its DICOM rescale (slope 1, intercept -1024): unsigned, air at 0."""
    stored = sitk.GetImageFromArray(np.clip(np.rint(sitk.GetArrayFromImage(image) + 1024), 0, 4095).astype(np.uint16))
    stored.CopyInformation(image)
    return stored


@pytest.fixture(scope="module")
def scans():
    series = breathing_series(size=(32, 32, 24), spacing=(9.0, 9.0, 10.0), n_phases=2, noise_hu=0)
    return series.images[0], series.images[1]


def test_ct_in_hounsfield_units_takes_the_ct_window(scans):
    reference, follow_up = scans
    assert intensity_method("auto", reference, [(1.0, follow_up)]) == "ct"
    assert intensity_method("ct", reference, [(1.0, follow_up)]) == "ct"


def test_ct_stored_without_its_rescale_takes_the_reference_percentiles(scans):
    reference, follow_up = map(without_rescale, scans)
    assert intensity_method("auto", reference, [(1.0, follow_up)]) == "percentile"
    window = IntensityWindow.for_image(reference, "percentile")
    low, high = np.percentile(sitk.GetArrayFromImage(reference), [0.5, 99.5])
    assert (window.low, window.high) == pytest.approx((low, high))
    assert window.low < 100 and window.high > 1024 + 200      # air to beyond soft tissue, in the stored unit


@pytest.mark.parametrize("stored", ["follow-up", "reference"])
def test_a_series_mixing_hounsfield_units_and_another_unit_is_refused(scans, stored):
    reference, follow_up = scans
    if stored == "follow-up":
        follow_up = without_rescale(follow_up)
    else:
        reference = without_rescale(reference)
    for requested in ("auto", "ct", "percentile"):
        with pytest.raises(InputError, match="follow-up at time 1 is .*Hounsfield units"):
            intensity_method(requested, reference, [(1.0, follow_up)])


def test_the_ct_window_asked_of_scans_not_in_hounsfield_units_is_refused(scans):
    reference, follow_up = map(without_rescale, scans)
    with pytest.raises(InputError, match="--intensity ct needs CT in Hounsfield units"):
        intensity_method("ct", reference, [(1.0, follow_up)])
    assert intensity_method("percentile", reference, [(1.0, follow_up)]) == "percentile"


def landmark_csv(path: Path, time: float, points: np.ndarray, reference: np.ndarray) -> Path:
    rows = ["time,x,y,z,ref_x,ref_y,ref_z"] + [",".join([f"{time:g}", *(f"{v:.6f}" for v in (*p, *r))])
                                                for p, r in zip(points, reference)]
    path.write_text("\n".join(rows) + "\n")
    return path


def tre_mean(run: Path) -> float:
    metrics = (run / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    return float(metrics[-1].split(",")[header.index("tre_mean_mm")])


@pytest.fixture(scope="module")
def abdomen(tmp_path_factory):
    if not data.abdomen_available():
        pytest.skip(f"no abdomen CT in {data.ABDOMEN_CT}")
    return data.Series(data.abdomen_series(tmp_path_factory.mktemp("abdomen"), n_phases=2, heldout=1))


def test_abdomen_ct_stored_without_its_rescale_registers_as_well_as_in_hounsfield_units(abdomen, tmp_path):
    """The sliding abdomen's peak (phase 1) against its reference, 200 iterations: in HU the run recovers most of
    the motion; stored without the rescale, the CT window (the former default) left it at 2.7 times that error."""
    points, reference_points = abdomen.landmarks(1)
    landmarks = landmark_csv(tmp_path / "landmarks.csv", 1.0, points, reference_points)
    errors = {}
    for unit, convert in (("hu", lambda image: image), ("stored", without_rescale)):
        files = []
        for k in (0, 1):
            files.append(tmp_path / f"{unit}_{k}.nrrd")
            sitk.WriteImage(convert(sitk.Cast(sitk.Round(abdomen.image(k)), sitk.sitkInt16)), str(files[-1]))
        run = tmp_path / unit
        result = stnerp("train", "--reference", files[0], "--follow-up", files[1], 1, "--landmarks", landmarks,
                        "--output", run, "--iterations", 200, "--threads", 1, "--no-report")
        assert result.returncode == 0, result.stderr
        errors[unit] = tre_mean(run)
        assert ("not in Hounsfield units" in result.stderr) == (unit == "stored")
    unregistered = float(np.linalg.norm(points - reference_points, axis=1).mean())
    assert errors["hu"] < 0.5 * unregistered
    assert errors["stored"] <= 1.15 * errors["hu"], (errors, unregistered)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, bool, np.float16, np.float32, np.float64])
def test_the_window_maps_each_type_as_the_formula_does_to_the_bit(dtype):
    """normalise, its steps in place, gives clip((a - low) / (high - low), 0, 1) as float32 to the bit: integers in
    float32, floats in their own precision; values beyond the window, at its ends and not a number."""
    window = {np.uint8: IntensityWindow(3.0, 201.5), bool: IntensityWindow(-0.5, 1.5)}.get(
        dtype, IntensityWindow(-1000.0, 500.0))
    values = np.random.default_rng(4).normal(-250, 900, 4000)
    values[:4] = [window.low, window.high, -3000, 3000]
    if np.dtype(dtype).kind == "f":
        values[4] = np.nan
    array = values.astype(dtype) if dtype is not bool else values > 0
    source = array.astype(np.float32) if np.dtype(dtype).kind in "iub" else array
    expected = np.clip((source - window.low) / (window.high - window.low), 0.0, 1.0).astype(np.float32)
    before = array.copy()
    normalised = window.normalise(array)
    assert normalised.dtype == np.float32 and np.array_equal(normalised, expected, equal_nan=True)
    assert np.array_equal(array, before, equal_nan=True)                       # the input untouched
    assert 0.0 < normalised[~np.isnan(normalised)].mean() < 1.0
