"""Slicer plots of a run's report data (STNeRPModuleLib.plots) in a real MRML scene (slicer-core
wheel): structure volume against time as table + plot series + chart nodes, and det J
statistics per segment as a table, from the CSV files the engine's report writes."""
import os

import numpy as np
import pytest

import slicer

from STNeRPLib.report import Curves, Names, Structure, write_curves_csv, write_statistics_csv  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

from STNeRPModuleLib import plots, scene_utils  # noqa: E402

TIMES = np.array([0.0, 3.5, 7.0])
VOLUMES = {1: np.array([12.0, 10.5, 9.0]), 4: np.array([900.0, 950.0, 925.0])}


@pytest.fixture
def run_dir(tmp_path):
    """A run folder with report data as the engine writes it."""
    (tmp_path / "report").mkdir()
    curves = Curves(TIMES, VOLUMES, {k: np.zeros((3, 3)) for k in VOLUMES},
                    {k: np.ones(3) for k in VOLUMES}, {k: v[0] / v for k, v in VOLUMES.items()})
    names = Names({1: "GTV"})
    write_curves_csv(curves, names, tmp_path / "report" / "structures_over_time.csv")
    structure = Structure(10, 12.0, np.zeros(3), np.zeros(3), 1.1, 0.9, 1.3, 0)
    folded = Structure(800, 925.0, np.zeros(3), np.zeros(3), 0.97, -0.1, 1.2, 3)
    write_statistics_csv({0.0: {1: structure}, 7.0: {1: structure, 4: folded}}, names,
                         tmp_path / "report" / "jacobian_by_structure.csv")
    return str(tmp_path)


def column(table_node, name) -> list:
    array = table_node.GetTable().GetColumnByName(name)
    assert array is not None, name
    return [array.GetValue(i) for i in range(array.GetNumberOfTuples())]


def test_structure_volume_chart_has_one_series_per_structure(run_dir):
    scene = slicer.vtkMRMLScene()
    chart, table, series = plots.structure_volume_plot(scene, run_dir, names={4: "Liver"})
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    assert [chart.GetNthPlotSeriesNode(i).GetID() for i in range(2)] == [s.GetID() for s in series]
    assert column(table, "time") == list(TIMES)
    assert column(table, "GTV (mL)") == list(VOLUMES[1])         # the report's name
    assert column(table, "Liver (mL)") == list(VOLUMES[4])       # the segment's name wins
    for node, title in zip(series, ("GTV (mL)", "Liver (mL)")):
        assert node.GetTableNode() is table and node.GetXColumnName() == "time"
        assert node.GetYColumnName() == title
        assert node.GetAttribute(scene_utils.RUN_ATTRIBUTE) == run_dir
    assert chart.GetYAxisTitle() == "volume (mL)"


def test_jacobian_table_has_a_row_per_time_and_segment(run_dir):
    scene = slicer.vtkMRMLScene()
    table = plots.jacobian_statistics_table(scene, run_dir)
    assert column(table, "time") == [0.0, 7.0, 7.0]
    assert column(table, "structure") == ["GTV", "GTV", "label 4"]
    assert column(table, "det J min") == [0.9, 0.9, -0.1]
    assert column(table, "folded voxels") == [0, 0, 3]
    assert column(table, "volume (mL)") == [12.0, 12.0, 925.0]


def test_missing_report_data_is_named(tmp_path):
    with pytest.raises(plots.ReportDataMissing, match="stnerp report"):
        plots.structure_volume_plot(slicer.vtkMRMLScene(), str(tmp_path))
