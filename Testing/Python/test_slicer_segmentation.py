"""A 3D Slicer segmentation file (.seg.nrrd) given to the worker: the files are written by Slicer's own storage
node (slicer-core wheel, a real MRML scene). Overlapping segments (a tumour inside its lung) are saved in layers;
they are merged with each shared voxel to the smaller segment, as the panel merges a scene's segments."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import slicer

from test_module_scene import make_image, new_scene, oblique_direction
from test_module_segment_overlap import GTV, OAR, PTV
from worker_cli import stnerp

from STNeRPLib.dicom_in import structure_looks
from STNeRPLib.geometry import Grid
from STNeRPLib.io import read_labelmap
from STNeRPLib.phantom import breathing_series, write_series
from STNeRPLib.report import structure_names
from STNeRPLib.slicer_segmentation import segment_names
from STNeRPModuleLib import scene_files


def saved_by_slicer(folder: Path, reference: Path, masks: dict[str, np.ndarray], crop: bool = False,
                    colours: dict[str, tuple[float, float, float]] | None = None) -> Path:
    """A .seg.nrrd that Slicer's segmentation storage node writes for one segment per mask ([z, y, x] on the
    reference's grid, in the dict's order), cropped to the segments' extent when `crop`, coloured by `colours`
    (RGB 0-1) where it names the segment."""
    scene, seg_logic = new_scene()
    volume = scene_files.read_volume(scene, str(reference), "reference")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    grid = sitk.ReadImage(str(reference))
    for name, mask in masks.items():
        path = folder / f"{name}.nrrd"
        image = sitk.GetImageFromArray(mask.astype(np.uint8))
        image.CopyInformation(grid)
        sitk.WriteImage(image, str(path))
        assert seg_logic.ImportLabelmapToSegmentationNode(scene_files.read_volume_detached(str(path), True), node)
        segmentation = node.GetSegmentation()
        segment = segmentation.GetNthSegment(segmentation.GetNumberOfSegments() - 1)
        segment.SetName(name)
        if colours and name in colours:
            segment.SetColor(*colours[name])
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetCropToMinimumExtent(crop)
    scene.AddNode(storage)
    storage.SetFileName(str(folder / "segmentation.seg.nrrd"))
    assert storage.WriteData(node)
    return folder / "segmentation.seg.nrrd"


def components(path: Path) -> int:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetNumberOfComponents()


def oblique_reference(folder: Path) -> tuple[Path, Grid]:
    path = folder / "reference.nrrd"
    sitk.WriteImage(make_image(np.zeros(PTV.shape, np.int16), oblique_direction()), str(path))
    return path, Grid.of(sitk.ReadImage(str(path)))


def test_overlapping_segments_saved_in_layers_are_merged_with_shared_voxels_to_the_smaller(tmp_path):
    """Slicer saves the GTV inside the PTV in a second layer, with label value 1 in each layer, so the segments
    are numbered in the file's order; the GTV keeps its whole extent and the organ at risk the PTV's corner it
    cuts into. Before: refused as 'holds several layers'."""
    reference, grid = oblique_reference(tmp_path)
    path = saved_by_slicer(tmp_path, reference, {"PTV": PTV, "GTV": GTV, "OAR": OAR},
                           colours={"PTV": (0.0, 0.5, 1.0), "GTV": (1.0, 0.0, 0.0), "OAR": (0.2, 0.8, 0.2)})
    assert components(path) == 2
    expected = np.zeros(PTV.shape, np.uint16)
    expected[PTV], expected[OAR], expected[GTV] = 1, 3, 2
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_labelmap(path, grid, "segmentation")), expected)
    assert segment_names(path) == {1: "PTV", 2: "GTV", 3: "OAR"}
    # the colours the follow-ups' exported RTSTRUCTs give them (tab10's were used instead)
    assert structure_looks(path) == {1: ([0, 128, 255], None), 2: ([255, 0, 0], None), 3: ([51, 204, 51], None)}


def test_a_layered_segmentation_cropped_to_its_segments_is_placed_on_the_image_grid(tmp_path):
    reference, grid = oblique_reference(tmp_path)
    path = saved_by_slicer(tmp_path, reference, {"PTV": PTV, "GTV": GTV}, crop=True)
    assert components(path) == 2 and sitk.ReadImage(str(path)).GetSize() == (16, 16, 10)
    expected = np.zeros(PTV.shape, np.uint16)
    expected[PTV], expected[GTV] = 1, 2
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_labelmap(path, grid, "segmentation")), expected)


def test_a_segmentation_of_one_layer_keeps_its_label_values(tmp_path):
    """Segments that do not overlap share one layer, each under its own label value, as read before."""
    reference, grid = oblique_reference(tmp_path)
    path = saved_by_slicer(tmp_path, reference, {"GTV": GTV, "OAR": OAR})
    assert components(path) == 1
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    values = {name: int(np.unique(stored[mask])[0]) for name, mask in (("GTV", GTV), ("OAR", OAR))}
    assert sorted(values.values()) == [1, 2]
    read = sitk.GetArrayFromImage(read_labelmap(path, grid, "segmentation"))
    np.testing.assert_array_equal(read[GTV | OAR], stored[GTV | OAR])
    assert np.count_nonzero(read) == np.count_nonzero(GTV) + np.count_nonzero(OAR)
    assert segment_names(path) == {values["GTV"]: "GTV", values["OAR"]: "OAR"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_train_propagates_a_layered_segmentation_and_scores_a_slicer_ground_truth_by_name(tmp_path):
    """A tumour drawn inside its lung in Slicer and saved: `stnerp train --segmentation` trains and writes the
    merged labelmap at the reference time (the identity there), the tumour whole, and names the structures as the
    segments; a ground truth saved by Slicer with its segments in another order is scored by name (by its file's
    order, the tumour would be scored against the right lung)."""
    series = breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 15.0), n_phases=3, noise_hu=0)
    files = write_series(series, tmp_path / "data")
    labels = sitk.GetArrayFromImage(series.labelmaps[0])
    tumour, lung_left = labels == 1, labels == 3
    lung_right = (labels == 2) | tumour
    assert np.any(tumour) and np.any(labels == 2)
    (tmp_path / "plan").mkdir()
    path = saved_by_slicer(tmp_path / "plan", Path(files["images"][0]),
                           {"Lung_R": lung_right, "Lung_L": lung_left, "Tumour": tumour})
    truth = sitk.GetArrayFromImage(series.labelmaps[2])
    truth_masks = {"tumour ": truth == 1, "LUNG_L": truth == 3, "Lung_R": (truth == 2) | (truth == 1)}
    (tmp_path / "truth").mkdir()
    truth_path = saved_by_slicer(tmp_path / "truth", Path(files["images"][2]), truth_masks)
    assert components(path) == 2 and components(truth_path) == 2
    output = tmp_path / "run"
    result = stnerp("train", "--reference", files["images"][0], "--reference-time", series.times[0],
                    "--follow-up", files["images"][1], series.times[1], "--follow-up", files["images"][2],
                    series.times[2], "--segmentation", path, "--ground-truth", truth_path, series.times[2],
                    "--output", output, "--iterations", 10, "--no-report")
    assert result.returncode == 0, result.stderr
    record = json.loads((output / "run.json").read_text())
    points = {p["time"]: p for p in record["time_points"]}
    at_reference = sitk.GetArrayFromImage(sitk.ReadImage(str(output / points[series.times[0]]["labelmap"])))
    expected = np.zeros(labels.shape, np.uint16)
    expected[lung_right], expected[lung_left], expected[tumour] = 1, 2, 3
    np.testing.assert_array_equal(at_reference, expected)
    assert dict(structure_names(record, output, None)) == {1: "Lung_R", 2: "Lung_L", 3: "Tumour"}
    propagated = sitk.GetArrayFromImage(sitk.ReadImage(str(output / points[series.times[2]]["labelmap"])))
    scored = points[series.times[2]]["metrics"]["dice"]
    truth_labels = {1: truth_masks["Lung_R"] & ~truth_masks["tumour "], 2: truth_masks["LUNG_L"],
                    3: truth_masks["tumour "]}
    for label, mask in truth_labels.items():
        assert abs(scored[str(label)] - dice(propagated == label, mask)) < 1e-6, (label, scored)
    assert scored["1"] > 0.8 and scored["3"] > 0.5
