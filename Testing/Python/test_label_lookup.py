"""The reference labelmap carried by numba's kernel (STNeRPLib.label_lookup.carry) as numpy carries it where numba is
missing (warping._carried), to the label: nearest and label-wise linear, beyond the grid and on its border, at ties."""
from __future__ import annotations

import numpy as np
import pytest

from STNeRPLib import label_lookup, warping

pytestmark = pytest.mark.skipif(not label_lookup.carries(), reason="numba is not installed: numpy carries the labels")


def _labelmap(shape: tuple[int, int, int], dtype: type, seed: int) -> np.ndarray:
    """Blocks of a few labels (most cells one label, boundaries between them) with single voxels of others scattered."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 4, tuple(-(-n // 2) for n in shape))
    labels = np.kron(blocks, np.ones((2, 2, 2), int))[: shape[0], : shape[1], : shape[2]]
    spots = rng.random(shape) < 0.05
    labels[spots] = rng.integers(0, np.iinfo(dtype).max, spots.sum(), endpoint=True)
    return labels.astype(dtype)


def _indices(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """(x, y, z): anywhere from 2 voxels before the grid to 2 beyond, on cell centres and faces (exact halves: ties of
    two or four corners, rint's halves to even), on voxel centres, and a few not a number."""
    n = np.asarray(shape[::-1], float)
    anywhere = rng.uniform(-2, n + 1, (20000, 3))
    halves = rng.integers(-2, shape[::-1], (6000, 3)) + rng.choice([0.0, 0.5], (6000, 3))
    centres = rng.integers(0, shape[::-1], (2000, 3)).astype(float)
    missing = rng.uniform(0, n - 1, (30, 3))
    missing[np.arange(30), rng.integers(0, 3, 30)] = np.nan
    return np.concatenate([anywhere, halves, centres, missing])


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")        # numpy casting the indices not a number
@pytest.mark.parametrize("how", ["nearest", "linear"])
@pytest.mark.parametrize("shape, dtype", [((9, 11, 13), np.uint16), ((2, 7, 5), np.uint8), ((6, 1, 4), np.int32)])
def test_the_kernel_carries_labels_as_numpy_does(how, shape, dtype):
    """Every point's label the same as numpy's chunks give, on grids down to one voxel along an axis."""
    labelmap = _labelmap(shape, dtype, 3)
    index = _indices(shape, np.random.default_rng(4))
    numpy = warping._carried(labelmap, index, how)
    kernel = label_lookup.carry(labelmap, index, how == "linear")
    assert kernel.dtype == labelmap.dtype
    np.testing.assert_array_equal(kernel, numpy)
    on_grid = kernel[~np.isnan(index).any(axis=1)]
    assert (on_grid == 0).sum() > 1000 and len(np.unique(on_grid)) >= 3        # off the grid, and labels read


def test_the_kernel_reads_a_labelmap_that_is_not_contiguous():
    """A view (every other slice) is read as its values, not its buffer."""
    labelmap = _labelmap((12, 8, 8), np.uint16, 5)[::2]
    index = _indices(labelmap.shape, np.random.default_rng(6))
    carried = label_lookup.carry(labelmap, index, True)
    np.testing.assert_array_equal(carried, warping._carried(labelmap, index, "linear"))
