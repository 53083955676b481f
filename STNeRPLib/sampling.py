"""Where Def-Net's training draws voxels beyond the uniform draw: bands about the reference
segmentation's structure boundaries (Preset.structure_points)."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

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
