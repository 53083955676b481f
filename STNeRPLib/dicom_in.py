"""DICOM in: which series of a folder is the image (a planning system's export holds the CT beside its RT
Dose and Structure Set), and an RT Structure Set (RTSTRUCT), as a planning system exports the planning CT's
contours, or a DICOM Segmentation (SEG), as AI contouring tools export segments, read as the labelmap the worker
propagates (a SEG's frames are placed on the image's voxels: seg_labelmap).

Each ROI's closed planar contours are filled on the slices of the image's grid they lie on (LPS mm, as
DICOM's patient coordinates): a voxel belongs to a contour when its centre lies inside it or on it, so a
contour through the centres of a structure's boundary voxels (as `stnerp dicom` writes them) gives back
those voxels. A contour inside an odd number of others on its slice is a hole: the voxels strictly inside
it are removed (its boundary voxels are the structure's). The label of an ROI is its ROI Number, its name
the ROI Name. A voxel in several ROIs (a GTV inside a lung, organs inside the body contour) goes to the
smallest ROI holding it, as for the panel's overlapping segments (contract.paint_order).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, cast

import numpy as np
import SimpleITK as sitk

from .contract import paint_order
from .errors import InputError
from .geometry import Grid
from .slicer_segmentation import labelled_segments, name_key, segment_names

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pydicom import Dataset, FileDataset

RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
"""A SEG whose frames hold Segment Numbers, one frame per slice (DICOM 2024's label map segmentation)."""
SEG_STORAGE = (SEGMENTATION_STORAGE, LABEL_MAP_SEGMENTATION_STORAGE)

SLICE_TOLERANCE_MM = 0.1
"""How far (mm) a DICOM slice may lie from its place in the evenly spaced volume read from its series (io), and a
contour from the slice it is filled on: positions rounded to a hundredth of a millimetre stay well below; a
missing slice, or a structure set drawn on another scan's slices, is up to a slice spacing off."""

EDGE_TOLERANCE = 1e-3
"""How far (voxels, in the slice) a voxel centre may lie outside a contour and count as on it: contours
written to a tenth of a micrometre, as through voxel centres, stay well within."""


NOT_IMAGES = {"RTDOSE", "RTIMAGE", "RTPLAN", "RTRECORD", "RTSTRUCT", "REG", "SEG", "PR", "KO", "SR", "DOC"}
"""Modalities of the objects a planning system or PACS exports beside a scan (a plan's dose, structures,
registrations, reports): not the image a folder is given for."""


def series_files(path: str | Path, what: str) -> tuple[str, tuple[str, ...]] | None:
    """The Series Instance UID and files (in GDCM's slice order) of the DICOM image series `path` stands for: a
    folder's one image series (image_series), or the series of one of its files (a DICOM image file: the files of
    its Series Instance UID in its folder, as a DICOM viewer opens the series of a file; a multi-frame file is
    its series alone). None for anything else: an image file of another format, or a DICOM object that is not
    an image (an RT Structure Set, ...), read by their own readers."""
    path = Path(path)
    if path.is_dir():
        return image_series(path, what)
    if not _is_dicom(path):
        return None
    try:
        header = _header(str(path))
    except RuntimeError:                        # not an image GDCM reads (an RTSTRUCT, ...): its reader says
        return None
    uid, modality = header.get("0020|000e", ""), header.get("0008|0060", "")
    if not uid or modality.upper() in NOT_IMAGES:
        return None
    if header["size"][2:3] not in ((), (1,)):                  # multi-frame: the whole series in one file
        return uid, (str(path),)
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path.parent), uid)
    return uid, tuple(files) if any(Path(file).resolve() == path.resolve() for file in files) else (str(path),)


def _is_dicom(path: Path) -> bool:
    """Whether `path` is a file with DICOM's preamble and prefix ("DICM" at byte 128)."""
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def image_series(folder: str | Path, what: str) -> tuple[str, tuple[str, ...]]:
    """The Series Instance UID and files (in GDCM's slice order) of the one image series in a DICOM folder,
    the other objects of an export (NOT_IMAGES: RT Dose, ...) left aside, and a single 2-D image (a scanner's
    topogram) too when a volume is beside it; InputError when it holds none or several, naming them (one
    file of the series wanted stands for it: series_files)."""
    found = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        header = _header(files[0])
        modality, description = (header.get(tag, "") for tag in ("0008|0060", "0008|103e"))
        if modality.upper() not in NOT_IMAGES:
            flat = len(files) == 1 and header["size"][2:3] in ((), (1,))
            found.append((uid, files, flat, f"{modality} {description!r} ({len(files)} files)"))
    volumes = [series for series in found if not series[2]] or found
    if not volumes:
        raise InputError(f"{what} folder {folder} holds no DICOM image series: give an image file or a "
                         "folder with one DICOM series")
    if len(volumes) > 1:
        raise InputError(f"{what} folder {folder} holds {len(volumes)} DICOM image series "
                         f"({', '.join(name for *_, name in volumes)}): give one file of the series wanted (its "
                         "series is read), or a folder with exactly one")
    return volumes[0][0], volumes[0][1]


def _header(file: str) -> dict:
    """A DICOM file's attributes by GDCM's "gggg|eeee" keys, as stripped text, and its image's "size"."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.ReadImageInformation()
    header = {key: reader.GetMetaData(key).strip() for key in reader.GetMetaDataKeys()}
    return {**header, "size": tuple(reader.GetSize())}


def structure_file(path: str | Path) -> FileDataset | None:
    """The pydicom dataset of an RT Structure Set or a DICOM Segmentation (SEG) file, else None (a file that is
    not DICOM, or another DICOM object); InputError when pydicom, needed to read it, is missing. Each version of a
    file is read once (_read_structure_file): a ground truth is asked about by its series check, its name matching,
    its fill and its unscored structures."""
    path = Path(path)
    if not _is_dicom(path):
        return None
    status = path.stat()
    return _read_structure_file(str(path.resolve()), status.st_mtime_ns, status.st_size)


@lru_cache(maxsize=4)
def _read_structure_file(path: str, modified_ns: int, size: int) -> FileDataset | None:
    """structure_file's reading of one version (modification time, size) of a DICOM file; callers only read it."""
    try:
        import pydicom
    except ImportError:
        raise InputError(f"{path} is a DICOM file, which needs pydicom to read: pip install 'stnerp[dicom]'") from None
    dataset = pydicom.dcmread(path)
    return dataset if dataset.get("SOPClassUID") in (RTSTRUCT_STORAGE, *SEG_STORAGE) else None


def is_seg(dataset: Dataset) -> bool:
    """Whether a structure_file dataset is a DICOM Segmentation, binary, fractional or label map (else an RT
    Structure Set)."""
    return dataset.get("SOPClassUID") in SEG_STORAGE


def roi_names(dataset: Dataset) -> dict[int, str]:
    """Label -> name of the structures of a structure_file: an RT Structure Set's ROI Number -> ROI Name, a
    SEG's Segment Number -> Segment Label."""
    if is_seg(dataset):
        return {int(item.SegmentNumber): str(item.get("SegmentLabel", f"segment {item.SegmentNumber}"))
                for item in dataset.get("SegmentSequence", [])}
    return {int(roi.ROINumber): str(roi.get("ROIName", f"ROI {roi.ROINumber}"))
            for roi in dataset.get("StructureSetROISequence", [])}


Looks = dict[int, tuple[list[int] | None, str | None]]
"""Label -> (display colour as RGB 0-255, RT ROI Interpreted Type), None where a file gives none."""


def structure_looks(path: str | Path) -> Looks:
    """How a segmentation file shows its structures, by label: an RT Structure Set's ROI Display Color and RT ROI
    Interpreted Type (what a planning system treats each ROI as: EXTERNAL, GTV, PTV, ORGAN, ...), a SEG's
    Recommended Display CIELab Value, a Slicer .seg.nrrd's segment colours; {} for a labelmap."""
    found = structure_file(path)
    if found is None:
        return {label: ([round(255 * c) for c in segment.colour], None)
                for label, segment in labelled_segments(path).items() if segment.colour is not None}
    if is_seg(found):
        return {int(item.SegmentNumber): (cielab_to_rgb(item.RecommendedDisplayCIELabValue), None)
                for item in found.get("SegmentSequence", []) if item.get("RecommendedDisplayCIELabValue")}
    colours = {int(roi.ReferencedROINumber): [int(v) for v in roi.ROIDisplayColor]
               for roi in found.get("ROIContourSequence", []) if roi.get("ROIDisplayColor")}
    kinds = {int(o.ReferencedROINumber): str(o.RTROIInterpretedType)
             for o in found.get("RTROIObservationsSequence", []) if o.get("RTROIInterpretedType")}
    return {number: (colours.get(number), kinds.get(number)) for number in colours.keys() | kinds.keys()}


D65_WHITE = np.array([0.950456, 1.0, 1.088754])
"""CIE XYZ of the D65 white point, the white of DICOM's CIELab values (PS3.3 C.10.7.1.1)."""

XYZ_TO_LINEAR_SRGB = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]])


def cielab_to_rgb(values: Sequence[int]) -> list[int]:
    """A DICOM CIELab colour (L* scaled from 0-100, a* and b* from -128-127, each to 0-65535) as sRGB 0-255."""
    scaled = np.asarray(values, float) / 65535
    lightness, a, b = 100 * scaled[0], 255 * scaled[1] - 128, 255 * scaled[2] - 128
    fy = (lightness + 16) / 116
    f = np.array([fy + a / 500, fy, fy - b / 200])
    xyz = D65_WHITE * np.where(f ** 3 > 0.008856, f ** 3, (f - 16 / 116) / 7.787)
    linear = np.clip(XYZ_TO_LINEAR_SRGB @ xyz, 0, 1)
    srgb = np.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear)
    return [int(round(255 * c)) for c in srgb]


def require_drawn_on(path: str | Path, image: str | Path | None, what: str) -> None:
    """InputError when `path` is a structure_file (RTSTRUCT or SEG) drawn on another DICOM series than `image`'s
    (a DICOM series: series_files): another phase of a 4-D CT shares the reference's slices, so only the series
    references (an RTSTRUCT's RT Referenced Series, a SEG's Referenced Series) tell. Nothing to check for a
    labelmap, an image file of another format or none, or a structure file that names no series."""
    structures = structure_file(path)
    found = series_files(image, "image") if structures is not None and image is not None else None
    if structures is None or found is None:
        return
    referenced = [*structures.get("ReferencedSeriesSequence", []),                          # a SEG's
                  *(series for frame in structures.get("ReferencedFrameOfReferenceSequence", [])    # an RTSTRUCT's
                    for study in frame.get("RTReferencedStudySequence", [])
                    for series in study.get("RTReferencedSeriesSequence", []))]
    drawn_on = {str(series.SeriesInstanceUID) for series in referenced}
    series, _ = found
    if drawn_on and series not in drawn_on:
        raise InputError(f"{what} {path} was drawn on DICOM series {sorted(drawn_on)[0]}, not on {image} (series "
                         f"{series}): give the structure set drawn on that image")


def named_structures(path: str | Path) -> dict[int, str] | None:
    """Label -> name of a file's structures: a structure_file's (roi_names), a 3D Slicer segmentation's
    (slicer_segmentation.segment_names); None for a file that names none (a labelmap)."""
    found = structure_file(path)
    return roi_names(found) if found is not None else (segment_names(path) or None)


def labels_by_name(truth: str | Path, segmentation: str | Path | None) -> dict[str, int] | None:
    """For a ground truth whose structures are named (an RTSTRUCT, a SEG, a Slicer .seg.nrrd: named_structures),
    the labels of its structures: the segmentation's numbers by name (name_key), since two such files number
    their structures each their own way; None for a ground truth that is a labelmap, or a Slicer segmentation
    given with a labelmap segmentation (its own labels are then scored). InputError when a DICOM ground truth's
    segmentation names no structures (its labels have no names to match), or when a name both hold is the name of
    two structures in either (which of them would be scored against which is not said)."""
    drawn = named_structures(truth)
    if drawn is None:
        return None
    planned = named_structures(segmentation) if segmentation else None
    if planned is None:
        found = structure_file(truth)
        if found is None:
            return None
        raise InputError(f"ground truth {truth} is a DICOM {'SEG' if is_seg(found) else 'RT Structure Set'} but the "
                         "segmentation names no structures: its structures are matched to the segmentation's by name, "
                         "so give the segmentation as the RTSTRUCT, SEG or .seg.nrrd drawn on the reference, or the "
                         "ground truth as a labelmap numbered as the segmentation")
    shared = {name_key(name) for name in planned.values()} & {name_key(name) for name in drawn.values()}
    for path, names in ((cast("str | Path", segmentation), planned), (truth, drawn)):
        _require_one_roi_per_name(path, names, shared)
    return {name_key(name): number for number, name in planned.items()}


def _require_one_roi_per_name(path: str | Path, names: dict[int, str], keys: set[str]) -> None:
    """InputError when two ROIs of `names` (ROI Number -> ROI Name) share a name of `keys` (as matched: name_key)."""
    for key in sorted(keys):
        numbers = [number for number, name in names.items() if name_key(name) == key]
        if len(numbers) > 1:
            raise InputError(f"{path} holds {len(numbers)} ROIs named '{names[numbers[0]]}' (ROI Numbers "
                             f"{', '.join(map(str, numbers[:-1]))} and {numbers[-1]}): ground-truth ROIs are "
                             "matched to the segmentation's by name, so rename one in the planning system")


def say_unscored(truth: str | Path, segmentation: str | Path | None, t: float, say: Callable[[str], None]) -> None:
    """Tell `say` which structures of a ground truth at time t that names them Dice leaves out, having none of their
    name in the segmentation's (labels_by_name); nothing for a labelmap truth."""
    labels = labels_by_name(truth, segmentation)
    if labels is None:
        return
    left_out = [name for name in cast(dict[int, str], named_structures(truth)).values()
                if name_key(name) not in labels]
    if left_out:
        say(f"ground truth at time {t:g}: {', '.join(left_out)} not scored (the segmentation has no ROI of that "
            "name)")


def rtstruct_labelmap(dataset: Dataset, grid: Grid, path: str | Path, what: str,
                      labels: dict[str, int] | None = None) -> sitk.Image:
    """The structure set's ROIs filled on `grid` (uint16), labelled by their ROI Numbers, or with `labels`
    (ROI Name -> label, from labels_by_name) by their names, leaving out the ROIs it does not name;
    InputError for a contour off the grid's slices or outside it, or an ROI Number that cannot be a label."""
    names = roi_names(dataset)
    voxels: list[np.ndarray] = []
    numbers: list[int] = []
    for roi in dataset.get("ROIContourSequence", []):
        name = names.get(int(roi.ReferencedROINumber), f"ROI {roi.ReferencedROINumber}")
        number = int(roi.ReferencedROINumber) if labels is None else labels.get(name_key(name))
        if number is None:
            continue
        contours = [_points(c) for c in roi.get("ContourSequence", [])
                    if c.get("ContourGeometricType", "CLOSED_PLANAR") == "CLOSED_PLANAR"]
        filled = _filled(contours, grid, f"{what} {path}: ROI {name!r}")
        if filled.size:
            voxels.append(filled)
            numbers.append(_label(number, f"{what} {path}: ROI {name!r} has ROI Number"))
    return painted(voxels, numbers, grid)


def _label(number: int, where: str) -> int:
    """An ROI or Segment Number as a label; InputError (`where` names it) unless a uint16 labelmap can hold it."""
    if not 1 <= number <= np.iinfo(np.uint16).max:
        raise InputError(f"{where} {number}, which cannot be a label (1 to {np.iinfo(np.uint16).max}): renumber it")
    return number


def painted(voxels: list[np.ndarray], numbers: list[int], grid: Grid) -> sitk.Image:
    """The labelmap (uint16) on `grid` of structures (each its flat voxel indices, [z, y, x] order, and its label),
    a voxel in several going to the smallest (paint_order)."""
    labelmap = np.zeros(int(np.prod(grid.shape)), np.uint16)
    for i in paint_order(voxels):
        labelmap[voxels[i]] = numbers[i]
    return grid.image(labelmap.reshape(grid.shape))


def structures_labelmap(dataset: Dataset, grid: Grid, path: str | Path, what: str,
                        labels: dict[str, int] | None = None) -> sitk.Image:
    """A structure_file's structures on `grid` (uint16): an RT Structure Set's contours filled (rtstruct_labelmap),
    a SEG's frames placed (seg_labelmap)."""
    return (seg_labelmap if is_seg(dataset) else rtstruct_labelmap)(dataset, grid, path, what, labels)


def seg_labelmap(dataset: Dataset, grid: Grid, path: str | Path, what: str, labels: dict[str, int] | None = None
                 ) -> sitk.Image:
    """A DICOM Segmentation's segments on `grid` (uint16), labelled by their Segment Numbers, or with `labels`
    (Segment Label -> label, from labels_by_name) by their names. Each frame lies on one of the grid's slices, its
    pixels on the grid's voxels (same in-plane spacing and orientation, its first pixel a whole number of voxels
    off, within SLICE_TOLERANCE_MM): a binary or fractional SEG's frame holds one segment (a fractional one's pixels
    at half its maximum or more), a label map SEG's its pixels' Segment Numbers; a voxel in two segments goes to
    the smaller (paint_order). InputError for a frame off the grid's lattice or labelling voxels outside it."""
    names = roi_names(dataset)
    shared = dataset.get("SharedFunctionalGroupsSequence", [{}])[0]
    voxels: dict[int, list[np.ndarray]] = {}
    for frame, groups in zip(_seg_frames(dataset, path, what), dataset.PerFrameFunctionalGroupsSequence):
        for number, mask in _frame_segments(dataset, frame, groups, names):
            name = names.get(number, f"segment {number}")
            label = number if labels is None else labels.get(name_key(name))
            if label is None:
                continue
            where = f"{what} {path}: segment {name!r}"
            _label(label, f"{where} has Segment Number")
            voxels.setdefault(label, []).append(_placed_frame(mask, _frame_origin(groups, shared, grid, where), grid,
                                                              where))
    numbers = list(voxels)
    return painted([np.unique(np.concatenate(voxels[number])) for number in numbers], numbers, grid)


def _frame_segments(dataset: Dataset, frame: np.ndarray, groups: Dataset,
                    names: dict[int, str]) -> list[tuple[int, np.ndarray]]:
    """(Segment Number, bool [rows, columns]) of each segment a SEG frame holds pixels of."""
    kind = dataset.get("SegmentationType")
    if kind == "LABELMAP":
        return [(int(v), frame == v) for v in np.unique(frame) if int(v) in names]
    half = float(dataset.MaximumFractionalValue) / 2 if kind == "FRACTIONAL" else 0.5
    mask = frame >= half
    number = int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
    return [(number, mask)] if mask.any() else []


def _placed_frame(mask: np.ndarray, origin: tuple[int, int, int], grid: Grid, where: str) -> np.ndarray:
    """Flat indices ([z, y, x] order) on `grid` of a frame's pixels in `mask`, its first pixel on voxel `origin`;
    InputError for pixels outside the grid."""
    z, y, x = origin
    rows, columns = np.nonzero(mask)
    inside = (0 <= z < grid.shape[0]) & (y + rows >= 0) & (y + rows < grid.shape[1]) & (x + columns >= 0) \
        & (x + columns < grid.shape[2])
    if not inside.all():
        raise InputError(f"{where} labels {np.count_nonzero(~inside)} voxels outside the image: give the "
                         "segmentation made on this image")
    return (z * grid.shape[1] + y + rows) * grid.shape[2] + x + columns


def _seg_frames(dataset: Dataset, path: str | Path, what: str) -> Iterator[np.ndarray]:
    """A SEG's frames as stored, decoded one at a time (a SEG of many segments on a clinical CT holds thousands).
    InputError for pixel data pydicom cannot decode here (a codec it lacks, or damaged data)."""
    frames = _decoded(dataset)
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except Exception as error:        # pydicom's decoders raise many types
            syntax = dataset.file_meta.get("TransferSyntaxUID", "unknown")
            raise InputError(f"{what} {path}: its pixel data ({getattr(syntax, 'name', syntax)}) cannot be decoded "
                             f"({type(error).__name__}): save the SEG uncompressed (e.g. gdcmconv --raw)") from None
        yield frame


def _decoded(dataset: Dataset) -> Iterator[np.ndarray]:
    """A SEG's frames as stored, one at a time. 1-bit frames stored natively run on in one bit stream, a frame
    starting mid-byte when rows x columns is no multiple of 8: each is unpacked from its own bits (pydicom 3.0's
    iter_pixels misreads them); others (8-bit, compressed) pydicom decodes."""
    from pydicom.pixels import iter_pixels
    if dataset.BitsAllocated != 1 or dataset.file_meta.TransferSyntaxUID.is_compressed:
        yield from iter_pixels(dataset)
        return
    size, data = dataset.Rows * dataset.Columns, dataset.PixelData
    for k in range(int(dataset.get("NumberOfFrames", 1))):
        first, last = k * size // 8, -(-(k + 1) * size // 8)
        bits = np.unpackbits(np.frombuffer(data, np.uint8, last - first, first), bitorder="little")
        yield bits[k * size % 8:][:size].reshape(dataset.Rows, dataset.Columns)


def _frame_origin(groups: Dataset, shared: Dataset | dict, grid: Grid, where: str) -> tuple[int, int, int]:
    """The voxel (z, y, x) of `grid` a SEG frame's first pixel lies on; InputError unless the frame's pixels are
    the grid's voxels of one slice."""
    orientation, measures, position = (groups.get(name) or shared.get(name) for name in (
        "PlaneOrientationSequence", "PixelMeasuresSequence", "PlanePositionSequence"))
    if not (orientation and measures and position):
        raise InputError(f"{where} has a frame without its plane's orientation, pixel spacing or position "
                         "(functional groups): give a SEG whose frames are placed, or a labelmap")
    orientation, measures, position = orientation[0], measures[0], position[0]
    axes = np.reshape(grid.direction, (3, 3))
    row_step, column_step = (float(v) for v in measures.PixelSpacing)            # between rows, between columns
    if not (np.allclose([float(v) for v in orientation.ImageOrientationPatient], [*axes[:, 0], *axes[:, 1]],
                        atol=1e-4) and np.allclose([column_step, row_step], grid.spacing[:2], atol=1e-3)):
        raise InputError(f"{where} is on another grid than its image (its frames' orientation or pixel spacing "
                         "differ): give the segmentation made on this image, or export it as a labelmap resampled "
                         "onto the image's grid")
    index = grid.to_index(np.array([[float(v) for v in position.ImagePositionPatient]]))[0]
    whole = np.rint(index)
    if np.any(np.abs(index - whole) * np.asarray(grid.spacing) > SLICE_TOLERANCE_MM):
        raise InputError(f"{where} has a frame between the image's voxels or slices (at index "
                         f"{', '.join(f'{v:.2f}' for v in index)}): give the segmentation made on this image")
    x, y, z = (int(v) for v in whole)
    return z, y, x


def _points(contour: Dataset) -> np.ndarray:
    """A contour's Contour Data as (N, 3) LPS mm, parsed from the file's text as read (get_item leaves the element
    unconverted, and nothing here converts it): pydicom's own decimal strings took 0.7 of the time on a planning
    structure set's 800 contours."""
    return np.array(contour.get_item("ContourData").value.decode("ascii").split("\\"), float).reshape(-1, 3)


def _filled(contours: list[np.ndarray], grid: Grid, what: str) -> np.ndarray:
    """Sorted flat indices ([z, y, x] order) of the voxels an ROI's contours (each (N, 3) LPS mm) fill."""
    by_slice: dict[int, list[np.ndarray]] = {}
    for points in contours:
        index = grid.to_index(points)
        by_slice.setdefault(_slice_of(index, grid, points, what), []).append(index[:, :2])
    rows, columns = grid.shape[1:]
    flat = [k * rows * columns + np.flatnonzero(_slice_mask(polygons, (rows, columns)))
            for k, polygons in sorted(by_slice.items())]
    return np.concatenate(flat) if flat else np.empty(0, np.int64)


def _slice_of(index: np.ndarray, grid: Grid, points: np.ndarray, what: str) -> int:
    """The grid slice a contour (its continuous indices (N, 3)) lies on; InputError when it lies between
    slices, across them, or beyond the grid."""
    k = int(np.rint(index[:, 2].mean()))
    off_plane = np.abs(index[:, 2] - k).max() * grid.spacing[2]
    low, high = index.min(axis=0), index.max(axis=0)
    if off_plane > SLICE_TOLERANCE_MM:
        raise InputError(f"{what} has a contour {off_plane:.2f} mm off the image's slices (near "
                         f"{', '.join(f'{v:g}' for v in points[0])} mm, LPS): the structure set was not drawn on "
                         "this scan; give the one drawn on it, or a labelmap on its grid")
    if np.any(low < -0.5) or np.any(high > np.asarray(grid.size) - 0.5):
        raise InputError(f"{what} has a contour outside the image (near {', '.join(f'{v:g}' for v in points[0])} "
                         "mm, LPS): give the structure set drawn on this scan")
    return k


def _slice_mask(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Boolean (rows, columns) mask of one slice's contours (each (N, 2) continuous (x, y) indices): a
    contour inside an odd number of the others is a hole, its strict interior removed; the others add their
    interior and boundary. Shallower contours first, so an island inside a hole is added back."""
    filled = [_fill(polygon, shape) for polygon in polygons]
    depth = [sum(_encloses(other, polygon) for other in polygons if other is not polygon) for polygon in polygons]
    mask = np.zeros(shape, bool)
    for level, (interior, boundary) in sorted(zip(depth, filled), key=lambda pair: pair[0]):
        mask = mask & ~(interior & ~boundary) if level % 2 else mask | interior | boundary
    return mask


def _encloses(outer: np.ndarray, inner: np.ndarray) -> bool:
    """Whether the closed polygon `inner` lies within `outer` (each (N, 2)): a smaller area and every vertex
    inside or on it. A hole traced through the structure's voxels about it may share vertices with the outer
    contour where it opens diagonally to the outside, so one vertex does not tell. Vertices are tested in blocks
    of ENCLOSE_BLOCK, stopping at the first outside: a planning system's contour may have 10 000 points."""
    if _area(inner) >= _area(outer) or np.any(inner.min(axis=0) < outer.min(axis=0) - EDGE_TOLERANCE) \
            or np.any(inner.max(axis=0) > outer.max(axis=0) + EDGE_TOLERANCE):
        return False
    start, end = outer, np.roll(outer, -1, axis=0)
    for block in range(0, len(inner), ENCLOSE_BLOCK):
        points = inner[block:block + ENCLOSE_BLOCK]
        crossings = _crossings(start, end, points[:, 1:])
        outside = points[(np.isfinite(crossings) & (crossings > points[:, :1])).sum(axis=1) % 2 == 0]
        if len(outside) and np.any(_distance_to_edges(start, end, outside) > EDGE_TOLERANCE):
            return False
    return True


ENCLOSE_BLOCK = 256
"""Vertices tested against a contour at once: (block, its points) arrays of a few MB for 10 000-point contours."""


def _area(polygon: np.ndarray) -> float:
    """The area a closed polygon (N, 2) encloses (shoelace)."""
    x, y = polygon.T
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


def _distance_to_edges(start: np.ndarray, end: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance from each point (M, 2) to the nearest edge start -> end (N, 2 each), in the points' units."""
    edge = end - start
    length = np.maximum((edge ** 2).sum(axis=1), 1e-12)
    along = np.clip(((points[:, None] - start[None]) * edge[None]).sum(axis=2) / length, 0, 1)     # (M, N)
    nearest = start[None] + along[..., None] * edge[None]
    return np.sqrt(((points[:, None] - nearest) ** 2).sum(axis=2)).min(axis=1)


def _fill(polygon: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(interior, boundary) masks (rows, columns) of a closed polygon (N, 2) of continuous (x, y) indices:
    the voxel centres inside it by the even-odd rule, endpoints of each row's spans included within
    EDGE_TOLERANCE; and those within EDGE_TOLERANCE of an edge."""
    start, end = polygon, np.roll(polygon, -1, axis=0)
    rows = np.arange(max(int(np.ceil(polygon[:, 1].min() - EDGE_TOLERANCE)), 0),
                     min(int(np.floor(polygon[:, 1].max() + EDGE_TOLERANCE)) + 1, shape[0]))
    x = _crossings(start, end, rows[:, None].astype(float))
    x.sort(axis=1)
    first, last = x[:, 0::2], x[:, 1::2]                              # each row's spans: crossings in pairs
    row, pair = np.nonzero(np.isfinite(last))
    left = np.clip(np.ceil(first[row, pair] - EDGE_TOLERANCE), 0, shape[1]).astype(int)
    right = np.clip(np.floor(last[row, pair] + EDGE_TOLERANCE) + 1, 0, shape[1]).astype(int)
    keep = right > left
    runs = np.zeros((shape[0], shape[1] + 1), np.int32)
    np.add.at(runs, (rows[row[keep]], left[keep]), 1)
    np.add.at(runs, (rows[row[keep]], right[keep]), -1)
    interior = np.cumsum(runs, axis=1)[:, :-1] > 0
    boundary = np.zeros(shape, bool)
    points = _lattice_points_on(start, end)
    inside = np.all((points >= 0) & (points < shape[::-1]), axis=1)
    boundary[points[inside, 1], points[inside, 0]] = True
    return interior, boundary


def _crossings(start: np.ndarray, end: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(M, N): the x at which each edge start -> end (N, 2 each) crosses each row y (M, 1), half-open in y so
    that a vertex counts once; inf where the edge does not cross the row."""
    crosses = (start[:, 1] <= y) != (end[:, 1] <= y)
    dy = np.where(crosses, end[:, 1] - start[:, 1], 1.0)
    return np.where(crosses, start[:, 0] + (y - start[:, 1]) * (end[:, 0] - start[:, 0]) / dy, np.inf)


def _lattice_points_on(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Integer (x, y) points within EDGE_TOLERANCE of the edges start -> end (N, 2 each): along each edge's
    longer axis, the whole steps whose other coordinate is within the tolerance of a whole number."""
    delta = end - start
    major = (np.abs(delta[:, 1]) > np.abs(delta[:, 0])).astype(int)          # 0: x, 1: y
    edges = np.arange(len(start))
    a0, a1 = start[edges, major], end[edges, major]
    low = np.ceil(np.minimum(a0, a1) - EDGE_TOLERANCE).astype(int)
    count = np.maximum(np.floor(np.maximum(a0, a1) + EDGE_TOLERANCE).astype(int) - low + 1, 0)
    edge = np.repeat(edges, count)
    along = np.repeat(low, count) + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
    span = np.where(a1 == a0, 1.0, a1 - a0)[edge]
    fraction = np.where(a1[edge] == a0[edge], 0.0, (along - a0[edge]) / span)
    other = start[edge, 1 - major[edge]] + fraction * delta[edge, 1 - major[edge]]
    on = np.abs(other - np.rint(other)) <= EDGE_TOLERANCE
    points = np.empty((on.sum(), 2), int)
    points[np.arange(on.sum()), major[edge][on]] = along[on]
    points[np.arange(on.sum()), 1 - major[edge][on]] = np.rint(other[on]).astype(int)
    return points
