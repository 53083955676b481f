"""Cohorts: every patient's series trained as one Dask task, one run folder per patient, summaries.

The manifest (cohort.csv) is a long table written by hand, one file per row:

    patient,role,path,time
    p01,reference,p01/ct_phase0.nrrd,0
    p01,follow-up,p01/ct_phase5.nrrd,5
    p01,segmentation,p01/tumour.nrrd,

role is reference | follow-up | segmentation | landmarks | ground-truth; time (phase or days) is
given for reference, follow-up and ground-truth rows and left empty for the others; relative paths
are resolved against the manifest's folder; blank lines and lines starting with # are skipped.
Each series runs the code of `stnerp train` (commands.train_command) in a Dask worker, into
DIR/<patient>/ with its own run.json; a rerun skips complete runs and starts unfinished ones over.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from distributed import WorkerPlugin

from .errors import InputError
from .io import csv_delimiter, decimal_point
from . import contract, threads
from .contract import STATUS_COMPLETE, finite_or_none, json_line, read_run, write_json
from .progress import Reporter
from .commands import difference_text, export_dicom, first_difference, timed, train_command, train_inputs, train_options
from .report import structure_names

if TYPE_CHECKING:
    from distributed import Worker

COLUMNS = ("patient", "role", "path", "time")
ROLES = ("reference", "follow-up", "segmentation", "landmarks", "ground-truth")
TIMED_ROLES = ("reference", "follow-up", "ground-truth")
# A worker declaring this resource (1) runs one series at a time, giving it all its threads.
SERIES_RESOURCE = "series"
EVENT_TOPIC = "stnerp-progress"
# Exceptions escaping a task (not the series' own failures, which are in its summary entry) are
# retried; a task whose worker dies is rescheduled by the scheduler (distributed.scheduler.allowed-failures).
RETRIES = 2
POINT_METRICS = ("tre_mean", "tre_std", "tre_max", "folded_voxels", "jacobian_min", "jacobian_max")
_PATIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class Patient:
    """One patient's rows of the manifest: (role, absolute path, time text), in file order."""

    def __init__(self, patient_id: str) -> None:
        self.id = patient_id
        self.rows: list[tuple[str, str, str]] = []


def read_cohort(path: Path) -> list[Patient]:
    """The patients of a manifest, in file order; InputError if the manifest itself is unusable."""
    if not path.is_file():
        raise InputError(f"cohort file not found: {path}: check the path")
    try:
        text = path.read_text(encoding="utf-8-sig")       # -sig: a byte order mark (Excel) is not a header
    except UnicodeDecodeError:
        raise InputError(f"cohort file {path} is not UTF-8 text: save it as CSV UTF-8") from None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1)
             if line.strip() and not line.lstrip().startswith("#")]
    delimiter = csv_delimiter(lines[0][1]) if lines else ","
    header = [name.strip().lower() for name in next(csv.reader([lines[0][1]], delimiter=delimiter))] if lines else []
    missing = [column for column in COLUMNS if column not in header]
    if missing:
        raise InputError(f"cohort file {path} lacks the columns {', '.join(missing)}: its first line "
                         f"must be {','.join(COLUMNS)}")
    patients: dict[str, Patient] = {}
    for number, line in lines[1:]:
        row = dict(zip(header, (value.strip() for value in next(csv.reader([line], delimiter=delimiter)))))
        patient_id = row.get("patient", "")
        if not _PATIENT_ID.fullmatch(patient_id):
            raise InputError(f"cohort file {path}, line {number}: patient '{patient_id}' cannot name a "
                             "folder: use letters, digits, '.', '_' and '-' (not first)")
        file = row.get("path", "")
        absolute = os.path.abspath(path.parent / Path(file).expanduser()) if file else ""
        patients.setdefault(patient_id, Patient(patient_id)).rows.append(
            (row.get("role", "").lower(), absolute, decimal_point(row.get("time", ""), delimiter)))
    if not patients:
        raise InputError(f"cohort file {path} lists no series: add rows {','.join(COLUMNS)}")
    return list(patients.values())


def series_args(patient: Patient, batch: argparse.Namespace) -> argparse.Namespace:
    """The train arguments of one patient: the batch's fit options, the patient's files, and the
    run folder DIR/<patient>. InputError (one line) if the patient's rows are wrong."""
    found: dict[str, list[list[str]]] = {role: [] for role in ROLES}
    for role, path, time_text in patient.rows:
        if role not in ROLES:
            raise InputError(f"role '{role}' is not one of {', '.join(ROLES)}: fix that row of the cohort file")
        if not path:
            raise InputError(f"a {role} row has no path: give the file's path")
        if (role in TIMED_ROLES) != bool(time_text):
            raise InputError(f"the {role} {path} " + ("has no time: give its time (phase or days)"
                             if role in TIMED_ROLES else "has a time: leave the time column empty"))
        found[role].append([path, time_text])
    for role, most in (("reference", 1), ("segmentation", 1), ("landmarks", 1)):
        if len(found[role]) > most or (role == "reference" and not found[role]):
            raise InputError(f"{len(found[role])} {role} rows: give exactly one reference row and at "
                             "most one segmentation and one landmarks row per patient")
    (reference, reference_time), = timed(found["reference"])
    series = argparse.Namespace(**vars(batch))
    series.reference, series.reference_time = reference, reference_time
    series.follow_up, series.ground_truth = found["follow-up"], found["ground-truth"]
    series.segmentation = found["segmentation"][0][0] if found["segmentation"] else None
    series.landmarks = found["landmarks"][0][0] if found["landmarks"] else None
    series.output = batch.output / patient.id
    series.dicom_out = batch.dicom_out / patient.id if batch.dicom_out else None
    return series


def lacks_dicom(series: argparse.Namespace) -> bool:
    """Whether --dicom-out asks for the series' DICOM and its folder holds nothing yet (a run complete before
    is exported, not trained again)."""
    folder = series.dicom_out
    return folder is not None and not (folder.is_dir() and any(folder.iterdir()))


def run_state(series: argparse.Namespace) -> str:
    """'new' (no run yet), 'complete' (a complete run of these inputs and options) or 'unfinished'
    (this tool's interrupted, failed or stale run). InputError if the folder holds anything else."""
    folder = series.output
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return "new"
    record = _read_record(folder)
    if record is None or record.get("command") != "train" or not contract.holds_only_a_run(folder):
        raise InputError(f"{folder} holds files that are not a stnerp train run: move them away or "
                         "choose another --output")
    if record.get("status") != STATUS_COMPLETE:
        return "unfinished"
    wanted = {"inputs": train_inputs(series), "parameters": train_options(series).to_dict()}
    difference = first_difference(record, wanted)
    if difference is not None:
        raise InputError(f"{folder} holds a complete run of other inputs or options ({difference_text(*difference)}): "
                         "move it away to train this series again, or choose another --output")
    return "complete"


def _read_record(folder: Path) -> dict | None:
    try:
        return read_run(folder)
    except (OSError, ValueError):
        return None


def continue_or_start_over(series: argparse.Namespace) -> None:
    """An unfinished run of this tool (interrupted, failed, or killed with its worker) continues
    from its checkpoint (train --resume), in either scheme (run_state has checked that the folder
    holds only this tool's run)."""
    series.resume = True


def run_series(patient: str, series: argparse.Namespace) -> dict:
    """Dask task: train one patient's series into series.output exactly as `stnerp train` does,
    with this worker's share of threads (threads.use, as --threads would). Returns its summary
    entry; the series' own failures are in the entry, never raised."""
    from distributed import get_worker
    worker = get_worker()
    threads.use(worker_share(worker.state.nthreads, worker.state.total_resources))
    started = time.monotonic()
    try:
        state = run_state(series)
        if state == "unfinished":
            continue_or_start_over(series)
    except InputError as error:
        return failed_entry(patient, str(error))
    events = PatientEvents(patient, lambda event: worker.log_event(EVENT_TOPIC, event))
    if state == "complete":                       # submitted only for its DICOM (lacks_dicom)
        export_dicom(series.output, series.dicom_out, series.label_names, events)
        return summary_entry(patient, series.output, error=events.last_error, skipped=True)
    train_command(series, events)
    return summary_entry(patient, series.output, time.monotonic() - started, events.last_error)


def worker_share(nthreads: int, resources: dict) -> int:
    """Threads for one series: all the worker's when it declares series=1, else one per task slot."""
    return max(1, nthreads // int(resources.get(SERIES_RESOURCE, nthreads)))


class PatientEvents(Reporter):
    """The JSON events of train, each with a "patient" key, handed to `send` (stdout, or the
    Dask client through the scheduler); the last error is kept for the summary."""

    last_error: str | None

    def __init__(self, patient: str, send: Callable[[dict], None]) -> None:
        super().__init__(json_events=True)
        self.patient, self.send, self.last_error = patient, send, None

    def error(self, message: str) -> None:
        """Keep `message` as the patient's last error and send it as an error event with the patient's key (not printed
        to stderr)."""
        self.last_error = message
        self._emit(event="error", message=message)

    def _emit(self, **event: object) -> None:
        self.send({**event, "patient": self.patient})


def summary_entry(patient: str, folder: Path, wall_time: float | None = None,
                  error: str | None = None, skipped: bool = False) -> dict:
    """A patient's line of the summary, read from its run.json (per time point TRE, Dice, folded
    voxels, Jacobian range); its error the record's, else `error` (the task's: a DICOM export that failed
    after the run completed). A skipped run's wall time is the one its record states."""
    record = _read_record(folder)
    if record is None:
        return failed_entry(patient, error or f"no run record was written in {folder}")
    points = [{"time": entry["time"], "scanned": entry["scanned"],
               **{name: entry["metrics"].get(name) for name in POINT_METRICS},
               "dice": entry["metrics"].get("dice", {})} for entry in record.get("time_points", [])]
    if skipped:
        wall_time = _recorded_seconds(record)
    return {"patient": patient, "status": record.get("status"), "skipped": skipped,
            "error": record.get("error") or error, "wall_time_s": None if wall_time is None else round(wall_time, 1),
            "run": str(folder), "structures": _scored_names(record, folder, points), "time_points": points}


def _scored_names(record: dict, folder: Path, points: list[dict]) -> dict[str, str]:
    """Label -> name of the structures Dice scored, where the run names them (its --label-names, an RT
    Structure Set's ROI Names, a .seg.nrrd's segment names): each plan numbers its structures its own way."""
    try:
        names = structure_names(record, folder, None)
    except InputError:
        return {}
    scored = {label for point in points for label in point["dice"]}
    return {label: names[int(label)].strip() for label in sorted(scored, key=int) if int(label) in names}


def failed_entry(patient: str, error: str, status: str = "failed") -> dict:
    """A patient's summary entry without a run's outputs: its `status` (failed, or interrupted) and the error saying
    why."""
    return {"patient": patient, "status": status, "skipped": False, "error": error,
            "wall_time_s": None, "run": None, "time_points": []}


def _recorded_seconds(record: dict) -> float | None:
    try:
        started, finished = (datetime.strptime(record[key], "%Y-%m-%dT%H:%M:%S%z") for key in ("started", "finished"))
    except (KeyError, TypeError, ValueError):
        return None
    return (finished - started).total_seconds()


def write_summary(entries: list[dict], cohort: Path, folder: Path) -> None:
    """summary.json (strict JSON: a non-finite number is null) and summary.csv (a row per patient
    and time point; a patient without outputs has one row with empty time columns)."""
    write_json({"cohort": str(cohort), "patients": entries}, folder / "summary.json")
    keys = [_dice_keys(entry) for entry in entries]
    headers: dict[str, str] = {}                    # a column's key -> its spelling (the first patient's)
    for key in keys:
        for spelling in key.values():
            headers.setdefault(spelling.casefold(), spelling)
    order = sorted(headers, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    columns = ["patient", "status", "skipped", "error", "wall_time_s", "time", "scanned", *POINT_METRICS,
               *(f"dice_{headers[k]}" for k in order)]
    with (folder / "summary.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for entry, key in zip(finite_or_none(entries), keys):
            head = [entry[name] for name in columns[:5]]
            for point in entry["time_points"] or [None]:
                dice = {} if point is None else {key[label].casefold(): v for label, v in point["dice"].items()}
                tail = [] if point is None else [point["time"], point["scanned"],
                                                 *(point[name] for name in POINT_METRICS),
                                                 *(dice.get(k) for k in order)]
                writer.writerow(["" if value is None else value for value in head + tail])


def _dice_keys(entry: dict) -> dict[str, str]:
    """A patient's Dice column per label: the structure's name (matched across patients case aside), its
    number where the run names it not or gives two labels one name."""
    names = entry.get("structures", {})
    counts = Counter(name.casefold() for name in names.values())
    return {label: names[label] if label in names and counts[names[label].casefold()] == 1 else label
            for point in entry["time_points"] for label in point["dice"]}


class Progress:
    """Progress over patients: a bar and a line per finished patient on stderr; with json_events,
    each patient's events on stdout (its train progress, then done or error), keyed by patient."""

    def __init__(self, total: int, json_events: bool) -> None:
        self.total, self.json_events, self.count = total, json_events, 0
        self.bar = Reporter(interval=0.0)
        self.finished: set[str] = set()
        self.lock = threading.Lock()

    def forward(self, event: tuple[float, dict]) -> None:
        """Handler of the workers' events (timestamp, event): their train progress, until the patient ends."""
        message = {key: value for key, value in event[1].items() if key != "worker"}  # Dask adds "worker"
        with self.lock:
            if message.get("event") == "progress" and message.get("patient") not in self.finished:
                _print_json(message)

    def patient_done(self, entry: dict) -> None:
        """Count a finished patient (its summary entry): its line and the bar on stderr and, with json_events, its done
        or error event; its later train progress is dropped."""
        with self.lock:
            self.finished.add(entry["patient"])
            self.count += 1
            if self.json_events:
                events = PatientEvents(entry["patient"], _print_json)
                if entry["status"] == "complete":
                    events.done("complete", entry["run"])
                else:
                    events.error(entry["error"])
            note = " (complete before, skipped)" if entry["skipped"] else ""
            over_bar = "\r\033[K" if sys.stderr.isatty() else ""   # a terminal's bar line has no newline yet
            self.bar.message(f"{over_bar}{entry['patient']}: {entry['status']}{note}"
                             + (f": {entry['error']}" if entry["error"] else ""))
            self.bar.progress("patients", self.count, self.total)


def _print_json(event: dict) -> None:
    print(json_line(event), flush=True)


def run_batch(args: argparse.Namespace, reporter: Reporter) -> int:
    """The batch command. Exit code 0 when every series is complete, 1 when any failed or its DICOM
    export did (the summaries say which and why), 2 when the manifest, the options or the cluster are unusable,
    130 when interrupted (the series not ended are 'interrupted' in the summaries)."""
    try:
        _check_sizes(args)
        patients = read_cohort(args.cohort)
        args.output.mkdir(parents=True, exist_ok=True)
    except (InputError, OSError) as error:
        reporter.error(str(error))
        return 2
    progress = Progress(len(patients), args.json_events)
    entries, pending = {}, {}
    for patient in patients:
        try:
            series = series_args(patient, args)
            if run_state(series) == "complete" and not lacks_dicom(series):
                entries[patient.id] = summary_entry(patient.id, series.output, skipped=True)
            else:
                pending[patient.id] = series
        except InputError as error:
            entries[patient.id] = failed_entry(patient.id, str(error))
        if patient.id in entries:
            progress.patient_done(entries[patient.id])
    status = 0
    if pending:
        try:
            _run_on_dask(args, pending, progress, entries)
        except InputError as error:
            reporter.error(str(error))
            status = 2
        except KeyboardInterrupt:
            reporter.error("interrupted: rerun the same command to finish the cohort")
            status = 130
    unfinished = "the batch stopped before this series ended: rerun the same command"
    ended = contract.STATUS_INTERRUPTED if status == contract.EXIT_INTERRUPTED else contract.STATUS_FAILED
    ordered = [entries.get(p.id) or failed_entry(p.id, unfinished, ended) for p in patients]
    write_summary(ordered, args.cohort, args.output)
    failed = sum(entry["status"] != "complete" or bool(entry["error"]) for entry in ordered)
    reporter.done("failed" if failed else "complete", str(args.output))
    return status or (1 if failed else 0)


def _check_sizes(args: argparse.Namespace) -> None:
    for flag, value in (("--workers", args.workers), ("--threads-per-worker", args.threads_per_worker)):
        if value is not None and value < 1:
            raise InputError(f"{flag} is {value}: give at least 1")


def _run_on_dask(args: argparse.Namespace, pending: dict[str, argparse.Namespace], progress: Progress,
                 entries: dict[str, dict]) -> None:
    """Run the pending series as tasks, adding each one's summary entry to `entries` as it ends."""
    from distributed import as_completed
    with _client(args) as client:
        if args.json_events:
            client.subscribe_topic(EVENT_TOPIC, progress.forward)
        workers = client.scheduler_info()["workers"].values()
        resources = {SERIES_RESOURCE: 1} if any(SERIES_RESOURCE in w.get("resources", {}) for w in workers) else None
        batch = uuid.uuid4().hex[:8]
        futures = {client.submit(run_series, patient, series, key=f"stnerp-{patient}-{batch}",
                                 resources=resources, retries=RETRIES): patient
                   for patient, series in pending.items()}
        for future in as_completed(futures):
            patient = futures[future]
            try:
                entry = future.result()
            except Exception as error:  # e.g. KilledWorker: its workers died too often
                entry = failed_entry(patient, f"the task failed on the cluster: {type(error).__name__}: {error}")
            entries[patient] = entry
            progress.patient_done(entry)


@contextmanager
def _client(args: argparse.Namespace) -> Iterator:
    """A client of the scheduler at --scheduler, or of a local cluster of processes in which each
    worker runs one series at a time with --threads-per-worker threads."""
    from distributed import Client, LocalCluster
    if args.scheduler:
        try:
            client = Client(args.scheduler, timeout=30)
        except (OSError, TimeoutError) as error:
            raise InputError(f"cannot reach the Dask scheduler at {args.scheduler} ({error}): check the "
                             "address, or drop --scheduler to run on this machine") from None
        with client:
            yield client
        return
    workers, threads = cluster_size(args.workers, args.threads_per_worker, available_cores())
    gpus = _gpu_count(args.device)
    if gpus > 1 and args.workers is None:
        workers = gpus
    print(f"local cluster: {workers} worker(s) x {threads} thread(s)" + (f", {gpus} GPUs" if gpus > 1 else ""),
          file=sys.stderr, flush=True)
    # dashboard_address ":0": the scheduler's HTTP server takes a free port, so batches and other
    # Dask users on one machine do not collide on 8787.
    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                      resources={SERIES_RESOURCE: 1}, dashboard_address=":0") as cluster, Client(cluster) as client:
        if gpus > 1:
            client.register_plugin(OneGPUPerWorker(gpus))
        yield client


def cluster_size(workers: int | None, threads: int | None, cores: int) -> tuple[int, int]:
    """(workers, threads per worker) of a local cluster: as given, else filling the cores
    (one thread per worker unless --workers leaves more cores to each)."""
    if threads is None:
        threads = max(1, cores // workers) if workers else 1
    return (workers or max(1, cores // threads)), threads


def available_cores() -> int:
    """The CPUs this process may use: its affinity where the system has one, else every CPU."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _gpu_count(device: str) -> int:
    if device == "cpu":
        return 0
    import torch
    return torch.cuda.device_count()


class OneGPUPerWorker(WorkerPlugin):
    """Gives local worker i the GPU i mod count (CUDA_VISIBLE_DEVICES), set as the worker starts
    (and restarts), before any series touches CUDA. Untested here: this machine has no GPU."""

    def __init__(self, count: int) -> None:
        self.count = count

    def setup(self, worker: Worker) -> None:
        """Called by Dask as a worker starts (or restarts): restrict it to GPU (worker name) mod count with
        CUDA_VISIBLE_DEVICES."""
        os.environ["CUDA_VISIBLE_DEVICES"] = str(int(worker.name) % self.count)
