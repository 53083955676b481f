"""The module's parameter node: plain vtkMRMLScriptedModuleNode parameters and node references,
so the settings are saved with the scene (.mrml/.mrb) and work in the slicer-core wheel too
(which has no parameterNodeWrapper).

A follow-up row (volume, time, landmarks, ground-truth segmentation) is one unit: each row has a
key, its nodes are single references under roles named with that key, and its time is stored
with the key. When the scene removes a row's volume, the row goes with it and the other rows
keep their times; a row without landmarks simply has no landmarks reference (an empty ID would
remove a reference instead of adding one).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import slicer
from STNeRPLib import contract

from . import panel, run_import
from .core_logic import Job, JobInputs, follow_ups_from_sequence, sequence_proxies

MODULE_NAME = "STNeRP"

#: string parameters and their defaults
DEFAULTS = {
    "FollowUpMode": "volumes",    # volumes | sequence
    "ReferenceTime": "0",
    "FollowUpRows": "[]",         # JSON [{"key": "1", "time": 1.0}, ...] in table order
    "ExcludedSegmentIDs": "[]",   # JSON: segments left out (new segments are propagated)
    "Preset": contract.DEFAULT_PRESET,
    "Iterations": "0",            # 0 = the preset's number
    "Device": "auto",
    "Prior": "preset",            # "preset": the preset's own prior, else one of contract.PRIORS
    "Prealign": "auto",           # one of contract.PREALIGNMENTS (auto: a rigid transform of a far one)
    "Similarity": "preset",       # "preset": the preset's own loss, else one of contract.SIMILARITIES
    "Intensity": "auto",          # intensity normalisation, one of contract.INTENSITIES (auto: by the scans' units)
    "LabelInterpolation": "preset",  # "preset": the preset's own, else one of contract.LABEL_INTERPOLATIONS
    "VelocityLevels": "0",        # 0 = the preset's number of velocity grids
    "AnchorReference": "preset",  # "on": the transform at the reference time is the identity; "off"; "preset"
    "StopOnConvergence": "preset",  # "on": Def-Net's fit ends once its loss stops improving; "off"; "preset"
    "CalibrateIntensities": "preset",  # "on": a CT follow-up numbered unlike the reference fitted in the reference's
    "StructurePoints": "preset",  # the preset's share; else the fraction of voxels drawn about the segments (0: none)
    "PredictTimes": "[]",         # extra unscanned times predicted at the end of training
    "CreateSequences": "true",
    "PredictTime": "0.5",
    "LastRunDirectory": "",       # absolute folder of the last complete training run
    "UnfinishedRunDirectory": "",  # a cancelled or failed training run that Resume can continue
    "LastSegmentMap": "[]",
    "LastTimes": "[]",
}

#: prior choices of the panel: the preset's own, or one of the worker's
PRIOR_CHOICES = ("preset",) + contract.PRIORS
#: similarity choices of the panel: the preset's own, or one of the worker's
SIMILARITY_CHOICES = ("preset",) + contract.SIMILARITIES
#: how the segments are carried to each time: the preset's own, or one of the worker's
LABEL_INTERPOLATION_CHOICES = ("preset",) + contract.LABEL_INTERPOLATIONS
#: choices of the panel's on/off settings (anchor reference time, stop on convergence, CT-number calibration) and
#: the worker option value each stands for (None: the preset's own)
SWITCH_SETTINGS = {"preset": None, "on": True, "off": False}
SWITCH_CHOICES = tuple(SWITCH_SETTINGS)

#: the Voxels about segments spin box's minimum, shown as "preset": the preset's own share (no flag)
STRUCTURE_POINTS_PRESET = -0.05

#: node reference roles
REFERENCE_VOLUME = "ReferenceVolume"
FOLLOW_UP_SEQUENCE = "FollowUpSequence"
SEGMENTATION = "Segmentation"
REFERENCE_LANDMARKS = "ReferenceLandmarks"
LAST_REFERENCE_VOLUME = "LastReferenceVolume"
#: roles of a follow-up row's nodes, completed by "_" and the row's key
ROW_VOLUME = "FollowUpVolume"
ROW_LANDMARKS = "FollowUpLandmarks"
ROW_GROUND_TRUTH = "FollowUpGroundTruth"
ROW_ROLES = (ROW_VOLUME, ROW_LANDMARKS, ROW_GROUND_TRUTH)


@dataclass
class FollowUp:
    """One row of the follow-up table."""

    volume: slicer.vtkMRMLScalarVolumeNode
    time: float
    landmarks: slicer.vtkMRMLMarkupsFiducialNode | None = None
    ground_truth: slicer.vtkMRMLSegmentationNode | None = None


def initialize(node: slicer.vtkMRMLScriptedModuleNode) -> slicer.vtkMRMLScriptedModuleNode:
    """Set every missing parameter to its default (existing values are kept)."""
    node.SetAttribute("ModuleName", MODULE_NAME)
    for key, value in DEFAULTS.items():
        if not node.GetParameter(key):
            node.SetParameter(key, value)
    return node


def create_parameter_node(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLScriptedModuleNode:
    """A parameter node for the scene (the app uses ScriptedLoadableModuleLogic.getParameterNode)."""
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetName(MODULE_NAME)
        node.SetSingletonTag(MODULE_NAME)
        node = scene.AddNode(node)
    return initialize(node)


def get_json(node: slicer.vtkMRMLScriptedModuleNode, key: str) -> Any:
    """A JSON parameter's value; its default's when the parameter is empty or not valid JSON (None without one)."""
    try:
        return json.loads(node.GetParameter(key) or DEFAULTS.get(key, "null"))
    except ValueError:
        return json.loads(DEFAULTS.get(key, "null"))


def set_json(node: slicer.vtkMRMLScriptedModuleNode, key: str, value: Any) -> None:
    """Store a value as a JSON parameter."""
    node.SetParameter(key, json.dumps(value))


def structure_points(node: slicer.vtkMRMLScriptedModuleNode) -> float | None:
    """The share of each iteration's voxels drawn about the segments (0: uniformly), or None for the preset's
    own: "preset", the spin box's minimum, or "" in a scene saved before the parameter existed. A scene saved
    while "0" stood for the preset's share (then none) keeps drawing uniformly, as it did."""
    value = get_float(node, "StructurePoints", STRUCTURE_POINTS_PRESET)
    return None if value < 0 else value


def structure_points_text(value: float) -> str:
    """The StructurePoints parameter for the Voxels about segments spin box's value (its minimum: "preset")."""
    return "preset" if value < 0 else repr(float(value))


def get_float(node: slicer.vtkMRMLScriptedModuleNode, key: str, default: float = 0.0) -> float:
    """A parameter as a number; `default` when it is empty or not a number."""
    try:
        return float(node.GetParameter(key))
    except (TypeError, ValueError):
        return default


def get_int(node: slicer.vtkMRMLScriptedModuleNode, key: str, default: int = 0) -> int:
    """A parameter as an integer (a fraction is dropped); `default` when it is empty or not a number."""
    try:
        return int(float(node.GetParameter(key)))
    except (TypeError, ValueError):
        return default


def get_bool(node: slicer.vtkMRMLScriptedModuleNode, key: str) -> bool:
    """Whether a parameter is "1", "true", "yes" or "on" (any case); False when empty or anything else."""
    return (node.GetParameter(key) or "").lower() in ("1", "true", "yes", "on")


def _role(role: str, key: str) -> str:
    return f"{role}_{key}"


def set_follow_ups(node: slicer.vtkMRMLScriptedModuleNode, rows: list[FollowUp]) -> None:
    """Store the follow-up table: one key per row, its nodes under that key's roles."""
    was_modifying = node.StartModify()
    for entry in get_json(node, "FollowUpRows") or []:
        for role in ROW_ROLES:
            node.RemoveNodeReferenceIDs(_role(role, entry["key"]))
    stored = []
    for index, row in enumerate(rows, 1):
        key = str(index)
        for role, member in zip(ROW_ROLES, (row.volume, row.landmarks, row.ground_truth)):
            if member is not None:
                node.SetNodeReferenceID(_role(role, key), member.GetID())
        stored.append({"key": key, "time": float(row.time)})
    set_json(node, "FollowUpRows", stored)
    node.EndModify(was_modifying)


def get_follow_ups(node: slicer.vtkMRMLScriptedModuleNode) -> list[FollowUp]:
    """The follow-up rows whose volume is still in the scene, in table order."""
    rows = []
    for entry in get_json(node, "FollowUpRows") or []:
        key = entry["key"]
        volume = node.GetNodeReference(_role(ROW_VOLUME, key))
        if volume is not None:
            rows.append(FollowUp(volume, float(entry["time"]), node.GetNodeReference(_role(ROW_LANDMARKS, key)),
                                 node.GetNodeReference(_role(ROW_GROUND_TRUTH, key))))
    return rows


def settings(node: slicer.vtkMRMLScriptedModuleNode) -> dict:
    """Worker settings from the parameter node (prior, similarity, label_interpolation, velocity_levels,
    anchor_reference, stop_on_convergence, calibrate_intensities and structure_points None: the preset's own)."""
    return {
        "preset": node.GetParameter("Preset") or contract.DEFAULT_PRESET,
        "iterations": get_int(node, "Iterations", 0) or None,
        "device": node.GetParameter("Device") or "auto",
        "prior": _chosen(node, "Prior"),
        "prealign": node.GetParameter("Prealign") or "auto",
        "similarity": _chosen(node, "Similarity"),
        "intensity": node.GetParameter("Intensity") or "auto",
        "label_interpolation": _chosen(node, "LabelInterpolation"),
        "velocity_levels": get_int(node, "VelocityLevels", 0) or None,
        "anchor_reference": SWITCH_SETTINGS.get(node.GetParameter("AnchorReference")),
        "stop_on_convergence": SWITCH_SETTINGS.get(node.GetParameter("StopOnConvergence")),
        "calibrate_intensities": SWITCH_SETTINGS.get(node.GetParameter("CalibrateIntensities")),
        "structure_points": structure_points(node),
        "predict_times": [float(t) for t in (get_json(node, "PredictTimes") or [])],
        "create_sequences": get_bool(node, "CreateSequences"),
    }


def _chosen(node: slicer.vtkMRMLScriptedModuleNode, key: str) -> str | None:
    """A choice the panel offers beside "preset": None when left there (or absent: GetParameter gives ""),
    so the worker gets no flag and the preset's own value holds."""
    value = node.GetParameter(key) or "preset"
    return None if value == "preset" else value


def job_inputs(node: slicer.vtkMRMLScriptedModuleNode) -> JobInputs:
    """What the panel's parameter node asks to train on (not yet validated)."""
    reference_time = get_float(node, "ReferenceTime")
    sequence_mode = node.GetParameter("FollowUpMode") == "sequence"
    rows = [] if sequence_mode else get_follow_ups(node)
    sequence = node.GetNodeReference(FOLLOW_UP_SEQUENCE) if sequence_mode else None
    if sequence is not None:
        follow_ups = follow_ups_from_sequence(sequence, reference_time)
    else:
        follow_ups = [(row.time, row.volume) for row in rows]
    segmentation = node.GetNodeReference(SEGMENTATION)
    return JobInputs(
        node.GetNodeReference(REFERENCE_VOLUME), follow_ups, reference_time=reference_time,
        segmentation_node=segmentation,
        segment_ids=panel.chosen_segment_ids(segmentation, get_json(node, "ExcludedSegmentIDs") or []),
        reference_landmarks=node.GetNodeReference(REFERENCE_LANDMARKS),
        follow_up_landmarks=[(row.time, row.landmarks) for row in rows if row.landmarks is not None],
        ground_truth=[(row.time, row.ground_truth) for row in rows if row.ground_truth is not None],
        predict_times=[float(t) for t in get_json(node, "PredictTimes") or []],
        sequence_proxies=sequence_proxies(sequence) if sequence is not None else [])


def record_training(node: slicer.vtkMRMLScriptedModuleNode, job: Job) -> None:
    """Remember how a training job ended in the parameter node (saved with the scene): a complete
    run for the time slider, an unfinished one for Resume."""
    node.SetParameter("UnfinishedRunDirectory", job.run_dir if panel.resumable_run(job.run_dir) else "")
    if job.state != "complete":
        return
    node.SetParameter("LastRunDirectory", job.run_dir)
    set_json(node, "LastSegmentMap", job.segment_map)
    set_json(node, "LastTimes", run_import.run_times(job.run_dir))
