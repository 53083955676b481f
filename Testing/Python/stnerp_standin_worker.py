"""A stand-in for `python -m STNeRPLib` that speaks the worker contract (STNeRPLib/contract.py:
command line, JSON events, exit codes, run folder layout) but writes a known analytic field
instead of training. It needs no torch, so the module's scene side is tested number by number
in pytest and in Slicer's self-test on a machine without PyTorch.

STNERP_STANDIN_MODE chooses the behaviour: "ok" (default), "fail" (error event, exit 1),
"slow" (progress until cancelled, then run.json "interrupted", exit 130), "incomplete"
(exit 0 but run.json "failed").

Field at time t (LPS mm, time-t point p -> reference point p + u_t(p)):
u_t(p) = (t - t_ref) * a(p), a(p) = (1.5 sin(2 pi z / 40), 1.0 cos(2 pi x / 50), 0.6), p in mm.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, os.environ.get("STNERP_LIB_PARENT", os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))
from STNeRPLib import contract  # noqa: E402


def emit(**event: object) -> None:
    sys.stdout.write(contract.json_line(event) + "\n")
    sys.stdout.flush()


def analytic(points: np.ndarray, scale: float) -> np.ndarray:
    """u at physical points [..., 3] (LPS mm): the analytic field times `scale`."""
    u = np.zeros_like(points)
    u[..., 0] = 1.5 * np.sin(2 * math.pi * points[..., 2] / 40.0)
    u[..., 1] = 1.0 * np.cos(2 * math.pi * points[..., 0] / 50.0)
    u[..., 2] = 0.6
    return u * scale


def grid_points(grid: sitk.Image) -> np.ndarray:
    """Physical points (LPS mm) of every voxel of `grid`, [i, j, k, 3]."""
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in grid.GetSize()], indexing="ij"), axis=-1)
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    return np.array(grid.GetOrigin()) + (index * np.array(grid.GetSpacing())) @ direction.T


def field_image(values: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.transpose(values, (2, 1, 0, 3)), isVector=True)
    image.CopyInformation(grid)
    return image


def displacement(grid: sitk.Image, scale: float) -> sitk.Image:
    """The analytic field times `scale` on the grid of `grid` (vector float64, LPS mm)."""
    return field_image(analytic(grid_points(grid), scale), grid)


def inverse_displacement(grid: sitk.Image, scale: float, iterations: int = 100) -> sitk.Image:
    """w on the reference grid with r + w(r) + u(r + w(r)) = r: the inverse map, by fixed-point
    iteration on the analytic field (no interpolation)."""
    points = grid_points(grid)
    w = -analytic(points, scale)
    for _ in range(iterations):
        w = -analytic(points + w, scale)
    return field_image(w, grid)


def write_time_point(run_dir: str, t: float, t_ref: float, grid: sitk.Image, reference: sitk.Image,
                     labelmap: sitk.Image | None, scan: sitk.Image | None, truth: sitk.Image | None) -> dict:
    """Write one time point's files as the worker does and return its run.json entry."""
    folder = contract.time_point_folder(t)
    os.makedirs(os.path.join(run_dir, folder), exist_ok=True)
    files = {kind: f"{folder}/{kind}.nrrd" for kind in contract.TIME_POINT_FILES}
    field = displacement(grid, t - t_ref)
    transform = sitk.DisplacementFieldTransform(sitk.Image(field))
    jacobian = sitk.Cast(sitk.DisplacementFieldJacobianDeterminant(field), sitk.sitkFloat32)
    sitk.WriteImage(field, os.path.join(run_dir, files["displacement"]))
    sitk.WriteImage(jacobian, os.path.join(run_dir, files["jacobian"]))
    image = sitk.Resample(reference, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    sitk.WriteImage(image, os.path.join(run_dir, files["image"]))
    sitk.WriteImage(inverse_displacement(reference, t - t_ref), os.path.join(run_dir, files["inverse_displacement"]))
    values = sitk.GetArrayFromImage(jacobian)
    metrics = {"folded_voxels": int((values <= 0).sum()), "jacobian_min": float(values.min()),
               "jacobian_max": float(values.max()), "psnr": None, "ssim": None, "dice": {},
               "tre_mean": None, "tre_std": None, "tre_max": None}
    files["labelmap"] = None
    if labelmap is not None:
        warped = sitk.Resample(labelmap, grid, transform, sitk.sitkNearestNeighbor, 0, labelmap.GetPixelID())
        files["labelmap"] = f"{folder}/labelmap.nrrd"
        sitk.WriteImage(warped, os.path.join(run_dir, files["labelmap"]))
        if truth is not None:
            metrics["dice"] = dice(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(truth))
    if scan is not None:
        metrics.update(psnr=30.0 + t, ssim=0.9)
    return {"time": t, "scanned": scan is not None, **files, "image_sources": [t_ref], "metrics": metrics}


def dice(a: np.ndarray, b: np.ndarray) -> dict:
    labels = sorted(set(np.unique(a).tolist()) - {0})
    return {str(int(v)): float(2 * np.logical_and(a == v, b == v).sum() / max((a == v).sum() + (b == v).sum(), 1))
            for v in labels}


def train(args: argparse.Namespace, record: dict) -> int:
    mode = os.environ.get("STNERP_STANDIN_MODE", "ok")
    if mode == "fail":
        emit(event=contract.EVENT_ERROR, message="stand-in failure: out of memory on the device")
        record.update(status=contract.STATUS_FAILED, error="stand-in failure")
        return contract.EXIT_FAILURE
    if mode == "slow":
        for i in range(10 ** 9):
            emit(event=contract.EVENT_PROGRESS, stage=contract.STAGE_DEFNET, iteration=i, total=10 ** 9,
                 loss=1.0 / (i + 1), eta=1000.0)
            time.sleep(0.05)
    reference = sitk.ReadImage(args.reference)
    labelmap = sitk.ReadImage(args.segmentation) if args.segmentation else None
    truth = {float(t): sitk.ReadImage(p) for p, t in args.ground_truth}
    # what predict needs, kept in the run folder (the module deletes its input folder)
    sitk.WriteImage(reference, os.path.join(args.output, "reference.nrrd"))
    if labelmap is not None:
        sitk.WriteImage(labelmap, os.path.join(args.output, "reference_labelmap.nrrd"))
    total = args.iterations or 3
    for i in range(total):
        emit(event=contract.EVENT_PROGRESS, stage=contract.STAGE_DEFNET, iteration=i + 1, total=total,
             loss=0.1, eta=0.0)
    scans = [(args.reference_time, reference)] + [(float(t), sitk.ReadImage(p)) for p, t in args.follow_up]
    points = [(t, image, image) for t, image in scans] + [(float(t), reference, None) for t in args.predict_times]
    for i, (t, grid, scan) in enumerate(points, 1):
        emit(event=contract.EVENT_PROGRESS, stage=contract.STAGE_OUTPUTS, iteration=i, total=len(points))
        record["time_points"].append(write_time_point(args.output, t, args.reference_time, grid, reference,
                                                      labelmap, scan, truth.get(t)))
    with open(os.path.join(args.output, "model.pt"), "w") as handle:
        handle.write("stand-in")
    record.update(model="model.pt", metrics_table=None, intensity_window=[-1000.0, 500.0])
    if mode == "incomplete":
        record.update(status=contract.STATUS_FAILED, error="stand-in: outputs not written")
        return contract.EXIT_OK
    record["status"] = contract.STATUS_COMPLETE
    return contract.EXIT_OK


def predict(args: argparse.Namespace, record: dict) -> int:
    base = contract.read_run(args.run)
    reference = sitk.ReadImage(os.path.join(args.run, "reference.nrrd"))
    label_path = os.path.join(args.run, "reference_labelmap.nrrd")
    labelmap = sitk.ReadImage(label_path) if os.path.isfile(label_path) else None
    for t in args.times:
        record["time_points"].append(write_time_point(args.output, float(t), base["reference_time"], reference,
                                                      reference, labelmap, None, None))
    record.update(model=os.path.join(args.run, "model.pt"), status=contract.STATUS_COMPLETE)
    return contract.EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = contract.parse_arguments(sys.argv[1:] if argv is None else argv)   # the worker's own command line
    contract.stop_on_interruption(args.cancel_on_stdin_close)
    os.makedirs(args.output)
    record = {"status": contract.STATUS_RUNNING, "error": None, "command": args.command,
              "reference_time": getattr(args, "reference_time", None), "time_points": []}
    contract.write_run(args.output, record)
    try:
        code = train(args, record) if args.command == "train" else predict(args, record)
    except KeyboardInterrupt:
        record.update(status=contract.STATUS_INTERRUPTED, error="interrupted: outputs are incomplete")
        code = contract.EXIT_INTERRUPTED
    contract.write_run(args.output, record)
    if record["status"] == contract.STATUS_COMPLETE:
        emit(event=contract.EVENT_DONE, status=contract.STATUS_COMPLETE, output=args.output)
    return code


if __name__ == "__main__":
    sys.exit(main())
