"""DICOM in: an RT Structure Set read as the labelmap the worker propagates. Contours are filled on the
slices of the image they lie on, in LPS mm; the voxels are checked against the contours' own geometry
(rectangles, a ring with an island) and against the labelmap a structure set was written from."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pydicomrt")
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402


from STNeRPLib.dicom_in import (LABEL_MAP_SEGMENTATION_STORAGE, SEGMENTATION_STORAGE, cielab_to_rgb,  # noqa: E402
                               structure_looks)
from STNeRPLib.dicom_out import read_series, structure_set  # noqa: E402
from STNeRPLib.errors import InputError  # noqa: E402
from STNeRPLib.geometry import Grid  # noqa: E402
from STNeRPLib.io import read_image, read_labelmap  # noqa: E402
from STNeRPLib.phantom import breathing_series  # noqa: E402
from STNeRPLib.report import Names, structure_names  # noqa: E402
from test_cohort import batch_command, summary  # noqa: E402
from test_dicom_out import write_ct_series  # noqa: E402
from test_worker import assert_rejected  # noqa: E402
from worker_cli import stnerp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import data  # noqa: E402
from benchmarks.data import write_rtstruct  # noqa: E402

# A grid stored with x and y reversed (direction diag(-1, -1, 1), as a volume saved in RAS order): the contours,
# in LPS mm, must land on the voxels by their physical position, not their index.
GRID = Grid((40, 30, 6), (2.0, 2.5, 3.0), (30.0, 20.0, -7.5), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))


def rectangle(x: tuple[float, float], y: tuple[float, float], z: float) -> list[float]:
    """A closed planar contour (DICOM ContourData: x, y, z, ... in LPS mm)."""
    (x0, x1), (y0, y1) = x, y
    return [v for point in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)) for v in (*point, z)]


def centres(grid: Grid) -> np.ndarray:
    """LPS mm of every voxel centre, (z, y, x, 3)."""
    return grid.points().reshape(*grid.shape, 3)


def test_rectangles_fill_the_voxels_whose_centres_lie_in_them_by_their_lps_position(tmp_path):
    z = GRID.to_physical(np.array([[0.0, 0.0, 2.0]]))[0, 2]                 # slice 2's plane
    path = tmp_path / "RS.dcm"
    write_rtstruct(path, {7: ("GTV", [rectangle((-13.3, 7.9), (-4.2, 11.0), z)])})
    labels = sitk.GetArrayFromImage(read_labelmap(path, GRID, "segmentation"))
    p = centres(GRID)
    expected = ((p[..., 0] >= -13.3) & (p[..., 0] <= 7.9) & (p[..., 1] >= -4.2) & (p[..., 1] <= 11.0)
                & (np.abs(p[..., 2] - z) < 1e-6))
    assert expected.sum() == 10 * 6                 # x -12, -10, ..., 6 mm; y 10, 7.5, ..., -2.5 mm
    assert np.array_equal(labels, np.where(expected, 7, 0))


def test_a_ring_with_an_island_keeps_its_boundary_voxels_and_loses_its_hole(tmp_path):
    """Contours through voxel centres (as `stnerp dicom` writes them): the outer one's centres are the
    structure's, the hole's boundary centres too (they trace the structure's voxels about the hole), the
    hole's interior is not, and an island inside the hole is the structure's again."""
    z = GRID.to_physical(np.array([[0.0, 0.0, 3.0]]))[0, 2]
    outer, hole, island = ((-20.0, 20.0), (-15.0, 15.0)), ((-12.0, 12.0), (-10.0, 10.0)), ((-4.0, 4.0), (-5.0, 5.0))
    path = tmp_path / "RS.dcm"
    write_rtstruct(path, {1: ("ring", [rectangle(*outer, z), rectangle(*hole, z), rectangle(*island, z)])})
    labels = sitk.GetArrayFromImage(read_labelmap(path, GRID, "segmentation"))
    p = centres(GRID)

    def within(box, strict=False):
        (x0, x1), (y0, y1) = box
        if strict:
            return (p[..., 0] > x0) & (p[..., 0] < x1) & (p[..., 1] > y0) & (p[..., 1] < y1)
        return (p[..., 0] >= x0) & (p[..., 0] <= x1) & (p[..., 1] >= y0) & (p[..., 1] <= y1)

    expected = (within(outer) & ~within(hole, strict=True) | within(island)) & (np.abs(p[..., 2] - z) < 1e-6)
    assert within(hole).sum() > within(hole, strict=True).sum() > within(island).sum() > 0
    assert np.array_equal(labels, np.where(expected, 1, 0))


def test_a_hole_that_touches_its_outer_contour_is_still_a_hole(tmp_path):
    """A hole whose boundary voxels reach the structure's outside at a corner (on the abdomen CT's organs, 32 of
    110 225 voxels) shares a vertex with the outer contour: its voxels strictly inside are not the structure's."""
    outer = np.array([[5, 3], [25, 3], [25, 20], [5, 20]], float)                  # (x, y) indices, slice 2
    hole = np.array([[15, 20], [9, 11], [21, 11]], float)                           # its first vertex on the outer
    path = tmp_path / "RS.dcm"
    write_rtstruct(path, {1: ("notched", [GRID.to_physical(np.c_[polygon, np.full(len(polygon), 2.0)]).ravel().tolist()
                                          for polygon in (outer, hole)])})
    labels = sitk.GetArrayFromImage(read_labelmap(path, GRID, "segmentation"))[2]
    y, x = np.mgrid[0:GRID.size[1], 0:GRID.size[0]]
    sides = [(b[0] - a[0]) * (y - a[1]) - (b[1] - a[1]) * (x - a[0]) for a, b in zip(hole, np.roll(hole, -1, axis=0))]
    strictly_in_hole = np.all(np.array(sides) > 0, axis=0) | np.all(np.array(sides) < 0, axis=0)
    expected = (x >= 5) & (x <= 25) & (y >= 3) & (y <= 20) & ~strictly_in_hole
    assert strictly_in_hole.sum() > 30
    assert np.array_equal(labels, np.where(expected, 1, 0))


def test_a_voxel_in_two_rois_goes_to_the_smaller_and_an_empty_roi_to_none(tmp_path):
    z = GRID.to_physical(np.array([[0.0, 0.0, 1.0]]))[0, 2]
    path = tmp_path / "RS.dcm"
    write_rtstruct(path, {1: ("BODY", [rectangle((-30.0, 30.0), (-25.0, 15.0), z)]),
                          2: ("GTV", [rectangle((-5.0, 5.0), (-5.0, 5.0), z)]), 3: ("empty", [])})
    labels = sitk.GetArrayFromImage(read_labelmap(path, GRID, "segmentation"))
    assert np.count_nonzero(labels == 2) == 5 * 5                 # x -4, ..., 4 mm; y 5, 2.5, ..., -5 mm
    assert np.count_nonzero(labels == 1) == 31 * 17 - 5 * 5
    assert set(np.unique(labels)) == {0, 1, 2}


def write_seg(path: Path, segments: dict[int, tuple[str, np.ndarray]], grid: Grid, series: str | None = None,
              kind: str = "BINARY", offset: tuple[int, int] = (0, 0)) -> None:
    """A DICOM Segmentation (SEG) as AI contouring tools write one: per segment (Segment Number -> (Segment Label,
    bool [z, y, x] on `grid`)), one frame per slice it has voxels on, its first pixel at (row, column) `offset` of
    the grid's slice, rows and columns to the grid's end; 1-bit packed (BINARY), 8-bit with 255 inside
    (FRACTIONAL), or (LABELMAP, the segments not overlapping) one 8-bit frame of Segment Numbers per slice."""
    from pydicom.pixels import pack_bits
    fractional, labelmap = kind == "FRACTIONAL", kind == "LABELMAP"
    storage = LABEL_MAP_SEGMENTATION_STORAGE if labelmap else SEGMENTATION_STORAGE
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = storage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = storage, meta.MediaStorageSOPInstanceUID, "SEG"
    ds.SegmentationType = kind
    (row, column), (depth, height, width) = offset, grid.shape
    ds.Rows, ds.Columns = height - row, width - column
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated = ds.BitsStored = 1 if kind == "BINARY" else 8
    ds.HighBit = ds.BitsStored - 1
    if fractional:
        ds.MaximumFractionalValue, ds.SegmentationFractionalType = 255, "PROBABILITY"
    if series:
        ds.ReferencedSeriesSequence = [Dataset()]
        ds.ReferencedSeriesSequence[0].SeriesInstanceUID = series
    axes = np.reshape(grid.direction, (3, 3))
    shared = Dataset()
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [Dataset()], [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [*axes[:, 0], *axes[:, 1]]
    shared.PixelMeasuresSequence[0].PixelSpacing = [grid.spacing[1], grid.spacing[0]]
    shared.PixelMeasuresSequence[0].SliceThickness = grid.spacing[2]
    ds.SharedFunctionalGroupsSequence, ds.SegmentSequence, ds.PerFrameFunctionalGroupsSequence = [shared], [], []
    frames = []

    def add_frame(z: int, pixels: np.ndarray, number: int | None) -> None:
        groups = Dataset()
        groups.PlanePositionSequence = [Dataset()]
        groups.PlanePositionSequence[0].ImagePositionPatient = list(grid.to_physical(np.array([[column, row, z]],
                                                                                              float))[0])
        if number is not None:
            groups.SegmentIdentificationSequence = [Dataset()]
            groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber = number
        ds.PerFrameFunctionalGroupsSequence.append(groups)
        frames.append(pixels[row:, column:])
    for number, (label, mask) in segments.items():
        item = Dataset()
        item.SegmentNumber, item.SegmentLabel, item.SegmentAlgorithmType = number, label, "MANUAL"
        ds.SegmentSequence.append(item)
        for z in np.flatnonzero(mask.any(axis=(1, 2))) if not labelmap else ():
            add_frame(z, mask[z], number)
    for z in range(depth) if labelmap else ():
        add_frame(z, sum(number * mask[z].astype(np.uint8) for number, (_, mask) in segments.items()), None)
    ds.NumberOfFrames = len(frames)
    stack = np.array(frames, np.uint8)
    ds.PixelData = (stack * 255).tobytes() if fractional else stack.tobytes() if labelmap else pack_bits(stack)
    ds.save_as(str(path), enforce_file_format=True)


LABELS = breathing_series(size=(24, 20, 12), spacing=(12.0, 12.0, 15.0), n_phases=1, noise_hu=0).labelmaps[0]
"""A phantom's GTV (1) and lungs (2, 3) on a 24 x 20 x 12 grid, for the SEG tests."""


@pytest.mark.parametrize("kind", ["BINARY", "FRACTIONAL", "LABELMAP"])
def test_a_dicom_seg_reads_back_as_the_labelmap_it_was_written_from(tmp_path, kind):
    """An AI tool's segments (a SEG, cropped to rows 3- and columns 2-; binary and fractional ones here with a "Lungs"
    segment overlapping both lungs, the GTV inside one, and only the frames that hold a segment; a label map SEG
    a frame of Segment Numbers per slice) are placed voxel for voxel on the image's grid, a shared voxel going to
    the smaller segment; the report names them by their Segment Labels."""
    labels, grid = sitk.GetArrayFromImage(LABELS), Grid.of(LABELS)
    assert np.all(labels[:, :3] == 0) and np.all(labels[:, :, :2] == 0)
    segments = {1: ("GTV", labels == 1), 2: ("Lung_R", labels == 2), 3: ("Lung_L", labels == 3)}
    if kind != "LABELMAP":
        segments[4] = ("Lungs", labels > 0)
    write_seg(tmp_path / "SEG.dcm", segments, grid, kind=kind, offset=(3, 2))
    read = sitk.GetArrayFromImage(read_labelmap(tmp_path / "SEG.dcm", grid, "segmentation"))
    assert np.array_equal(read, labels)
    record = {"inputs": {"segmentation": str(tmp_path / "SEG.dcm")}}
    assert dict(structure_names(record, tmp_path, None)) == {number: name for number, (name, _) in segments.items()}


def dicom_lab(lightness: float, a: float, b: float) -> list[int]:
    """CIE L*a*b* as DICOM encodes it (PS3.3 C.10.7.1.1): L* 0-100 and a*, b* -128-127 each scaled to 0-65535."""
    return [round(lightness * 65535 / 100), round((a + 128) * 65535 / 255), round((b + 128) * 65535 / 255)]


@pytest.mark.parametrize("lab, rgb", [((53.24, 80.09, 67.20), (255, 0, 0)), ((87.73, -86.18, 83.18), (0, 255, 0)),
                                      ((32.30, 79.19, -107.86), (0, 0, 255)), ((100.0, 0.0, 0.0), (255, 255, 255)),
                                      ((53.59, 0.0, 0.0), (128, 128, 128))])
def test_a_dicom_cielab_colour_is_the_srgb_colour_it_names(lab, rgb):
    """The sRGB primaries, white and mid grey at their published CIE L*a*b* (D65)."""
    assert all(abs(got - want) <= 1 for got, want in zip(cielab_to_rgb(dicom_lab(*lab)), rgb)), cielab_to_rgb(
        dicom_lab(*lab))


def test_a_dicom_segs_display_colours_are_its_structures_looks(tmp_path):
    """A SEG's Recommended Display CIELab Values colour the structures the follow-ups' RTSTRUCTs export (tab10's
    colours were used instead); a segment without one has none."""
    labels, grid = sitk.GetArrayFromImage(LABELS), Grid.of(LABELS)
    write_seg(tmp_path / "SEG.dcm", {1: ("GTV", labels == 1), 2: ("Lung_R", labels == 2), 3: ("Lung_L", labels == 3)},
              grid)
    dataset = pydicom.dcmread(tmp_path / "SEG.dcm")
    dataset.SegmentSequence[0].RecommendedDisplayCIELabValue = dicom_lab(53.24, 80.09, 67.20)
    dataset.SegmentSequence[1].RecommendedDisplayCIELabValue = dicom_lab(32.30, 79.19, -107.86)
    dataset.save_as(tmp_path / "SEG.dcm", enforce_file_format=True)
    looks = structure_looks(tmp_path / "SEG.dcm")
    assert sorted(looks) == [1, 2] and [kind for _, kind in looks.values()] == [None, None]
    assert all(abs(got - want) <= 1 for got, want in zip(looks[1][0], (255, 0, 0)))
    assert all(abs(got - want) <= 1 for got, want in zip(looks[2][0], (0, 0, 255)))


def test_a_dicom_seg_whose_pixel_data_cannot_be_decoded_is_refused_in_one_line(tmp_path):
    grid = Grid.of(LABELS)
    write_seg(tmp_path / "SEG.dcm", {1: ("GTV", sitk.GetArrayFromImage(LABELS) == 1)}, grid)
    damaged = pydicom.dcmread(tmp_path / "SEG.dcm")
    damaged.PixelData = damaged.PixelData[:4]
    damaged.save_as(tmp_path / "SEG.dcm", enforce_file_format=True)
    with pytest.raises(InputError) as error:
        read_labelmap(tmp_path / "SEG.dcm", grid, "segmentation")
    assert "\n" not in str(error.value) and "its pixel data (Explicit VR Little Endian) cannot be decoded" in \
        str(error.value)


def test_a_dicom_seg_off_its_images_lattice_or_without_its_planes_is_refused_in_one_line(tmp_path):
    grid = Grid.of(LABELS)
    shifted = Grid(grid.size, grid.spacing, (grid.origin[0] + 5.0, *grid.origin[1:]), grid.direction)  # 5 of 12 mm
    write_seg(tmp_path / "SEG.dcm", {1: ("GTV", sitk.GetArrayFromImage(LABELS) == 1)}, shifted)
    with pytest.raises(InputError) as error:
        read_labelmap(tmp_path / "SEG.dcm", grid, "segmentation")
    assert "\n" not in str(error.value) and "segment 'GTV' has a frame between the image's voxels" in str(error.value)
    unplaced = pydicom.dcmread(tmp_path / "SEG.dcm")
    del unplaced.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
    unplaced.save_as(tmp_path / "SEG.dcm", enforce_file_format=True)
    with pytest.raises(InputError) as error:
        read_labelmap(tmp_path / "SEG.dcm", grid, "segmentation")
    assert "\n" not in str(error.value) and "has a frame without its plane's orientation" in str(error.value)


@pytest.mark.parametrize("case, words", [("between slices", ("1.50 mm off the image's slices", "'GTV'")),
                                         ("outside", ("outside the image", "'GTV'"))])
def test_a_structure_set_not_drawn_on_the_image_is_refused_in_one_line(tmp_path, case, words):
    z = GRID.to_physical(np.array([[0.0, 0.0, 2.0]]))[0, 2] + (1.5 if case == "between slices" else 0.0)
    x = (-5.0, 5.0) if case == "between slices" else (-5.0, 60.0)
    path = tmp_path / "RS.dcm"
    write_rtstruct(path, {4: ("GTV", [rectangle(x, (-5.0, 5.0), z)])})
    with pytest.raises(InputError) as error:
        read_labelmap(path, GRID, "segmentation")
    assert "\n" not in str(error.value)
    for word in words:
        assert word in str(error.value)


PLANNED = ((1, "GTV", [255, 0, 0], "GTV"), (2, "Lung_R", [0, 128, 255], "ORGAN"),
           (3, "Lung_L", [0, 200, 0], "AVOIDANCE"))
"""The plan's ROIs: label (ROI Number 10 + label), ROI Name, ROI Display Color, RT ROI Interpreted Type."""


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A phantom's reference and follow-up as DICOM CT series, the reference's structures as the RT Structure Set
    a planning system would export with it (ROI numbers 11-13, named, coloured and typed), and the follow-up's
    true structures as one a physician would draw there (numbered in another order, with a spinal cord)."""
    root = tmp_path_factory.mktemp("planned")
    series = breathing_series(size=(48, 48, 32), spacing=(6.0, 6.0, 7.5), n_phases=2, noise_hu=0)
    frame = generate_uid()
    folders = [root / f"phase_{k}" for k in range(2)]
    for folder, image in zip(folders, series.images):
        write_ct_series(image, folder, generate_uid(), frame, folder.name)
    plan = sitk.Cast(series.labelmaps[0], sitk.sitkUInt16) + sitk.Cast(series.labelmaps[0] > 0, sitk.sitkUInt16) * 10
    names = Names({10 + label: name for label, name, *_ in PLANNED})
    looks = {10 + label: (colour, kind) for label, _, colour, kind in PLANNED}
    structure_set(plan, read_series(folders[0]), "plan", names, looks).save_as(str(root / "RS.dcm"),
                                                                                enforce_file_format=True)
    truth = sitk.GetArrayFromImage(series.labelmaps[1])
    redrawn = np.choose(truth, np.array([0, 3, 1, 2], np.uint16))              # GTV 3, Lung_R 1, Lung_L 2
    redrawn[10:20, 36:40, 22:26] = 4                                            # in the spine, outside the lungs
    image = sitk.GetImageFromArray(redrawn)
    image.CopyInformation(series.labelmaps[1])
    structure_set(image, read_series(folders[1]), "follow-up", Names({1: "LUNG_R", 2: "Lung_L ", 3: "gtv",
                                                                      4: "SpinalCord"}), {}).save_as(
        str(root / "RS_1.dcm"), enforce_file_format=True)
    truth = np.where(truth > 0, truth + 10, 0).astype(np.uint16)                 # numbered as the planning ROIs
    return root, folders, sitk.GetArrayFromImage(plan), series.times, truth


def test_a_structure_set_written_from_a_labelmap_reads_back_as_that_labelmap(planned):
    root, folders, labelmap, *_ = planned
    grid = Grid.of(read_image(folders[0], "reference image"))
    read = sitk.GetArrayFromImage(read_labelmap(root / "RS.dcm", grid, "segmentation"))
    assert set(np.unique(read)) == {0, 11, 12, 13}
    assert np.array_equal(read, labelmap)


def test_the_abdomen_cts_41_organs_read_back_from_the_structure_set_written_from_them(tmp_path):
    """Real anatomy (../shared/data; skipped without it): organs that touch, wrap about each other, have holes
    opening onto their outside and pieces of a voxel or two. Written as `stnerp dicom` writes, read back voxel for
    voxel."""
    if not data.abdomen_available():
        pytest.skip(f"no abdomen CT in {data.ABDOMEN_CT}")
    ct = sitk.DICOMOrient(sitk.ReadImage(str(data.ABDOMEN_CT / "example_ct_sm.nii.gz")), "LPS")
    organs = sitk.DICOMOrient(sitk.ReadImage(str(data.ABDOMEN_CT / "example_seg.nii.gz")), "LPS")
    write_ct_series(ct, tmp_path / "ct", generate_uid(), generate_uid(), "abdomen")
    series = read_series(tmp_path / "ct")
    names = Names({int(label): f"organ {label}" for label in np.unique(sitk.GetArrayViewFromImage(organs))})
    structure_set(sitk.Cast(organs, sitk.sitkUInt16), series, "abdomen", names, {}).save_as(
        str(tmp_path / "RS.dcm"), enforce_file_format=True)
    read = read_labelmap(tmp_path / "RS.dcm", Grid.of(read_image(tmp_path / "ct", "reference image")), "segmentation")
    assert len(names) == 42
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(organs))


def test_a_planning_structure_set_is_propagated_and_exported_under_its_roi_names(planned):
    """The adaptive loop without 3D Slicer: the planning CT's RTSTRUCT in, the follow-up's RTSTRUCT out, its ROIs
    numbered, named, coloured and typed as in the plan."""
    root, folders, labelmap, times, _ = planned
    run = root / "run"
    result = stnerp("train", "--reference", folders[0], "--follow-up", folders[1], times[1], "--segmentation",
                    root / "RS.dcm", "--output", run, "--iterations", "20", "--prior", "image", "--no-report",
                    "--dicom-out", root / "out")
    assert result.returncode == 0, result.stderr
    record = json.loads((run / "run.json").read_text())
    entry = next(e for e in record["time_points"] if e["time"] == times[1])
    carried = sitk.GetArrayFromImage(sitk.ReadImage(str(run / entry["labelmap"])))
    assert set(np.unique(carried)) == {0, 11, 12, 13}
    names = structure_names(record, run, None)
    assert [names[label] for label in (11, 12, 13)] == ["GTV", "Lung_R", "Lung_L"]
    exported = pydicom.dcmread(next((root / "out").glob("t_*/RTSTRUCT.dcm")))
    assert {(int(roi.ROINumber), roi.ROIName) for roi in exported.StructureSetROISequence} == {
        (11, "GTV"), (12, "Lung_R"), (13, "Lung_L")}
    colours = {int(roi.ReferencedROINumber): [int(v) for v in roi.ROIDisplayColor]
               for roi in exported.ROIContourSequence}
    kinds = {int(o.ReferencedROINumber): o.RTROIInterpretedType for o in exported.RTROIObservationsSequence}
    assert colours == {10 + label: colour for label, _, colour, _ in PLANNED}        # as the planning system shows them
    assert kinds == {10 + label: kind for label, *_, kind in PLANNED}


def trained_with_truth(planned, segmentation: Path, run: Path):
    """`stnerp train` of the plan's two phases with `segmentation` and the physician's RTSTRUCT at the follow-up:
    (its result, its follow-up's time point entry, its propagated labelmap there)."""
    root, folders, _, times, _ = planned
    result = stnerp("train", "--reference", folders[0], "--follow-up", folders[1], times[1], "--segmentation",
                    segmentation, "--ground-truth", root / "RS_1.dcm", times[1], "--output", run,
                    "--iterations", "20", "--prior", "image", "--no-report")
    assert result.returncode == 0, result.stderr
    entry = next(e for e in json.loads((run / "run.json").read_text())["time_points"] if e["time"] == times[1])
    return result, entry, sitk.GetArrayFromImage(sitk.ReadImage(str(run / entry["labelmap"])))


def dice_by_label(carried: np.ndarray, truth: np.ndarray, pairs: dict[int, int]) -> dict[str, float]:
    """Dice of each label of `carried` against its pair's voxels in `truth`, keyed as run.json keys them."""
    return {str(a): 2 * np.count_nonzero((carried == a) & (truth == b))
            / (np.count_nonzero(carried == a) + np.count_nonzero(truth == b)) for a, b in pairs.items()}


def test_a_ground_truth_structure_set_is_scored_against_the_planning_rois_of_the_same_name(planned):
    """Two structure sets number their ROIs each their own way (here Lung_R is 12 in the plan, 1 at the
    follow-up): Dice pairs them by ROI Name, case and spaces aside, in train and in evaluate; an ROI the plan
    lacks is not scored, and the log says so."""
    root, folders, _, times, truth = planned
    run = root / "scored"
    result, entry, carried = trained_with_truth(planned, root / "RS.dcm", run)
    expected = dice_by_label(carried, truth, {11: 11, 12: 12, 13: 13})
    assert entry["metrics"]["dice"] == pytest.approx(expected)
    assert min(expected.values()) > 0.5
    assert f"ground truth at time {times[1]:g}: SpinalCord not scored" in result.stderr
    evaluated = stnerp("evaluate", "--run", run, "--ground-truth", root / "RS_1.dcm", times[1])
    assert evaluated.returncode == 0 and "SpinalCord not scored" in evaluated.stderr
    rows = json.loads((run / "evaluation.json").read_text())["rows"]
    assert rows[0]["dice"] == pytest.approx(expected)
    drawn_on_the_plan = stnerp("evaluate", "--run", run, "--ground-truth", root / "RS.dcm", times[1])
    assert drawn_on_the_plan.returncode == 2 and "was drawn on DICOM series" in drawn_on_the_plan.stderr
    predicted = root / "predicted"                         # a prediction's record names its run, not the inputs
    assert stnerp("predict", "--run", run, "--times", times[1], "--output", predicted).returncode == 0
    scored = stnerp("evaluate", "--run", predicted, "--ground-truth", root / "RS_1.dcm", times[1])
    assert scored.returncode == 0, scored.stderr
    assert json.loads((predicted / "evaluation.json").read_text())["rows"][0]["dice"] == pytest.approx(expected)


def test_a_ground_truth_structure_set_beside_a_labelmap_segmentation_is_refused(planned, tmp_path):
    root, folders, labelmap, times, _ = planned
    segmentation = tmp_path / "labels.nrrd"
    image = sitk.GetImageFromArray(labelmap)
    image.CopyInformation(read_image(folders[0], "reference image"))
    sitk.WriteImage(image, str(segmentation))
    output = tmp_path / "run"
    result = stnerp("train", "--reference", folders[0], "--follow-up", folders[1], times[1], "--segmentation",
                    segmentation, "--ground-truth", root / "RS_1.dcm", times[1], "--output", output, "--json-events")
    assert_rejected(result, output, "is a DICOM RT Structure Set but the segmentation names no structures", "by name")


def test_a_structure_set_drawn_on_another_phase_is_refused_though_its_slices_match(planned, tmp_path):
    """The phases of a 4-D CT share their slices, so the contours of phase 0 fit phase 1's grid exactly; only
    the structure set's series reference tells which scan they outline."""
    root, folders, _, times, _ = planned
    cases = (["--reference", folders[1], "--reference-time", times[1], "--follow-up", folders[0], times[0],
              "--segmentation", root / "RS.dcm"],
             ["--reference", folders[0], "--follow-up", folders[1], times[1], "--segmentation", root / "RS.dcm",
              "--ground-truth", root / "RS.dcm", times[1]])
    for k, inputs in enumerate(cases):
        output = tmp_path / f"run_{k}"
        result = stnerp("train", *inputs, "--output", output, "--json-events")
        assert_rejected(result, output, "was drawn on DICOM series", "give the structure set drawn on that image")


@pytest.mark.parametrize("renamed", ["RS.dcm", "RS_1.dcm"])
def test_two_rois_of_one_name_are_refused_when_a_ground_truth_is_matched_by_name(planned, tmp_path, renamed):
    """Names pair a ground truth's ROIs with the plan's: with two ROIs of one name in either structure set, Dice
    would score one of them, or their union, against the other without a word."""
    root, folders, _, times, _ = planned
    files = {name: root / name for name in ("RS.dcm", "RS_1.dcm")}
    dataset = pydicom.dcmread(files[renamed])
    first, second = [roi for roi in dataset.StructureSetROISequence if "lung" in roi.ROIName.lower()]
    second.ROIName = first.ROIName.lower() + " "
    files[renamed] = tmp_path / renamed
    dataset.save_as(str(files[renamed]))
    output = tmp_path / "run"
    result = stnerp("train", "--reference", folders[0], "--follow-up", folders[1], times[1], "--segmentation",
                    files["RS.dcm"], "--ground-truth", files["RS_1.dcm"], times[1], "--output", output, "--json-events")
    assert_rejected(result, output, f"2 ROIs named '{first.ROIName}'",
                    f"(ROI Numbers {first.ROINumber} and {second.ROINumber})", "rename one")


def test_a_cohort_of_plans_is_scored_by_roi_name_and_exported_per_patient(planned, tmp_path):
    """Each planning system numbers its ROIs its own way: the cohort summary's Dice of the GTV is each patient's
    GTV, not whichever ROI each plan numbered 11. With --dicom-out each patient's structure sets are written into
    a folder of its own, for complete runs too (exported without training again)."""
    root, folders, labelmap, times, _ = planned
    renumbered = np.array([0, *range(1, 11), 13, 11, 12], np.uint16)[labelmap]  # GTV 13, Lung_R 11, Lung_L 12
    image = sitk.GetImageFromArray(renumbered)
    image.CopyInformation(read_image(folders[0], "reference image"))
    structure_set(image, read_series(folders[0]), "plan", Names({13: "GTV", 11: "Lung_R", 12: "Lung_L"}), {}).save_as(
        str(tmp_path / "RS_renumbered.dcm"), enforce_file_format=True)
    rows = "".join(f"{patient},reference,{folders[0]},{times[0]}\n{patient},follow-up,{folders[1]},{times[1]}\n"
                   f"{patient},segmentation,{plan},\n{patient},ground-truth,{root / 'RS_1.dcm'},{times[1]}\n"
                   for patient, plan in (("p01", root / "RS.dcm"), ("p02", tmp_path / "RS_renumbered.dcm")))
    (tmp_path / "cohort.csv").write_text("patient,role,path,time\n" + rows)
    done = subprocess.run(batch_command(tmp_path / "cohort.csv", tmp_path / "runs", "--workers", 1,
                                        "--threads-per-worker", 1, "--iterations", 20, "--prior", "image",
                                        "--no-report"),
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr
    gtv = {patient: summary(tmp_path / "runs")[patient]["time_points"][1]["dice"][label]
           for patient, label in (("p01", "11"), ("p02", "13"))}
    with (tmp_path / "runs" / "summary.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [name for name in table[0] if name.startswith("dice_")] == ["dice_GTV", "dice_Lung_L", "dice_Lung_R"]
    assert {row["patient"]: float(row["dice_GTV"]) for row in table if row["time"] == str(times[1])} == \
        pytest.approx(gtv)
    # The team wants the follow-ups' structure sets, and a third patient: the complete runs are exported, not retrained
    (tmp_path / "cohort.csv").write_text((tmp_path / "cohort.csv").read_text() + "".join(
        line.replace("p01", "p03", 1) + "\n" for line in rows.splitlines() if line.startswith("p01,")))
    again = subprocess.run(batch_command(tmp_path / "cohort.csv", tmp_path / "runs", "--workers", 1,
                                         "--threads-per-worker", 1, "--iterations", 20, "--prior", "image",
                                         "--no-report", "--dicom-out", tmp_path / "dicom"),
                           capture_output=True, text=True, timeout=300, cwd="/")
    assert again.returncode == 0, again.stderr
    assert [summary(tmp_path / "runs")[p]["skipped"] for p in ("p01", "p02", "p03")] == [True, True, False]
    for patient, gtv_number in (("p01", 11), ("p02", 13), ("p03", 11)):
        exported = pydicom.dcmread(tmp_path / "dicom" / patient / f"t_{times[1]:g}" / "RTSTRUCT.dcm")
        assert {int(roi.ROINumber): roi.ROIName for roi in exported.StructureSetROISequence}[gtv_number] == "GTV"


def test_a_dicom_seg_is_propagated_and_scored_by_name_against_a_structure_set(planned, tmp_path):
    """The planning CT's segments from an AI tool (a SEG numbered 1-3) are propagated; the physician's RTSTRUCT at
    the follow-up (numbered otherwise) is scored against them by name. A SEG made on another series is refused."""
    _, folders, labelmap, times, truth = planned
    grid = Grid.of(read_image(folders[0], "reference image"))
    uids = [read_series(folder)[0].SeriesInstanceUID for folder in folders]
    segments = {label: (name, labelmap == 10 + label) for label, name, *_ in PLANNED}
    write_seg(tmp_path / "SEG.dcm", segments, grid, uids[0])
    _, entry, carried = trained_with_truth(planned, tmp_path / "SEG.dcm", tmp_path / "run")
    assert set(np.unique(carried)) == {0, 1, 2, 3}
    expected = dice_by_label(carried, truth, {1: 11, 2: 12, 3: 13})
    assert entry["metrics"]["dice"] == pytest.approx(expected) and min(expected.values()) > 0.5
    write_seg(tmp_path / "SEG_1.dcm", segments, grid, uids[1])
    output = tmp_path / "refused"
    refused = stnerp("train", "--reference", folders[0], "--follow-up", folders[1], times[1], "--segmentation",
                     tmp_path / "SEG_1.dcm", "--output", output, "--json-events")
    assert_rejected(refused, output, "was drawn on DICOM series")
