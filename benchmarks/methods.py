"""The methods the benchmark runs, and the child process that runs one of them.

    python benchmarks/methods.py '<job JSON>'      # started by benchmarks/runners.py, never by hand

METHODS is the registry (name -> how to run it and what it is); a new method is one entry. Each
timed run happens in its own process (runners.run_job) so that peak memory does not mix between
methods; inside it the clock starts after the imports and covers everything the method does for
the series: reading its images, registering or fitting, and writing every output it makes (its
fields at least). The process writes its fields to the job's work folder and a JSON with its
timings; the parent scores the fields (benchmarks/scoring.py), the same code for every method.

The peers run under the interpreter of .venv-peers when it exists (antspyx and itk-elastix need an
older numpy than .venv's: setup.sh), which has no torch: so this module imports the engine's torch
parts only inside `run_stnerp`.
"""
from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import peers  # noqa: E402
from benchmarks.data import Series  # noqa: E402
from STNeRPLib import threads  # noqa: E402
from STNeRPLib.metrics import jacobian_determinant  # noqa: E402
from STNeRPLib.presets import PRESETS, Options  # noqa: E402

# STNeRP variants: preset, prior (None: the preset's own; the default preset's is the reference
# image, cubic B-spline, i.e. the paper's "w/o prior"), continuous time or pairwise ("w/o t").
STNERP: dict[str, dict[str, Any]] = {
    "stnerp_default": {"label": "STNeRP default", "preset": "default", "prior": None, "temporal": True},
    "stnerp_paper": {"label": "STNeRP paper", "preset": "paper", "prior": None, "temporal": True},
    "stnerp_refnet": {"label": "STNeRP default with Ref-Net prior", "preset": "default", "prior": "refnet",
                      "temporal": True},
    "stnerp_not": {"label": "STNeRP default w/o t", "preset": "default", "prior": None, "temporal": False},
    "stnerp_unanchored": {"label": "STNeRP default without the reference anchor", "preset": "default",
                          "prior": None, "temporal": True, "overrides": {"anchor_reference": False}},
    "stnerp_converge": {"label": "STNeRP default stopping on convergence", "preset": "default", "prior": None,
                        "temporal": True, "overrides": {"stop_on_convergence": True}},
    "stnerp_levels_converge": {"label": "STNeRP --velocity-levels 2 --stop-on-convergence", "preset": "default",
                               "prior": None, "temporal": True,
                               "overrides": {"velocity_levels": 2, "adaptive_levels": False,
                                             "stop_on_convergence": True}},
    "stnerp_levels_anchored": {"label": "STNeRP --velocity-levels 2 (anchored, as the default)", "preset": "default",
                               "prior": None, "temporal": True,
                               "overrides": {"velocity_levels": 2, "adaptive_levels": False}},
    "stnerp_charbonnier": {"label": "STNeRP default --similarity charbonnier --structure-points 0 (voxels drawn "
                                    "uniformly)", "preset": "default", "prior": None, "temporal": True,
                           "overrides": {"similarity": "charbonnier", "structure_similarity": None,
                                         "structure_points": 0.0}},
    "stnerp_uniform_mse": {"label": "STNeRP default --structure-points 0 (mse, voxels drawn uniformly: the default "
                                    "before 2026-12-03)", "preset": "default", "prior": None, "temporal": True,
                           "overrides": {"structure_points": 0.0}},
    "stnerp_smoothed": {"label": "STNeRP default --smoothing-sigma 0.5 (the scans the fit sees smoothed by 0.5 "
                                 "voxel; measured, not the default)", "preset": "default", "prior": None,
                        "temporal": True, "overrides": {"smoothing_sigma": 0.5}},
    "stnerp_lncc": {"label": "STNeRP default --similarity lncc (local normalised cross-correlation, a tenth of the "
                             "windows about the structures; an option for sliding organs, not the default)",
                    "preset": "default", "prior": None, "temporal": True,
                    "overrides": {"similarity": "lncc", "structure_similarity": None}},
    "stnerp_whole_grid": {"label": "STNeRP default --no-body-mask (voxels drawn over the whole grid, the air around "
                                   "the body included: the default before 2026-12-03)", "preset": "default",
                          "prior": None, "temporal": True, "overrides": {"body_mask": False}},
    "stnerp_prealign": {"label": "STNeRP default --prealign affine (each scan first registered to the reference by "
                                 "an affine, Mattes MI, as the paper's preprocessing; Def-Net fits what remains)",
                        "preset": "default", "prior": None, "temporal": True, "prealign": "affine"},
    "stnerp_one_level": {"label": "STNeRP --velocity-levels 1 (the default before adaptive levels)",
                         "preset": "default", "prior": None, "temporal": True,
                         "overrides": {"velocity_levels": 1, "adaptive_levels": False}},
}
BASELINES = {
    "none": {"label": "no registration", "config": "u = 0; at a held-out time: linear interpolation of the "
                                                   "two scans around it (no motion)"},
    "exact": {"label": "exact motion (ground truth)",
              "config": "u = the exact displacement the series was made with: what a perfect registration "
                        "scores in this scoring (the labelmap is carried by nearest-neighbour lookup of the "
                        "voxelised reference labelmap, so its Dice stays below 1); at a held-out time, "
                        "motion-compensated interpolation with the exact motion (the recipe's ceiling)"},
}


def stnerp_options(method: str, iterations: int | None = None) -> Options:
    """The Options of an STNeRP variant (both networks' iterations overridden if given)."""
    spec = STNERP[method]
    preset = replace(PRESETS[spec["preset"]], **spec.get("overrides", {}))
    if iterations:
        preset = preset.with_iterations(iterations)
    return Options(preset, prior=spec["prior"], temporal=spec["temporal"], prealign=spec.get("prealign", "auto"))


def predicts_unscanned_times(method: str) -> bool:
    """Whether an STNeRP variant predicts a time it was not fitted on: continuous time, and not every scan affinely
    pre-aligned (an affine is found for each scan, so a time between scans has none; --prealign auto pre-aligns
    only a scan lying far from the reference, none on the benchmark series)."""
    spec = STNERP[method]
    return spec["temporal"] and spec.get("prealign") != "affine"


def label(method: str) -> str:
    """The method's name in the report's tables (an STNeRP variant's, a baseline's or a peer's label)."""
    if method in STNERP:
        return STNERP[method]["label"]
    if method in BASELINES:
        return BASELINES[method]["label"]
    return peers.PEERS[method]["label"]


def kind(method: str) -> str:
    """'stnerp', 'peer' or 'baseline'."""
    return "stnerp" if method in STNERP else "baseline" if method in BASELINES else "peer"


def config(method: str, iterations: int | None = None) -> str:
    """What the method is set to, in words, for the report."""
    if method in BASELINES:
        return BASELINES[method]["config"]
    if method not in STNERP:
        return peers.PEERS[method]["config"]
    options = stnerp_options(method, iterations)
    p = options.preset
    ref_net = (f"Ref-Net {p.ref_depth}x{p.ref_width}, {p.ref_iterations} it., {p.ref_points or 'all'} points; "
               if options.prior == "refnet" else "")
    volume = f", {p.prior_interpolation} interpolation" if options.prior_is_volume else ""
    extra = "".join(f", {key}={value}" for key, value in STNERP[method].get("overrides", {}).items())
    return (f"preset '{p.name}' ({ref_net}Def-Net {p.def_depth}x{p.def_width}, {p.def_iterations} it., "
            f"velocity spacing {p.velocity_spacing or 'image grid'} mm{extra}), prior={options.prior}{volume}, "
            f"temporal={options.temporal}, seed {options.seed}; whole series fitted once")


def all_methods() -> list[str]:
    """Every method's name: the STNeRP variants, then the peers, then the baselines."""
    return list(STNERP) + list(peers.PEERS) + list(BASELINES)


# ----------------------------------------------------------------------------- inside the child


def _peak_rss() -> dict:
    """This process's own peak resident memory (MB): VmHWM of /proc/self/status. Not ru_maxrss,
    which Linux carries over from the parent across fork and exec (a child of a 700 MB parent
    reads 700 MB). Where /proc is missing, ru_maxrss, said so."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return {"peak_rss_mb": int(line.split()[1]) / 1024.0, "peak_rss_source": "VmHWM"}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "peak_rss_source": "ru_maxrss"}


def run_stnerp(job: dict, series: Series, work: Path) -> dict:
    """Fit the whole series (without time index job['heldout'], if given) and write every output of
    every fitted time point as the product does (outputs.write_time_point: displacement, Jacobian,
    labelmap, predicted image, inverse displacement), plus the model file; with a held-out index,
    the outputs at that time too, on the held-out scan's grid (its predicted image: the scans around it, carried and
    blended)."""
    # The engine's torch parts: imported here, not at the top (see the module's docstring).
    from STNeRPLib.geometry import Grid
    from STNeRPLib.outputs import TimePoint, write_time_point
    from STNeRPLib.pipeline import fit
    from STNeRPLib.progress import Reporter
    options = stnerp_options(job["method"], job.get("iterations"))
    skip = job.get("heldout")
    indices = [k for k in range(len(series.times)) if k != skip]
    heldout_grid = None if skip is None else Grid.of(series.image(skip))  # where its prediction is asked for
    start = time.perf_counter()
    images = {k: series.image(k) for k in indices}
    follow_ups = [(series.times[k], images[k]) for k in indices[1:]]
    model = fit(images[0], series.times[0], follow_ups, series.labelmap(0), options, Reporter(interval=1e9))
    fit_seconds = time.perf_counter() - start
    model.save(work / "model.pt")
    per_time, fields, predicted = [], {}, {}
    for k in indices + ([skip] if skip is not None else []):
        t0 = time.perf_counter()
        grid = Grid.of(images[k]) if k in images else cast(Grid, heldout_grid)
        point = TimePoint(series.times[k], grid, prealignment=model.prealignments.get(series.times[k]))
        entry = write_time_point(model, point, work, None).entry
        per_time.append(time.perf_counter() - t0)
        fields[k], predicted[k] = str(work / entry["displacement"]), str(work / entry["image"])
    total = time.perf_counter() - start
    return {"wall_seconds": total, "fit_seconds": fit_seconds, "outputs_seconds": total - fit_seconds,
            "seconds_per_time": per_time, **_peak_rss(), "fields": fields,
            "images": predicted, "options": options.to_dict(), "velocity_levels_kept": model.deformation.kept,
            "velocity_level_ratios": model.deformation.trial_ratios}


def run_peer(job: dict, series: Series, work: Path) -> dict:
    """Register the reference (moving) to each time point (fixed), pairwise, and write each field
    and its Jacobian (the outputs STNeRP writes too). With a held-out index h, only the time points
    h - 1 and h + 1 (the scans its prediction at h is made from)."""
    name, skip = job["method"], job.get("heldout")
    indices = range(1, len(series.times)) if skip is None else (skip - 1, skip + 1)
    per_time, fields = [], {}
    start = time.perf_counter()
    reference = series.image(0)
    for k in indices:
        t0 = time.perf_counter()
        field = peers.register(name, series.image(k), reference)
        fields[k] = str(work / f"displacement_{k}.nrrd")
        sitk.WriteImage(field, fields[k])
        sitk.WriteImage(jacobian_determinant(field), str(work / f"jacobian_{k}.nrrd"))
        per_time.append(time.perf_counter() - t0)
    return {"wall_seconds": time.perf_counter() - start, "seconds_per_time": per_time,
            **_peak_rss(), "fields": fields}


def _warm_up(method: str) -> None:
    """Imports, the lazy module loading of ITK and the loading of numba's compiled kernels (kernel_cache.load_kernels:
    from its cache, 0.3 s a process, with the machinery numba imports at a first call), outside the clock (imports are
    nobody's work). The kernels' modules import torch, which the peers' venv has not: imported here."""
    if kind(method) == "stnerp":
        from STNeRPLib import kernel_cache
        kernel_cache.load_kernels()
    if kind(method) != "peer":
        return
    package = peers.PEERS[method]["package"]
    if package == "ants":
        import ants  # noqa: F401
    elif package == "itk":
        import itk
        _ = (itk.ElastixRegistrationMethod, itk.TransformixFilter, itk.ParameterObject, itk.image_from_array)


def child(job: dict) -> dict:
    """Run one job with job['threads'] threads (torch, ITK); a failure is reported in the result."""
    if kind(job["method"]) == "stnerp":
        choice = threads.use(job["threads"])       # torch's intra-op threads and ITK's default
    else:                                          # no torch here (.venv-peers)
        choice = threads.measure(job["threads"])
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(choice.threads)
    series = Series(Path(job["series"]))
    work = Path(job["work"])
    work.mkdir(parents=True, exist_ok=True)
    result = {"method": job["method"], "series": series.meta["name"], "ok": True,
              "thread_choice": choice.to_dict()}
    try:
        _warm_up(job["method"])
        if kind(job["method"]) == "stnerp":
            result.update(run_stnerp(job, series, work))
        else:
            result.update(run_peer(job, series, work))
    except Exception as error:  # reported to the parent, not raised: one failure must not stop the rest
        result.update(ok=False, error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    return result


if __name__ == "__main__":
    JOB = json.loads(sys.argv[1])
    Path(JOB["out"]).write_text(json.dumps(child(JOB), indent=1))
