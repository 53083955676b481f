"""The STNeRPLib worker as a background process, without Qt.

The worker prints one JSON object per stdout line (``--json-events``); anything else (stderr,
non-JSON stdout) is log. Two reader threads put everything into one queue; the GUI drains it
with :meth:`WorkerProcess.poll` from a timer, so it never blocks. :meth:`WorkerProcess.cancel`
ends the whole process tree (its own session / process group on POSIX, ``taskkill /T`` on
Windows).
"""

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

#: exit codes of the worker contract
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

PRESETS = ("default", "paper")
DEVICES = ("auto", "cpu", "cuda")
PRIORS = ("preset", "refnet", "image")  # "preset": the preset's own prior
PREALIGN = ("none", "affine")


def _num(value):
    """Text of a number for the command line (no locale, no trailing .0 noise)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def lib_parent_directory():
    """Folder that holds the STNeRPLib package (the scripted-modules folder in an installed
    extension, the repository root in a source tree), or None when it cannot be found."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.dirname(os.path.dirname(here)), os.path.dirname(here)):
        if os.path.isfile(os.path.join(candidate, "STNeRPLib", "__init__.py")):
            return candidate
    return None


def worker_environment(extra_paths=()):
    """Environment for the worker: STNeRPLib importable, unbuffered output."""
    env = dict(os.environ)
    paths = [p for p in list(extra_paths) + [lib_parent_directory()] if p]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def train_arguments(reference, reference_time, followups, output, segmentation=None, landmarks=None,
                    ground_truth=(), predict_times=(), preset="default", iterations=None, device="auto",
                    prior="preset", prealign="none"):
    """Arguments after ``python -m STNeRPLib`` for ``train`` (see the worker contract).

    ``followups``: [(path, time)], ``ground_truth``: [(labelmap path, time)]."""
    if not followups:
        raise ValueError("at least one follow-up image is needed")
    if preset not in PRESETS:
        raise ValueError("preset must be one of %s" % (PRESETS,))
    if device not in DEVICES:
        raise ValueError("device must be one of %s" % (DEVICES,))
    if prior not in PRIORS:
        raise ValueError("prior must be one of %s" % (PRIORS,))
    if prealign not in PREALIGN:
        raise ValueError("prealign must be one of %s" % (PREALIGN,))
    args = ["train", "--reference", reference, "--reference-time", _num(reference_time)]
    for path, t in followups:
        args += ["--follow-up", path, _num(t)]
    if segmentation:
        args += ["--segmentation", segmentation]
    if landmarks:
        args += ["--landmarks", landmarks]
    for path, t in ground_truth or ():
        args += ["--ground-truth", path, _num(t)]
    if predict_times:
        args += ["--predict-times"] + [_num(t) for t in predict_times]
    args += ["--output", output, "--preset", preset]
    if iterations:
        args += ["--iterations", str(int(iterations))]
    args += ["--device", device]
    if prior != "preset":
        args += ["--prior", prior]
    args += ["--prealign", prealign, "--json-events"]
    return args


def predict_arguments(run_dir, times, output):
    if not times:
        raise ValueError("at least one time is needed")
    return ["predict", "--run", run_dir, "--times"] + [_num(t) for t in times] + ["--output", output, "--json-events"]


def default_python_executable():
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


def parse_line(source, line):
    """One output line -> an event dict. JSON objects on stdout are worker events; everything
    else becomes {"event": "log", "source": ..., "text": ...}."""
    text = line.rstrip("\r\n")
    if source == "stdout":
        stripped = text.strip()
        if stripped.startswith("{"):
            try:
                event = json.loads(stripped)
            except ValueError:
                event = None
            if isinstance(event, dict) and "event" in event:
                return event
    return {"event": "log", "source": source, "text": text}


class WorkerProcess:
    """One worker process. Events come out of :meth:`poll` in order; the last one is
    ``{"event": "exit", "returncode": n}``."""

    def __init__(self, command, env=None, cwd=None):
        self.command = [str(c) for c in command]
        self.env = env
        self.cwd = cwd
        self.process = None
        self.returncode = None
        self.cancelled = False
        self._queue = queue.Queue()
        self._threads = []
        self._exit_reported = False

    # -- life cycle ------------------------------------------------------------------------
    def start(self):
        kwargs = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      env=self.env, cwd=self.cwd, bufsize=1, universal_newlines=True,
                      encoding="utf-8", errors="replace")
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own process group: cancel reaches children too
        self.process = subprocess.Popen(self.command, **kwargs)
        for source, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            thread = threading.Thread(target=self._read, args=(source, stream), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _read(self, source, stream):
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
    def running(self):
        return self.process is not None and self.process.poll() is None

    def poll(self):
        """Events ready now (never blocks). Adds the exit event once the process has ended and
        both streams are read to the end."""
        events = []
        while True:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if (not self._exit_reported and self.process is not None and self.process.poll() is not None
                and not any(t.is_alive() for t in self._threads)):
            while True:  # what the readers put in after the first drain
                try:
                    events.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self.returncode = self.process.returncode
            self._exit_reported = True
            events.append({"event": "exit", "returncode": self.returncode, "cancelled": self.cancelled})
        return events

    @property
    def finished(self):
        return self._exit_reported

    def wait(self, timeout=None, on_event=None):
        """Block until the process ends (tests, the headless path). Returns every event."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        while not self._exit_reported:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("worker did not finish within %s s" % timeout)
            events = self.poll()
            for e in events:
                if on_event:
                    on_event(e)
            out += events
            if not events:
                time.sleep(0.05)
        return out

    def cancel(self, grace=5.0):
        """Stop the whole process tree: SIGTERM to the process group (the worker writes its
        run folder as interrupted), SIGKILL after ``grace`` seconds; taskkill /T on Windows."""
        if self.process is None or self.process.poll() is not None:
            return
        self.cancelled = True
        kill_process_tree(self.process, grace)


def kill_process_tree(process, grace=5.0):
    if os.name == "nt":
        subprocess.run(["taskkill", "/PID", str(process.pid), "/T"], capture_output=True)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            subprocess.run(["taskkill", "/F", "/PID", str(process.pid), "/T"], capture_output=True)
            process.wait()
        return
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:  # whatever is left of the group (children that ignored SIGTERM)
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()
