"""Scene side of the STNeRP Slicer module, against a real MRML scene (slicer-core wheel, no Qt).

The worker is replaced by ``stnerp_standin_worker.py``, which speaks the worker contract but
writes known analytic fields, so every number the module puts in the scene can be checked.
"""

import os
import shutil
import sys
import time

import numpy as np
import pytest

import slicer  # noqa: E402
import SimpleITK as sitk  # noqa: E402

import vtk  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

from STNeRPLib import contract  # noqa: E402
from STNeRPModuleLib import (core_logic, parameters, run_import, scene_files, scene_utils,  # noqa: E402
                             worker_process)

STANDIN_WORKER = [sys.executable, os.path.join(HERE, "stnerp_standin_worker.py")]


# ---------------------------------------------------------------------------------------------
# fixtures


def new_scene():
    scene_utils.register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    seg_logic.SetMRMLScene(scene)
    seq_logic = slicer.vtkSlicerSequencesLogic()
    seq_logic.SetMRMLScene(scene)
    scene._stnerp_logics = (seg_logic, seq_logic)  # keep them alive with the scene
    return scene, seg_logic


def ijk_to_ras_matrix(volume_node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def oblique_direction(left_handed=False):
    a, b = 0.35, -0.2
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    d = rz @ rx
    if left_handed:
        d = d @ np.diag([1.0, 1.0, -1.0])
    return d


SIZE = (32, 28, 16)
SPACING = (1.3, 1.1, 2.5)
ORIGIN = (-20.0, 12.0, 30.0)


def make_image(array_kji, direction, pixel=None):
    img = sitk.GetImageFromArray(array_kji)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(direction.flatten().tolist())
    if pixel is not None:
        img = sitk.Cast(img, pixel)
    return img


def phantom_arrays():
    k, j, i = np.meshgrid(*[np.arange(n) for n in SIZE[::-1]], indexing="ij")
    body = ((i - 15.5) / 13) ** 2 + ((j - 13.5) / 11) ** 2 + ((k - 7.5) / 7) ** 2 <= 1
    organ = ((i - 12) / 6) ** 2 + ((j - 13) / 6) ** 2 + ((k - 8) / 4) ** 2 <= 1
    lesion = ((i - 21) / 3.5) ** 2 + ((j - 15) / 3.5) ** 2 + ((k - 8) / 3) ** 2 <= 1
    image = np.where(body, 40.0, -1000.0) + np.where(organ, 60.0, 0) + np.where(lesion, 120.0, 0)
    label = np.zeros(SIZE[::-1], np.int16)
    label[organ] = 5
    label[lesion] = 9
    return image.astype(np.float32), label


SEGMENTS = {5: ("Liver", (0.85, 0.5, 0.4),
                "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
                "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"),
            9: ("Tumor", (0.2, 0.9, 0.3), "")}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A scene with a left-handed oblique anisotropic reference, three follow-ups (times 1, 2, 3.5)
    and a two-segment segmentation with names, colours and a terminology entry."""
    folder = str(tmp_path_factory.mktemp("sample"))
    scene, seg_logic = new_scene()
    direction = oblique_direction(left_handed=True)
    image, label = phantom_arrays()
    ref_img = make_image(image, direction)
    sitk.WriteImage(ref_img, os.path.join(folder, "ref.nrrd"))
    reference = scene_files.read_volume(scene, os.path.join(folder, "ref.nrrd"), "reference")
    followups = []
    for t in (1.0, 2.0, 3.5):
        moved = make_image(np.roll(image, int(t), axis=0), direction)
        path = os.path.join(folder, f"fu_{t:g}.nrrd")
        sitk.WriteImage(moved, path)
        followups.append((t, scene_files.read_volume(scene, path, f"follow-up {t:g}")))
    lab_path = os.path.join(folder, "label.nrrd")
    sitk.WriteImage(make_image(label, direction), lab_path)
    labelmap = scene_files.read_volume_detached(lab_path, labelmap=True)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reference segmentation")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    assert seg_logic.ImportLabelmapToSegmentationNode(labelmap, seg)
    segmentation = seg.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        s = segmentation.GetNthSegment(i)
        name, color, term = SEGMENTS[int(s.GetLabelValue())]
        s.SetName(name)
        s.SetColor(*color)
        if term:
            s.SetTerminology(term)
    return dict(scene=scene, seg_logic=seg_logic, reference=reference, followups=followups, segmentation=seg,
                folder=folder, label_path=lab_path)


@pytest.fixture(scope="module")
def trained(sample, tmp_path_factory):
    """One fake training run imported into the sample scene (shared by several tests)."""
    scene = sample["scene"]
    logic = core_logic.STNeRPCoreLogic(scene, sample["seg_logic"], worker_command=STANDIN_WORKER,
                                       temp_root=str(tmp_path_factory.mktemp("tmp")),
                                       runs_root=str(tmp_path_factory.mktemp("runs")))
    inputs = core_logic.JobInputs(sample["reference"], sample["followups"], reference_time=0.0,
                                  segmentation_node=sample["segmentation"], predict_times=[0.5])
    n_before = scene.GetNumberOfNodes()
    job = logic.start_training(inputs, {"iterations": 3})
    temp_dir = job.temp_dir
    events = []
    while not job.finished:
        got = job.poll()
        events += got
        if not got:
            time.sleep(0.05)
    assert job.state == "complete", (job.message, job.log_lines)
    return dict(sample, logic=logic, job=job, result=job.result, events=events, temp_dir=temp_dir,
                n_before=n_before, record=run_import.read_record(job.run_dir))


def physical_points(image, n=40, margin=2, seed=0):
    rng = np.random.default_rng(seed)
    size = np.array(image.GetSize())
    idx = rng.uniform(margin, size - 1 - margin, size=(n, 3))
    return np.array([image.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in idx])


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


# ---------------------------------------------------------------------------------------------
# geometry


@pytest.mark.parametrize("kind", ["anisotropic", "oblique", "left-handed"])
def test_module_volume_export_import_keeps_geometry(tmp_path, kind):
    scene, _ = new_scene()
    direction = {"anisotropic": np.eye(3), "oblique": oblique_direction(),
                 "left-handed": oblique_direction(left_handed=True)}[kind]
    rng = np.random.default_rng(1)
    original = make_image(rng.normal(size=SIZE[::-1]).astype(np.float32), direction)
    sitk.WriteImage(original, str(tmp_path / "in.nrrd"))
    node = scene_files.read_volume(scene, str(tmp_path / "in.nrrd"), "v")
    # the node's IJK->RAS maps voxel centres to the same physical points (possibly K flipped)
    m = ijk_to_ras_matrix(node)
    arr = scene_files.volume_array(node)
    for ijk in [(0, 0, 0), (5, 7, 3), (31, 27, 15)]:
        ras = m @ np.array(list(ijk) + [1.0])
        lps = scene_utils.ras_to_lps(ras[:3])
        cidx = original.TransformPhysicalPointToContinuousIndex(lps)
        assert np.allclose(cidx, np.round(cidx), atol=1e-6)
        value = original[[int(round(c)) for c in cidx]]
        assert arr[ijk[2], ijk[1], ijk[0]] == pytest.approx(value)
    scene_files.write_volume(node, str(tmp_path / "out.nrrd"))
    back = sitk.ReadImage(str(tmp_path / "out.nrrd"))
    assert np.allclose(back.GetSpacing(), SPACING)
    # same values at the same physical points
    resampled = sitk.Resample(back, original, sitk.Transform(), sitk.sitkNearestNeighbor, -999.0)
    assert np.array_equal(sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(original))


def test_module_export_does_not_change_scene(sample, tmp_path):
    scene = sample["scene"]
    n = scene.GetNumberOfNodes()
    logic = core_logic.STNeRPCoreLogic(scene, sample["seg_logic"], str(tmp_path / "runs"),
                                       worker_command=STANDIN_WORKER)
    inputs = core_logic.JobInputs(sample["reference"], sample["followups"],
                                  segmentation_node=sample["segmentation"])
    files, segment_map = logic.export_inputs(inputs, str(tmp_path))
    assert scene.GetNumberOfNodes() == n
    assert [(e["value"], e["name"]) for e in segment_map] == [(1, "Liver"), (2, "Tumor")]
    exported = sitk.GetArrayFromImage(sitk.ReadImage(files["segmentation"]))
    original = sitk.ReadImage(sample["label_path"])
    # same physical placement: resample the exported labelmap on the original grid
    res = sitk.Resample(sitk.ReadImage(files["segmentation"]), original, sitk.Transform(), sitk.sitkNearestNeighbor)
    a, b = sitk.GetArrayFromImage(res), sitk.GetArrayFromImage(original)
    assert dice(a == 1, b == 5) > 0.97 and dice(a == 2, b == 9) > 0.97
    assert set(np.unique(exported)) == {0, 1, 2}
    assert [t for _, t in files["follow_ups"]] == [1.0, 2.0, 3.5]


def test_module_landmarks_csv_is_lps_and_paired(tmp_path):
    scene, _ = new_scene()
    ref = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "ref")
    fu = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "fu")
    ref.AddControlPoint(vtk.vtkVector3d(1, 2, 3), "A")
    ref.AddControlPoint(vtk.vtkVector3d(4, 5, 6), "B")
    fu.AddControlPoint(vtk.vtkVector3d(40, 50, 60), "B")  # paired by label, not by index
    fu.AddControlPoint(vtk.vtkVector3d(10, 20, 30), "A")
    n = scene_files.export_landmarks_csv(str(tmp_path / "l.csv"), ref, [(2.0, fu)])
    assert n == 2
    lines = open(tmp_path / "l.csv").read().split()
    assert lines[0] == "time,x,y,z,ref_x,ref_y,ref_z"
    assert [float(v) for v in lines[1].split(",")] == [2, -40, -50, 60, -4, -5, 6]
    assert [float(v) for v in lines[2].split(",")] == [2, -10, -20, 30, -1, -2, 3]


# ---------------------------------------------------------------------------------------------
# worker command and process


def test_module_train_arguments_follow_contract():
    args = contract.train_arguments("/d/r.nrrd", 0, [("/d/a.nrrd", 1), ("/d/b.nrrd", -2.5)], "/OUT",
                                    segmentation="/d/s.nrrd", landmarks="/d/l.csv", ground_truth=[("/d/g.nrrd", 1)],
                                    predict_times=[0.5, -1e-5], preset="paper", iterations=30, device="cpu",
                                    prior="image", prealign="affine", similarity="lncc",
                                    label_interpolation="nearest", velocity_levels=2, anchor_reference=True,
                                    stop_on_convergence=True, calibrate_intensities=False, stdin_cancel=True)
    assert args == ["train", "--reference", "/d/r.nrrd", "--reference-time=0",
                    "--follow-up", "/d/a.nrrd", "1", "--follow-up", "/d/b.nrrd", "-2.5",
                    "--segmentation", "/d/s.nrrd", "--landmarks", "/d/l.csv", "--ground-truth", "/d/g.nrrd", "1",
                    "--predict-times", "0.5", "-0.00001", "--output", "/OUT", "--preset", "paper",
                    "--device", "cpu", "--prealign", "affine", "--iterations", "30", "--prior", "image",
                    "--similarity", "lncc", "--label-interpolation", "nearest", "--velocity-levels", "2",
                    "--anchor-reference", "--stop-on-convergence", "--no-calibrate-intensities", "--json-events",
                    "--cancel-on-stdin-close"]
    default_prior = contract.train_arguments("/r.nrrd", 0, [("/a.nrrd", 1)], "/OUT")
    assert "--prior" not in default_prior, "the preset's own prior is the worker's default"
    assert not {"--anchor-reference", "--no-anchor-reference"} & set(default_prior), "the preset's own anchor"
    assert not {"--stop-on-convergence", "--no-stop-on-convergence"} & set(default_prior), "the preset's own stop"
    assert not {"--calibrate-intensities", "--no-calibrate-intensities"} & set(default_prior), "the preset's own"
    unanchored = contract.train_arguments("/r.nrrd", 0, [("/a.nrrd", 1)], "/OUT", anchor_reference=False)
    assert contract.parse_arguments(unanchored).anchor_reference is False
    auto = contract.train_arguments("/r.nrrd", 0, [("/a.nrrd", 1)], "/OUT", velocity_levels="auto")
    assert auto[auto.index("--velocity-levels") + 1] == "auto"
    assert contract.predict_arguments("/RUN", [1.5], "/NEW") == [
        "predict", "--run", "/RUN", "--times", "1.5", "--output", "/NEW", "--json-events"]
    with pytest.raises(ValueError):
        contract.train_arguments("/r", 0, [], "/OUT")
    with pytest.raises(ValueError, match="similarity"):
        contract.train_arguments("/r.nrrd", 0, [("/a.nrrd", 1)], "/OUT", similarity="ncc")
    with pytest.raises(ValueError, match="label_interpolation"):
        contract.train_arguments("/r.nrrd", 0, [("/a.nrrd", 1)], "/OUT", label_interpolation="cubic")


@pytest.mark.parametrize("relative", ["reference", "follow-up", "output"])
def test_module_worker_gets_no_relative_path(relative):
    paths = {"reference": "/r.nrrd", "follow-up": "/a.nrrd", "output": "/OUT"}
    paths[relative] = "relative/" + relative
    with pytest.raises(ValueError, match="relative"):
        contract.train_arguments(paths["reference"], 0, [(paths["follow-up"], 1)], paths["output"])


def test_module_worker_parses_every_time_the_module_writes(tmp_path):
    """The real worker's command line reads back the exact times the module writes, negative and
    tiny ones too (argparse takes '-1e-05' for an option)."""
    from STNeRPLib.contract import parser
    times = [-1e-5, -1000.0, 0.1 + 0.2, 20260108.0]
    args = parser().parse_args(contract.train_arguments(
        "/r.nrrd", -2.5, [("/a.nrrd", t) for t in times], "/OUT", predict_times=times, stdin_cancel=True))
    assert args.reference_time == -2.5
    assert [float(t) for _, t in args.follow_up] == times
    assert args.predict_times == times
    assert args.cancel_on_stdin_close
    assert worker_process.parse_line("stdout", '{"event":"done","status":"complete","output":"X"}\n')["event"] == "done"
    assert worker_process.parse_line("stdout", "plain text")["event"] == "log"
    assert worker_process.parse_line("stderr", '{"event":"done"}')["event"] == "log"


def test_module_progress_fills_the_bar_whether_or_not_ref_net_is_fitted():
    def at(stage, iteration, total, ref_net):
        return core_logic.progress_fraction({"stage": stage, "iteration": iteration, "total": total}, ref_net)
    assert at("refnet", 0, 600, True) == pytest.approx(0.0)
    assert at("defnet", 0, 1000, True) == pytest.approx(0.35)
    assert at("defnet", 0, 1000, False) == pytest.approx(0.0), "no Ref-Net stage: Def-Net starts at 0"
    assert at("defnet", 500, 1000, False) == pytest.approx(0.45)
    assert at("defnet", 1000, 1000, False) == at("defnet", 1000, 1000, True) == pytest.approx(0.9)


def test_module_helpers_import_without_qt():
    import subprocess
    modules = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "STNeRP", "STNeRPModuleLib"))
                     if f.endswith(".py") and f != "__init__.py")
    code = (f"import sys; sys.path[:0] = [{os.path.join(ROOT, 'STNeRP')!r}, {ROOT!r}]; "
            + "; ".join(f"import STNeRPModuleLib.{m}" for m in modules)
            + "; bad = [m for m in ('qt', 'ctk', 'PythonQt', 'slicer.ScriptedLoadableModule', 'torch') "
              "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------------------------
# a complete run


def test_module_run_reports_progress_and_removes_temp(trained):
    job, events = trained["job"], trained["events"]
    kinds = [e["event"] for e in events]
    assert "progress" in kinds and "done" in kinds and kinds[-1] == "finished"
    assert job.progress == 1.0
    assert not os.path.exists(trained["temp_dir"])
    assert trained["record"]["status"] == "complete"


def test_module_transform_maps_points_like_the_field(trained):
    run_dir = trained["job"].run_dir
    for tp in trained["record"]["time_points"]:
        node = trained["result"].time_points[float(tp["time"])]["transform"]
        assert node.IsA("vtkMRMLGridTransformNode")
        field = sitk.ReadImage(os.path.join(run_dir, tp["displacement"]))
        itk_tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
        from_parent = node.GetTransformFromParent()
        for p in physical_points(field):
            expected = np.array(itk_tx.TransformPoint(p.tolist()))
            got_ras = from_parent.TransformPoint(scene_utils.lps_to_ras(p))
            assert np.allclose(scene_utils.ras_to_lps(got_ras), expected, atol=1e-3)
    # registration references: fixed = the follow-up, moving = the reference
    node = trained["result"].time_points[2.0]["transform"]
    fixed = node.GetNodeReference(slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole())
    moving = node.GetNodeReference(slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole())
    assert fixed.GetName() == "follow-up 2" and moving.GetName() == "reference"


def test_module_reference_to_t_transform_moves_reference_points_to_time_t(trained):
    """The exact inverse, loaded in its to-parent direction: reference markups placed under it are
    shown at time t, where the forward field carries them back to within 0.05 mm (the stand-in's
    fields are exact at the voxels; between them linear interpolation of the forward field adds
    up to h^2/8 |u''| = 0.03 mm at t = 1, 0.1 mm at t = 3.5 on this 2.5 mm grid)."""
    reference = sitk.ReadImage(os.path.join(trained["job"].run_dir, "reference.nrrd"))
    rng = np.random.default_rng(3)   # voxel centres: the inverse grid is read where it was written
    index = rng.integers(6, np.array(reference.GetSize()) - 6, size=(40, 3))
    points = np.array([reference.TransformIndexToPhysicalPoint([int(i) for i in idx]) for idx in index])
    for t in (0.5, 1.0):
        entry = trained["result"].time_points[t]
        markups = trained["scene"].AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "reference points")
        for r in points:
            markups.AddControlPoint(vtk.vtkVector3d(*scene_utils.lps_to_ras(r)))
        markups.SetAndObserveTransformNodeID(entry["inverse"].GetID())
        forward = entry["transform"].GetTransformFromParent()
        for i, r in enumerate(points):
            shown = [0.0, 0.0, 0.0]
            markups.GetNthControlPointPositionWorld(i, shown)
            assert np.linalg.norm(np.array(shown) - scene_utils.lps_to_ras(r)) >= 0.6 * t - 1e-6, "the point moved"
            back = scene_utils.ras_to_lps(forward.TransformPoint(shown))
            assert np.allclose(back, r, atol=0.05), (t, r, back)
        trained["scene"].RemoveNode(markups)


def test_module_hardened_reference_segmentation_matches_worker_labelmap(trained):
    scene, seg_logic = trained["scene"], trained["seg_logic"]
    tlogic = slicer.vtkSlicerTransformLogic()
    tlogic.SetMRMLScene(scene)
    t = 3.5
    entry = trained["result"].time_points[t]
    tp = [p for p in trained["record"]["time_points"] if p["time"] == t][0]
    worker = sitk.ReadImage(os.path.join(trained["job"].run_dir, tp["labelmap"]))
    # a copy of the reference contours, placed under the transform and hardened
    copy = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "copy")
    copy.Copy(trained["segmentation"])
    copy.SetName("copy")
    copy.SetAndObserveTransformNodeID(entry["transform"].GetID())
    tlogic.hardenTransform(copy)
    assert copy.GetParentTransformNode() is None
    fixed = dict(trained["followups"])[t]
    out = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "out")
    ids = vtk.vtkStringArray()
    copy.GetSegmentation().GetSegmentIDs(ids)
    assert seg_logic.ExportSegmentsToLabelmapNode(copy, ids, out, fixed,
                                                  slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    path = os.path.join(trained["folder"], "hardened.nrrd")
    scene_files.write_volume(out, path)
    hardened = sitk.Resample(sitk.ReadImage(path), worker, sitk.Transform(), sitk.sitkNearestNeighbor)
    a, b = sitk.GetArrayFromImage(hardened), sitk.GetArrayFromImage(worker)
    for pos, value in ((1, 1), (2, 2)):  # positions in ids == the segment map values here
        assert dice(a == pos, b == value) > 0.93, (value, dice(a == pos, b == value))
    for node in (copy, out):
        scene.RemoveNode(node)


def test_module_segmentation_import_keeps_names_colours_terminology(trained):
    for t, entry in trained["result"].time_points.items():
        seg = entry["segmentation"]
        segmentation = seg.GetSegmentation()
        assert segmentation.GetNumberOfSegments() == 2
        names = [segmentation.GetNthSegment(i).GetName() for i in range(2)]
        assert names == ["Liver", "Tumor"]
        liver = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Liver"))
        assert np.allclose(liver.GetColor(), SEGMENTS[5][1], atol=1e-6)
        assert liver.GetTerminology() == SEGMENTS[5][2]
        tumor = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Tumor"))
        assert np.allclose(tumor.GetColor(), SEGMENTS[9][1], atol=1e-6)
        geometry = seg.GetSegmentation().GetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
        assert geometry
        # the worker's label values come back as the right segments
        labelmap = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(
            trained["job"].run_dir, [p for p in trained["record"]["time_points"] if p["time"] == t][0]["labelmap"])))
        assert (labelmap == 1).sum() > 0 and (labelmap == 2).sum() > 0


def test_module_jacobian_display_is_centred_at_one(trained):
    entry = trained["result"].time_points[3.5]
    display = entry["jacobian"].GetDisplayNode()
    assert display.GetLevel() == pytest.approx(1.0)
    values = scene_files.volume_array(entry["jacobian"])
    assert display.GetWindow() >= 2 * max(1 - np.percentile(values, 1), np.percentile(values, 99) - 1) - 1e-6
    color = display.GetColorNode()
    assert color.GetAttribute("Category") == "STNeRP"
    rgba_low, rgba_mid, rgba_high = [0] * 4, [0] * 4, [0] * 4
    n = color.GetNumberOfColors()
    color.GetColor(0, rgba_low)
    color.GetColor(n // 2, rgba_mid)
    color.GetColor(n - 1, rgba_high)
    assert rgba_low[2] > rgba_low[0] and rgba_high[0] > rgba_high[2] and min(rgba_mid[:3]) > 0.9


def test_module_sequences_browser_and_table(trained):
    result, record = trained["result"], trained["record"]
    times = sorted(float(tp["time"]) for tp in record["time_points"])
    assert times == [0.0, 0.5, 1.0, 2.0, 3.5], "the reference time too, as the worker writes it"
    for kind in run_import.SEQUENCE_TITLES:
        seq = result.sequences[kind]
        assert seq.GetNumberOfDataNodes() == len(times)
        assert [float(seq.GetNthIndexValue(i)) for i in range(len(times))] == times
        assert seq.GetIndexName() == "time"
    browser = result.browser
    assert browser.GetMasterSequenceNode() is result.sequences["transform"]
    assert browser.GetNumberOfSynchronizedSequenceNodes() == len(run_import.SEQUENCE_TITLES) - 1
    browser.SetSelectedItemNumber(times.index(2.0))
    proxy = browser.GetProxyNode(result.sequences["transform"])
    assert proxy is not None
    p = [5.0, -3.0, 40.0]
    expected = result.time_points[2.0]["transform"].GetTransformFromParent().TransformPoint(p)
    assert np.allclose(proxy.GetTransformFromParent().TransformPoint(p), expected, atol=1e-2)
    # metrics table: one row per time point, values from run.json
    table = result.table.GetTable()
    assert table.GetNumberOfRows() == len(times)
    cols = {table.GetColumn(i).GetName(): table.GetColumn(i) for i in range(table.GetNumberOfColumns())}
    for key in ("time", "scanned", "folded voxels", "Jacobian min", "Jacobian max", "PSNR (dB)", "SSIM",
                "TRE mean (mm)"):
        assert key in cols
    assert [cols["time"].GetValue(r) for r in range(len(times))] == times
    by_time = {float(tp["time"]): tp for tp in record["time_points"]}
    for r, t in enumerate(times):
        assert cols["Jacobian min"].GetValue(r) == pytest.approx(by_time[t]["metrics"]["jacobian_min"])
        assert cols["scanned"].GetValue(r) == (1.0 if by_time[t]["scanned"] else 0.0)


def test_metrics_table_names_the_segments_a_time_point_lost():
    """A run that records labels_lost gets a text column naming, per time, the segments its propagated labelmap
    lost (by the segment map's names; "none"); a record from before it gets no such column."""
    scene = slicer.vtkMRMLScene()
    points = [{"time": 0.0, "metrics": {}, "labels_lost": []}, {"time": 2.0, "metrics": {}, "labels_lost": [2, 7]}]
    segments = [{"value": 1, "name": "GTV"}, {"value": 2, "name": "node 4R"}]
    table = run_import.create_metrics_table(scene, "m", points, segments).GetTable()
    lost = table.GetColumnByName("segments lost")
    assert [lost.GetValue(r) for r in range(2)] == ["none", "node 4R, label 7"]
    before = run_import.create_metrics_table(scene, "old", [{"time": 0.0, "metrics": {}}], segments).GetTable()
    assert before.GetColumnByName("segments lost") is None


def test_metrics_table_says_how_each_scan_was_fitted():
    """A run whose fit calibrated a follow-up's CT numbers (a CBCT's) and one of whose scans covers part of the grid:
    the panel's table says, per time, the calibration as the report says it ("as scanned" for the others) and the
    share of the grid each scan covers, which only run.json and the report gave; a run without either has neither
    column."""
    scene = slicer.vtkMRMLScene()
    calibration = {"scale": 0.867, "offset_hu": 8.2, "bias_hu": [-0.3, 61.0], "change_hu": 172.4}
    points = [{"time": 0.0, "scanned": True, "metrics": {}}, {"time": 1.0, "scanned": False, "metrics": {}},
              {"time": 2.0, "scanned": True, "metrics": {}, "field_of_view": 0.8},
              {"time": 3.0, "scanned": True, "metrics": {}}]
    table = run_import.create_metrics_table(scene, "m", points, calibrations={3.0: calibration}).GetTable()
    numbers = table.GetColumnByName("CT numbers fitted as (HU)")
    assert [numbers.GetValue(r) for r in range(4)] == [
        "as scanned", "", "as scanned", "0.867 × the reference's +8, a bias of -0 to +61 (calibrated: 172 off)"]
    covered = table.GetColumnByName("field of view (% of the grid)")
    assert [covered.GetValue(r) for r in (0, 2, 3)] == [100.0, 80.0, 100.0] and np.isnan(covered.GetValue(1))
    before = run_import.create_metrics_table(scene, "old", [{"time": 0.0, "scanned": True, "metrics": {}}]).GetTable()
    assert before.GetColumnByName("CT numbers fitted as (HU)") is None
    assert before.GetColumnByName("field of view (% of the grid)") is None


def test_an_imported_run_that_calibrated_a_follow_up_says_so_in_its_table(trained, tmp_path):
    """The run's own record read on import: a follow-up whose CT numbers the fit calibrated (run.json's
    intensity_calibrations) is named so in the imported metrics table."""
    folder = tmp_path / "run"
    shutil.copytree(trained["result"].run_dir, folder)
    record = contract.read_run(folder)
    for tp in record["time_points"]:
        tp.pop("labelmap", None)                        # no segment map needed to import it
    record["intensity_calibrations"] = [[2.0, {"scale": 0.9, "offset_hu": 80.0, "bias_hu": [-80.0, 0.0],
                                               "change_hu": 95.0}]]
    contract.write_run(folder, record)
    scene, seg_logic = new_scene()
    table = run_import.import_run(scene, str(folder), seg_logic).table.GetTable()
    times = [table.GetColumnByName("time").GetValue(r) for r in range(table.GetNumberOfRows())]
    numbers = table.GetColumnByName("CT numbers fitted as (HU)")
    said = "0.900 × the reference's +80, a bias of -80 to +0 (calibrated: 95 off)"
    assert numbers.GetValue(times.index(2.0)) == said
    assert numbers.GetValue(times.index(1.0)) == "as scanned"


def test_module_results_are_new_nodes_under_one_folder(trained):
    scene, result = trained["scene"], trained["result"]
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemName(result.folder_item).startswith("STNeRP")
    children = vtk.vtkIdList()
    sh.GetItemChildren(result.folder_item, children)
    nodes = {sh.GetItemDataNode(children.GetId(i)).GetID() for i in range(children.GetNumberOfIds())}
    for entry in result.time_points.values():
        for node in entry.values():
            assert node.GetID() in nodes
    assert result.table.GetID() in nodes and result.browser.GetID() in nodes
    # inputs untouched
    assert trained["reference"].GetParentTransformNode() is None
    assert trained["segmentation"].GetSegmentation().GetNumberOfSegments() == 2


def test_module_prediction_at_new_time_without_retraining(trained, tmp_path):
    scene = trained["scene"]
    n = scene.GetNumberOfNodes()
    job = trained["logic"].start_prediction(trained["job"].run_dir, [1.5], str(tmp_path / "p1.5"),
                                            reference_volume=trained["reference"]).wait(timeout=60)
    assert job.state == "complete", job.message
    entry = job.result.time_points[1.5]
    assert set(entry) == {"transform", "segmentation", "jacobian", "image", "inverse"}
    assert not job.result.sequences and job.result.browser is None
    names = [entry["segmentation"].GetSegmentation().GetNthSegment(i).GetName() for i in range(2)]
    assert names == ["Liver", "Tumor"]  # the segment map saved in the run folder
    assert scene.GetNumberOfNodes() > n


def test_module_parameter_node_is_saved_with_scene(trained, tmp_path):
    scene = trained["scene"]
    node = parameters.create_parameter_node(scene)
    node.SetParameter("Preset", "paper")
    node.SetParameter("Iterations", "123")
    for key, value in (("Similarity", "lncc"), ("LabelInterpolation", "nearest"), ("VelocityLevels", "2"),
                       ("AnchorReference", "off"), ("StopOnConvergence", "on"), ("StructurePoints", "0.1"),
                       ("CalibrateIntensities", "off")):
        node.SetParameter(key, value)
    node.SetNodeReferenceID(parameters.REFERENCE_VOLUME, trained["reference"].GetID())
    parameters.set_follow_ups(node, [parameters.FollowUp(v, t) for t, v in trained["followups"]])
    assert parameters.create_parameter_node(scene) is node  # singleton
    path = str(tmp_path / "scene.mrml")
    scene.SetURL(path)
    assert scene.Commit(path)
    other, _ = new_scene()
    other.SetURL(path)
    other.Import()
    loaded = other.GetSingletonNode(parameters.MODULE_NAME, "vtkMRMLScriptedModuleNode")
    assert loaded is not None
    assert loaded.GetParameter("Preset") == "paper"
    kept = parameters.settings(loaded)
    assert kept["iterations"] == 123
    assert (kept["similarity"], kept["velocity_levels"], kept["anchor_reference"], kept["stop_on_convergence"]) == (
        "lncc", 2, False, True)
    assert kept["label_interpolation"] == "nearest" and kept["structure_points"] == 0.1
    assert kept["calibrate_intensities"] is False
    assert loaded.GetNodeReference(parameters.REFERENCE_VOLUME).GetName() == "reference"
    assert [row.time for row in parameters.get_follow_ups(loaded)] == [1.0, 2.0, 3.5]


# ---------------------------------------------------------------------------------------------
# runs that do not complete leave the scene as it was


def _run_with_mode(sample, tmp_path, mode, monkeypatch, cancel_after=None):
    monkeypatch.setenv("STNERP_STANDIN_MODE", mode)
    scene = sample["scene"]
    logic = core_logic.STNeRPCoreLogic(scene, sample["seg_logic"], worker_command=STANDIN_WORKER,
                                       temp_root=str(tmp_path / "tmp"), runs_root=str(tmp_path / "runs"))
    inputs = core_logic.JobInputs(sample["reference"], sample["followups"][:1],
                                  segmentation_node=sample["segmentation"])
    n = scene.GetNumberOfNodes()
    job = logic.start_training(inputs, {"iterations": 3})
    temp_dir = job.temp_dir
    progress = 0
    deadline = time.monotonic() + 60
    while not job.finished:
        assert time.monotonic() < deadline
        for e in job.poll():
            progress += e["event"] == "progress"
        if cancel_after is not None and progress >= cancel_after and job.state == "running":
            job.cancel()
        time.sleep(0.02)
    assert scene.GetNumberOfNodes() == n
    assert not os.path.exists(temp_dir)
    return job


def test_module_failed_run_leaves_scene_unchanged(sample, tmp_path, monkeypatch):
    job = _run_with_mode(sample, tmp_path, "fail", monkeypatch)
    assert job.state == "failed"
    assert job.message == "stand-in failure: out of memory on the device"


def test_module_incomplete_run_is_not_imported(sample, tmp_path, monkeypatch):
    job = _run_with_mode(sample, tmp_path, "incomplete", monkeypatch)
    assert job.state == "failed" and "not complete" in job.message


def test_module_cancel_kills_worker_and_leaves_scene_unchanged(sample, tmp_path, monkeypatch):
    job = _run_with_mode(sample, tmp_path, "slow", monkeypatch, cancel_after=3)
    assert job.state == "cancelled"
    pid = job.process.process.pid
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole process group is gone
    assert run_import.read_record(job.run_dir)["status"] == "interrupted"


def test_module_cancel_kills_grandchildren(tmp_path):
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              "print(p.pid, flush=True); time.sleep(120)")
    proc = worker_process.WorkerProcess([sys.executable, "-c", script], grace=2).start()
    child = None
    deadline = time.monotonic() + 20
    while child is None and time.monotonic() < deadline:
        for e in proc.poll():
            if e["event"] == "log" and e["text"].strip().isdigit():
                child = int(e["text"])
        time.sleep(0.02)
    assert child
    proc.cancel()
    proc.wait(timeout=10)
    time.sleep(0.2)
    try:
        os.kill(child, 0)
        alive = open(f"/proc/{child}/stat").read().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        alive = False
    assert not alive


def test_module_import_error_rolls_back(trained, tmp_path):
    import shutil
    scene = trained["scene"]
    broken = str(tmp_path / "broken")
    shutil.copytree(trained["job"].run_dir, broken, ignore=shutil.ignore_patterns("predictions"))
    record = run_import.read_record(broken)
    last = sorted(record["time_points"], key=lambda tp: tp["time"])[-1]
    with open(os.path.join(broken, last["image"]), "w") as f:
        f.write("not an image")
    n = scene.GetNumberOfNodes()
    sh = scene.GetSubjectHierarchyNode()
    items = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), items)
    n_items = items.GetNumberOfIds()
    with pytest.raises(Exception):
        run_import.import_run(scene, broken, trained["seg_logic"], segment_map=trained["job"].segment_map)
    assert scene.GetNumberOfNodes() == n
    sh.GetItemChildren(sh.GetSceneItemID(), items)
    assert items.GetNumberOfIds() == n_items


def test_module_follow_ups_from_a_volume_sequence(sample):
    scene = sample["scene"]
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "4D CT")
    seq.SetIndexType(slicer.vtkMRMLSequenceNode.NumericIndex)
    for t, node in [(0.0, sample["reference"])] + list(sample["followups"]):
        seq.SetDataNodeAtValue(node, contract.format_time(t))
    items = core_logic.follow_ups_from_sequence(seq, reference_time=0.0)
    assert [t for t, _ in items] == [1.0, 2.0, 3.5]
    assert all(n.GetImageData() is not None for _, n in items)
    scene.RemoveNode(seq)


def test_module_remove_imported_restores_scene(trained, tmp_path):
    scene = trained["scene"]
    n = scene.GetNumberOfNodes()
    result = run_import.import_run(scene, trained["job"].run_dir, trained["seg_logic"],
                                 segment_map=trained["job"].segment_map, name="again")
    assert scene.GetNumberOfNodes() > n
    before = {scene.GetNthNode(i).GetID() for i in range(n)}
    run_import.remove_imported(scene, result)
    left = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    assert scene.GetNumberOfNodes() == n, [(x.GetID(), x.GetName()) for x in left if x.GetID() not in before]


def test_module_parameter_node_gives_the_job_inputs(sample):
    """Parameter node -> job inputs: follow-up rows with their own times, or a volume sequence
    whose index values are the times (the item at the reference time left out)."""
    scene = sample["scene"]
    old = scene.GetSingletonNode(parameters.MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if old is not None:  # left by the save-with-scene test
        scene.RemoveNode(old)
    pn = parameters.create_parameter_node(scene)
    assert pn.GetParameter("Preset") == contract.DEFAULT_PRESET
    pn.SetNodeReferenceID(parameters.REFERENCE_VOLUME, sample["reference"].GetID())
    pn.SetNodeReferenceID(parameters.SEGMENTATION, sample["segmentation"].GetID())
    parameters.set_follow_ups(pn, [parameters.FollowUp(v, t * 10) for t, v in sample["followups"]])
    pn.SetParameter("ReferenceTime", "5")
    inputs = parameters.job_inputs(pn)
    inputs.validate()
    assert inputs.reference_volume is sample["reference"] and inputs.reference_time == 5.0
    assert [t for t, _ in inputs.follow_ups] == [10.0, 20.0, 35.0]
    assert inputs.segmentation_node is sample["segmentation"]
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "4D")
    for t, node in [(5.0, sample["reference"])] + list(sample["followups"]):
        sequence.SetDataNodeAtValue(node, contract.format_time(t))
    pn.SetParameter("FollowUpMode", "sequence")
    pn.SetNodeReferenceID(parameters.FOLLOW_UP_SEQUENCE, sequence.GetID())
    assert [t for t, _ in parameters.job_inputs(pn).follow_ups] == [1.0, 2.0, 3.5]
    scene.RemoveNode(sequence)
    scene.RemoveNode(pn)


def test_module_grid_interpolation_restored_after_scene_reload(trained, tmp_path):
    """Slicer reads grid transforms back as cubic; the module sets them linear again (as ITK)."""
    scene = trained["scene"]
    path = str(tmp_path / "scene.mrml")       # the grids stay in the run folder, referenced
    scene.SetURL(path)
    assert scene.Commit(path)
    other, _ = new_scene()
    other.SetURL(path)
    other.Import()
    grids = [other.GetNthNodeByClass(i, "vtkMRMLGridTransformNode")
             for i in range(other.GetNumberOfNodesByClass("vtkMRMLGridTransformNode"))]
    ours = [g for g in grids if g.GetAttribute("STNeRP.Interpolation") == "linear"]
    assert any(_grid_mode(g) == "cubic" for g in ours)   # what Slicer does when it reads a grid file
    assert scene_files.restore_grid_interpolation(other) == len(ours)
    assert all(_grid_mode(g) == "linear" for g in ours)


def _grid_mode(node) -> str:
    transform = node.GetTransformFromParent()
    while transform.IsA("vtkGeneralTransform"):
        transform = transform.GetConcatenatedTransform(0)
    return transform.GetInterpolationModeAsString().lower()
