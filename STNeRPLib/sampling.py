"""Where Def-Net's training draws voxels: in and about the body (Preset.body_mask), and beyond the uniform draw,
from bands about the reference segmentation's structure boundaries (Preset.structure_points); on a follow-up on a
grid of its own or pre-aligned, at its own voxels (OwnVoxels)."""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .geometry import Grid, affine_transform, inverted, transformed
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


class OwnVoxels(NamedTuple):
    """A follow-up resampled onto the reference grid (on a grid of its own, or pre-aligned), compared at its own
    voxels, as acquired, not at that copy (a second interpolation, which cost 0.06 mm of TRE on the benchmark's
    chest_own_grids): the scan (its padding extended over), its grid, the reference's grid, the voxels of its grid
    that are compared (bool [z, y, x]: inside its field of view without its padding, and within the reference grid
    and the reference's own field of view, whose nearest voxel is taken), and its pre-alignment (4 x 4, reference LPS
    mm -> the scan's; None: the identity)."""

    scan: sitk.Image
    grid: Grid
    reference: Grid
    inside: np.ndarray
    prealignment: np.ndarray | None = None

    @classmethod
    def of(cls, scan: sitk.Image, reference: sitk.Image, view: np.ndarray | None, reference_view: np.ndarray | None,
           prealignment: np.ndarray | None = None) -> "OwnVoxels":
        """The follow-up `scan` with its field of view without its padding (`view`, bool [z, y, x] on its grid; None:
        all of it) against the reference and its own field of view (`reference_view` on the reference grid; None:
        all of it), through its `prealignment` (4 x 4, reference LPS mm -> the scan's; None: none)."""
        seen = np.ones(Grid.of(reference).shape, np.uint8) if reference_view is None else reference_view.view(np.uint8)
        image = sitk.GetImageFromArray(seen)
        image.CopyInformation(reference)
        back = sitk.Transform() if prealignment is None else affine_transform(np.linalg.inv(prealignment))
        onto = sitk.Resample(image, scan, back, sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8)
        inside = sitk.GetArrayViewFromImage(onto).astype(bool)
        if view is not None:
            inside &= view
        return cls(scan, Grid.of(scan), Grid.of(reference), inside, prealignment)

    def drawn(self, index: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """The flat indices of the scan's voxels nearest the reference grid's voxels at flat `index`, each moved by
        `offset` ([N, 3], x, y, z, in the reference's voxels: uniform within +-0.5 draws a point uniformly within
        the voxel, so the scan's voxels are drawn as densely as the reference's, finer or coarser), clamped to its
        grid."""
        zyx = np.unravel_index(index, self.reference.shape)
        points = transformed(self.reference.to_physical(np.stack(zyx[::-1], axis=1) + offset), self.prealignment)
        own = np.rint(self.grid.to_index(points)).astype(np.intp)
        np.clip(own, 0, np.asarray(self.grid.size) - 1, out=own)
        return np.ravel_multi_index((own[:, 2], own[:, 1], own[:, 0]), self.grid.shape)

    def at(self, index: np.ndarray) -> np.ndarray:
        """The continuous indices [N, 3] (x, y, z) on the reference grid of the scan's voxels at flat `index`."""
        zyx = np.unravel_index(index, self.grid.shape)
        points = self.grid.to_physical(np.stack(zyx[::-1], axis=1).astype(float))
        return self.reference.to_index(transformed(points, inverted(self.prealignment)))

    def window_scale(self) -> np.ndarray:
        """The reference grid's spacing in the scan's voxels, (z, y, x): an LNCC window over as many mm on its grid."""
        return (np.asarray(self.reference.spacing) / np.asarray(self.grid.spacing))[::-1].copy()
