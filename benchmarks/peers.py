"""Pairwise registration tools users would pick instead of STNeRP, each returning its result in
STNeRP's displacement convention.

Convention (ARCHITECTURE.md, "Direction of a displacement"): the result for a time-t image is a displacement field u
on the time-t image grid (SimpleITK VectorFloat64 image, mm, LPS) mapping a time-t point q to the matching
reference point q + u(q). That is ITK's resampling-transform direction with the *reference as
the moving image*, so every peer registers fixed = time-t image, moving = reference, and its
fixed -> moving transform is converted to a dense field on the fixed grid:

- ANTs (antspyx): the forward transforms (warp + affine) are composed by antsApplyTransforms
  into one displacement field on the fixed grid (`apply_transforms(..., compose=prefix)`);
- elastix (itk-elastix): transformix's deformation field (fixed -> moving, on the fixed grid);
- SimpleITK demons: the field is already on the fixed grid in that direction.

Each peer uses the tool's own defaults wherever the tool has them, and the strongest peers also run
"at their best" (issue 11): ANTs SyNOnly CC with a full-resolution level and demons with more
full-resolution iterations (`*_fullres`). What is set is written in PEERS[...]["config"] so the
benchmark report can show it. Packages are imported lazily, so a
missing one only disables its peers (see `available`).
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from STNeRPLib.geometry import Grid

if TYPE_CHECKING:
    import ants
    import itk

THREADS = int(os.environ.get("BENCHMARK_THREADS", "2"))


def _as_float(image: sitk.Image) -> sitk.Image:
    return sitk.Cast(image, sitk.sitkFloat32)


def _field_on(like: sitk.Image, array: np.ndarray) -> sitk.Image:
    """VectorFloat64 field [z, y, x, 3] on the grid of `like`."""
    field = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float64), isVector=True)
    field.CopyInformation(like)
    return field


# ----------------------------------------------------------------------------- ANTs


def _to_ants(image: sitk.Image) -> ants.ANTsImage:
    import ants
    array = sitk.GetArrayFromImage(_as_float(image)).transpose(2, 1, 0)  # ants arrays are [x, y, z]
    return ants.from_numpy(np.ascontiguousarray(array), origin=list(image.GetOrigin()),
                           spacing=list(image.GetSpacing()),
                           direction=np.reshape(image.GetDirection(), (3, 3)))


def ants_register(fixed: sitk.Image, moving: sitk.Image, **options: object) -> sitk.Image:
    """ants.registration(fixed, moving, **options); the composed forward transforms as a field."""
    import ants
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(THREADS))
    f, m = _to_ants(fixed), _to_ants(moving)
    with tempfile.TemporaryDirectory(prefix="ants_") as folder:
        result = ants.registration(f, m, outprefix=str(Path(folder) / "reg_"), **options)
        composed = ants.apply_transforms(f, m, result["fwdtransforms"], compose=str(Path(folder) / "comp_"))
        field = sitk.ReadImage(composed, sitk.sitkVectorFloat64)
    # antsApplyTransforms writes the field on the fixed grid; keep the fixed image's exact geometry.
    out = _field_on(fixed, sitk.GetArrayFromImage(field))
    return out


# ----------------------------------------------------------------------------- elastix


def _to_itk(image: sitk.Image) -> itk.Image:
    import itk
    out = itk.image_from_array(np.ascontiguousarray(sitk.GetArrayFromImage(_as_float(image))))
    out.SetOrigin(image.GetOrigin())
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(itk.matrix_from_array(np.reshape(image.GetDirection(), (3, 3))))
    return out


def elastix_bspline_map(kind: str, **overrides: object) -> itk.ParameterObject:
    """'default': elastix's default B-spline map (GetDefaultParameterMap('bspline')), which is
    already multi-resolution: 4 levels, final grid 10 mm, Mattes MI + bending energy, 256 ASGD
    iterations, 2048 random samples. 'multires': a deeper, finer multi-resolution schedule,
    GetDefaultParameterMap('bspline', 5, 5.0): 5 levels down to a 5 mm grid, otherwise the same.
    (elastix costs ~15 ms per iteration here whatever the image size, so longer schedules such as
    512 iterations x 4096 samples took ~80 s a pair and were left out.) `overrides`: parameter
    name -> value(s), e.g. for a fast unit test."""
    import itk
    parameters = itk.ParameterObject.New()
    if kind == "default":
        pm = parameters.GetDefaultParameterMap("bspline")
    elif kind == "multires":
        pm = parameters.GetDefaultParameterMap("bspline", 5, 5.0)
    else:
        raise ValueError(kind)
    pm["WriteResultImage"] = ["false"]
    for key, value in overrides.items():
        pm[key] = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    parameters.AddParameterMap(pm)
    return parameters


def elastix_register(fixed: sitk.Image, moving: sitk.Image, kind: str = "default", **overrides: object
                     ) -> sitk.Image:
    """elastix B-spline registration, fixed -> moving; transformix's deformation field."""
    import itk
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(THREADS)
    f, m = _to_itk(fixed), _to_itk(moving)
    method = itk.ElastixRegistrationMethod.New(f, m)
    method.SetParameterObject(elastix_bspline_map(kind, **overrides))
    # (method.SetNumberOfThreads crashes itk-elastix 0.25.4; the global default above is used.)
    method.SetLogToConsole(False)
    method.UpdateLargestPossibleRegion()
    transform_parameters = method.GetTransformParameterObject()
    with tempfile.TemporaryDirectory() as scratch:        # transformix writes deformationField.nii there
        transformix = itk.TransformixFilter.New(m)
        transformix.SetTransformParameterObject(transform_parameters)
        transformix.SetComputeDeformationField(True)
        transformix.SetOutputDirectory(scratch)
        transformix.SetLogToConsole(False)
        transformix.UpdateLargestPossibleRegion()
        field = itk.array_from_image(transformix.GetOutputDeformationField())  # [z, y, x, 3], fixed grid
    return _field_on(fixed, field)


# ----------------------------------------------------------------------------- SimpleITK demons

DEMONS_SHRINK, DEMONS_SMOOTH_MM, DEMONS_ITERATIONS, DEMONS_SIGMA = (4, 2, 1), (4.0, 2.0, 0.0), (50, 50, 25), 1.5
# "At its best" (issue 11): the same schedule with more iterations at full resolution.
DEMONS_FULLRES_ITERATIONS = (50, 50, 100)
# ANTs SyNOnly CC with a full-resolution level: antspyx turns reg_iterations of length 3 into shrink
# factors 4x2x1 and smoothing sigmas 2x1x0 voxels (convergence [iterations, 1e-7, 8]).
ANTS_FULLRES_ITERATIONS = (100, 70, 50)


def _smooth_and_shrink(image: sitk.Image, shrink: int, sigma_mm: float) -> sitk.Image:
    smoothed = sitk.SmoothingRecursiveGaussian(image, sigma_mm) if sigma_mm > 0 else image
    if shrink == 1:
        return smoothed
    size = [max(1, int(round(n / shrink))) for n in image.GetSize()]
    spacing = [(n - 1) * s / max(m - 1, 1) for n, s, m in zip(image.GetSize(), image.GetSpacing(), size)]
    return sitk.Resample(smoothed, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                         image.GetDirection(), 0.0, image.GetPixelID())


def on_fixed_grid(moving: sitk.Image, fixed: sitk.Image) -> sitk.Image:
    """`moving` on the grid of `fixed` (itself when it lies there): a cubic B-spline, as STNeRP resamples a follow-up
    on another grid, and beyond `moving`'s grid its nearest voxel's value."""
    if Grid.of(moving).matches(Grid.of(fixed)):
        return moving
    return sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkBSpline, 0.0, moving.GetPixelID(), True)


def demons_register(fixed: sitk.Image, moving: sitk.Image,
                    iterations: tuple[int, int, int] = DEMONS_ITERATIONS) -> sitk.Image:
    """Multi-resolution SimpleITK DiffeomorphicDemons (shrink 4, 2, 1 with `iterations` at each;
    Gaussian field smoothing 1.5 voxels). No histogram matching: both images are CT in HU. SimpleITK's
    HistogramMatching (threshold at the mean intensity) leaves the lungs out of the match and
    extrapolates them: on the native chest it shifted them ~100 HU and demons misregistered them. Demons compares
    the two voxel for voxel: a moving image on another grid is resampled onto the fixed one first (on_fixed_grid)."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(THREADS)
    fixed, moving = _as_float(fixed), on_fixed_grid(_as_float(moving), fixed)
    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(DEMONS_SIGMA)
    field = None
    for shrink, sigma, count in zip(DEMONS_SHRINK, DEMONS_SMOOTH_MM, iterations):
        f = _smooth_and_shrink(fixed, shrink, sigma)
        m = _smooth_and_shrink(moving, shrink, sigma)
        if field is None:
            field = sitk.Image(f.GetSize(), sitk.sitkVectorFloat64)
            field.CopyInformation(f)
        else:
            field = sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
        demons.SetNumberOfIterations(count)
        field = demons.Execute(f, m, field)
    return sitk.Cast(field, sitk.sitkVectorFloat64)


# ----------------------------------------------------------------------------- registry

PEERS: dict[str, dict[str, Any]] = {
    "ants_syn": {
        "label": "ANTs SyN (default)", "package": "ants",
        "run": lambda f, m: ants_register(f, m, type_of_transform="SyN"),
        "config": "antspyx ants.registration(type_of_transform='SyN'): affine (Mattes MI) + SyN "
                  "(Mattes MI, grad_step 0.2, flow_sigma 3, reg_iterations (40, 20, 0)), all antspyx defaults",
    },
    "ants_synonly_cc": {
        "label": "ANTs SyNOnly CC", "package": "ants",
        "run": lambda f, m: ants_register(f, m, type_of_transform="SyNOnly", syn_metric="CC", syn_sampling=4),
        "config": "antspyx ants.registration(type_of_transform='SyNOnly', syn_metric='CC', syn_sampling=4 "
                  "(CC radius)); other settings antspyx defaults (reg_iterations (40, 20, 0))",
    },
    "ants_synonly_cc_fullres": {
        "label": "ANTs SyNOnly CC, full resolution", "package": "ants",
        "run": lambda f, m: ants_register(f, m, type_of_transform="SyNOnly", syn_metric="CC", syn_sampling=4,
                                          reg_iterations=ANTS_FULLRES_ITERATIONS),
        "config": "antspyx ants.registration(type_of_transform='SyNOnly', syn_metric='CC', syn_sampling=4 "
                  f"(CC radius), reg_iterations={ANTS_FULLRES_ITERATIONS}: shrink 4x2x1, smoothing 2x1x0 voxels, "
                  "i.e. with a full-resolution level); other settings antspyx defaults",
    },
    "elastix_bspline": {
        "label": "elastix B-spline (default map)", "package": "itk",
        "run": lambda f, m: elastix_register(f, m, "default"),
        "config": "itk-elastix GetDefaultParameterMap('bspline'): 4 levels, final grid 10 mm, Mattes MI + "
                  "bending energy, ASGD 256 iterations, 2048 random samples",
    },
    "elastix_bspline_multires": {
        "label": "elastix B-spline (multi-res map)", "package": "itk",
        "run": lambda f, m: elastix_register(f, m, "multires"),
        "config": "itk-elastix GetDefaultParameterMap('bspline', 5, 5.0): 5 levels, final grid 5 mm, "
                  "Mattes MI + bending energy, ASGD 256 iterations, 2048 random samples",
    },
    "sitk_demons": {
        "label": "SimpleITK diffeomorphic demons (multi-res)", "package": "SimpleITK",
        "run": demons_register,
        "config": f"SimpleITK DiffeomorphicDemonsRegistrationFilter, shrink {DEMONS_SHRINK}, image smoothing "
                  f"{DEMONS_SMOOTH_MM} mm, iterations {DEMONS_ITERATIONS}, field smoothing {DEMONS_SIGMA} voxels, "
                  "no histogram matching (CT in HU)",
    },
    "sitk_demons_fullres": {
        "label": "SimpleITK diffeomorphic demons (multi-res, more full-res iterations)", "package": "SimpleITK",
        "run": lambda f, m: demons_register(f, m, DEMONS_FULLRES_ITERATIONS),
        "config": f"as sitk_demons with iterations {DEMONS_FULLRES_ITERATIONS} (4x the full-resolution ones)",
    },
}


def available(name: str) -> bool:
    """Whether the package a peer needs is importable."""
    return importlib.util.find_spec(PEERS[name]["package"]) is not None


def register(name: str, fixed: sitk.Image, moving: sitk.Image) -> sitk.Image:
    """Run peer `name` with fixed = time-t image, moving = reference; the field u (our convention)."""
    return PEERS[name]["run"](fixed, moving)
