"""End to end: the module's logic runs the real STNeRPLib worker (tiny iterations; two velocity
levels and the reference anchor switched off, as the panel's advanced settings give them) on the engine's
breathing phantom and loads its outputs into a slicer-core MRML scene."""

import os
import time

import numpy as np

import SimpleITK as sitk  # noqa: E402


import vtk  # noqa: E402

from STNeRPLib import phantom  # noqa: E402

from STNeRPModuleLib import core_logic, panel, parameters, run_import, scene_files, scene_utils  # noqa: E402
from test_module_scene import new_scene  # noqa: E402
from worker_cli import WORKER


def test_module_real_worker_end_to_end(tmp_path):
    series = phantom.breathing_series(size=(48, 48, 32), n_phases=3)
    scene, seg_logic = new_scene()
    volumes = []
    for i, (t, image) in enumerate(zip(series.times, series.images)):
        path = str(tmp_path / f"phase_{i}.nrrd")
        sitk.WriteImage(image, path)
        volumes.append((float(t), scene_files.read_volume(scene, path, f"phase {i}")))
    lab_path = str(tmp_path / "label.nrrd")
    sitk.WriteImage(series.labelmaps[0], lab_path)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "contours")
    seg.CreateDefaultDisplayNodes()
    assert seg_logic.ImportLabelmapToSegmentationNode(scene_files.read_volume_detached(lab_path, labelmap=True), seg)
    segmentation = seg.GetSegmentation()
    names = []
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        segment.SetName(f"structure {segment.GetLabelValue()}")
        names.append(segment.GetName())
    # landmarks of phase 1 for TRE
    ref_pts = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "ref landmarks")
    fu_pts = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "phase 1 landmarks")
    points_t, points_ref = series.landmarks[1]
    for p, q in list(zip(points_t, points_ref))[:5]:
        fu_pts.AddControlPoint(vtk.vtkVector3d(*scene_utils.lps_to_ras(p)))
        ref_pts.AddControlPoint(vtk.vtkVector3d(*scene_utils.lps_to_ras(q)))

    logic = core_logic.STNeRPCoreLogic(scene, seg_logic, str(tmp_path / "runs"), temp_root=str(tmp_path / "tmp"),
                                       worker_command=WORKER)
    inputs = core_logic.JobInputs(volumes[0][1], volumes[1:], reference_time=volumes[0][0], segmentation_node=seg,
                                  reference_landmarks=ref_pts, follow_up_landmarks=[(volumes[1][0], fu_pts)],
                                  predict_times=[1.5])
    # the panel's accuracy options, as the parameter node hands them to the logic
    pn = parameters.create_parameter_node(scene)
    for key, value in (("Iterations", "20"), ("Device", "cpu"), ("VelocityLevels", "2"), ("AnchorReference", "off")):
        pn.SetParameter(key, value)
    n_nodes = scene.GetNumberOfNodes()
    job = logic.start_training(inputs, parameters.settings(pn))
    start = time.monotonic()
    job.wait(timeout=240)
    assert job.state == "complete", (job.message, job.log_lines[-20:])
    record = run_import.read_record(job.run_dir)
    preset = record["parameters"]["preset"]
    assert (preset["velocity_levels"], preset["anchor_reference"], preset["def_iterations"]) == (2, False, 20)
    assert preset["adaptive_levels"] is False and record["velocity_levels_kept"] == 2   # a count is forced
    assert record["parameters"]["prealign"] == "auto", "the panel pre-aligns a far follow-up by default"
    times = sorted(float(tp["time"]) for tp in record["time_points"])
    assert {1.0, 1.5, 2.0} <= set(times)  # the worker may also list the reference time
    result = job.result
    assert scene.GetNumberOfNodes() > n_nodes
    for t in (1.0, 1.5, 2.0):
        entry = result.time_points[t]
        assert entry["transform"].IsA("vtkMRMLGridTransformNode")
        got = [entry["segmentation"].GetSegmentation().GetNthSegment(i).GetName()
               for i in range(entry["segmentation"].GetSegmentation().GetNumberOfSegments())]
        assert got == names
        # the node maps points as the engine's field does
        tp = [p for p in record["time_points"] if float(p["time"]) == t][0]
        field = sitk.ReadImage(os.path.join(job.run_dir, tp["displacement"]))
        tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
        for idx in ([10, 12, 8], [24, 30, 16], [35, 20, 20]):
            p = field.TransformContinuousIndexToPhysicalPoint([i + 0.37 for i in idx])
            q = entry["transform"].GetTransformFromParent().TransformPoint(scene_utils.lps_to_ras(p))
            assert np.allclose(scene_utils.ras_to_lps(q), tx.TransformPoint(p), atol=1e-3)
            # the reference-to-t node (the engine's exact inverse, to-parent) carries it back to p
            back = entry["inverse"].GetTransformToParent().TransformPoint(q)
            assert np.allclose(scene_utils.ras_to_lps(back), p, atol=0.05)
    assert result.sequences["transform"].GetNumberOfDataNodes() == len(times)
    # the report: its page for "Open report", its structure volumes as a Slicer plot named by segment
    assert panel.report_page(job.run_dir) == os.path.join(job.run_dir, "report", "index.html")
    series_names = [result.chart.GetNthPlotSeriesNode(i).GetName()
                    for i in range(result.chart.GetNumberOfPlotSeriesNodes())]
    assert series_names == [f"STNeRP {os.path.basename(job.run_dir)} {name} volume" for name in names]
    assert result.jacobian_table.GetTable().GetNumberOfRows() == len(times) * len(names)
    assert result.table.GetTable().GetNumberOfRows() == len(times)
    # the time slider: query the trained model at a new time, after the input folder is gone
    assert not os.path.exists(job.temp_dir)
    predicted = logic.start_prediction(job.run_dir, [0.5], str(tmp_path / "p0.5"),
                                       reference_volume=volumes[0][1]).wait(timeout=120)
    assert predicted.state == "complete", (predicted.message, predicted.log_lines[-20:])
    entry = predicted.result.time_points[0.5]
    assert {"transform", "segmentation", "jacobian", "image"} <= set(entry)
    assert [entry["segmentation"].GetSegmentation().GetNthSegment(i).GetName()
            for i in range(entry["segmentation"].GetSegmentation().GetNumberOfSegments())] == names
    print(f"real worker run: {time.monotonic() - start:.1f} s")
