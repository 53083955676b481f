"""A stand-in for ``python -m STNeRPLib`` that speaks the worker contract exactly (command line,
JSON events, exit codes, run folder) but computes known analytic fields instead of training.

Used by the module tests so the scene side can be checked number by number, independently of
the engine. Behaviour is chosen with the environment variable STNERP_FAKE_MODE:
``ok`` (default), ``fail`` (error event + exit 1), ``slow`` (progress forever until SIGTERM,
then run.json "interrupted" and exit 130), ``incomplete`` (exit 0 but run.json "failed").

Field at time t (LPS mm, time-t point -> reference point): u_t(p) = (t - t_ref) * a(p) with
a(p) = (1.5 sin(2 pi z / 40), 1.0 cos(2 pi x / 50), 0.6) evaluated at the physical point p.
"""

import argparse
import json
import math
import os
import signal
import sys
import time

import numpy as np
import SimpleITK as sitk


def emit(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def field_on_grid(grid, scale):
    """Displacement image (vector float64) on the grid of ``grid``."""
    size = grid.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in size], indexing="ij"), axis=-1)  # i,j,k
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    spacing = np.array(grid.GetSpacing())
    origin = np.array(grid.GetOrigin())
    phys = origin + (idx * spacing) @ direction.T  # (i,j,k,3) LPS
    u = np.zeros_like(phys)
    u[..., 0] = 1.5 * np.sin(2 * math.pi * phys[..., 2] / 40.0)
    u[..., 1] = 1.0 * np.cos(2 * math.pi * phys[..., 0] / 50.0)
    u[..., 2] = 0.6
    u *= scale
    arr = np.transpose(u, (2, 1, 0, 3))  # k,j,i,3
    img = sitk.GetImageFromArray(arr, isVector=True)
    img.CopyInformation(grid)
    return img


def write_time_point(run_dir, t, t_ref, grid, reference, labelmap, scanned, target=None, ground_truth=None):
    folder = "t_%s" % (("%g" % t).replace(".", "p").replace("-", "m"))
    os.makedirs(os.path.join(run_dir, folder), exist_ok=True)
    disp = field_on_grid(grid, t - t_ref)
    sitk.WriteImage(disp, os.path.join(run_dir, folder, "displacement.nrrd"))
    tx = sitk.DisplacementFieldTransform(sitk.Image(disp))
    jac = sitk.DisplacementFieldJacobianDeterminant(disp)
    sitk.WriteImage(sitk.Cast(jac, sitk.sitkFloat32), os.path.join(run_dir, folder, "jacobian.nrrd"))
    image = sitk.Resample(reference, grid, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    sitk.WriteImage(image, os.path.join(run_dir, folder, "image.nrrd"))
    entry = {"time": t, "scanned": scanned, "displacement": folder + "/displacement.nrrd",
             "jacobian": folder + "/jacobian.nrrd", "labelmap": None, "image": folder + "/image.nrrd"}
    jarr = sitk.GetArrayFromImage(jac)
    metrics = {"folded_voxels": int((jarr <= 0).sum()), "jacobian_min": float(jarr.min()),
               "jacobian_max": float(jarr.max()), "psnr": None, "ssim": None, "dice": {},
               "tre_mean": None, "tre_std": None, "tre_max": None}
    if labelmap is not None:
        warped = sitk.Resample(labelmap, grid, tx, sitk.sitkNearestNeighbor, 0, labelmap.GetPixelID())
        sitk.WriteImage(warped, os.path.join(run_dir, folder, "labelmap.nrrd"))
        entry["labelmap"] = folder + "/labelmap.nrrd"
        if ground_truth is not None:
            a = sitk.GetArrayFromImage(warped)
            b = sitk.GetArrayFromImage(ground_truth)
            for v in sorted(set(np.unique(a).tolist()) - {0}):
                inter = np.logical_and(a == v, b == v).sum()
                metrics["dice"][str(int(v))] = float(2 * inter / max((a == v).sum() + (b == v).sum(), 1))
    if target is not None:
        metrics["psnr"] = 30.0 + t
        metrics["ssim"] = 0.9
    entry["metrics"] = metrics
    return entry


def write_run(run_dir, record):
    tmp = os.path.join(run_dir, "run.json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(run_dir, "run.json"))


def train(args):
    mode = os.environ.get("STNERP_FAKE_MODE", "ok")
    os.makedirs(args.output, exist_ok=True)
    record = {"status": "running", "error": None, "reference_time": args.reference_time, "time_points": [],
              "model": "model.pt", "metrics_table": "metrics.csv"}
    write_run(args.output, record)
    emit(event="progress", stage="load", iteration=0, total=1, loss=None, eta=None)
    if mode == "fail":
        emit(event="error", message="fake failure: out of memory on the device")
        record.update(status="failed", error="fake failure")
        write_run(args.output, record)
        return 1
    if mode == "slow":
        stop = {"flag": False}

        def handler(signum, frame):
            stop["flag"] = True
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        i = 0
        while not stop["flag"]:
            emit(event="progress", stage="defnet", iteration=i, total=100000, loss=1.0 / (i + 1), eta=1000.0)
            time.sleep(0.05)
            i += 1
        record.update(status="interrupted")
        write_run(args.output, record)
        return 130
    reference = sitk.ReadImage(args.reference)
    labelmap = sitk.ReadImage(args.segmentation) if args.segmentation else None
    gt = {float(t): sitk.ReadImage(p) for p, t in (args.ground_truth or [])}
    # keep what predict needs inside the run folder (the module deletes its input folder)
    sitk.WriteImage(reference, os.path.join(args.output, "reference.nrrd"))
    if labelmap is not None:
        sitk.WriteImage(labelmap, os.path.join(args.output, "reference_labelmap.nrrd"))
    for i in range(args.iterations or 3):
        emit(event="progress", stage="defnet", iteration=i + 1, total=args.iterations or 3, loss=0.1, eta=0.0)
    emit(event="progress", stage="outputs", iteration=0, total=1, loss=None, eta=None)
    for path, t in args.follow_up:
        t = float(t)
        grid = sitk.ReadImage(path)
        record["time_points"].append(write_time_point(args.output, t, args.reference_time, grid, reference,
                                                      labelmap, True, target=grid, ground_truth=gt.get(t)))
    for t in args.predict_times or []:
        record["time_points"].append(write_time_point(args.output, float(t), args.reference_time, reference,
                                                      reference, labelmap, False))
    with open(os.path.join(args.output, "model.pt"), "w") as f:
        json.dump({"fake": True}, f)
    record["status"] = "complete"
    if mode == "incomplete":
        record["status"] = "failed"
        record["error"] = "fake: outputs not written"
    write_run(args.output, record)
    emit(event="done", status="complete", output=args.output)
    return 0


def predict(args):
    with open(os.path.join(args.run, "run.json")) as f:
        base = json.load(f)
    os.makedirs(args.output, exist_ok=True)
    reference = sitk.ReadImage(os.path.join(args.run, "reference.nrrd"))
    lab_path = os.path.join(args.run, "reference_labelmap.nrrd")
    labelmap = sitk.ReadImage(lab_path) if os.path.isfile(lab_path) else None
    record = {"status": "running", "error": None, "reference_time": base["reference_time"], "time_points": [],
              "model": os.path.join(args.run, "model.pt"), "metrics_table": "metrics.csv"}
    for t in args.times:
        record["time_points"].append(write_time_point(args.output, float(t), base["reference_time"], reference,
                                                      reference, labelmap, False))
    record["status"] = "complete"
    write_run(args.output, record)
    emit(event="done", status="complete", output=args.output)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="stnerp_fake_worker")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--reference", required=True)
    t.add_argument("--reference-time", type=float, default=0.0)
    t.add_argument("--follow-up", nargs=2, action="append", required=True, metavar=("PATH", "TIME"))
    t.add_argument("--segmentation")
    t.add_argument("--landmarks")
    t.add_argument("--ground-truth", nargs=2, action="append", metavar=("PATH", "TIME"))
    t.add_argument("--predict-times", nargs="+", type=float)
    t.add_argument("--output", required=True)
    t.add_argument("--preset", default="default")
    t.add_argument("--iterations", type=int)
    t.add_argument("--device", default="auto")
    t.add_argument("--prior")
    t.add_argument("--prealign", default="none")
    t.add_argument("--json-events", action="store_true")
    p = sub.add_parser("predict")
    p.add_argument("--run", required=True)
    p.add_argument("--times", nargs="+", type=float, required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--json-events", action="store_true")
    args = parser.parse_args(argv)
    try:
        return train(args) if args.command == "train" else predict(args)
    except Exception as exc:  # contract: one-line error event, exit 1
        emit(event="error", message=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return 1


if __name__ == "__main__":
    sys.exit(main())
