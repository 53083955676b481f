"""The stnerp worker as a real subprocess: a whole run with JSON events, prediction from the saved
model, interruption, and bad input answered by one line, exit code 2 and no complete run.

Accuracy is asserted against what the run's mistakes would score (baselines.py: no registration,
sign flipped, LPS/RAS mixed, one time step off, each from the phantom's exact motion), not against
fixed figures: the tables are printed (pytest -s) and listed in the docstrings of the tests."""
import csv
import json
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from baselines import MISTAKES, baseline_scores, dice, normalised, psnr_db, scores, table
from STNeRPLib.geometry import Grid
from STNeRPLib.phantom import breathing_series, write_series
from worker_cli import WORKER, stnerp

QUICK = ["--iterations", "15", "--prior", "image"]
# 150 iterations: enough for the 9 mm phantom to beat every mistake by a margin (15 were not:
# LPS/RAS mixed then scored a lower TRE than the run at phases 1 and 3).
ACCURATE = ["--iterations", "150", "--prior", "image"]
# The whole run below checks conventions (sign, LPS/RAS, time) against every mistake with the unanchored
# fit: on this 4-phase 9 mm phantom the default's reference anchor fits worse (phase 3 at 150 iterations:
# TRE 1.19 against 0.98 mm; PSNR 28.57 dB, where the lowest slice maps > 5 mm below the reference
# volume, against 31.83), unlike the benchmark's 10-phase series (docs/presets.md).
UNANCHORED = ["--no-anchor-reference"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A small 4-phase phantom on disk (whole thorax at coarse spacing)."""
    folder = tmp_path_factory.mktemp("phantom")
    series = breathing_series(size=(32, 32, 24), spacing=(9.0, 9.0, 10.0), n_phases=4, noise_hu=0)
    return series, write_series(series, folder)


def train_args(files, times, output):
    args = ["train", "--reference", files["images"][0], "--reference-time", times[0], "--output", output]
    for path, t in zip(files["images"][1:], times[1:]):
        args += ["--follow-up", path, t]
    return args


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def record(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


@pytest.fixture(scope="module")
def trained(phantom, tmp_path_factory):
    series, files = phantom
    output = tmp_path_factory.mktemp("runs") / "train"
    args = train_args(files, series.times, output) + [
        "--segmentation", files["labelmaps"][0], "--landmarks", files["landmarks"],
        "--ground-truth", files["labelmaps"][2], series.times[2], "--predict-times", 1.5,
        "--json-events", "--no-report", *ACCURATE, *UNANCHORED]             # test_report's own run has one
    return stnerp(*args), output


def read_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_training_run_writes_every_output(trained, phantom):
    result, output = trained
    assert result.returncode == 0, result.stderr
    parsed = events(result.stdout)                       # every stdout line is a JSON event
    assert {e["event"] for e in parsed} == {"progress", "done"}
    assert {e["stage"] for e in parsed if e["event"] == "progress"} == {"defnet", "outputs"}
    assert parsed[-1] == {"event": "done", "status": "complete", "output": str(output)}
    run = record(output)
    assert run["status"] == "complete" and run["error"] is None
    assert [p["time"] for p in run["time_points"]] == [0.0, 1.0, 2.0, 3.0, 1.5]
    series, _ = phantom
    for point in run["time_points"]:
        field = sitk.ReadImage(str(output / point["displacement"]))
        assert field.GetNumberOfComponentsPerPixel() == 3
        assert field.GetSize() == series.images[0].GetSize()
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(output / point["labelmap"])))
        assert set(np.unique(labels)) == {0, 1, 2, 3}                # every label kept
        assert point["metrics"]["folded_voxels"] == 0
    assert run["time_points"][4]["scanned"] is False and run["time_points"][4]["metrics"]["psnr"] is None
    assert run["versions"]["torch"] and run["parameters"]["preset"]["def_iterations"] == 150
    assert run["parameters"]["preset"]["anchor_reference"] is False          # --no-anchor-reference reached it


MARGIN_TRE, MARGIN_PSNR_DB = 0.7, 1.5


@pytest.mark.parametrize("k", [1, 2, 3])
def test_registration_beats_every_mistake(trained, phantom, k):
    """The run's field at a scanned phase scores a TRE below 0.7 x, and a PSNR (reference resampled
    through it) 1.5 dB above, the best of no registration, sign flipped, LPS/RAS mixed and one
    phase off. Measured (150 iterations; TRE mm / PSNR dB): run 0.94 / 31.95, 1.24 / 30.17,
    0.98 / 31.71 at phases 1, 2, 3; best mistake 2.04 / 28.14 (mixed / none), 2.79 / 27.16
    (off by one), 2.04 / 28.14. Dice is not asserted here: on the 9 mm grid the tumour is ~3
    voxels and the exact field scores 0.737 at phase 2 against 0.842 for no registration."""
    series, _ = phantom
    _, output = trained
    method = scores(series, k, sitk.ReadImage(str(output / f"t_{k}/displacement.nrrd")))
    mistakes = baseline_scores(series, k)
    print(table(f"phase {k}", method, mistakes))
    for name in MISTAKES:
        assert method["tre"] < MARGIN_TRE * mistakes[name]["tre"], (name, method, mistakes[name])
        assert method["psnr"] > mistakes[name]["psnr"] + MARGIN_PSNR_DB, (name, method, mistakes[name])


def test_unscanned_time_beats_every_mistake(trained, phantom):
    """At 1.5, never scanned: the field's TRE on the phantom's landmarks at 1.5 is below 0.7 x every
    mistake's (exact motion at 1.5 with each mistake; one step off: u(0.5), as u(2.5) = u(1.5)).
    Measured: 1.19 mm against 4.29 (none), 8.58 (flipped), 3.38 (mixed), 3.56 (one off).
    The predicted image (the motion-compensated blend of phases 1 and 2) against the phantom's
    image at 1.5: 38.55 dB, far above the unwarped reference (24.63) but BELOW linear
    interpolation of phases 1 and 2 (39.74) on this 9 mm grid after 150 iterations; asserted: above
    the reference by 1.5 dB and within 1.5 dB of linear interpolation."""
    from STNeRPLib.warping import linear_interpolation
    series, _ = phantom
    _, output = trained
    method = scores(series, 1.5, sitk.ReadImage(str(output / "t_1.5/displacement.nrrd")))
    mistakes = baseline_scores(series, 1.5)
    print(table("time 1.5", method, mistakes))
    for name in MISTAKES:
        assert method["tre"] < MARGIN_TRE * mistakes[name]["tre"], (name, method, mistakes[name])
    truth = normalised(sitk.GetArrayFromImage(series.image_at(1.5)))
    predicted = psnr_db(normalised(read_array(output / "t_1.5/image.nrrd")), truth)
    scans = {t: sitk.GetArrayFromImage(series.images[int(t)]) for t in (1.0, 2.0)}
    linear = psnr_db(normalised(linear_interpolation(scans, 1.5)), truth)
    unwarped = psnr_db(normalised(sitk.GetArrayFromImage(series.images[0])), truth)
    print(f"time 1.5 image PSNR: predicted {predicted:.2f} dB, linear interpolation {linear:.2f}, "
          f"reference {unwarped:.2f}")
    assert predicted > unwarped + MARGIN_PSNR_DB and predicted > linear - 1.5, (predicted, linear, unwarped)


def test_reported_metrics_match_independent_computation(trained, phantom):
    """run.json's PSNR (its image.nrrd against the scan), Dice (its labelmap.nrrd against the
    ground truth) and TRE (landmarks through its displacement.nrrd) equal the same figures
    computed here from the files, and metrics.csv holds run.json's values."""
    series, _ = phantom
    _, output = trained
    run = record(output)
    points = {p["time"]: p for p in run["time_points"]}
    for k in (1, 2, 3):
        entry = points[float(k)]
        image = normalised(read_array(output / entry["image"]))
        assert (entry["metrics"]["psnr"]
                == pytest.approx(psnr_db(image, normalised(sitk.GetArrayFromImage(series.images[k]))), abs=1e-3))
        method = scores(series, k, sitk.ReadImage(str(output / entry["displacement"])))
        assert entry["metrics"]["tre_mean"] == pytest.approx(method["tre"], abs=1e-4)
    labels = read_array(output / points[2.0]["labelmap"])
    truth = sitk.GetArrayFromImage(series.labelmaps[2])
    assert points[2.0]["metrics"]["dice"] == {str(k): pytest.approx(dice(labels, truth, k), abs=1e-9)
                                              for k in (1, 2, 3)}
    with (output / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["time"]) for r in rows] == [p["time"] for p in run["time_points"]]
    for row, entry in zip(rows, run["time_points"]):
        m = entry["metrics"]
        assert row["scanned"] == str(entry["scanned"])
        for key, column in (("folded_voxels", "folded_voxels"), ("jacobian_min", "jacobian_min"),
                            ("jacobian_max", "jacobian_max"), ("psnr", "psnr_db"), ("ssim", "ssim"),
                            ("tre_mean", "tre_mean_mm"), ("tre_max", "tre_max_mm")):
            assert (row[column] == "") if m[key] is None else float(row[column]) == pytest.approx(m[key]), column
        for label in ("1", "2", "3"):
            expected = m["dice"].get(label)
            assert ((row[f"dice_{label}"] == "") if expected is None
                    else float(row[f"dice_{label}"]) == pytest.approx(expected))


def test_jacobian_output_is_the_determinant_of_the_written_field(trained):
    """jacobian.nrrd equals ITK's DisplacementFieldJacobianDeterminant of displacement.nrrd (an
    independent finite-difference implementation) inside the grid; at its one-voxel border the
    engine takes one-sided differences, ITK another scheme."""
    _, output = trained
    for point in record(output)["time_points"]:
        field = sitk.ReadImage(str(output / point["displacement"]))
        written = sitk.ReadImage(str(output / point["jacobian"]))
        assert Grid.of(written).matches(Grid.of(field))
        independent = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
        inner = (slice(1, -1),) * 3
        assert np.allclose(sitk.GetArrayFromImage(written)[inner], independent[inner], atol=1e-5), point["time"]


def test_image_output_at_a_scanned_time_is_the_reference_through_the_field(trained, phantom):
    """At a scanned time image.nrrd is the reference resampled through displacement.nrrd (cubic
    B-spline, the engine's documented renderer), computed here with SimpleITK."""
    series, _ = phantom
    _, output = trained
    for k in (1, 2, 3):
        field = sitk.ReadImage(str(output / f"t_{k}/displacement.nrrd"))
        transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
        expected = sitk.Resample(series.images[0], field, transform, sitk.sitkBSpline, 0.0, sitk.sitkFloat32, True)
        written = sitk.ReadImage(str(output / f"t_{k}/image.nrrd"))
        assert np.allclose(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(expected), atol=0.05), k


def test_inhale_compresses_the_lungs_in_the_jacobian_map(trained, phantom):
    """det J of the map time-t point -> reference point: at inhale (phase 2) the time-t lungs are
    larger than the reference's, so a time-t voxel maps to a smaller reference volume: mean det J
    in the lungs < 1 in the exact field (0.910) and in the run's jacobian.nrrd (0.916 measured)."""
    series, _ = phantom
    _, output = trained
    lungs = np.isin(sitk.GetArrayFromImage(series.labelmaps[2]), (2, 3))
    exact = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(series.displacements[2]))[lungs].mean()
    written = read_array(output / "t_2/jacobian.nrrd")[lungs].mean()
    assert exact < 0.95 and written < 0.95, (exact, written)
    assert abs(written - exact) < 0.5 * (1 - exact), (written, exact)


# |u| at the reference time, measured on this run: max 9.72 mm, mean 1.52 mm (mm, LPS). Bounds are
# the measured values x 1.5. An exact identity there (velocity anchored at the reference time) was
# tried and not kept: it made the last phase of this run 3-5x worse in image error (issue 11 note).
REFERENCE_U_MAX_MM, REFERENCE_U_MEAN_MM = 9.72 * 1.5, 1.52 * 1.5


def test_displacement_at_the_reference_time_is_bounded(trained):
    _, output = trained
    length = np.linalg.norm(read_array(output / "t_0/displacement.nrrd"), axis=-1)
    print(f"|u| at the reference time: max {length.max():.2f} mm, mean {length.mean():.2f} mm")
    assert length.max() < REFERENCE_U_MAX_MM and length.mean() < REFERENCE_U_MEAN_MM


def test_predict_from_saved_model(trained, tmp_path):
    _, output = trained
    result = stnerp("predict", "--run", output, "--times", 2.25, -0.5, "--output", tmp_path / "p", "--json-events")
    assert result.returncode == 0, result.stderr
    run = record(tmp_path / "p")
    assert run["status"] == "complete" and [p["time"] for p in run["time_points"]] == [2.25, -0.5]
    # continuity in time: u(2.25) lies near the segment from u(2) to u(3), much nearer than u(2)
    # and u(3) lie to each other; u(-0.5) is nearer u(0) than u(1) is
    u = {t: read_array(output / f"t_{t}/displacement.nrrd") for t in (0, 1, 2, 3)}
    between = read_array(tmp_path / "p/t_2.25/displacement.nrrd")
    step = u[3] - u[2]
    along = np.clip(np.sum((between - u[2]) * step, -1) / np.maximum(np.sum(step * step, -1), 1e-12), 0, 1)
    off_segment = np.linalg.norm(between - u[2] - along[..., None] * step, axis=-1).mean()
    assert off_segment < 0.25 * np.linalg.norm(step, axis=-1).mean(), off_segment
    before = read_array(tmp_path / "p/t_-0.5/displacement.nrrd")
    assert np.linalg.norm(before - u[0], axis=-1).mean() < np.linalg.norm(u[1] - u[0], axis=-1).mean()
    # the model reproduces the trained run's own output at a trained time
    again = stnerp("predict", "--run", output, "--times", 1.5, "--output", tmp_path / "q")
    assert again.returncode == 0, again.stderr
    before = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "t_1.5/displacement.nrrd")))
    after = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "q/t_1.5/displacement.nrrd")))
    assert np.allclose(before, after, atol=1e-5)


def _ignore_sigint() -> None:
    """As a shell starts a background job (`stnerp train ... &`): SIGINT ignored on entry, so the
    worker handles it only if it installs its own handler."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _interrupt_at(stage: str, signum: int, args: list, output: Path) -> None:
    """Start the worker, send `signum` at its first progress event of `stage`, and check the run
    ends interrupted: rc 130, a last JSON error event, run.json 'interrupted', no traceback."""
    process = subprocess.Popen([*WORKER, *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=_ignore_sigint)
    for line in process.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and event["stage"] == stage:
            break
    process.send_signal(signum)
    try:
        stdout, stderr = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"the worker ignored {signal.Signals(signum).name} during {stage}")
    assert process.returncode == 130, stderr
    assert events(stdout)[-1]["event"] == "error"
    assert record(output)["status"] == "interrupted"
    assert "Traceback" not in stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_defnet_marks_the_run_interrupted(signum, phantom, tmp_path):
    series, files = phantom
    output = tmp_path / "stopped"
    args = train_args(files, series.times, output) + ["--iterations", "100000", "--json-events"]
    _interrupt_at("defnet", signum, args, output)


def test_cancel_while_writing_outputs_marks_the_run_interrupted(phantom, tmp_path):
    """SIGTERM after the first time point is written (40 more to write): no complete run."""
    series, files = phantom
    output = tmp_path / "stopped"
    args = train_args(files, series.times, output) + ["--iterations", "5", "--json-events", "--prior", "image",
                                                      "--predict-times", *np.linspace(0.05, 2.95, 40).round(3)]
    _interrupt_at("outputs", signal.SIGTERM, args, output)


def bad_run(tmp_path, *args) -> tuple[subprocess.CompletedProcess, Path]:
    output = tmp_path / "bad"
    result = stnerp(*args, "--output", output, "--json-events")
    return result, output


def assert_rejected(result, output, *words):
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for word in words:
        assert word in error_lines[0]
    assert events(result.stdout)[-1]["event"] == "error"
    if (output / "run.json").exists():
        assert record(output)["status"] == "failed"


def image_file(tmp_path, name, array, like=None):
    image = sitk.GetImageFromArray(array)
    if like is not None:
        image.CopyInformation(like)
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("case", ["missing", "corrupt", "2d", "4d", "nan", "single", "duplicate",
                                  "empty labelmap", "labelmap grid", "labelmap layers", "time not a number",
                                  "label above 65535", "predict a scanned time"])
def test_bad_input(case, phantom, tmp_path):
    series, files = phantom
    reference, follow_up = files["images"][0], files["images"][1]
    arguments = {
        "missing": ["--follow-up", tmp_path / "absent.nrrd", 1],
        "corrupt": ["--follow-up", _corrupt(tmp_path), 1],
        "2d": ["--follow-up", image_file(tmp_path, "2d.nrrd", np.zeros((8, 8), np.float32)), 1],
        "4d": ["--follow-up", _four_d(tmp_path), 1],
        "nan": ["--follow-up", _with_nan(tmp_path, series.images[1]), 1],
        "single": [],
        "duplicate": ["--follow-up", follow_up, 1, "--follow-up", files["images"][2], 1],
        "empty labelmap": ["--follow-up", follow_up, 1, "--segmentation",
                           image_file(tmp_path, "empty.nrrd", np.zeros(series.images[0].GetSize()[::-1], np.uint8),
                                      series.images[0])],
        "labelmap grid": ["--follow-up", follow_up, 1, "--segmentation",
                          image_file(tmp_path, "other.nrrd", np.ones((8, 8, 8), np.uint8))],
        "labelmap layers": ["--follow-up", follow_up, 1, "--segmentation", _layers(tmp_path, series.labelmaps[0])],
        "time not a number": ["--follow-up", follow_up, "one"],
        "label above 65535": ["--follow-up", follow_up, 1, "--segmentation",
                              _large_label(tmp_path, series.labelmaps[0])],
        "predict a scanned time": ["--follow-up", follow_up, 1, "--predict-times", 1.0, "--iterations", 5],
    }[case]
    words = {"missing": ["not found"], "corrupt": ["cannot read"], "2d": ["2-D"], "4d": ["4-D"],
             "nan": ["NaN"], "single": ["only one time point"], "duplicate": ["time 1"],
             "empty labelmap": ["empty"], "labelmap grid": ["another grid"],
             "labelmap layers": ["several layers", "one label per voxel"],
             "time not a number": ["not a number"], "label above 65535": ["70000", "65535"],
             "predict a scanned time": ["time 1", "scanned time"]}[case]
    result, output = bad_run(tmp_path, "train", "--reference", reference, *arguments)
    assert_rejected(result, output, *words)


def refused_run(files, times, output, tmp_path):
    """A train run into `output` with a mistyped follow-up path: refused on its inputs."""
    wrong = train_args(files, times, output)
    wrong[wrong.index("--follow-up") + 1] = tmp_path / "typo.nrrd"
    return stnerp(*wrong, *QUICK)


def test_a_folder_left_by_a_run_refused_on_its_inputs_takes_the_corrected_run(phantom, tmp_path):
    """A run refused on its inputs leaves its record (failed, the error) and nothing else; the user fixes the input
    and runs the same command again into the same folder, which works instead of asking for a new folder."""
    series, files = phantom
    output = tmp_path / "run"
    refused = refused_run(files, series.times, output, tmp_path)
    assert refused.returncode == 2 and "not found" in refused.stderr
    assert sorted(p.name for p in output.iterdir()) == ["run.json"] and record(output)["status"] == "failed"
    corrected = stnerp(*train_args(files, series.times, output), *QUICK, "--no-report")
    assert corrected.returncode == 0, corrected.stderr
    assert record(output)["status"] == "complete" and (output / "model.pt").exists()


def test_using_a_run_that_failed_gives_the_error_it_failed_with(phantom, tmp_path):
    """predict and evaluate on a run refused on its inputs say why it failed, not to --resume it (the same
    arguments would fail the same way)."""
    series, files = phantom
    output = tmp_path / "run"
    assert refused_run(files, series.times, output, tmp_path).returncode == 2
    predicted = stnerp("predict", "--run", output, "--times", 0.5, "--output", tmp_path / "p", "--json-events")
    assert_rejected(predicted, tmp_path / "p", "failed: follow-up image at time", "typo.nrrd")
    assert "--resume" not in predicted.stderr


def test_existing_run_is_not_overwritten(trained, phantom, tmp_path):
    series, files = phantom
    _, output = trained
    before = (output / "run.json").read_text()
    result = stnerp(*train_args(files, series.times, output), *QUICK)
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert (output / "run.json").read_text() == before


def _large_label(tmp_path, labelmap):
    """The reference labelmap as UInt32 with the tumour numbered 70000 (UInt16 would wrap it to 4464)."""
    array = sitk.GetArrayFromImage(labelmap).astype(np.uint32)
    array[array == 1] = 70000
    return image_file(tmp_path, "large.nrrd", array, labelmap)


def _layers(tmp_path, labelmap):
    """The labelmap as a segmentation of two overlapping layers, the tumour in the second (as 3D Slicer saves a
    .seg.nrrd whose segments overlap: one component per layer)."""
    tumour = sitk.Cast(labelmap == 1, sitk.sitkUInt8)
    path = tmp_path / "layers.seg.nrrd"
    sitk.WriteImage(sitk.Compose(sitk.Cast(labelmap, sitk.sitkUInt8), tumour), str(path))
    return path


def _corrupt(tmp_path):
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(b"\x1f\x8b\x08 not really gzip")
    return path


def _four_d(tmp_path):
    path = tmp_path / "4d.nii.gz"
    sitk.WriteImage(sitk.Image([8, 8, 8, 2], sitk.sitkFloat32), str(path))
    return path


def _with_nan(tmp_path, image):
    array = sitk.GetArrayFromImage(image)
    array[3, 4, 5] = np.nan
    return image_file(tmp_path, "nan.nrrd", array, image)


@pytest.mark.parametrize("variant", [["--scheme", "short"], ["--pairwise"], ["--prior", "refnet"]])
def test_paper_variants_run_end_to_end(variant, phantom, tmp_path):
    series, files = phantom
    output = tmp_path / "variant"
    args = train_args(files, series.times, output) + ["--segmentation", files["labelmaps"][0],
                                                      "--landmarks", files["landmarks"],
                                                      "--iterations", "15", *variant]
    result = stnerp(*args)
    assert result.returncode == 0, result.stderr
    run = record(output)
    assert run["status"] == "complete" and (output / run["report"]).is_file()     # the variant's report too
    points = run["time_points"]
    if variant[0] == "--scheme":          # previous -> next: one field per follow-up, chained
        assert [p["time"] for p in points] == [1.0, 2.0, 3.0]
        assert [p["reference_time"] for p in points] == [0.0, 1.0, 2.0]
    else:
        assert [p["time"] for p in points] == [0.0, 1.0, 2.0, 3.0]
    assert all(p["metrics"]["tre_mean"] is not None for p in points if p["time"] > 0)


def test_pairwise_model_refuses_new_times(phantom, tmp_path):
    series, files = phantom
    result = stnerp(*train_args(files, series.times, tmp_path / "pw"), "--pairwise", "--predict-times", 1.5, *QUICK)
    assert result.returncode == 2 and "cannot predict new times" in result.stderr


def test_short_scheme_chains_fields_newest_first(phantom, tmp_path):
    """--scheme short: a landmark of time 3 reaches the reference through f3 (3 -> 2), then f2, then
    f1. run.json's TRE at time 3 is that chain's, computed here from the written fields, and it is
    lower than the chain applied in reverse order (f1, f2, f3). Measured (150 iterations): 1.88 mm
    newest first, 1.92 mm reversed, 2.79 mm unregistered: the fields nearly commute, so the order
    is pinned by run.json's TRE equalling the newest-first chain to 1e-4 mm, 400 x below the gap.
    One velocity level: on this 9 mm phantom the 16 mm level is under 2 voxels apart, the adaptive rule
    keeps it (it lowers the image loss) and at 150 iterations it fits worse (time 3: 2.21 mm against
    1.94 newest first; unregistered 2.79). Voxels drawn over the whole grid: with the body mask the chain's
    TRE at time 3 is 2.03 / 1.67 / 1.62 mm at seeds 0 / 1 / 2 against 1.88 / 1.73 / 1.75 over the whole grid,
    and at seed 0 above this test's 0.7 x unregistered (1.95): the 150-iteration pairs' spread, not the order."""
    series, files = phantom
    output = tmp_path / "short"
    result = stnerp(*train_args(files, series.times, output), "--landmarks", files["landmarks"],
                    "--scheme", "short", "--velocity-levels", 1, "--no-body-mask", "--no-report", *ACCURATE)
    assert result.returncode == 0, result.stderr
    fields = [sitk.ReadImage(str(output / f"t_{k}/displacement.nrrd")) for k in (1, 2, 3)]
    points, reference_points = series.landmarks[3]

    def chained_tre(order) -> float:
        mapped = points
        for field in order:
            transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
            mapped = np.array([transform.TransformPoint(tuple(map(float, p))) for p in mapped])
        return float(np.linalg.norm(mapped - reference_points, axis=1).mean())

    newest_first, reversed_order = chained_tre(fields[::-1]), chained_tre(fields)
    unregistered = float(np.linalg.norm(points - reference_points, axis=1).mean())
    print(f"short scheme TRE at time 3: newest first {newest_first:.2f} mm, reversed {reversed_order:.2f} mm, "
          f"unregistered {unregistered:.2f} mm")
    assert record(output)["time_points"][2]["metrics"]["tre_mean"] == pytest.approx(newest_first, abs=1e-4)
    assert newest_first < reversed_order and newest_first < 0.7 * unregistered
    assert abs(reversed_order - newest_first) > 0.01


def test_reference_need_not_be_the_earliest_time(phantom, tmp_path):
    """Reference at time 2, follow-ups at 0, 1 and 3: the run completes with the reference's entry
    first, predicts 0.5 and 2.5 from the scans around them, and registers time 0 to the reference:
    TRE of the phantom's landmarks (phase-0 points, matching phase-2 points) below 0.7 x what no
    registration, the sign flipped and LPS/RAS mixed score with the exact landmark motion.
    Measured: 1.25 mm against 5.57 (none), 11.13 (flipped), 3.93 (mixed)."""
    series, files = phantom
    output = tmp_path / "middle"
    time_2, reference_2 = series.landmarks[2]              # phase-2 points, their phase-0 points
    landmarks = tmp_path / "landmarks.csv"
    with landmarks.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["time", "x", "y", "z", "ref_x", "ref_y", "ref_z"])
        writer.writerows([0.0, *a, *b] for a, b in zip(reference_2, time_2))
    args = ["train", "--reference", files["images"][2], "--reference-time", 2, "--output", output,
            "--landmarks", landmarks, "--predict-times", 0.5, 2.5, "--segmentation", files["labelmaps"][2]]
    for k in (0, 1, 3):
        args += ["--follow-up", files["images"][k], k]
    result = stnerp(*args, *ACCURATE)
    assert result.returncode == 0, result.stderr
    points = record(output)["time_points"]
    assert [p["time"] for p in points] == [2.0, 0.0, 1.0, 3.0, 0.5, 2.5]
    assert (output / record(output)["report"]).is_file()                # drawn about a reference in the middle
    assert [p["image_sources"] for p in points[4:]] == [[0.0, 1.0], [2.0, 3.0]]
    motion = time_2 - reference_2                           # exact u at the landmarks
    # error of q + m(u) for each mistake m: none u, flipped 2u, mixed (x and y negated) (2ux, 2uy, 0)
    mistakes = {"none": motion, "flipped": 2 * motion, "mixed": motion * np.array([2.0, 2.0, 0.0])}
    floors = {name: float(np.linalg.norm(error, axis=1).mean()) for name, error in mistakes.items()}
    tre = points[1]["metrics"]["tre_mean"]
    print(f"reference at time 2, TRE at time 0: {tre:.2f} mm; mistakes {floors}")
    assert all(tre < 0.7 * floor for floor in floors.values()), (tre, floors)


def test_times_written_as_dates_get_their_own_folders(phantom, tmp_path):
    """20260101, 20260108 and 20260115 would all be written 't_2.02601e+07' by '{t:g}': each time
    point must get its own folder and files."""
    series, files = phantom
    output = tmp_path / "dates"
    times = [20260101.0, 20260108.0, 20260115.0]
    args = ["train", "--reference", files["images"][0], "--reference-time", times[0], "--output", output]
    for path, t in zip(files["images"][1:], times[1:]):
        args += ["--follow-up", path, t]
    result = stnerp(*args, *QUICK)
    assert result.returncode == 0, result.stderr
    points = record(output)["time_points"]
    assert [p["time"] for p in points] == times
    folders = [Path(p["displacement"]).parent.name for p in points]
    assert folders == ["t_20260101", "t_20260108", "t_20260115"]
    assert all((output / p["displacement"]).is_file() for p in points)
    assert (output / record(output)["report"]).is_file()                # its time axis in days of a date


def test_evaluate_command_scores_a_run_against_ground_truth(trained, phantom, tmp_path):
    """stnerp evaluate with the phase-1 image, the phase-2 labelmap and the landmarks: its
    evaluation.json holds the PSNR, Dice and TRE computed here from the run's files."""
    series, files = phantom
    _, output = trained
    run = tmp_path / "run"
    shutil.copytree(output, run)                            # evaluate writes into the run folder
    result = stnerp("evaluate", "--run", run, "--image", files["images"][1], 1, "--ground-truth",
                    files["labelmaps"][2], 2, "--landmarks", files["landmarks"])
    assert result.returncode == 0, result.stderr
    rows = {r["time"]: r for r in json.loads((run / "evaluation.json").read_text())["rows"]}
    image = normalised(read_array(run / "t_1/image.nrrd"))
    assert rows[1.0]["psnr"] == pytest.approx(psnr_db(image, normalised(sitk.GetArrayFromImage(series.images[1]))),
                                              abs=1e-3)
    labels, truth = read_array(run / "t_2/labelmap.nrrd"), sitk.GetArrayFromImage(series.labelmaps[2])
    assert rows[2.0]["dice"] == {str(k): pytest.approx(dice(labels, truth, k)) for k in (1, 2, 3)}
    for k in (1, 2, 3):
        method = scores(series, k, sitk.ReadImage(str(run / f"t_{k}/displacement.nrrd")))
        points, reference_points = series.landmarks[k]
        assert rows[float(k)]["tre_mean"] == pytest.approx(method["tre"], abs=1e-4)
        assert rows[float(k)]["tre_none"] == pytest.approx(np.linalg.norm(points - reference_points, axis=1).mean())
    assert "| time |" in result.stderr          # the table goes to the log (stderr)


def test_evaluate_refuses_an_image_in_another_unit_than_the_run(trained, phantom, tmp_path):
    """The phase-1 scan stored without its rescale (air at 0, water at 1024) against a run in HU: one window cannot
    normalise both, and its PSNR came out near 5 dB; refused in one line, and no evaluation is written."""
    series, _ = phantom
    _, output = trained
    run = tmp_path / "run"
    shutil.copytree(output, run)
    stored = np.clip(np.rint(sitk.GetArrayFromImage(series.images[1]) + 1024), 0, 4095).astype(np.uint16)
    result = stnerp("evaluate", "--run", run, "--image", image_file(tmp_path, "stored.nrrd", stored, series.images[1]),
                    1, "--json-events")
    assert_rejected(result, tmp_path / "no output", "stored.nrrd", "not in Hounsfield units")
    assert not list(run.glob("evaluation*.json")) and json.loads((run / "run.json").read_text())["status"] == "complete"


def test_readme_demo_command_at_small_size(tmp_path):
    """`stnerp demo --size 32 32 24 --iterations 10` (the README's first command, small) exits 0
    and prints its figures; its held-out PSNR is evaluation.json's, and its linear-interpolation
    PSNR is the scans blended in HU and windowed after (computed here)."""
    from STNeRPLib.demo import demo_series
    output = tmp_path / "demo"
    result = stnerp("demo", "--size", 32, 32, 24, "--iterations", 10, "--output", output)
    assert result.returncode == 0, result.stderr
    printed = result.stderr                                  # messages go to the log (stderr)
    assert "trained time points: TRE" in printed and "held-out time 3" in printed
    rows = {r["time"]: r for r in json.loads((output / "run/evaluation.json").read_text())["rows"]}
    assert f"PSNR {rows[3.0]['psnr']:.2f} dB" in printed
    summary = json.loads((output / "summary.json").read_text())
    assert summary["held_out"]["psnr"] == rows[3.0]["psnr"] and summary["held_out_time"] == 3.0
    series, held_out = demo_series(False, (32, 32, 24))
    scan = lambda k: sitk.GetArrayFromImage(series.images[k]).astype(np.float64)  # noqa: E731
    linear = psnr_db(normalised(0.5 * scan(2) + 0.5 * scan(4)), normalised(scan(3)))
    assert f"linear interpolation of its neighbours: PSNR {linear:.2f} dB" in printed
    parameters = json.loads((output / "run/run.json").read_text())["parameters"]
    assert (parameters["seed"], parameters["prior"], parameters["preset"]["def_iterations"]) == (0, "image", 10)
    assert "seed 0" in (output / "run/report/index.html").read_text()
