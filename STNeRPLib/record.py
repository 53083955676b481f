"""The record of a run (run.json): inputs, parameters, versions, outputs and status.

Status is "running" while a run works, then "complete", "interrupted" or "failed"; only a
complete run's outputs are whole. The file is replaced atomically on every change.
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from . import threads
from . import __version__
from . import contract


class RunRecord:
    """run.json in a run folder, kept up to date as the run goes on."""

    def __init__(self, folder: Path, command: str, inputs: dict, parameters: dict):
        self.folder = folder
        self.data = {
            "status": contract.STATUS_RUNNING, "error": None, "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished": None,
            "inputs": inputs, "parameters": parameters, "versions": versions(),
            "reference_time": inputs.get("reference_time"),
            "threads": threads.record(),
            "model": None, "metrics_table": None, "time_points": [],
        }
        folder.mkdir(parents=True, exist_ok=True)
        self._write()

    def set(self, **values) -> None:
        self.data.update(values)
        self._write()

    def add_time_point(self, entry: dict) -> None:
        self.data["time_points"].append(entry)
        self._write()

    def finish(self, status: str, error: str | None = None) -> None:
        self.set(status=status, error=error, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def _write(self) -> None:
        contract.write_run(self.folder, self.data)


def versions() -> dict:
    return {"stnerp": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "SimpleITK": sitk.Version_VersionString(), "numpy": np.__version__,
            "platform": platform.platform()}
