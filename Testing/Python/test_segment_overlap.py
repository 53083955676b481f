"""What the module's segmentation export (STNeRP/STNeRPModuleLib/scene_files.py) does with segments
that overlap: the engine takes one label per voxel, so a voxel drawn in two segments can keep only
one of them. Pinned here as found (real MRML scene, slicer-core wheel): the segment later in the
export order takes the shared voxels, so the earlier one is exported (and propagated) smaller
than drawn."""
import os

import numpy as np
import SimpleITK as sitk

import slicer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

from STNeRPModuleLib import scene_files, scene_utils  # noqa: E402

SIZE, SPACING, ORIGIN = (24, 20, 12), (1.5, 1.25, 2.0), (-10.0, 5.0, 20.0)


def _volume(tmp_path, name, array, scene=None, labelmap=False):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    path = str(tmp_path / f"{name}.nrrd")
    sitk.WriteImage(image, path)
    if labelmap:
        return scene_files.read_volume_detached(path, labelmap=True)
    return scene_files.read_volume(scene, path, name)


def test_overlapping_segments_export_one_label_per_voxel_the_later_segment_wins(tmp_path):
    scene_utils.register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    seg_logic.SetMRMLScene(scene)
    reference = _volume(tmp_path, "reference", np.zeros(SIZE[::-1], np.float32), scene)
    k, j, i = np.meshgrid(*(np.arange(n) for n in SIZE[::-1]), indexing="ij")
    first = (i >= 4) & (i < 14) & (j >= 4) & (j < 14) & (k >= 3) & (k < 9)
    second = (i >= 10) & (i < 20) & (j >= 6) & (j < 16) & (k >= 3) & (k < 9)
    assert (first & second).sum() > 0
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "overlapping")
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    for name, mask in (("first", first), ("second", second)):
        labelmap = _volume(tmp_path, name, mask.astype(np.uint8), labelmap=True)
        assert seg_logic.ImportLabelmapToSegmentationNode(labelmap, node)
        segmentation = node.GetSegmentation()
        segmentation.GetNthSegment(segmentation.GetNumberOfSegments() - 1).SetName(name)
    path = str(tmp_path / "exported.nrrd")
    segment_map = scene_files.export_segmentation_labelmap(scene, node, None, reference, path, seg_logic)
    assert [(e["value"], e["name"]) for e in segment_map] == [(1, "first"), (2, "second")]
    exported = sitk.ReadImage(path)
    back = sitk.GetArrayFromImage(sitk.Resample(exported, sitk.ReadImage(str(tmp_path / "reference.nrrd")),
                                                sitk.Transform(), sitk.sitkNearestNeighbor))
    print(f"overlap {int((first & second).sum())} voxels: exported as {np.unique(back[first & second])}")
    assert np.all(back[first & second] == 2)                 # the later segment takes the shared voxels
    assert np.all(back[first & ~second] == 1) and np.all(back[second] == 2)
    assert np.count_nonzero(back == 1) == np.count_nonzero(first & ~second) < np.count_nonzero(first)
