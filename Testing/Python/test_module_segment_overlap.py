"""Overlapping segments on a real MRML scene (slicer-core wheel): radiotherapy contours nested by
design (GTV inside CTV inside PTV) reach the worker with the inner ones whole, and the panel can
name the overlapping segments and the voxels they share before Apply."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

import slicer

from test_module_scene import SIZE, make_image, new_scene, oblique_direction

from STNeRPModuleLib import core_logic, scene_files


def _box(lo: tuple[int, int, int], hi: tuple[int, int, int]) -> np.ndarray:
    """A (k, j, i) mask of the reference grid: lo <= (i, j, k) < hi."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in SIZE[::-1]), indexing="ij")
    return (i >= lo[0]) & (i < hi[0]) & (j >= lo[1]) & (j < hi[1]) & (k >= lo[2]) & (k < hi[2])


GTV = _box((12, 10, 6), (16, 14, 9))
CTV = _box((10, 8, 5), (19, 17, 11))
PTV = _box((7, 5, 3), (23, 21, 13))
OAR = _box((20, 3, 2), (28, 9, 8))   # an organ at risk that cuts into the PTV's corner


def _scene_with_segments(tmp_path, masks: dict[str, np.ndarray]):
    """(scene, segmentations logic, reference volume, segmentation node with one segment per mask,
    in the dict's order) on an oblique, anisotropic grid."""
    scene, seg_logic = new_scene()
    direction = oblique_direction()
    sitk.WriteImage(make_image(np.zeros(SIZE[::-1], np.float32), direction), str(tmp_path / "reference.nrrd"))
    reference = scene_files.read_volume(scene, str(tmp_path / "reference.nrrd"), "reference")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "contours")
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    for name, mask in masks.items():
        path = str(tmp_path / f"{name}.nrrd")
        sitk.WriteImage(make_image(mask.astype(np.uint8), direction), path)
        assert seg_logic.ImportLabelmapToSegmentationNode(scene_files.read_volume_detached(path, labelmap=True), node)
        segmentation = node.GetSegmentation()
        segmentation.GetNthSegment(segmentation.GetNumberOfSegments() - 1).SetName(name)
    return scene, seg_logic, reference, node


def test_nested_contours_reach_the_worker_with_the_inner_ones_whole(tmp_path):
    # drawn inside out: Slicer's merged export (the later segment wins) would write all of it as PTV
    scene, seg_logic, reference, node = _scene_with_segments(tmp_path, {"GTV": GTV, "CTV": CTV, "PTV": PTV})
    path = str(tmp_path / "exported.nrrd")
    segment_map = scene_files.export_segmentation_labelmap(scene, node, None, reference, path, seg_logic)
    assert [(e["value"], e["name"]) for e in segment_map] == [(1, "GTV"), (2, "CTV"), (3, "PTV")]
    exported = sitk.GetArrayFromImage(sitk.ReadImage(path))
    expected = np.zeros(SIZE[::-1], np.int16)
    expected[PTV], expected[CTV], expected[GTV] = 3, 2, 1
    assert np.count_nonzero(exported == 1) == np.count_nonzero(GTV)
    np.testing.assert_array_equal(exported, expected)


def test_partly_overlapping_segments_give_the_shared_voxels_to_the_smaller(tmp_path):
    assert 0 < np.count_nonzero(OAR & PTV) and np.count_nonzero(OAR) < np.count_nonzero(PTV)
    scene, seg_logic, reference, node = _scene_with_segments(tmp_path, {"OAR": OAR, "PTV": PTV})
    path = str(tmp_path / "exported.nrrd")
    scene_files.export_segmentation_labelmap(scene, node, None, reference, path, seg_logic)
    exported = sitk.GetArrayFromImage(sitk.ReadImage(path))
    assert np.all(exported[OAR] == 1) and np.all(exported[PTV & ~OAR] == 2)


def test_overlap_warning_names_the_segments_and_the_voxels_they_share(tmp_path):
    masks = {"GTV": GTV, "CTV": CTV, "PTV": PTV, "OAR": OAR}
    scene, seg_logic, reference, node = _scene_with_segments(tmp_path, masks)
    logic = core_logic.STNeRPCoreLogic(scene, seg_logic, str(tmp_path / "runs"))
    inputs = core_logic.JobInputs(reference, [], segmentation_node=node)
    nodes = scene.GetNumberOfNodes()
    warning = logic.segment_overlap_warning(inputs)
    assert scene.GetNumberOfNodes() == nodes
    assert "\n" not in warning
    shared = {pair: int(np.count_nonzero(masks[pair[0]] & masks[pair[1]]))
              for pair in (("PTV", "CTV"), ("PTV", "GTV"), ("PTV", "OAR"), ("CTV", "GTV"))}
    for (loses, kept), voxels in shared.items():
        assert f"'{loses}' and '{kept}' share {voxels} voxels" in warning
    assert "'CTV' and 'OAR'" not in warning and "'GTV' and 'OAR'" not in warning
    assert "'PTV', 'CTV' will be propagated without" in warning
    # segments that do not overlap, or one segment left: nothing to say
    assert logic.segment_overlap_warning(core_logic.JobInputs(reference, [], segmentation_node=node,
                                                              segment_ids=[_id(node, "GTV"), _id(node, "OAR")])) is None
    assert logic.segment_overlap_warning(core_logic.JobInputs(reference, [])) is None


def _id(node: slicer.vtkMRMLSegmentationNode, name: str) -> str:
    return node.GetSegmentation().GetSegmentIdBySegmentName(name)


def test_nested_contours_come_back_whole_from_the_worker_labelmap(tmp_path):
    """The worker's labelmap holds one label per voxel (the PTV label only on the PTV's ring), but
    the imported PTV is the whole PTV again: each segment is re-united with the segments drawn
    inside it. Here the 'worker' returns the exported labelmap unchanged (no motion)."""
    masks = {"GTV": GTV, "CTV": CTV, "PTV": PTV}
    scene, seg_logic, reference, node = _scene_with_segments(tmp_path, masks)
    path = str(tmp_path / "exported.nrrd")
    segment_map = scene_files.export_segmentation_labelmap(scene, node, None, reference, path, seg_logic)
    imported = scene_files.import_segmentation(scene, path, "propagated", segment_map, seg_logic)
    names = [e["name"] for e in segment_map]
    ids = [imported.GetSegmentation().GetSegmentIdBySegmentName(name) for name in names]
    voxels = scene_files.segment_voxels(scene, imported, ids, reference, seg_logic)
    for name, found in zip(names, voxels):
        np.testing.assert_array_equal(found, np.flatnonzero(masks[name]), err_msg=name)
