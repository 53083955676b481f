"""Where Def-Net's training draws voxels beyond the uniform draw: bands about the reference
segmentation's structure boundaries (Preset.structure_points)."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

STRUCTURE_BAND_MM = 9.0
"""Half-width in mm of the band about a structure's boundary from which structure_points are drawn: inside it
lie the boundary's positions over the series for motions up to about this much (the shrinking tumour's edge
moves up to 4.8 mm)."""


def structure_bands(labelmap: np.ndarray, spacing_mm: tuple[float, float, float],
                    band_mm: float = STRUCTURE_BAND_MM) -> list[np.ndarray]:
    """Per label > 0 of the reference labelmap [z, y, x] (in label order): the flat indices of the voxels
    within `band_mm` of that structure's boundary (dilated minus eroded, per-axis radius band_mm / spacing,
    at least one voxel). spacing_mm is (x, y, z), as SimpleITK gives it."""
    radius = [max(1, int(round(band_mm / s))) for s in spacing_mm]
    bands = []
    for label in np.unique(labelmap):
        if label == 0:
            continue
        structure = sitk.GetImageFromArray((labelmap == label).astype(np.uint8))
        dilated = sitk.GetArrayViewFromImage(sitk.BinaryDilate(structure, radius)).astype(bool)
        eroded = sitk.GetArrayViewFromImage(sitk.BinaryErode(structure, radius)).astype(bool)
        bands.append(np.flatnonzero(dilated & ~eroded))
    return bands
