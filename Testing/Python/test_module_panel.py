"""The panel's decisions (STNeRPModuleLib) on a real MRML scene from the slicer-core wheel, one
test per way a clinician's click went wrong in Slicer (issue 9): run folders, follow-up rows,
scene close, cancel, the time slider, segments, terminology, grid interpolation, torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

import slicer

from test_module_scene import (ROOT, STANDIN_WORKER, ijk_to_ras_matrix, make_image, new_scene, oblique_direction,
                               phantom_arrays)
from worker_cli import WORKER

from STNeRPLib import contract  # noqa: E402
from STNeRPModuleLib import (core_logic, panel, parameters, predictions, run_import, scene_files,  # noqa: E402
                             scene_utils, worker_process)


@pytest.fixture
def series(tmp_path):
    """A scene with a reference, three follow-ups (times 1, 2, 3.5) and a two-segment segmentation."""
    scene, seg_logic = new_scene()
    image, label = phantom_arrays()
    direction = oblique_direction()
    sitk.WriteImage(make_image(image, direction), str(tmp_path / "ref.nrrd"))
    reference = scene_files.read_volume(scene, str(tmp_path / "ref.nrrd"), "reference")
    follow_ups = []
    for t in (1.0, 2.0, 3.5):
        path = str(tmp_path / f"fu_{t:g}.nrrd")
        sitk.WriteImage(make_image(np.roll(image, int(t), axis=0), direction), path)
        follow_ups.append(scene_files.read_volume(scene, path, f"follow-up {t:g}"))
    sitk.WriteImage(make_image(label, direction), str(tmp_path / "label.nrrd"))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "contours")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    assert seg_logic.ImportLabelmapToSegmentationNode(
        scene_files.read_volume_detached(str(tmp_path / "label.nrrd"), labelmap=True), segmentation)
    return types.SimpleNamespace(scene=scene, seg_logic=seg_logic, reference=reference, follow_ups=follow_ups,
                                 segmentation=segmentation, folder=tmp_path)


def parameter_node(series, times=(1.0, 2.0, 3.5)):
    node = parameters.create_parameter_node(series.scene)
    node.SetNodeReferenceID(parameters.REFERENCE_VOLUME, series.reference.GetID())
    parameters.set_follow_ups(node, [parameters.FollowUp(v, t) for v, t in zip(series.follow_ups, times)])
    return node


def core(series, tmp_path, worker=STANDIN_WORKER) -> core_logic.STNeRPCoreLogic:
    return core_logic.STNeRPCoreLogic(series.scene, series.seg_logic, str(tmp_path / "runs"),
                                      temp_root=str(tmp_path / "tmp"), worker_command=worker)


# -- 1. run folders --------------------------------------------------------------------------
@pytest.mark.parametrize("button", ["", "."])
def test_panel_runs_go_to_an_absolute_writable_default_when_no_folder_was_picked(tmp_path, button):
    """A ctkDirectoryButton never set reports '.': runs must not go to the working directory."""
    unwritable = str(tmp_path / "a-file" / "runs")
    (tmp_path / "a-file").write_text("not a folder")
    folder = panel.runs_folder(button, [unwritable, str(tmp_path / "scenes" / panel.RUNS_FOLDER_NAME)])
    assert folder == str(tmp_path / "scenes" / panel.RUNS_FOLDER_NAME)
    assert os.path.isabs(folder) and os.path.isdir(folder)


@pytest.mark.parametrize("chosen, problem", [("relative/runs", "not an absolute path"),
                                             ("{tmp}/a-file/runs", "cannot be written")])
def test_panel_refuses_a_runs_folder_it_cannot_use(tmp_path, chosen, problem):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(panel.PanelError, match=problem):
        panel.runs_folder(chosen.format(tmp=tmp_path), [str(tmp_path / "default")])


def test_panel_apply_writes_and_reads_the_run_in_the_runs_folder_whatever_the_working_and_scene_folders(
        series, tmp_path, monkeypatch):
    """The app sets the scene's root folder to the default scene path, and Slicer's working folder
    can be anywhere (read-only on macOS): every path the worker and the storage nodes get is
    absolute, under the runs folder."""
    working, scene_root = tmp_path / "cwd", tmp_path / "scene-root"
    working.mkdir()
    scene_root.mkdir()
    monkeypatch.chdir(working)
    series.scene.SetRootDirectory(str(scene_root))
    logic = adapter(monkeypatch, series, settings={"STNeRP/RunsFolder": "."},
                    scene_path=str(tmp_path / "Documents"), temporary=str(tmp_path / "temp"))
    pn = parameter_node(series)
    job = logic.startTraining(pn, STANDIN_WORKER).wait(timeout=60)
    assert job.state == "complete", job.message
    assert os.path.isabs(job.run_dir)
    assert os.path.dirname(job.run_dir) == str(tmp_path / "Documents" / panel.RUNS_FOLDER_NAME)
    assert os.listdir(working) == [] and os.listdir(scene_root) == []
    storage = job.result.time_points[2.0]["image"].GetStorageNode()
    assert storage.GetFileName().startswith(job.run_dir)


@pytest.mark.parametrize("chosen, similarity, contours, levels, anchored, stopping, calibrated", [
    ({}, None, None, None, None, None, None),
    ({"Similarity": "lncc", "LabelInterpolation": "nearest", "VelocityLevels": "2", "AnchorReference": "on",
      "StopOnConvergence": "on", "CalibrateIntensities": "on"}, "lncc", "nearest", "2", True, True, True),
    ({"Similarity": "mse", "LabelInterpolation": "linear", "VelocityLevels": "1", "AnchorReference": "off",
      "StopOnConvergence": "off", "CalibrateIntensities": "off"}, "mse", "linear", "1", False, False, False),
])
def test_panel_accuracy_options_reach_the_worker_only_when_chosen(series, tmp_path, monkeypatch, chosen, similarity,
                                                                   contours, levels, anchored, stopping, calibrated):
    """Similarity, how contours are carried, velocity levels, the reference anchor, stopping on convergence and
    the CT-number calibration go from the parameter node through the Logic to the worker's command line; left
    at "preset" (the defaults) no flag is passed, so the preset's own value holds."""
    logic = adapter(monkeypatch, series, settings={"STNeRP/RunsFolder": str(tmp_path / "runs")},
                    scene_path=str(tmp_path / "Documents"), temporary=str(tmp_path / "temp"))
    pn = parameter_node(series)
    for key, value in chosen.items():
        pn.SetParameter(key, value)
    job = logic.startTraining(pn, STANDIN_WORKER).wait(timeout=60)
    assert job.state == "complete", job.message
    worker_args = job.command[len(STANDIN_WORKER):]
    given = contract.parse_arguments(worker_args)
    assert (given.similarity, given.label_interpolation, given.velocity_levels, given.anchor_reference,
            given.stop_on_convergence, given.calibrate_intensities) == (similarity, contours, levels, anchored,
                                                                         stopping, calibrated)
    if not chosen:
        assert not {"--similarity", "--label-interpolation", "--velocity-levels", "--anchor-reference",
                    "--no-anchor-reference", "--stop-on-convergence", "--no-stop-on-convergence",
                    "--calibrate-intensities", "--no-calibrate-intensities"} & set(worker_args)


@pytest.mark.parametrize("chosen, given", [(None, "auto"), ("auto", "auto"), ("percentile", "percentile"),
                                           ("ct", "ct")])
def test_panel_intensity_normalisation_reaches_the_worker_only_when_not_auto(series, tmp_path, monkeypatch, chosen,
                                                                            given):
    """The panel's Intensities choice (the worker's --intensity: auto, ct or percentile) goes from the parameter node
    to the worker's command line; auto, the default, passes no flag."""
    logic = adapter(monkeypatch, series, settings={"STNeRP/RunsFolder": str(tmp_path / "runs")},
                    scene_path=str(tmp_path / "Documents"), temporary=str(tmp_path / "temp"))
    pn = parameter_node(series)
    if chosen is not None:
        pn.SetParameter("Intensity", chosen)
    job = logic.startTraining(pn, STANDIN_WORKER).wait(timeout=60)
    assert job.state == "complete", job.message
    worker_args = job.command[len(STANDIN_WORKER):]
    assert contract.parse_arguments(worker_args).intensity == given
    assert ("--intensity" in worker_args) == (given != "auto")


@pytest.mark.parametrize("with_segmentation, chosen, given", [
    (True, "0.1", 0.1), (True, "0", 0.0),                  # a share, or uniform draws: both reach the worker
    (True, "preset", None), (True, "", None),              # the preset's (a scene saved before the parameter: "")
    (False, "0.1", None),                                  # no segmentation: nothing to draw about, no flag
])
def test_panel_voxels_about_segments_reach_the_worker_only_when_chosen_with_a_segmentation(
        series, tmp_path, monkeypatch, with_segmentation, chosen, given):
    """Voxels about segments (StructurePoints) becomes --structure-points when a segmentation is chosen and the
    box is not at "preset"; without a segmentation the worker would refuse the flag, so none is passed."""
    logic = adapter(monkeypatch, series, settings={"STNeRP/RunsFolder": str(tmp_path / "runs")},
                    scene_path=str(tmp_path / "Documents"), temporary=str(tmp_path / "temp"))
    pn = parameter_node(series)
    if with_segmentation:
        pn.SetNodeReferenceID(parameters.SEGMENTATION, series.segmentation.GetID())
    pn.SetParameter("StructurePoints", chosen)
    job = logic.startTraining(pn, STANDIN_WORKER).wait(timeout=60)
    assert job.state == "complete", job.message
    assert contract.parse_arguments(job.command[len(STANDIN_WORKER):]).structure_points == given


@pytest.mark.parametrize("shown, text", [(parameters.STRUCTURE_POINTS_PRESET, "preset"), (0.0, "0.0"), (0.15, "0.15")])
def test_voxels_about_segments_box_and_parameter_round_trip(shown, text):
    """The spin box's value becomes the parameter's text and back; its minimum stands for the preset's share."""
    node = slicer.vtkMRMLScriptedModuleNode()
    node.SetParameter("StructurePoints", parameters.structure_points_text(shown))
    assert node.GetParameter("StructurePoints") == text
    assert parameters.get_float(node, "StructurePoints", parameters.STRUCTURE_POINTS_PRESET) == shown
    assert parameters.structure_points(node) == (None if shown < 0 else shown)


def adapter(monkeypatch, series, settings, scene_path, temporary):
    """STNeRP.py's STNeRPLogic with stand-ins for what only the application has: qt.QSettings,
    the ScriptedLoadableModule base classes, slicer.app and slicer.modules."""
    qt_stub = types.ModuleType("qt")
    qt_stub.QSettings = lambda: types.SimpleNamespace(value=lambda key, default="": settings.get(key, default))
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class _Base:
        def __init__(self, *args, **kwargs):
            pass

    class ScriptedLoadableModuleLogic(_Base):
        def getParameterNode(self):
            return parameters.create_parameter_node(slicer.mrmlScene)
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest"):
        setattr(slm, name, type(name, (_Base,), {}))
    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    util = types.ModuleType("slicer.util")
    util.VTKObservationMixin = type("VTKObservationMixin", (), {})
    monkeypatch.setitem(sys.modules, "qt", qt_stub)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    monkeypatch.setitem(sys.modules, "slicer.util", util)
    monkeypatch.setattr(slicer, "mrmlScene", series.scene, raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(defaultScenePath=scene_path, temporaryPath=temporary),
                        raising=False)
    segmentations = types.SimpleNamespace(logic=lambda: series.seg_logic)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(segmentations=segmentations), raising=False)
    monkeypatch.delitem(sys.modules, "STNeRP", raising=False)
    import importlib
    return importlib.import_module("STNeRP").STNeRPLogic()


# -- 2, 3. follow-up rows --------------------------------------------------------------------
def test_panel_landmarks_stay_with_their_follow_up(series, tmp_path):
    """Landmarks given only to the last follow-up are used at its time, not the first's."""
    reference_points = series.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "reference landmarks")
    reference_points.AddControlPoint(vtk.vtkVector3d(1, 2, 3), "A")
    late = series.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "landmarks at 3.5")
    late.AddControlPoint(vtk.vtkVector3d(4, 5, 6), "A")
    pn = parameter_node(series)
    rows = parameters.get_follow_ups(pn)
    rows[2].landmarks = late
    parameters.set_follow_ups(pn, rows)
    pn.SetNodeReferenceID(parameters.REFERENCE_LANDMARKS, reference_points.GetID())
    assert [row.landmarks for row in parameters.get_follow_ups(pn)] == [None, None, late]
    inputs = parameters.job_inputs(pn)
    assert inputs.follow_up_landmarks == [(3.5, late)]
    files, _ = core(series, tmp_path).export_inputs(inputs, str(tmp_path))
    lines = open(files["landmarks"]).read().split()
    assert [float(v) for v in lines[1].split(",")] == [3.5, -4, -5, 6, -1, -2, 3]


def test_panel_deleting_a_follow_up_keeps_the_other_times(series, tmp_path):
    pn = parameter_node(series)
    series.scene.RemoveNode(series.follow_ups[0])
    rows = parameters.get_follow_ups(pn)
    assert [(row.volume.GetName(), row.time) for row in rows] == [("follow-up 2", 2.0), ("follow-up 3.5", 3.5)]
    assert [t for t, _ in parameters.job_inputs(pn).follow_ups] == [2.0, 3.5]
    path = str(tmp_path / "scene.mrml")     # and after the scene is saved and loaded again
    series.scene.SetURL(path)
    assert series.scene.Commit(path)
    other, _ = new_scene()
    other.SetURL(path)
    other.Import()
    loaded = other.GetSingletonNode(parameters.MODULE_NAME, "vtkMRMLScriptedModuleNode")
    assert [(row.volume.GetName(), row.time) for row in parameters.get_follow_ups(loaded)] == [
        ("follow-up 2", 2.0), ("follow-up 3.5", 3.5)]


def test_panel_ground_truth_of_a_follow_up_gives_dice_at_its_time(series, tmp_path):
    pn = parameter_node(series)
    pn.SetNodeReferenceID(parameters.SEGMENTATION, series.segmentation.GetID())
    rows = parameters.get_follow_ups(pn)
    rows[1].ground_truth = series.segmentation
    parameters.set_follow_ups(pn, rows)
    job = core(series, tmp_path).start_training(parameters.job_inputs(pn), {}).wait(timeout=60)
    assert job.state == "complete", job.message
    dice = {float(tp["time"]): tp["metrics"]["dice"] for tp in run_import.read_record(job.run_dir)["time_points"]}
    assert set(dice[2.0]) == {"1", "2"} and not dice[1.0] and not dice[3.5]


# -- 4. scene close --------------------------------------------------------------------------
def test_panel_prediction_after_scene_close_never_removes_the_users_nodes(series, tmp_path):
    pn = parameter_node(series)
    pn.SetNodeReferenceID(parameters.SEGMENTATION, series.segmentation.GetID())
    logic = core(series, tmp_path)
    trained = logic.start_training(parameters.job_inputs(pn), {}).wait(timeout=60)
    slider = predictions.TimeSliderPredictions(logic, trained.run_dir, trained.segment_map, quiet=0.0)
    show(slider, 0.5)
    shown_ids = [node.GetID() for node in slider.shown.nodes]
    series.scene.Clear(0)                      # File > Close scene: IDs start again
    assert slider.shown is None, "the scene close forgot the prediction"
    users = [series.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"user's {i}") for i in range(60)]
    assert set(shown_ids) & {node.GetID() for node in users}, "the new scene reuses the IDs"
    show(slider, 1.5)
    assert all(series.scene.IsNodePresent(node) for node in users)
    slider.close()


def test_panel_removing_an_old_import_touches_only_its_own_nodes(series, tmp_path):
    """remove_imported holds the nodes themselves: after a close, a node with a reused ID stays."""
    pn = parameter_node(series)
    logic = core(series, tmp_path)
    trained = logic.start_training(parameters.job_inputs(pn), {}).wait(timeout=60)
    result = trained.result
    ids = {node.GetID() for node in result.nodes}
    series.scene.Clear(0)
    users = [series.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"user's {i}") for i in range(60)]
    sh = series.scene.GetSubjectHierarchyNode()
    user_folders = [sh.CreateFolderItem(sh.GetSceneItemID(), f"user folder {i}") for i in range(5)]
    assert ids & {node.GetID() for node in users}, "the new scene reuses the IDs"
    run_import.remove_imported(series.scene, result)
    assert all(series.scene.IsNodePresent(node) for node in users)
    assert all(scene_utils.folder_exists(series.scene, item) for item in user_folders)


# -- 5. freezing -----------------------------------------------------------------------------
def test_panel_exports_inputs_uncompressed(series, tmp_path):
    files, _ = core(series, tmp_path).export_inputs(parameters.job_inputs(parameter_node(series)), str(tmp_path))
    for path in [files["reference"]] + [p for p, _ in files["follow_ups"]]:
        header = open(path, "rb").read(2000).split(b"\n\n")[0].decode()
        assert "encoding: raw" in header, path


def _translation(scene, name: str, ras_mm) -> slicer.vtkMRMLLinearTransformNode:
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    matrix = vtk.vtkMatrix4x4()
    for axis in range(3):
        matrix.SetElement(axis, 3, float(ras_mm[axis]))
    transform.SetMatrixTransformToParent(matrix)
    return transform


@pytest.mark.parametrize("which", ["reference", "follow-up"])
def test_panel_refuses_a_volume_under_a_transform_and_leaves_everything_as_it_was(series, tmp_path, which):
    """A volume under a transform is shown where the transform puts it, but its file would hold it without: the
    run would register, and its results would land, where the user does not see the volume. Apply refuses in one
    line naming the volume and the transform; nothing is written and the scene is unchanged. The Apply button
    stays enabled (validate passes): hardening leaves the parameter node as it was, so a disabled button would
    not come back."""
    volume = series.reference if which == "reference" else series.follow_ups[1]
    volume.SetAndObserveTransformNodeID(_translation(series.scene, "setup shift", (0, 0, 5)).GetID())
    inputs = parameters.job_inputs(parameter_node(series))
    inputs.validate()
    nodes = series.scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match=f"'{volume.GetName()}' is under the transform 'setup shift': Harden"):
        core(series, tmp_path).start_training(inputs, {})
    assert series.scene.GetNumberOfNodes() == nodes
    assert volume.GetParentTransformNode().GetName() == "setup shift"
    assert not (tmp_path / "runs").exists() or not os.listdir(tmp_path / "runs")
    assert not (tmp_path / "tmp").exists() or not os.listdir(tmp_path / "tmp")
    with pytest.raises(ValueError, match="under a transform"):
        scene_files.write_volume(volume, str(tmp_path / "volume.nrrd"))
    assert not (tmp_path / "volume.nrrd").exists()
    slicer.vtkSlicerTransformLogic().hardenTransform(volume)          # what the line tells the user to do
    job = core(series, tmp_path).start_training(parameters.job_inputs(parameter_node(series)), {})
    assert job.wait(timeout=60).state == "complete"


def test_panel_refuses_a_follow_up_sequence_shown_under_a_transform(series, tmp_path):
    """A volume sequence (4D CT) is shown through its browser's proxy volume; a transform on the proxy moves what
    the user sees, not the sequence's items the worker is given. Apply names the proxy and the transform."""
    sequence = series.scene.AddNewNodeByClass("vtkMRMLSequenceNode", "4D CT")
    for volume, t in zip(series.follow_ups, (1.0, 2.0, 3.5)):
        sequence.SetDataNodeAtValue(volume, contract.format_time(t))
    browser = series.scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "4D CT browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    series.scene._stnerp_logics[1].UpdateProxyNodesFromSequences(browser)
    proxy = browser.GetProxyNode(sequence)
    pn = parameter_node(series)
    pn.SetParameter("FollowUpMode", "sequence")
    pn.SetNodeReferenceID(parameters.FOLLOW_UP_SEQUENCE, sequence.GetID())
    assert parameters.job_inputs(pn).sequence_proxies == [proxy]
    proxy.SetAndObserveTransformNodeID(_translation(series.scene, "4D shift", (3, 0, 0)).GetID())
    with pytest.raises(ValueError, match=f"shown as '{proxy.GetName()}', under the transform '4D shift'"):
        core(series, tmp_path).start_training(parameters.job_inputs(pn), {})
    proxy.SetAndObserveTransformNodeID(None)
    files, _ = core(series, tmp_path).export_inputs(parameters.job_inputs(pn), str(tmp_path / "inputs"))
    assert [t for _, t in files["follow_ups"]] == [1.0, 2.0, 3.5]


def test_panel_takes_segments_and_landmarks_under_a_transform_where_they_are_shown(series, tmp_path):
    """Only volumes are refused under a transform: contours and landmarks are exported where Slicer shows them,
    in the reference volume's grid and in LPS mm."""
    pn = parameter_node(series)
    pn.SetNodeReferenceID(parameters.SEGMENTATION, series.segmentation.GetID())
    plain, _ = core(series, tmp_path).export_inputs(parameters.job_inputs(pn), str(tmp_path / "plain"))
    step = ijk_to_ras_matrix(series.reference)[:3, 0] * 2        # two voxels along the grid's i axis, in RAS mm
    series.segmentation.SetAndObserveTransformNodeID(_translation(series.scene, "contours shift", step).GetID())
    moved, _ = core(series, tmp_path).export_inputs(parameters.job_inputs(pn), str(tmp_path / "moved"))
    before = sitk.GetArrayFromImage(sitk.ReadImage(plain["segmentation"]))
    after = sitk.GetArrayFromImage(sitk.ReadImage(moved["segmentation"]))
    assert before.any() and not before[:, :, -2:].any()
    assert np.array_equal(after[:, :, 2:], before[:, :, :-2])
    points = series.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "reference landmarks")
    points.AddControlPoint(vtk.vtkVector3d(1, 2, 3), "A")
    points.SetAndObserveTransformNodeID(_translation(series.scene, "points shift", (10, 0, 0)).GetID())
    pn.SetNodeReferenceID(parameters.REFERENCE_LANDMARKS, points.GetID())
    at_3_5 = series.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "landmarks at 3.5")
    at_3_5.AddControlPoint(vtk.vtkVector3d(4, 5, 6), "A")
    rows = parameters.get_follow_ups(pn)
    rows[2].landmarks = at_3_5
    parameters.set_follow_ups(pn, rows)
    files, _ = core(series, tmp_path).export_inputs(parameters.job_inputs(pn), str(tmp_path / "points"))
    assert [float(v) for v in open(files["landmarks"]).read().split()[1].split(",")] == [3.5, -4, -5, 6, -11, -2, 3]


def test_panel_cancel_returns_at_once_and_the_poll_ends_the_job(series, tmp_path, monkeypatch):
    monkeypatch.setenv("STNERP_STANDIN_MODE", "slow")
    inputs = parameters.job_inputs(parameter_node(series))
    nodes = series.scene.GetNumberOfNodes()
    job = core(series, tmp_path).start_training(inputs, {})
    while not any(e["event"] == contract.EVENT_PROGRESS for e in job.poll()):
        time.sleep(0.02)
    job.cancel()
    assert job.process.running, "cancel() did not wait for the worker"
    job.wait(timeout=30)
    assert job.state == "cancelled"
    assert run_import.read_record(job.run_dir)["status"] == contract.STATUS_INTERRUPTED
    assert series.scene.GetNumberOfNodes() == nodes


def test_panel_job_cancelled_after_its_worker_finished_imports_nothing(series, tmp_path):
    """A scene close cancels the job: if the worker had just finished, nothing is imported into
    the next scene."""
    inputs = parameters.job_inputs(parameter_node(series))
    nodes = series.scene.GetNumberOfNodes()
    job = core(series, tmp_path).start_training(inputs, {})
    job.process.process.wait(timeout=60)          # finished, not yet polled
    job.cancel()
    job.wait(timeout=30)
    assert job.state == "cancelled" and job.result is None
    assert series.scene.GetNumberOfNodes() == nodes


def test_panel_cancel_by_closing_stdin_stops_the_real_worker_cleanly(tmp_path):
    """The worker contract's cancel (no signal: what works for a windowless process on
    Windows) ends the real worker as interrupted, exit code 130."""
    from STNeRPLib import phantom
    data = phantom.breathing_series(size=(24, 24, 16), n_phases=2)
    paths = []
    for i, image in enumerate(data.images):
        paths.append(str(tmp_path / f"p{i}.nrrd"))
        sitk.WriteImage(image, paths[-1])
    args = contract.train_arguments(paths[0], 0, [(paths[1], 1)], str(tmp_path / "run"), iterations=100000,
                                    device="cpu", stdin_cancel=True)
    process = worker_process.WorkerProcess([*WORKER, *args],
                                           env=worker_process.worker_environment()).start()
    events = []
    while not any(e.get("stage") == contract.STAGE_DEFNET for e in events):
        events += process.poll()
        assert not process.finished, events
        time.sleep(0.05)
    process.cancel()
    events += process.wait(timeout=60)
    assert events[-1] == {"event": "exit", "returncode": contract.EXIT_INTERRUPTED, "cancelled": True}
    assert run_import.read_record(str(tmp_path / "run"))["status"] == contract.STATUS_INTERRUPTED


def test_panel_reads_worker_output_as_utf8_whatever_the_console(tmp_path):
    text = "Jacobian ≥ 1 in the tumour, ü, 体积"
    env = worker_process.worker_environment()
    assert env["PYTHONIOENCODING"] == "utf-8"
    env.pop("PYTHONUTF8")
    env["PYTHONIOENCODING"] = "utf-8"
    process = worker_process.WorkerProcess([sys.executable, "-c", f"import sys; print({text!r}, file=sys.stderr)"],
                                           env=dict(env, LC_ALL="C", LANG="C")).start()
    logs = [e["text"] for e in process.wait(timeout=30) if e["event"] == "log"]
    assert logs == [text]


# -- 6. the time slider ----------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def show(slider, t, timeout=60):
    slider.request(t)
    deadline = time.monotonic() + timeout
    while slider.shown_time != t:
        assert time.monotonic() < deadline, slider.message
        slider.poll()
        time.sleep(0.02)


@pytest.fixture
def slider(series, tmp_path):
    pn = parameter_node(series)
    pn.SetNodeReferenceID(parameters.SEGMENTATION, series.segmentation.GetID())
    logic = core(series, tmp_path)
    trained = logic.start_training(parameters.job_inputs(pn), {}).wait(timeout=60)
    clock = Clock()
    slider = predictions.TimeSliderPredictions(logic, trained.run_dir, trained.segment_map, series.reference,
                                               quiet=0.3, clock=clock)
    yield slider, clock
    slider.close()


def drive(slider, clock, until, timeout=60):
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, slider.message
        clock.now += 0.05
        slider.poll()
        time.sleep(0.02)


def test_time_slider_keystrokes_coalesce_into_one_prediction(slider):
    slider, clock = slider
    for t in (1.0, 1.2, 1.25):                 # typing "1.25" in the spin box
        slider.request(t)
        clock.now += 0.1
        slider.poll()
        assert slider.job is None, "a prediction started before the typing paused"
    drive(slider, clock, lambda: slider.shown_time == 1.25)
    folders = os.listdir(os.path.join(slider.run_dir, core_logic.PREDICTIONS_FOLDER))
    assert folders == [contract.time_point_folder(1.25)]


def test_time_slider_shows_the_latest_time_asked_during_a_prediction(slider):
    slider, clock = slider
    slider.request(0.5)
    drive(slider, clock, lambda: slider.job is not None)
    slider.request(3.0)                        # moved while 0.5 is being predicted
    drive(slider, clock, lambda: slider.shown_time == 3.0)
    shown = slider.shown.time_points
    assert list(shown) == [3.0]
    assert slider.logic.scene.IsNodePresent(shown[3.0]["transform"])


def test_time_slider_same_time_again_is_read_from_disk_without_the_worker(slider):
    slider, clock = slider
    slider.request(0.5)
    drive(slider, clock, lambda: slider.shown_time == 0.5)
    first = slider.shown
    slider.request(2.5)
    drive(slider, clock, lambda: slider.shown_time == 2.5)
    slider.request(0.5)
    clock.now += 1.0
    slider.poll()
    assert slider.job is None and slider.shown_time == 0.5, "imported at once, no worker started"
    assert not any(slider.logic.scene.IsNodePresent(n) for n in first.nodes), "only the shown prediction stays"
    assert sorted(os.listdir(os.path.join(slider.run_dir, core_logic.PREDICTIONS_FOLDER))) == [
        contract.time_point_folder(0.5), contract.time_point_folder(2.5)]


# -- 7. segments -----------------------------------------------------------------------------
def test_panel_segment_list_follows_the_segmentation(series, tmp_path):
    segmentation = series.segmentation.GetSegmentation()
    first, second = segmentation.GetNthSegmentID(0), segmentation.GetNthSegmentID(1)
    excluded = [first]
    added = segmentation.AddEmptySegment("", "added later")
    assert panel.segments(series.segmentation, excluded) == [
        (first, segmentation.GetSegment(first).GetName(), False),
        (second, segmentation.GetSegment(second).GetName(), True), (added, "added later", True)]
    segmentation.RemoveSegment(second)
    assert panel.chosen_segment_ids(series.segmentation, excluded) == [added]
    pn = parameter_node(series)
    pn.SetNodeReferenceID(parameters.SEGMENTATION, series.segmentation.GetID())
    parameters.set_json(pn, "ExcludedSegmentIDs", [second])     # a deleted segment left unchecked
    files, segment_map = core(series, tmp_path).export_inputs(parameters.job_inputs(pn), str(tmp_path))
    assert [e["id"] for e in segment_map] == [first, added]
    segmentation.RemoveSegment(added)
    with pytest.raises(panel.PanelError, match="unchecked"):
        panel.chosen_segment_ids(series.segmentation, [first])


# -- 8. terminology --------------------------------------------------------------------------
class OldSegment:
    """A vtkSegment as Slicer <= 5.8 shows it: no Get/SetTerminology, only tags."""

    def __init__(self, segment):
        self.GetTag, self.SetTag = segment.GetTag, segment.SetTag


def test_panel_terminology_kept_on_slicer_before_5_10():
    entry = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
             "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")
    segment = slicer.vtkSegment()
    scene_files.set_segment_terminology(OldSegment(segment), entry)
    assert segment.GetTerminology() == entry, "written where Slicer 5.10 reads it"
    assert scene_files.segment_terminology(OldSegment(segment)) == entry
    fresh = slicer.vtkSegment()               # a new segment's default entry ("Tissue") reads the same
    assert scene_files.segment_terminology(OldSegment(fresh)) == fresh.GetTerminology() != entry


# -- 9. grid interpolation after a scene load ------------------------------------------------
def test_panel_grids_linear_again_after_load_in_scene_and_sequences(series, tmp_path):
    pn = parameter_node(series)
    trained = core(series, tmp_path).start_training(parameters.job_inputs(pn), {}).wait(timeout=60)
    assert trained.result.sequences["transform"].GetNumberOfDataNodes() == 4
    bundle = str(tmp_path / "bundle")            # File > Save as a .mrb: sequences saved with their items
    os.makedirs(bundle)
    saver = slicer.vtkMRMLApplicationLogic()
    saver.SetMRMLScene(series.scene)
    assert saver.SaveSceneToSlicerDataBundleDirectory(bundle)
    other, _ = new_scene()
    scene_files.observe_scene_loading(other)
    scene_files.observe_scene_loading(other)    # asked twice (start-up and a later load): one observer
    other.SetURL(os.path.join(bundle, "bundle.mrml"))
    assert other.Import()
    sequence = other.GetFirstNodeByName(trained.result.sequences["transform"].GetName())
    grids = [sequence.GetNthDataNode(i) for i in range(sequence.GetNumberOfDataNodes())]
    grids += [other.GetNthNodeByClass(i, "vtkMRMLGridTransformNode")
              for i in range(other.GetNumberOfNodesByClass("vtkMRMLGridTransformNode"))]
    assert len(grids) >= 8 and all(grid_mode(g) == "linear" for g in grids)


def test_panel_grids_inside_sequences_linear_again(series, tmp_path):
    """A sequence item read back from a .seq.mrb holds a cubic grid too; the restore reaches it."""
    path = str(tmp_path / "u.nrrd")
    field = sitk.Image([8, 8, 8], sitk.sitkVectorFloat64, 3)
    sitk.WriteImage(field, path)
    node = scene_files.read_displacement_transform(series.scene, path, "u")
    sequence = series.scene.AddNewNodeByClass("vtkMRMLSequenceNode", "transforms")
    item = sequence.SetDataNodeAtValue(node, "1")
    series.scene.RemoveNode(node)
    for grid in scene_files._grid_transforms(item):
        grid.SetInterpolationModeToCubic()
    assert scene_files.restore_grid_interpolation(series.scene) == 1
    assert grid_mode(sequence.GetNthDataNode(0)) == "linear"


def test_panel_restored_grid_tells_its_observers(series, tmp_path):
    path = str(tmp_path / "u.nrrd")
    field = sitk.Image([8, 8, 8], sitk.sitkVectorFloat64, 3)
    field.SetSpacing((4.0, 4.0, 4.0))
    sitk.WriteImage(field, path)
    node = scene_files.read_displacement_transform(series.scene, path, "u")
    for grid in scene_files._grid_transforms(node):
        grid.SetInterpolationModeToCubic()
    seen = []
    node.AddObserver(slicer.vtkMRMLTransformableNode.TransformModifiedEvent, lambda *a: seen.append(1))
    assert scene_files.restore_grid_interpolation(series.scene) == 1
    assert seen and grid_mode(node) == "linear"


def grid_mode(node) -> str:
    transform = node.GetTransformFromParent()
    while transform.IsA("vtkGeneralTransform"):
        transform = transform.GetConcatenatedTransform(0)
    return transform.GetInterpolationModeAsString().lower()


# -- 10. the stand-in worker is the real worker's twin in its contract -----------------------
def test_standin_writes_the_run_folder_the_real_worker_writes(series, tmp_path):
    from STNeRPLib import phantom
    data = phantom.breathing_series(size=(24, 24, 16), n_phases=2)
    paths = []
    for i, (image, labels) in enumerate(zip(data.images, data.labelmaps)):
        paths.append(str(tmp_path / f"p{i}.nrrd"))
        sitk.WriteImage(image, paths[-1])
    sitk.WriteImage(data.labelmaps[0], str(tmp_path / "labels.nrrd"))
    records = {}
    for name, worker in (("real", WORKER), ("stand-in", STANDIN_WORKER)):
        args = contract.train_arguments(paths[0], 0, [(paths[1], 1)], str(tmp_path / name),
                                        segmentation=str(tmp_path / "labels.nrrd"), predict_times=[0.5],
                                        iterations=3, device="cpu")
        done = subprocess.run(worker + args, capture_output=True, text=True, env=worker_process.worker_environment(),
                              timeout=300)
        assert done.returncode == contract.EXIT_OK, done.stderr[-2000:]
        events = [json.loads(line) for line in done.stdout.splitlines()]
        assert events[-1] == {"event": contract.EVENT_DONE, "status": contract.STATUS_COMPLETE,
                              "output": str(tmp_path / name)}
        records[name] = contract.read_run(tmp_path / name)
    real, standin = records["real"], records["stand-in"]
    assert standin["status"] == real["status"] == contract.STATUS_COMPLETE
    for a, b in zip(real["time_points"], standin["time_points"]):
        assert a["time"] == b["time"] and a["scanned"] == b["scanned"]
        assert {k: a[k] for k in contract.TIME_POINT_FILES} == {k: b[k] for k in contract.TIME_POINT_FILES}
        assert set(b) >= {"image_sources", "metrics"} and set(b["metrics"]) == set(a["metrics"])
    assert len(real["time_points"]) == len(standin["time_points"]) == 3


# -- 11. torch -------------------------------------------------------------------------------
def test_panel_checks_torch_version_without_importing_it():
    code = (f"import sys; sys.path[:0] = [{os.path.join(ROOT, 'STNeRP')!r}, {ROOT!r}]; "
            "from STNeRPModuleLib import panel; print(panel.torch_problem()); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["None", "False"]
    assert panel._version_tuple("1.13.1+cpu") < panel.MINIMUM_TORCH <= panel._version_tuple("2.13.0")
    assert panel.torch_requirement() == ">=2.0"


# -- 12. small ones --------------------------------------------------------------------------
def test_panel_offers_a_follow_up_that_is_not_the_reference_nor_a_labelmap():
    scene, _ = new_scene()
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels loaded first")
    cts = [scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"CT {i}") for i in range(3)]
    assert scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode").IsA("vtkMRMLLabelMapVolumeNode")
    assert panel.default_reference(scene) is cts[0]
    assert panel.default_follow_up(scene, cts[0]) is cts[1]
    assert panel.default_follow_up(scene, cts[0], cts[1:2]) is cts[2]
    assert panel.default_follow_up(scene, cts[0], cts[1:]) is None


def test_panel_contours_go_under_the_follow_ups_dicom_study(series, tmp_path):
    """Propagated contours sit under the study of the scan they belong to, where Slicer's DICOM
    export (SlicerRT) takes them to an RT Structure Set of that study; scans without a study
    keep their contours in the run's folder."""
    sh = series.scene.GetSubjectHierarchyNode()
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "patient")
    study = sh.CreateStudyItem(patient, "fraction 2 CT")
    sh.CreateItem(study, series.follow_ups[1])      # as the DICOM module loads a series
    pn = parameter_node(series)
    pn.SetNodeReferenceID(parameters.SEGMENTATION, series.segmentation.GetID())
    job = core(series, tmp_path).start_training(parameters.job_inputs(pn), {}).wait(timeout=60)
    assert job.state == "complete", job.message
    parent = {t: sh.GetItemParent(sh.GetItemByDataNode(e["segmentation"])) for t, e in job.result.time_points.items()}
    assert parent[2.0] == study
    assert parent[1.0] == parent[3.5] == job.result.folder_item
    assert sh.GetItemParent(sh.GetItemByDataNode(job.result.time_points[2.0]["transform"])) == job.result.folder_item


def test_panel_resumes_a_cancelled_run_from_its_checkpoint(series, tmp_path):
    """Cancel mid-training with the real worker, then Resume: the inputs are exported again to the
    paths the run recorded (same SHA-256), train --resume continues the run to complete."""
    pn = parameter_node(series, times=(1.0, 2.0, 3.0))
    pn.SetParameter("Iterations", "400")
    logic = core(series, tmp_path, worker=WORKER)
    settings = dict(parameters.settings(pn), device="cpu")
    job = logic.start_training(parameters.job_inputs(pn), settings)
    iterations = 0
    while iterations < 150:
        for event in job.poll():
            if event.get("stage") == contract.STAGE_DEFNET:
                iterations = event["iteration"]
        assert not job.finished, job.log_lines[-5:]
        time.sleep(0.05)
    job.cancel()
    job.wait(timeout=60)
    assert job.state == "cancelled"
    parameters.record_training(pn, job)
    assert pn.GetParameter("UnfinishedRunDirectory") == job.run_dir and not pn.GetParameter("LastRunDirectory")
    resumed = logic.start_training(parameters.job_inputs(pn), settings, run_dir=job.run_dir, resume=True)
    resumed.wait(timeout=300)
    assert resumed.state == "complete", resumed.message
    record = run_import.read_record(job.run_dir)
    assert record["status"] == contract.STATUS_COMPLETE and len(record["resumed"]) == 1
    parameters.record_training(pn, resumed)
    assert pn.GetParameter("LastRunDirectory") == job.run_dir and not pn.GetParameter("UnfinishedRunDirectory")


@pytest.mark.parametrize("run_dir", [None, ""])
def test_panel_resume_without_an_unfinished_run_folder_says_which_folder_is_missing(series, tmp_path, run_dir):
    """Resume with no unfinished run recorded (the parameter node's UnfinishedRunDirectory unset reads
    as an empty string) names what is missing instead of "None holds no unfinished run", and adds
    nothing to the scene."""
    pn = parameter_node(series)
    nodes = series.scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match=r"^Resume needs the folder of an unfinished STNeRP run"):
        core(series, tmp_path).start_training(parameters.job_inputs(pn), {}, run_dir=run_dir, resume=True)
    assert series.scene.GetNumberOfNodes() == nodes
