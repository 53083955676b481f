"""Running the benchmark: the series (a registry of builders), each timed method in its own child
process with a timeout, repeated and interleaved, and every result scored by benchmarks/scoring.py.

Timing is honest only if the methods meet the same machine: the machine is shared, so its speed
drifts. Each repeat runs every timed method once, in an order rotated by one place per repeat (no
method is always first), and the report gives the median with min-max over the N repeats. The
baselines (no registration, exact motion) involve no timing and run once.

Threads: every method computes with the same count (`threads`, default 2: both cores), given to
the engine's policy as an explicit request (STNeRPLib.threads.use / measure, recorded per run).
Left to itself the policy would pick each method's count from the load at that method's start, so
the counts, and the comparison, would depend on what else ran then; benchmarks/under_load.py
measures the policy itself.
"""
from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, cast

import SimpleITK as sitk

from benchmarks import data, methods, peers, scoring
from benchmarks.provenance import load_average

if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import IO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"  # setup.sh peers: antspyx, itk-elastix, no torch

TUNED_ON = {"series": "breathing", "seed": 0, "size": [96, 96, 64], "count": 10}
"""What the default preset was tuned on (STNeRPLib/presets.py's docstring; benchmarks/preset_study.py,
whose phantom is phantom.breathing_series() with its default seed 0, 96 x 96 x 64, 10 phases, phase 5
held out; the demo holds out phase 3). Rows on that series are tuning rows; every other series
(other phantom seeds, the longitudinal phantom, the real anatomy) is a reporting series."""


@dataclass(frozen=True)
class SeriesSettings:
    """quick: half-size phantoms (48 x 48 x 32 of 6 x 6 x 8 mm) and 6 mm chest, for development;
    seed: the phantoms' seed (anatomy, noise, landmarks) and the chest's (noise, landmarks);
    chest_spacing: mm (the CT is 1.5 mm); supersampling: the phantoms' voxels rendered as the mean of that many^3
    sub-voxel samples (1: their centres' values, as before)."""

    quick: bool = False
    seed: int = 1
    chest_spacing: float = 3.0
    supersampling: int = 1

    @property
    def phantom_grid(self) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
        """The phantoms' grid: (size in voxels, spacing in mm), half-size when quick."""
        return ((48, 48, 32), (6.0, 6.0, 8.0)) if self.quick else ((96, 96, 64), (3.0, 3.0, 4.0))


def _phantom(kind: str, count: int, heldout: int) -> Callable[[Path, SeriesSettings], Path]:
    """A builder of a phantom series with the settings' grid and seed."""
    def build(folder: Path, settings: SeriesSettings) -> Path:
        size, spacing = settings.phantom_grid
        return data.phantom_series(folder, kind, size, spacing, count, heldout, settings.seed,
                                   settings.supersampling)
    return build


def _chest(own_grids: bool = False) -> Callable[[Path, SeriesSettings], Path | None]:
    """A builder of the chest series at the settings' spacing (6 mm when quick), None without its CT; with `own_grids`
    every phase after the reference on a grid of its own of OWN_GRIDS_SPACING times that spacing (data.own_grid)."""
    def build(folder: Path, settings: SeriesSettings) -> Path | None:
        if not data.chest_available():
            return None
        spacing = 6.0 if settings.quick else settings.chest_spacing
        folder = data.chest_series(folder, spacing, 10, 3, settings.seed,
                                   own_grids_mm=OWN_GRIDS_SPACING * spacing if own_grids else None)
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "seed": settings.seed, "count": 10}, indent=1))
        return folder
    return build


OWN_GRIDS_SPACING = 2 / 3
"""The follow-ups' spacing in series chest_own_grids, a fraction of the reference's (3 mm: 2 mm), as a follow-up CT or a
CBCT is often reconstructed finer than a planning CT's slices."""


def _real(builder: Callable[..., Path], available: Callable[[], bool], count: int = 10, heldout: int = 3
          ) -> Callable[[Path, SeriesSettings], Path | None]:
    """A builder of a real-anatomy series at its own resolution (`count` phases or fractions, index `heldout` held
    out; quick: 3, index 1 held out), None when its CT is missing (not in ../shared/data, or pip could not fetch it)."""
    def build(folder: Path, settings: SeriesSettings) -> Path | None:
        if not available():
            return None
        n, h = (3, 1) if settings.quick else (count, heldout)
        folder = builder(folder, n, h, settings.seed)
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "seed": settings.seed, "count": n}, indent=1))
        return folder
    return build


def _tumour(name: str) -> Callable[[Path, SeriesSettings], Path | None]:
    """A builder of tumour-response series `name` (data.TUMOUR_PATIENTS): 5 weekly fractions, fraction 2 held out."""
    patient = data.TUMOUR_PATIENTS[name]
    return _real(lambda folder, n, h, seed: data.tumour_response_series(folder, name, n, h, seed),
                 lambda: data.radiomics_patient(patient) is not None, count=5, heldout=2)


SERIES: dict[str, Callable[[Path, SeriesSettings], Path | None]] = {
    # name -> builder(folder, settings): the series folder (benchmarks/data.py's layout), None if
    # its data are missing. Held-out index: the third scan after the reference (phase 3, day 14).
    "breathing": _phantom("breathing", 10, 3),
    "longitudinal": _phantom("longitudinal", 5, 2),
    "chest": _chest(),
    "chest_own_grids": _chest(own_grids=True),                                   # follow-ups on grids of their own
    "chest_native": _real(data.chest_native_series, data.chest_available),       # 1.5 mm, issue 11
    "abdomen": _real(data.abdomen_series, data.abdomen_available),              # sliding organs, issue 11
    "lung_tumour": _tumour("lung_tumour"),                                       # a real tumour's response
    "lung_nodule": _tumour("lung_nodule"),
}


def role(meta: dict) -> str:
    """'tuning' for the series the default preset was tuned on, 'reporting' for every other."""
    same = (meta["name"] == TUNED_ON["series"] and meta.get("seed") == TUNED_ON["seed"]
            and meta["size"] == TUNED_ON["size"] and meta.get("count") == TUNED_ON["count"]
            and meta.get("supersampling", 1) == 1)
    return "tuning" if same else "reporting"


def rotated(items: list, repeat: int) -> list:
    """items started at place repeat (mod len): repeat r runs the methods in the r-th rotation."""
    if not items:
        return []
    shift = repeat % len(items)
    return items[shift:] + items[:shift]


def interpreter(method: str, peers_python: Path | None) -> str:
    """The Python a method runs under: a peer under the peers' venv when there is one."""
    if methods.kind(method) == "peer" and peers_python is not None and peers_python.exists():
        return str(peers_python)
    return sys.executable


def available(method: str, peers_python: Path | None) -> bool:
    """Whether the package a peer needs imports under the interpreter it will run with."""
    if methods.kind(method) != "peer":
        return True
    check = ("import importlib.util, sys; "
             f"sys.exit(importlib.util.find_spec({peers.PEERS[method]['package']!r}) is None)")
    return subprocess.run([interpreter(method, peers_python), "-c", check]).returncode == 0


def run_job(job: dict, python: str, timeout: float) -> dict:
    """Run methods.py for `job` in a child process (killed after `timeout` s); its result and its
    process time. (Its peak memory is the child's own VmHWM, read by the child: os.wait4's
    ru_maxrss would not do, Linux carries the parent's high-water mark over fork and exec. A peer's or a baseline's
    child runs without numba, STNERP_NUMBA=0: its Jacobian by numpy, numba's memory not counted as the peer's.)"""
    out = Path(job["work"]) / "result.json"
    Path(job["work"]).mkdir(parents=True, exist_ok=True)
    job = {**job, "out": str(out)}
    n = str(job["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": n,
           "BENCHMARK_THREADS": n, "PYTHONWARNINGS": "ignore"}
    if methods.kind(job["method"]) != "stnerp":
        env["STNERP_NUMBA"] = "0"           # a peer's Jacobian by numpy: numba's ~130 MB are not the peer's
    start = time.perf_counter()
    process = subprocess.Popen([python, str(HERE / "methods.py"), json.dumps(job)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stdout = cast("IO[bytes]", process.stdout)
    log, killed = [], False
    selector = selectors.DefaultSelector()
    selector.register(stdout, selectors.EVENT_READ)
    while True:
        if time.perf_counter() > start + timeout and not killed:
            process.kill()
            killed = True
        left = start + timeout - time.perf_counter()
        if selector.select(timeout=1.0 if killed else min(1.0, max(left, 0.0))):
            line = stdout.readline()
            if not line:
                break
            log.append(line.decode(errors="replace"))
    status = process.wait()
    if out.exists():
        result = json.loads(out.read_text())
    else:
        result = {"method": job["method"], "ok": False,
                  "error": f"timed out after {timeout:g} s" if killed else f"child exited with status {status}"}
    if not result.get("ok"):
        result["log"] = "".join(log[-30:])
    result["process_seconds"] = time.perf_counter() - start
    return result


def _baseline_fields(method: str, series: data.Series, indices: Iterable[int]) -> dict[int, sitk.Image]:
    """'none': u = 0; 'exact': the series' exact u."""
    if method == "exact":
        return {k: series.displacement(k) for k in indices}
    fields = {}
    for k in indices:
        fields[k] = sitk.Image(series.image(k).GetSize(), sitk.sitkVectorFloat64)
        fields[k].CopyInformation(series.image(k))
    return fields


def _score_run(series: data.Series, result: dict) -> dict:
    """Score the fields a run wrote (every registered time point)."""
    fields = {int(k): sitk.ReadImage(path, sitk.sitkVectorFloat64) for k, path in result["fields"].items()}
    per_time = [scoring.score_field(series, k, fields[k]) for k in range(1, len(series.times))]
    scores: dict[str, Any] = {"per_time": per_time, "summary": scoring.summarise(per_time, series.meta["labels"])}
    if 0 in fields:                                      # STNeRP writes the reference time too, a peer does not
        scores["reference_displacement_max"] = scoring.largest_displacement(fields[0])
    return scores


@dataclass
class Plan:
    """What to run: timed methods (STNeRP variants and peers), baselines, held-out methods."""

    timed: list[str]
    baselines: list[str]
    heldout: list[str]
    repeats: int = 1
    threads: int = 2
    timeout: float = 3600.0
    iterations: dict | None = None       # method -> iterations per network (None: the preset's)
    peers_python: Path | None = PEERS_PYTHON


def run_series(series: data.Series, plan: Plan, scratch: Path, log: Callable[[str], None]) -> dict:
    """Every method of the plan on one series: rows (runs, wall-time spread, scores of every run)
    and the held-out comparison."""
    rows: dict[str, dict] = {m: {"runs": []} for m in plan.timed}
    for repeat in range(plan.repeats):
        for method in rotated(plan.timed, repeat):
            log(f"{series.meta['name']}: {method}, repeat {repeat + 1}/{plan.repeats} (load {load_average()})")
            rows[method]["runs"].append(_timed_run(series, method, plan, scratch / f"{method}_{repeat}", None))
    for method in plan.timed:
        rows[method].update(_combine(rows[method]["runs"], len(series.times) - 1))
    for method in plan.baselines:
        fields = _baseline_fields(method, series, range(1, len(series.times)))
        per_time = [scoring.score_field(series, k, fields[k]) for k in fields]
        rows[method] = {"ok": True, "per_time": per_time, "summary": scoring.summarise(per_time, series.meta["labels"])}
    return {"methods": rows, "heldout": heldout(series, plan, rows, scratch, log)}


def _timed_run(series: data.Series, method: str, plan: Plan, work: Path, h: int | None) -> dict:
    job = {"method": method, "series": str(series.folder), "work": str(work), "threads": plan.threads,
           "heldout": h, "iterations": (plan.iterations or {}).get(method)}
    result = run_job(job, interpreter(method, plan.peers_python), plan.timeout)
    try:
        if result.get("ok") and h is None:
            result.update(_score_run(series, result))
        elif result.get("ok"):
            result.update(_score_heldout(series, method, cast("int", h), result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.pop("fields", None)
    result.pop("images", None)
    return result


def _combine(runs: list[dict], registered: int) -> dict:
    """A row over its repeats: wall time median (min-max), N; the scores of the first run, and
    the spread of the mean TRE over the runs (a fixed seed, but threads need not sum alike)."""
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        return {"ok": False, "error": runs[0].get("error", "?") if runs else "not run"}
    first = ok[0]
    return {"ok": True, "failed_runs": len(runs) - len(ok), "wall": scoring.spread([r["wall_seconds"] for r in ok]),
            "tre_mean_runs": scoring.spread([r["summary"]["tre_mean"] for r in ok]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ok), "peak_rss_source": ok[0].get("peak_rss_source"),
            "registered_time_points": registered, "summary": first["summary"], "per_time": first["per_time"],
            **{key: first[key] for key in ("reference_displacement_max",) if key in first}}


# ----------------------------------------------------------------------------- held-out time


def heldout(series: data.Series, plan: Plan, rows: dict, scratch: Path, log: Callable[[str], None]) -> dict:
    """At the held-out index h every method predicts the image from the scans at h - 1 and h + 1
    (STNeRP: trained without h; peers: registered to those two scans only; none: linear
    interpolation; exact: the exact motion), and its u at h is scored. A peer's warped reference
    at h from its main run (it registered h itself) is kept beside it."""
    h = series.meta["heldout"]
    out = {}
    for method in plan.heldout:
        log(f"{series.meta['name']}: {method} at held-out index {h} (load {load_average()})")
        if methods.kind(method) == "baseline":
            out[method] = {"ok": True, **_score_heldout(series, method, h, None)}
        else:
            out[method] = _timed_run(series, method, plan, scratch / f"{method}_heldout", h)
        main = rows.get(method, {})
        if methods.kind(method) == "peer" and main.get("ok"):
            out[method]["registered_at_h"] = {k: main["per_time"][h - 1][k] for k in ("psnr", "ssim", "tre_mean")}
    return out


def _score_heldout(series: data.Series, method: str, h: int, result: dict | None) -> dict:
    t = series.times[h]
    actual = sitk.GetArrayFromImage(series.image(h))
    scans = {series.times[k]: series.image(k) for k in (h - 1, h + 1)}
    if method == "none":
        return {"time": t, "predicted": scoring.score_image(scoring.linear(scans, t, series.image(h)), actual),
                "field": scoring.score_field(series, h, _baseline_fields("none", series, [h])[h])}
    if methods.kind(method) == "stnerp":
        u_t = sitk.ReadImage(cast("dict", result)["fields"][str(h)], sitk.sitkVectorFloat64)
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(cast("dict", result)["images"][str(h)]))
    else:
        around = (_baseline_fields("exact", series, (h - 1, h + 1)) if method == "exact" else
                  {int(k): sitk.ReadImage(p, sitk.sitkVectorFloat64)
                   for k, p in cast("dict", result)["fields"].items()})
        u_t = series.displacement(h) if method == "exact" else scoring.in_time(
            {series.times[k]: f for k, f in around.items()}, t, series.image(h))
        inverses = {series.times[k]: scoring.invert(f) for k, f in around.items()}
        predicted = scoring.motion_compensated(scans, inverses, u_t, t)
    return {"time": t, "predicted": scoring.score_image(predicted, actual),
            "field": scoring.score_field(series, h, u_t)}
