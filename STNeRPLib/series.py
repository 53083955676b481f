"""A series as the engine takes it: read and checked inputs (reference, follow-ups with their
times, segmentation, landmarks, ground truth). Every problem is an InputError of one line."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from .dicom_in import labels_by_name, require_drawn_on
from .errors import InputError
from .geometry import Grid
from .io import check_landmarks_inside, held_bytes, image_information, read_image, read_labelmap, read_landmarks
from .priors import table_bytes
from .warping import SLAB_VOXELS

if TYPE_CHECKING:
    from collections.abc import Sequence


@dataclass
class Series:
    """A checked series: reference and follow-ups (time, image), optional segmentation and ground truth."""

    reference: sitk.Image
    reference_time: float
    follow_ups: list[tuple[float, sitk.Image]]
    segmentation: sitk.Image | None = None
    landmarks: dict[float, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    ground_truth: dict[float, sitk.Image] = field(default_factory=dict)

    @property
    def images(self) -> list[tuple[float, sitk.Image]]:
        """Every scanned (time, image), the reference first."""
        return [(self.reference_time, self.reference)] + self.follow_ups


def load_series(reference: str, reference_time: float, follow_ups: list[tuple[str, float]],
                segmentation: str | None = None, landmarks: str | None = None,
                ground_truth: Sequence[tuple[str, float]] = ()) -> Series:
    """Read and check every input; raises InputError with a one-line message on bad input.
    Follow-ups are kept in time order, whatever order they were given in."""
    if not follow_ups:
        raise InputError("only one time point was given: give at least one follow-up image with "
                         "its time (--follow-up PATH TIME)")
    times = [reference_time] + [t for _, t in follow_ups]
    _check_times(times)
    if ground_truth and not segmentation:
        raise InputError("--ground-truth needs --segmentation: Dice compares the propagated reference "
                         "segmentation with it; give the reference labelmap too")
    series = Series(read_image(reference, "reference image"), reference_time,
                    [(t, read_image(p, f"follow-up image at time {t:g}"))
                     for p, t in sorted(follow_ups, key=lambda f: f[1])])
    scanned = dict(series.images)
    image_paths = {reference_time: reference, **{t: p for p, t in follow_ups}}
    if segmentation:
        require_drawn_on(segmentation, reference, "segmentation")
        series.segmentation = read_labelmap(segmentation, Grid.of(series.reference), "segmentation")
    if landmarks:
        series.landmarks = read_landmarks(landmarks)
        unknown = sorted(set(series.landmarks) - set(scanned))
        if unknown:
            raise InputError(f"landmarks are given at time {unknown[0]:g}, which is not a scanned time: "
                             "use the times of the images")
        for t, (points, reference_points) in series.landmarks.items():
            check_landmarks_inside(points, Grid.of(scanned[t]), f"landmark at time {t:g}", f"the time-{t:g} image")
            check_landmarks_inside(reference_points, Grid.of(series.reference), f"landmark at time {t:g}",
                                   "the reference image (ref_x, ref_y, ref_z)")
    for path, t in ground_truth:
        if t not in scanned:
            raise InputError(f"ground-truth labelmap {path} is at time {t:g}, which is not a scanned "
                             "time: use the time of its image")
        what = f"ground-truth labelmap at time {t:g}"
        require_drawn_on(path, image_paths[t], what)
        series.ground_truth[t] = read_labelmap(path, Grid.of(scanned[t]), what, labels_by_name(path, segmentation))
    return series


def _check_times(times: list[float]) -> None:
    """Every time finite, and no two times writing into one output folder."""
    if not all(math.isfinite(t) for t in times):
        raise InputError("a time value is not a finite number: give each image a number (phase or days)")
    if not math.isfinite(max(times) - min(times)):
        raise InputError(f"the times span {min(times):g} to {max(times):g}, too wide to compute with: "
                         "give times in smaller units")
    if len(set(times)) != len(times):
        duplicate = next(t for t in times if times.count(t) > 1)
        raise InputError(f"time {duplicate:g} is given to more than one image: give every image its "
                         "own time")


BASE_BYTES = 750e6
"""Python, torch, SimpleITK, numba's kernels and the networks, before any image: every import of the worker measured
0.53 GB of resident memory in a freshly made venv (torch 0.27, SimpleITK and scipy 0.11, numba 0.11), 0.39 GB in an
older one of the same packages."""
SLAB_BYTES_PER_VOXEL = 160
"""The working set of one output slab (warping.SLAB_VOXELS voxels), per voxel of it: points and
indices in float64, and where numba is missing the slab's field for SimpleITK's resampling transform and its copy
(measured ~135 at 256x256x150 with them: 1.54 GB peak less what else is held; with numba's resampling the
scans' coefficients are counted instead, CARRIED_BYTES_PER_VOXEL)."""
WORK_BYTES_PER_VOXEL = 20
"""Beyond the scans and the cubic prior's coefficient table (priors.table_bytes: 4 bytes a voxel where numba's kernel
reads it, else 4 to 256 by the reference's size), per voxel of the reference grid, the most that is held at once
(bytes): while training, the normalised reference (4) and what builds the prior's table (12: float64 coefficients and
their padded copy), then the body's voxel indices (4 kept, 8 while found: sampling.body_voxels, with its mask (1)
and, for a calibrated follow-up, the numbers of its body level (4) and the comparison (1): 18 in all with the
reference); while writing a time point on it, WRITING_BYTES_PER_VOXEL."""
WRITING_BYTES_PER_VOXEL = 34
"""Per voxel of the grid a time point is written on (a follow-up's own), held while it is written: the field (12) and
its image (12), the predicted image (4), the labelmap (2) and the Jacobian (4)."""
RESAMPLED_BYTES_PER_VOXEL = 5
"""Per follow-up not on the reference grid (or pre-aligned): its float32 copy on that grid and the
mask of its field of view."""
ON_GRID_BYTES_PER_VOXEL = 1
"""Per follow-up on the reference grid: the mask of its field of view, kept when it is padded (find_padding)."""
ACQUIRED_MASK_BYTES_PER_VOXEL = 1
"""Per voxel of a resampled follow-up's own grid (it is fitted at its own voxels, sampling.OwnVoxels): the mask of those
the fit compares."""
PREALIGNING_BYTES_PER_VOXEL = 52
"""Per voxel of the reference grid, held while a follow-up is pre-aligned (ITK's registration on both scans in the
window: the windowed copies, masks, smoothed levels and ITK's gradient images of both): measured 51-52 for the rigid
and affine pre-alignments at 256 x 256 x 150 and 512 x 512 x 200, above training's WORK_BYTES_PER_VOXEL. The rigid
estimate that decides it holds 18-19 (no gradient images); --prealign auto may pre-align any follow-up, so every
follow-up counts the pre-alignment's."""
CARRIED_BYTES_PER_VOXEL = 4
"""Per voxel of a scan the predicted images carry, its cubic B-spline coefficients (float32, padded:
cubic_lookup.padded_coefficients), from which numba's kernel resamples it: the reference's, kept while the time points
are written, and two more scans' while an unscanned time's is (at 512 x 512 x 300, 3 phases and a time between two
predicted, 2 threads: the run's peak 4.44 GB against 4.35 when SimpleITK resampled slab by slab)."""
PLACING_BYTES_PER_VOXEL = 12
"""While a follow-up not on the reference grid is placed there, per voxel of its own grid beyond a copy of it (its
padding extended over: preprocessing.extended): the cubic B-spline's float64 coefficients (8, measured 8.2) and the
masks of its padding (4)."""


def estimate_peak_bytes(reference: str, follow_ups: list[tuple[str, float]], segmentation: str | None = None,
                        prealign: bool = False, smoothing: bool = False) -> float:
    """The peak resident memory of a train run on these inputs, in bytes, from the image headers alone (no voxel is
    read): the scans as held (read_image; twice with `smoothing`, Preset.smoothing_sigma: the fit holds a smoothed
    copy of each; a resampled follow-up twice, as the fit compares it, and the predicted images carry one not pre-
    aligned, as acquired: a padded one's copy, with the mask of the voxels the fit compares on its grid,
    sampling.OwnVoxels, and with `smoothing` the smoothed copy of it the fit compares), the segmentation (twice,
    uint16), and the largest working set: training and writing on the reference grid (WORK_BYTES_PER_VOXEL, the
    prior's table, one output slab and the coefficients of the scans carried, CARRIED_BYTES_PER_VOXEL), pre-aligning
    a follow-up (PREALIGNING_BYTES_PER_VOXEL of the reference grid), placing a follow-up on it (PLACING_BYTES_PER_VOXEL
    of its own grid) or writing its time point on its own grid (WRITING_BYTES_PER_VOXEL and a slab). `prealign`: every
    follow-up pre-aligned (--prealign affine); --prealign auto is counted as none (of a scan it pre-aligns on the
    reference's own grid, its copy's 4 bytes a voxel, the mask of its voxels and a padded one's copy as acquired are not
    counted: the apparent shift that decides is not read from the headers). InputError for a missing or unreadable
    image, as reading it would."""
    size, pixel, grid = image_information(reference, "reference image")
    voxels = math.prod(size)
    copies = 2 if smoothing else 1
    total = BASE_BYTES + voxels * copies * held_bytes(pixel)
    writing = voxels * WORK_BYTES_PER_VOXEL + table_bytes(size[::-1]) + _slab(size) * SLAB_BYTES_PER_VOXEL
    work = voxels * PREALIGNING_BYTES_PER_VOXEL if follow_ups else 0
    largest = voxels                        # the most voxels of a scan the predicted images carry
    for path, t in follow_ups:
        other_size, other_pixel, other_grid = image_information(path, f"follow-up image at time {t:g}")
        other = math.prod(other_size)
        largest = max(largest, other)
        held = other * held_bytes(other_pixel)
        total += held
        resampled = prealign or grid is None or other_grid != grid
        total += voxels * (RESAMPLED_BYTES_PER_VOXEL if resampled else ON_GRID_BYTES_PER_VOXEL)
        if resampled:                       # a padded scan's copy (SeriesModel.acquired), the fit's mask, smoothed copy
            total += held * copies + other * ACQUIRED_MASK_BYTES_PER_VOXEL
            work = max(work, held + other * PLACING_BYTES_PER_VOXEL)
            writing = max(writing, other * WRITING_BYTES_PER_VOXEL + _slab(other_size) * SLAB_BYTES_PER_VOXEL)
        if smoothing:                       # the smoothed copy of what the fit reads: the scan, or its float32 copy
            total += voxels * 4 if resampled else held
    if segmentation:
        total += voxels * 4
    return total + max(work, writing + (voxels + 2 * largest) * CARRIED_BYTES_PER_VOXEL)


def _slab(size: tuple[int, ...]) -> int:
    """Voxels of one output slab of a grid of `size` (x, y, z): whole slices, up to SLAB_VOXELS."""
    plane = math.prod(size[:2])
    return plane * min(max(1, SLAB_VOXELS // plane), math.prod(size[2:]))


def check_memory(estimate: float, meminfo: Path = Path("/proc/meminfo")) -> str | None:
    """InputError when the estimated peak exceeds the memory available now (MemAvailable); a note
    instead where that cannot be read (not Linux)."""
    try:
        available = next(int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines()
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return f"note: the free memory could not be read ({meminfo}); this run needs about {estimate / 1e9:.1f} GB"
    if estimate > available:
        raise InputError(f"this series needs about {estimate / 1e9:.1f} GB of memory, {available / 1e9:.1f} GB is "
                         "available: close other programs, use a machine with more memory, or crop or downsample "
                         "the images (--skip-memory-check runs it anyway)")
    return None
