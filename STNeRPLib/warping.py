"""Outputs of a trained model on any grid: the displacement field (mm, LPS), the predicted image
and the propagated labelmap (nearest neighbour, paper eq. 7-8). Evaluated in slabs of slices,
so memory stays bounded on large grids."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from .geometry import Grid
from .integration import sample
from .model import SeriesModel

CHUNK_VOXELS = 1 << 18


@dataclass
class Warped:
    """Per voxel of the target grid, [z, y, x]: displacement u (…, 3) in mm (LPS) to the reference
    point, the predicted image in the reference's units, and the propagated labelmap (or None)."""

    displacement: np.ndarray
    image: np.ndarray
    labelmap: np.ndarray | None


def affine_matrix(transform: sitk.Transform) -> np.ndarray:
    """4x4 homogeneous matrix of a SimpleITK affine transform (points in mm)."""
    affine = sitk.AffineTransform(transform)
    a = np.reshape(affine.GetMatrix(), (3, 3))
    centre = np.asarray(affine.GetCenter())
    matrix = np.eye(4)
    matrix[:3, :3] = a
    matrix[:3, 3] = centre + np.asarray(affine.GetTranslation()) - a @ centre
    return matrix


def warp(model: SeriesModel, t: float, target: Grid, prealignment: np.ndarray | None = None) -> Warped:
    """Evaluate the model at user time t on every voxel of `target`.

    prealignment: 4x4 affine mapping reference-grid points to points of the time-t image (the
    training data were resampled through it); the returned displacement includes it, so
    q + u(q) is the reference point of the time-t image's own point q.
    """
    displacement = model.displacement_grid(t)
    prior = model.prior() if model.prior_kind == "refnet" else None
    reference = torch.from_numpy(model.reference).to(model.device)[None, None]
    inverse = np.linalg.inv(prealignment) if prealignment is not None else None
    slab = max(1, CHUNK_VOXELS // (target.size[0] * target.size[1]))
    parts = [_warp_slab(model, displacement, prior, reference, target, inverse, z, min(z + slab, target.size[2]))
             for z in range(0, target.size[2], slab)]
    field, image, labels = (np.concatenate(p) if p[0] is not None else None for p in zip(*parts))
    shape = target.shape
    return Warped(field.reshape(*shape, 3), image.reshape(shape),
                  labels.reshape(shape) if labels is not None else None)


def _warp_slab(model, displacement, prior, reference, target: Grid, inverse, z0: int, z1: int):
    q = target.points(z0, z1)
    p = q if inverse is None else q @ inverse[:3, :3].T + inverse[:3, 3]
    scale = model.grid.unit_scale()
    c = model.grid.to_index(p) / scale * 2 - 1
    c_t = torch.as_tensor(c, dtype=torch.float32, device=model.device)
    with torch.no_grad():
        moved_c = c_t + sample(displacement, c_t[None])[0]
        if prior is not None:
            image = model.window.restore(_chunked(prior, moved_c).cpu().numpy())
        else:
            image = sample(reference, moved_c[None])[0, :, 0].cpu().numpy()
    moved_index = (moved_c.cpu().numpy().astype(np.float64) + 1) / 2 * scale
    mapped = model.grid.to_physical(moved_index)
    labels = _nearest_labels(model.labelmap, moved_index) if model.labelmap is not None else None
    return (mapped - q).astype(np.float32), image.astype(np.float32), labels


def _chunked(net, points: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    return torch.cat([net(part) for part in points.split(chunk)])


def _nearest_labels(labelmap: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Label of the nearest reference voxel to each continuous index (x, y, z); 0 outside."""
    nearest = np.rint(index).astype(np.int64)
    size = np.asarray(labelmap.shape[::-1])
    inside = np.all((nearest >= 0) & (nearest < size), axis=1)
    labels = np.zeros(len(index), dtype=labelmap.dtype)
    i, j, k = nearest[inside].T
    labels[inside] = labelmap[k, j, i]
    return labels
