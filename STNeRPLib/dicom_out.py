"""DICOM out for adaptive radiotherapy: per follow-up, the propagated structures as an RT Structure
Set on that follow-up's series, and the deformation as a Deformable Spatial Registration.

Built with pydicomrt (RTStructBuilder, DeformableSpatialRegistrationBuilder) on pydicom; see the
README for why. The registration object's registered frame of reference is the follow-up's and
its source is the reference's: at a follow-up point x the grid gives the reference point
x + u(x) (DICOM PS3.3 C.20.3.1.1: registered RCS -> source RCS), which is exactly the run's
displacement.nrrd (time-t point -> reference point, pre-alignment included), on its grid.
Contours run through the centres of the structure's boundary voxels (no smoothing), so every
point lies within half a voxel of the labelmap's boundary; pydicomrt keeps contours of three
points or more, so a piece of a structure of one or two voxels on a slice gets a square half a
voxel out about each of its voxels instead (read back by dicom_in, every voxel). ROIs are
numbered by label, coloured as the run's segmentation shows its structures (an RT Structure
Set's ROI Display Color, a SEG's Recommended Display CIELab Value, a Slicer .seg.nrrd's segment
colours) and typed as a structure set's ROIs (RT ROI Interpreted Type): dicom_in.structure_looks.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, cast

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .contract import is_complete, time_point_folder
from .dicom_in import Looks, series_files, structure_looks
from .errors import InputError
from .record import load_record
from .report import FOCUS, Names, structure_names

if TYPE_CHECKING:                                  # pydicom comes with the dicom extra, imported where used
    from pydicom.dataset import Dataset, FileDataset

TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "ReferringPhysicianName", "AccessionNumber", "SeriesNumber")
CONTOURS = {"ex_noise_size": 0, "in_noise_size": 0, "lowpass_ratio": 100, "ctr_precision": 4}  # >= 45: no smoothing


def check_dicom_inputs(reference: str, follow_ups: list[tuple[str, float]]) -> None:
    """Raise InputError unless every image is a DICOM series (a folder or one of its files) and pydicomrt is
    installed."""
    images = [reference, *(p for p, _ in follow_ups)]
    series = [series_files(p, "image") for p in images]
    not_dicom = [p for p, found in zip(images, series) if found is None]
    if not_dicom:
        raise InputError(f"--dicom-out needs DICOM series folders as inputs, but {not_dicom[0]} is not a "
                         "DICOM series: give each image as its DICOM series folder, or drop --dicom-out")
    multi_frame = [p for p, (_, files) in zip(images, cast("list[tuple[str, tuple[str, ...]]]", series))
                   if len(files) == 1]
    if multi_frame:
        raise InputError(f"--dicom-out writes contours on series of one file per slice, but {multi_frame[0]} is one "
                         "multi-frame file (Enhanced CT or MR): drop --dicom-out, or give the series as single "
                         "frames (3D Slicer's DICOM export writes them)")
    try:
        import pydicomrt  # noqa: F401
    except ImportError:
        raise InputError("--dicom-out needs pydicomrt: pip install 'stnerp[dicom]'") from None


def write_dicom(run: Path, folder: Path, label_names: str | None = None,
                say: Callable[[str], None] = lambda line: None) -> list[Path]:
    """Write RTSTRUCT and REG files per follow-up of a complete run into folder/t_<time>/; `say` is told of each
    structure a follow-up's RTSTRUCT has no contour of (lost in propagation: run.json's labels_lost)."""
    from pydicomrt.reg import DeformableSpatialRegistrationBuilder

    run, folder = Path(run), Path(folder)
    record = load_record(run)
    if not is_complete(record):
        raise InputError(f"run {run} is not complete (status: {record.get('status')}): train it again")
    inputs = record["inputs"]
    follow_ups = [(path, float(t)) for path, t in inputs.get("follow_ups", [])]
    check_dicom_inputs(inputs.get("reference") or "", follow_ups)
    names = structure_names(record, run, label_names)
    looks = structure_looks(inputs["segmentation"]) if inputs.get("segmentation") else {}
    entries = {float(e["time"]): e for e in record["time_points"]}
    reference = read_series(Path(inputs["reference"]))
    written = []
    for path, t in follow_ups:
        series, entry = read_series(Path(path)), entries[t]
        out = folder / time_point_folder(t)
        out.mkdir(parents=True, exist_ok=True)
        if entry.get("labels_lost"):
            say(f"t={t:g}: RTSTRUCT.dcm has no contour of {', '.join(names[label] for label in entry['labels_lost'])}: "
                "lost in propagation (no voxel of the propagated labelmap holds it)")
        if entry.get("labelmap"):
            labels = sitk.ReadImage(str(run / entry["labelmap"]))
            written.append(_save(structure_set(labels, series, f"STNeRP t={t:g}", names, looks), out / "RTSTRUCT.dcm"))
        field = sitk.ReadImage(str(run / entry["displacement"]), sitk.sitkVectorFloat64)
        registration = DeformableSpatialRegistrationBuilder(series).add_registration(
            reference, sitk.DisplacementFieldTransform(field))
        written.append(_save(registration.build(), out / "REG.dcm"))
    return written


def structure_set(labels: sitk.Image, series: list, label: str, names: Names,
                  looks: Looks) -> FileDataset:
    """An RT Structure Set of a labelmap on `series` (its pydicom headers, read_series): one ROI per label, named by
    `names`, coloured and typed by `looks` (dicom_in.structure_looks) where it has the label. Contours through the
    boundary voxels' centres, and about each piece of one or two voxels on a slice, which pydicomrt gives none,
    a square half a voxel out about each of its voxels."""
    from pydicomrt.rs import RTStructBuilder

    builder = RTStructBuilder(series).set_structure_set_label(label[:16])
    masks = _masks(labels, series)
    for number, mask in masks.items():
        colour, kind = looks.get(number, (None, None))
        builder.add_roi(mask, names[number], number=number, color=colour or _colour(number),
                        interpreted_type=kind or ("GTV" if FOCUS.search(names[number]) else "ORGAN"),
                        contour_config=CONTOURS)
    dataset = builder.build()
    for item in dataset.ROIContourSequence:
        _add_small_pieces(item, masks[int(item.ReferencedROINumber)], labels, series)
    return dataset


def _add_small_pieces(item: Dataset, mask: np.ndarray, labels: sitk.Image, series: list) -> None:
    """Append to an ROI's contours a square half a voxel out about each voxel of its pieces of one or two voxels
    (8-connected) on a slice of `mask` (slices in `series` order, rows, columns)."""
    from pydicom.sequence import Sequence
    from pydicomrt.rs.make_contour_sequence import create_contour_sequence_block

    corners = [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
    for ds, plane in zip(series, mask):
        pieces, _ = ndimage.label(plane, structure=np.ones((3, 3)))
        rows, columns = np.nonzero((pieces > 0) & (np.bincount(pieces.ravel())[pieces] < 3))
        k = labels.TransformPhysicalPointToIndex([float(v) for v in ds.ImagePositionPatient])[2]
        for row, column in zip(rows, columns):
            points = [labels.TransformContinuousIndexToPhysicalPoint((column + dx, row + dy, k)) for dx, dy in corners]
            data = [round(v, CONTOURS["ctr_precision"]) for point in points for v in point]
            if "ContourSequence" not in item:
                item.ContourSequence = Sequence()
            item.ContourSequence.append(create_contour_sequence_block(data, ds.SOPClassUID, ds.SOPInstanceUID))


def read_series(source: Path) -> list:
    """The pydicom headers of a DICOM series (a folder's one series, or the series of one of its files:
    series_files), sorted along the slice normal."""
    import pydicom
    from pydicomrt.utils import sort_image_series

    _, files = cast("tuple[str, tuple[str, ...]]", series_files(source, "image"))
    series = sort_image_series([pydicom.dcmread(f, stop_before_pixels=True) for f in files])
    for ds in series:                       # type 2 (present, may be empty); pydicomrt copies them
        for keyword in TYPE_2:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return series


def _masks(labels: sitk.Image, series: list) -> dict[int, np.ndarray]:
    """Per label, a (slice, row, column) mask in the order of `series`, matched by slice position."""
    array = sitk.GetArrayViewFromImage(labels)
    order = [labels.TransformPhysicalPointToIndex([float(v) for v in ds.ImagePositionPatient])[2] for ds in series]
    if sorted(order) != list(range(array.shape[0])) or (int(series[0].Rows), int(series[0].Columns)) != array.shape[1:]:
        raise InputError("the propagated labelmap does not lie on the follow-up's DICOM series: "
                         "was the series changed since training?")
    stacked = array[order]
    return {int(label): stacked == label for label in np.unique(stacked[stacked > 0])}


def _colour(label: int) -> list[int]:
    tab10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
             (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    return list(tab10[label % 10])


def _save(dataset: FileDataset, path: Path) -> Path:
    dataset.save_as(str(path), enforce_file_format=True)
    return path
