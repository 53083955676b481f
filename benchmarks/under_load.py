"""Wall time of STNeRP and of SimpleITK demons with and without CPU burners beside them (issue 11).

    .venv/bin/python benchmarks/under_load.py --burner 1                     # the breathing phantom
    .venv/bin/python benchmarks/under_load.py --burner 1 --size 48 48 32 --iterations 100
    .venv/bin/python benchmarks/under_load.py --kind longitudinal              # where the 16 mm level is kept

A clinician's workstation is never idle (Slicer renders while the worker trains). Each method
runs on benchmarks/data.py's breathing (or `--kind longitudinal`) phantom, in its own child process, first on the
machine as it is, then beside `--burner N` burner processes (each a plain Python busy loop: one core each),
started `--warmup` seconds before the method so that the 1-minute load average, which STNeRP's
thread policy reads (STNeRPLib/threads.py), has seen them. Printed: wall time of the whole series
(STNeRP: fit + every output, as benchmarks/methods.py times it; demons: every pair + its field and
Jacobian) without and with the burners, and the slowdown ratio.

Methods: `stnerp` (default preset, threads by the worker's policy), `stnerp_all_cpus` (default
preset, one thread per usable CPU whatever the load: the behaviour before the policy) and
`sitk_demons` (benchmarks/peers.py, ITK threads = usable CPUs, as the tool's own default).
The figures are only as good as the machine is quiet: with other work on it, both runs of a
method see different loads. Each run without burners therefore first waits for the 1-minute load
to fall below `--quiet` (0.5). The load average is printed beside each figure.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.provenance import load_average  # noqa: E402

METHODS = ("stnerp", "stnerp_all_cpus", "sitk_demons")
BURNER = "while True:\n    pass\n"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity), else the CPU count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def child(method: str, folder: Path, iterations: int | None) -> dict:
    """Run one method on the series in `folder` (in this process) and return its wall time."""
    import SimpleITK as sitk
    import torch
    from benchmarks import data, methods
    from STNeRPLib import threads
    series = data.Series(folder)
    if method == "stnerp":
        used = threads.use().threads
    else:
        used = usable_cpus()
        torch.set_num_threads(used)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(used)
    with tempfile.TemporaryDirectory(prefix=f"under_load_{method}_") as work:
        if method == "sitk_demons":
            info = methods.run_peer({"method": method}, series, Path(work))
        else:
            info = methods.run_stnerp({"method": "stnerp_default", "iterations": iterations}, series, Path(work))
    return {"wall_seconds": info["wall_seconds"], "threads": used}


def run_child(method: str, folder: Path, iterations: int | None) -> dict:
    """The method in a fresh process (so the thread policy measures the load as it is now)."""
    env = {**os.environ, "BENCHMARK_THREADS": str(usable_cpus()), "PYTHONWARNINGS": "ignore"}
    job = json.dumps({"method": method, "folder": str(folder), "iterations": iterations})
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", job], env=env,
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def start_burners(count: int) -> list[subprocess.Popen]:
    """Start `count` burner processes, each a Python busy loop taking one core."""
    return [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(count)]


def stop_burners(burners: list[subprocess.Popen]) -> None:
    """Kill the burner processes and wait for each to end."""
    for burner in burners:
        burner.kill()
        burner.wait()


def settle(quiet: float, most: float = 600.0) -> None:
    """Wait (at most `most` s) until the 1-minute load average is below `quiet`: the thread policy
    reads it, so a run started just after other work would take fewer threads than on an idle machine."""
    start = time.monotonic()
    while os.getloadavg()[0] >= quiet and time.monotonic() - start < most:
        time.sleep(5)
    print(f"waited {time.monotonic() - start:.0f} s for the load to fall below {quiet:g}: {load_average()}", flush=True)


def measure(methods: list[str], folder: Path, burners: int, warmup: float, iterations: int | None,
            quiet: float) -> dict:
    """Every method without, then with, the burners: {method: {"idle": ..., "burner": ...}}; each run
    without them waits for the load to fall below `quiet`."""
    results: dict[str, dict[str, dict]] = {m: {} for m in methods}
    for method in methods:
        settle(quiet)
        before = load_average()
        results[method]["idle"] = run_child(method, folder, iterations) | {"load": f"{before} -> {load_average()}"}
        print(f"{method:16s} without burner: {results[method]['idle']['wall_seconds']:7.1f} s "
              f"({results[method]['idle']['threads']} threads; load {results[method]['idle']['load']})", flush=True)
    running = start_burners(burners)
    try:
        time.sleep(warmup)
        for method in methods:
            before = load_average()
            results[method]["burner"] = (run_child(method, folder, iterations)
                                         | {"load": f"{before} -> {load_average()}"})
            print(f"{method:16s} with {burners} burner(s): {results[method]['burner']['wall_seconds']:7.1f} s "
                  f"({results[method]['burner']['threads']} threads; load {results[method]['burner']['load']})",
                  flush=True)
    finally:
        stop_burners(running)
    return results


def table(results: dict, burners: int) -> str:
    """A Markdown table per method: wall time (s) without and with the burners, the slowdown, the threads used."""
    lines = [f"| method | without burner (s) | with {burners} burner(s) (s) | slowdown | threads (without, with) |",
             "|---|---|---|---|---|"]
    for method, r in results.items():
        idle, busy = r["idle"], r["burner"]
        lines.append(f"| {method} | {idle['wall_seconds']:.1f} | {busy['wall_seconds']:.1f} | "
                     f"{busy['wall_seconds'] / idle['wall_seconds']:.2f}x | {idle['threads']}, {busy['threads']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Time every method on a temporary phantom series without, then with, the burners and print the table; with
    --child (internal), run one method in this process and print its wall time as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--burner", type=int, default=1, metavar="N", help="burner processes (one core each)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {list(METHODS)}")
    parser.add_argument("--size", type=int, nargs=3, default=(96, 96, 64), metavar=("X", "Y", "Z"),
                        help="phantom voxels; the field of view stays 288 x 288 x 256 mm")
    parser.add_argument("--kind", choices=("breathing", "longitudinal"), default="breathing",
                        help="the phantom: breathing phases, or weekly fractions of a shrinking tumour")
    parser.add_argument("--phases", type=int, default=10, help="phases or fractions")
    parser.add_argument("--iterations", type=int, help="STNeRP iterations per network (default: the preset's)")
    parser.add_argument("--warmup", type=float, default=60.0,
                        help="seconds the burners run before the first method (the load average lags)")
    parser.add_argument("--quiet", type=float, default=0.5,
                        help="before each run without burners, wait (up to 10 min) for the 1-minute load "
                             "to fall below this")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(child(job["method"], Path(job["folder"]), job["iterations"])))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.burner < 1 or any(m not in METHODS for m in methods):
        parser.error(f"--burner must be >= 1 and methods among {list(METHODS)}")
    from benchmarks import data
    spacing = tuple(extent / n for extent, n in zip((288.0, 288.0, 256.0), args.size))
    with tempfile.TemporaryDirectory(prefix="under_load_") as scratch:
        folder = data.phantom_series(Path(scratch) / args.kind, args.kind, tuple(args.size), spacing,
                                     args.phases, heldout=3)
        print(f"{args.kind} phantom {tuple(args.size)} voxels, {args.phases} phases; {usable_cpus()} usable CPUs; "
              f"{args.burner} burner(s), {args.warmup:g} s warm-up; load at start {load_average()}", flush=True)
        results = measure(methods, folder, args.burner, args.warmup, args.iterations, args.quiet)
    print(table(results, args.burner))
    return 0


if __name__ == "__main__":
    sys.exit(main())
