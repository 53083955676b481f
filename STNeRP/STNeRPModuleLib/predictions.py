"""The time slider's predictions, without Qt: the latest time asked for always ends up shown.

Requests that come faster than `quiet` seconds apart (a slider drag, keystrokes in its spin box)
coalesce into the last one; a request during a running prediction waits for it and then runs.
Each time has its own folder under the run (predictions/t_<time>), so a time asked for again is
imported from disk without the worker, and a run's predictions are reused, not piled up. Only the
prediction on show is in the scene; a scene close forgets it (its nodes went with the scene).
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, cast

import slicer
from STNeRPLib import contract

from . import run_import
from .core_logic import PREDICTIONS_FOLDER, Job, STNeRPCoreLogic, prediction_import_options


def prediction_folder(run_dir: str, t: float) -> str:
    """Folder of the prediction of a run at time t."""
    return os.path.join(run_dir, PREDICTIONS_FOLDER, contract.time_point_folder(t))


@dataclass(eq=False)
class TimeSliderPredictions:
    """Predictions of one trained run for the time slider. Call :meth:`poll` regularly.

    segment_map: the run's labels -> segments (scene_files.segment_map_for); quiet: seconds without a new request
    before one is started; clock: seconds, monotonic (tests pass their own)."""

    logic: STNeRPCoreLogic
    run_dir: str
    segment_map: list[dict] | None = None
    reference_volume: slicer.vtkMRMLScalarVolumeNode | None = None
    quiet: float = 0.3
    clock: Callable[[], float] = time.monotonic
    job: Job | None = field(default=None, init=False)
    _job_time: float | None = field(default=None, init=False)   # the time self.job predicts
    shown: run_import.ImportedRun | None = field(default=None, init=False)
    shown_time: float | None = field(default=None, init=False)
    message: str | None = field(default=None, init=False)       # why the last prediction failed
    _wanted: float | None = field(default=None, init=False)
    _asked_at: float = field(default=0.0, init=False)
    _failed_time: float | None = field(default=None, init=False)
    _close_observer: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        scene = self.logic.scene
        self._close_observer = scene.AddObserver(scene.StartCloseEvent, lambda caller, event: self.forget())

    @property
    def busy(self) -> bool:
        """Whether a prediction is running in the worker."""
        return self.job is not None

    def request(self, t: float) -> None:
        """Show time t as soon as possible (the newest request wins)."""
        self._wanted = float(t)
        self._asked_at = self.clock()

    def poll(self) -> list[dict]:
        """Advance: drain the running prediction, show it when done, start the next one."""
        events = []
        if self.job is not None:
            events = self.job.poll()
            if self.job.finished:
                self._finished(self.job)
        if self.job is None and self._due():
            self._start(cast(float, self._wanted))
        return events

    def forget(self) -> None:
        """Stop a running prediction and forget what is shown, without touching the scene (it is
        closing)."""
        if self.job is not None:
            self.job.cancel()
        self.job = None
        self.shown, self.shown_time, self._wanted = None, None, None

    def close(self) -> None:
        """Stop observing the scene (the slider now serves another run)."""
        self.logic.scene.RemoveObserver(self._close_observer)
        if self.job is not None:
            self.job.cancel()

    def _due(self) -> bool:
        t = self._wanted
        return (t is not None and t != self.shown_time and t != self._failed_time
                and self.clock() - self._asked_at >= self.quiet)

    def _start(self, t: float) -> None:
        folder = prediction_folder(self.run_dir, t)
        if _complete(folder):
            options = prediction_import_options([t], self.reference_volume)
            self._show(t, self.logic.import_results(folder, segment_map=self.segment_map, **options))
            return
        if os.path.isdir(folder):   # an interrupted or failed prediction of ours: done again
            shutil.rmtree(folder)
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        self.job = self.logic.start_prediction(self.run_dir, [t], folder, segment_map=self.segment_map,
                                               reference_volume=self.reference_volume)
        self._job_time = t

    def _finished(self, job: Job) -> None:
        self.job = None
        if job.state == "complete":
            self._show(cast(float, self._job_time), cast(run_import.ImportedRun, job.result))
            self.message, self._failed_time = None, None
        elif job.state == "failed":
            self.message, self._failed_time = job.message, self._job_time

    def _show(self, t: float, result: run_import.ImportedRun) -> None:
        run_import.remove_imported(self.logic.scene, self.shown)
        self.shown, self.shown_time = result, t


def _complete(folder: str) -> bool:
    try:
        return contract.is_complete(contract.read_run(folder))
    except (OSError, ValueError):
        return False
