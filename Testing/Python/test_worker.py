"""The stnerp worker as a real subprocess: a whole run with JSON events, prediction from the saved
model, interruption, and bad input answered by one line, exit code 2 and no complete run."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from STNeRPLib.phantom import breathing_series, write_series

QUICK = ["--iterations", "15", "--prior", "image"]


def stnerp(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "STNeRPLib", *map(str, args)], capture_output=True,
                          text=True, timeout=300, **kwargs)


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
        "--json-events", *QUICK]
    return stnerp(*args), output


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
    scanned = run["time_points"][1]["metrics"]
    assert scanned["psnr"] > 20 and scanned["tre_mean"] is not None
    assert run["time_points"][2]["metrics"]["dice"]["1"] > 0.5
    assert run["time_points"][4]["scanned"] is False and run["time_points"][4]["metrics"]["psnr"] is None
    header = (output / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("time,scanned,folded_voxels") and "dice_1" in header
    assert run["versions"]["torch"] and run["parameters"]["preset"]["def_iterations"] == 15


def test_predict_from_saved_model(trained, tmp_path):
    _, output = trained
    result = stnerp("predict", "--run", output, "--times", 2.25, -0.5, "--output", tmp_path / "p", "--json-events")
    assert result.returncode == 0, result.stderr
    run = record(tmp_path / "p")
    assert run["status"] == "complete" and [p["time"] for p in run["time_points"]] == [2.25, -0.5]
    # the model reproduces the trained run's own output at a trained time
    again = stnerp("predict", "--run", output, "--times", 1.5, "--output", tmp_path / "q")
    assert again.returncode == 0, again.stderr
    before = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "t_1.5/displacement.nrrd")))
    after = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "q/t_1.5/displacement.nrrd")))
    assert np.allclose(before, after, atol=1e-5)


def test_sigterm_marks_the_run_interrupted(phantom, tmp_path):
    series, files = phantom
    output = tmp_path / "stopped"
    args = train_args(files, series.times, output) + ["--iterations", "100000", "--json-events"]
    process = subprocess.Popen([sys.executable, "-m", "STNeRPLib", *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:                          # wait until training runs
        if json.loads(line)["event"] == "progress":
            break
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert events(stdout)[-1]["event"] == "error"
    assert record(output)["status"] == "interrupted"
    assert "Traceback" not in stderr


def bad_run(tmp_path, *args) -> tuple[subprocess.CompletedProcess, Path]:
    output = tmp_path / "bad"
    result = stnerp(*args, "--output", output, "--json-events")
    return result, output


def assert_rejected(result, output, *words):
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
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
                                  "empty labelmap", "labelmap grid", "time not a number"])
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
                           image_file(tmp_path, "empty.nrrd", np.zeros(series.images[0].GetSize()[::-1], np.uint8), series.images[0])],
        "labelmap grid": ["--follow-up", follow_up, 1, "--segmentation",
                          image_file(tmp_path, "other.nrrd", np.ones((8, 8, 8), np.uint8))],
        "time not a number": ["--follow-up", follow_up, "one"],
    }[case]
    words = {"missing": ["not found"], "corrupt": ["cannot read"], "2d": ["2-D"], "4d": ["4-D"],
             "nan": ["NaN"], "single": ["only one time point"], "duplicate": ["time 1"],
             "empty labelmap": ["empty"], "labelmap grid": ["another grid"],
             "time not a number": ["not a number"]}[case]
    result, output = bad_run(tmp_path, "train", "--reference", reference, *arguments)
    assert_rejected(result, output, *words)


def test_existing_run_is_not_overwritten(trained, phantom, tmp_path):
    series, files = phantom
    _, output = trained
    before = (output / "run.json").read_text()
    result = stnerp(*train_args(files, series.times, output), *QUICK)
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert (output / "run.json").read_text() == before


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
    assert run["status"] == "complete"
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
