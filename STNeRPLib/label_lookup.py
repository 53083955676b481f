"""The reference labelmap read at continuous indices by a numba compiled kernel: warping.propagate_labels' carrying,
its numbers to the bit.

Carrying a labelmap to a time reads it at one continuous index per voxel of that time's grid. numpy does it in passes
over a chunk of points (the 8 corners' flat indices and labels as [8, N] arrays, then the weights of the points whose
corners differ), each pass reading and writing megabytes: ~9 s of a 512 x 512 x 300 time point's outputs on one
thread. The kernel carries each point in registers. Where numba is missing, numpy carries (warping).
"""
from __future__ import annotations

import numpy as np

from . import compiling, threads
from .compiling import inlined, kernel

TIE = 1e-12
"""Label-wise linear: labels whose summed corner weights are within this of the largest tie (the smallest wins); the
numpy carrying's too (warping)."""


def carries() -> bool:
    """Whether `carry` runs compiled (numba installed): else numpy carries the labels (warping)."""
    return compiling.numba is not None


def carry(labelmap: np.ndarray, index: np.ndarray, linear: bool) -> np.ndarray:
    """The labelmap [z, y, x] at continuous indices (N, 3), (x, y, z), of its grid: 0 where the nearest voxel (halves
    to even, as np.rint) lies off the grid or an index is not a number; else, `linear`, the label whose corners'
    trilinear weights sum highest among the 8 voxels around the point (each axis clamped to the grid; within TIE, the
    smallest), or the nearest voxel's label. Of the labelmap's dtype; the points' ranges are shared among
    threads.current() threads."""
    labels = np.empty(len(index), labelmap.dtype)
    volume, points = np.ascontiguousarray(labelmap), np.ascontiguousarray(index, np.float64)

    def part(start: int, end: int) -> None:
        _carry(volume, points[start:end], labels[start:end], linear)

    threads.map_ranges(part, len(points), CARRY_CHUNK)
    return labels


CARRY_CHUNK = 1 << 16
"""Points one call of the kernel carries: a range of them on each thread at once."""


@kernel
def _carry(labelmap: np.ndarray, points: np.ndarray, out: np.ndarray, linear: bool) -> None:
    """out [P]: `carry` at points [P, 3]."""
    depth, rows, columns = labelmap.shape
    flat = labelmap.ravel()
    corners, scores = np.empty(8, labelmap.dtype), np.empty(8, np.float64)       # one point's, reused
    for p in range(points.shape[0]):
        x, y, z = points[p, 0], points[p, 1], points[p, 2]
        nx, ny, nz = np.rint(x), np.rint(y), np.rint(z)
        if not (0 <= nx < columns and 0 <= ny < rows and 0 <= nz < depth):      # false for not a number too
            out[p] = 0
        elif linear:
            out[p] = _label_wise_linear(flat, x, y, z, (depth, rows, columns), corners, scores)
        else:
            out[p] = flat[(int(nz) * rows + int(ny)) * columns + int(nx)]


@inlined
def _label_wise_linear(flat: np.ndarray, x: float, y: float, z: float, shape: tuple[int, int, int],
                       corners: np.ndarray, scores: np.ndarray) -> int:
    """The label-wise linear label at (x, y, z), as warping's numpy carrying computes it: the corners in (dz, dy, dx)
    order, x fastest, each axis clamped to the grid; a corner's weight the product of its axes' (x, then y, then z),
    each `f` or `1 - f`; a label's score its corners' weights summed in corner order. corners and scores: 8 each,
    overwritten."""
    depth, rows, columns = shape
    lx, ly, lz = np.floor(x), np.floor(y), np.floor(z)
    x0, y0, z0 = int(lx), int(ly), int(lz)
    xs = (min(max(x0, 0), columns - 1), min(max(x0 + 1, 0), columns - 1))
    ys = (min(max(y0, 0), rows - 1) * columns, min(max(y0 + 1, 0), rows - 1) * columns)
    zs = (min(max(z0, 0), depth - 1) * rows * columns, min(max(z0 + 1, 0), depth - 1) * rows * columns)
    same = True
    for k in range(8):
        corners[k] = flat[zs[k >> 2] + ys[(k >> 1) & 1] + xs[k & 1]]
        same = same and corners[k] == corners[0]
    if same:
        return corners[0]
    fx, fy, fz = x - lx, y - ly, z - lz
    scores[:] = 0.0
    for k in range(8):
        weight = ((fx if k & 1 else 1 - fx) * (fy if k & 2 else 1 - fy)) * (fz if k & 4 else 1 - fz)
        for c in range(8):
            if corners[c] == corners[k]:
                scores[c] += weight
    best = scores.max() - TIE
    label = corners[0]
    found = False
    for c in range(8):
        if scores[c] >= best and (not found or corners[c] < label):
            label, found = corners[c], True
    return label
