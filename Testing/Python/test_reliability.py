"""Never lose a user's work, never pass off a wrong result (issue 12): safe output folders, numeric
validation, SIGINT, refused silent failures, one-line errors, provenance, and resume after an
interrupt or kill -9 — all through the real `stnerp` worker process on a 24x24x16 phantom."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from STNeRPLib.checkpoint import Checkpoint
from STNeRPLib.contract import write_json
from STNeRPLib.errors import InputError
from STNeRPLib.optimizer import Adam
from STNeRPLib.phantom import breathing_series, write_series
from STNeRPLib.schedule import DecaySchedule
from worker_cli import WORKER, stnerp

QUICK = ["--iterations", "15"]


def start(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*WORKER, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom")
    series = breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=4, noise_hu=0)
    return series, write_series(series, folder)


def train_args(files, output, times=(0.0, 1.0, 2.0, 3.0), order=None):
    args = ["train", "--reference", files["images"][0], "--reference-time", times[0], "--output", output]
    for k in order or range(1, len(times)):
        args += ["--follow-up", files["images"][k], times[k]]
    return args


def record(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def error_events(stdout: str) -> list[dict]:
    return [e for e in map(json.loads, stdout.splitlines()) if e["event"] == "error"]


def assert_one_line_error(result, *words) -> str:
    """rc 2, exactly one 'error:' line containing `words`, no traceback, an error event with --json-events."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(phantom, tmp_path_factory):
    """A complete run with segmentation and landmarks."""
    _, files = phantom
    output = tmp_path_factory.mktemp("runs") / "train"
    result = stnerp(*train_args(files, output), "--segmentation", files["labelmaps"][0],
                    "--landmarks", files["landmarks"], *QUICK)
    assert result.returncode == 0, result.stderr
    return output


# 1. Folders ------------------------------------------------------------------------------------

def test_train_refuses_non_empty_folder_and_leaves_it_alone(phantom, tmp_path):
    _, files = phantom
    output = tmp_path / "mine"
    (output / "t_1").mkdir(parents=True)
    (output / "t_1" / "displacement.nrrd").write_text("mine")
    (output / "metrics.csv").write_text("a,b\n")
    result = stnerp(*train_args(files, output), *QUICK, "--json-events")
    line = assert_one_line_error(result, "not empty", "metrics.csv", "t_1")
    assert error_events(result.stdout)[0]["message"] in line
    assert (output / "t_1" / "displacement.nrrd").read_text() == "mine"
    assert (output / "metrics.csv").read_text() == "a,b\n"
    assert sorted(p.name for p in output.iterdir()) == ["metrics.csv", "t_1"]


def test_predict_and_demo_refuse_non_empty_folder(trained, tmp_path):
    output = tmp_path / "mine"
    output.mkdir()
    (output / "notes.txt").write_text("keep")
    predicted = stnerp("predict", "--run", trained, "--times", 1.5, "--output", output)
    assert_one_line_error(predicted, "not empty", "notes.txt")
    demo = stnerp("demo", "--size", 24, 24, 16, "--iterations", 10, "--output", output)
    assert_one_line_error(demo, "not empty", "notes.txt")
    assert sorted(p.name for p in output.iterdir()) == ["notes.txt"]


def test_output_that_is_a_file_is_refused(phantom, tmp_path):
    _, files = phantom
    output = tmp_path / "file.txt"
    output.write_text("keep")
    result = stnerp(*train_args(files, output), *QUICK, "--json-events")
    assert_one_line_error(result, "is a file")
    assert error_events(result.stdout) and output.read_text() == "keep"


@pytest.mark.parametrize("where", ["read-only file system", "below a file"])
def test_unwritable_output_gives_one_line_and_an_error_event(where, phantom, tmp_path):
    _, files = phantom
    if where == "below a file":
        (tmp_path / "a_file").write_text("")
        output = tmp_path / "a_file" / "run"
    else:
        output = Path("/sys/stnerp_test_output")        # read-only even for root
    result = stnerp(*train_args(files, output), *QUICK, "--json-events")
    assert_one_line_error(result, "cannot write the output folder")
    assert len(error_events(result.stdout)) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_gives_one_line(phantom, tmp_path):
    _, files = phantom
    output = tmp_path / "ro"
    output.mkdir()
    output.chmod(0o555)
    result = stnerp(*train_args(files, output), *QUICK, "--json-events")
    assert_one_line_error(result, "cannot write the output folder")
    assert len(error_events(result.stdout)) == 1


# 2. Numbers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, words", [
    (["--iterations", "0"], ["--iterations 0", "at least 1"]),
    (["--iterations", "-5"], ["--iterations -5", "at least 1"]),
    (["--seed", "99999999999999999999"], ["--seed", "out of range"]),
    (["--seed", "-1"], ["--seed", "out of range"]),
    (["--predict-times", "nan"], ["not a finite number"]),
    (["--predict-times", "inf"], ["not a finite number"]),
    (["--predict-times", "1e6"], ["time 1e+06", "spans"]),
    (["--predict-times", "-1e300"], ["spans"]),
    (["--predict-times", "1.5", "2"], ["time 2", "scanned time"]),
    (["--predict-times", "1.5", "1.5"], ["time 1.5", "twice"]),
    (["--reference-time", "nan"], ["not a finite number"]),
])
def test_train_refuses_bad_numbers(extra, words, phantom, tmp_path):
    _, files = phantom
    output = tmp_path / "run"
    result = stnerp(*train_args(files, output), "--iterations", 15, *extra, "--json-events")
    assert_one_line_error(result, *words)
    assert error_events(result.stdout)
    assert not (output / "model.pt").exists()


@pytest.mark.parametrize("times, words", [(["nan"], ["not a finite number"]), (["inf"], ["not a finite number"]),
                                          (["1e300"], ["spans"]), (["2", "-1e6"], ["time -1e+06", "spans"]),
                                          (["2.5", "2.5"], ["time 2.5", "twice"])])
def test_predict_refuses_non_finite_and_far_times(times, words, trained, tmp_path):
    result = stnerp("predict", "--run", trained, "--times", *times, "--output", tmp_path / "p")
    assert_one_line_error(result, *words)
    assert record(tmp_path / "p")["status"] == "failed"


def test_negative_times_in_exponent_form_are_values(trained, tmp_path):
    result = stnerp("predict", "--run", trained, "--times", "-1e0", "-2.5e-1", "--output", tmp_path / "p")
    assert result.returncode == 0, result.stderr
    assert [p["time"] for p in record(tmp_path / "p")["time_points"]] == [-1.0, -0.25]
    assert "outside the scanned times 0..3" in result.stderr          # extrapolation is said


def test_negative_follow_up_time_in_exponent_form_is_a_value(phantom, tmp_path):
    _, files = phantom
    result = stnerp("train", "--reference", files["images"][0], "--follow-up", files["images"][1], "-1e0",
                    "--follow-up", files["images"][2], "1", "--output", tmp_path / "run", "--iterations", 5,
                    "--no-report")
    assert result.returncode == 0, result.stderr
    assert [t for _, t in record(tmp_path / "run")["inputs"]["follow_ups"]] == [-1.0, 1.0]


# 3. SIGINT -------------------------------------------------------------------------------------

def test_sigint_interrupts_a_worker_started_with_sigint_ignored(phantom, tmp_path):
    _, files = phantom
    output = tmp_path / "run"
    process = start(*train_args(files, output), "--iterations", 100000, "--json-events",
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))   # as a shell's `&`
    for line in process.stdout:
        if json.loads(line)["event"] == "progress":
            break
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert record(output)["status"] == "interrupted"
    assert error_events(stdout) and "Traceback" not in stderr


# 4. Silent wrong results -----------------------------------------------------------------------

def _moved(tmp_path, path, shift_mm):
    image = sitk.ReadImage(str(path))
    image.SetOrigin(tuple(np.add(image.GetOrigin(), shift_mm)))
    moved = tmp_path / "moved.nrrd"
    sitk.WriteImage(image, str(moved))
    return moved


def _landmarks(tmp_path, rows, name="landmarks.csv"):
    path = tmp_path / name
    path.write_text("time,x,y,z,ref_x,ref_y,ref_z\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def test_follow_up_without_overlap_is_refused_with_numbers(phantom, tmp_path):
    _, files = phantom
    moved = _moved(tmp_path, files["images"][1], (1000.0, 0.0, 0.0))
    result = stnerp("train", "--reference", files["images"][0], "--follow-up", moved, 1,
                    "--output", tmp_path / "run", *QUICK)
    line = assert_one_line_error(result, "does not overlap", "time 1", "mm")
    assert any(char.isdigit() for char in line.split("spans")[1])


def test_a_follow_up_thinner_than_the_ssim_window_is_scored_without_ssim(phantom, tmp_path):
    """SSIM's Gaussian window spans 11 voxels: a follow-up of 6 slices (a slab scan, a cropped CBCT) failed the whole
    run after training with an internal error. It is scored with PSNR and no SSIM, and the report is written."""
    series, files = phantom
    slab = tmp_path / "slab.nrrd"
    sitk.WriteImage(sitk.RegionOfInterest(series.images[1], (24, 24, 6), (0, 0, 5)), str(slab))
    result = stnerp("train", "--reference", files["images"][0], "--follow-up", slab, 1,
                    "--output", tmp_path / "run", *QUICK)
    assert result.returncode == 0, result.stderr
    metrics = record(tmp_path / "run")["time_points"][1]["metrics"]
    assert metrics["ssim"] is None and metrics["psnr"] > 10, metrics
    assert (tmp_path / "run" / "report" / "index.html").is_file()


def test_constant_image_is_refused(phantom, tmp_path):
    _, files = phantom
    like = sitk.ReadImage(str(files["images"][1]))
    constant = sitk.Image(like.GetSize(), sitk.sitkFloat32) + 40.0
    constant.CopyInformation(like)
    path = tmp_path / "constant.nrrd"
    sitk.WriteImage(constant, str(path))
    result = stnerp("train", "--reference", files["images"][0], "--follow-up", path, 1,
                    "--output", tmp_path / "run", *QUICK)
    assert_one_line_error(result, "constant", "40")


@pytest.mark.parametrize("case", ["outside", "reference outside", "nan row", "binary"])
def test_bad_landmarks_are_refused_in_one_line(case, phantom, tmp_path):
    series, files = phantom
    inside = list(series.images[0].TransformIndexToPhysicalPoint((12, 12, 8)))
    path = {
        "outside": lambda: _landmarks(tmp_path, [[1, *inside, *inside], [1, 5000, 5000, 5000, *inside]]),
        "reference outside": lambda: _landmarks(tmp_path, [[1, *inside, 5000, 5000, 5000]]),
        "nan row": lambda: _landmarks(tmp_path, [[1, *inside, *inside], [1, "nan", *inside[1:], *inside]]),
        "binary": lambda: (tmp_path / "lm.csv").write_bytes(bytes(range(256)) * 4) and tmp_path / "lm.csv",
    }[case]()
    words = {"outside": ["number 2", "5000", "outside the time-1 image"],
             "reference outside": ["outside the reference image"],
             "nan row": ["not finite", "row 2"], "binary": ["not a text"]}[case]
    result = stnerp(*train_args(files, tmp_path / "run", order=[1]), "--landmarks", path, *QUICK)
    assert_one_line_error(result, *words)


def test_evaluate_refuses_a_landmark_outside_the_image(trained, phantom, tmp_path):
    series, _ = phantom
    inside = list(series.images[0].TransformIndexToPhysicalPoint((12, 12, 8)))
    path = _landmarks(tmp_path, [[1, *inside, *inside], [1, 5000, 5000, 5000, *inside]])
    result = stnerp("evaluate", "--run", trained, "--landmarks", path)
    assert_one_line_error(result, "number 2", "outside the run's time-1 grid")
    assert not (trained / "evaluation.json").exists()


def test_ground_truth_without_segmentation_is_refused(phantom, tmp_path):
    _, files = phantom
    result = stnerp(*train_args(files, tmp_path / "run"), "--ground-truth", files["labelmaps"][1], 1, *QUICK)
    assert_one_line_error(result, "--ground-truth needs --segmentation")


def test_run_json_is_strict_json_with_nan_and_inf_as_null(tmp_path):
    path = tmp_path / "x.json"
    write_json({"psnr": float("inf"), "tre": [np.float64("nan"), 1.5], "nested": {"v": -np.inf}}, path)
    strict = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert strict == {"psnr": None, "tre": [None, 1.5], "nested": {"v": None}}


def test_follow_ups_out_of_time_order_give_the_sorted_result(phantom, tmp_path):
    _, files = phantom
    fields = []
    for name, order in (("sorted", [1, 2, 3]), ("shuffled", [3, 1, 2])):
        result = stnerp(*train_args(files, tmp_path / name, order=order), "--iterations", 10, "--no-report")
        assert result.returncode == 0, result.stderr
        fields.append(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / "t_2/displacement.nrrd"))))
    assert np.array_equal(fields[0], fields[1])


# 5. One-line errors ----------------------------------------------------------------------------

def _copy_run(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("run.json", "model.pt"):
        (copy / name).write_bytes((trained / name).read_bytes())
    return copy


def test_corrupt_model_is_a_one_line_error(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    (run / "model.pt").write_bytes(b"PK\x03\x04 truncated")
    result = stnerp("predict", "--run", run, "--times", 1.5, "--output", tmp_path / "p", "--json-events")
    assert_one_line_error(result, "model.pt", "damaged")
    assert record(tmp_path / "p")["status"] == "failed"


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_corrupt_run_json_is_a_one_line_error(command, trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    (run / "run.json").write_text('{"status": "comp')
    extra = ["--times", 1.5, "--output", tmp_path / "p"] if command == "predict" else []
    result = stnerp(command, "--run", run, *extra)
    assert_one_line_error(result, "run.json", "damaged")


def test_evaluate_twice_writes_a_new_numbered_file(trained, phantom, tmp_path):
    _, files = phantom
    run = tmp_path / "run"
    run.mkdir()
    for item in trained.iterdir():                     # a copy: the shared run stays as it is
        if item.is_file():
            (run / item.name).write_bytes(item.read_bytes())
        else:
            (run / item.name).mkdir()
            for f in item.iterdir():
                (run / item.name / f.name).write_bytes(f.read_bytes())
    first = stnerp("evaluate", "--run", run, "--landmarks", files["landmarks"])
    assert first.returncode == 0, first.stderr
    before = (run / "evaluation.json").read_text()
    second = stnerp("evaluate", "--run", run, "--image", files["images"][1], 1)
    assert second.returncode == 0, second.stderr
    assert (run / "evaluation.json").read_text() == before
    assert "psnr" in json.loads((run / "evaluation-2.json").read_text())["rows"][0]
    assert "evaluation-2.json" in second.stderr


def test_predicting_from_a_prediction_folder_says_so(trained, tmp_path):
    first = stnerp("predict", "--run", trained, "--times", 1.5, "--output", tmp_path / "p")
    assert first.returncode == 0, first.stderr
    result = stnerp("predict", "--run", tmp_path / "p", "--times", 2.5, "--output", tmp_path / "q")
    line = assert_one_line_error(result, "holds a prediction", "training run")
    assert "status: complete" not in line


# 6. Provenance ---------------------------------------------------------------------------------

def test_run_json_records_provenance(trained, phantom):
    _, files = phantom
    run = record(trained)
    inputs = run["inputs"]
    assert Path(inputs["reference"]).is_absolute()
    assert all(isinstance(t, float) for _, t in inputs["follow_ups"])
    reference = Path(files["images"][0]).absolute()
    assert inputs["sha256"][str(reference)] == hashlib.sha256(reference.read_bytes()).hexdigest()
    assert set(inputs["sha256"]) == {str(Path(p).absolute()) for p in
                                     [*files["images"], files["labelmaps"][0], files["landmarks"]]}
    assert run["device"] == "cpu" and isinstance(run["threads"]["threads"], int) and run["threads"]["threads"] >= 1
    assert run["command_line"][-4:] == ["--landmarks", str(files["landmarks"]), "--iterations", "15"]
    commit = run["versions"]["git_commit"]
    assert commit is None or len(commit) == 40
    assert run["versions"]["stnerp"]


def test_metrics_table_names_its_units(trained):
    header = (trained / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:10] == ["time", "scanned", "folded_voxels", "jacobian_min", "jacobian_max", "psnr_db",
                           "ssim", "tre_mean_mm", "tre_std_mm", "tre_max_mm"]
    row = (trained / "metrics.csv").read_text().splitlines()[2].split(",")
    tre = record(trained)["time_points"][1]["metrics"]["tre_mean"]
    assert float(row[7]) == pytest.approx(tre)


# 7. Resume -------------------------------------------------------------------------------------

# 160 iterations: the kill tests act on a progress event (sent at most every 0.25 s) while the worker runs on,
# ~40 iterations a second here; a kill at iteration 25 must land before the fit ends even under load. No report
# (test_report's): it was a third of these runs' time; test_kill_9_mid_def_net_then_resume_is_bit_identical writes it.
RESUMABLE = ["--iterations", "160", "--checkpoint-every", "10", "--no-report", "--predict-times", "1.5", "4"]


@pytest.fixture(scope="module")
def uninterrupted(phantom, tmp_path_factory):
    _, files = phantom
    output = tmp_path_factory.mktemp("resume") / "whole"
    result = stnerp(*train_args(files, output), *RESUMABLE)
    assert result.returncode == 0, result.stderr
    return output


def _kill_when(process: subprocess.Popen, stage: str, iteration: int) -> None:
    """SIGKILL the worker as soon as it reports `stage` at `iteration` or later."""
    for line in process.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and event["stage"] == stage and event["iteration"] >= iteration:
            process.kill()
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def _fits_reported(stdout: str, stage: str) -> list[int]:
    """The first iteration reported of each fit of `stage` in a run's events (a fit starts where the
    iteration falls: the short-range scheme fits pair after pair)."""
    iterations = [e["iteration"] for e in map(json.loads, stdout.splitlines())
                  if e["event"] == "progress" and e["stage"] == stage]
    return [i for k, i in enumerate(iterations) if k == 0 or i < iterations[k - 1]]


def _first_iteration(stdout: str, stage: str) -> int:
    """The first iteration a run reported for `stage` (the first event of a stage is never skipped)."""
    return next(e["iteration"] for e in map(json.loads, stdout.splitlines())
                if e["event"] == "progress" and e["stage"] == stage)


def _same_outputs(run: Path, other: Path) -> None:
    a, b = record(run), record(other)
    assert [p["time"] for p in a["time_points"]] == [p["time"] for p in b["time_points"]]
    for point in a["time_points"]:
        for kind in ("displacement", "jacobian", "image"):
            x = sitk.GetArrayFromImage(sitk.ReadImage(str(run / point[kind])))
            y = sitk.GetArrayFromImage(sitk.ReadImage(str(other / point[kind])))
            assert np.array_equal(x, y), (point["time"], kind)


def test_killed_run_whose_pid_another_process_now_holds_is_still_seen_as_killed(phantom, tmp_path):
    """PID reuse: after kill -9 the record's PID may belong to a new, unrelated process; the run is
    still the killed one (its recorded process start differs), so predict names it and --resume works."""
    _, files = phantom
    output = tmp_path / "killed"
    args = train_args(files, output) + RESUMABLE
    _kill_when(start(*args, "--json-events"), "defnet", 5)
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        data = record(output)
        assert data["status"] == "running"
        write_json({**data, "pid": stranger.pid}, output / "run.json")
        predicted = stnerp("predict", "--run", output, "--times", 1.5, "--output", tmp_path / "p")
        assert_one_line_error(predicted, "process is gone", "--resume")
        resumed = stnerp(*args, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert record(output)["status"] == "complete"
    finally:
        stranger.kill()


def test_kill_9_mid_def_net_then_resume_is_bit_identical(phantom, uninterrupted, tmp_path):
    _, files = phantom
    output = tmp_path / "killed"
    args = train_args(files, output) + [a for a in RESUMABLE if a != "--no-report"]        # with its report
    _kill_when(start(*args, "--json-events"), "defnet", 25)
    assert record(output)["status"] == "running" and not (output / "model.pt").exists()
    saved = torch.load(output / "checkpoint.pt", weights_only=True)["iteration"]
    assert 20 <= saved < 160, saved
    # a killed run is named as such, with the way out
    predicted = stnerp("predict", "--run", output, "--times", 1.5, "--output", tmp_path / "p")
    assert_one_line_error(predicted, "process is gone", "--resume")
    evaluated = stnerp("evaluate", "--run", output, "--landmarks", files["landmarks"])
    assert_one_line_error(evaluated, "process is gone", "--resume")
    again = stnerp(*args)
    assert_one_line_error(again, "already holds a run", "--resume")
    resumed = stnerp(*args, "--resume", "--json-events")
    assert resumed.returncode == 0, resumed.stderr
    assert _first_iteration(resumed.stdout, "defnet") == saved + 1     # continued, not restarted
    run = record(output)
    assert run["status"] == "complete" and len(run["resumed"]) == 1
    assert not (output / "checkpoint.pt").exists() and run["report"] == "report/index.html"
    _same_outputs(output, uninterrupted)
    assert (output / "t_1/displacement.nrrd").read_bytes() == (uninterrupted / "t_1/displacement.nrrd").read_bytes()


def test_sigterm_then_resume_is_bit_identical(phantom, uninterrupted, tmp_path):
    _, files = phantom
    output = tmp_path / "stopped"
    args = train_args(files, output) + RESUMABLE
    process = start(*args, "--json-events")
    for line in process.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and event["iteration"] >= 5:
            process.send_signal(signal.SIGTERM)
            break
    process.communicate(timeout=60)
    assert process.returncode == 130
    assert record(output)["status"] == "interrupted" and (output / "checkpoint.pt").exists()
    resumed = stnerp(*args, "--resume", "--json-events")
    assert resumed.returncode == 0, resumed.stderr
    assert _first_iteration(resumed.stdout, "defnet") > 5              # from the checkpoint of the signal
    _same_outputs(output, uninterrupted)


def test_kill_9_during_outputs_resumes_at_the_first_missing_time_point(phantom, uninterrupted, tmp_path):
    _, files = phantom
    output = tmp_path / "outputs"
    args = train_args(files, output) + RESUMABLE
    _kill_when(start(*args, "--json-events"), "outputs", 1)
    written = [p["time"] for p in record(output)["time_points"]]
    assert 1 <= len(written) < 6 and (output / "model.pt").exists()
    model = (output / "model.pt").stat().st_mtime_ns
    first = (output / "t_0/displacement.nrrd").stat().st_mtime_ns
    resumed = stnerp(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "defnet" not in resumed.stderr                     # no retraining
    assert (output / "model.pt").stat().st_mtime_ns == model
    assert (output / "t_0/displacement.nrrd").stat().st_mtime_ns == first
    _same_outputs(output, uninterrupted)


SHORT = ["--scheme", "short", "--iterations", "40", "--checkpoint-every", "10", "--no-report"]


def test_kill_9_mid_short_range_then_resume_is_bit_identical(phantom, tmp_path):
    """--scheme short resumes pair by pair: the pairs written are kept, the pair under way continues
    from its checkpoint; fields, labelmaps and chained TRE as an uninterrupted run's."""
    _, files = phantom
    extra = ["--segmentation", files["labelmaps"][0], "--landmarks", files["landmarks"], *SHORT]
    whole = stnerp(*train_args(files, tmp_path / "whole"), *extra)
    assert whole.returncode == 0, whole.stderr
    output = tmp_path / "killed"
    args = train_args(files, output) + extra
    process = start(*args, "--json-events")
    pair, last = 1, 0
    for line in process.stdout:                  # Def-Net's iterations start again at each pair
        event = json.loads(line)
        if event["event"] == "progress" and event["stage"] == "defnet":
            pair, last = pair + (event["iteration"] < last), event["iteration"]
            if pair == 2 and last >= 25:
                process.kill()
                break
    process.wait(timeout=60)
    assert [p["time"] for p in record(output)["time_points"]] == [1.0]
    # Pair 2's checkpoint (pair 1's is removed once written). The worker may have run ahead of the events
    # read here, as far as the end of pair 2's fit (iteration 40): CI saw that once, under load.
    saved = torch.load(output / "checkpoint.pt", weights_only=True)["iteration"]
    assert saved >= 20
    first = (output / "t_1/displacement.nrrd").stat().st_mtime_ns
    resumed = stnerp(*args, "--resume", "--json-events")
    assert resumed.returncode == 0, resumed.stderr
    fits = _fits_reported(resumed.stdout, "defnet")    # pair 2 continued (or left as done), not restarted; pair 3
    assert len(fits) == (2 if saved < 40 else 1) and (saved == 40 or fits[0] == saved + 1), (saved, fits)
    assert "pair 1/3" not in resumed.stderr and (output / "t_1/displacement.nrrd").stat().st_mtime_ns == first
    assert not (output / "checkpoint.pt").exists()
    _same_outputs(output, tmp_path / "whole")
    a, b = record(output), record(tmp_path / "whole")
    for p, q in zip(a["time_points"], b["time_points"]):
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(output / p["labelmap"]))),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "whole" / q["labelmap"]))))
        assert p["metrics"] == q["metrics"] and p["reference_time"] == q["reference_time"]
    assert a["status"] == "complete" and a["time_points"][2]["metrics"]["tre_mean"] is not None


@pytest.mark.parametrize("case", ["different arguments", "complete run", "no run"])
def test_resume_refuses_what_it_cannot_continue(case, phantom, uninterrupted, tmp_path):
    _, files = phantom
    if case == "complete run":
        result = stnerp(*train_args(files, uninterrupted), *RESUMABLE, "--resume")
        assert_one_line_error(result, "already complete")
        return
    output = tmp_path / "run"
    if case == "no run":
        result = stnerp(*train_args(files, output), *RESUMABLE, "--resume")
        assert_one_line_error(result, "no run.json")
        return
    output.mkdir()
    (output / "run.json").write_text(json.dumps({**record(uninterrupted), "status": "interrupted"}))
    result = stnerp(*train_args(files, output), *RESUMABLE[:-3], "--resume")
    assert_one_line_error(result, "--resume needs the arguments", "predict_times", "[1.5, 4.0] then, [] now")


def _interrupted_copy(run: Path, folder: Path, change, whole: bool = False) -> Path:
    """`folder` holding run's record (with `whole`, all of its files), marked interrupted and changed by `change` (a
    function of the record)."""
    if whole:
        shutil.copytree(run, folder)
    else:
        folder.mkdir()
    data = {**record(run), "status": "interrupted"}
    change(data)
    (folder / "run.json").write_text(json.dumps(data))
    return folder


def test_resume_of_a_run_started_by_another_version_names_the_setting_and_the_way_out(phantom, uninterrupted,
                                                                                       tmp_path):
    """A run started by a version whose preset lacked a setting (as displacement_spacing before 2026-12-02)
    cannot be continued by this one: the error names the setting, both values, and a new folder."""
    _, files = phantom
    output = _interrupted_copy(uninterrupted, tmp_path / "older",
                               lambda data: data["parameters"]["preset"].pop("displacement_spacing"))
    result = stnerp(*train_args(files, output), *RESUMABLE, "--resume")
    assert_one_line_error(result, "preset", "displacement_spacing absent then, 8.0 now", "another version",
                          "new folder")


def test_a_run_recorded_before_prealign_auto_resumes_with_prealign_none(phantom, uninterrupted, tmp_path):
    """Until 2026-12-06 run.json recorded the pre-alignment as a bool (false: none, true: affine), and the default was
    none. Such an unfinished run resumes with --prealign none, and without it the refusal names the way out in this
    version's words (it said "prealign false then, none now" to every choice, so nothing could resume it)."""
    _, files = phantom
    output = _interrupted_copy(uninterrupted, tmp_path / "older",
                               lambda data: data["parameters"].update(prealign=False), whole=True)
    refused = stnerp(*train_args(files, output), *RESUMABLE, "--resume")
    assert_one_line_error(refused, "'prealign' was \"none\" then, \"auto\" now")
    resumed = stnerp(*train_args(files, output), *RESUMABLE, "--prealign", "none", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert record(output)["status"] == "complete" and record(output)["parameters"]["prealign"] == "none"


@pytest.mark.parametrize("count", [1, 2])
def test_a_resumed_run_computes_with_the_thread_count_it_started_with(phantom, uninterrupted, tmp_path, count):
    """A fit's numbers depend on its thread count (torch's sums split differently: 60 iterations of the phantom gave
    another model.pt at 2 threads than at 1), and without --threads the count follows the machine's load, so a run
    resumed at another load was not bit-identical to the run uninterrupted (the resume tests failed on an idle
    machine after a loaded one). A resume computes with the count the run started with, said."""
    _, files = phantom
    output = _interrupted_copy(uninterrupted, tmp_path / "resumed", lambda data: data["threads"].update(threads=count),
                               whole=True)
    resumed = stnerp(*train_args(files, output), *RESUMABLE, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"computing with {count} thread(s), as the run it resumes" in resumed.stderr, resumed.stderr


def test_resume_with_the_ct_number_calibration_switched_names_the_setting(phantom, uninterrupted, tmp_path):
    """A run started under the default preset (CT numbers calibrated where a follow-up's differ) is not continued
    with --no-calibrate-intensities, which would fit the rest of it otherwise: one line names the setting, both
    values, and the way out."""
    _, files = phantom
    output = _interrupted_copy(uninterrupted, tmp_path / "switched", lambda data: None)
    result = stnerp(*train_args(files, output), *RESUMABLE, "--no-calibrate-intensities", "--resume")
    assert_one_line_error(result, "--resume needs the arguments", "calibrate_intensities true then, false now",
                          "the arguments it was started with")


def test_resume_from_a_checkpoint_without_a_modules_state_is_refused(tmp_path):
    """A checkpoint written by a version that tracked fewer modules (as before Def-Net's weight average) must
    not resume with that module's state fresh, silently unlike an uninterrupted run: one line, the way out,
    and the checkpoint left as it was."""
    generator = torch.Generator().manual_seed(0)
    net = torch.nn.Linear(2, 2)
    optimizer = Adam(net.parameters(), lr=1e-3)
    schedule = DecaySchedule(optimizer, 10, 1.0)
    older = Checkpoint(tmp_path / "checkpoint.pt", every=1)
    older.restore("defnet", {"deformation": net}, optimizer, schedule, generator, 10)
    older.after("defnet", 3, optimizer, schedule, generator)
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    newer = Checkpoint(tmp_path / "checkpoint.pt", every=1)
    with pytest.raises(InputError) as refused:
        newer.restore("defnet", {"deformation": net, "weight_average": torch.nn.Linear(2, 2)}, optimizer, schedule,
                      generator, 10)
    message = str(refused.value)
    assert "\n" not in message and "weight_average" in message and "another version" in message
    assert "new folder" in message
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved


def test_resume_after_an_input_file_changed_names_the_file(phantom, uninterrupted, tmp_path):
    _, files = phantom
    changed = str(Path(files["images"][1]).absolute())
    output = _interrupted_copy(uninterrupted, tmp_path / "changed",
                               lambda data: data["inputs"]["sha256"].update({changed: "0" * 64}))
    result = stnerp(*train_args(files, output), *RESUMABLE, "--resume")
    assert_one_line_error(result, f"input file {changed} changed since the run started", "new folder")


def test_resume_of_a_run_recorded_without_input_checksums_is_refused_in_one_line(phantom, uninterrupted, tmp_path):
    """A run.json without the inputs' sha256 (written before they were recorded, or edited by hand) was a TypeError
    traceback."""
    _, files = phantom
    output = _interrupted_copy(uninterrupted, tmp_path / "unsummed", lambda data: data["inputs"].pop("sha256"))
    result = stnerp(*train_args(files, output), *RESUMABLE, "--resume")
    assert_one_line_error(result, "holds no checksums of its input files", "new folder")


def test_failed_write_ends_failed_in_one_line_and_resume_completes_it(phantom, uninterrupted, tmp_path):
    """A full disk, as a file-size limit: the checkpoint cannot be written (EFBIG)."""
    import resource
    _, files = phantom
    output = tmp_path / "full"
    args = train_args(files, output) + RESUMABLE
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))  # noqa: E731
    result = stnerp(*args, "--json-events", preexec_fn=limit)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "File too large" in lines[0] and "--resume" in lines[0]
    assert error_events(result.stdout)
    assert record(output)["status"] == "failed" and not (output / "model.pt").exists()
    resumed = stnerp(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _same_outputs(output, uninterrupted)


# 8. Memory -------------------------------------------------------------------------------------

def test_displacement_is_float32_on_disk(trained):
    point = record(trained)["time_points"][1]
    field = sitk.ReadImage(str(trained / point["displacement"]))
    assert field.GetPixelID() == sitk.sitkVectorFloat32 and field.GetNumberOfComponentsPerPixel() == 3


@pytest.mark.parametrize("slab", [1, 2, 5])
def test_jacobian_in_slabs_equals_the_whole_volume_at_once(slab):
    from STNeRPLib.metrics import jacobian_determinant
    rng = np.random.default_rng(3)
    field = sitk.GetImageFromArray(rng.normal(0, 2, (7, 6, 5, 3)).astype(np.float32), isVector=True)
    field.SetSpacing((1.5, 0.8, 2.5))
    field.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    whole = sitk.GetArrayFromImage(jacobian_determinant(field, slab=7))
    assert np.array_equal(sitk.GetArrayFromImage(jacobian_determinant(field, slab=slab)), whole)
    assert np.ptp(whole) > 1                                  # a field that is not trivial


@pytest.mark.parametrize("slab", [1, 3])
def test_ssim_in_slabs_equals_the_whole_volume_at_once(slab):
    from STNeRPLib.metrics import ssim
    rng = np.random.default_rng(4)
    a = rng.random((16, 14, 13))
    b = a + rng.normal(0, 0.2, a.shape)
    whole = ssim(a, b, slab=100)
    assert ssim(a, b, slab=slab) == pytest.approx(whole, rel=1e-12) and 0.1 < whole < 0.9


def test_kill_9_mid_ref_net_then_resume_is_bit_identical(phantom, tmp_path):
    _, files = phantom
    args = ["--prior", "refnet", "--iterations", "40", "--checkpoint-every", "5", "--no-report"]
    whole = stnerp(*train_args(files, tmp_path / "whole", order=[1, 2]), *args)
    assert whole.returncode == 0, whole.stderr
    output = tmp_path / "killed"
    _kill_when(start(*train_args(files, output, order=[1, 2]), *args, "--json-events"), "refnet", 15)
    assert torch_load_stage(output / "checkpoint.pt") == "refnet"
    resumed = stnerp(*train_args(files, output, order=[1, 2]), *args, "--resume", "--json-events")
    assert resumed.returncode == 0, resumed.stderr
    assert _first_iteration(resumed.stdout, "refnet") > 10
    _same_outputs(output, tmp_path / "whole")


def torch_load_stage(path: Path) -> str:
    import torch
    return torch.load(path, weights_only=True)["stage"]


def test_demo_at_a_small_size_keeps_the_tumour_in_view(tmp_path):
    result = stnerp("demo", "--size", 24, 24, 16, "--iterations", 10, "--output", tmp_path / "demo", "--no-report")
    assert result.returncode == 0, result.stderr
    run = record(tmp_path / "demo" / "run")
    assert run["status"] == "complete"
    assert all("1" in p["metrics"]["dice"] for p in run["time_points"] if p["metrics"]["dice"])
    assert "tumour Dice" in result.stderr


def test_folder_checksum_covers_its_files_and_not_subfolders(tmp_path):
    from STNeRPLib.io import file_sha256
    (tmp_path / "a.dcm").write_bytes(b"one")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.dcm").write_bytes(b"two")
    before = file_sha256(tmp_path)
    (tmp_path / "sub" / "b.dcm").write_bytes(b"changed")
    assert file_sha256(tmp_path) == before
    (tmp_path / "a.dcm").write_bytes(b"changed")
    assert file_sha256(tmp_path) != before and file_sha256(tmp_path / "absent") is None


def test_kill_9_during_outputs_of_a_pre_aligned_run_resumes_with_the_model_s_pre_alignments(phantom, tmp_path):
    """Outputs resumed after training take each follow-up's pre-alignment from the saved model: the time points
    written after the resume are those of the uninterrupted run (their displacements include the pre-alignment)."""
    _, files = phantom
    args = ["--prealign", "affine", "--iterations", "60", "--checkpoint-every", "10", "--no-report"]
    whole = stnerp(*train_args(files, tmp_path / "whole"), *args)
    assert whole.returncode == 0, whole.stderr
    assert record(tmp_path / "whole")["prealignments"]
    output = tmp_path / "killed"
    _kill_when(start(*train_args(files, output), *args, "--json-events"), "outputs", 1)
    assert len(record(output)["time_points"]) < 4
    resumed = stnerp(*train_args(files, output), *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "defnet" not in resumed.stderr
    _same_outputs(output, tmp_path / "whole")


def test_kill_9_mid_def_net_of_a_pre_aligned_run_at_two_threads_then_resume_is_bit_identical(phantom, tmp_path):
    """The resumed run pre-aligns its follow-ups again: ITK's threads added the metric in the order they finished, so
    the pre-alignment's last bits, and the fit after it, differed from the uninterrupted run's."""
    _, files = phantom
    args = ["--prealign", "affine", "--threads", "2", "--iterations", "60", "--checkpoint-every", "10",
            "--no-report"]
    whole = stnerp(*train_args(files, tmp_path / "whole"), *args)
    assert whole.returncode == 0, whole.stderr
    output = tmp_path / "killed"
    _kill_when(start(*train_args(files, output), *args, "--json-events"), "defnet", 25)
    resumed = stnerp(*train_args(files, output), *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert record(output)["prealignments"] == record(tmp_path / "whole")["prealignments"]
    _same_outputs(output, tmp_path / "whole")
