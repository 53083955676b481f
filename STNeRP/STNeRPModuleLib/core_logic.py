"""One STNeRP job (training or prediction) from the scene's point of view, without Qt.

    logic = STNeRPCoreLogic(scene, segmentations_logic, runs_root="/abs/runs")
    job = logic.start_training(inputs, settings)      # exports inputs, starts the worker
    while not job.finished: job.poll()                # the widget does this from a QTimer
    job.state -> "complete" | "failed" | "cancelled";  job.result -> run_import.ImportedRun

Inputs are written (uncompressed) to a temporary folder, removed when the job ends whatever the
outcome; every path given to the worker is absolute. Results are imported only when the worker
reports a complete run, and an import that fails half-way removes what it added, so a failed or
cancelled job leaves the scene as it was.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, cast

import slicer
from STNeRPLib import contract

from . import run_import, scene_files, segment_overlap
from .scene_utils import nodes_of_class
from .worker_process import WorkerProcess, default_python_executable, worker_environment

logger = logging.getLogger(__name__)

#: progress bar share of each worker stage (start, end); Def-Net takes Ref-Net's share too when
#: the run has no Ref-Net stage (the image prior, the default preset's)
STAGE_RANGES: dict[str | None, tuple[float, float]] = {
    contract.STAGE_REFNET: (0.0, 0.35), contract.STAGE_DEFNET: (0.35, 0.9), contract.STAGE_OUTPUTS: (0.9, 1.0)}
STAGE_TEXT: dict[str | None, str] = {
    contract.STAGE_REFNET: "Fitting Ref-Net", contract.STAGE_DEFNET: "Training Def-Net",
    contract.STAGE_OUTPUTS: "Writing results"}

SEGMENT_MAP_FILE = "slicer_segment_map.json"
#: folder of a run that holds the time slider's predictions, one folder per time
PREDICTIONS_FOLDER = "predictions"


@dataclass
class JobInputs:
    """What the user picked in the panel. follow_ups, follow_up_landmarks, ground_truth:
    [(time, node)] (scene nodes, or data nodes of a sequence); sequence_proxies: the scene volumes that show
    that sequence (its browsers' proxy nodes, found by `sequence_proxies`), [] for a table of follow-ups."""

    reference_volume: slicer.vtkMRMLScalarVolumeNode | None
    follow_ups: list[tuple[float, slicer.vtkMRMLScalarVolumeNode]]
    reference_time: float = 0.0
    segmentation_node: slicer.vtkMRMLSegmentationNode | None = None
    segment_ids: list[str] = field(default_factory=list)     # [] = every segment
    reference_landmarks: slicer.vtkMRMLMarkupsFiducialNode | None = None
    follow_up_landmarks: list[tuple[float, slicer.vtkMRMLMarkupsFiducialNode]] = field(default_factory=list)
    ground_truth: list[tuple[float, slicer.vtkMRMLSegmentationNode]] = field(default_factory=list)
    predict_times: list[float] = field(default_factory=list)
    sequence_proxies: list[slicer.vtkMRMLScalarVolumeNode] = field(default_factory=list)

    def validate(self) -> None:
        """ValueError with one line for the user when the inputs cannot be trained on."""
        if self.reference_volume is None:
            raise ValueError("Select a reference volume.")
        if not self.follow_ups:
            raise ValueError("Add at least one follow-up volume.")
        times = [float(t) for t, _ in self.follow_ups]
        if len(set(times)) != len(times):
            raise ValueError("Two follow-ups have the same time value.")
        if float(self.reference_time) in times:
            raise ValueError(f"A follow-up has the reference time {contract.format_time(self.reference_time)}.")
        for t, node in self.follow_ups:
            if node is None or node.GetImageData() is None:
                raise ValueError(f"The follow-up at time {contract.format_time(t)} has no image.")
            if node is self.reference_volume:
                raise ValueError("The reference volume is also a follow-up.")
        if self.ground_truth and self.segmentation_node is None:
            raise ValueError("Ground-truth segmentations need a reference segmentation.")

    def require_untransformed_volumes(self) -> None:
        """ValueError with one line when the reference or a follow-up volume is under a transform: its file holds
        the volume without it, so the run would register it, and place its results, elsewhere than Slicer shows it.
        Segmentations and landmarks are exported where they are shown. Checked when the inputs are exported, not
        by validate: the panel's Apply button follows the parameter node, which hardening a transform leaves as
        it was, so a button disabled for it would stay disabled."""
        named = [("The reference volume", cast("slicer.vtkMRMLScalarVolumeNode", self.reference_volume))]
        named += [(f"The follow-up at time {contract.format_time(t)}", node) for t, node in self.follow_ups]
        for what, volume in named:
            transform = volume.GetParentTransformNode()
            if transform is not None:
                raise ValueError(f"{what} '{volume.GetName()}' is under the transform '{transform.GetName()}': Harden "
                                 "it (Data module, right-click the volume) or remove the transform, then Apply again.")
        for proxy in self.sequence_proxies:
            transform = proxy.GetParentTransformNode()
            if transform is not None:
                raise ValueError(f"The follow-up sequence is shown as '{proxy.GetName()}', under the transform "
                                 f"'{transform.GetName()}', which its items do not hold: remove the transform from "
                                 "it, then Apply again.")


def follow_ups_from_sequence(sequence_node: slicer.vtkMRMLSequenceNode, reference_time: float | None = None
                             ) -> list[tuple[float, slicer.vtkMRMLScalarVolumeNode]]:
    """[(time, volume node)] of a volume sequence (4D CT), times from its index values; the item
    at `reference_time` (if any) is left out."""
    out = []
    for i in range(sequence_node.GetNumberOfDataNodes()):
        try:
            t = float(sequence_node.GetNthIndexValue(i))
        except ValueError:
            t = float(i)
        if reference_time is not None and abs(t - float(reference_time)) < 1e-9:
            continue
        node = sequence_node.GetNthDataNode(i)
        if node is not None and node.IsA("vtkMRMLScalarVolumeNode"):
            out.append((t, node))
    return out


def sequence_proxies(sequence_node: slicer.vtkMRMLSequenceNode) -> list[slicer.vtkMRMLScalarVolumeNode]:
    """The scene volumes through which Slicer shows a sequence: the proxy node of each browser that plays it
    (GetProxyNode is None for a browser that does not, or whose proxy was deleted)."""
    proxies = [browser.GetProxyNode(sequence_node)
               for browser in nodes_of_class(sequence_node.GetScene(), "vtkMRMLSequenceBrowserNode")]
    return [proxy for proxy in proxies if proxy is not None and proxy.IsA("vtkMRMLScalarVolumeNode")]


def progress_fraction(event: dict, ref_net: bool = True) -> float:
    """0..1 for a progress event (stage share + iteration within the stage); ref_net: whether the
    run fitted Ref-Net before Def-Net."""
    stage = event.get("stage")
    lo, hi = STAGE_RANGES.get(stage, (0.0, 1.0))
    if stage == contract.STAGE_DEFNET and not ref_net:
        lo = STAGE_RANGES[contract.STAGE_REFNET][0]
    total = event.get("total") or 0
    fraction = min(max(float(event.get("iteration") or 0) / float(total), 0.0), 1.0) if total else 0.0
    return lo + (hi - lo) * fraction


def describe_progress(event: dict) -> str:
    """The status line of a progress event: the stage, iteration/total, loss and the time left (m:ss)."""
    text = STAGE_TEXT.get(event.get("stage"), str(event.get("stage")))
    if event.get("total"):
        text += f" {event.get('iteration')}/{event.get('total')}"
    if event.get("loss") is not None:
        text += f", loss {float(event['loss']):.4g}"
    if event.get("eta") is not None:
        eta = float(event["eta"])
        text += f", {int(eta // 60)}:{int(eta % 60):02d} left"
    return text


@dataclass(eq=False)
class Job:
    """A running worker and what happens when it ends. Call :meth:`poll` regularly.

    command: the worker's command line; run_dir: the folder it writes; temp_dir: its exported
    inputs, removed when the job ends (None: nothing to remove); import_options: keywords of
    :meth:`STNeRPCoreLogic.import_results`."""

    logic: STNeRPCoreLogic
    command: list[str]
    run_dir: str
    temp_dir: str | None
    import_options: dict
    segment_map: list[dict]
    state: str = field(default="created", init=False)
    progress: float = field(default=0.0, init=False)
    status_text: str = field(default="", init=False)
    message: str | None = field(default=None, init=False)   # one line for the user when failed
    log_lines: list[str] = field(default_factory=list, init=False)
    result: run_import.ImportedRun | None = field(default=None, init=False)
    started: float | None = field(default=None, init=False)
    error_event: dict | None = field(default=None, init=False)
    cancel_requested: bool = field(default=False, init=False)
    _ref_net: bool = field(default=False, init=False)
    process: WorkerProcess = field(init=False)

    def __post_init__(self) -> None:
        self.process = WorkerProcess(self.command, env=worker_environment())

    @property
    def finished(self) -> bool:
        """Whether the job is over: complete, failed or cancelled."""
        return self.state in ("complete", "failed", "cancelled")

    def start(self) -> Job:
        """Start the worker; returns the job, now running. A worker that cannot be started (OSError) fails
        the job, removes its exported inputs and is raised."""
        self.started = time.monotonic()
        try:
            self.process.start()
        except OSError as error:
            self._cleanup()
            self.state = "failed"
            self.message = f"Could not start the worker: {error}"
            raise
        self.state = "running"
        self.status_text = "Starting..."
        self.log_lines.append(f"$ {' '.join(self.command)}")
        return self

    def cancel(self) -> None:
        """Ask the worker to stop; returns at once (poll() reports the end). A cancelled job imports
        nothing, even when its worker had finished before it was told (e.g. on a scene close)."""
        if self.state == "running":
            self.cancel_requested = True
            self.status_text = "Cancelling..."
            self.process.cancel()

    def poll(self) -> list[dict]:
        """Drain the worker's events; at the end import the results (or not). Returns the events
        (log lines as {"event": "log", ...}) and a final {"event": "finished", ...}."""
        if self.state != "running":
            return []
        out = []
        for event in self.process.poll():
            kind = event.get("event")
            if kind == contract.EVENT_PROGRESS:
                self._ref_net = self._ref_net or event.get("stage") == contract.STAGE_REFNET
                self.progress = progress_fraction(event, self._ref_net)
                self.status_text = describe_progress(event)
            elif kind == "log":
                self.log_lines.append(event.get("text", ""))
            elif kind == contract.EVENT_ERROR:
                self.error_event = event
                self.log_lines.append(f"ERROR: {event.get('message')}")
            out.append(event)
            if kind == "exit":
                out.append(self._finish(event))
        return out

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> Job:
        """Poll until the job is over (tests and headless use)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"STNeRP job did not finish in {timeout} s")
            if not self.poll():
                time.sleep(interval)
        return self

    def _finish(self, exit_event: dict) -> dict:
        returncode = exit_event.get("returncode")
        try:
            if self.cancel_requested or returncode == contract.EXIT_INTERRUPTED:
                self.state, self.message = "cancelled", "Cancelled."
            elif returncode != contract.EXIT_OK:
                self.state, self.message = "failed", self._failure_message(returncode)
            else:
                self._import()
        finally:
            self._cleanup()
        elapsed = time.monotonic() - (self.started or time.monotonic())
        self.status_text = {"complete": f"Done in {elapsed:.0f} s.", "cancelled": "Cancelled.",
                            "failed": f"Failed: {self.message}"}.get(self.state, self.state)
        return {"event": "finished", "state": self.state, "message": self.message, "run_dir": self.run_dir}

    def _import(self) -> None:
        self.status_text = "Loading results..."
        try:
            self.result = self.logic.import_results(self.run_dir, segment_map=self.segment_map,
                                                    **self.import_options)
            self.state, self.progress, self.message = "complete", 1.0, None
        except Exception as error:
            logger.exception("STNeRP: import failed")
            self.state, self.message = "failed", f"Could not load the results: {error}"
            self.log_lines.append(f"ERROR: {self.message}")

    def _failure_message(self, returncode: int | None) -> str:
        if self.error_event and self.error_event.get("message"):
            return str(self.error_event["message"])
        last = next((line.strip() for line in reversed(self.log_lines) if line.strip()), None)
        detail = f": {last}" if last else ""
        return f"worker exited with code {returncode}{detail}"

    def _cleanup(self) -> None:
        if self.temp_dir and os.path.isdir(self.temp_dir):
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def prediction_import_options(times: list[float], reference_volume: slicer.vtkMRMLScalarVolumeNode | None = None,
                              name: str | None = None) -> dict:
    """How a prediction folder is imported: named after its times, no fixed volumes (nothing was
    scanned then), sequences only for several times."""
    label = ", ".join(contract.format_time(t) for t in times)
    return dict(name=name or f"STNeRP prediction t={label}", reference_volume=reference_volume,
                fixed_volumes={}, create_sequences=len(times) > 1)


class STNeRPCoreLogic:
    """Scene-side logic of the module. runs_root and temp_root are absolute folders; the worker
    command defaults to ``[PythonSlicer, "-m", "STNeRPLib"]`` (tests pass a stand-in)."""

    def __init__(self, scene: slicer.vtkMRMLScene, segmentations_logic: slicer.vtkSlicerSegmentationsModuleLogic,
                 runs_root: str, temp_root: str | None = None, worker_command: list[str] | None = None) -> None:
        for folder in (runs_root, temp_root):
            if folder and not os.path.isabs(folder):
                raise ValueError(f"folder {folder!r} is relative: give an absolute folder")
        self.scene = scene
        self.segmentations_logic = segmentations_logic
        self.runs_root = runs_root
        self.temp_root = temp_root
        self.worker_command = list(worker_command or [default_python_executable(), "-m", "STNeRPLib"])

    # -- inputs ----------------------------------------------------------------------------
    def new_run_directory(self, prefix: str = "run") -> str:
        """A new, not yet existing folder under the runs folder, named after the date and time."""
        os.makedirs(self.runs_root, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path, n = os.path.join(self.runs_root, f"{prefix}-{stamp}"), 1
        while os.path.exists(path):
            n += 1
            path = os.path.join(self.runs_root, f"{prefix}-{stamp}-{n}")
        return path

    def export_inputs(self, inputs: JobInputs, folder: str) -> tuple[dict, list[dict]]:
        """Write the inputs as files into `folder` (absolute); returns (files, segment map)."""
        inputs.validate()
        inputs.require_untransformed_volumes()
        files: dict[str, Any] = {
            "reference": scene_files.write_volume(inputs.reference_volume, os.path.join(folder, "reference.nrrd"))}
        files["follow_ups"] = [(scene_files.write_volume(node, os.path.join(folder, f"follow_up_{i:02d}.nrrd")), t)
                               for i, (t, node) in enumerate(sorted(inputs.follow_ups, key=lambda it: it[0]))]
        segment_map = []
        if inputs.segmentation_node is not None:
            files["segmentation"] = os.path.join(folder, "segmentation.nrrd")
            segment_map = scene_files.export_segmentation_labelmap(
                self.scene, inputs.segmentation_node, inputs.segment_ids or None, inputs.reference_volume,
                files["segmentation"], self.segmentations_logic)
        files["ground_truth"] = self._export_ground_truth(inputs, folder, segment_map)
        files["landmarks"] = None
        if inputs.reference_landmarks is not None and inputs.follow_up_landmarks:
            path = os.path.join(folder, "landmarks.csv")
            if scene_files.export_landmarks_csv(path, inputs.reference_landmarks, inputs.follow_up_landmarks):
                files["landmarks"] = path
        return files, segment_map

    def segment_overlap_warning(self, inputs: JobInputs) -> str | None:
        """One line naming the chosen segments that share voxels on the reference volume's grid and
        how many (the worker takes one label per voxel); None when none do. Asked before Apply."""
        if inputs.segmentation_node is None or inputs.reference_volume is None:
            return None
        segment_map = scene_files.segment_map_for(inputs.segmentation_node, inputs.segment_ids or None)
        voxels = scene_files.segment_voxels(self.scene, inputs.segmentation_node, [e["id"] for e in segment_map],
                                            inputs.reference_volume, self.segmentations_logic)
        return segment_overlap.describe(segment_overlap.overlaps(voxels), [e["name"] for e in segment_map])

    def _export_ground_truth(self, inputs: JobInputs, folder: str, segment_map: list[dict]) -> list[tuple[str, float]]:
        """Ground-truth segmentations as labelmaps on their follow-up's grid, with the reference's
        label values (segments matched by name)."""
        grids = dict(inputs.follow_ups)
        out = []
        for i, (t, segmentation) in enumerate(inputs.ground_truth):
            path = os.path.join(folder, f"ground_truth_{i:02d}.nrrd")
            scene_files.export_segmentation_labelmap(self.scene, segmentation, None, grids[t], path,
                                                     self.segmentations_logic, segment_map=segment_map)
            out.append((path, t))
        return out

    # -- jobs ------------------------------------------------------------------------------
    def start_training(self, inputs: JobInputs, settings: dict | None = None, run_dir: str | None = None,
                       name: str | None = None, resume: bool = False) -> Job:
        """Export the inputs and start `train` in the background. Returns the running Job.

        resume: continue the unfinished run in run_dir from its checkpoint (train --resume). The
        inputs are exported again to the folder the run recorded, so the worker sees the same paths,
        and it checks their SHA-256: inputs changed since are refused in one line."""
        settings = dict(settings or {})
        temp_dir = self._resumed_inputs_folder(run_dir) if resume else os.path.abspath(
            tempfile.mkdtemp(prefix="STNeRP-inputs-", dir=self._temp_root()))
        try:
            files, segment_map = self.export_inputs(inputs, temp_dir)
            run_dir = os.path.abspath(run_dir or self.new_run_directory())
            args = contract.train_arguments(
                files["reference"], inputs.reference_time, files["follow_ups"], run_dir,
                segmentation=files.get("segmentation"), landmarks=files["landmarks"],
                ground_truth=files["ground_truth"], predict_times=settings.get("predict_times") or inputs.predict_times,
                preset=settings.get("preset", contract.DEFAULT_PRESET), iterations=settings.get("iterations"),
                device=settings.get("device", "auto"), prior=settings.get("prior"),
                prealign=settings.get("prealign", "none"), similarity=settings.get("similarity"),
                intensity=settings.get("intensity", "auto"),
                label_interpolation=settings.get("label_interpolation"),
                velocity_levels=settings.get("velocity_levels"),
                anchor_reference=settings.get("anchor_reference"),
                stop_on_convergence=settings.get("stop_on_convergence"),
                calibrate_intensities=settings.get("calibrate_intensities"),
                structure_points=settings.get("structure_points") if files.get("segmentation") else None,
                resume=resume, stdin_cancel=True)
        except Exception:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        fixed = {t: node for t, node in inputs.follow_ups if node.GetScene() is self.scene}
        fixed[inputs.reference_time] = inputs.reference_volume
        options = dict(name=name or f"STNeRP {os.path.basename(run_dir)}", reference_volume=inputs.reference_volume,
                       fixed_volumes=fixed, create_sequences=settings.get("create_sequences", True))
        return Job(self, self.worker_command + args, run_dir, temp_dir, options, segment_map).start()

    @staticmethod
    def _resumed_inputs_folder(run_dir: str | None) -> str:
        """The (re-created) folder the unfinished run's inputs were exported to."""
        if not run_dir:
            raise ValueError("Resume needs the folder of an unfinished STNeRP run, and none is recorded: "
                             "train again with Apply.")
        try:
            reference = contract.read_run(run_dir)["inputs"]["reference"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"{run_dir} holds no unfinished STNeRP run to resume.") from None
        folder = os.path.dirname(reference)
        os.makedirs(folder, exist_ok=True)
        return folder

    def start_prediction(self, run_dir: str, times: list[float], output_dir: str, segment_map: list[dict] | None = None,
                         reference_volume: slicer.vtkMRMLScalarVolumeNode | None = None,
                         name: str | None = None) -> Job:
        """Query a trained run at new times (no retraining) into `output_dir` (absolute); imports
        the predicted transform, contours, Jacobian and image."""
        segment_map = self.load_segment_map(run_dir) if segment_map is None else segment_map
        args = contract.predict_arguments(os.path.abspath(run_dir), times, os.path.abspath(output_dir),
                                          stdin_cancel=True)
        options = prediction_import_options(times, reference_volume, name)
        return Job(self, self.worker_command + args, output_dir, None, options, segment_map).start()

    def _temp_root(self) -> str | None:
        if self.temp_root:
            os.makedirs(self.temp_root, exist_ok=True)
        return self.temp_root

    # -- results ---------------------------------------------------------------------------
    def import_results(self, run_dir: str, segment_map: list[dict] | None = None,
                       **options: Any) -> run_import.ImportedRun:
        """Load a complete run folder into the scene as NEW nodes (options: keywords of run_import.import_run)
        and keep its segment map (when one is given) in the folder for later predictions."""
        result = run_import.import_run(self.scene, run_dir, self.segmentations_logic, segment_map=segment_map,
                                       **options)
        if segment_map:
            self.save_segment_map(run_dir, segment_map)
        return result

    @staticmethod
    def save_segment_map(run_dir: str, segment_map: list[dict]) -> None:
        """Write a run's labels -> segments map into its folder (slicer_segment_map.json); a failure is only logged."""
        try:
            with open(os.path.join(run_dir, SEGMENT_MAP_FILE), "w", encoding="utf-8") as handle:
                json.dump(segment_map, handle, indent=1)
        except OSError:
            logger.warning(f"STNeRP: could not write the segment map into {run_dir}")

    @staticmethod
    def load_segment_map(run_dir: str) -> list[dict]:
        """The labels -> segments map that save_segment_map wrote into a run folder; [] when it has none."""
        path = os.path.join(run_dir, SEGMENT_MAP_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        return []
