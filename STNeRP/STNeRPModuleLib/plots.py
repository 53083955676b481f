"""Slicer plots and tables of a run's report data, without Qt (runs under the slicer-core wheel).

The engine's report (``stnerp report``, written at the end of ``stnerp train``) leaves two CSV
files in RUN/report/: ``structures_over_time.csv`` (structure volume, centroid, motion and mean
det J at many times, from the model) and ``jacobian_by_structure.csv`` (det J statistics over
each propagated structure at every written time point). These functions turn them into MRML
table, plot series and plot chart nodes. Functions take the scene; nothing asks ``slicer.app``.
"""
from __future__ import annotations

import csv
import os

import vtk

import slicer

from .scene_utils import RUN_ATTRIBUTE

VOLUMES_CSV = os.path.join("report", "structures_over_time.csv")
JACOBIAN_CSV = os.path.join("report", "jacobian_by_structure.csv")
#: distinct colours for the structures' plot series (RGB, 0..1), as matplotlib's tab10
COLOURS = [(0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.4, 0.74),
           (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.5, 0.5, 0.5), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81)]


class ReportDataMissing(RuntimeError):
    """The run folder has no report data (run ``stnerp report --run RUN`` first)."""


def _rows(run_dir: str, relative: str) -> list[dict[str, str]]:
    path = os.path.join(run_dir, relative)
    if not os.path.isfile(path):
        raise ReportDataMissing(f"{path} not found: write the run's report first (stnerp report --run {run_dir})")
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _name(row: dict[str, str], names: dict[int, str] | None) -> str:
    """The structure's name: from `names` (label value -> segment name) if given, else the report's."""
    return (names or {}).get(int(row["label"]), row["name"])


def _tag(node: slicer.vtkMRMLNode, run_dir: str) -> slicer.vtkMRMLNode:
    node.SetAttribute(RUN_ATTRIBUTE, run_dir)
    return node


def structure_volume_plot(scene: slicer.vtkMRMLScene, run_dir: str, names: dict[int, str] | None = None,
                          prefix: str = "STNeRP") -> tuple[slicer.vtkMRMLPlotChartNode, slicer.vtkMRMLTableNode,
                                                         list[slicer.vtkMRMLPlotSeriesNode]]:
    """NEW table, plot series (one per structure) and chart nodes: structure volume (mL) against time.

    names: optional {label value: segment name}. Returns (chart node, table node, [series nodes]).
    """
    rows = _rows(run_dir, VOLUMES_CSV)
    labels = sorted({int(r["label"]) for r in rows})
    times = sorted({float(r["time"]) for r in rows})
    volume = {(float(r["time"]), int(r["label"])): float(r["volume_ml"]) for r in rows}
    titles = {label: _name(next(r for r in rows if int(r["label"]) == label), names) for label in labels}
    table_node = _tag(scene.AddNewNodeByClass("vtkMRMLTableNode", f"{prefix} structure volumes"), run_dir)
    table = table_node.GetTable()
    columns = [("time", times)] + [(f"{titles[label]} (mL)", [volume.get((t, label), float("nan")) for t in times])
                                   for label in labels]
    for title, values in columns:
        array = vtk.vtkDoubleArray()
        array.SetName(title)
        for value in values:
            array.InsertNextValue(value)
        table.AddColumn(array)
    table_node.Modified()
    chart = _tag(scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{prefix} structure volume"), run_dir)
    chart.SetTitle("Structure volume over time")
    chart.SetXAxisTitle("time")
    chart.SetYAxisTitle("volume (mL)")
    series = []
    for index, label in enumerate(labels):
        node = _tag(scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{prefix} {titles[label]} volume"), run_dir)
        node.SetAndObserveTableNodeID(table_node.GetID())
        node.SetXColumnName("time")
        node.SetYColumnName(f"{titles[label]} (mL)")
        node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        node.SetColor(*COLOURS[label % len(COLOURS)])
        chart.AddAndObservePlotSeriesNodeID(node.GetID())
        series.append(node)
    return chart, table_node, series


def jacobian_statistics_table(scene: slicer.vtkMRMLScene, run_dir: str, names: dict[int, str] | None = None,
                              prefix: str = "STNeRP") -> slicer.vtkMRMLTableNode:
    """A NEW table node: one row per time point and structure, with the structure's name, its
    volume (mL) and det J mean, min, max and folded voxels over it (det J of the map time t ->
    reference: reference volume / time-t volume)."""
    rows = _rows(run_dir, JACOBIAN_CSV)
    table_node = _tag(scene.AddNewNodeByClass("vtkMRMLTableNode", f"{prefix} det J per structure"), run_dir)
    table = table_node.GetTable()
    structure = vtk.vtkStringArray()
    structure.SetName("structure")
    numeric = [("time", "time"), ("volume_ml", "volume (mL)"), ("jacobian_mean", "det J mean"),
               ("jacobian_min", "det J min"), ("jacobian_max", "det J max"), ("folded_voxels", "folded voxels")]
    arrays = []
    for _, title in numeric:
        array = vtk.vtkDoubleArray()
        array.SetName(title)
        arrays.append(array)
    for row in sorted(rows, key=lambda r: (float(r["time"]), int(r["label"]))):
        structure.InsertNextValue(_name(row, names))
        for (key, _), array in zip(numeric, arrays):
            array.InsertNextValue(float(row[key]))
    table.AddColumn(arrays[0])
    table.AddColumn(structure)
    for array in arrays[1:]:
        table.AddColumn(array)
    table_node.Modified()
    return table_node
