"""stnerp batch: a cohort manifest trained on a real Dask LocalCluster (two worker processes), the
CLI as a real subprocess, tiny phantoms on disk. One bad patient fails alone; a rerun skips complete
runs and retries the others; a series whose worker is killed mid-task is rerun to completion."""
import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from STNeRPLib.cohort import (POINT_METRICS, cluster_size, read_cohort, run_state, series_args, worker_share,
                              write_summary)
from STNeRPLib.errors import InputError
from STNeRPLib.phantom import breathing_series, write_series
from worker_cli import WORKER, stnerp

QUICK = ["--iterations", "10", "--prior", "image"]


def batch_command(cohort: Path, output: Path, *extra) -> list:
    return [*WORKER, "batch", "--cohort", str(cohort), "--output", str(output),
            *map(str, extra)]


@pytest.fixture(scope="module")
def phantom_folder(tmp_path_factory) -> Path:
    """A 3-phase 24x24x16 phantom on disk: image_k, labelmap_k, landmarks.csv."""
    folder = tmp_path_factory.mktemp("cohort")
    series = breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3, noise_hu=0)
    write_series(series, folder / "data")
    return folder


def write_cohort(folder: Path, text: str) -> Path:
    path = folder / "cohort.csv"
    path.write_text(text)
    return path


THREE_PATIENTS = """patient,role,path,time
# p01 with everything, p02 the minimum, p03 names a follow-up that does not exist
p01,reference,data/image_0.nrrd,0
p01,follow-up,data/image_1.nrrd,1
p01,follow-up,data/image_2.nrrd,2
p01,segmentation,data/labelmap_0.nrrd,
p01,landmarks,data/landmarks.csv,
p01,ground-truth,data/labelmap_2.nrrd,2

p02,reference,data/image_0.nrrd,0
p02,follow-up,data/image_2.nrrd,2
p03,reference,data/image_0.nrrd,0
p03,follow-up,data/missing.nrrd,1
"""


def summary(output: Path) -> dict:
    def refuse(constant):
        raise ValueError(f"summary.json holds {constant}: not strict JSON")
    data = json.loads((output / "summary.json").read_text(), parse_constant=refuse)
    return {entry["patient"]: entry for entry in data["patients"]}


@pytest.fixture(scope="module")
def first_batch(phantom_folder):
    cohort = write_cohort(phantom_folder, THREE_PATIENTS)
    output = phantom_folder / "runs"
    done = subprocess.run(batch_command(cohort, output, "--workers", 2, "--threads-per-worker", 1,
                                        "--json-events", *QUICK),
                          capture_output=True, text=True, timeout=300, cwd="/")
    return cohort, output, done


def test_batch_completes_good_patients_and_fails_the_bad_one_alone(first_batch):
    _, output, done = first_batch
    assert done.returncode == 1, done.stderr
    entries = summary(output)
    assert [entries[p]["status"] for p in ("p01", "p02", "p03")] == ["complete", "complete", "failed"]
    missing = str(output.parent / "data" / "missing.nrrd")
    assert entries["p03"]["error"] == f"follow-up image at time 1 not found: {missing}: check the path"
    for patient in ("p01", "p02"):
        record = json.loads((output / patient / "run.json").read_text())
        assert record["status"] == "complete" and record["command"] == "train"
        assert record["inputs"]["reference"] == str(output.parent / "data" / "image_0.nrrd")
        assert (output / patient / "model.pt").is_file()
        assert (output / patient / record["report"]).is_file()              # each patient's report
    points = {point["time"]: point for point in entries["p01"]["time_points"]}
    assert sorted(points) == [0.0, 1.0, 2.0] and entries["p01"]["wall_time_s"] > 0
    assert points[2.0]["tre_mean"] > 0 and points[2.0]["folded_voxels"] == 0
    assert 0 < points[2.0]["jacobian_min"] <= 1 <= points[2.0]["jacobian_max"]
    assert set(points[2.0]["dice"]) == {"1", "2", "3"} and points[2.0]["dice"]["2"] > 0.8
    csv_lines = (output / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("patient,status,skipped,error,wall_time_s,time,scanned,tre_mean")
    assert len(csv_lines) == 1 + 3 + 2 + 1 and csv_lines[-1].startswith("p03,failed,False,follow-up image")


def test_batch_json_events_are_train_events_with_a_patient_key(first_batch):
    _, output, done = first_batch
    events = [json.loads(line) for line in done.stdout.splitlines()]
    per_patient = {}
    for event in events[:-1]:
        per_patient.setdefault(event["patient"], []).append(event)
    assert set(per_patient) == {"p01", "p02", "p03"}
    for patient in ("p01", "p02"):
        stages = {e["stage"] for e in per_patient[patient] if e["event"] == "progress"}
        assert stages == {"defnet", "outputs"}
        assert set(per_patient[patient][0]) == {"event", "stage", "iteration", "total", "loss", "eta", "patient"}
        assert per_patient[patient][-1] == {"event": "done", "status": "complete",
                                            "output": str(output / patient), "patient": patient}
    assert per_patient["p03"][-1]["event"] == "error" and "missing.nrrd" in per_patient["p03"][-1]["message"]
    assert events[-1] == {"event": "done", "status": "failed", "output": str(output)}
    assert "p03: failed: follow-up image at time 1 not found" in done.stderr
    assert "patients [" in done.stderr and "3/3" in done.stderr


def test_rerun_skips_complete_runs_and_retries_the_failed_one(first_batch):
    cohort, output, _ = first_batch
    modified = {p: (output / p / "run.json").stat().st_mtime_ns for p in ("p01", "p02", "p03")}
    time.sleep(0.05)
    again = subprocess.run(batch_command(cohort, output, "--workers", 2, "--threads-per-worker", 1, *QUICK),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 1, again.stderr
    entries = summary(output)
    assert (output / "p01" / "run.json").stat().st_mtime_ns == modified["p01"]
    assert (output / "p02" / "run.json").stat().st_mtime_ns == modified["p02"]
    assert entries["p01"]["skipped"] and entries["p02"]["skipped"] and not entries["p03"]["skipped"]
    assert entries["p01"]["status"] == "complete" and len(entries["p01"]["time_points"]) == 3
    assert (output / "p03" / "run.json").stat().st_mtime_ns != modified["p03"]
    assert entries["p03"]["status"] == "failed"
    assert entries["p03"]["error"].startswith("follow-up image at time 1 not found:")


def test_a_failed_dicom_export_of_a_complete_run_is_in_its_summary_entry(first_batch, tmp_path):
    """--dicom-out on a cohort trained before exports its complete runs; for scans that are not DICOM the export
    fails, and the summary says why beside the complete run (it said nothing: the run's record has no error), and
    the batch exits 1 (it exited 0 when every run was complete, the export's failure aside)."""
    _, output, _ = first_batch
    complete_only = output.parent / "complete_only.csv"       # p01 and p02: the runs complete in first_batch
    complete_only.write_text("\n".join(line for line in THREE_PATIENTS.splitlines() if not line.startswith("p03")))
    shutil.copytree(output, tmp_path / "runs")
    again = subprocess.run(batch_command(complete_only, tmp_path / "runs", "--workers", 1, "--threads-per-worker",
                                         1, "--dicom-out", tmp_path / "dicom", *QUICK),
                           capture_output=True, text=True, timeout=300)
    entries = summary(tmp_path / "runs")
    assert sorted(entries) == ["p01", "p02"]
    for patient in ("p01", "p02"):
        assert entries[patient]["status"] == "complete" and entries[patient]["skipped"], again.stderr
        assert "--dicom-out needs DICOM series" in (entries[patient]["error"] or "")
    assert again.returncode == 1, again.stderr


def test_series_of_a_killed_worker_is_rerun_to_completion(phantom_folder, tmp_path):
    """Also: a worker declaring series=1 gives its series all its threads (torch in the workers
    starts at 1 thread: Dask sets OMP_NUM_THREADS=1 for them)."""
    from distributed import Client, LocalCluster
    cohort = write_cohort(tmp_path, "patient,role,path,time\n"
                          f"pk,reference,{phantom_folder}/data/image_0.nrrd,0\n"
                          f"pk,follow-up,{phantom_folder}/data/image_1.nrrd,1\n")
    output = tmp_path / "runs"
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, resources={"series": 1},
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        batch = subprocess.Popen(batch_command(cohort, output, "--scheduler", cluster.scheduler_address,
                                               "--iterations", "100", "--prior", "image", "--no-report"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            killed = _kill_worker_running(client, "pk", output / "pk" / "run.json")
            stdout, stderr = batch.communicate(timeout=300)
        finally:
            batch.kill()
        assert killed not in client.run(os.getpid).values()
    assert batch.returncode == 0, stderr
    record = json.loads((output / "pk" / "run.json").read_text())
    assert record["threads"]["threads"] == 2      # as counted by torch in the task that trained it
    assert record["threads"]["requested"] == 2 and record["threads"]["blas_threads"] == 1   # threads.use, as --threads
    assert record["status"] == "complete" and [p["time"] for p in record["time_points"]] == [0.0, 1.0]
    assert summary(output)["pk"]["status"] == "complete"
    assert (output / "pk" / "t_1" / "displacement.nrrd").is_file()


def _kill_worker_running(client, patient: str, record: Path, timeout: float = 120) -> int:
    """SIGKILL the worker process that runs the patient's task once its run.json says running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = record.is_file() and json.loads(record.read_text() or "{}").get("status") == "running"
        busy = [worker for worker, keys in client.processing().items()
                if any(str(key).startswith(f"stnerp-{patient}-") for key in keys)]
        if running and busy:
            pid = client.run(os.getpid, workers=busy)[busy[0]]
            os.kill(pid, signal.SIGKILL)
            assert json.loads(record.read_text())["status"] == "running"   # killed mid-task
            return pid
        time.sleep(0.02)
    raise AssertionError(f"the task of {patient} never ran")


def test_cohort_paths_are_resolved_against_the_manifest_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    cohort = write_cohort(tmp_path / "sub", "patient , role , path , time\n"
                          "a,reference,../ct0.nrrd,0\na,Follow-Up,scans/ct1.nrrd,3\n"
                          "a,segmentation,/abs/seg.nrrd,\n")
    monkeypatch.chdir("/")
    (patient,) = read_cohort(cohort)
    series = series_args(patient, argparse.Namespace(output=tmp_path / "runs", dicom_out=None))
    assert series.reference == str(tmp_path / "ct0.nrrd") and series.reference_time == 0.0
    assert series.follow_up == [[str(tmp_path / "sub" / "scans" / "ct1.nrrd"), "3"]]
    assert series.segmentation == "/abs/seg.nrrd" and series.output == tmp_path / "runs" / "a"


def test_a_manifest_saved_with_a_byte_order_mark_is_read_and_one_in_another_encoding_named(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a byte order mark, which must not hide the first column; a file
    in another encoding is refused in one line saying how to save it."""
    cohort = tmp_path / "cohort.csv"
    cohort.write_bytes("patient,role,path,time\r\np01,reference,ct0.nrrd,0\r\np01,follow-up,ct1.nrrd,1\r\n"
                       .encode("utf-8-sig"))
    (patient,) = read_cohort(cohort)
    assert patient.id == "p01"
    cohort.write_bytes("patient,role,path,time\np01,reference,caf\xe9.nrrd,0\n".encode("latin-1"))
    with pytest.raises(InputError, match="is not UTF-8 text: save it as CSV UTF-8"):
        read_cohort(cohort)


def test_a_manifest_saved_with_semicolons_and_decimal_commas_is_read(tmp_path):
    """Excel in a locale that writes 1,5 saves "CSV" separated by semicolons; a time may then read 1,5. The patient
    gets the same files and times as from the comma-separated manifest (a comma in a path stays a comma)."""
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("patient;role;path;time\r\np01;reference;ct0.nrrd;0\r\np01;follow-up;week 1, am.nrrd;7,5\r\n")
    (patient,) = read_cohort(cohort)
    assert patient.rows == [("reference", str(tmp_path / "ct0.nrrd"), "0"),
                            ("follow-up", str(tmp_path / "week 1, am.nrrd"), "7.5")]


@pytest.mark.parametrize("rows, message", [
    ("a,reference,ct0.nrrd,0\na,segmentation,seg.nrrd,0\n", "has a time: leave the time column empty"),
    ("a,reference,ct0.nrrd,0\na,follow-up,ct1.nrrd,\n", "has no time: give its time"),
    ("a,reference,ct0.nrrd,0\na,reference,ct1.nrrd,1\n", "2 reference rows: give exactly one reference row"),
    ("a,follow-up,ct1.nrrd,1\n", "0 reference rows"),
    ("a,reference,ct0.nrrd,0\na,followup,ct1.nrrd,1\n", "role 'followup' is not one of reference, follow-up"),
    ("a,reference,ct0.nrrd,zero\na,follow-up,ct1.nrrd,1\n", "time 'zero' is not a number"),
])
def test_wrong_rows_fail_their_patient_with_one_line(tmp_path, rows, message):
    (patient,) = read_cohort(write_cohort(tmp_path, "patient,role,path,time\n" + rows))
    with pytest.raises(InputError, match=message):
        series_args(patient, argparse.Namespace(output=tmp_path / "runs"))


@pytest.mark.parametrize("text, message", [
    ("patient,role,path\n", "lacks the columns time"),
    ("patient,role,path,time\n", "lists no series"),
    ("patient,role,path,time\n../up,reference,ct.nrrd,0\n", "line 2: patient '../up' cannot name a folder"),
])
def test_batch_refuses_an_unusable_manifest_with_exit_code_2(tmp_path, text, message):
    done = stnerp("batch", "--cohort", write_cohort(tmp_path, text), "--output", tmp_path / "runs")
    assert done.returncode == 2 and message in done.stderr
    assert done.stderr.count("\n") == 1 and not (tmp_path / "runs" / "summary.json").exists()


def test_rerun_never_deletes_a_folder_holding_other_files(tmp_path):
    folder = tmp_path / "runs" / "a"
    (folder / "t_1").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"command": "train", "status": "running"}))
    (folder / "t_1" / "displacement.nrrd").write_text("partial")
    series = argparse.Namespace(output=folder)
    assert run_state(series) == "unfinished"
    (folder / "t_1" / "my_notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="holds files that are not a stnerp train run"):
        run_state(series)
    (folder / "t_1" / "my_notes.txt").unlink()
    (folder / "run.json").write_text(json.dumps({"command": "predict", "status": "failed"}))
    with pytest.raises(InputError, match="not a stnerp train run"):
        run_state(series)


def test_summary_json_is_strict_with_non_finite_metrics_as_null(tmp_path):
    point = {"time": 1.0, "scanned": True, "tre_mean": float("nan"), "tre_std": None, "tre_max": None,
             "folded_voxels": 0, "jacobian_min": float("-inf"), "jacobian_max": 1.2, "dice": {"1": 0.5}}
    entry = {"patient": "a", "status": "complete", "skipped": False, "error": None, "wall_time_s": 3.0,
             "run": "runs/a", "time_points": [point]}
    write_summary([entry], tmp_path / "cohort.csv", tmp_path)
    (written,) = summary(tmp_path).values()
    assert written["time_points"][0]["tre_mean"] is None and written["time_points"][0]["jacobian_min"] is None
    assert (tmp_path / "summary.csv").read_text().splitlines()[1] == "a,complete,False,,3.0,1.0,True,,,,0,,1.2,0.5"


def test_dice_columns_join_structures_by_name_and_keep_numbers_for_unnamed_or_twice_named_labels(tmp_path):
    def entry(patient, dice, structures):
        point = {"time": 1.0, "scanned": True, **dict.fromkeys(POINT_METRICS), "dice": dice}
        return {"patient": patient, "status": "complete", "skipped": False, "error": None, "wall_time_s": 1.0,
                "run": None, "structures": structures, "time_points": [point]}
    entries = [entry("a", {"11": 0.9, "12": 0.8}, {"11": "GTV", "12": "Cord"}),
               entry("b", {"3": 0.7, "4": 0.6, "5": 0.5}, {"3": "gtv", "4": "Lung", "5": "lung"}),
               entry("c", {"12": 0.4}, {})]
    write_summary(entries, tmp_path / "cohort.csv", tmp_path)
    with (tmp_path / "summary.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [name for name in table[0] if name.startswith("dice_")] == ["dice_4", "dice_5", "dice_12", "dice_Cord",
                                                                      "dice_GTV"]
    assert [{k: row[k] for k in table[0] if k.startswith("dice_") and row[k]} for row in table] == [
        {"dice_GTV": "0.9", "dice_Cord": "0.8"}, {"dice_GTV": "0.7", "dice_4": "0.6", "dice_5": "0.5"},
        {"dice_12": "0.4"}]


def test_threads_share_the_cores_without_oversubscribing():
    assert cluster_size(None, None, 8) == (8, 1)
    assert cluster_size(2, None, 8) == (2, 4)
    assert cluster_size(None, 2, 8) == (4, 2)
    assert cluster_size(None, 4, 2) == (1, 4)
    assert worker_share(4, {"series": 1}) == 4     # one series at a time gets all the worker's threads
    assert worker_share(4, {}) == 1                # four series at once: one thread each


def test_a_complete_run_of_other_options_is_refused_not_redone(tmp_path):
    """A complete run made by `stnerp train` with the batch's files and options is skipped; the same
    folder under other options is refused, naming the option that differs as a resume does, and left as it is."""
    from STNeRPLib.commands import train_inputs, train_options
    from STNeRPLib.contract import parser
    (patient,) = read_cohort(write_cohort(tmp_path, "patient,role,path,time\na,reference,ct0.nrrd,0\n"
                                          "a,follow-up,ct1.nrrd,1\n"))
    folder = tmp_path / "runs" / "a"
    trained = parser().parse_args(["train", "--reference", str(tmp_path / "ct0.nrrd"), "--follow-up",
                                   str(tmp_path / "ct1.nrrd"), "1", "--iterations", "10", "--output", str(folder)])
    record = {"command": "train", "status": "complete", "parameters": train_options(trained).to_dict(),
              "inputs": train_inputs(trained)}
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(record))

    def batch(*options):
        args = ["batch", "--cohort", "cohort.csv", "--output", str(tmp_path / "runs"), *options]
        return series_args(patient, parser().parse_args(args))
    assert run_state(batch("--iterations", "10")) == "complete"
    with pytest.raises(InputError, match=r"holds a complete run of other inputs or options \(parameter 'preset' "
                                         r"differs \(def_iterations 10 then, 20 now; ref_iterations 10 then, 20 now"):
        run_state(batch("--iterations", "20"))
    assert json.loads((folder / "run.json").read_text()) == json.loads(json.dumps(record))
