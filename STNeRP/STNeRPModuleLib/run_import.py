"""A finished worker run folder -> new scene nodes, without Qt: per time point a grid transform,
the propagated segmentation, the Jacobian determinant map and the predicted image; sequences of
them with a browser; a metrics table. A failed import leaves the scene as it was.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import vtk

import slicer
from STNeRPLib import contract

from . import plots, scene_files
from .scene_utils import (KIND_ATTRIBUTE, RUN_ATTRIBUTE, TIME_ATTRIBUTE, SceneTransaction, place_in_folder,
                          remove_folder, remove_nodes)

#: kinds of node per time point, and their sequences' titles, in the browser's order
SEQUENCE_TITLES = {"transform": "transforms", "segmentation": "segmentations", "image": "predicted images",
                   "jacobian": "Jacobians", "inverse": "reference to t"}


class RunFolderError(RuntimeError):
    """A run folder that cannot be imported (missing, unreadable, not complete)."""


@dataclass
class ImportedRun:
    """What :func:`import_run` added to the scene: the nodes themselves, not their IDs (IDs are
    reused after a scene close)."""

    run_dir: str
    folder_item: int = 0
    time_points: dict[float, dict[str, slicer.vtkMRMLNode]] = field(default_factory=dict)   # time -> {kind: node}
    sequences: dict[str, slicer.vtkMRMLSequenceNode] = field(default_factory=dict)        # kind -> sequence
    browser: slicer.vtkMRMLSequenceBrowserNode | None = None
    table: slicer.vtkMRMLTableNode | None = None
    chart: slicer.vtkMRMLPlotChartNode | None = None      # structure volume against time (report data)
    jacobian_table: slicer.vtkMRMLTableNode | None = None  # det J statistics per segment (report data)
    nodes: list[slicer.vtkMRMLNode] = field(default_factory=list)   # every node the import added


def read_record(run_dir: str) -> dict:
    """run.json of a run folder; RunFolderError with one line when it cannot be read."""
    try:
        return contract.read_run(run_dir)
    except FileNotFoundError:
        raise RunFolderError(f"{run_dir} has no {contract.RUN_FILE}") from None
    except (OSError, ValueError) as error:
        raise RunFolderError(f"the {contract.RUN_FILE} of {run_dir} cannot be read: {error}") from None


def run_times(run_dir: str) -> list[float]:
    """The times of a run's time points, sorted ([] when the folder cannot be read)."""
    try:
        record = read_record(run_dir)
    except RunFolderError:
        return []
    return sorted(float(tp["time"]) for tp in record.get("time_points") or [])


def import_run(scene: slicer.vtkMRMLScene, run_dir: str,
               segmentations_logic: slicer.vtkSlicerSegmentationsModuleLogic, name: str = "STNeRP",
               segment_map: list[dict] | None = None,
               reference_volume: slicer.vtkMRMLScalarVolumeNode | None = None,
               fixed_volumes: dict[float, slicer.vtkMRMLScalarVolumeNode] | None = None,
               create_sequences: bool = True) -> ImportedRun:
    """Load a complete worker run folder (absolute path) as NEW nodes under one subject-hierarchy
    folder. On any error every node added so far is removed again and the error is raised.
    fixed_volumes: {time: volume node}, the fixed-node reference of each transform."""
    record = read_record(run_dir)
    if not contract.is_complete(record):
        raise RunFolderError(f"run {run_dir} is not complete (status {record.get('status')!r}): "
                             f"{record.get('error') or 'no error message'}")
    time_points = sorted(record.get("time_points") or [], key=lambda tp: float(tp["time"]))
    if not time_points:
        raise RunFolderError(f"run {run_dir} has no time points to import")
    result = ImportedRun(run_dir)
    sh = scene.GetSubjectHierarchyNode()
    with SceneTransaction(scene) as transaction:
        result.folder_item = sh.CreateFolderItem(sh.GetSceneItemID(), name)
        sh.SetItemAttribute(result.folder_item, RUN_ATTRIBUTE, run_dir)
        transaction.folder_item = result.folder_item
        colors = None
        for tp in time_points:
            t = float(tp["time"])
            if tp.get("jacobian") and colors is None:
                colors = create_diverging_color_table(scene, f"{name} Jacobian colors")
            fixed = next((v for k, v in (fixed_volumes or {}).items() if abs(float(k) - t) < 1e-9), None)
            entry = _import_time_point(scene, run_dir, tp, f"{name} t={contract.format_time(t)}",
                                       segmentations_logic, segment_map or [], colors, fixed, reference_volume)
            for kind, node in entry.items():
                node.SetAttribute(RUN_ATTRIBUTE, run_dir)
                node.SetAttribute(TIME_ATTRIBUTE, repr(t))
                node.SetAttribute(KIND_ATTRIBUTE, kind)
                place_in_folder(sh, node, result.folder_item)
            if entry.get("segmentation") is not None and fixed is not None:
                _place_under_study(sh, entry["segmentation"], fixed)
            result.time_points[t] = entry
        if create_sequences and len(result.time_points) > 1:
            _create_sequences(scene, result, name)
        result.table = create_metrics_table(scene, f"{name} metrics", time_points, segment_map,
                                            contract.intensity_calibrations(record))
        result.table.SetAttribute(RUN_ATTRIBUTE, run_dir)
        place_in_folder(sh, result.table, result.folder_item)
        _import_report_data(scene, result, name, segment_map)
        result.nodes = transaction.added_nodes()
    return result


def _import_time_point(scene: slicer.vtkMRMLScene, run_dir: str, tp: dict, label: str,
                       segmentations_logic: slicer.vtkSlicerSegmentationsModuleLogic, segment_map: list[dict],
                       colors: slicer.vtkMRMLColorTableNode | None, fixed: slicer.vtkMRMLScalarVolumeNode | None,
                       reference_volume: slicer.vtkMRMLScalarVolumeNode | None) -> dict[str, slicer.vtkMRMLNode]:
    """The nodes of one time point: {kind: node} for the files its run.json entry names."""
    entry = {}
    if tp.get("displacement"):
        node = scene_files.read_displacement_transform(scene, _run_path(run_dir, tp["displacement"]),
                                                       f"{label} transform")
        _set_registration_references(node, fixed, reference_volume)
        entry["transform"] = node
    if tp.get("labelmap"):
        if not segment_map:
            raise RunFolderError("the run has labelmaps but no segment map was given")
        entry["segmentation"] = scene_files.import_segmentation(
            scene, _run_path(run_dir, tp["labelmap"]), f"{label} segmentation", segment_map, segmentations_logic)
    if tp.get("jacobian"):
        entry["jacobian"] = read_jacobian(scene, _run_path(run_dir, tp["jacobian"]), f"{label} Jacobian", colors)
    if tp.get("image"):
        entry["image"] = scene_files.read_volume(scene, _run_path(run_dir, tp["image"]), f"{label} predicted image")
    if tp.get("inverse_displacement"):
        entry["inverse"] = scene_files.read_inverse_transform(
            scene, _run_path(run_dir, tp["inverse_displacement"]), f"{label} reference to t")
    return entry


def _place_under_study(sh: slicer.vtkMRMLSubjectHierarchyNode, segmentation: slicer.vtkMRMLSegmentationNode,
                       scan: slicer.vtkMRMLScalarVolumeNode) -> None:
    """Put the contours propagated to a scan under that scan's DICOM study, when it has one, so
    that Slicer's DICOM export (SlicerRT's RT Structure Set) references the right patient, study
    and frame of reference."""
    study = sh.GetItemParent(sh.GetItemByDataNode(scan))
    if study and sh.IsItemLevel(study, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy()):
        sh.SetItemParent(sh.GetItemByDataNode(segmentation), study)


def _create_sequences(scene: slicer.vtkMRMLScene, result: ImportedRun, name: str) -> None:
    """A sequence per kind that every time point has, and one browser playing them in sync."""
    sh = scene.GetSubjectHierarchyNode()
    for kind, title in SEQUENCE_TITLES.items():
        items = [(t, e[kind]) for t, e in result.time_points.items() if e.get(kind) is not None]
        if len(items) == len(result.time_points):
            sequence = create_sequence(scene, f"{name} {title}", items)
            sequence.SetAttribute(RUN_ATTRIBUTE, result.run_dir)
            place_in_folder(sh, sequence, result.folder_item)
            result.sequences[kind] = sequence
    if not result.sequences:
        return
    order = list(result.sequences.values())
    result.browser = create_browser(scene, f"{name} browser", order)
    place_in_folder(sh, result.browser, result.folder_item)
    for sequence in order:
        proxy = result.browser.GetProxyNode(sequence)
        if proxy is not None:
            place_in_folder(sh, proxy, result.folder_item)


def _import_report_data(scene: slicer.vtkMRMLScene, result: ImportedRun, name: str,
                        segment_map: list[dict] | None) -> None:
    """The report's structure volume against time (a plot chart) and det J statistics per segment
    (a table), named after the segments, when the run wrote its report."""
    names = {int(e["value"]): e["name"] for e in segment_map or []}
    try:
        result.chart = plots.structure_volume_plot(scene, result.run_dir, names, prefix=name)[0]
        result.jacobian_table = plots.jacobian_statistics_table(scene, result.run_dir, names, prefix=name)
    except plots.ReportDataMissing:
        return
    sh = scene.GetSubjectHierarchyNode()
    for node in (result.chart, result.jacobian_table):
        place_in_folder(sh, node, result.folder_item)


def remove_imported(scene: slicer.vtkMRMLScene, result: ImportedRun | None) -> None:
    """Remove what an import added (nodes, storage and display nodes, proxies, its folder) and is
    still in the scene; after a scene close nothing of it is, and nothing is removed."""
    if result is None:
        return
    remove_nodes(scene, result.nodes)
    remove_folder(scene, result.folder_item, result.run_dir)
    result.nodes = []
    result.folder_item = 0


def _run_path(run_dir: str, relative: str) -> str:
    return os.path.normpath(relative if os.path.isabs(relative) else os.path.join(run_dir, relative))


def _set_registration_references(transform_node: slicer.vtkMRMLTransformNode,
                                 fixed_node: slicer.vtkMRMLScalarVolumeNode | None,
                                 moving_node: slicer.vtkMRMLScalarVolumeNode | None) -> None:
    if fixed_node is not None:
        transform_node.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole(), fixed_node.GetID())
    if moving_node is not None:
        transform_node.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole(), moving_node.GetID())


# -- Jacobian display ------------------------------------------------------------------------
def create_diverging_color_table(scene: slicer.vtkMRMLScene, name: str = "STNeRP Jacobian",
                                 n: int = 256) -> slicer.vtkMRMLColorTableNode:
    """Blue (det J < 1: the tissue at t is larger than in the reference) - white (1, volume kept) -
    red (det J > 1: smaller than in the reference); see ARCHITECTURE.md, "Jacobian determinant"."""
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


def jacobian_window(values: Iterable[float] | np.ndarray, percentile: float = 99.0,
                    minimum_half_width: float = 0.05) -> tuple[float, float]:
    """(window, level) of a Jacobian map: centred at 1, symmetric, wide enough for the 1st and
    99th percentiles (so the colour of 1 is always the middle of the diverging table)."""
    array = np.asarray(values, dtype=float)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return 2.0 * minimum_half_width, 1.0
    lo = np.percentile(array, 100.0 - percentile)
    hi = np.percentile(array, percentile)
    half = max(1.0 - lo, hi - 1.0, minimum_half_width)
    return 2.0 * half, 1.0


def read_jacobian(scene: slicer.vtkMRMLScene, path: str, name: str,
                  color_table: slicer.vtkMRMLColorTableNode) -> slicer.vtkMRMLScalarVolumeNode:
    """Read a Jacobian determinant map (absolute path) into a NEW volume node, shown with the diverging
    colour table and the window and level of jacobian_window (centred at 1)."""
    node = scene_files.read_volume(scene, path, name)
    window, level = jacobian_window(scene_files.volume_array(node))
    display = node.GetDisplayNode()
    if display is not None:
        display.SetAndObserveColorNodeID(color_table.GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevel(window, level)
    return node


# -- sequences and tables --------------------------------------------------------------------
def create_sequence(scene: slicer.vtkMRMLScene, name: str, items: Iterable[tuple[float, slicer.vtkMRMLNode]],
                    index_name: str = "time", index_unit: str = "") -> slicer.vtkMRMLSequenceNode:
    """A NEW sequence node holding copies of `items` [(time, node)], numeric index = time."""
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    sequence.SetIndexName(index_name)
    sequence.SetIndexUnit(index_unit)
    sequence.SetIndexType(slicer.vtkMRMLSequenceNode.NumericIndex)
    for time, node in sorted(items, key=lambda it: float(it[0])):
        sequence.SetDataNodeAtValue(node, contract.format_time(time))
    return sequence


def create_browser(scene: slicer.vtkMRMLScene, name: str,
                   sequences: Sequence[slicer.vtkMRMLSequenceNode]) -> slicer.vtkMRMLSequenceBrowserNode:
    """A NEW sequence browser playing `sequences` in sync (the first is the master). The
    Sequences logic of the scene must be registered first (it creates the proxy nodes)."""
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", name)
    browser.SetAndObserveMasterSequenceNodeID(sequences[0].GetID())
    for sequence in sequences[1:]:
        browser.AddSynchronizedSequenceNodeID(sequence.GetID())
    browser.SetSelectedItemNumber(0)
    return browser


def _metric_number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def create_metrics_table(scene: slicer.vtkMRMLScene, name: str, time_points: Iterable[dict],
                         segment_map: list[dict] | None = None,
                         calibrations: dict[float, dict] | None = None) -> slicer.vtkMRMLTableNode:
    """A NEW table node: one row per time point, columns time, scanned, folded voxels,
    Jacobian min/max, PSNR, SSIM, Dice per segment (by name), TRE mean/std/max and, for a run that
    records them, the segments its propagated labelmap lost there (by name; "none"), the share of the grid
    each scan covers (%; NaN where none was taken) and how the fit numbered each scan's CT numbers
    (calibrations: contract.intensity_calibrations; contract.numbering says each as the report does)."""
    names = {str(e["value"]): e["name"] for e in (segment_map or [])}
    dice_keys = list(dict.fromkeys(str(k) for tp in time_points for k in (tp.get("metrics") or {}).get("dice") or {}))
    columns = [("time", "time"), ("scanned", "scanned"), ("folded_voxels", "folded voxels"),
               ("jacobian_min", "Jacobian min"), ("jacobian_max", "Jacobian max"),
               ("psnr", "PSNR (dB)"), ("ssim", "SSIM")]
    columns += [(f"dice:{k}", f"Dice {names.get(k, f'label {k}')}") for k in dice_keys]
    columns += [("tre_mean", "TRE mean (mm)"), ("tre_std", "TRE std (mm)"), ("tre_max", "TRE max (mm)")]
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = table_node.GetTable()
    rows = sorted(time_points, key=lambda tp: float(tp["time"]))
    for key, title in columns:
        array = vtk.vtkDoubleArray()
        array.SetName(title)
        for tp in rows:
            array.InsertNextValue(_metric_number(_cell(tp, key)))
        table.AddColumn(array)
    if any("field_of_view" in tp for tp in rows):
        covered = vtk.vtkDoubleArray()
        covered.SetName("field of view (% of the grid)")
        for tp in rows:
            covered.InsertNextValue(100.0 * tp.get("field_of_view", 1.0) if tp.get("scanned") else float("nan"))
        table.AddColumn(covered)
    if calibrations:
        _add_text_column(table, "CT numbers fitted as (HU)",
                         [contract.numbering(calibrations.get(float(tp["time"])), tp.get("scanned")) for tp in rows])
    if any("labels_lost" in tp for tp in rows):
        _add_text_column(table, "segments lost", [", ".join(names.get(str(k), f"label {k}")
                                                            for k in tp.get("labels_lost", [])) or "none"
                                                  for tp in rows])
    table_node.Modified()
    return table_node


def _add_text_column(table: vtk.vtkTable, title: str, values: Sequence[str]) -> None:
    column = vtk.vtkStringArray()
    column.SetName(title)
    for value in values:
        column.InsertNextValue(value)
    table.AddColumn(column)


def _cell(tp: dict, key: str) -> object:
    metrics = tp.get("metrics") or {}
    if key == "time":
        return tp["time"]
    if key == "scanned":
        return 1.0 if tp.get("scanned") else 0.0
    if key.startswith("dice:"):
        return (metrics.get("dice") or {}).get(key[5:])
    return metrics.get(key)
