"""`stnerp report`: one self-contained HTML page of a run (figures inlined as PNG), the same
figures as PNG files beside it, and the numbers behind the structure curves as CSV.

Memory stays bounded: the slice figures read one map of a time point at a time and keep three
slices of it; the per-structure statistics read one labelmap and one det J volume at a time; the
curves over time are computed on the model's coarse velocity grid and a subsample of each
structure's reference voxels.

Structure volume at any time t is computed from the model's maps, not from a labelmap at t:
V_t(S) = integral over the reference structure of det(grad phi_t^-1) (change of variables), with
det(grad phi_t^-1)(r) = 1 / det(grad phi_t)(phi_t^-1(r)): the inverse point from the same
fixed-point inverse as inverse_displacement.nrrd (each point started from exp(-v), not from the inverse on
every 4th voxel of the grid: the same to the inverse's tolerance), det J of the forward map there by central
differences of half a voxel, summed over (a subsample of) the structure's reference voxels.
Counting voxels of the propagated labelmap at t instead errs by whole boundary voxels.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from . import report_figures as figures
from .contract import intensity_calibrations, is_complete, numbering, time_point_folder
from .dicom_in import named_structures, series_files
from .errors import InputError
from .record import load_record
from .integration import identity_grid, sample
from .io import read_image
from .model import SeriesModel
from .preprocessing import CALIBRATION_TOLERANCE_HU, CT_WINDOW
from .presets import CHARBONNIER_EPSILON
from .sampling import BODY_LEVEL, BODY_MARGIN_MM, STRUCTURE_BAND_MM
from .warping import _to_index, invert, sparse_inverse_map

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

FOCUS = re.compile(r"tumou?r|gtv|ctv|itv|ptv|target|lesion|nodule", re.IGNORECASE)
HISTOGRAM_EDGES = np.linspace(0.0, 2.5, 101)
PLANE_AXES = (2, 1, 0)      # the slices figure's rows: axial, coronal, sagittal (index axes z, y, x)
CURVE_POINTS = 20000        # at most this many reference voxels per structure for the curves
JACOBIAN_CAPTION = (
    "det J is the Jacobian determinant of the map p -> p + u_t(p) that takes a point p of the "
    "time-t image to its matching reference point, shown on the time-t grid: det J = (volume the "
    "tissue occupies in the reference) / (volume it occupies at time t). det J > 1 (red): the "
    "tissue occupies less volume at t than in the reference (compressed or shrunk by t); det J < 1 "
    "(blue): it occupies more (expanded by t); det J <= 0: folded, not physical.")


class Names(dict):
    """Structure name per label; 'label N' for a label without one."""

    def __missing__(self, label: int) -> str:
        return f"label {label}"


@dataclass
class Figure:
    """A figure of the report: its PNG file name in report/, title, caption and PNG bytes (also inlined in the page)."""
    file: str
    title: str
    caption: str
    png: bytes


@dataclass
class Structure:
    """Statistics of one structure in one time point's propagated labelmap and det J map."""

    voxels: int
    volume_ml: float
    centroid_index: np.ndarray          # continuous (x, y, z)
    histogram: np.ndarray
    mean: float
    minimum: float
    maximum: float
    folded: int


@dataclass
class Curves:
    """Per structure against time, from the model: volume (mL), centroid (LPS mm), max |u| (mm) and
    mean det J of the map time t -> reference over the structure at t (= V_ref / V_t)."""

    times: np.ndarray
    volume: dict[int, np.ndarray] = field(default_factory=dict)
    centroid: dict[int, np.ndarray] = field(default_factory=dict)
    max_motion: dict[int, np.ndarray] = field(default_factory=dict)
    mean_jacobian: dict[int, np.ndarray] = field(default_factory=dict)


def write_report(run: Path, curve_times: int = 50, label_names: str | None = None) -> Path:
    """Write run/report/index.html (self-contained), its PNGs and CSVs; returns the HTML path."""
    run = Path(run)
    record = load_record(run)
    if not record.get("time_points"):
        raise InputError(f"run {run} has no time points yet: report on a run that wrote outputs")
    if curve_times < 2:
        raise InputError("--curve-times must be at least 2")
    folder = run / "report"
    folder.mkdir(exist_ok=True)
    names = structure_names(record, run, label_names)
    model = _continuous_model(run, record)
    written: list[Figure] = []                   # in page order: over time first, then per time point
    statistics = {entry["time"]: structures_at(run, entry) for entry in record["time_points"]}
    curves = None
    if model is not None and model.labelmap is not None:
        times = sorted({*np.linspace(*_time_span(record, model), curve_times).tolist(),
                        *(e["time"] for e in record["time_points"])})
        curves = structure_curves(model, np.asarray(times))
        written += curve_figures(curves, statistics, record, names)
    if (run / (record.get("losses") or "losses.csv")).is_file():
        written.append(_loss_figure(run / (record.get("losses") or "losses.csv")))
    for entry in record["time_points"]:
        written += time_point_figures(run, record, entry, statistics[entry["time"]], names, model)
    for figure in written:
        (folder / figure.file).write_bytes(figure.png)
    write_statistics_csv(statistics, names, folder / "jacobian_by_structure.csv")
    if curves is not None:
        write_curves_csv(curves, names, folder / "structures_over_time.csv")
    page = folder / "index.html"
    page.write_text(render_html(run, record, written, statistics, names, curves is not None))
    return page


def structure_names(record: dict, run: Path, label_names: str | None) -> Names:
    """Names from a JSON file {"1": "GTV", ...} (argument, else the run's input), else from the
    segmentation's own: an RT Structure Set's ROI Names, a DICOM SEG's Segment Labels, a Slicer .seg.nrrd's
    segment metadata; else 'label N'."""
    names = Names()
    inputs = record.get("inputs", {})
    source = label_names or inputs.get("label_names")
    if source:
        path = Path(source)
        try:
            names.update({int(k): str(v) for k, v in json.loads(path.read_text(encoding="utf-8-sig")).items()})
        except (OSError, ValueError, AttributeError):
            raise InputError(f"label names {path} is not a JSON object of label number -> name, "
                             'e.g. {"1": "GTV"}: fix or drop it') from None
        return names
    segmentation = inputs.get("segmentation")
    if segmentation and Path(segmentation).is_file():
        names.update(named_structures(segmentation) or {})
    return names


def _continuous_model(run: Path, record: dict) -> SeriesModel | None:
    """The run's continuous-time model, if it saved one (not pairwise, not short-range)."""
    if not is_complete(record) or not record.get("model"):
        return None
    model = SeriesModel.load(run / record["model"], torch.device("cpu"))
    return model if model.deformation.pairwise_times is None else None


def _time_span(record: dict, model: SeriesModel) -> tuple[float, float]:
    times = [e["time"] for e in record["time_points"]] + list(model.time_range)
    return min(times), max(times)


def structure_voxels(labels: np.ndarray) -> Iterator[tuple[int, tuple[np.ndarray, ...]]]:
    """Each label > 0 of `labels` [z, y, x] and its voxels' (z, y, x) indices in the grid's order, each looked for
    within its bounding box (one pass over the grid for all; a whole-grid pass per label was 0.4 s at 512 x 512 x
    300)."""
    for label, box in enumerate(ndimage.find_objects(labels), 1):
        if box is not None:
            inside = np.nonzero(labels[box] == label)
            yield label, tuple(i + b.start for i, b in zip(inside, box))


def structures_at(run: Path, entry: dict) -> dict[int, Structure]:
    """Per label of the time point's propagated labelmap: size, centroid and det J statistics."""
    if not entry.get("labelmap"):
        return {}
    labelmap = sitk.ReadImage(str(run / entry["labelmap"]))
    labels = sitk.GetArrayFromImage(labelmap)
    jacobian = sitk.GetArrayFromImage(sitk.ReadImage(str(run / entry["jacobian"])))
    voxel_ml = abs(np.linalg.det(np.reshape(labelmap.GetDirection(), (3, 3)) @ np.diag(labelmap.GetSpacing()))) / 1000
    found = {}
    for label, where in structure_voxels(labels):
        values = jacobian[where].astype(np.float64)
        found[label] = Structure(
            len(values), len(values) * voxel_ml, np.array([w.mean() for w in where[::-1]]),
            np.histogram(np.clip(values, HISTOGRAM_EDGES[0], HISTOGRAM_EDGES[-1]), HISTOGRAM_EDGES)[0],
            float(values.mean()), float(values.min()), float(values.max()), int(np.count_nonzero(values <= 0)))
    return found


def focus_label(structures: Mapping[int, object], names: Names) -> int | None:
    """The tumour: a structure named like one (tumour, GTV, CTV, ...), else the lowest label."""
    if not structures:
        return None
    named = [label for label in sorted(structures) if label in names and FOCUS.search(names[label])]
    return (named or sorted(structures))[0]


def time_point_figures(run: Path, record: dict, entry: dict, structures: dict[int, Structure], names: Names,
                       model: SeriesModel | None) -> list[Figure]:
    """Slices through the focus point (det J, |u|, contours over the scan) and det J histograms."""
    t = entry["time"]
    reader = _information(run / entry["jacobian"])
    label = focus_label(structures, names)
    if label is not None:
        focus, where = np.rint(structures[label].centroid_index).astype(int), f"the centroid of {names[label]}"
    elif model is not None:
        focus, where = _largest_motion_index(model, t, entry, reader), "the largest |u|"
    else:
        focus, where = np.asarray(reader.GetSize()) // 2, "the image centre"
    scan = _scan_path(record, t)
    image_kind = "scan" if scan is not None else "predicted image"
    whole = scan is not None and series_files(scan, "scan") is not None       # a DICOM series, read whole
    series = sitk.GetArrayFromImage(read_image(cast(Path, scan), "scan")) if whole else None
    planes = _planes(run, entry, reader, focus, scan, series)
    title = f"time {t:g}" + ("" if entry.get("scanned") else " (not scanned: predicted)")
    folded = entry["metrics"]["folded_voxels"]
    caption = (f"Slices through {where} at time {t:g}. {JACOBIAN_CAPTION} |u|: length of the displacement "
               f"to the reference point (mm). Right: the propagated structures over the {image_kind} at "
               f"time {t:g}. Voxels with det J <= 0 (folded): {folded}.")
    name = time_point_folder(t)
    result = [Figure(f"{name}_slices.png", f"Time {t:g}: deformation and contours", caption,
                     figures.time_point_slices(planes, names, title, image_kind))]
    if structures:
        result.append(Figure(
            f"{name}_jacobian_histogram.png", f"Time {t:g}: det J per structure",
            "Distribution of det J over each propagated structure's voxels at this time (values "
            f"clipped to {HISTOGRAM_EDGES[0]:g}..{HISTOGRAM_EDGES[-1]:g}); 1 means no volume change.",
            figures.jacobian_histograms({k: s.histogram for k, s in structures.items()}, HISTOGRAM_EDGES,
                                        names, f"det J per structure, time {t:g}")))
    return result


def _information(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def _planes(run: Path, entry: dict, reader: sitk.ImageFileReader, focus: np.ndarray, scan: Path | None,
            series: np.ndarray | None) -> list[figures.Plane]:
    """The planes through `focus` (index x, y, z) along each of PLANE_AXES of every map of the time
    point and of the scan (a file, or `series`: a DICOM series read whole), each file read once."""
    jacobian = _slices(run / entry["jacobian"], focus)
    magnitude = [np.linalg.norm(s, axis=-1) for s in _slices(run / entry["displacement"], focus)]
    if scan is None:
        image = _slices(run / entry["image"], focus)
    else:
        image = _through(series, focus) if series is not None else _slices(scan, focus)
    labels = _slices(run / entry["labelmap"], focus) if entry.get("labelmap") else [None] * len(PLANE_AXES)
    return [_plane(reader, axis, *maps) for axis, *maps in zip(PLANE_AXES, jacobian, magnitude, image, labels)]


def _slices(path: Path, focus: np.ndarray) -> list[np.ndarray]:
    """The slices of an image file through `focus` along each of PLANE_AXES. The file is read whole
    once: ITK's NRRD reader reads a whole file even for one slice."""
    image = sitk.ReadImage(str(path))
    return _through(sitk.GetArrayViewFromImage(image), focus)


def _through(array: np.ndarray, focus: np.ndarray) -> list[np.ndarray]:
    """Copies of the slices of `array` [z, y, x(, c)] through `focus` (x, y, z; clipped to the array)
    along each of PLANE_AXES, each [rows, columns(, c)]."""
    return [np.take(array, int(np.clip(focus[axis], 0, array.shape[2 - axis] - 1)), axis=2 - axis)
            for axis in PLANE_AXES]


def _plane(reader: sitk.ImageFileReader, axis: int, jacobian: np.ndarray, magnitude: np.ndarray,
           image: np.ndarray, labels: np.ndarray | None) -> figures.Plane:
    """One plane along `axis` of the time-t grid `reader` describes: its extent in mm and axis names."""
    size, spacing = reader.GetSize(), reader.GetSpacing()
    direction = np.reshape(reader.GetDirection(), (3, 3))
    across, up = [a for a in (0, 1, 2) if a != axis]              # columns, rows
    width, height = size[across] * spacing[across], size[up] * spacing[up]
    origin = "upper" if up == 1 else "lower"                      # anterior / superior at the top
    extent = (0.0, width, height, 0.0) if origin == "upper" else (0.0, width, 0.0, height)
    return figures.Plane(
        ("sagittal", "coronal", "axial")[axis], jacobian, magnitude, image, labels, extent,
        f"{_axis_name(direction[:, across])} (mm)", f"{_axis_name(direction[:, up])} (mm)", origin)


def _axis_name(column: np.ndarray) -> str:
    """Which LPS direction an image axis points to, e.g. 'x -> L' (its largest component)."""
    k = int(np.argmax(np.abs(column)))
    return f"{'xyz'[k]} -> {('LR', 'PA', 'SI')[k][0 if column[k] > 0 else 1]}"


def _scan_path(record: dict, t: float) -> Path | None:
    """The input scan at time t, if the run was trained on it and it is still there."""
    inputs = record.get("inputs", {})
    paths = {}
    if inputs.get("reference"):
        paths[float(inputs.get("reference_time") or 0.0)] = inputs["reference"]
    paths.update({float(time): path for path, time in inputs.get("follow_ups", [])})
    path = Path(paths[t]) if t in paths else None
    return path if path is not None and path.exists() else None


def _largest_motion_index(model: SeriesModel, t: float, entry: dict, reader: sitk.ImageFileReader) -> np.ndarray:
    """Index (x, y, z) on the time-t grid of the displacement-grid node that moves most."""
    displacement = model.displacement_grid(t)[0].reshape(3, -1).T
    nodes = identity_grid(model.deformation.displacement_shape).reshape(-1, 3)
    reference = model.grid.to_physical(_to_index(model.grid, nodes))
    moved = model.grid.to_physical(_to_index(model.grid, nodes + displacement))
    point = reference[int(np.argmax(np.linalg.norm(moved - reference, axis=1)))]
    if entry.get("prealignment"):
        affine = np.asarray(entry["prealignment"])
        point = affine[:3, :3] @ point + affine[:3, 3]
    origin, spacing = np.asarray(reader.GetOrigin()), np.asarray(reader.GetSpacing())
    index = np.linalg.solve(np.reshape(reader.GetDirection(), (3, 3)) @ np.diag(spacing), point - origin)
    return np.clip(np.rint(index), 0, np.asarray(reader.GetSize()) - 1).astype(int)


def structure_curves(model: SeriesModel, times: np.ndarray) -> Curves:
    """Each reference structure followed through time by the model's inverse map (see module doc).

    Centroids are in the reference grid's frame (any affine pre-alignment is left out)."""
    grid = model.grid
    voxel_ml = abs(np.linalg.det(grid.index_to_mm)) / 1000
    step = 1.0 / grid.unit_scale()                                   # half a voxel, unit coordinates
    labelmap = cast(np.ndarray, model.labelmap)
    points, counts = {}, {}
    for label, where in structure_voxels(labelmap):
        counts[label] = len(where[0])
        every = int(np.ceil(counts[label] / CURVE_POINTS))
        index = np.stack([w[::every] for w in where[::-1]], axis=1).astype(float)         # x, y, z
        points[label] = torch.as_tensor(index / grid.unit_scale() * 2 - 1, dtype=torch.float32)[None]
    curves = Curves(times)
    rows: dict[int, list] = {label: [] for label in points}
    for t in times:
        inverse_t = sparse_inverse_map(model, float(t))  # at most CURVE_POINTS a structure
        with torch.no_grad():
            for label, c in points.items():
                moved = c + invert(*inverse_t, c)
                d = 1.0 / _determinant(inverse_t.forward, moved, step)      # det grad phi^-1 at c
                at_t = grid.to_physical(_to_index(grid, moved[0]))
                motion = np.linalg.norm(at_t - grid.to_physical(_to_index(grid, c[0])), axis=1)
                rows[label].append((counts[label] * voxel_ml * d.mean(), (at_t * d[:, None]).sum(0) / d.sum(),
                                    motion.max(), 1.0 / d.mean()))
    for label, values in rows.items():
        curves.volume[label] = np.array([v[0] for v in values])
        curves.centroid[label] = np.array([v[1] for v in values])
        curves.max_motion[label] = np.array([v[2] for v in values])
        curves.mean_jacobian[label] = np.array([v[3] for v in values])
    return curves


def _determinant(displacement: torch.Tensor, c: torch.Tensor, step: np.ndarray) -> np.ndarray:
    """det(I + grad u) of the map c -> c + u(c) at unit points c [1, N, 3], by central differences
    of `step` (unit coordinates per axis x, y, z); the same in mm, as unit -> mm is affine."""
    columns = []
    for axis in range(3):
        offset = torch.zeros(3, dtype=c.dtype)
        offset[axis] = float(step[axis])
        columns.append((sample(displacement, c + offset) - sample(displacement, c - offset)) / (2 * offset[axis]))
    gradient = torch.stack(columns, dim=-1)[0].double().numpy()        # [N, component, axis]
    return np.linalg.det(gradient + np.eye(3))


def curve_figures(curves: Curves, statistics: dict[float, dict[int, Structure]], record: dict,
                  names: Names) -> list[Figure]:
    """The figures over time from the model: every structure's volume (mL), the focus structure's centroid trajectory
    (LPS mm, from its reference-time position), and per structure the largest displacement (mm) and mean det J."""
    scanned_times = [e["time"] for e in record["time_points"] if e.get("scanned")]
    written = {label: [(t, s[label].volume_ml) for t, s in statistics.items() if label in s]
               for label in curves.volume}
    focus = cast(int, focus_label({k: None for k in curves.centroid}, names))
    reference_index = int(np.argmin(np.abs(curves.times - float(record.get("reference_time") or 0.0))))
    shift = curves.centroid[focus] - curves.centroid[focus][reference_index]
    return [
        Figure("volumes.png", "Structure volume over time",
               f"Each structure's volume at {len(curves.times)} times, from the model: the reference "
               "structure's volume carried to time t by the inverse map (integral of its det J over the "
               "reference structure). Circles: volume of the propagated labelmap at the written time "
               "points (its voxels at t, pre-alignment included).",
               figures.volumes_over_time(curves.times, curves.volume, written, reference_index, names)),
        Figure("centroid.png", f"{names[focus]}: centroid trajectory",
               "Centroid of the structure at time t (weighted by its volume), minus its position at the "
               "reference time, in mm along the LPS axes of the reference image (in the reference "
               "grid's frame: an affine pre-alignment, if any, is left out).",
               figures.centroid_trajectory(curves.times, shift, scanned_times, names[focus])),
        Figure("motion_and_jacobian.png", "Motion and volume change per structure over time",
               "Left: largest displacement of the structure's points between the reference and t (mm). "
               "Right: mean det J of the map time t -> reference over the structure at t, which is "
               "(reference volume) / (volume at t): above 1 the structure is smaller at t.",
               figures.motion_and_jacobian(curves.times, curves.max_motion, curves.mean_jacobian,
                                           scanned_times, names)),
    ]


def _loss_figure(path: Path) -> Figure:
    losses: dict[str, tuple[list, list]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            iterations, values = losses.setdefault(row["stage"], ([], []))
            iterations.append(int(row["iteration"]))
            values.append(float(row["loss"]))
    return Figure("losses.png", "Training loss",
                  "Loss per iteration of each training stage: mean squared error of intensities "
                  "normalised to [0, 1], over the voxels sampled in that iteration.",
                  figures.loss_curves({k: (np.array(i), np.array(v)) for k, (i, v) in losses.items()}))


def write_statistics_csv(statistics: dict[float, dict[int, Structure]], names: Names, path: Path) -> None:
    """Write jacobian_by_structure.csv: per time point and label, the propagated structure's voxels, volume (mL), det J
    mean, minimum and maximum, and folded voxels."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["time", "label", "name", "voxels", "volume_ml", "jacobian_mean", "jacobian_min",
                         "jacobian_max", "folded_voxels"])
        for t, structures in statistics.items():
            for label, s in structures.items():
                writer.writerow([t, label, names[label], s.voxels, s.volume_ml, s.mean, s.minimum, s.maximum,
                                 s.folded])


def write_curves_csv(curves: Curves, names: Names, path: Path) -> None:
    """Write structures_over_time.csv: per label and curve time, the model's volume (mL), centroid (LPS mm), largest
    displacement (mm) and mean det J."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["time", "label", "name", "volume_ml", "centroid_l", "centroid_p", "centroid_s",
                         "max_displacement_mm", "mean_jacobian"])
        for label in curves.volume:
            for k, t in enumerate(curves.times):
                writer.writerow([float(t), label, names[label], curves.volume[label][k],
                                 *curves.centroid[label][k], curves.max_motion[label][k],
                                 curves.mean_jacobian[label][k]])


def render_html(run: Path, record: dict, written: list[Figure], statistics: dict, names: Names,
                has_curves: bool) -> str:
    """The page: summary, the fit (trained runs), metrics table, figures with captions, inputs, parameters,
    versions."""
    e = html.escape
    seed = record.get("parameters", {}).get("seed")
    parts = [f"<h1>STNeRP run report</h1><p>{e(str(run.resolve()))} &mdash; {e(record['command'])}, "
             f"status <b>{e(record['status'])}</b>, started {e(str(record.get('started')))}, "
             f"{'seed ' + e(str(seed)) if seed is not None else 'seed not recorded'}</p>",
             *_fit_section(record), "<h2>Metrics</h2>", _metrics_table(record, names)]
    if not has_curves:
        parts.append("<p>No curves over time: the run has no saved continuous-time model with a "
                     "segmentation (pairwise, short-range, prediction run, or no segmentation).</p>")
    for figure in written:
        data = base64.b64encode(figure.png).decode("ascii")
        parts.append(f"<figure><h3>{e(figure.title)}</h3><img alt=\"{e(figure.title)}\" "
                     f"src=\"data:image/png;base64,{data}\"><figcaption>{e(figure.caption)}</figcaption></figure>")
    parts += ["<h2>Inputs</h2>", _table(record.get("inputs", {})),
              "<h2>Parameters</h2>", _table(_flat(record.get("parameters", {}))),
              "<h2>Versions</h2>", _table(record.get("versions", {}))]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em;color:#222}"
             "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px}"
             "img{max-width:100%}figcaption{font-size:90%;color:#444;max-width:60em}")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>STNeRP report: "
            f"{e(run.name)}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def _fit_section(record: dict) -> list[str]:
    """What training did, where run.json says (a trained run; per pair in the short-range scheme):
    Def-Net's iterations run and, with velocity levels, how many were kept and each adaptive trial's loss
    ratio with / without its level, with the decision the run took (from velocity_levels_kept: a record
    outlives a change of the bar)."""
    preset = record.get("parameters", {}).get("preset", {})
    if "defnet_iterations" in record:
        rows = _fit_rows(record, preset, "")
    else:
        rows = [row for entry in record["time_points"] if "defnet_iterations" in entry
                for row in _fit_rows(entry, preset, f"pair {entry['reference_time']:g} → {entry['time']:g}: ")]
    window = record.get("intensity_window")
    if window and "calibrate_intensities" in preset:
        rows.insert(0, ["follow-ups' CT numbers", _ct_numbers(preset["calibrate_intensities"], window)])
    if window:
        rows.insert(0, ["intensities mapped to [0, 1]", _intensities(window)])
    return ["<h2>Fit</h2>", _grid(["", ""], rows)] if rows else []


def _intensities(window: list[float]) -> str:
    """The run's intensity window (run.json's intensity_window) in words: the CT window, or the reference's
    percentiles (preprocessing.intensity_method)."""
    if tuple(window) == CT_WINDOW:
        return f"the CT window, {CT_WINDOW[0]:g} to {CT_WINDOW[1]:g} HU"
    return f"the reference's 0.5th to 99.5th percentiles, {window[0]:g} to {window[1]:g} (scans not in HU)"


def _ct_numbers(calibrate: bool, window: list[float]) -> str:
    """How the fit took the follow-ups' CT numbers (Preset.calibrate_intensities; pipeline._calibrations)."""
    if not calibrate:
        return "as scanned (not calibrated)"
    if tuple(window) != CT_WINDOW:
        return "as scanned (not in HU: no calibration)"
    return (f"calibrated onto the reference's where they differ by more than {CALIBRATION_TOLERANCE_HU:g} HU (a "
            "CBCT's scale, offset and smooth bias), else as scanned")


def _fit_rows(facts: dict, preset: dict, prefix: str) -> list[list[str]]:
    """The Fit table's rows for one fit's facts (pipeline._fit_facts) and preset, each name after `prefix`."""
    kept = facts.get("velocity_levels_kept", 1)
    rows = [[prefix + "Def-Net iterations run", f"{facts['defnet_iterations']} of {preset.get('def_iterations', '?')}"],
            [prefix + "velocity levels kept", f"{kept} of {preset.get('velocity_levels', 1)}"],
            [prefix + "Def-Net's loss", SIMILARITY_NAMES.get(preset.get("similarity", "mse"), "?")],
            [prefix + "voxels drawn", _voxels_drawn(preset.get("structure_points", 0.0),
                                                    preset.get("body_mask", False))],
            [prefix + "scans as fitted", _scans_fitted(preset.get("smoothing_sigma", 0.0))],
            [prefix + "Def-Net's final weights", _final_weights(preset.get("average_last", 0.0))]]
    if facts.get("def_time_sigma") is not None:
        rows.append([prefix + "Def-Net's time scale (Fourier σ of time)",
                     _time_scale(facts["def_time_sigma"], preset)])
    bar = facts.get("velocity_level_keep_below")
    for level, ratio in enumerate(facts.get("velocity_level_ratios") or [], 2):
        if ratio is not None:
            decision = "kept" if kept >= level else "dropped"
            rule = "" if bar is None else f": kept below {bar:.2f}"
            rows.append([prefix + f"velocity level {level}: loss with it / without it at its trial",
                         f"{ratio:.3f} ({decision}{rule})"])
    return rows


SIMILARITY_NAMES = {"mse": "mean squared intensity error",
                    "charbonnier": f"Charbonnier penalty (the squared error below {CHARBONNIER_EPSILON:g} of the "
                                   "intensity window, the absolute error above)",
                    "lncc": "local normalised cross-correlation"}
"""Def-Net's loss (Preset.similarity, one of contract.SIMILARITIES) in words."""


def _voxels_drawn(structure_points: float, body_mask: bool) -> str:
    """Where Def-Net's voxels were drawn (Preset.structure_points, Preset.body_mask; a record from before them:
    uniformly over the grid)."""
    uniformly = (f"uniformly within {BODY_MARGIN_MM:g} mm of the body (voxels above {BODY_LEVEL:.1%} of the intensity "
                 "window: -900 HU in CT)" if body_mask else "uniformly over the grid")
    if structure_points <= 0:
        return uniformly
    return (f"{structure_points:.0%} about the segmentation's structures ({STRUCTURE_BAND_MM:g} mm either side of "
            f"each boundary), the rest {uniformly}")


def _scans_fitted(smoothing_sigma: float) -> str:
    """What the fit saw of the scans (Preset.smoothing_sigma; a record from before it: the scans as given)."""
    if smoothing_sigma <= 0:
        return "as scanned"
    return f"smoothed by a Gaussian of {smoothing_sigma:g} voxel along each axis (the outputs resample them as scanned)"


def _time_scale(fitted: float, preset: dict) -> str:
    """Def-Net's Fourier scale of time as fitted (time normalised to [0, 1] over the scanned range), and whether the
    series was short enough to halve the preset's (Preset.for_scans)."""
    if fitted >= preset.get("def_time_sigma", fitted):
        return f"{fitted:g}"
    return (f"{fitted:g}, half the preset's {preset['def_time_sigma']:g}: a series of fewer than "
            f"{preset['time_sigma_halved_below']} scans")


def _final_weights(average_last: float) -> str:
    """How the fit chose Def-Net's final weights (Preset.average_last; a record from before it: the last)."""
    if average_last <= 0:
        return "the last iteration's"
    return f"the mean over its last {average_last:.0%} of iterations (tail averaging)"


def _metrics_table(record: dict, names: Names) -> str:
    """One row per time point; with a segmentation, the structures its propagated labelmap lost (labels_lost; a
    record from before it has no such column); with a scan covering part of the grid, the share each covers; with a
    follow-up whose CT numbers the fit calibrated, how."""
    labels = sorted({int(k) for p in record["time_points"] for k in p["metrics"].get("dice", {})})
    lost = any("labels_lost" in p for p in record["time_points"])
    partial = any("field_of_view" in p for p in record["time_points"])
    calibrations = intensity_calibrations(record)
    head = ["time", "scanned"] + (["field of view (of the grid)"] if partial else []) + (
        ["CT numbers fitted as (HU)"] if calibrations else []) + [
        "folded voxels", "det J min", "det J max", "PSNR (dB)", "SSIM", "TRE mean (mm)",
        "TRE max (mm)"] + [f"Dice {names[k]}" for k in labels] + (["structures lost"] if lost else [])
    rows = []
    for p in record["time_points"]:
        m = p["metrics"]
        covered = [] if not partial else [f"{p['field_of_view']:.0%}" if "field_of_view" in p else
                                          "all" if p.get("scanned") else ""]
        numbers = [numbering(calibrations.get(p["time"]), p.get("scanned"))] if calibrations else []
        values = [p["time"], "yes" if p.get("scanned") else "no (predicted)", *covered, *numbers,
                  m.get("folded_voxels"), m.get("jacobian_min"), m.get("jacobian_max"), m.get("psnr"), m.get("ssim"),
                  m.get("tre_mean"), m.get("tre_max")] + [m.get("dice", {}).get(str(k)) for k in labels]
        if lost:
            values.append(", ".join(names[k] for k in p.get("labels_lost", [])) or "none")
        rows.append(values)
    return _grid(head, rows)


def _grid(head: list[str], rows: list[list]) -> str:
    cell = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else html.escape(str(v)))  # noqa: E731
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + f"</tr>{body}</table>")


def _table(values: dict) -> str:
    return _grid(["name", "value"], [[k, json.dumps(v) if isinstance(v, (list, dict)) else v]
                                     for k, v in values.items()])


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
