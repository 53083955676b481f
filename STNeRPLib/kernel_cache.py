"""Every numba kernel of the package compiled into numba's cache ahead of a run (`python -m STNeRPLib.kernel_cache`,
which setup.sh runs; the benchmark's warm-up loads them so): above the kernels' modules, which import compiling."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from . import compiling, cubic_lookup, label_lookup, metrics, priors, trilinear


def load_kernels() -> None:
    """Compile every kernel for the types a run calls it with, each called once on the smallest inputs, or load it from
    numba's cache where it is there: ~31 s at one thread the first time (a fresh install's first run otherwise spent
    it), ~0.3 s a process after. Nothing without numba."""
    if compiling.numba is None:
        return
    volume = torch.zeros(1, 1, 2, 2, 2, requires_grad=True)
    trilinear.grid_sample(volume, torch.zeros(1, 1, 1, 1, 3, requires_grad=True)).sum().backward()
    priors.ImagePrior(torch.zeros(2, 2, 2), "cubic").look_up(torch.zeros(1, 3), slopes=True)
    field = torch.zeros(1, 3, 2, 2, 2)
    trilinear.inverse(field, field, torch.zeros(1, 1, 3), 1, 1e-5)
    trilinear.mapped(field, None, [torch.zeros(2)] * 3, (0, 1), np.ones(3), np.eye(3), 1, 1e-5)
    trilinear.inverse_in_mm((field, field), [torch.zeros(2)] * 3, (0, 1), np.eye(3), 1, 1e-5,
                            np.empty((4, 3), np.float32))
    for scan_type in (np.int16, np.float32):                   # a scan as carried: a read-only view, CT or float
        samples = np.zeros((2, 2, 2), scan_type)
        samples.setflags(write=False)
        cubic_lookup.resample(cubic_lookup.padded_coefficients(samples, np.float32), samples, np.zeros((1, 3)))
    for label_type in (np.uint8, np.uint16):                   # the model's labels: up to 255 structures, or more
        label_lookup.carry(np.zeros((2, 2, 2), label_type), np.zeros((1, 3)), True)
    metrics.jacobian_determinant(sitk.Image([2, 2, 2], sitk.sitkVectorFloat32, 3))


if __name__ == "__main__":
    load_kernels()
