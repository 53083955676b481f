"""DICOM out for adaptive radiotherapy: per follow-up, the propagated structures as an RT Structure
Set on that follow-up's series, and the deformation as a Deformable Spatial Registration.

Built with pydicomrt (RTStructBuilder, DeformableSpatialRegistrationBuilder) on pydicom; see the
README for why. The registration object's registered frame of reference is the follow-up's and
its source is the reference's: at a follow-up point x the grid gives the reference point
x + u(x) (DICOM PS3.3 C.20.3.1.1: registered RCS -> source RCS), which is exactly the run's
displacement.nrrd (time-t point -> reference point, pre-alignment included), on its grid.
Contours run through the centres of the structure's boundary voxels (no smoothing), so every
point lies within half a voxel of the labelmap's boundary; pydicomrt keeps contours of three
points or more, so a piece of a structure of one or two voxels on a slice has none. ROIs are
numbered by label and, when the run's segmentation was a structure set, coloured and typed as
its ROIs (the plan's ROI Display Color and RT ROI Interpreted Type).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .contract import is_complete, time_point_folder
from .dicom_in import image_series, roi_looks, rtstruct
from .errors import InputError
from .record import load_record
from .report import FOCUS, structure_names

TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "ReferringPhysicianName", "AccessionNumber", "SeriesNumber")
CONTOURS = {"ex_noise_size": 0, "in_noise_size": 0, "lowpass_ratio": 100, "ctr_precision": 4}  # >= 45: no smoothing


def check_dicom_inputs(reference: str, follow_ups: list[tuple[str, float]]) -> None:
    """Raise InputError unless every image is a DICOM series folder and pydicomrt is installed."""
    folders = [reference, *(p for p, _ in follow_ups)]
    not_dicom = [p for p in folders if not Path(p).is_dir()]
    if not_dicom:
        raise InputError(f"--dicom-out needs DICOM series folders as inputs, but {not_dicom[0]} is not a "
                         "folder: give each image as its DICOM series folder, or drop --dicom-out")
    multi_frame = [p for p in folders if len(image_series(p, "image")[1]) == 1]
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
    from pydicomrt.rs import RTStructBuilder

    run, folder = Path(run), Path(folder)
    record = load_record(run)
    if not is_complete(record):
        raise InputError(f"run {run} is not complete (status: {record.get('status')}): train it again")
    inputs = record["inputs"]
    follow_ups = [(path, float(t)) for path, t in inputs.get("follow_ups", [])]
    check_dicom_inputs(inputs.get("reference") or "", follow_ups)
    names = structure_names(record, run, label_names)
    plan = rtstruct(inputs.get("segmentation") or "")
    looks = roi_looks(plan) if plan is not None else {}
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
            builder = RTStructBuilder(series).set_structure_set_label(f"STNeRP t={t:g}"[:16])
            labels = sitk.ReadImage(str(run / entry["labelmap"]))
            for label, mask in _masks(labels, series).items():
                colour, kind = looks.get(label, (None, None))
                builder.add_roi(mask, names[label], number=label, color=colour or _colour(label),
                                interpreted_type=kind or ("GTV" if FOCUS.search(names[label]) else "ORGAN"),
                                contour_config=CONTOURS)
            written.append(_save(builder.build(), out / "RTSTRUCT.dcm"))
        field = sitk.ReadImage(str(run / entry["displacement"]), sitk.sitkVectorFloat64)
        registration = DeformableSpatialRegistrationBuilder(series).add_registration(
            reference, sitk.DisplacementFieldTransform(field))
        written.append(_save(registration.build(), out / "REG.dcm"))
    return written


def read_series(folder: Path) -> list:
    """The pydicom headers of the one DICOM series in a folder, sorted along the slice normal."""
    import pydicom
    from pydicomrt.utils import sort_image_series

    _, files = image_series(folder, "image")
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


def _save(dataset, path: Path) -> Path:
    dataset.save_as(str(path), enforce_file_format=True)
    return path
