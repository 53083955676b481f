"""Benchmark STNeRP against the pairwise tools users would pick instead (issue 4).

    .venv/bin/python benchmarks/compare.py --quick             # small volumes, few iterations
    .venv/bin/python benchmarks/compare.py                     # the full benchmark
    .venv/bin/python benchmarks/compare.py --series breathing --methods stnerp_default,ants_syn
    .venv/bin/python benchmarks/compare.py --memory-check      # STNeRP default, 256x256x128 x 10 phases

Every method runs on the same series (written once to a scratch folder by benchmarks/data.py),
each (method, series) in its own child process, so peak resident memory (ru_maxrss) does not
mix between methods. Peers register the reference (moving) to each time point (fixed) pairwise;
STNeRP fits the whole series once and writes every output (displacement, Jacobian, labelmap,
predicted image, model) for every time point, all inside its timed wall time. Every result is
the displacement u on the time-t grid mapping time-t points to reference points, and every method
is scored by the same code from its field:

- TRE (mm) on landmarks with exact correspondence: |q + u(q) - r|;
- dense displacement error (mm): mean |u - u_true| over the body mask of the time-t image;
- Dice of the reference labelmap carried to time t through u (nearest neighbour);
- folded voxels: det(I + grad u) <= 0 over the whole grid;
- PSNR / SSIM (intensities windowed [-1000, 500] HU -> [0, 1]) of the reference warped by u
  (linear) against the time-t image;
- wall time of the whole series and per registered time point, and peak RSS of the child.

For STNeRP with continuous time, a held-out run trains without one time point and predicts the
image there (STNeRPLib.warping: motion-compensated interpolation of the two scans around it); it
is compared with linear intensity interpolation of its two neighbours and with the best peer's
pairwise result at that time (a peer that saw the image).

Results: benchmarks/results/benchmark_<date>.md and .json, with the machine description.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

RESULTS = HERE / "results"
THREADS = 2

STNERP_METHODS = {  # prior None: the preset's own (default preset: the image, cubic B-spline; paper: Ref-Net)
    "stnerp_default": {"label": "STNeRP default", "preset": "default", "prior": None, "temporal": True},
    "stnerp_paper": {"label": "STNeRP paper", "preset": "paper", "prior": None, "temporal": True},
    "stnerp_refnet": {"label": "STNeRP default with Ref-Net prior", "preset": "default", "prior": "refnet",
                      "temporal": True},
    "stnerp_not": {"label": "STNeRP default w/o t", "preset": "default", "prior": None, "temporal": False},
}
PEER_METHODS = ["ants_syn", "ants_synonly_cc", "elastix_bspline", "elastix_bspline_multires", "sitk_demons"]
BASELINES = {"none": "no registration", "exact": "exact motion (the phantom's own u)"}
ALL_METHODS = list(STNERP_METHODS) + PEER_METHODS + list(BASELINES)
ALL_SERIES = ["breathing", "longitudinal", "chest"]


# ============================================================================ series


def series_specs(args) -> dict:
    """name -> (builder kwargs). Full: the issue's ~96x96x64 phantoms; quick: a quarter of that."""
    if args.quick:
        phantom_size, phantom_spacing, chest_spacing = (48, 48, 32), (6.0, 6.0, 8.0), 6.0
    else:
        phantom_size, phantom_spacing, chest_spacing = (96, 96, 64), (3.0, 3.0, 4.0), args.chest_spacing
    return {
        "breathing": dict(kind="breathing", size=phantom_size, spacing=phantom_spacing, count=10, heldout=3),
        "longitudinal": dict(kind="longitudinal", size=phantom_size, spacing=phantom_spacing, count=5, heldout=2),
        "chest": dict(kind="chest", spacing=chest_spacing, count=10, heldout=3),
        # The paper preset cannot run on the full grid on a CPU (see README of the results):
        "breathing_paper": dict(kind="breathing", size=tuple(args.paper_size),
                                spacing=tuple(96 * 3.0 / n if i < 2 else 64 * 4.0 / n
                                              for i, n in enumerate(args.paper_size)), count=10, heldout=3),
    }


def build_series(name: str, spec: dict, scratch: Path) -> Path | None:
    from benchmarks import data
    folder = scratch / name
    if (folder / "meta.json").exists():
        return folder
    if spec["kind"] == "chest":
        if not data.chest_available():
            return None
        return data.chest_series(folder, spec["spacing"], spec["count"], spec["heldout"])
    return data.phantom_series(folder, spec["kind"], spec["size"], spec["spacing"], spec["count"], spec["heldout"])


# ============================================================================ evaluation (child)


def _window(array: np.ndarray) -> np.ndarray:
    from STNeRPLib.preprocessing import CT_WINDOW
    low, high = CT_WINDOW
    return np.clip((np.asarray(array, np.float64) - low) / (high - low), 0.0, 1.0)


def _warp(image, field, interpolator, default):
    """image resampled through u onto the field's grid; points mapped outside the image take the
    nearest border value (the anatomy continues beyond the field of view)."""
    import SimpleITK as sitk
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    return sitk.Resample(image, field, transform, interpolator, default, image.GetPixelID(), True)


def evaluate_field(series, k: int, field) -> dict:
    """Every metric of one time point from the field u (VectorFloat64 on the time-k grid)."""
    import SimpleITK as sitk
    from STNeRPLib import metrics
    reference, target = series.image(0), series.image(k)
    truth = sitk.GetArrayFromImage(series.displacement(k))
    u = sitk.GetArrayFromImage(field)
    body = series.body(k)
    dense = np.linalg.norm(u - truth, axis=-1)[body]
    points, reference_points = series.landmarks(k)
    tre = metrics.target_registration_error(metrics.map_points(field, points), reference_points)
    labels = _warp(series.labelmap(0), field, sitk.sitkNearestNeighbor, 0)
    label_ids = [int(i) for i in series.meta["labels"]]
    dice = metrics.dice_per_label(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(series.labelmap(k)),
                                  label_ids)
    jacobian = sitk.GetArrayFromImage(metrics.jacobian_determinant(field))
    warped = _window(sitk.GetArrayFromImage(_warp(reference, field, sitk.sitkLinear, -1000.0)))
    actual = _window(sitk.GetArrayFromImage(target))
    return {"time": series.times[k], **tre, "dense_error_mean": float(dense.mean()),
            "dense_error_max": float(dense.max()), "dice": {str(i): v for i, v in dice.items()},
            **metrics.folding_statistics(jacobian), "psnr": metrics.psnr(warped, actual),
            "ssim": metrics.ssim(warped, actual)}


def summarise(per_time: list[dict], labels: dict) -> dict:
    def mean(key):
        return float(np.mean([p[key] for p in per_time]))
    tre = [p["tre_mean"] for p in per_time]
    out = {"tre_mean": mean("tre_mean"), "tre_std": float(np.sqrt(np.mean([p["tre_std"] ** 2 for p in per_time])
                                                                   + np.var(tre))),
           "tre_max": float(max(p["tre_max"] for p in per_time)), "dense_error_mean": mean("dense_error_mean"),
           "folded_voxels": int(sum(p["folded_voxels"] for p in per_time)),
           "jacobian_min": float(min(p["jacobian_min"] for p in per_time)),
           "psnr": mean("psnr"), "ssim": mean("ssim"),
           "dice": {label: float(np.nanmean([p["dice"][label] for p in per_time])) for label in labels}}
    out["dice_mean"] = float(np.nanmean(list(out["dice"].values())))
    return out


# ============================================================================ methods (child)


def _set_threads():
    import torch
    torch.set_num_threads(THREADS)
    import SimpleITK as sitk
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(THREADS)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_peer(name: str, series, work: Path) -> tuple[list, dict]:
    import SimpleITK as sitk
    from benchmarks import peers
    from STNeRPLib.metrics import jacobian_determinant
    # Warm-up outside the timing: imports and ITK's lazy module loading.
    if peers.PEERS[name]["package"] == "ants":
        import ants  # noqa: F401
    elif peers.PEERS[name]["package"] == "itk":
        import itk
        _ = (itk.ElastixRegistrationMethod, itk.TransformixFilter, itk.ParameterObject, itk.image_from_array)
    reference = series.image(0)
    fields, per_time = [], []
    start = time.perf_counter()
    for k in range(1, len(series.times)):
        t0 = time.perf_counter()
        field = peers.register(name, series.image(k), reference)
        sitk.WriteImage(field, str(work / f"displacement_{k}.nrrd"))          # outputs, as STNeRP's
        sitk.WriteImage(jacobian_determinant(field), str(work / f"jacobian_{k}.nrrd"))
        per_time.append(time.perf_counter() - t0)
        fields.append(field)
    total = time.perf_counter() - start
    return fields, {"wall_seconds": total, "seconds_per_time": per_time, "peak_rss_mb_run": _peak_rss_mb(),
                    "config": peers.PEERS[name]["config"]}


def _stnerp_options(method: str, iterations: int | None):
    from STNeRPLib.presets import Options
    from STNeRPLib.presets import PRESETS
    spec = STNERP_METHODS[method]
    preset = PRESETS[spec["preset"]]
    if iterations:
        preset = preset.with_iterations(iterations)
    return Options(preset, prior=spec["prior"], temporal=spec["temporal"])


def run_stnerp(method: str, series, work: Path, iterations: int | None, skip: int | None = None):
    """Fit the whole series (without time index `skip`, if given) and write every output for every
    fitted time point as the product does (outputs.write_time_point: displacement, Jacobian,
    labelmap, predicted image), plus the model file."""
    from STNeRPLib.geometry import Grid
    from STNeRPLib.outputs import TimePoint, write_time_point
    from STNeRPLib.pipeline import fit
    from STNeRPLib.progress import Reporter
    options = _stnerp_options(method, iterations)
    indices = [k for k in range(len(series.times)) if k != skip]
    images = {k: series.image(k) for k in indices}
    segmentation = series.labelmap(0)
    start = time.perf_counter()
    model, _ = fit(images[0], series.times[0], [(series.times[k], images[k]) for k in indices[1:]],
                   segmentation, options, Reporter(interval=1e9))
    fit_seconds = time.perf_counter() - start
    model.save(work / "model.pt")
    per_time, fields = [], {}
    for k in indices:
        t0 = time.perf_counter()
        fields[k] = write_time_point(model, TimePoint(series.times[k], Grid.of(images[k])), work, None).field
        per_time.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    info = {"wall_seconds": total, "fit_seconds": fit_seconds, "outputs_seconds": total - fit_seconds,
            "seconds_per_time": per_time, "peak_rss_mb_run": _peak_rss_mb(), "preset": options.preset.to_dict(),
            "prior": options.prior, "temporal": options.temporal}
    return model, fields, info


def stnerp_flops(model, series, n_times: int, training_seconds: float | None) -> dict:
    """FLOPs of STNeRP's training, counted: the MLPs' forward + backward per sampled point measured
    with torch's FlopCounterMode on one batch (matmuls; = 3 x forward multiply-adds x 2), times
    points x iterations; plus an analytic estimate of scaling and squaring and of the trilinear
    look-ups, which FlopCounterMode does not count (~60 FLOPs a grid point and composition
    forward, x3 with backward; a cubic B-spline look-up of the prior ~170: 64 taps and their weights)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    preset = model.preset
    voxels = int(np.prod(model.grid.size))
    velocity_points = int(np.prod(model.deformation.velocity_shape))

    def per_point(net, inputs):
        x = [torch.rand(256, *s) for s in inputs]
        counter = FlopCounterMode(display=False)
        with counter:
            net(*x).sum().backward()
        flops_train = counter.get_total_flops() / 256
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net(*x)
        return flops_train, counter.get_total_flops() / 256

    from STNeRPLib.model import new_ref_net
    breakdown = {}
    if model.prior_kind == "refnet":
        ref_train, ref_forward = per_point(new_ref_net(preset, torch.Generator().manual_seed(0)), [(3,)])
        ref_points = preset.ref_points if 0 < preset.ref_points < voxels else voxels
        breakdown["refnet_training"] = ref_train * ref_points * preset.ref_iterations
        if preset.prior_cache:
            breakdown["refnet_cache_forward"] = ref_forward * voxels
    per_iteration = getattr(preset, "def_times", 0)  # time points drawn per Def-Net iteration (0: all)
    n_times = min(per_iteration, n_times) if per_iteration and per_iteration > 0 else n_times
    net = model.deformation.nets[0]
    def_train, _ = per_point(lambda c, t: net(c, t), [(3,), (1,)])
    breakdown["defnet_training"] = def_train * velocity_points * n_times * preset.def_iterations
    def_points = preset.def_points if 0 < preset.def_points < voxels else voxels
    from STNeRPLib.presets import Options
    volume_prior = Options(preset, prior=model.prior_kind).prior_is_volume
    prior_lookup = 170.0 if volume_prior and preset.prior_interpolation == "cubic" else 60.0
    breakdown["integration_and_sampling_training"] = 3.0 * preset.def_iterations * n_times * (
        60.0 * velocity_points * preset.squaring_steps + (60.0 + prior_lookup) * def_points)
    total = float(sum(breakdown.values()))
    out = {"training_flops": total, "breakdown": {k: float(v) for k, v in breakdown.items()}}
    if training_seconds:
        out["training_seconds"] = training_seconds
        out["achieved_gflops"] = total / training_seconds / 1e9
    return out


def child(job: dict) -> None:
    """Run one (method, series) job and write its JSON result."""
    _set_threads()
    from benchmarks import data
    series = data.Series(Path(job["series"]))
    method = job["method"]
    work = Path(tempfile.mkdtemp(prefix=f"bench_{method}_"))
    result = {"method": method, "series": series.meta["name"], "ok": True}
    try:
        if job.get("heldout") is not None:
            result.update(run_heldout(method, series, work, job))
        else:
            if method in BASELINES:
                start = time.perf_counter()
                fields = {k: _baseline_field(method, series, k) for k in range(1, len(series.times))}
                info = {"wall_seconds": time.perf_counter() - start, "seconds_per_time": [],
                        "peak_rss_mb_run": _peak_rss_mb()}
            elif method in STNERP_METHODS:
                model, fields, info = run_stnerp(method, series, work, job.get("iterations"))
                if job.get("flops"):
                    info["flops"] = stnerp_flops(model, series, len(series.times), info["fit_seconds"])
            else:
                fields, info = run_peer(method, series, work)
                fields = dict(enumerate(fields, 1))
            result.update(info)
            if job.get("tre_only"):  # memory check: the full evaluation of huge grids is not needed
                from STNeRPLib import metrics
                tre = [metrics.target_registration_error(metrics.map_points(fields[k], series.landmarks(k)[0]),
                                                         series.landmarks(k)[1])["tre_mean"]
                       for k in range(1, len(series.times))]
                result["summary"] = {"tre_mean": float(np.mean(tre))}
            else:
                per_time = [evaluate_field(series, k, fields[k]) for k in range(1, len(series.times))]
                result["per_time"] = per_time
                result["summary"] = summarise(per_time, series.meta["labels"])
            result["registered_time_points"] = len(series.times) - 1
            result["seconds_per_registered_time"] = info["wall_seconds"] / (len(series.times) - 1)
    except Exception as error:  # report, do not take the benchmark down
        import traceback
        result.update(ok=False, error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(job["out"]).write_text(json.dumps(result, indent=1, default=float))


def _baseline_field(method: str, series, k: int):
    """'none': u = 0; 'exact': the series' ground-truth u, what a perfect registration would give
    (its scores are the ceiling of the scoring itself, e.g. Dice of a voxelised labelmap)."""
    import SimpleITK as sitk
    if method == "exact":
        return series.displacement(k)
    zero = sitk.Image(series.image(k).GetSize(), sitk.sitkVectorFloat64)
    zero.CopyInformation(series.image(k))
    return zero


def run_heldout(method: str, series, work: Path, job: dict) -> dict:
    """Train without time index h, predict there: predicted image, warped reference; vs linear
    interpolation of the neighbours h - 1 and h + 1."""
    import SimpleITK as sitk
    from STNeRPLib import metrics
    from STNeRPLib.geometry import Grid
    from STNeRPLib.warping import linear_interpolation, warp
    h = job["heldout"]
    model, _, info = run_stnerp(method, series, work, job.get("iterations"), skip=h)
    t = series.times[h]
    actual_image = series.image(h)
    actual = _window(sitk.GetArrayFromImage(actual_image))
    warped = warp(model, t, Grid.of(actual_image))
    field = Grid.of(actual_image).image(warped.displacement.astype(np.float64), vector=True)
    scores = evaluate_field(series, h, field)
    predicted = _window(warped.image)
    linear = _window(linear_interpolation({series.times[k]: sitk.GetArrayFromImage(series.image(k))
                                           for k in (h - 1, h + 1)}, t))
    return {"heldout_index": h, "heldout_time": t, "train_seconds": info["wall_seconds"],
            "predicted_image_psnr": metrics.psnr(predicted, actual), "predicted_image_ssim": metrics.ssim(predicted, actual),
            "warped_reference_psnr": scores["psnr"], "warped_reference_ssim": scores["ssim"],
            "tre_mean": scores["tre_mean"], "dice": scores["dice"], "folded_voxels": scores["folded_voxels"],
            "linear_psnr": metrics.psnr(linear, actual), "linear_ssim": metrics.ssim(linear, actual),
            "peak_rss_mb_run": info["peak_rss_mb_run"]}


# ============================================================================ parent


def run_job(job: dict, scratch: Path, timeout: float) -> dict:
    """Run a child process; its result plus ru_maxrss of that child alone (os.wait4)."""
    out = scratch / f"result_{job['method']}_{Path(job['series']).name}_{job.get('heldout')}.json"
    job = {**job, "out": str(out)}
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
           "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(THREADS), "BENCHMARK_THREADS": str(THREADS),
           "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = []
    deadline = start + timeout
    import selectors
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    killed = False
    while True:
        if time.perf_counter() > deadline and not killed:
            process.kill()
            killed = True
        if selector.select(timeout=1.0):
            line = process.stdout.readline()
            if not line:
                break
            log.append(line.decode(errors="replace"))
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if out.exists():
        result = json.loads(out.read_text())
    else:
        result = {"method": job["method"], "ok": False,
                  "error": "timed out" if killed else f"child exited with status {status}",
                  "log": "".join(log[-30:])}
    result["peak_rss_mb"] = usage.ru_maxrss / 1024.0
    result["process_seconds"] = elapsed
    return result


def matmul_gflops(threads: int = THREADS, n: int = 2048, repeats: int = 10) -> float:
    import torch
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeats / best / 1e9


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next((int(line.split()[1]) / 1024**2 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), None)
    import SimpleITK as sitk
    import torch
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "SimpleITK": sitk.Version_VersionString(), "numpy": np.__version__}
    for package, module in (("antspyx", "ants"), ("itk-elastix", "itk")):
        try:
            from importlib.metadata import version
            versions[package] = version(package)
        except Exception:
            versions[package] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(memory, 1) if memory else None,
            "threads_used": THREADS, "platform": platform.platform(), "versions": versions}


def _fmt(value, digits=2):
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def method_label(method: str) -> str:
    from benchmarks import peers
    if method in STNERP_METHODS:
        return STNERP_METHODS[method]["label"]
    if method in BASELINES:
        return BASELINES[method]
    return peers.PEERS[method]["label"]


def markdown(report: dict) -> str:
    lines = [f"# STNeRP benchmark — {report['date']}", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
             f"{report['machine']['ram_gb']} GB RAM; {THREADS} threads per method; measured fp32 matmul "
             f"{report['matmul_gflops']:.1f} GFLOP/s (torch, {THREADS} threads). Load average at start / end: "
             f"{report['load_start']} / {report['load_end']} (another job shared the machine when this was above "
             f"~{THREADS}). Peak RSS: ru_maxrss of the method's own process at the end of its timed run "
             f"(series loaded, fit/registration, outputs; before scoring)." + (" **Quick mode** (small volumes, few iterations): not the issue's figures."
                                 if report["quick"] else ""), ""]
    for name, series in report["series"].items():
        if series.get("skipped"):
            lines += [f"## {name}: skipped ({series['skipped']})", ""]
            continue
        meta = series["meta"]
        label_names = meta["labels"]
        lines += [f"## {name}: {meta['description']}", "",
                  f"Grid {meta['size']} voxels of {meta['spacing']} mm; {len(meta['times'])} time points "
                  f"(reference = first); peers make {len(meta['times']) - 1} pairwise registrations. "
                  f"Dice columns: {', '.join(f'{k} = {v}' for k, v in label_names.items())}.", "",
                  "| method | TRE mean ± std (max) mm | dense err mm | " + " | ".join(f"Dice {k}" for k in label_names)
                  + " | det J ≤ 0 | PSNR dB | SSIM | wall s (per t) | peak RSS MB (run) | note |",
                  "|---" * (10 + len(label_names)) + "|"]
        for method, r in series["methods"].items():
            if not r.get("ok"):
                lines.append(f"| {method_label(method)} | failed: {r.get('error', '?')[:80]} |" + " |" * (8 + len(label_names)))
                continue
            s = r["summary"]
            dice = " | ".join(_fmt(s["dice"].get(k), 3) for k in label_names)
            lines.append(
                f"| {method_label(method)} | {_fmt(s['tre_mean'])} ± {_fmt(s['tre_std'])} ({_fmt(s['tre_max'], 1)}) "
                f"| {_fmt(s['dense_error_mean'])} | {dice} | {s['folded_voxels']} | {_fmt(s['psnr'])} | "
                f"{_fmt(s['ssim'], 3)} | {_fmt(r['wall_seconds'], 1)} ({_fmt(r['seconds_per_registered_time'], 2)}) | "
                f"{_fmt(r.get('peak_rss_mb_run', r['peak_rss_mb']), 0)} | {r.get('note', '')} |")
        lines.append("")
        if series.get("heldout"):
            lines += ["Held-out time point (STNeRP trained without it; peers registered it directly):", "",
                      "| method | held-out t | PSNR predicted image | SSIM predicted image | PSNR warped ref | linear interp. PSNR / SSIM "
                      "| best peer (by TRE) PSNR / SSIM | predicted − linear dB | TRE mm |", "|---" * 9 + "|"]
            for method, h in series["heldout"].items():
                if not h.get("ok"):
                    lines.append(f"| {method_label(method)} | failed: {h.get('error', '?')[:80]} |" + " |" * 7)
                    continue
                peer = h.get("best_peer") or {}
                lines.append(
                    f"| {method_label(method)} | {h['heldout_time']:g} | {_fmt(h['predicted_image_psnr'])} | "
                    f"{_fmt(h['predicted_image_ssim'], 3)} | {_fmt(h['warped_reference_psnr'])} | "
                    f"{_fmt(h['linear_psnr'])} / {_fmt(h['linear_ssim'], 3)} | "
                    f"{method_label(peer['method']) if peer else '–'} {_fmt(peer.get('psnr'))} / {_fmt(peer.get('ssim'), 3)} | "
                    f"{_fmt(h['predicted_image_psnr'] - h['linear_psnr'])} | {_fmt(h['tre_mean'])} |")
            lines.append("")
    if report.get("flops"):
        f = report["flops"]
        lines += ["## Compute efficiency (STNeRP default, breathing series)", "",
                  f"Training FLOPs {f['training_flops'] / 1e9:.1f} GFLOP "
                  f"({', '.join(f'{k} {v / 1e9:.1f}' for k, v in f['breakdown'].items())}) in "
                  f"{f.get('training_seconds', float('nan')):.1f} s = {f.get('achieved_gflops', float('nan')):.2f} GFLOP/s, "
                  f"{100 * f.get('achieved_fraction', float('nan')):.1f} % of the measured matmul throughput.", ""]
    if report.get("memory_check"):
        m = report["memory_check"]
        lines += ["## Memory check", "", m.get("text", json.dumps(m)), ""]
    if report.get("targets"):
        lines += ["## Issue 4 targets (default preset, breathing phantom)", ""]
        lines += [f"- {'met' if t['met'] else 'MISSED'}: {t['text']}" for t in report["targets"]]
        lines.append("")
    lines += ["## Configuration", ""]
    for method, text in report["configs"].items():
        lines.append(f"- {method_label(method)}: {text}")
    used = {(m, json.dumps(r["preset"], sort_keys=True)) for se in report["series"].values()
            for m, r in (se.get("methods") or {}).items() if r.get("preset")}
    for method, preset in sorted(used):
        lines.append(f"- preset actually used by {method_label(method)} (read by its process at start): {preset}")
    return "\n".join(lines) + "\n"


def configs(methods, args) -> dict:
    from benchmarks import peers
    out = {}
    for m in methods:
        if m in STNERP_METHODS:
            options = _stnerp_options(m, None)
            p = options.preset
            ref_net = (f"Ref-Net {p.ref_depth}x{p.ref_width}, {p.ref_iterations} it., {p.ref_points or 'all'} points; "
                       if options.prior == "refnet" else "")
            volume = f", {p.prior_interpolation} interpolation" if options.prior_is_volume else ""
            text = (f"preset '{p.name}' ({ref_net}Def-Net {p.def_depth}x{p.def_width}, {p.def_iterations} it., "
                    f"velocity spacing {p.velocity_spacing or 'image grid'} mm), prior={options.prior}{volume}, "
                    f"temporal={options.temporal}; whole series fitted once")
            if m == "stnerp_paper":
                text += (f"; run on a {tuple(args.paper_size)} grid (same field of view) with "
                         f"{args.paper_iterations} iterations per network instead of 2000 (does not fit a CPU)")
            elif args.quick:
                text += f"; quick mode: {args.quick_iterations} iterations per network"
            out[m] = text
        elif m == "none":
            out[m] = "u = 0"
        elif m == "exact":
            out[m] = ("u = the exact displacement the series was made with: the scores a perfect registration "
                      "gets from this scoring (the labelmap is carried by nearest-neighbour lookup of the "
                      "voxelised reference labelmap, so its Dice stays below 1)")
        else:
            out[m] = peers.PEERS[m]["config"]
    return out


def targets(report: dict) -> list[dict]:
    series = report["series"].get("breathing")
    if not series or series.get("skipped"):
        return []
    rows = series["methods"]
    d = rows.get("stnerp_default")
    if not d or not d.get("ok"):
        return []
    peers_ok = {m: r for m, r in rows.items() if m in PEER_METHODS and r.get("ok")}
    out = []
    if peers_ok:
        fastest = min(peers_ok, key=lambda m: peers_ok[m]["wall_seconds"])
        out.append({"met": d["wall_seconds"] < peers_ok[fastest]["wall_seconds"],
                    "text": f"whole-series wall time {d['wall_seconds']:.1f} s vs fastest peer "
                            f"{method_label(fastest)} {peers_ok[fastest]['wall_seconds']:.1f} s for its "
                            f"{peers_ok[fastest]['registered_time_points']} pairs"})
        best = min(peers_ok, key=lambda m: peers_ok[m]["summary"]["tre_mean"])
        out.append({"met": d["summary"]["tre_mean"] <= peers_ok[best]["summary"]["tre_mean"],
                    "text": f"mean TRE {d['summary']['tre_mean']:.2f} mm vs most accurate peer "
                            f"{method_label(best)} {peers_ok[best]['summary']['tre_mean']:.2f} mm"})
        best_dice = max(peers_ok, key=lambda m: peers_ok[m]["summary"]["dice"].get("1", 0))
        exact = rows.get("exact", {})
        ceiling = (f"; the exact motion scores {exact['summary']['dice']['1']:.3f}" if exact.get("ok") else "")
        out.append({"met": d["summary"]["dice"]["1"] >= peers_ok[best_dice]["summary"]["dice"]["1"],
                    "text": f"tumour Dice {d['summary']['dice']['1']:.3f} vs best peer "
                            f"{method_label(best_dice)} {peers_ok[best_dice]['summary']['dice']['1']:.3f} "
                            f"(mean over labels {d['summary']['dice_mean']:.3f} vs "
                            f"{max(r['summary']['dice_mean'] for r in peers_ok.values()):.3f}{ceiling})"})
    out.append({"met": d["summary"]["folded_voxels"] == 0,
                "text": f"{d['summary']['folded_voxels']} folded voxels (min det J {d['summary']['jacobian_min']:.3f})"})
    h = (series.get("heldout") or {}).get("stnerp_default")
    if h and h.get("ok"):
        gain = h["predicted_image_psnr"] - h["linear_psnr"]
        out.append({"met": gain >= 2.0, "text": f"held-out phase {h['heldout_time']:g}: PSNR {h['predicted_image_psnr']:.2f} dB "
                                                f"vs linear interpolation {h['linear_psnr']:.2f} dB ({gain:+.2f} dB; target +2)"})
    m = report.get("memory_check")
    if m and "peak_rss_mb" in m:
        out.append({"met": m["ok"] and m["peak_rss_mb"] <= 8192, "text": m["text"]})
    return out


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", default=",".join(ALL_SERIES), help=f"comma list of {ALL_SERIES}")
    parser.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma list of {ALL_METHODS}")
    parser.add_argument("--quick", action="store_true", help="small volumes and few iterations, for development")
    parser.add_argument("--quick-iterations", type=int, default=60, help="STNeRP iterations per network in --quick")
    parser.add_argument("--paper-size", type=int, nargs=3, default=(24, 24, 16),
                        help="grid (x y z) for the paper preset, same field of view (default 24 24 16)")
    parser.add_argument("--paper-iterations", type=int, default=10,
                        help="iterations per network for the paper preset (paper: 2000)")
    parser.add_argument("--heldout-methods", default="stnerp_default",
                        help="STNeRP methods (continuous time) to run the held-out experiment for ('' for none)")
    parser.add_argument("--chest-spacing", type=float, default=3.0, help="mm; the CT is 1.5 mm")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per method and series")
    parser.add_argument("--memory-check", action="store_true",
                        help="also run STNeRP default on a 256x256x128 10-phase phantom and report peak RSS")
    parser.add_argument("--memory-check-only", action="store_true", help="only the memory check")
    parser.add_argument("--scratch", help="folder for the series (default: a temporary folder, removed)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the .md and .json results")
    parser.add_argument("--render", metavar="JSON", help="only re-render the markdown of a results JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.render:
        report = json.loads(Path(args.render).read_text())
        report["targets"] = targets(report)
        text = markdown(report)
        if report.get("partial"):
            text = "**Partial: the benchmark was still running (or was interrupted).**\n\n" + text
        Path(args.render).with_suffix(".md").write_text(text)
        print(text)
        return 0

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {ALL_METHODS}")
    series_names = [s.strip() for s in args.series.split(",") if s.strip()]
    if any(s not in ALL_SERIES for s in series_names):
        parser.error(f"unknown series; choose from {ALL_SERIES}")
    if args.memory_check_only:
        series_names, methods, args.memory_check = [], [], True
    heldout_methods = [m for m in args.heldout_methods.split(",") if m in methods and STNERP_METHODS.get(m, {}).get("temporal")]

    from benchmarks import peers
    missing = [m for m in methods if m in PEER_METHODS and not peers.available(m)]
    for m in missing:
        print(f"[benchmark] {m}: package '{peers.PEERS[m]['package']}' is not installed: skipped", flush=True)
    methods = [m for m in methods if m not in missing]

    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="stnerp_bench_"))
    scratch.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now()
    report = {"date": now.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "machine": machine(),
              "load_start": load_average(), "series": {}, "skipped_methods": missing,
              "arguments": vars(args) | {"paper_size": list(args.paper_size)}}
    print(f"[benchmark] measuring fp32 matmul throughput ({THREADS} threads) ...", flush=True)
    report["matmul_gflops"] = matmul_gflops()
    report["configs"] = configs(methods, args)
    specs = series_specs(args)
    try:
        for name in series_names:
            print(f"[benchmark] building series {name} ...", flush=True)
            folder = build_series(name, specs[name], scratch)
            if folder is None:
                report["series"][name] = {"skipped": f"{specs[name]['kind']} data not found under ../shared/data"}
                print(f"[benchmark] {name}: skipped (no ../shared/data)", flush=True)
                continue
            from benchmarks import data
            meta = data.Series(folder).meta
            entry = report["series"][name] = {"meta": meta, "methods": {}, "heldout": {}}
            for method in methods:
                job = {"method": method, "series": str(folder)}
                note = ""
                if method == "stnerp_paper":
                    paper_folder = build_series(f"{name}_paper", _paper_spec(specs, name, args), scratch)
                    job.update(series=str(paper_folder), iterations=args.paper_iterations)
                    paper_meta = data.Series(paper_folder).meta
                    note = (f"on a {paper_meta['size']} grid of {[round(s, 1) for s in paper_meta['spacing']]} mm, "
                            f"{args.paper_iterations} it./network (paper: 2000): full size does not fit a CPU")
                elif method in STNERP_METHODS and args.quick:
                    job["iterations"] = args.quick_iterations
                if method == "stnerp_default" and name == "breathing":
                    job["flops"] = True
                print(f"[benchmark] {name}: {method} ... (load {load_average()})", flush=True)
                result = run_job(job, scratch, args.timeout)
                if method == "stnerp_paper" and result.get("ok"):
                    hours = result["fit_seconds"] * 2000 / args.paper_iterations / 3600
                    note += f"; fit {result['fit_seconds']:.0f} s, so ~{hours:.0f} h for 2000 it. even on this grid"
                    baseline = run_job({"method": "none", "series": job["series"]}, scratch, args.timeout)
                    if baseline.get("ok"):
                        note += f"; no registration on that grid: TRE {baseline['summary']['tre_mean']:.2f} mm"
                result["note"] = note
                entry["methods"][method] = result
                _print_row(name, method, result)
                _write(report, args, now, partial=True)
            for method in heldout_methods:
                h = meta["heldout"]
                job = {"method": method, "series": str(folder), "heldout": h}
                if args.quick:
                    job["iterations"] = args.quick_iterations
                print(f"[benchmark] {name}: {method} held out t={meta['times'][h]:g} ...", flush=True)
                result = run_job(job, scratch, args.timeout)
                result["best_peer"] = _best_peer_at(entry["methods"], h - 1)
                entry["heldout"][method] = result
                _write(report, args, now, partial=True)
        if args.memory_check:
            report["memory_check"] = memory_check(scratch, args)
            print(f"[benchmark] memory check: {report['memory_check']['text']}", flush=True)
        text, stem = _write(report, args, now, partial=False)
        print(text)
        print(f"[benchmark] written {stem}.md and .json", flush=True)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _write(report: dict, args, now, partial: bool):
    """Write the markdown and JSON; while running (partial) they say so and are overwritten."""
    flops_row = report["series"].get("breathing", {}).get("methods", {}).get("stnerp_default", {})
    if flops_row.get("flops"):
        report["flops"] = dict(flops_row["flops"])
        report["flops"]["achieved_fraction"] = report["flops"]["achieved_gflops"] / report["matmul_gflops"]
    report["load_end"] = load_average()
    report["partial"] = partial
    report["targets"] = targets(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("benchmark_" + now.strftime("%Y-%m-%d_%H%M") + ("_quick" if args.quick else ""))
    text = markdown(report)
    if partial:
        text = "**Partial: the benchmark is still running (or was interrupted).**\n\n" + text
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=float))
    return text, stem


def _paper_spec(specs: dict, name: str, args) -> dict:
    base = specs[name]
    if base["kind"] == "chest":
        return {**base, "spacing": base["spacing"] * 3}
    fov = np.asarray(base["size"]) * np.asarray(base["spacing"])
    size = tuple(int(n) for n in args.paper_size)
    return {**base, "size": size, "spacing": tuple(float(f / n) for f, n in zip(fov, size))}


def _best_peer_at(rows: dict, index: int) -> dict | None:
    """The peer with the lowest mean TRE on the series, and its PSNR/SSIM at per_time[index]."""
    peers_ok = {m: r for m, r in rows.items() if m in PEER_METHODS and r.get("ok")}
    if not peers_ok:
        return None
    best = min(peers_ok, key=lambda m: peers_ok[m]["summary"]["tre_mean"])
    at = peers_ok[best]["per_time"][index]
    return {"method": best, "time": at["time"], "psnr": at["psnr"], "ssim": at["ssim"], "tre_mean": at["tre_mean"]}


def _print_row(series: str, method: str, r: dict) -> None:
    if not r.get("ok"):
        print(f"[benchmark] {series}: {method} FAILED: {r.get('error')}\n{r.get('log', '')}{r.get('traceback', '')}",
              flush=True)
        return
    s = r["summary"]
    print(f"[benchmark] {series}: {method}: TRE {s['tre_mean']:.2f} mm, dense {s['dense_error_mean']:.2f} mm, "
          f"Dice {s['dice_mean']:.3f}, folds {s['folded_voxels']}, PSNR {s['psnr']:.2f}, "
          f"wall {r['wall_seconds']:.1f} s, RSS {r['peak_rss_mb']:.0f} MB", flush=True)


def memory_check(scratch: Path, args) -> dict:
    """STNeRP default on a 256x256x128, 10-phase breathing phantom (same field of view): peak RSS."""
    from benchmarks import data
    size = (256, 256, 128)
    spec = {"kind": "breathing", "size": size, "spacing": (96 * 3.0 / 256, 96 * 3.0 / 256, 64 * 4.0 / 128),
            "count": 10, "heldout": 3}
    print("[benchmark] memory check: building the 256x256x128 x 10 series ...", flush=True)
    folder = scratch / "breathing_large"
    if not (folder / "meta.json").exists():
        data.phantom_series(folder, **spec)
    job = {"method": "stnerp_default", "series": str(folder), "tre_only": True}
    if args.quick:
        job["iterations"] = args.quick_iterations
    result = run_job(job, scratch, args.timeout)
    # peak_rss_mb: the whole child (loading 10 images, fit, every output, landmark TRE).
    out = {"size": list(size), "ok": bool(result.get("ok")), "peak_rss_mb": result.get("peak_rss_mb"),
           "peak_rss_mb_run": result.get("peak_rss_mb_run"), "fit_seconds": result.get("fit_seconds"),
           "wall_seconds": result.get("wall_seconds"), "error": result.get("error")}
    if result.get("ok"):
        out["tre_mean"] = result["summary"]["tre_mean"]
        out["text"] = (f"STNeRP default on 256x256x128 x 10 phases: peak RSS {out['peak_rss_mb'] / 1024:.2f} GB "
                       f"(limit 8 GB), whole series {out['wall_seconds']:.0f} s, TRE {out['tre_mean']:.2f} mm")
    else:
        out["text"] = f"STNeRP default on 256x256x128 x 10 phases failed: {result.get('error')} (peak RSS {out['peak_rss_mb']} MB)"
    return out


if __name__ == "__main__":
    sys.exit(main())
