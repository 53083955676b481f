"""Reading and checking inputs, writing outputs. Every problem with an input is an InputError."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import Grid

FORMATS = "NRRD, NIfTI, MHA or a DICOM series folder"
MAX_LABEL = 65535  # labelmaps are kept and written as UInt16


def read_image(path: str | Path, what: str) -> sitk.Image:
    """Read a 3-D scalar image as float32 (units as stored, e.g. HU), checking it is usable."""
    image = _read(Path(path), what)
    _check_volume(image, path, what)
    array = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(array).all():
        raise InputError(f"{what} {path} contains NaN or infinite voxels: fill them (e.g. with the "
                         "background value) before registering")
    return sitk.Cast(image, sitk.sitkFloat32)


def read_labelmap(path: str | Path, grid: Grid, what: str) -> sitk.Image:
    """Read an integer labelmap that lies on `grid` and labels at least one voxel."""
    image = _read(Path(path), what)
    _check_volume(image, path, what)
    array = sitk.GetArrayViewFromImage(image)
    if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)) or array.min() < 0:
        raise InputError(f"{what} {path} is not a labelmap: voxels must be non-negative whole numbers")
    if not np.any(array):
        raise InputError(f"{what} {path} is empty (no voxel is labelled): give a labelmap with at "
                         "least one label")
    if array.max() > MAX_LABEL:
        raise InputError(f"{what} {path} has label {int(array.max())}, above {MAX_LABEL}, the largest "
                         "label kept: renumber its labels")
    if not Grid.of(image).matches(grid):
        raise InputError(f"{what} {path} is on another grid than its image: resample it onto "
                         "that image's grid (same size, spacing, origin, direction)")
    return sitk.Cast(image, sitk.sitkUInt16)


LANDMARK_COLUMNS = ("time", "x", "y", "z", "ref_x", "ref_y", "ref_z")


def read_landmarks(path: str | Path) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """Landmark pairs per time: (points in the time-t image, matching reference points), LPS mm.

    The CSV has the columns time,x,y,z,ref_x,ref_y,ref_z.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"landmark file not found: {path}: check the path")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in LANDMARK_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"landmark file {path} lacks the columns {', '.join(missing)}: "
                             f"its header must be {','.join(LANDMARK_COLUMNS)} (LPS mm)")
        try:
            rows = [[float(row[c]) for c in LANDMARK_COLUMNS] for row in reader]
        except (TypeError, ValueError):
            raise InputError(f"landmark file {path} has a row that is not all numbers") from None
    if not rows:
        raise InputError(f"landmark file {path} has no landmarks")
    table = np.asarray(rows)
    return {float(t): (table[table[:, 0] == t, 1:4], table[table[:, 0] == t, 4:7])
            for t in np.unique(table[:, 0])}


def write_image(image: sitk.Image, path: Path) -> None:
    """Write an image (compressed), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def _read(path: Path, what: str) -> sitk.Image:
    if not path.exists():
        raise InputError(f"{what} not found: {path}: check the path")
    try:
        if path.is_dir():
            return _read_dicom_series(path, what)
        return sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError(f"cannot read {what} {path}: it is not an image in a format SimpleITK "
                         f"reads ({FORMATS}) or the file is damaged") from None


def _read_dicom_series(folder: Path, what: str) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{what} folder {folder} holds no DICOM series: give an image file or a "
                         "folder with one DICOM series")
    if len(series) > 1:
        raise InputError(f"{what} folder {folder} holds {len(series)} DICOM series: give a folder "
                         "with exactly one")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return reader.Execute()


def _check_volume(image: sitk.Image, path, what: str) -> None:
    if image.GetDimension() != 3:
        hint = ("split the 4-D series into one 3-D volume per time point"
                if image.GetDimension() == 4 else "give a 3-D volume")
        raise InputError(f"{what} {path} is {image.GetDimension()}-D: {hint}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} {path} has {image.GetNumberOfComponentsPerPixel()} components "
                         "per voxel: give a scalar (grey-level) volume")
    if min(image.GetSize()) < 4:
        raise InputError(f"{what} {path} is {image.GetSize()} voxels: every axis needs at least "
                         "4 voxels (a single slice is a 2-D image)")
