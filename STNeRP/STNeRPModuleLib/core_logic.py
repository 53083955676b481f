"""One STNeRP job (training or prediction) from the scene's point of view, without Qt.

    logic = STNeRPCoreLogic(scene, segmentations_logic)
    job = logic.start_training(inputs, settings)      # exports inputs, starts the worker
    while not job.finished: job.poll()                # the widget does this from a QTimer
    job.state -> "complete" | "failed" | "cancelled";  job.result -> scene_io.ImportedRun

Inputs are written to a temporary folder (removed when the job ends, whatever the outcome);
results are imported only when the worker reports a complete run, and an import that fails
half-way removes what it added, so a failed or cancelled job leaves the scene as it was.
"""

import json
import logging
import os
import shutil
import sys
import tempfile
import time

from . import scene_io
from . import worker_process

logger = logging.getLogger(__name__)

#: progress bar share of each worker stage (start, end); Def-Net takes Ref-Net's share too when
#: the run has no Ref-Net stage (the image prior, the default preset's)
STAGE_RANGES = {"load": (0.0, 0.05), "refnet": (0.05, 0.35), "defnet": (0.35, 0.9), "outputs": (0.9, 1.0)}

SEGMENT_MAP_FILE = "slicer_segment_map.json"


class JobInputs:
    """What the user picked in the panel."""

    def __init__(self, reference_volume, followups, reference_time=0.0, segmentation_node=None,
                 segment_ids=None, reference_landmarks=None, followup_landmarks=None, ground_truth=None,
                 predict_times=None):
        self.reference_volume = reference_volume
        #: [(time, volume node)] (scene nodes, or data nodes of a sequence)
        self.followups = [(float(t), n) for t, n in followups]
        self.reference_time = float(reference_time)
        self.segmentation_node = segmentation_node
        self.segment_ids = list(segment_ids or [])
        self.reference_landmarks = reference_landmarks
        #: [(time, markups node)]
        self.followup_landmarks = [(float(t), n) for t, n in (followup_landmarks or []) if n is not None]
        #: [(time, segmentation node)] manual contours at follow-up times, for Dice
        self.ground_truth = [(float(t), n) for t, n in (ground_truth or []) if n is not None]
        self.predict_times = [float(t) for t in (predict_times or [])]

    def validate(self):
        if self.reference_volume is None:
            raise ValueError("Select a reference volume.")
        if not self.followups:
            raise ValueError("Add at least one follow-up volume.")
        times = [t for t, _ in self.followups]
        if len(set(times)) != len(times):
            raise ValueError("Two follow-ups have the same time value.")
        if self.reference_time in times:
            raise ValueError("A follow-up has the reference time %s." % scene_io.format_time(self.reference_time))
        for t, node in self.followups:
            if node is None or node.GetImageData() is None:
                raise ValueError("The follow-up at time %s has no image." % scene_io.format_time(t))
            if node is self.reference_volume:
                raise ValueError("The reference volume is also a follow-up.")
        if self.ground_truth and self.segmentation_node is None:
            raise ValueError("Ground-truth segmentations need a reference segmentation.")


def followups_from_sequence(sequence_node, reference_time=None):
    """[(time, volume node)] of a volume sequence (4D CT), times from its index values; the item
    at ``reference_time`` (if any) is left out."""
    out = []
    for i in range(sequence_node.GetNumberOfDataNodes()):
        text = sequence_node.GetNthIndexValue(i)
        try:
            t = float(text)
        except ValueError:
            t = float(i)
        if reference_time is not None and abs(t - float(reference_time)) < 1e-9:
            continue
        node = sequence_node.GetNthDataNode(i)
        if node is not None and node.IsA("vtkMRMLScalarVolumeNode"):
            out.append((t, node))
    return out


def sequence_item_at_time(sequence_node, t):
    for i in range(sequence_node.GetNumberOfDataNodes()):
        try:
            if abs(float(sequence_node.GetNthIndexValue(i)) - float(t)) < 1e-9:
                return sequence_node.GetNthDataNode(i)
        except ValueError:
            pass
    return None


def progress_fraction(event, ref_net=True):
    """0..1 for a progress event (stage share + iteration within the stage); ref_net: whether the
    run fitted Ref-Net before Def-Net."""
    lo, hi = STAGE_RANGES.get(event.get("stage"), (0.0, 1.0))
    if event.get("stage") == "defnet" and not ref_net:
        lo = STAGE_RANGES["refnet"][0]
    total = event.get("total") or 0
    it = event.get("iteration") or 0
    frac = min(max(float(it) / float(total), 0.0), 1.0) if total else 0.0
    return lo + (hi - lo) * frac


def describe_progress(event):
    stage = {"load": "Loading", "refnet": "Fitting Ref-Net", "defnet": "Training Def-Net",
             "outputs": "Writing results"}.get(event.get("stage"), str(event.get("stage")))
    text = stage
    if event.get("total"):
        text += " %s/%s" % (event.get("iteration"), event.get("total"))
    if event.get("loss") is not None:
        text += ", loss %.4g" % float(event["loss"])
    if event.get("eta") is not None:
        eta = float(event["eta"])
        text += ", %d:%02d left" % (eta // 60, eta % 60)
    return text


class Job:
    """A running worker and what happens when it ends. Call :meth:`poll` regularly."""

    def __init__(self, logic, kind, command, run_dir, temp_dir, import_options, env=None):
        self.logic = logic
        self.kind = kind
        self.command = command
        self.run_dir = run_dir
        self.temp_dir = temp_dir
        self.import_options = import_options
        self.process = worker_process.WorkerProcess(command, env=env)
        self.state = "created"
        self.progress = 0.0
        self.status_text = ""
        self.message = None  # one line for the user when failed
        self.log_lines = []
        self.result = None
        self.started = None
        self.error_event = None
        self.done_event = None
        self._ref_net = False

    @property
    def finished(self):
        return self.state in ("complete", "failed", "cancelled")

    def start(self):
        self.started = time.monotonic()
        try:
            self.process.start()
        except OSError as exc:
            self._cleanup()
            self.state = "failed"
            self.message = "Could not start the worker: %s" % exc
            raise
        self.state = "running"
        self.status_text = "Starting..."
        self.log_lines.append("$ " + " ".join(self.command))
        return self

    def cancel(self):
        if self.state == "running":
            self.status_text = "Cancelling..."
            self.process.cancel()

    def poll(self):
        """Drain the worker's events; at the end import the results (or not). Returns the events
        (dicts; log lines as {"event": "log", ...}); a final {"event": "finished", ...} when
        the job is over."""
        if self.state != "running":
            return []
        events = self.process.poll()
        out = []
        for event in events:
            kind = event.get("event")
            if kind == "progress":
                self._ref_net = self._ref_net or event.get("stage") == "refnet"
                self.progress = progress_fraction(event, self._ref_net)
                self.status_text = describe_progress(event)
            elif kind == "log":
                self.log_lines.append(event.get("text", ""))
            elif kind == "error":
                self.error_event = event
                self.log_lines.append("ERROR: %s" % event.get("message"))
            elif kind == "done":
                self.done_event = event
            out.append(event)
            if kind == "exit":
                out.append(self._finish(event))
        return out

    def wait(self, timeout=None, interval=0.05):
        """Poll until the job is over (tests and headless use)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError("STNeRP job did not finish in %s s" % timeout)
            if not self.poll():
                time.sleep(interval)
        return self

    def _finish(self, exit_event):
        rc = exit_event.get("returncode")
        try:
            if exit_event.get("cancelled") or rc == worker_process.EXIT_INTERRUPTED:
                self.state = "cancelled"
                self.message = "Cancelled."
            elif rc != 0:
                self.state = "failed"
                self.message = self._failure_message(rc)
            else:
                self.state = "importing"
                self.status_text = "Loading results..."
                try:
                    self.result = self.logic.import_results(self.run_dir, **self.import_options)
                    self.state = "complete"
                    self.progress = 1.0
                    self.message = None
                except Exception as exc:
                    logger.exception("STNeRP: import failed")
                    self.state = "failed"
                    self.message = "Could not load the results: %s" % exc
                    self.log_lines.append("ERROR: %s" % self.message)
        finally:
            self._cleanup()
        elapsed = time.monotonic() - (self.started or time.monotonic())
        self.status_text = {"complete": "Done in %.0f s." % elapsed, "cancelled": "Cancelled.",
                            "failed": "Failed: %s" % self.message}.get(self.state, self.state)
        return {"event": "finished", "state": self.state, "message": self.message, "run_dir": self.run_dir}

    def _failure_message(self, rc):
        if self.error_event and self.error_event.get("message"):
            return str(self.error_event["message"])
        for line in reversed(self.log_lines):
            if line.strip():
                return "worker exited with code %s: %s" % (rc, line.strip())
        return "worker exited with code %s" % rc

    def _cleanup(self):
        if self.temp_dir and os.path.isdir(self.temp_dir):
            shutil.rmtree(self.temp_dir, ignore_errors=True)


class STNeRPCoreLogic:
    """Scene-side logic of the module. ``worker_command`` is what runs the worker module
    (default: ``[PythonSlicer, "-m", "STNeRPLib"]``; tests pass another Python or a stand-in)."""

    def __init__(self, scene, segmentations_logic, python_executable=None, worker_command=None,
                 temp_root=None, runs_root=None):
        self.scene = scene
        self.segmentations_logic = segmentations_logic
        self.python_executable = python_executable or worker_process.default_python_executable()
        self.worker_command = list(worker_command) if worker_command else [self.python_executable, "-m", "STNeRPLib"]
        self.temp_root = temp_root
        self.runs_root = runs_root or os.path.join(tempfile.gettempdir(), "STNeRP-runs")

    # -- inputs ----------------------------------------------------------------------------
    def new_run_directory(self, base=None, prefix="run"):
        base = base or self.runs_root
        os.makedirs(base, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = os.path.join(base, "%s-%s" % (prefix, stamp))
        n = 1
        while os.path.exists(path):
            n += 1
            path = os.path.join(base, "%s-%s-%d" % (prefix, stamp, n))
        return path

    def export_inputs(self, inputs, folder):
        """Write the inputs as files; returns (train argument dict, segment map)."""
        inputs.validate()
        files = {"reference": scene_io.write_volume(inputs.reference_volume, os.path.join(folder, "reference.nrrd"))}
        followups = []
        for i, (t, node) in enumerate(sorted(inputs.followups, key=lambda it: it[0])):
            path = scene_io.write_volume(node, os.path.join(folder, "followup_%02d.nrrd" % i))
            followups.append((path, t))
        files["followups"] = followups
        segment_map = []
        if inputs.segmentation_node is not None:
            path = os.path.join(folder, "segmentation.nrrd")
            segment_map = scene_io.export_segmentation_labelmap(
                self.scene, inputs.segmentation_node, inputs.segment_ids or None, inputs.reference_volume, path,
                self.segmentations_logic)
            files["segmentation"] = path
        ground_truth = []
        geometry = dict(inputs.followups)
        for i, (t, seg) in enumerate(inputs.ground_truth):
            grid = geometry.get(t)
            if grid is None:
                raise ValueError("Ground truth at time %s has no follow-up image." % scene_io.format_time(t))
            path = os.path.join(folder, "ground_truth_%02d.nrrd" % i)
            scene_io.export_segmentation_labelmap(self.scene, seg, None, grid, path, self.segmentations_logic,
                                                  segment_map=segment_map)
            ground_truth.append((path, t))
        files["ground_truth"] = ground_truth
        files["landmarks"] = None
        if inputs.reference_landmarks is not None and inputs.followup_landmarks:
            path = os.path.join(folder, "landmarks.csv")
            if scene_io.export_landmarks_csv(path, inputs.reference_landmarks, inputs.followup_landmarks):
                files["landmarks"] = path
        return files, segment_map

    # -- jobs ------------------------------------------------------------------------------
    def _temp_dir(self):
        if self.temp_root:
            os.makedirs(self.temp_root, exist_ok=True)
        return tempfile.mkdtemp(prefix="STNeRP-inputs-", dir=self.temp_root)

    def start_training(self, inputs, settings=None, run_dir=None, name=None):
        """Export the inputs and start ``train`` in the background. Returns the running Job."""
        settings = dict(settings or {})
        temp_dir = self._temp_dir()
        try:
            files, segment_map = self.export_inputs(inputs, temp_dir)
            run_dir = run_dir or self.new_run_directory()
            args = worker_process.train_arguments(
                files["reference"], inputs.reference_time, files["followups"], run_dir,
                segmentation=files.get("segmentation"), landmarks=files.get("landmarks"),
                ground_truth=files.get("ground_truth"),
                predict_times=settings.get("predict_times") or inputs.predict_times,
                preset=settings.get("preset", "default"), iterations=settings.get("iterations"),
                device=settings.get("device", "auto"), prior=settings.get("prior", "preset"),
                prealign=settings.get("prealign", "none"))
        except Exception:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        fixed = {t: node for t, node in inputs.followups if node.GetScene() is self.scene}
        fixed[inputs.reference_time] = inputs.reference_volume
        options = dict(name=name or "STNeRP %s" % os.path.basename(run_dir), segment_map=segment_map,
                       reference_volume=inputs.reference_volume, fixed_volumes=fixed,
                       create_sequences=settings.get("create_sequences", True))
        job = Job(self, "train", self.worker_command + args, run_dir, temp_dir, options,
                  env=worker_process.worker_environment())
        job.segment_map = segment_map
        return job.start()

    def start_prediction(self, run_dir, times, output_dir=None, segment_map=None, reference_volume=None,
                         name=None):
        """Query a trained run at new times (no retraining); imports the predicted transform,
        contours, Jacobian and image."""
        if segment_map is None:
            segment_map = self.load_segment_map(run_dir)
        output_dir = output_dir or self.new_run_directory(os.path.join(run_dir, "predictions"), "predict")
        args = worker_process.predict_arguments(run_dir, times, output_dir)
        label = ", ".join(scene_io.format_time(t) for t in times)
        options = dict(name=name or "STNeRP prediction t=%s" % label, segment_map=segment_map,
                       reference_volume=reference_volume, fixed_volumes={}, create_sequences=len(times) > 1)
        job = Job(self, "predict", self.worker_command + args, output_dir, None, options,
                  env=worker_process.worker_environment())
        job.segment_map = segment_map
        return job.start()

    # -- results ---------------------------------------------------------------------------
    def import_results(self, run_dir, segment_map=None, **options):
        result = scene_io.import_run(self.scene, run_dir, self.segmentations_logic, segment_map=segment_map,
                                     **options)
        if segment_map:
            self.save_segment_map(run_dir, segment_map)
        return result

    @staticmethod
    def save_segment_map(run_dir, segment_map):
        try:
            with open(os.path.join(run_dir, SEGMENT_MAP_FILE), "w") as f:
                json.dump(segment_map, f, indent=1)
        except OSError:
            logger.warning("STNeRP: could not write the segment map into %s", run_dir)

    @staticmethod
    def load_segment_map(run_dir):
        path = os.path.join(run_dir, SEGMENT_MAP_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        return []

    @staticmethod
    def run_times(run_dir):
        try:
            record = scene_io.read_run_json(run_dir)
        except Exception:
            return []
        return sorted(float(tp["time"]) for tp in record.get("time_points") or [])


def python_for_tests():
    return sys.executable
