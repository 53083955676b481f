"""The module's parameter node: plain vtkMRMLScriptedModuleNode parameters and node references,
so the settings are saved with the scene (.mrml/.mrb) and work in the slicer-core wheel too
(which has no parameterNodeWrapper)."""

import json

MODULE_NAME = "STNeRP"

#: string parameters and their defaults
DEFAULTS = {
    "FollowUpMode": "volumes",    # volumes | sequence
    "ReferenceTime": "0",
    "FollowUpTimes": "[]",        # JSON list, same order as the FollowUpVolume references
    "SegmentIDs": "[]",           # JSON list of the chosen segment IDs ([] = all)
    "Preset": "default",
    "Iterations": "0",            # 0 = the preset's number
    "Device": "auto",
    "Prior": "preset",            # preset | refnet | image ("preset": the preset's prior)
    "Prealign": "none",
    "PredictTimes": "[]",         # extra unscanned times predicted at the end of training
    "OutputDirectory": "",        # "" = under the application's temporary folder
    "CreateSequences": "true",
    "PredictTime": "0.5",
    "LastRunDirectory": "",
    "LastSegmentMap": "[]",
    "LastTimes": "[]",
}

#: node reference roles
REFERENCE_VOLUME = "ReferenceVolume"
FOLLOW_UP_VOLUME = "FollowUpVolume"          # multiple, ordered
FOLLOW_UP_LANDMARKS = "FollowUpLandmarks"    # multiple, same order as FollowUpVolume ("" = none)
FOLLOW_UP_SEQUENCE = "FollowUpSequence"
SEGMENTATION = "Segmentation"
REFERENCE_LANDMARKS = "ReferenceLandmarks"
LAST_REFERENCE_VOLUME = "LastReferenceVolume"


def initialize(node):
    """Set every missing parameter to its default (existing values are kept)."""
    node.SetAttribute("ModuleName", MODULE_NAME)
    for key, value in DEFAULTS.items():
        if not node.GetParameter(key):
            node.SetParameter(key, value)
    return node


def create_parameter_node(scene):
    """A parameter node for the scene (the app uses ScriptedLoadableModuleLogic.getParameterNode)."""
    import slicer
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetName(MODULE_NAME)
        node.SetSingletonTag(MODULE_NAME)
        node = scene.AddNode(node)
    return initialize(node)


def get_json(node, key):
    text = node.GetParameter(key) or DEFAULTS.get(key, "null")
    try:
        return json.loads(text)
    except ValueError:
        return json.loads(DEFAULTS.get(key, "null"))


def set_json(node, key, value):
    node.SetParameter(key, json.dumps(value))


def get_float(node, key, default=0.0):
    try:
        return float(node.GetParameter(key))
    except (TypeError, ValueError):
        return default


def get_int(node, key, default=0):
    try:
        return int(float(node.GetParameter(key)))
    except (TypeError, ValueError):
        return default


def get_bool(node, key):
    return (node.GetParameter(key) or "").lower() in ("1", "true", "yes", "on")


def set_follow_ups(node, items):
    """items: [(volume node, time, landmarks node or None)] in table order."""
    node.RemoveNodeReferenceIDs(FOLLOW_UP_VOLUME)
    node.RemoveNodeReferenceIDs(FOLLOW_UP_LANDMARKS)
    times = []
    for volume, time, landmarks in items:
        node.AddNodeReferenceID(FOLLOW_UP_VOLUME, volume.GetID() if volume is not None else "")
        node.AddNodeReferenceID(FOLLOW_UP_LANDMARKS, landmarks.GetID() if landmarks is not None else "")
        times.append(float(time))
    set_json(node, "FollowUpTimes", times)


def get_follow_ups(node):
    """[(volume node, time, landmarks node or None)] stored by :func:`set_follow_ups`."""
    times = get_json(node, "FollowUpTimes") or []
    out = []
    for i in range(node.GetNumberOfNodeReferences(FOLLOW_UP_VOLUME)):
        volume = node.GetNthNodeReference(FOLLOW_UP_VOLUME, i)
        landmarks = (node.GetNthNodeReference(FOLLOW_UP_LANDMARKS, i)
                     if i < node.GetNumberOfNodeReferences(FOLLOW_UP_LANDMARKS) else None)
        time = times[i] if i < len(times) else float(i + 1)
        if volume is not None:
            out.append((volume, float(time), landmarks))
    return out


def settings(node):
    """Worker settings from the parameter node."""
    return {
        "preset": node.GetParameter("Preset") or "default",
        "iterations": get_int(node, "Iterations", 0) or None,
        "device": node.GetParameter("Device") or "auto",
        "prior": node.GetParameter("Prior") or "preset",
        "prealign": node.GetParameter("Prealign") or "none",
        "predict_times": [float(t) for t in (get_json(node, "PredictTimes") or [])],
        "create_sequences": get_bool(node, "CreateSequences"),
    }
