"""Peak memory of `stnerp train` on a clinical-size series (issue 12: 512x512x300 int16, 10 phases,
within 8 GB peak RSS), per stage, with the time each stage took.

    .venv/bin/python benchmarks/memory_check.py                          # 512x512x300 x 10 phases
    .venv/bin/python benchmarks/memory_check.py --size 256 256 150 --phases 4
    .venv/bin/python benchmarks/memory_check.py --cbct     # the follow-ups in CBCT numbers: each calibrated
    .venv/bin/python benchmarks/memory_check.py --predict-times 4.5 10   # images between and beyond the scans

The series is the breathing phantom (STNeRPLib.phantom) computed at a quarter of the resolution and
resampled (linearly) to the asked size over the same field of view, stored as int16 NRRD like a CT,
with its reference labelmap and landmarks; with --cbct its follow-ups numbered as a cone-beam CT might number
them (benchmarks.data.cbct_like: 0.9 x HU + 80 less a bowl of 80 HU), so that the worker calibrates each onto the
reference's numbers. The worker runs as a real subprocess (`python -m
STNeRPLib train ... --json-events`); the resident memory (VmRSS) of its whole process tree is sampled
every 0.1 s, and each sample is counted to the stage that the worker's events say is under way:
loading (until the first progress event), refnet / defnet (training), outputs k (one per time point;
the first includes saving the model),
finishing (metrics table, report). The result file records the commit, date and machine load.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.data import cbct_like  # noqa: E402
from benchmarks.provenance import commit_label  # noqa: E402

from STNeRPLib.contract import RUN_FILE, intensity_calibrations, read_run, train_arguments  # noqa: E402
from STNeRPLib.phantom import breathing_series  # noqa: E402


FIELD_OF_VIEW_MM = (288.0, 288.0, 256.0)   # the default phantom's: 96 x 96 x 64 voxels of 3 x 3 x 4 mm
SAMPLE_SECONDS = 0.1


def build_series(folder: Path, size: tuple[int, int, int], phases: int, cbct: bool = False) -> dict:
    """Images (int16 NRRD, uncompressed), the reference labelmap and landmarks of a breathing phantom
    of `phases` phases at `size` voxels over FIELD_OF_VIEW_MM, with `cbct` the follow-ups CBCT-like. Reused when
    already built."""
    done = folder / "series.json"
    if done.exists():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    coarse = cast("tuple[int, int, int]", tuple(max(24, n // 4) for n in size))
    phantom = breathing_series(size=coarse,
                               spacing=cast("tuple[float, float, float]",
                                            tuple(f / n for f, n in zip(FIELD_OF_VIEW_MM, coarse))),
                               n_phases=phases, noise_hu=10.0)
    spacing = tuple(f / n for f, n in zip(FIELD_OF_VIEW_MM, size))
    grid = sitk.Image(list(size), sitk.sitkUInt8)
    grid.SetSpacing(spacing)
    grid.SetOrigin(phantom.images[0].GetOrigin())
    files: dict[str, Any] = {"images": [], "times": list(phantom.times)}
    for k, image in enumerate(phantom.images):
        fine = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkInt16)
        if cbct and k > 0:
            fine = cbct_like(fine)
        files["images"].append(str(folder / f"image_{k}.nrrd"))
        sitk.WriteImage(fine, files["images"][-1], useCompression=False)
        del fine
    labels = sitk.Resample(phantom.labelmaps[0], grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    files["labelmap"] = str(folder / "labelmap_0.nrrd")
    sitk.WriteImage(labels, files["labelmap"], useCompression=True)
    files["landmarks"] = str(folder / "landmarks.csv")
    with open(files["landmarks"], "w") as handle:
        handle.write("time,x,y,z,ref_x,ref_y,ref_z\n")
        for t, (points, reference) in zip(phantom.times, phantom.landmarks):
            for row in np.hstack([points, reference]):
                handle.write(",".join([f"{t:g}", *(f"{v:.6f}" for v in row)]) + "\n")
    done.write_text(json.dumps(files))
    return files


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes (0 once it is gone)."""
    total, pending = 0, [pid]
    while pending:
        p = pending.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{p}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total


class Stages:
    """The stage under way, from the worker's events; per stage the peak tree RSS and the time spent."""

    def __init__(self) -> None:
        self.current = "loading"
        self.started = time.monotonic()
        self.peak: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.events: list[dict] = []
        self.lock = threading.Lock()

    def enter(self, stage: str) -> None:
        """Make `stage` the stage under way, adding the time since the last change to the stage it ends."""
        with self.lock:
            if stage != self.current:
                now = time.monotonic()
                self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.started
                self.current, self.started = stage, now

    def sample(self, rss: int) -> None:
        """Count a sample of the tree RSS (bytes) to the stage under way, keeping each stage's peak."""
        with self.lock:
            self.peak[self.current] = max(self.peak.get(self.current, 0), rss)

    def read_events(self, stream: IO[str]) -> None:
        """Read the worker's --json-events lines, keeping every event, and enter the stage each progress event
        says is under way (loading, refnet, defnet, outputs k/n, finishing)."""
        for line in stream:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.events.append(event)
            if event.get("event") == "progress":
                stage, index, total = event["stage"], event["iteration"], event["total"]
                if stage == "outputs":
                    self.enter("finishing" if index == total else f"outputs {index + 1}/{total}")
                elif stage == "defnet" and index == total:   # then the model is saved, outputs begin
                    self.enter("outputs 1")
                else:
                    self.enter(stage)


def run_worker(files: dict, output: Path, iterations: int, threads: int, predict_times: list[float]) -> dict:
    """Train on the series in a subprocess, predicting also at `predict_times` (unscanned times, each
    an output of its own: its scans carried through the inverse of their maps); the peak tree RSS and time
    per stage."""
    absolute = {key: str(Path(files[key]).resolve()) for key in ("labelmap", "landmarks")}
    images = [str(Path(image).resolve()) for image in files["images"]]
    times = files["times"]
    command = [sys.executable, "-m", "STNeRPLib", *train_arguments(
        images[0], times[0], list(zip(images[1:], times[1:])), str(output.resolve()),
        segmentation=absolute["labelmap"], landmarks=absolute["landmarks"], predict_times=predict_times,
        iterations=iterations), "--threads", str(threads)]
    stages = Stages()
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader = threading.Thread(target=stages.read_events, args=(process.stdout,), daemon=True)
    reader.start()
    errors: list[str] = []
    collector = threading.Thread(target=lambda: errors.extend(cast("IO[str]", process.stderr)), daemon=True)
    collector.start()
    peak = 0
    while process.poll() is None:
        rss = tree_rss_bytes(process.pid)
        peak = max(peak, rss)
        stages.sample(rss)
        time.sleep(SAMPLE_SECONDS)
    reader.join()
    collector.join()
    stages.enter("ended")
    wall = time.monotonic() - start
    return {"returncode": process.returncode, "wall_seconds": round(wall, 1), "peak_rss_gb": peak / 1e9,
            "worker_maxrss_gb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9,
            "stages": [{"stage": s, "peak_rss_gb": round(stages.peak.get(s, 0) / 1e9, 3),
                        "seconds": round(stages.seconds.get(s, 0.0), 1)} for s in stages.seconds],
            "error": next((e["message"] for e in stages.events if e.get("event") == "error"), None),
            "calibrated": len(intensity_calibrations(read_run(output))) if (output / RUN_FILE).is_file() else 0,
            "stderr_tail": "".join(errors[-5:])}


def machine() -> dict:
    """This machine as the result records it: commit, date (UTC), cores, total RAM (GB), load average."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return {"commit": commit_label(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cores": os.cpu_count(), "mem_total_gb": round(int(meminfo["MemTotal"].split()[0]) / 1e6, 1),
            "loadavg": Path("/proc/loadavg").read_text().split()[:3]}


def markdown(result: dict) -> str:
    """The result as a Markdown report: the run, the worker tree's peak RSS against the budget, and the peak
    RSS and seconds per stage."""
    m, r = result["machine"], result["run"]
    lines = [f"# Memory check: {' x '.join(map(str, result['size']))} int16 x {result['phases']} phases",
             "", f"commit {m['commit']}, {m['date']}, {m['cores']} cores, {m['mem_total_gb']} GB RAM, "
             f"load average before {' '.join(m['loadavg'])}, after {' '.join(result['loadavg_after'])} "
             "(machine shared with other jobs)", "",
             f"`--iterations {result['iterations']} --threads {result['threads']}`, segmentation and landmarks"
             + (f", the follow-ups CBCT-like ({r['calibrated']} of {result['phases'] - 1} calibrated)"
                if result.get("cbct") else "")
             + (f", predicted also at {', '.join(map(str, result['predict_times']))}"
                if result.get("predict_times") else "") + "; "
             f"exit code {r['returncode']}, wall {r['wall_seconds']} s", "",
             f"**Peak RSS of the worker's process tree: {r['peak_rss_gb']:.2f} GB** "
             f"(getrusage max RSS of the worker {r['worker_maxrss_gb']:.2f} GB; budget {result['budget_gb']} GB)", "",
             "| stage | peak RSS (GB) | seconds |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['peak_rss_gb']:.2f} | {s['seconds']} |" for s in r["stages"]]
    if r["error"]:
        lines += ["", f"error: {r['error']}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Build (or reuse) the series in --scratch, train on it in a worker while sampling its memory, and write the
    result (JSON and Markdown) to --results; exit code 0 if the run succeeded within --budget-gb, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 300], metavar=("X", "Y", "Z"))
    parser.add_argument("--phases", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cbct", action="store_true",
                        help="number the follow-ups as a CBCT might (each then calibrated by the worker)")
    parser.add_argument("--predict-times", type=float, nargs="+", default=[], metavar="T",
                        help="unscanned times whose outputs are written too (the phases are at 0, 1, ...)")
    parser.add_argument("--budget-gb", type=float, default=8.0)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/stnerp_memory_check"))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--keep-output", action="store_true",
                        help="keep the run's outputs in --scratch (removed after measuring: GBs per run)")
    args = parser.parse_args()
    size = tuple(args.size)
    series = "x".join(map(str, size)) + f"x{args.phases}" + ("_cbct" if args.cbct else "")
    name = series + ("_predicted" if args.predict_times else "")
    print(f"[memory check] building the {series} series in {args.scratch}", flush=True)
    files = build_series(args.scratch / series, size, args.phases, args.cbct)
    output = args.scratch / f"run_{name}_{time.strftime('%H%M%S')}"
    before = machine()
    print(f"[memory check] training into {output}; load average {' '.join(before['loadavg'])}", flush=True)
    run = run_worker(files, output, args.iterations, args.threads, args.predict_times)
    if not args.keep_output:
        shutil.rmtree(output, ignore_errors=True)
    result = {"size": list(size), "phases": args.phases, "cbct": args.cbct, "predict_times": args.predict_times,
              "iterations": args.iterations,
              "threads": args.threads, "budget_gb": args.budget_gb, "machine": before,
              "loadavg_after": Path("/proc/loadavg").read_text().split()[:3], "run": run}
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"memory_check_{name}_{time.strftime('%Y-%m-%d_%H%M', time.gmtime())}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result), flush=True)
    return 0 if run["returncode"] == 0 and run["peak_rss_gb"] <= args.budget_gb else 1


if __name__ == "__main__":
    sys.exit(main())
