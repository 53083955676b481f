"""Reading and checking inputs, writing outputs. Every problem with an input is an InputError."""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .dicom_in import SLICE_TOLERANCE_MM, painted, series_files, structure_file, structures_labelmap
from .errors import InputError
from .geometry import Grid
from .slicer_segmentation import segment_voxels

FORMATS = "NRRD, NIfTI, MHA or a DICOM series: its folder or one of its files"
MAX_LABEL = 65535  # labelmaps are kept and written as UInt16


COMPACT_PIXELS = {sitk.sitkInt8: 1, sitk.sitkUInt8: 1, sitk.sitkInt16: 2, sitk.sitkUInt16: 2, sitk.sitkFloat32: 4}
"""Pixel types an image is kept in as read, with their bytes (a CT's int16 takes half the memory of
float32); any other is cast to float32, as every image was before."""


def held_bytes(pixel: int) -> int:
    """Bytes per voxel of an image of this pixel type as read_image keeps it."""
    return COMPACT_PIXELS.get(pixel, 4)


def image_information(path: str | Path, what: str) -> tuple[tuple[int, ...], int, Grid | None]:
    """(size, pixel type, grid) of an image from its header alone, no voxel read; a DICOM series (a
    folder, or one of its files: dicom_in.series_files) from its first file and its count of files (grid
    None: not known without reading them)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path}: check the path")
    reader = sitk.ImageFileReader()
    try:
        found = series_files(path, what)
        if found is not None:
            _, files = found
            reader.SetFileName(files[0])
            reader.ReadImageInformation()
            size = reader.GetSize() if len(files) == 1 else (*reader.GetSize()[:2], len(files))  # one: multi-frame
            return tuple(size), reader.GetPixelID(), None
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"cannot read {what} {path}: it is not an image in a format SimpleITK "
                         f"reads ({FORMATS}) or the file is damaged") from None
    size = tuple(reader.GetSize())
    grid = Grid(size, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()) if len(size) == 3 else None
    return size, reader.GetPixelID(), grid


def read_image(path: str | Path, what: str) -> sitk.Image:
    """Read a 3-D scalar image (units as stored, e.g. HU), checking it is usable. Kept in its own
    pixel type when that is one of COMPACT_PIXELS (every value exact in float32), else float32."""
    image = _read(Path(path), what)
    _check_volume(image, path, what)
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"{what} {path} contains NaN or infinite voxels: fill them (e.g. with the "
                         "background value) before registering")
    low, high = array.min(), array.max()
    if low == high:
        raise InputError(f"{what} {path} is constant (every voxel is {float(low):g}): there is "
                         "nothing to register; give the real scan")
    del array                 # a view: it must not outlive the image it points into
    return image if image.GetPixelID() in COMPACT_PIXELS else sitk.Cast(image, sitk.sitkFloat32)


def read_labelmap(path: str | Path, grid: Grid, what: str, roi_labels: dict[str, int] | None = None) -> sitk.Image:
    """Read an integer labelmap on `grid` (or on a crop or padding of it: placed on it) that labels at least
    one voxel. A DICOM RT Structure Set or SEG file is placed on `grid` (dicom_in), a 3D Slicer .seg.nrrd saved in
    layers (overlapping segments) merged into one label per voxel (slicer_segmentation); their structures are
    labelled by `roi_labels` (name as matched: name_key -> label) when given, else by their own numbers."""
    structures = structure_file(path)
    if structures is None:
        image = _read(Path(path), what)
        segmented = segment_voxels(image, roi_labels)
        if segmented is not None:
            image = painted(*segmented, Grid.of(image))
    else:
        image = structures_labelmap(structures, grid, path, what, roi_labels)
    if image.GetNumberOfComponentsPerPixel() > 1 or image.GetDimension() == 4:
        raise InputError(f"{what} {path} holds several layers (one volume per structure) and no 3D Slicer segment "
                         "metadata: give one labelmap, one label per voxel, or the .seg.nrrd 3D Slicer saved")
    if image.GetDimension() == 3 and not Grid.of(image).matches(grid):
        image = _placed_on(image, grid, path, what)
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
    return sitk.Cast(image, sitk.sitkUInt16)


def _placed_on(labelmap: sitk.Image, grid: Grid, path: str | Path, what: str) -> sitk.Image:
    """A labelmap whose voxels are voxels of `grid` (cropped to its segments or padded beyond the image, as 3D
    Slicer exports a segmentation) placed on `grid`, unlabelled elsewhere; InputError when it lies on another
    lattice or labels a voxel outside `grid`."""
    offset = Grid.of(labelmap).offset_in(grid)
    if offset is None:
        raise InputError(f"{what} {path} is on another grid than its image: resample it onto "
                         "that image's grid (same size, spacing, origin, direction)")
    source = sitk.GetArrayViewFromImage(labelmap)
    low = np.maximum(offset[::-1], 0)                              # (z, y, x) on `grid`
    high = np.minimum(np.add(offset[::-1], source.shape), grid.shape)
    kept = tuple(slice(a - o, b - o) for a, b, o in zip(low, high, offset[::-1]))
    array = np.zeros(grid.shape, source.dtype)
    if np.all(high > low):
        array[tuple(slice(a, b) for a, b in zip(low, high))] = source[kept]
    lost = np.count_nonzero(source) - np.count_nonzero(array)
    if lost:
        raise InputError(f"{what} {path} labels {lost} voxel{'s' if lost > 1 else ''} outside its image's grid: "
                         "give a labelmap of the structures within the image (resampled onto its grid)")
    return grid.image(array)


LANDMARK_COLUMNS = ("time", "x", "y", "z", "ref_x", "ref_y", "ref_z")


def csv_delimiter(header: str) -> str:
    """The separator of a user's CSV file, from its header line: ';' when the header has semicolons and no comma
    (Excel saves "CSV" so in a locale that writes decimal commas, 1,5), else ','."""
    return ";" if ";" in header and "," not in header else ","


def decimal_point(text: str, delimiter: str) -> str:
    """A number's text as Python reads it: in a file separated by ';', a decimal comma (1,5) becomes 1.5."""
    return text.replace(",", ".") if delimiter == ";" else text


def read_landmarks(path: str | Path) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """Landmark pairs per time: (points in the time-t image, matching reference points), LPS mm.

    The CSV has the columns time,x,y,z,ref_x,ref_y,ref_z.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"landmark file not found: {path}: check the path")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:   # -sig: a byte order mark (Excel) is not a header
            delimiter = csv_delimiter(handle.readline())
            handle.seek(0)
            reader = csv.DictReader(handle, delimiter=delimiter)
            missing = [c for c in LANDMARK_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"landmark file {path} lacks the columns {', '.join(missing)}: "
                                 f"its header must be {','.join(LANDMARK_COLUMNS)} (LPS mm)")
            try:
                rows = [[float(decimal_point(row[c], delimiter)) for c in LANDMARK_COLUMNS] for row in reader]
            except (TypeError, ValueError, AttributeError):                  # AttributeError: a short row's None
                raise InputError(f"landmark file {path} has a row that is not all numbers") from None
    except UnicodeDecodeError:
        raise InputError(f"landmark file {path} is not a text (CSV) file: give a CSV with the header "
                         f"{','.join(LANDMARK_COLUMNS)}") from None
    if not rows:
        raise InputError(f"landmark file {path} has no landmarks")
    table = np.asarray(rows)
    if not np.isfinite(table).all():
        row = int(np.flatnonzero(~np.isfinite(table).all(axis=1))[0]) + 1
        raise InputError(f"landmark file {path} has a value that is not finite (NaN or inf) in landmark row "
                         f"{row}: give every coordinate as a number or delete the row")
    return {float(t): (table[table[:, 0] == t, 1:4], table[table[:, 0] == t, 4:7])
            for t in np.unique(table[:, 0])}


def check_landmarks_inside(points: np.ndarray, grid: Grid, what: str, image: str) -> None:
    """Refuse landmarks (N, 3, LPS mm) that lie outside the grid's voxel-centre box (half a voxel of slack)."""
    index = grid.to_index(points)
    outside = np.flatnonzero(((index < -0.5) | (index > np.asarray(grid.size) - 0.5)).any(axis=1))
    if outside.size:
        p = points[outside[0]]
        raise InputError(f"{what} number {outside[0] + 1} ({p[0]:g}, {p[1]:g}, {p[2]:g}) mm lies outside "
                         f"{image} ({outside.size} of {len(points)} do): check its coordinates (LPS mm)")


def file_sha256(path: str | Path) -> str | None:
    """SHA-256 of a file, of the files directly in a folder, or of the files of the DICOM series one file
    stands for (dicom_in.series_files): names and contents, in name order; None if it is absent or cannot be
    read (reading it reports why)."""
    path = Path(path)
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file())
        else:
            series = series_files(path, "image")
            files = [path] if series is None else sorted(map(Path, series[1]))
        digest = hashlib.sha256()
        for file in files:
            if files != [path]:
                digest.update(file.name.encode())
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def write_image(image: sitk.Image, path: Path) -> None:
    """Write an image, creating its folder: labelmaps (integer pixels) gzip-compressed, floating-point
    images raw. gzip shrinks a float32 field by only 9-22 % and took a third of a time point's
    output time (256x256x150: displacement 118 -> 107 MB in 3.4 s instead of 0.14 s), while a
    labelmap shrinks ~100x."""
    path.parent.mkdir(parents=True, exist_ok=True)
    floating = image.GetPixelID() in _FLOATING_PIXELS
    sitk.WriteImage(image, str(path), useCompression=not floating)


_FLOATING_PIXELS = {sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64}


def _read(path: Path, what: str) -> sitk.Image:
    if not path.exists():
        raise InputError(f"{what} not found: {path}: check the path")
    try:
        found = series_files(path, what)
        return sitk.ReadImage(str(path)) if found is None else _read_dicom_series(found[1], path, what)
    except RuntimeError:
        raise InputError(f"cannot read {what} {path}: it is not an image in a format SimpleITK "
                         f"reads ({FORMATS}) or the file is damaged") from None


def _read_dicom_series(files: tuple[str, ...], source: Path, what: str) -> sitk.Image:
    """The volume of a DICOM series' files (dicom_in.series_files), given as `source` (a folder or one file)."""
    if len(files) == 1:
        return sitk.ReadImage(files[0])      # one multi-frame file (Enhanced CT): its frames place the slices
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.SetSpacingWarningRelThreshold(float("inf"))     # _require_even_slices says it instead, in one line
    reader.MetaDataDictionaryArrayUpdateOn()                 # each slice's header, as read: its position
    image = reader.Execute()
    _require_even_slices(image, reader, files, source, what)
    return image


POSITION_TAG = "0020|0032"
"""Image Position (Patient): the LPS mm of a DICOM slice's first voxel."""


def _require_even_slices(image: sitk.Image, reader: sitk.ImageSeriesReader, files: tuple[str, ...], source: Path,
                         what: str) -> None:
    """InputError unless every slice file lies where the volume puts it (within SLICE_TOLERANCE_MM), from the
    positions in the slices' headers as `reader` read them. ITK reads a series as evenly spaced, spacing its slices
    by the mean step, whatever their positions: a missing slice, a change of slice spacing or a tilted gantry would
    move every slice's anatomy without a word."""
    positions = {k: [float(v) for v in reader.GetMetaData(k, POSITION_TAG).split("\\")]
                 for k in range(len(files)) if reader.HasMetaDataKey(k, POSITION_TAG)}   # else ITK could not place it
    _refuse_repeated_positions(positions, files, source, what)
    worst, name = 0.0, ""
    for k, position in positions.items():
        error = float(np.linalg.norm(np.subtract(position, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        if error > worst:
            worst, name = error, Path(files[k]).name
    if worst > SLICE_TOLERANCE_MM:
        raise InputError(f"{what} {source} is a DICOM series whose slices are not evenly spaced ({name} lies "
                         f"{worst:.1f} mm from its place in the volume: a missing slice, a change of slice spacing or "
                         "a tilted gantry): resample it to even slices (3D Slicer does on DICOM import) and save it "
                         "as NRRD, or give the whole series")


def _refuse_repeated_positions(positions: dict[int, list[float]], files: tuple[str, ...], source: Path,
                               what: str) -> None:
    """InputError when slices of the series share a position (within SLICE_TOLERANCE_MM): the phases of a 4-D CT,
    or several acquisitions, exported under one Series Instance UID."""
    first: dict[tuple[int, ...], int] = {}
    repeats = []
    for k, position in positions.items():
        key = tuple(np.rint(np.divide(position, SLICE_TOLERANCE_MM)).astype(int))
        if key in first:
            repeats.append((first[key], k))
        else:
            first[key] = k
    if repeats:
        a, b = repeats[0]
        raise InputError(f"{what} {source} is one DICOM series holding {len(repeats)} slice positions twice "
                         f"or more ({Path(files[a]).name} and {Path(files[b]).name} both at "
                         f"{', '.join(f'{v:g}' for v in positions[a])} mm): several phases or acquisitions in one "
                         "series (a 4-D CT?): give one folder per phase (3D Slicer's DICOM module offers each phase "
                         "of such a series as a volume of its own, by acquisition number or by time, to save as NRRD)")


def _check_volume(image: sitk.Image, path: str | Path, what: str) -> None:
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
