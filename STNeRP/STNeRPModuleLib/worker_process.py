"""The STNeRPLib worker as a background process, without Qt.

The worker prints one JSON object per stdout line (``--json-events``); anything else (stderr,
non-JSON stdout) is log. Two reader threads put everything into one queue; the panel drains it
with :meth:`WorkerProcess.poll` from a timer, so it never blocks. :meth:`WorkerProcess.cancel`
returns at once: it closes the worker's standard input, and the worker, started with the
contract's stdin-cancel flag, stops as on Ctrl-C and marks its run interrupted (one way on every
platform: on Windows a windowless process refuses a polite taskkill, and two interruptions, a
signal and the pipe, could cut the worker's own clean-up short). :meth:`poll` kills the whole
process tree once the worker has ended (what it started) or when it outlives a grace period.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, TextIO, cast

#: seconds a cancelled worker has to write its run folder as interrupted before it is killed
CANCEL_GRACE = 10.0


def lib_parent_directory() -> str | None:
    """Folder that holds the STNeRPLib package (the scripted-modules folder in an installed
    extension, the repository root in a source tree), or None when it cannot be found."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.dirname(os.path.dirname(here)), os.path.dirname(here)):
        if os.path.isfile(os.path.join(candidate, "STNeRPLib", "__init__.py")):
            return candidate
    return None


def worker_environment() -> dict[str, str]:
    """Environment for the worker: STNeRPLib importable, unbuffered UTF-8 output (the panel
    decodes every line as UTF-8, whatever the console code page on Windows)."""
    env = dict(os.environ)
    paths = [p for p in (lib_parent_directory(), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONUTF8"] = "1"
    return env


def default_python_executable() -> str:
    """PythonSlicer inside the Slicer application (it has Slicer's packages and torch from the
    PyTorch extension); the current interpreter elsewhere (tests, headless use)."""
    exe_dir = os.path.dirname(sys.executable)
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        for folder in (exe_dir, os.path.join(exe_dir, "..", "bin")):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return os.path.normpath(path)
        found = shutil.which(name)
        if found:
            return found
    return sys.executable


def parse_line(source: str, line: str) -> dict:
    """One output line -> an event dict. JSON objects on stdout are worker events; everything
    else becomes {"event": "log", "source": ..., "text": ...}."""
    text = line.rstrip("\r\n")
    if source == "stdout" and text.strip().startswith("{"):
        try:
            event = json.loads(text)
        except ValueError:
            event = None
        if isinstance(event, dict) and "event" in event:
            return event
    return {"event": "log", "source": source, "text": text}


class WorkerProcess:
    """One worker process. Events come out of :meth:`poll` in order; the last one is
    ``{"event": "exit", "returncode": n, "cancelled": bool}``."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None, grace: float = CANCEL_GRACE) -> None:
        self.command = [str(c) for c in command]
        self.env = env
        self.grace = grace
        self.process: subprocess.Popen | None = None
        self.cancelled = False
        self._kill_at: float | None = None
        self._queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._exit_reported = False

    def start(self) -> WorkerProcess:
        """Start the worker in its own process group, its standard input a pipe (closed to cancel), and a
        reader thread for each output stream; returns self."""
        kwargs: dict[str, Any] = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=self.env, bufsize=1, text=True, encoding="utf-8", errors="replace")
        if os.name == "nt":
            kwargs["creationflags"] = (subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]  # Windows only
                                       | getattr(subprocess, "CREATE_NO_WINDOW", 0))
        else:
            kwargs["start_new_session"] = True  # own process group: cancel reaches children too
        self.process = subprocess.Popen(self.command, **kwargs)
        for source, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            thread = threading.Thread(target=self._read, args=(source, stream), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _read(self, source: str, stream: TextIO) -> None:
        try:
            for line in iter(stream.readline, ""):
                self._queue.put(parse_line(source, line))
        except (ValueError, OSError):
            pass
        finally:
            try:
                stream.close()
            except OSError:
                pass

    @property
    def running(self) -> bool:
        """Whether the worker process has been started and has not ended yet."""
        return self.process is not None and self.process.poll() is None

    @property
    def finished(self) -> bool:
        """Whether poll has reported the exit event (the process ended, its output read to the end)."""
        return self._exit_reported

    def poll(self) -> list[dict]:
        """Events ready now (never blocks). Kills the process tree when a cancelled worker
        outlives its grace period; adds the exit event once the process has ended and both
        streams are read to the end."""
        if self.cancelled and (not self.running or time.monotonic() >= cast(float, self._kill_at)):
            kill_process_tree(  # the worker, or what it left running after it stopped
                cast(subprocess.Popen, self.process))
        events = self._drain()
        if (not self._exit_reported and self.process is not None and self.process.poll() is not None
                and not any(t.is_alive() for t in self._threads)):
            events += self._drain()  # what the readers put in after the first drain
            self._exit_reported = True
            events.append({"event": "exit", "returncode": self.process.returncode, "cancelled": self.cancelled})
        return events

    def _drain(self) -> list[dict]:
        events = []
        while True:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                return events

    def wait(self, timeout: float | None = None) -> list[dict]:
        """Block until the process ends (tests, the headless path). Returns every event."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        while not self._exit_reported:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"worker did not finish within {timeout} s")
            events = self.poll()
            out += events
            if not events:
                time.sleep(0.05)
        return out

    def cancel(self) -> None:
        """Ask the worker to stop and return at once; :meth:`poll` finishes the job."""
        if not self.running or self.cancelled:
            return
        self.cancelled = True
        self._kill_at = time.monotonic() + self.grace
        process = cast(subprocess.Popen, self.process)
        try:
            cast(TextIO, process.stdin).close()
        except OSError:
            pass


def kill_process_tree(process: subprocess.Popen) -> None:
    """Kill a process and every process it started: its process group on POSIX (started as a
    session leader, so the group's ID is its PID, valid while any member lives), /T on Windows."""
    if os.name == "nt":
        if process.poll() is None:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True)
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
