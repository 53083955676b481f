"""A 3D Slicer segmentation file (.seg.nrrd) as one labelmap.

3D Slicer saves a segmentation as a NRRD whose header names each segment (SegmentN_Name), the layer holding it
(SegmentN_Layer: one component of the image per layer) and its value in that layer (SegmentN_LabelValue).
Segments that do not overlap share one layer, so a file of one layer is a plain labelmap; overlapping segments (a
GTV drawn inside its lung) are saved in layers of their own, one component each, and their label values repeat
from layer to layer. Files of Slicer 4.10 and before have no layer key: one component per segment, value 1.

The segments are merged into one label per voxel as the panel merges a scene's segments and dicom_in an RT
Structure Set's ROIs: a voxel in several goes to the smallest (dicom_in.painted). Each segment's label is its
label value when no two segments share one (a file of one layer reads as its voxels are stored), else its place
in the file, 1, 2, ... (the order of Slicer's segment list, as the panel numbers the segments it sends).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import SimpleITK as sitk


class _MetaData(Protocol):
    """A header's key/value pairs: a sitk.Image read from a file, or an ImageFileReader that read its header."""

    def GetMetaDataKeys(self) -> tuple[str, ...]: ...
    def GetMetaData(self, key: str) -> str: ...


@dataclass(frozen=True)
class Segment:
    """One segment of a Slicer segmentation file: its name, its layer (component) and its voxels' value there."""

    name: str
    layer: int
    value: int
    colour: tuple[float, float, float] | None = None      # RGB, 0 to 1


def segments(header: _MetaData) -> list[Segment]:
    """The segments a Slicer segmentation's header describes, in the file's order ([] for any other image)."""
    keys = set(header.GetMetaDataKeys())

    def field(index: int, name: str, default: str) -> str:
        key = f"Segment{index}_{name}"
        return header.GetMetaData(key).strip() if key in keys else default

    found: list[Segment] = []
    while f"Segment{len(found)}_ID" in keys:
        index = len(found)
        colour = tuple(float(v) for v in field(index, "Color", "").split())
        found.append(Segment(field(index, "Name", f"Segment_{index + 1}"), int(field(index, "Layer", str(index))),
                             int(field(index, "LabelValue", "1")), colour if len(colour) == 3 else None))
    return found


def labels(found: list[Segment]) -> list[int]:
    """Each segment's label: its label value when no two segments share one, else its place in the file (1, 2, ...)."""
    values = [segment.value for segment in found]
    return values if len(set(values)) == len(values) else list(range(1, len(found) + 1))


def labelled_segments(path: str | Path) -> dict[int, Segment]:
    """Label -> segment of a Slicer segmentation file, from its header alone ({} for any other file)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return {}
    found = segments(reader)
    return dict(zip(labels(found), found))


def segment_names(path: str | Path) -> dict[int, str]:
    """Label -> segment name of a Slicer segmentation file ({} for any other file)."""
    return {label: segment.name for label, segment in labelled_segments(path).items()}


def name_key(name: str) -> str:
    """A structure's name as names are matched across files: case and surrounding spaces aside."""
    return name.strip().casefold()


def segment_voxels(image: sitk.Image, by_name: dict[str, int] | None = None
                   ) -> tuple[list[np.ndarray], list[int]] | None:
    """A Slicer segmentation's segments as (flat voxel indices in [z, y, x] order, label) of each, to be painted
    into one labelmap (dicom_in.painted): each under its label (`labels`), or under by_name's label for its name
    (name_key; a segment of another name has no voxels). None when there is nothing to merge or renumber: an image
    without segment metadata, or of one layer read under its own label values."""
    found = segments(image)
    if not found or (image.GetNumberOfComponentsPerPixel() == 1 and by_name is None):
        return None
    layers = sitk.GetArrayViewFromImage(image)
    layers = layers if layers.ndim == 4 else layers[..., np.newaxis]       # [z, y, x, layer]
    numbers = labels(found) if by_name is None else [by_name.get(name_key(s.name), 0) for s in found]
    voxels = [np.flatnonzero(layers[..., s.layer] == s.value) if number and s.layer < layers.shape[-1]
              else np.empty(0, np.intp) for s, number in zip(found, numbers)]
    return voxels, numbers
