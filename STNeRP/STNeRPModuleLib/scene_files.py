"""Scene nodes <-> files for the STNeRP module, without Qt: volumes, segmentations, landmarks
and displacement-field transforms.

All file I/O goes through MRML storage nodes, so geometry is handled exactly as Slicer handles it
when a user loads or saves data. Paths must be absolute: a storage node resolves a relative file
name against the scene's root folder, not the working directory. Functions take the scene and
the module logic objects they need as arguments; nothing here asks ``slicer.app``.

Conventions (ARCHITECTURE.md): files are LPS, the scene is RAS. A worker displacement field maps
a time-t point to the matching reference point; Slicer reads it into the transform's *from
parent* direction, so the reference volume or segmentation under the transform node is shown as
it is at time t.
"""
from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence

import numpy as np
import vtk

import slicer

from . import segment_overlap
from .scene_utils import TemporaryNodes, nodes_of_class, ras_to_lps

logger = logging.getLogger(__name__)

#: attribute on STNeRP grid transforms whose interpolation must be linear (as ITK's)
INTERPOLATION_ATTRIBUTE = "STNeRP.Interpolation"
#: scenes whose loads restore that interpolation (Slicer has one scene for its lifetime)
_OBSERVED_SCENES: set[int] = set()


def _absolute(path: str) -> str:
    if not os.path.isabs(path):
        raise ValueError(f"path {path!r} is relative: storage nodes would resolve it against the scene's root folder")
    return path


# -- volumes ---------------------------------------------------------------------------------
def write_volume(volume_node: slicer.vtkMRMLVolumeNode, path: str, compression: bool = False) -> str:
    """Write a (scalar or labelmap) volume node to an absolute path (NRRD), keeping its geometry.

    Uncompressed by default: the worker's inputs are written while the panel waits, and gzip
    costs seconds per volume. The storage node is not added to the scene, so the scene is not
    changed. A node under a transform is refused: the file would hold it where Slicer does not show it
    (JobInputs.require_untransformed_volumes says so to the user first)."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError(f"volume {volume_node.GetName() if volume_node else None!r} has no image data")
    if volume_node.GetParentTransformNode() is not None:
        raise ValueError(f"volume '{volume_node.GetName()}' is under a transform: harden or remove it first")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(_absolute(path))
    storage.SetUseCompression(1 if compression else 0)
    if not storage.WriteData(volume_node):
        raise OSError(f"could not write volume '{volume_node.GetName()}' to {path}")
    return path


def read_volume(scene: slicer.vtkMRMLScene, path: str, name: str,
                node_class: str = "vtkMRMLScalarVolumeNode") -> slicer.vtkMRMLScalarVolumeNode:
    """Read an image file (absolute path) into a NEW volume node of the scene, with display node."""
    node = _read(scene, scene.AddNewNodeByClass(node_class, name), slicer.vtkMRMLVolumeArchetypeStorageNode(), path)
    node.CreateDefaultDisplayNodes()
    return node


def _read(scene: slicer.vtkMRMLScene, node: slicer.vtkMRMLStorableNode, storage: slicer.vtkMRMLStorageNode,
          path: str) -> slicer.vtkMRMLStorableNode:
    """Read a file (absolute path) into a node of the scene through a storage node kept in the
    scene (so the node can be saved with it); the node keeps its name."""
    if not os.path.isfile(_absolute(path)):
        raise OSError(f"missing file {path}")
    name = node.GetName()
    storage.SetFileName(path)
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        raise OSError(f"could not read {path}")
    node.SetName(name)
    return node


def read_volume_detached(path: str, labelmap: bool = False) -> slicer.vtkMRMLScalarVolumeNode:
    """Read an image file (absolute path) into a volume node that is NOT in any scene."""
    node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(_absolute(path))
    if not storage.ReadData(node):
        raise OSError(f"could not read volume {path}")
    return node


def volume_array(volume_node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """Voxel array (k, j, i) of a volume node (no copy)."""
    from vtk.util import numpy_support
    image = volume_node.GetImageData()
    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    arr = numpy_support.vtk_to_numpy(scalars)
    ncomp = scalars.GetNumberOfComponents()
    shape = (dims[2], dims[1], dims[0]) + ((ncomp,) if ncomp > 1 else ())
    return arr.reshape(shape)


# -- segmentations ---------------------------------------------------------------------------


def segment_terminology(segment: slicer.vtkSegment) -> str:
    """Terminology entry of a segment as text ('' when none). vtkSegment.GetTerminology exists
    from Slicer 5.10; before, the entry is the tag named by GetTerminologyEntryTagName()."""
    if hasattr(segment, "GetTerminology"):
        return segment.GetTerminology() or ""
    return _tagged_terminology(segment)


def _tagged_terminology(segment: slicer.vtkSegment) -> str:
    """The terminology tag of a segment, as Slicer <= 5.8 keeps it."""
    value = vtk.reference("")
    if not segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), value):
        return ""
    return str(value)


def set_segment_terminology(segment: slicer.vtkSegment, text: str | None) -> None:
    """Set a segment's terminology entry from text (nothing when empty): SetTerminology from Slicer 5.10,
    the tag named by GetTerminologyEntryTagName() before."""
    if not text:
        return
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(text)
    else:
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), text)


def segment_map_for(segmentation_node: slicer.vtkMRMLSegmentationNode,
                    segment_ids: Sequence[str] | None = None) -> list[dict]:
    """The value -> segment description used for the worker's labelmap: label value i+1 for
    the i-th selected segment (the order ExportSegmentsToLabelmapNode uses)."""
    segmentation = segmentation_node.GetSegmentation()
    if not segment_ids:
        ids = vtk.vtkStringArray()
        segmentation.GetSegmentIDs(ids)
        segment_ids = [ids.GetValue(i) for i in range(ids.GetNumberOfValues())]
    out = []
    for i, sid in enumerate(segment_ids):
        segment = segmentation.GetSegment(sid)
        if segment is None:
            raise ValueError(f"segment '{sid}' not found in '{segmentation_node.GetName()}'")
        out.append({"value": i + 1, "id": sid, "name": segment.GetName(),
                    "color": [float(c) for c in segment.GetColor()],
                    "terminology": segment_terminology(segment)})
    return out


def export_segmentation_labelmap(scene: slicer.vtkMRMLScene, segmentation_node: slicer.vtkMRMLSegmentationNode,
                                 segment_ids: Sequence[str] | None, reference_volume: slicer.vtkMRMLVolumeNode,
                                 path: str, segmentations_logic: slicer.vtkSlicerSegmentationsModuleLogic,
                                 segment_map: list[dict] | None = None) -> list[dict]:
    """Write the chosen segments as one integer labelmap on the reference volume's grid; a voxel
    in several segments goes to the smallest of them (segment_overlap).

    Returns the segment map (list of dicts value/id/name/color/terminology) that
    :func:`import_segmentation` uses to restore names, colours and terminology. Segments are
    matched by name to ``segment_map`` when given (e.g. a ground-truth segmentation exported
    with the reference's values); unmatched segments are left out."""
    if segment_map is None:
        segment_map = segment_map_for(segmentation_node, segment_ids)
        ordered = [(entry["id"], entry["value"]) for entry in segment_map]
    else:
        segmentation = segmentation_node.GetSegmentation()
        ordered = []
        for entry in segment_map:
            sid = segmentation.GetSegmentIdBySegmentName(entry["name"])
            if sid:
                ordered.append((sid, entry["value"]))
        if not ordered:
            raise ValueError(f"no segment of '{segmentation_node.GetName()}' matches the reference segments")
    # ExportSegmentsToLabelmapNode needs the labelmap node in the scene: add a temporary one
    with TemporaryNodes(scene):
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "STNeRP export")
        voxels = _export_each(segmentation_node, [sid for sid, _ in ordered], reference_volume, labelmap,
                              segmentations_logic)
        arr = volume_array(labelmap)
        arr[...] = segment_overlap.labelmap(voxels, [value for _, value in ordered], arr.size).reshape(arr.shape)
        labelmap.GetImageData().Modified()
        write_volume(labelmap, path)
    if len(ordered) == len(segment_map):
        values = [value for _, value in ordered]
        inside = segment_overlap.nested(voxels)
        for position, entry in enumerate(segment_map):
            entry["contains"] = [values[i] for i in inside.get(position, [])]
    return segment_map


def segment_voxels(scene: slicer.vtkMRMLScene, segmentation_node: slicer.vtkMRMLSegmentationNode,
                   segment_ids: Sequence[str], reference_volume: slicer.vtkMRMLVolumeNode,
                   segmentations_logic: slicer.vtkSlicerSegmentationsModuleLogic) -> list[np.ndarray]:
    """Each segment's voxels on the reference volume's grid (sorted flat indices of its (k, j, i)
    array), as Slicer's export paints the segment alone; the scene is left as it was."""
    with TemporaryNodes(scene):
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "STNeRP export")
        return _export_each(segmentation_node, segment_ids, reference_volume, labelmap, segmentations_logic)


def _export_each(segmentation_node: slicer.vtkMRMLSegmentationNode, segment_ids: Sequence[str],
                 reference_volume: slicer.vtkMRMLVolumeNode, labelmap: slicer.vtkMRMLLabelMapVolumeNode,
                 segmentations_logic: slicer.vtkSlicerSegmentationsModuleLogic) -> list[np.ndarray]:
    """Export the segments one at a time into `labelmap` (a node of the scene; it keeps the grid);
    returns each one's voxels as sorted flat indices."""
    out = []
    for sid in segment_ids:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(sid)
        if not segmentations_logic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, reference_volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            raise RuntimeError(f"could not export segment '{sid}' of '{segmentation_node.GetName()}'")
        out.append(np.flatnonzero(volume_array(labelmap)))
    return out


def import_segmentation(scene: slicer.vtkMRMLScene, labelmap_path: str, name: str, segment_map: list[dict],
                        segmentations_logic: slicer.vtkSlicerSegmentationsModuleLogic
                        ) -> slicer.vtkMRMLSegmentationNode:
    """Read a worker labelmap into a NEW segmentation node: one segment per entry of the
    segment map (names, colours, terminology restored; a label missing from the file gives an
    empty segment, so every time point has the same segments)."""
    labelmap = read_volume_detached(labelmap_path, labelmap=True)
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg_node.CreateDefaultDisplayNodes()
    seg_node.SetReferenceImageGeometryParameterFromVolumeNode(labelmap)
    for layer in _layers(labelmap, segment_map):
        if not segmentations_logic.ImportLabelmapToSegmentationNode(layer, seg_node):
            raise RuntimeError(f"could not import labelmap {labelmap_path}")
    segmentation = seg_node.GetSegmentation()
    by_value = {}
    for i in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(i)
        by_value[int(segmentation.GetSegment(sid).GetLabelValue())] = sid
    known = {int(e["value"]) for e in segment_map}
    for entry in segment_map:
        value = int(entry["value"])
        sid = by_value.get(value)
        if sid is None:
            sid = segmentation.AddEmptySegment("", entry["name"], entry.get("color"))
        segment = segmentation.GetSegment(sid)
        segment.SetName(entry["name"])
        if entry.get("color") is not None:
            segment.SetColor(*entry["color"][:3])
        set_segment_terminology(segment, entry.get("terminology"))
    # labels the map does not know (should not happen) keep default names
    for value, sid in by_value.items():
        if value not in known:
            logger.warning(f"STNeRP: label {value} of {labelmap_path} is not in the segment map")
    return seg_node


def _layers(labelmap: slicer.vtkMRMLLabelMapVolumeNode,
            segment_map: list[dict]) -> list[slicer.vtkMRMLLabelMapVolumeNode]:
    """The labelmap as Slicer should import it: whole, when no segment contains others; else one
    layer per segment that contains others (its label and theirs, as its value) and one for the
    rest, so nested contours come back whole (segment_overlap.nested)."""
    containing = [e for e in segment_map if e.get("contains")]
    if not containing:
        return [labelmap]
    labels = volume_array(labelmap).copy()
    layers = []
    for entry in containing:
        layer = _with_voxels(labelmap, np.where(np.isin(labels, [entry["value"], *entry["contains"]]),
                                                 entry["value"], 0))
        layers.append(layer)
    outer = [int(e["value"]) for e in containing]
    layers.append(_with_voxels(labelmap, np.where(np.isin(labels, outer), 0, labels)))
    return layers


def _with_voxels(labelmap: slicer.vtkMRMLLabelMapVolumeNode, voxels: np.ndarray) -> slicer.vtkMRMLLabelMapVolumeNode:
    """A detached copy of `labelmap` (its geometry) holding `voxels` ((k, j, i) array)."""
    copy = slicer.vtkMRMLLabelMapVolumeNode()
    copy.CopyOrientation(labelmap)
    image = vtk.vtkImageData()
    image.DeepCopy(labelmap.GetImageData())
    copy.SetAndObserveImageData(image)
    volume_array(copy)[...] = voxels
    image.Modified()
    return copy


# -- landmarks -------------------------------------------------------------------------------


def markups_points_ras(markups_node: slicer.vtkMRMLMarkupsNode) -> tuple[list[str], np.ndarray]:
    """(labels, Nx3 RAS world positions) of a markups point list."""
    labels, points = [], []
    for i in range(markups_node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(i, p)
        labels.append(markups_node.GetNthControlPointLabel(i))
        points.append(p)
    return labels, np.array(points, dtype=float).reshape(-1, 3)


def _pair_points(ref_labels: list[str], ref_points: np.ndarray, labels: list[str],
                 points: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pair by label when all labels are unique and shared, else by index."""
    if (len(set(ref_labels)) == len(ref_labels) and len(set(labels)) == len(labels)
            and set(labels) <= set(ref_labels) and labels):
        index = {lab: i for i, lab in enumerate(ref_labels)}
        return [(points[i], ref_points[index[lab]]) for i, lab in enumerate(labels)]
    n = min(len(ref_points), len(points))
    return [(points[i], ref_points[i]) for i in range(n)]


def export_landmarks_csv(path: str, reference_markups: slicer.vtkMRMLMarkupsNode,
                         followup_markups: Sequence[tuple[float, slicer.vtkMRMLMarkupsNode | None]]) -> int:
    """Write the worker's landmark CSV (time,x,y,z,ref_x,ref_y,ref_z; LPS mm).

    ``followup_markups``: list of (time, markups node) with points in the time-t image; each
    is paired with ``reference_markups`` by control point label (or by index). Returns the
    number of pairs written."""
    ref_labels, ref_points = markups_points_ras(reference_markups)
    rows = []
    for time, node in followup_markups:
        if node is None:
            continue
        labels, points = markups_points_ras(node)
        for p, q in _pair_points(ref_labels, ref_points, labels, points):
            rows.append([float(time)] + ras_to_lps(p) + ras_to_lps(q))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["time", "x", "y", "z", "ref_x", "ref_y", "ref_z"])
        for row in rows:
            writer.writerow([f"{v:.9g}" for v in row])
    return len(rows)


# -- transforms ------------------------------------------------------------------------------


def read_displacement_transform(scene: slicer.vtkMRMLScene, path: str, name: str) -> slicer.vtkMRMLGridTransformNode:
    """Read a worker displacement field (ITK, LPS, time-t point -> reference point) into a
    NEW grid transform node. Slicer stores it as the *from parent* transform; the grid is
    switched to linear interpolation so the node maps points exactly as ITK does."""
    node = _read(scene, scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name),
                 slicer.vtkMRMLTransformStorageNode(), path)
    set_grid_interpolation_linear(node)
    return node


def read_inverse_transform(scene: slicer.vtkMRMLScene, path: str, name: str) -> slicer.vtkMRMLGridTransformNode:
    """Read the exact inverse field (reference point -> time-t point, on the reference grid) into a
    NEW grid transform node whose *to parent* direction is that map: markups, models and
    closed-surface segments of the reference placed under it are shown at time t, without
    Slicer inverting a grid iteratively (which fails to converge on large deformations)."""
    node = read_displacement_transform(scene, path, name)
    node.Inverse()
    return node


def observe_scene_loading(scene: slicer.vtkMRMLScene) -> None:
    """Restore linear interpolation on STNeRP grids after every scene load into `scene`
    (idempotent: the module may ask at start-up and again when loaded later)."""
    if id(scene) in _OBSERVED_SCENES:
        return
    scene.AddObserver(scene.EndImportEvent, lambda caller, event: restore_grid_interpolation(caller))
    _OBSERVED_SCENES.add(id(scene))


def restore_grid_interpolation(scene: slicer.vtkMRMLScene) -> int:
    """Linear interpolation again on the STNeRP grid transforms of a scene just loaded, in the
    scene and inside its sequences (Slicer does not save the mode and reads grids as cubic);
    returns how many nodes were changed. A node whose grid could not be read is left alone: this
    runs in a scene-load observer."""
    nodes = [n for n in _transform_nodes(scene) if n.GetAttribute(INTERPOLATION_ATTRIBUTE) == "linear"]
    for node in nodes:
        for grid in _grid_transforms(node):
            grid.SetInterpolationModeToLinear()   # the node passes this on as TransformModifiedEvent
    return len(nodes)


def _transform_nodes(scene: slicer.vtkMRMLScene) -> list[slicer.vtkMRMLGridTransformNode]:
    """Grid transform nodes of the scene and the data nodes of its sequences."""
    nodes = nodes_of_class(scene, "vtkMRMLGridTransformNode")
    for sequence in nodes_of_class(scene, "vtkMRMLSequenceNode"):
        data = (sequence.GetNthDataNode(k) for k in range(sequence.GetNumberOfDataNodes()))
        nodes += [n for n in data if n is not None and n.IsA("vtkMRMLGridTransformNode")]
    return nodes


def set_grid_interpolation_linear(transform_node: slicer.vtkMRMLTransformNode) -> int:
    """Linear interpolation on every grid of a transform node (Slicer sets cubic on read)."""
    grids = _grid_transforms(transform_node)
    if not grids:
        raise RuntimeError(f"transform '{transform_node.GetName()}' holds no displacement grid")
    for grid in grids:
        grid.SetInterpolationModeToLinear()
    transform_node.SetAttribute(INTERPOLATION_ATTRIBUTE, "linear")
    return len(grids)


def _grid_transforms(transform_node: slicer.vtkMRMLTransformNode) -> list[vtk.vtkGridTransform]:
    """Every vtkGridTransform of a node (through concatenations and inversions), whichever
    direction holds it."""
    grids, stack = [], [transform_node.GetTransformFromParent(), transform_node.GetTransformToParent()]
    while stack:
        t = stack.pop()
        if t is None:
            continue
        if hasattr(t, "GetNumberOfConcatenatedTransforms") and t.IsA("vtkGeneralTransform"):
            stack.extend(t.GetConcatenatedTransform(i) for i in range(t.GetNumberOfConcatenatedTransforms()))
        elif t.IsA("vtkGridTransform"):
            grids.append(t)
    return grids
