"""DICOM out: a phantom series written as DICOM CT series, trained with --dicom-out; the RT
Structure Sets and Deformable Spatial Registrations read back with pydicom reference the
follow-up's series and frames of reference, contours lie on the propagated labelmap's boundary,
and the registration grid is the run's displacement field."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pydicomrt")
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from STNeRPLib.geometry import Grid  # noqa: E402
from STNeRPLib.io import file_sha256, image_information, read_image  # noqa: E402
from STNeRPLib.phantom import breathing_series  # noqa: E402
from test_label_propagation import unread_lung_voxels  # noqa: E402
from test_worker import assert_rejected  # noqa: E402
from worker_cli import stnerp  # noqa: E402

REG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.3"
RTDOSE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.2"
ENHANCED_CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2.1"


def write_ct_series(image: sitk.Image, folder: Path, study: str, frame: str, description: str) -> list[str]:
    """One CT slice file per z (axial, identity direction), int16 HU; returns the SOP instance UIDs."""
    folder.mkdir(parents=True)
    array = np.rint(sitk.GetArrayFromImage(image)).astype(np.int16)
    series, uids = generate_uid(), []
    sx, sy, sz = image.GetSpacing()
    for k, plane in enumerate(array):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.Modality = "Phantom^STNeRP", "STNERP-1", "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = description, 1, k + 1
        ds.StudyDate = ds.SeriesDate = "20260101"
        ds.ImagePositionPatient = list(image.TransformIndexToPhysicalPoint((0, 0, k)))
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [sy, sx], sz
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = plane.tobytes()
        ds.save_as(ds.filename, enforce_file_format=True)
        uids.append(ds.SOPInstanceUID)
    return uids


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom")
    series = breathing_series(size=(32, 32, 24), spacing=(9.0, 9.0, 10.0), n_phases=3, noise_hu=0)
    frame = generate_uid()                  # one scanner frame, as in 4D CT
    folders, uids = [], []
    for k, image in enumerate(series.images):
        folders.append(root / f"phase_{k}")
        uids.append(write_ct_series(image, folders[-1], generate_uid(), frame, f"phase {k}"))
    labelmap = root / "labelmap_0.nrrd"
    sitk.WriteImage(series.labelmaps[0], str(labelmap))
    names = root / "labels.json"
    names.write_text(json.dumps({"1": "GTV", "2": "right lung", "3": "left lung"}))
    args = ["train", "--reference", folders[0], "--output", root / "run", "--iterations", "30", "--prior", "image",
            "--segmentation", labelmap, "--label-names", names, "--dicom-out", root / "out"]
    for folder, t in zip(folders[1:], series.times[1:]):
        args += ["--follow-up", folder, t]
    result = stnerp(*args)
    assert result.returncode == 0, result.stderr
    return root, folders, uids, json.loads((root / "run" / "run.json").read_text()), frame, result.stderr


def test_report_draws_contours_over_the_dicom_scans(exported):
    root, *_ = exported
    page = (root / "run" / "report" / "index.html").read_text()
    assert page.count("over the scan at time") == 3 and "over the predicted image" not in page


def test_rtstruct_references_the_follow_up_series(exported):
    root, folders, uids, _, frame, _ = exported
    for k in (1, 2):
        rs = pydicom.dcmread(root / "out" / f"t_{k}" / "RTSTRUCT.dcm")
        follow_up = pydicom.dcmread(folders[k] / "000.dcm", stop_before_pixels=True)
        assert rs.Modality == "RTSTRUCT" and rs.StudyInstanceUID == follow_up.StudyInstanceUID
        assert rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == frame
        referenced = {i.ReferencedSOPInstanceUID for c in rs.ROIContourSequence for s in c.ContourSequence
                      for i in s.ContourImageSequence}
        assert referenced and referenced <= set(uids[k])
        assert {r.ROIName for r in rs.StructureSetROISequence} == {"GTV", "right lung", "left lung"}


def boundary_faces(plane: np.ndarray) -> np.ndarray:
    """(i, j) midpoints of the faces between an inside pixel and an outside pixel (or the image
    edge) of a 2-D mask [j, i]."""
    padded = np.pad(plane, 1)
    faces = []
    for axis, half in ((0, (0.5, 0.0)), (1, (0.0, 0.5))):    # faces between rows, between columns
        j, i = np.nonzero(np.diff(padded.astype(np.int8), axis=axis))
        faces.append(np.stack([j, i], axis=1) - 1 + np.asarray(half))
    return np.concatenate(faces)[:, ::-1]


def test_contour_points_lie_within_half_a_voxel_of_the_labelmap_boundary(exported):
    root, _, _, record, _, _ = exported
    for entry in record["time_points"][1:]:
        labels = sitk.ReadImage(str(root / "run" / entry["labelmap"]))
        array = sitk.GetArrayFromImage(labels)
        rs = pydicom.dcmread(root / "out" / f"t_{entry['time']:g}" / "RTSTRUCT.dcm")
        numbers = {r.ROINumber: r.ROINumber for r in rs.StructureSetROISequence}
        checked = 0
        for roi in rs.ROIContourSequence:
            mask = array == numbers[roi.ReferencedROINumber]
            for contour in roi.ContourSequence:
                points = np.reshape(np.asarray(contour.ContourData, float), (-1, 3))
                index = np.array([labels.TransformPhysicalPointToContinuousIndex(p) for p in points])
                assert np.allclose(index[:, 2], np.rint(index[:, 2]), atol=1e-3)   # on a slice
                faces = boundary_faces(mask[int(round(index[0, 2]))])
                distance = np.linalg.norm(index[:, None, :2] - faces[None], axis=2).min(axis=1)
                assert distance.max() <= 0.5 + 1e-3, distance.max()
                checked += len(index)
        assert checked > 50


def test_registration_grid_is_the_displacement_field(exported):
    root, folders, uids, record, frame, _ = exported
    for entry in record["time_points"][1:]:
        t = entry["time"]
        reg = pydicom.dcmread(root / "out" / f"t_{t:g}" / "REG.dcm")
        assert reg.SOPClassUID == REG_SOP_CLASS and reg.FrameOfReferenceUID == frame
        item = reg.DeformableRegistrationSequence[0]
        assert item.SourceFrameOfReferenceUID == frame
        assert {i.ReferencedSOPInstanceUID for i in item.ReferencedImageSequence} == set(uids[0])
        follow_up = pydicom.dcmread(folders[int(t)] / "000.dcm", stop_before_pixels=True)
        assert reg.StudyInstanceUID == follow_up.StudyInstanceUID
        grid = item.DeformableRegistrationGridSequence[0]
        field = sitk.ReadImage(str(root / "run" / entry["displacement"]))
        assert [int(v) for v in grid.GridDimensions] == list(field.GetSize())
        assert np.allclose([float(v) for v in grid.GridResolution], field.GetSpacing())
        assert np.allclose([float(v) for v in grid.ImagePositionPatient], field.GetOrigin())
        direction = np.reshape(field.GetDirection(), (3, 3))
        assert np.allclose([float(v) for v in grid.ImageOrientationPatient], [*direction[:, 0], *direction[:, 1]])
        vectors = np.frombuffer(grid.VectorGridData, "<f4").reshape(*field.GetSize()[::-1], 3)
        expected = sitk.GetArrayFromImage(field)
        assert np.abs(expected).max() > 1.0
        assert np.allclose(vectors, expected, atol=1e-4)


def test_train_with_dicom_out_says_complete_only_after_the_dicom_files_are_written(exported):
    """The 'complete' line (the done event with --json-events) ends the command: it comes after
    the DICOM export, so whoever waits for it finds the files there."""
    log = exported[-1].splitlines()
    dicom = next(i for i, line in enumerate(log) if line.startswith("DICOM: "))
    complete = next(i for i, line in enumerate(log) if line.startswith("complete: "))
    assert dicom < complete


def test_dicom_out_refuses_a_folder_holding_files_before_training(exported, tmp_path):
    """--dicom-out into a folder with the user's files is refused before anything runs (exit 2);
    the files are untouched and no run folder is made."""
    root, folders, *_ = exported
    mine = tmp_path / "out" / "t_1" / "RTSTRUCT.dcm"
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    result = stnerp("train", "--reference", folders[0], "--follow-up", folders[1], 1, "--output", tmp_path / "run",
                    "--dicom-out", tmp_path / "out")
    assert result.returncode == 2 and "--dicom-out" in result.stderr and "not empty" in result.stderr
    assert mine.read_text() == "mine" and not (tmp_path / "run").exists()
    again = stnerp("dicom", "--run", root / "run", "--dicom-out", tmp_path / "out")
    assert again.returncode == 2 and mine.read_text() == "mine"


def test_dicom_out_refuses_inputs_that_are_not_dicom(tmp_path):
    series = breathing_series(size=(16, 16, 8), spacing=(18.0, 18.0, 30.0), n_phases=2, noise_hu=0)
    paths = []
    for k, image in enumerate(series.images):
        paths.append(tmp_path / f"image_{k}.nrrd")
        sitk.WriteImage(image, str(paths[-1]))
    result = stnerp("train", "--reference", paths[0], "--follow-up", paths[1], 1, "--output", tmp_path / "run",
                    "--dicom-out", tmp_path / "out")
    assert result.returncode == 2 and "DICOM series folders" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_dicom_series_with_a_missing_slice_is_refused_in_one_line(exported, tmp_path):
    """ITK reads a series as evenly spaced, its spacing the mean step: with slice 12 of 24 missing, it put the slices
    at 10.45 mm steps instead of 10, moving the anatomy up to 5 mm without a word. Refused, naming the slice."""
    root, folders, *_ = exported
    gap = tmp_path / "gap"
    shutil.copytree(folders[1], gap)
    (gap / "012.dcm").unlink()
    for inputs in (["--reference", folders[0], "--follow-up", gap, 1],
                   ["--reference", gap, "--follow-up", folders[1], 1]):
        output = tmp_path / f"run_{len(list(tmp_path.iterdir()))}"
        result = stnerp("train", *inputs, "--output", output, "--json-events")
        assert_rejected(result, output, "not evenly spaced", "011.dcm", "5.0 mm")
        assert "WARNING" not in result.stderr


def test_a_dicom_series_holding_two_phases_at_the_same_positions_is_refused_as_such(exported, tmp_path):
    """A 4-D CT exported as one series (every phase's slices under one Series Instance UID) was refused as unevenly
    spaced, with the advice to resample it: its slices repeat positions. Refused as several phases in one series."""
    root, folders, *_ = exported
    both = tmp_path / "both"
    shutil.copytree(folders[0], both)
    series = pydicom.dcmread(both / "000.dcm").SeriesInstanceUID
    for path in sorted(folders[1].iterdir()):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.InstanceNumber = series, ds.InstanceNumber + 100
        ds.save_as(both / f"phase_1_{path.name}", enforce_file_format=True)
    output = tmp_path / "run"
    result = stnerp("train", "--reference", both, "--follow-up", folders[1], 1, "--output", output, "--json-events")
    assert_rejected(result, output, "24 slice positions twice", "several phases or acquisitions in one series")
    assert "evenly spaced" not in result.stderr


def write_rtdose(folder: Path, ct_file: Path) -> None:
    """An RT Dose beside a CT series, as a planning system exports a plan: its own series, with pixel data."""
    ct = pydicom.dcmread(ct_file, stop_before_pixels=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = RTDOSE_SOP_CLASS, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(folder / "RD.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = RTDOSE_SOP_CLASS, meta.MediaStorageSOPInstanceUID, "RTDOSE"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (ct.StudyInstanceUID, generate_uid(),
                                                                         ct.FrameOfReferenceUID)
    ds.PatientName, ds.PatientID = ct.PatientName, ct.PatientID
    ds.ImagePositionPatient, ds.ImageOrientationPatient = ct.ImagePositionPatient, [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [12, 12]
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.GridFrameOffsetVector = 10, 10, 5, [0, 15, 30, 45, 60]
    ds.FrameIncrementPointer = 0x3004000C
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
    ds.DoseGridScaling, ds.DoseUnits, ds.DoseType, ds.DoseSummationType = 1e-4, "GY", "PHYSICAL", "PLAN"
    ds.PixelData = (np.arange(500, dtype=np.uint32) * 100).tobytes()
    ds.save_as(ds.filename, enforce_file_format=True)


def test_a_planning_systems_export_folder_is_read_as_its_one_image_series(exported, tmp_path):
    """A plan's export holds the CT series and, beside it, the RT Dose (a series of its own, with pixels), and a
    scanner's the topogram (one 2-D image): it was refused as several series. The volume is read; two volumes in one
    folder are still refused."""
    root, folders, *_ = exported
    export = tmp_path / "export"
    shutil.copytree(folders[0], export)
    write_rtdose(export, export / "000.dcm")
    scout = pydicom.dcmread(export / "000.dcm")                     # a topogram: one 2-D CT image, its own series
    scout.SeriesInstanceUID, scout.SOPInstanceUID, scout.SeriesDescription = generate_uid(), generate_uid(), "Topogram"
    scout.save_as(export / "scout.dcm", enforce_file_format=True)
    image, original = read_image(export, "reference image"), read_image(folders[0], "reference image")
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(original))
    assert image_information(export, "reference image")[0] == image_information(folders[0], "reference image")[0]
    for path in folders[1].iterdir():
        shutil.copy(path, export / f"phase_1_{path.name}")
    output = tmp_path / "run"
    result = stnerp("train", "--reference", export, "--follow-up", folders[1], 1, "--output", output, "--json-events")
    assert_rejected(result, output, "2 DICOM image series", "CT 'phase 0'", "CT 'phase 1'", "exactly one")


def write_enhanced_ct(image: sitk.Image, path: Path) -> None:
    """The image as one Enhanced CT file (multi-frame, as newer scanners export): the frames' geometry in the
    shared and per-frame functional groups, int16 HU."""
    array = np.rint(sitk.GetArrayFromImage(image)).astype(np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ENHANCED_CT_SOP_CLASS, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = ENHANCED_CT_SOP_CLASS, meta.MediaStorageSOPInstanceUID, "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.SeriesDescription = "Phantom^STNeRP", "STNERP-1", "enhanced"
    ds.NumberOfFrames, (ds.Rows, ds.Columns) = len(array), array.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    sx, sy, sz = image.GetSpacing()
    measures, orientation, rescale = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness, measures.SpacingBetweenSlices = [sy, sx], sz, sz
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    rescale.RescaleIntercept, rescale.RescaleSlope, rescale.RescaleType = 0, 1, "HU"
    shared = Dataset()
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([orientation])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence()
    for k in range(len(array)):
        position, frame = Dataset(), Dataset()
        position.ImagePositionPatient = list(image.TransformIndexToPhysicalPoint((0, 0, k)))
        frame.PlanePositionSequence = Sequence([position])
        ds.PerFrameFunctionalGroupsSequence.append(frame)
    ds.PixelData = array.tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_an_enhanced_ct_in_one_multi_frame_file_is_read_as_its_volume(exported, tmp_path):
    """A folder holding one Enhanced CT file was read as a 4-D image and refused with "split the 4-D series into
    one 3-D volume per time point"; its size was taken as one slice. It is the volume its frames place."""
    root, folders, *_ = exported
    original = read_image(folders[1], "follow-up image")
    folder = tmp_path / "enhanced"
    folder.mkdir()
    write_enhanced_ct(original, folder / "CT.dcm")
    for path in (folder, folder / "CT.dcm"):
        image = read_image(path, "follow-up image")
        assert Grid.of(image).matches(Grid.of(original))
        assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(original))
        assert image_information(path, "follow-up image")[0] == original.GetSize()
    output = tmp_path / "run"
    result = stnerp("train", "--reference", folders[0], "--follow-up", folder, 1, "--output", output,
                    "--dicom-out", tmp_path / "out", "--json-events")
    assert_rejected(result, output, "multi-frame", "--dicom-out")


def test_a_dicom_series_with_positions_rounded_to_a_hundredth_of_a_millimetre_is_read(exported, tmp_path):
    """Scanners round slice positions: a few thousandths of a millimetre off even steps is no reason to refuse."""
    root, folders, *_ = exported
    rounded = tmp_path / "rounded"
    shutil.copytree(folders[1], rounded)
    for k, path in enumerate(sorted(rounded.iterdir())):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 0.004 * (-1) ** k]
        ds.save_as(path, enforce_file_format=True)
    image, original = read_image(rounded, "follow-up"), read_image(folders[1], "follow-up")
    assert image.GetSize() == original.GetSize()
    assert np.allclose(image.GetSpacing(), original.GetSpacing(), atol=0.01)


def test_dicom_says_which_structures_a_follow_ups_rtstruct_has_no_contour_of(exported, tmp_path):
    """A structure lost in propagation has no contour at that time, so no ROI in its RTSTRUCT: `stnerp dicom` says
    so, by name. Drawn uniformly under the squared error the fit does not read the segmentation, so one-voxel
    structures ('node 10', 'node 11') put at lung voxels that no voxel of time 1 reads (nearest carrying, the run's
    own field) are lost there."""
    root, folders, *_ = exported
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "labelmap_0.nrrd")))
    reference = sitk.ReadImage(str(root / "labelmap_0.nrrd"))

    def trained(name: str, labelmap: np.ndarray) -> Path:
        image = sitk.GetImageFromArray(labelmap)
        image.CopyInformation(reference)
        sitk.WriteImage(image, str(tmp_path / f"{name}.nrrd"))
        run = tmp_path / name
        result = stnerp("train", "--reference", folders[0], "--follow-up", folders[1], 1, "--segmentation",
                        tmp_path / f"{name}.nrrd", "--label-interpolation", "nearest", "--structure-points", 0,
                        "--similarity", "mse", "--iterations", 20, "--output", run, "--no-report")
        assert result.returncode == 0, result.stderr
        return run

    plain = trained("plain", labels)
    for label, (z, y, x) in enumerate(unread_lung_voxels(plain / "t_1" / "displacement.nrrd", labels, 2), 10):
        labels[z, y, x] = label
    run = trained("marked", labels)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"1": "GTV", "10": "node 10", "11": "node 11"}))
    result = stnerp("dicom", "--run", run, "--dicom-out", tmp_path / "out", "--label-names", names)
    assert result.returncode == 0, result.stderr
    assert "t=1: RTSTRUCT.dcm has no contour of node 10, node 11: lost in propagation" in result.stderr
    rois = [roi.ROIName for roi in pydicom.dcmread(tmp_path / "out" / "t_1" / "RTSTRUCT.dcm").StructureSetROISequence]
    assert "GTV" in rois and not {"node 10", "node 11"} & set(rois)


def test_one_file_of_a_dicom_series_stands_for_its_series_in_a_folder_of_several(exported, tmp_path):
    """A PACS or planning-system export puts a study's series in one folder, refused as several series: one file of
    a series picks it (the files of its Series Instance UID in its folder are read), as a DICOM viewer opens the
    series of a file. Read, hashed, exported to and checked against as that series."""
    root, folders, uids, *_ = exported
    study = tmp_path / "study"
    study.mkdir()
    for k, folder in enumerate(folders):
        for path in folder.iterdir():
            shutil.copy(path, study / f"p{k}_{path.name}")
    write_rtdose(study, study / "p0_000.dcm")
    for k, folder in enumerate(folders):
        picked, whole = read_image(study / f"p{k}_007.dcm", "image"), read_image(folder, "image")
        assert Grid.of(picked).matches(Grid.of(whole))
        assert np.array_equal(sitk.GetArrayFromImage(picked), sitk.GetArrayFromImage(whole))
        assert image_information(study / f"p{k}_007.dcm", "image")[0] == image_information(folder, "image")[0]
    run, out = tmp_path / "run", tmp_path / "out"
    result = stnerp("train", "--reference", study / "p0_000.dcm", "--follow-up", study / "p1_023.dcm", 1, "--output",
                    run, "--iterations", "10", "--prior", "image", "--segmentation", root / "labelmap_0.nrrd",
                    "--dicom-out", out, "--no-report")
    assert result.returncode == 0, result.stderr
    rs = pydicom.dcmread(out / "t_1" / "RTSTRUCT.dcm")
    referenced = {i.ReferencedSOPInstanceUID for c in rs.ROIContourSequence for s in c.ContourSequence
                  for i in s.ContourImageSequence}
    assert referenced and referenced <= set(uids[1])
    hashed = file_sha256(study / "p1_023.dcm")
    assert hashed in json.loads((run / "run.json").read_text())["inputs"]["sha256"].values()
    edited = pydicom.dcmread(study / "p1_005.dcm")                  # another slice of the series changes
    edited.PixelData = (np.frombuffer(edited.PixelData, np.int16) + 1).tobytes()
    edited.save_as(study / "p1_005.dcm", enforce_file_format=True)
    assert file_sha256(study / "p1_023.dcm") != hashed
    cases = ((["--reference", study, "--follow-up", folders[1], 1], ("3 DICOM image series", "one file of the series")),
             (["--reference", study / "p0_000.dcm", "--follow-up", folders[1], 1, "--segmentation",
               root / "out" / "t_1" / "RTSTRUCT.dcm"], ("was drawn on DICOM series",)))
    for k, (inputs, words) in enumerate(cases):
        result = stnerp("train", *inputs, "--output", tmp_path / f"refused_{k}", "--json-events")
        assert_rejected(result, tmp_path / f"refused_{k}", *words)
