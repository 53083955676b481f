"""Segments that overlap, without Qt or MRML: the worker takes one labelmap, one label per voxel,
so a voxel drawn in two segments can reach it in one of them only.

Slicer's own merged export (vtkSegmentation::GenerateMergedLabelmap, used by
ExportSegmentsToLabelmapNode) paints the segments in the order given and gives a shared voxel to the
later one, silently: radiotherapy contours nested by design (GTV inside CTV inside PTV) would reach
the worker as one PTV, the inner contours empty. Here each shared voxel goes to the smallest segment
that holds it, so a contour inside another keeps its whole extent; the larger one is propagated
without it and re-united with the segments wholly inside it when the result is imported (nested);
the panel names the segments and voxel counts before Apply.

A segment is given as the sorted flat indices of its voxels on one grid (numpy.flatnonzero).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from STNeRPLib.contract import paint_order


@dataclass(frozen=True)
class Overlap:
    """Two segments sharing voxels: `kept` (the smaller, it keeps them) and `loses` (propagated
    without them), by position in the export order."""

    kept: int
    loses: int
    voxels: int


def overlaps(voxels: Sequence[np.ndarray]) -> list[Overlap]:
    """Every pair of segments that share voxels, in paint order of the segment that loses them."""
    order = paint_order(voxels)
    out = []
    for rank, loses in enumerate(order):
        for kept in order[rank + 1:]:
            shared = np.intersect1d(voxels[loses], voxels[kept], assume_unique=True).size
            if shared:
                out.append(Overlap(kept, loses, int(shared)))
    return out


def nested(voxels: Sequence[np.ndarray]) -> dict[int, list[int]]:
    """For each segment (by position), the smaller segments lying wholly inside it: their labels
    hold part of its extent in the labelmap, so an import re-unites them with it."""
    out: dict[int, list[int]] = {}
    for outer, big in enumerate(voxels):
        inner = [i for i, small in enumerate(voxels)
                 if i != outer and 0 < len(small) < len(big) and np.isin(small, big, assume_unique=True).all()]
        if inner:
            out[outer] = inner
    return out


def labelmap(voxels: Sequence[np.ndarray], values: Sequence[int], size: int) -> np.ndarray:
    """Flat int16 labelmap of `size` voxels: each segment's voxels set to its value, in paint order."""
    out = np.zeros(size, dtype=np.int16)
    for i in paint_order(voxels):
        out[voxels[i]] = values[i]
    return out


def describe(found: Sequence[Overlap], names: Sequence[str]) -> str | None:
    """One line for the user before Apply naming the overlapping segments and the voxels they share
    (None when no segment overlaps another)."""
    if not found:
        return None
    pairs = ", ".join(f"'{names[o.loses]}' and '{names[o.kept]}' share {o.voxels} voxels" for o in found)
    smaller = ", ".join(dict.fromkeys(f"'{names[o.loses]}'" for o in found))
    return (f"Segments overlap: {pairs}. The worker takes one label per voxel: each shared voxel goes to the "
            f"smaller segment, so {smaller} will be propagated without the voxels shared.")
