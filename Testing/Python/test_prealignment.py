"""--prealign affine is reproducible: the same pair gives the same pre-alignment every run."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from STNeRPLib.phantom import breathing_series
from STNeRPLib.preprocessing import affine_prealignment


def test_affine_prealignment_is_the_same_every_run():
    """Mattes MI samples voxels at random: SimpleITK's seed 0 means "the wall clock", which made two
    runs of the same command differ (matrices up to 2.6 apart); a fixed seed makes them identical."""
    series = breathing_series(size=(32, 32, 24), spacing=(9.0, 9.0, 10.0), n_phases=4, noise_hu=10)
    moved = sitk.Image(series.images[2])
    moved.SetOrigin(tuple(o + d for o, d in zip(moved.GetOrigin(), (6.0, -4.0, 5.0))))
    runs = [affine_prealignment(series.images[0], moved) for _ in range(3)]
    matrices = [np.array(r.GetMatrix() + r.GetTranslation()) for r in runs]
    for other in matrices[1:]:
        np.testing.assert_allclose(other, matrices[0], rtol=0, atol=1e-4)
