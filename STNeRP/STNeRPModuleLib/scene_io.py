"""MRML <-> files for the STNeRP module, without Qt.

All file I/O goes through MRML storage nodes (vtkMRMLVolumeArchetypeStorageNode,
vtkMRMLTransformStorageNode), so geometry is handled exactly as Slicer handles it when a
user loads or saves data. Functions take the scene and the module logic objects they need
(vtkSlicerSegmentationsModuleLogic, ...) as arguments; nothing here asks ``slicer.app``.

Coordinate conventions (see DESIGN.md): files are LPS, the scene is RAS. A worker
displacement field maps a time-t point to the matching reference point; Slicer reads it into
the transform's *from parent* direction, so the reference volume / segmentation placed under
the transform node is shown as it is at time t.
"""

import csv
import json
import logging
import math
import os

import numpy as np
import vtk

import slicer

logger = logging.getLogger(__name__)

#: attribute set on every node this module creates, value = run folder
RUN_ATTRIBUTE = "STNeRP.RunDirectory"
#: attribute on imported nodes: the time value (user's units) as text
TIME_ATTRIBUTE = "STNeRP.Time"
#: attribute on imported nodes: the kind of result (transform, segmentation, jacobian, image)
KIND_ATTRIBUTE = "STNeRP.Kind"


# ---------------------------------------------------------------------------------------------
# small helpers


def lps_to_ras(point):
    return [-float(point[0]), -float(point[1]), float(point[2])]


def ras_to_lps(point):
    return [-float(point[0]), -float(point[1]), float(point[2])]


def register_segmentation_converters():
    """Register the closed-surface converter rules once (the Slicer app does this at startup;
    the slicer-core wheel does not, and segmentation nodes need them)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    rules = factory.GetConverterRules()
    names = set()
    for rule in rules or ():
        names.add(rule.GetClassName())
    for cls in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        if cls.__name__ not in names:
            factory.RegisterConverterRule(cls())


def _node_ids(scene):
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def format_time(t):
    """Short text for a time value: 1.0 -> '1', 2.5 -> '2.5'."""
    t = float(t)
    if t.is_integer():
        return str(int(t))
    return ("%.6g" % t)


def remove_nodes(scene, nodes):
    """Remove nodes from the scene: sequence browsers first (a live browser would re-create
    the proxy nodes removed before it), then the others in reverse order of creation."""
    nodes = [n for n in nodes if n is not None]
    browsers = [n for n in nodes if n.IsA("vtkMRMLSequenceBrowserNode")]
    for node in browsers + [n for n in reversed(nodes) if not n.IsA("vtkMRMLSequenceBrowserNode")]:
        if scene.IsNodePresent(node):
            scene.RemoveNode(node)


class SceneTransaction:
    """Removes every node added to the scene (and a subject-hierarchy folder) when the block
    raises, so a failed import leaves the scene's node count unchanged."""

    def __init__(self, scene):
        self.scene = scene
        self.folder_item = None
        self._before = None

    def __enter__(self):
        self._before = set(_node_ids(self.scene))
        return self

    def added_nodes(self):
        out = []
        for i in range(self.scene.GetNumberOfNodes()):
            node = self.scene.GetNthNode(i)
            if node.GetID() not in self._before:
                out.append(node)
        return out

    def rollback(self):
        remove_nodes(self.scene, self.added_nodes())
        sh = self.scene.GetSubjectHierarchyNode()
        if sh is not None and self.folder_item and sh.GetItemName(self.folder_item):
            sh.RemoveItem(self.folder_item, False, True)
        self.folder_item = None

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            try:
                self.rollback()
            except Exception:  # never hide the original error
                logger.exception("STNeRP: rollback after a failed import failed")
        return False


# ---------------------------------------------------------------------------------------------
# volumes


def write_volume(volume_node, path, compression=True):
    """Write a (scalar or labelmap) volume node to a file (NRRD), keeping its geometry.

    The storage node is not added to the scene, so the scene is not changed. A parent
    transform of the node is not applied (the file holds the node's own geometry)."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError("volume %r has no image data" % (volume_node.GetName() if volume_node else None))
    if volume_node.GetParentTransformNode() is not None:
        logger.warning("STNeRP: volume '%s' is under a transform; the transform is not applied to the "
                       "exported file", volume_node.GetName())
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetUseCompression(1 if compression else 0)
    if not storage.WriteData(volume_node):
        raise IOError("could not write volume '%s' to %s" % (volume_node.GetName(), path))
    return path


def read_volume(scene, path, name, node_class="vtkMRMLScalarVolumeNode", keep_storage=True):
    """Read an image file into a NEW volume node of the scene (with display node)."""
    if not os.path.isfile(path):
        raise IOError("missing file %s" % path)
    node = scene.AddNewNodeByClass(node_class, name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    if keep_storage:
        scene.AddNode(storage)
        node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        raise IOError("could not read volume %s" % path)
    node.SetName(name)
    node.CreateDefaultDisplayNodes()
    return node


def read_volume_detached(path, labelmap=False):
    """Read an image file into a volume node that is NOT in any scene."""
    node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    if not storage.ReadData(node):
        raise IOError("could not read volume %s" % path)
    return node


def volume_array(volume_node):
    """Voxel array (k, j, i) of a volume node (no copy)."""
    from vtk.util import numpy_support
    image = volume_node.GetImageData()
    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    arr = numpy_support.vtk_to_numpy(scalars)
    ncomp = scalars.GetNumberOfComponents()
    shape = (dims[2], dims[1], dims[0]) + ((ncomp,) if ncomp > 1 else ())
    return arr.reshape(shape)


def ijk_to_ras_matrix(volume_node):
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


# ---------------------------------------------------------------------------------------------
# segmentations


def _segment_terminology(segment):
    """Terminology entry of a segment as text ('' when none / not supported)."""
    if hasattr(segment, "GetTerminology"):
        return segment.GetTerminology() or ""
    return ""


def _set_segment_terminology(segment, text):
    if not text:
        return
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(text)
    else:
        segment.SetTag("TerminologyEntry", text)


def segment_map_for(segmentation_node, segment_ids=None):
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
            raise ValueError("segment '%s' not found in '%s'" % (sid, segmentation_node.GetName()))
        out.append({"value": i + 1, "id": sid, "name": segment.GetName(),
                    "color": [float(c) for c in segment.GetColor()],
                    "terminology": _segment_terminology(segment)})
    return out


def export_segmentation_labelmap(scene, segmentation_node, segment_ids, reference_volume, path,
                                 segmentations_logic, segment_map=None):
    """Write the chosen segments as one integer labelmap on the reference volume's grid.

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
            raise ValueError("no segment of '%s' matches the reference segments" % segmentation_node.GetName())
    ids = vtk.vtkStringArray()
    for sid, _ in ordered:
        ids.InsertNextValue(sid)
    # ExportSegmentsToLabelmapNode needs the labelmap node in the scene: add a temporary one
    with _TemporaryNodes(scene):
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "STNeRP export")
        ok = segmentations_logic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, reference_volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        if not ok:
            raise RuntimeError("could not export segmentation '%s'" % segmentation_node.GetName())
        # positions 1..n -> the wanted label values
        arr = volume_array(labelmap)
        wanted = np.zeros(len(ordered) + 1, dtype=np.int32)
        for pos, (_, value) in enumerate(ordered):
            wanted[pos + 1] = value
        if not all(wanted[i] == i for i in range(len(wanted))):
            arr[...] = wanted[arr.astype(np.int64)].astype(arr.dtype)
            labelmap.GetImageData().Modified()
        write_volume(labelmap, path)
    return segment_map


class _TemporaryNodes(SceneTransaction):
    """Every node added inside the block is removed at its end (export helpers)."""

    def __exit__(self, exc_type, exc, tb):
        self.rollback()
        return False


def import_segmentation(scene, labelmap_path, name, segment_map, segmentations_logic, geometry_node=None):
    """Read a worker labelmap into a NEW segmentation node: one segment per entry of the
    segment map (names, colours, terminology restored; a label missing from the file gives an
    empty segment, so every time point has the same segments)."""
    labelmap = read_volume_detached(labelmap_path, labelmap=True)
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg_node.CreateDefaultDisplayNodes()
    geometry = geometry_node if geometry_node is not None else labelmap
    seg_node.SetReferenceImageGeometryParameterFromVolumeNode(geometry)
    if not segmentations_logic.ImportLabelmapToSegmentationNode(labelmap, seg_node):
        raise RuntimeError("could not import labelmap %s" % labelmap_path)
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
        _set_segment_terminology(segment, entry.get("terminology"))
    # labels the map does not know (should not happen) keep default names
    for value, sid in by_value.items():
        if value not in known:
            logger.warning("STNeRP: label %d of %s is not in the segment map", value, labelmap_path)
    return seg_node


# ---------------------------------------------------------------------------------------------
# landmarks


def markups_points_ras(markups_node):
    """(labels, Nx3 RAS world positions) of a markups point list."""
    labels, points = [], []
    for i in range(markups_node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(i, p)
        labels.append(markups_node.GetNthControlPointLabel(i))
        points.append(p)
    return labels, np.array(points, dtype=float).reshape(-1, 3)


def _pair_points(ref_labels, ref_points, labels, points):
    """Pair by label when all labels are unique and shared, else by index."""
    if (len(set(ref_labels)) == len(ref_labels) and len(set(labels)) == len(labels)
            and set(labels) <= set(ref_labels) and labels):
        index = {lab: i for i, lab in enumerate(ref_labels)}
        return [(points[i], ref_points[index[lab]]) for i, lab in enumerate(labels)]
    n = min(len(ref_points), len(points))
    return [(points[i], ref_points[i]) for i in range(n)]


def export_landmarks_csv(path, reference_markups, followup_markups):
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
            writer.writerow(["%.9g" % v for v in row])
    return len(rows)


# ---------------------------------------------------------------------------------------------
# transforms


def read_displacement_transform(scene, path, name, linear=True):
    """Read a worker displacement field (ITK, LPS, time-t point -> reference point) into a
    NEW grid transform node. Slicer stores it as the *from parent* transform; the grid is
    switched to linear interpolation so the node maps points exactly as ITK does."""
    if not os.path.isfile(path):
        raise IOError("missing file %s" % path)
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    storage = slicer.vtkMRMLTransformStorageNode()
    storage.SetFileName(path)
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        raise IOError("could not read transform %s" % path)
    node.SetName(name)
    if linear:
        set_grid_interpolation_linear(node)
    return node


def restore_grid_interpolation(scene):
    """Linear interpolation again on the STNeRP grid transforms of a scene just loaded (Slicer
    does not save the mode and reads grids as cubic); returns how many nodes were changed. A node
    whose grid could not be read is left alone: this runs in a scene-load observer."""
    grids = [scene.GetNthNodeByClass(i, "vtkMRMLGridTransformNode")
             for i in range(scene.GetNumberOfNodesByClass("vtkMRMLGridTransformNode"))]
    nodes = [n for n in grids if n.GetAttribute("STNeRP.Interpolation") == "linear"]
    for node in nodes:
        for grid in _grid_transforms(node):
            grid.SetInterpolationModeToLinear()
    return len(nodes)


def set_grid_interpolation_linear(transform_node):
    """Linear interpolation on every grid of a transform node (Slicer sets cubic on read)."""
    grids = _grid_transforms(transform_node)
    if not grids:
        raise RuntimeError("transform '%s' holds no displacement grid" % transform_node.GetName())
    for grid in grids:
        grid.SetInterpolationModeToLinear()
    transform_node.SetAttribute("STNeRP.Interpolation", "linear")
    return len(grids)


def _grid_transforms(transform_node):
    """Every vtkGridTransform in a node's from-parent transform (through concatenations)."""
    grids, stack = [], [transform_node.GetTransformFromParent()]
    while stack:
        t = stack.pop()
        if t is None:
            continue
        if hasattr(t, "GetNumberOfConcatenatedTransforms") and t.IsA("vtkGeneralTransform"):
            stack.extend(t.GetConcatenatedTransform(i) for i in range(t.GetNumberOfConcatenatedTransforms()))
        elif t.IsA("vtkGridTransform"):
            grids.append(t)
    return grids


def set_registration_references(transform_node, fixed_node=None, moving_node=None):
    if fixed_node is not None:
        transform_node.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole(), fixed_node.GetID())
    if moving_node is not None:
        transform_node.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole(), moving_node.GetID())


# ---------------------------------------------------------------------------------------------
# Jacobian display


def create_diverging_color_table(scene, name="STNeRP Jacobian", n=256):
    """Blue (compression) - white (1, volume preserved) - red (expansion)."""
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    table.SetTypeToUser()
    table.SetNumberOfColors(n)
    for i in range(n):
        t = 2.0 * i / (n - 1) - 1.0  # -1 .. 1
        if t < 0:
            r, g, b = 1.0 + 0.8 * t, 1.0 + 0.8 * t, 1.0 + 0.3 * t
        else:
            r, g, b = 1.0 - 0.3 * t, 1.0 - 0.8 * t, 1.0 - 0.8 * t
        table.SetColor(i, "", r, g, b, 1.0)
    table.SetAttribute("Category", "STNeRP")
    return table


def jacobian_window(values, percentile=99.0, minimum_half_width=0.05):
    """(window, level) of a Jacobian map: centred at 1, symmetric, wide enough for the 1st and
    99th percentiles (so the colour of 1 is always the middle of the diverging table)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 2.0 * minimum_half_width, 1.0
    lo = np.percentile(values, 100.0 - percentile)
    hi = np.percentile(values, percentile)
    half = max(1.0 - lo, hi - 1.0, minimum_half_width)
    return 2.0 * half, 1.0


def read_jacobian(scene, path, name, color_table):
    node = read_volume(scene, path, name)
    window, level = jacobian_window(volume_array(node))
    display = node.GetDisplayNode()
    if display is not None:
        display.SetAndObserveColorNodeID(color_table.GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevel(window, level)
    return node


# ---------------------------------------------------------------------------------------------
# sequences and tables


def create_sequence(scene, name, items, index_name="time", index_unit=""):
    """A NEW sequence node holding copies of ``items`` [(time, node)], numeric index = time."""
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    sequence.SetIndexName(index_name)
    sequence.SetIndexUnit(index_unit)
    sequence.SetIndexType(slicer.vtkMRMLSequenceNode.NumericIndex)
    for time, node in sorted(items, key=lambda it: float(it[0])):
        sequence.SetDataNodeAtValue(node, format_time(time))
    return sequence


def create_browser(scene, name, sequences):
    """A NEW sequence browser playing ``sequences`` in sync (first one is the master). The
    Sequences logic of the scene must be registered first (it creates the proxy nodes)."""
    sequences = [s for s in sequences if s is not None]
    if not sequences:
        return None
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", name)
    browser.SetAndObserveMasterSequenceNodeID(sequences[0].GetID())
    for seq in sequences[1:]:
        browser.AddSynchronizedSequenceNodeID(seq.GetID())
    browser.SetSelectedItemNumber(0)
    return browser


def _metric_number(value):
    if value is None:
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def create_metrics_table(scene, name, time_points, segment_map=None):
    """A NEW table node: one row per time point, columns time, scanned, folded voxels,
    Jacobian min/max, PSNR, SSIM, Dice per segment (by name), TRE mean/std/max."""
    names = {str(e["value"]): e["name"] for e in (segment_map or [])}
    dice_keys = []
    for tp in time_points:
        for key in ((tp.get("metrics") or {}).get("dice") or {}):
            if str(key) not in dice_keys:
                dice_keys.append(str(key))
    columns = [("time", "time"), ("scanned", "scanned"), ("folded_voxels", "folded voxels"),
               ("jacobian_min", "Jacobian min"), ("jacobian_max", "Jacobian max"),
               ("psnr", "PSNR (dB)"), ("ssim", "SSIM")]
    columns += [("dice:" + k, "Dice " + names.get(k, "label " + k)) for k in dice_keys]
    columns += [("tre_mean", "TRE mean (mm)"), ("tre_std", "TRE std (mm)"), ("tre_max", "TRE max (mm)")]
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = table_node.GetTable()
    rows = sorted(time_points, key=lambda tp: float(tp["time"]))
    arrays = []
    for key, title in columns:
        arr = vtk.vtkDoubleArray()
        arr.SetName(title)
        for tp in rows:
            metrics = tp.get("metrics") or {}
            if key == "time":
                v = tp["time"]
            elif key == "scanned":
                v = 1.0 if tp.get("scanned") else 0.0
            elif key.startswith("dice:"):
                v = (metrics.get("dice") or {}).get(key[5:])
            else:
                v = metrics.get(key)
            arr.InsertNextValue(_metric_number(v))
        arrays.append(arr)
        table.AddColumn(arr)
    table_node.Modified()
    return table_node


# ---------------------------------------------------------------------------------------------
# run folders


class RunFolderError(RuntimeError):
    pass


def read_run_json(run_dir):
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        raise RunFolderError("%s has no run.json" % run_dir)
    with open(path) as f:
        return json.load(f)


def _run_path(run_dir, relative):
    if not relative:
        return None
    path = relative if os.path.isabs(relative) else os.path.join(run_dir, relative)
    return os.path.normpath(path)


def place_in_folder(sh, node, folder_item):
    """Put a node under a subject-hierarchy folder (creating its item when no subject
    hierarchy logic made one, as in the slicer-core wheel)."""
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, folder_item)
    else:
        sh.CreateItem(folder_item, node)


class ImportedRun:
    """What :func:`import_run` added to the scene."""

    def __init__(self):
        self.folder_item = None
        self.time_points = {}  # time -> {"transform", "segmentation", "jacobian", "image"}
        self.sequences = {}    # kind -> sequence node
        self.browser = None
        self.table = None
        self.color_table = None
        self.node_ids = []     # every node the import added (for remove_imported)

    def nodes(self, kind):
        return [self.time_points[t][kind] for t in sorted(self.time_points) if self.time_points[t].get(kind)]


def import_run(scene, run_dir, segmentations_logic, name="STNeRP", segment_map=None,
               reference_volume=None, fixed_volumes=None, create_sequences=True, times=None):
    """Load a finished worker run folder as NEW nodes under one subject-hierarchy folder.

    Only a run whose run.json says ``"status": "complete"`` is imported. On any error every
    node added so far is removed again (the scene's node count is unchanged) and the error is
    raised. ``fixed_volumes``: {time: volume node} for the fixed-node reference of each
    transform; ``times``: import only these time points (default all)."""
    record = read_run_json(run_dir)
    if record.get("status") != "complete":
        raise RunFolderError("run %s is not complete (status %r): %s"
                             % (run_dir, record.get("status"), record.get("error") or "no error message"))
    time_points = list(record.get("time_points") or [])
    if times is not None:
        wanted = [float(t) for t in times]
        time_points = [tp for tp in time_points if any(abs(float(tp["time"]) - w) < 1e-9 for w in wanted)]
    if not time_points:
        raise RunFolderError("run %s has no time points to import" % run_dir)
    fixed_volumes = fixed_volumes or {}
    segment_map = segment_map or []
    result = ImportedRun()
    sh = scene.GetSubjectHierarchyNode()
    with SceneTransaction(scene) as transaction:
        result.folder_item = sh.CreateFolderItem(sh.GetSceneItemID(), name)
        transaction.folder_item = result.folder_item
        color_table = None
        for tp in sorted(time_points, key=lambda tp: float(tp["time"])):
            t = float(tp["time"])
            label = "%s t=%s" % (name, format_time(t))
            entry = {}
            fixed = None
            for key, value in fixed_volumes.items():
                if abs(float(key) - t) < 1e-9:
                    fixed = value
            if tp.get("displacement"):
                node = read_displacement_transform(scene, _run_path(run_dir, tp["displacement"]), label + " transform")
                set_registration_references(node, fixed, reference_volume)
                entry["transform"] = node
            if tp.get("labelmap"):
                if not segment_map:
                    raise RunFolderError("the run has labelmaps but no segment map was given")
                entry["segmentation"] = import_segmentation(
                    scene, _run_path(run_dir, tp["labelmap"]), label + " segmentation", segment_map,
                    segmentations_logic, geometry_node=None)
            if tp.get("jacobian"):
                if color_table is None:
                    color_table = create_diverging_color_table(scene, name + " Jacobian colors")
                    result.color_table = color_table
                entry["jacobian"] = read_jacobian(scene, _run_path(run_dir, tp["jacobian"]), label + " Jacobian",
                                                  color_table)
            if tp.get("image"):
                entry["image"] = read_volume(scene, _run_path(run_dir, tp["image"]), label + " predicted image")
            for kind, node in entry.items():
                node.SetAttribute(RUN_ATTRIBUTE, run_dir)
                node.SetAttribute(TIME_ATTRIBUTE, repr(t))
                node.SetAttribute(KIND_ATTRIBUTE, kind)
                place_in_folder(sh, node, result.folder_item)
            result.time_points[t] = entry
        if create_sequences and len(result.time_points) > 1:
            for kind, title in (("transform", "transforms"), ("segmentation", "segmentations"),
                                ("image", "predicted images"), ("jacobian", "Jacobians")):
                items = [(t, e[kind]) for t, e in result.time_points.items() if e.get(kind) is not None]
                if len(items) == len(result.time_points):
                    seq = create_sequence(scene, "%s %s" % (name, title), items)
                    seq.SetAttribute(RUN_ATTRIBUTE, run_dir)
                    place_in_folder(sh, seq, result.folder_item)
                    result.sequences[kind] = seq
            if result.sequences:
                order = [result.sequences[k] for k in ("transform", "segmentation", "image", "jacobian")
                         if k in result.sequences]
                result.browser = create_browser(scene, name + " browser", order)
                place_in_folder(sh, result.browser, result.folder_item)
                for seq in order:
                    proxy = result.browser.GetProxyNode(seq)
                    if proxy is not None:
                        place_in_folder(sh, proxy, result.folder_item)
        result.table = create_metrics_table(scene, name + " metrics", time_points, segment_map)
        result.table.SetAttribute(RUN_ATTRIBUTE, run_dir)
        place_in_folder(sh, result.table, result.folder_item)
        result.node_ids = [node.GetID() for node in transaction.added_nodes()]
    return result


def remove_imported(scene, result):
    """Remove everything an :func:`import_run` added (nodes, storage/display nodes, proxies,
    the folder), e.g. the previous time-slider prediction."""
    if result is None:
        return
    remove_nodes(scene, [scene.GetNodeByID(node_id) for node_id in result.node_ids])
    sh = scene.GetSubjectHierarchyNode()
    if sh is not None and result.folder_item and sh.GetItemName(result.folder_item):
        sh.RemoveItem(result.folder_item, False, True)
    result.node_ids = []
    result.folder_item = None


def isfinite(v):
    return v is not None and math.isfinite(float(v))
