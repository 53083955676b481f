"""Cohort throughput: patients per hour of `stnerp batch` on a local Dask cluster, 1 worker x 2
threads against 2 workers x 1 thread, on the same small phantom series.

Each configuration runs the real command in its own process on a fresh output folder; the wall
time includes starting the local cluster (worker processes importing torch). Also reported: the
mean time of one series inside its task (summary.json wall_time_s) and the load average before and
after, since other work on the machine changes the figures. Writes
benchmarks/results/cohort_throughput_<date>.md|json with the commit it ran on.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import commit_label  # noqa: E402

from STNeRPLib.cohort import available_cores  # noqa: E402
from STNeRPLib.phantom import breathing_series, write_series  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CONFIGURATIONS = ((1, 2), (2, 1))   # (workers, threads per worker)


def write_cohort(folder: Path, patients: int, size: tuple[int, int, int], phases: int) -> Path:
    """`patients` breathing phantoms (different noise seeds) and their manifest."""
    rows = ["patient,role,path,time"]
    spacing = cast("tuple[float, float, float]",
                   tuple(s0 * n0 / n for s0, n0, n in zip((3.0, 3.0, 4.0), (96, 96, 64), size)))  # whole thorax
    for k in range(patients):
        series = breathing_series(size=size, spacing=spacing, n_phases=phases, seed=k)
        files = write_series(series, folder / f"p{k:02d}")
        rows += [f"p{k:02d},{'reference' if t == 0 else 'follow-up'},{path},{t:g}"
                 for path, t in zip(files["images"], series.times)]
    manifest = folder / "cohort.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def run(manifest: Path, output: Path, workers: int, threads: int, iterations: int) -> dict:
    """Run `stnerp batch` on the cohort with `workers` x `threads` in its own process: wall time (s), patients
    per hour, mean series time inside its task (s), load average before and after; exits if the batch fails."""
    load_before = os.getloadavg()
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "STNeRPLib", "batch", "--cohort", str(manifest),
                           "--output", str(output), "--workers", str(workers), "--threads-per-worker",
                           str(threads), "--iterations", str(iterations)], capture_output=True, text=True)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"batch failed ({done.returncode}): {done.stderr[-2000:]}")
    entries = json.loads((output / "summary.json").read_text())["patients"]
    series = [e["wall_time_s"] for e in entries]
    return {"workers": workers, "threads_per_worker": threads, "patients": len(entries),
            "wall_s": round(wall, 1), "patients_per_hour": round(len(entries) / wall * 3600, 1),
            "series_mean_s": round(sum(series) / len(series), 1),
            "load_before": [round(v, 2) for v in load_before],
            "load_after": [round(v, 2) for v in os.getloadavg()]}


def markdown(report: dict) -> str:
    """The report as Markdown: the setup, a row per configuration (wall time, patients per hour, mean series
    time, load before and after) and the note."""
    lines = [f"# Cohort throughput ({report['date']})", "",
             f"Commit {report['commit']}; {report['cores']} cores; {report['patients']} breathing phantoms of "
             f"{'x'.join(map(str, report['size']))} voxels, {report['phases']} phases, --iterations "
             f"{report['iterations']}; wall time includes starting the local cluster.", "",
             "| workers x threads | wall (s) | patients / hour | mean series time in its task (s) | "
             "load before | load after |",
             "|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['workers']} x {r['threads_per_worker']} | {r['wall_s']} | {r['patients_per_hour']} | "
                     f"{r['series_mean_s']} | {' '.join(map(str, r['load_before']))} | "
                     f"{' '.join(map(str, r['load_after']))} |")
    lines += ["", report["note"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write a temporary cohort, run `stnerp batch` on it in each of CONFIGURATIONS, and write the report (JSON and
    Markdown) to benchmarks/results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--size", type=int, nargs=3, default=(32, 32, 24), metavar=("X", "Y", "Z"))
    parser.add_argument("--phases", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--note", default="", help="what else ran on the machine")
    args = parser.parse_args(argv)
    report = {"date": time.strftime("%Y-%m-%d_%H%M"), "commit": commit_label(), "cores": available_cores(),
              "patients": args.patients, "size": list(args.size), "phases": args.phases,
              "iterations": args.iterations, "note": args.note, "runs": []}
    with tempfile.TemporaryDirectory() as scratch:
        manifest = write_cohort(Path(scratch), args.patients, tuple(args.size), args.phases)
        for workers, threads in CONFIGURATIONS:
            result = run(manifest, Path(scratch) / f"out_{workers}x{threads}", workers, threads, args.iterations)
            print(json.dumps(result), flush=True)
            report["runs"].append(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"cohort_throughput_{report['date']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
