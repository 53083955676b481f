"""Where Def-Net's training draws voxels: in and about the body (Preset.body_mask), and beyond the uniform draw,
from bands about the reference segmentation's structure boundaries (Preset.structure_points)."""
from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .preprocessing import Calibration

STRUCTURE_BAND_MM = 9.0
"""Half-width in mm of the band about a structure's boundary from which structure_points are drawn: inside it
lie the boundary's positions over the series for motions up to about this much (the shrinking tumour's edge
moves up to 4.8 mm)."""


def structure_bands(labelmap: np.ndarray, spacing_mm: tuple[float, float, float],
                    band_mm: float = STRUCTURE_BAND_MM) -> list[np.ndarray]:
    """Per label > 0 of the reference labelmap [z, y, x] (in label order): the flat indices of the voxels
    within `band_mm` of that structure's boundary (dilated minus eroded, per-axis radius band_mm / spacing,
    at least one voxel). spacing_mm is (x, y, z), as SimpleITK gives it. Each structure is dilated and eroded
    within its bounding box grown by the radius, not over the whole grid."""
    radius = [max(1, int(round(band_mm / s))) for s in spacing_mm]
    margin = radius[::-1]                                                       # z, y, x
    bands = []
    for label, box in enumerate(ndimage.find_objects(labelmap), 1):
        if box is None:
            continue
        box = tuple(slice(max(b.start - m - 1, 0), min(b.stop + m + 1, n))
                    for b, m, n in zip(box, margin, labelmap.shape))
        structure = sitk.GetImageFromArray((labelmap[box] == label).astype(np.uint8))
        dilated = sitk.GetArrayFromImage(sitk.BinaryDilate(structure, radius)).astype(bool)
        eroded = sitk.GetArrayFromImage(sitk.BinaryErode(structure, radius)).astype(bool)
        inside = np.nonzero(dilated & ~eroded)
        bands.append(np.ravel_multi_index(tuple(i + b.start for i, b in zip(inside, box)), labelmap.shape))
    return bands


BODY_LEVEL = 0.067
"""Normalised intensity above which a voxel of a scan is body (in the CT window, -900 HU): the air around the
body, below it, carries no motion for a drawn voxel to follow."""
BODY_MARGIN_MM = 9.0
"""How far about the body Def-Net's voxels are drawn, in mm: where the body's edge moves into air stays inside
(as STRUCTURE_BAND_MM holds a boundary's positions over the series)."""


def body_voxels(scans: list[np.ndarray], threshold: float, spacing_mm: tuple[float, float, float],
                margin_mm: float = BODY_MARGIN_MM, insides: list[np.ndarray | None] | None = None,
                calibrations: list[Calibration | None] | None = None) -> np.ndarray:
    """The flat indices (int32, ascending) of the voxels from which Def-Net draws: in each (z, y) row of the
    grid, every voxel from the first to the last within `margin_mm` of a voxel above `threshold` in any of
    `scans` ([z, y, x] arrays on one grid, in the scans' own units), within its field of view (`insides`, bool
    like the scans, None: all; padding of 0 HU is no body), a scan whose numbers are calibrated onto the reference's
    (`calibrations`, None: none) above `threshold` in the reference's numbers. A row is taken whole between its
    ends, so what lies between two edges of the body (the lungs, the bowel's gas) is always drawn from, whatever
    its intensity. spacing_mm is (x, y, z), as SimpleITK gives it."""
    if math.prod(scans[0].shape) >= 2 ** 31:
        raise ValueError(f"a grid of {scans[0].shape} voxels is too large to index in int32")
    body: np.ndarray = np.zeros(scans[0].shape, bool)
    for scan, inside, calibration in zip(scans, insides or [None] * len(scans), calibrations or [None] * len(scans)):
        above = scan > (threshold if calibration is None else calibration.numbered(threshold))
        body |= above if inside is None else above & inside
    for axis, spacing in enumerate(spacing_mm[::-1]):
        body = ndimage.maximum_filter1d(body, 2 * int(round(margin_mm / spacing)) + 1, axis=axis)
    width = body.shape[2]
    rows = body.reshape(-1, width)
    first = np.argmax(rows, axis=1)
    length = np.where(rows.any(axis=1), width - np.argmax(rows[:, ::-1], axis=1) - first, 0)
    del body, rows
    starts = np.arange(len(first), dtype=np.int64) * width + first - (np.cumsum(length) - length)
    index = np.repeat(starts.astype(np.int32), length)
    index += np.arange(len(index), dtype=np.int32)
    return index
