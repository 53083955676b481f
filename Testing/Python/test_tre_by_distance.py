"""benchmarks/tre_by_distance.py: landmark errors binned by the distance of their reference point from one
structure, against a cube of known size with landmarks placed at known distances and known errors."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from benchmarks import tre_by_distance

SPACING, ORIGIN = (2.0, 2.0, 2.0), (-20.0, 10.0, 5.0)


def _labelmap() -> sitk.Image:
    """20^3 voxels of 2 mm; label 1 a box: voxels 2..17 along x, 8..11 along y and z (not symmetric in the
    axes, so an index read in the wrong axis order lands at another distance)."""
    array = np.zeros((20, 20, 20), np.uint8)
    array[8:12, 8:12, 2:18] = 1                                     # z, y, x
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    return image


def _zero_field(like: sitk.Image) -> sitk.Image:
    field = sitk.Image(like.GetSize(), sitk.sitkVectorFloat64)
    field.CopyInformation(like)
    return field


def test_errors_fall_in_the_band_of_their_reference_points_distance_from_the_structure():
    labelmap = _labelmap()
    inner = np.array(labelmap.TransformContinuousIndexToPhysicalPoint((15, 9.5, 9.5)))
    edge_y = labelmap.TransformIndexToPhysicalPoint((15, 11, 9))[1]
    reference = np.array([inner,                                    # inside: distance 0
                          [inner[0], edge_y + 6.0, inner[2]],       # 5-6 mm from the surface
                          [inner[0], edge_y + 14.0, inner[2]]])     # 13-14 mm
    offsets = np.array([[0.5, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 2.0]])
    # u = 0 maps each time-t point q to itself: its error is |q - reference| = |offset|
    errors, references = tre_by_distance.landmark_errors({1.0: _zero_field(labelmap)},
                                                         {1.0: (reference + offsets, reference)})
    np.testing.assert_allclose(errors, [0.5, 1.0, 2.0])
    distances = tre_by_distance.distances_at(tre_by_distance.distance_from(labelmap, 1), references)
    rows = tre_by_distance.binned(errors, distances, edges=(0.0, 3.0, 9.0, float("inf")))
    assert [r["count"] for r in rows] == [1, 1, 1]
    assert [r["tre_mean"] for r in rows] == pytest.approx([0.5, 1.0, 2.0])


def test_an_empty_band_has_no_mean_and_a_missing_structure_is_named():
    rows = tre_by_distance.binned(np.array([1.0]), np.array([50.0]), edges=(0.0, 10.0, 100.0))
    assert rows[0] == {"low_mm": 0.0, "high_mm": 10.0, "count": 0, "tre_mean": None, "tre_max": None}
    assert rows[1]["tre_mean"] == 1.0
    with pytest.raises(ValueError, match="label 7"):
        tre_by_distance.distance_from(_labelmap(), 7)
