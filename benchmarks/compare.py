"""Benchmark STNeRP against the pairwise tools users would pick instead (issues 4 and 11): the command line.

    .venv/bin/python benchmarks/compare.py --quick                    # development: small volumes
    .venv/bin/python benchmarks/compare.py --repeats 3                # every series and method
    .venv/bin/python benchmarks/compare.py --series breathing --methods stnerp_default,sitk_demons,none,exact

The parts: benchmarks/runners.py (series registry, child processes, repeats), methods.py (the
method registry and the child that runs one), scoring.py (the same scores for every method),
report.py (provenance, markdown, targets). Results: benchmarks/results/benchmark_<date>.md and .json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks import data, methods, report, runners  # noqa: E402

RESULTS = HERE / "results"
TIMED_DEFAULT = ["stnerp_default", "sitk_demons"]
BASELINES_DEFAULT = ["none", "exact"]


def parser() -> argparse.ArgumentParser:
    """The benchmark's command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--series", default=",".join(runners.SERIES), help=f"comma list of {list(runners.SERIES)}")
    p.add_argument("--methods", default=",".join(TIMED_DEFAULT + BASELINES_DEFAULT),
                   help=f"comma list of {methods.all_methods()}")
    p.add_argument("--heldout-methods", default="stnerp_default,sitk_demons,none,exact",
                   help="methods (of --methods; STNeRP with continuous time and no --prealign) that "
                        "predict the held-out image")
    p.add_argument("--repeats", type=int, default=1, help="runs of every timed method, interleaved (default 1)")
    p.add_argument("--seed", type=int, default=1,
                   help=f"phantom seed (default 1; the default preset was tuned on seed {runners.TUNED_ON['seed']})")
    p.add_argument("--threads", type=int, default=2, help="threads for every method (default 2)")
    p.add_argument("--quick", action="store_true", help="small volumes and few iterations, for development")
    p.add_argument("--iterations", type=int, help="STNeRP iterations per network (default: the preset's; "
                                                  "--quick: 60)")
    p.add_argument("--chest-spacing", type=float, default=3.0, help="mm; the CT is 1.5 mm")
    p.add_argument("--psf", action="store_true",
                   help="render the phantoms through a one-voxel box point-spread function (each voxel the mean of "
                        f"{data.PSF_SUPERSAMPLING}^3 sub-voxel samples) instead of sampling their voxel centres")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--peers-python", default=str(runners.PEERS_PYTHON),
                   help="interpreter for the peers (default .venv-peers, made by `bash setup.sh peers`; "
                        "falls back to this one)")
    p.add_argument("--out", default=str(RESULTS), help="folder for the .md and .json")
    p.add_argument("--render", metavar="JSON", help="only re-render the markdown of a result JSON")
    return p


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def plan_from(args: argparse.Namespace, parse: argparse.ArgumentParser) -> tuple[runners.Plan, list[str]]:
    """The plan, and the peers skipped because their package is missing."""
    chosen = _names(args.methods)
    unknown = [m for m in chosen + _names(args.heldout_methods) if m not in methods.all_methods()]
    if unknown:
        parse.error(f"unknown methods {unknown}; choose from {methods.all_methods()}")
    if args.repeats < 1:
        parse.error("--repeats must be at least 1")
    python = Path(args.peers_python)
    missing = [m for m in chosen if not runners.available(m, python)]
    chosen = [m for m in chosen if m not in missing]
    iterations = args.iterations or (60 if args.quick else None)
    heldout = [m for m in _names(args.heldout_methods) if m in chosen
               and (methods.kind(m) != "stnerp" or methods.predicts_unscanned_times(m))]
    return runners.Plan(timed=[m for m in chosen if methods.kind(m) != "baseline"],
                        baselines=[m for m in chosen if methods.kind(m) == "baseline"], heldout=heldout,
                        repeats=args.repeats, threads=args.threads, timeout=args.timeout,
                        iterations={m: iterations for m in chosen if methods.kind(m) == "stnerp"},
                        peers_python=python), missing


def main(argv: list[str] | None = None) -> int:
    """Build each chosen series, run and score every method on it, and write the result (JSON and Markdown, rewritten
    after each series) to --out; with --render, only re-render the Markdown of a result JSON."""
    parse = parser()
    args = parse.parse_args(argv)
    if args.render:
        text = report.markdown(json.loads(Path(args.render).read_text()))
        Path(args.render).with_suffix(".md").write_text(text)
        print(text)
        return 0
    series_names = _names(args.series)
    if any(s not in runners.SERIES for s in series_names):
        parse.error(f"unknown series; choose from {list(runners.SERIES)}")
    plan, missing = plan_from(args, parse)
    for m in missing:
        print(f"[benchmark] {m}: its package is not installed for {args.peers_python}: skipped", flush=True)
    configs = {m: methods.config(m, (plan.iterations or {}).get(m)) for m in plan.timed + plan.baselines}
    python = args.peers_python if Path(args.peers_python).exists() else None
    result = {**report.provenance(plan.threads, configs, python), "quick": args.quick, "seed": args.seed,
              "repeats": args.repeats, "tuned_on": runners.TUNED_ON, "skipped_methods": missing,
              "arguments": vars(args), "series": {}}
    stem = Path(args.out) / ("benchmark_" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d_%H%M")
                             + ("_quick" if args.quick else ""))
    settings = runners.SeriesSettings(quick=args.quick, seed=args.seed, chest_spacing=args.chest_spacing,
                                      supersampling=data.PSF_SUPERSAMPLING if args.psf else 1)
    scratch = Path(tempfile.mkdtemp(prefix="stnerp_bench_"))
    try:
        for name in series_names:
            print(f"[benchmark] building series {name} ...", flush=True)
            folder = runners.SERIES[name](scratch / name, settings)
            if folder is None:
                result["series"][name] = {"skipped": "its data are missing (../shared/data, or the CTs pip fetches)"}
                continue
            series = data.Series(folder)
            entry = {"meta": series.meta, "role": runners.role(series.meta)}
            entry.update(runners.run_series(series, plan, scratch, lambda text: print(f"[benchmark] {text}",
                                                                                       flush=True)))
            result["series"][name] = entry
            report.write(report.finish(result, partial=True), stem)
        text = report.write(report.finish(result, partial=False), stem)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(text)
    print(f"[benchmark] written {stem}.md and .json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
