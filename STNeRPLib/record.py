"""The record of a run (run.json): inputs, parameters, versions, outputs and status.

Status is "running" while a run works, then "complete", "interrupted" or "failed"; only a
complete run's outputs are whole. A "running" record whose process (`pid`, `process_start`) is gone
was killed (SIGKILL, power cut, out of memory). The file is replaced atomically on every change.
"""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__, contract, threads
from .errors import InputError


class RunRecord:
    """run.json in a run folder, kept up to date as the run goes on."""

    def __init__(self, folder: Path, command: str, inputs: dict, parameters: dict, data: dict | None = None) -> None:
        self.folder = folder
        self.data = data or {
            "status": contract.STATUS_RUNNING, "error": None, "command": command,
            "started": _now(), "finished": None, "pid": os.getpid(),
            "process_start": contract.process_start(os.getpid()),
            "inputs": inputs, "parameters": parameters, "versions": versions(),
            "reference_time": inputs.get("reference_time"),
            "threads": threads.record(),
            "model": None, "metrics_table": None, "time_points": [],
        }
        folder.mkdir(parents=True, exist_ok=True)
        self._write()

    @classmethod
    def reopen(cls, folder: Path) -> "RunRecord":
        """The record of an unfinished run, running again in this process (its outputs kept)."""
        data = load_record(folder)
        data.update(status=contract.STATUS_RUNNING, error=None, finished=None, pid=os.getpid(),
                    process_start=contract.process_start(os.getpid()))
        data.setdefault("resumed", []).append(_now())
        return cls(folder, data["command"], data["inputs"], data["parameters"], data)

    def set(self, **values: object) -> None:
        """Set these keys of the record and write run.json."""
        self.data.update(values)
        self._write()

    def add_time_point(self, entry: dict) -> None:
        """Append the entry of a time point whose outputs are written (its files, metrics) and write run.json."""
        self.data["time_points"].append(entry)
        self._write()

    def finish(self, status: str, error: str | None = None) -> None:
        """End the run: its status (complete, failed or interrupted), error and finish time, written to run.json."""
        self.set(status=status, error=error, finished=_now())

    def _write(self) -> None:
        contract.write_run(self.folder, self.data)


def load_record(run: Path) -> dict:
    """The run.json of a run folder; InputError when it is missing or damaged."""
    path = Path(run) / contract.RUN_FILE
    if not path.is_file():
        raise InputError(f"{run} holds no {contract.RUN_FILE}: give the output folder of a stnerp run")
    try:
        data = contract.read_run(run)
    except (OSError, ValueError):    # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InputError(f"{path} is damaged (not valid JSON): the run cannot be read; train it again") from None
    if "status" not in data:
        raise InputError(f"{path} is not a stnerp run record: give the output folder of a stnerp run")
    return data


def require_complete(run: Path, data: dict) -> None:
    """InputError unless the run is complete, saying how to finish it."""
    status = data.get("status")
    if status == contract.STATUS_COMPLETE:
        return
    if status == contract.STATUS_RUNNING and not contract.killed(data):
        raise InputError(f"run {run} is still running (process {data.get('pid')}): wait until it is complete")
    if status == contract.STATUS_FAILED and data.get("error"):
        raise InputError(f"run {run} failed: {data['error']}")          # the error says what to do
    how = "its process is gone" if status == contract.STATUS_RUNNING else status
    if data.get("command") == "train":
        raise InputError(f"run {run} did not finish ({how}): continue it with the same stnerp train "
                         "arguments plus --resume")
    raise InputError(f"run {run} did not finish ({how}): run it again into a new folder")


def versions() -> dict:
    """The versions run.json records: STNeRP and its git commit, Python, torch, SimpleITK, numpy and the platform."""
    return {"stnerp": __version__, "git_commit": git_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "SimpleITK": sitk.Version_VersionString(), "numpy": np.__version__,
            "platform": platform.platform()}


def git_commit() -> str | None:
    """The commit of the STNeRP checkout this code runs from; None when it is not a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        result = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.split()
    if result.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root:
        return None
    return lines[1]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
