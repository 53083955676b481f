"""Speed and accuracy of the DEFAULT preset (and variants) on four series, and two short ones.

Series: the 10-phase breathing phantom and the 5-fraction longitudinal phantom (shrinking tumour),
96 x 96 x 64 voxels of 3 x 3 x 4 mm, the chest series (real anatomy, simulated breathing motion;
benchmarks/data.py chest_series, 3 mm) and the abdomen series (real anatomy, organs sliding 10 mm
against the wall across a 3 mm band; data.abdomen_series, 3 mm); on request (--series) the breathing, chest
and longitudinal series with 3 to 9 scans (`breathing5`, `chest7`, `longitudinal3`: OTHER_LENGTHS), for what
depends on a series' length. The real-anatomy series are skipped with a
message when their CT is not in ../shared/data. Each is fitted with one time point held out, through the real
engine (pipeline.fit, warping.warp); printed per configuration: Ref-Net PSNR, fit wall time, Ref-Net
and Def-Net iterations/s (measured in-process), mean/max TRE over the trained time points (mm),
label-1 Dice (tumour; the aorta on the chest; the spleen on the abdomen), folded voxels (det J <= 0), the
velocity levels kept and the first adaptive trial's loss ratio (with / without the finer level), at the held-out time
the predicted image's PSNR/SSIM beside linear intensity interpolation of its two neighbours, and the
largest |u| (mm) at the reference time (0 by definition).

    .venv/bin/python benchmarks/preset_study.py                     # default, trilinear prior, Ref-Net prior
    .venv/bin/python benchmarks/preset_study.py --variants all      # every variant below
    .venv/bin/python benchmarks/preset_study.py --variants default --series breathing --seed 1

--seed is the series' seed (phantom anatomy and noise; the chest's noise and landmarks): tune on one
seed, report on another. --out writes the rows as JSON and Markdown with the commit and the load.
Timings depend on the machine's load: the load average is printed beside them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import data, runners, scoring  # noqa: E402
from benchmarks.provenance import git_state  # noqa: E402
from STNeRPLib import phantom  # noqa: E402
from STNeRPLib.geometry import Grid  # noqa: E402
from STNeRPLib.metrics import jacobian_determinant, psnr, score_time_point, ssim  # noqa: E402
from STNeRPLib.pipeline import fit  # noqa: E402
from STNeRPLib.presets import Options  # noqa: E402
from STNeRPLib.presets import DEFAULT  # noqa: E402
from STNeRPLib.priors import evaluate_on_grid  # noqa: E402
from STNeRPLib.progress import Reporter  # noqa: E402
from STNeRPLib.warping import warp  # noqa: E402

if TYPE_CHECKING:
    from STNeRPLib.model import SeriesModel

VARIANTS: dict[str, tuple[str | None, dict]] = {
    # name: (prior, None: the preset's; overrides of DEFAULT)
    "default": (None, {}),
    "one-level": (None, {"velocity_levels": 1, "adaptive_levels": False}),
    "unanchored": (None, {"anchor_reference": False}),
    "linear-prior": (None, {"prior_interpolation": "linear"}),
    "refnet-prior": ("refnet", {}),
    "refnet-direct": ("refnet", {"prior_cache": False}),
    "constant-lr": (None, {"lr_final": 1.0}),
    "no-hold": (None, {"lr_hold": 0.0}),
    "hold-0.7": (None, {"lr_hold": 0.7}),
    "width-96": (None, {"def_width": 96}),
    "squaring-4": (None, {"squaring_steps": 4}),
    "all-times": (None, {"def_times": 0}),
    "times-2": (None, {"def_times": 2}),
    "velocity-16mm": (None, {"velocity_spacing": 16.0}),
    "defnet-800": (None, {"def_iterations": 800}),
    "defnet-600": (None, {"def_iterations": 600}),
    "defnet-500": (None, {"def_iterations": 500}),
    "defnet-450": (None, {"def_iterations": 450}),
    "defnet-400": (None, {"def_iterations": 400}),
    "defnet-300": (None, {"def_iterations": 300}),
    "defnet-200": (None, {"def_iterations": 200}),
    "defnet-600-lr2": (None, {"def_iterations": 600, "def_lr": 2e-3}),
    "lncc": (None, {"similarity": "lncc", "structure_similarity": None}),
    "smooth-0.5": (None, {"smoothing_sigma": 0.5}),
    "smooth-0.7": (None, {"smoothing_sigma": 0.7}),
    "smooth-0.3": (None, {"smoothing_sigma": 0.3}),
    "smooth-0.5-one-level": (None, {"smoothing_sigma": 0.5, "velocity_levels": 1, "adaptive_levels": False}),
    "lncc-uniform": (None, {"similarity": "lncc", "structure_similarity": None, "structure_points": 0.0}),
    "uniform-mse": (None, {"structure_points": 0.0}),
    "charbonnier": (None, {"similarity": "charbonnier", "structure_similarity": None, "structure_points": 0.0}),
    "charbonnier-levels-2": (None, {"similarity": "charbonnier", "structure_similarity": None, "structure_points": 0.0,
                                    "velocity_levels": 2, "adaptive_levels": False}),
    "structure-10pct-mse": (None, {"structure_similarity": None}),
    "structure-5pct": (None, {"structure_points": 0.05}),
    "structure-20pct": (None, {"structure_points": 0.2}),
    "points-2048": (None, {"def_points": 2048}),
    "whole-grid": (None, {"body_mask": False}),
    "points-8192": (None, {"def_points": 8192}),
    "fine-12mm-sigma2": (None, {"velocity_spacing": 12.0, "def_sigma": 2.0}),
    "levels-2": (None, {"velocity_levels": 2, "adaptive_levels": False}),
    "levels-2-unanchored": (None, {"velocity_levels": 2, "adaptive_levels": False, "anchor_reference": False}),
    "levels-3": (None, {"velocity_levels": 3, "adaptive_levels": False}),
    "converge": (None, {"stop_on_convergence": True}),
    "converge-decay-400": (None, {"stop_on_convergence": True, "decay_iterations": 400}),
    "converge-decay-200": (None, {"stop_on_convergence": True, "decay_iterations": 200}),
    "levels-2-converge": (None, {"velocity_levels": 2, "adaptive_levels": False, "stop_on_convergence": True}),
    "finer-lr-1": (None, {"level_lr_scale": 1.0}),
    "finer-lr-2": (None, {"level_lr_scale": 2.0}),
    "finer-lr-5": (None, {"level_lr_scale": 5.0}),
    "level-start-0.1": (None, {"level_start": 0.1}),
    "level-start-0.3": (None, {"level_start": 0.3}),
    "steps-7": (None, {"squaring_steps": 7}),
    "displacement-trilinear": (None, {"displacement_spacing": 0.0}),
    "displacement-6mm": (None, {"displacement_spacing": 6.0}),
    "displacement-4mm": (None, {"displacement_spacing": 4.0}),
    "last-iterate": (None, {"average_last": 0.0}),
    "average-10pct": (None, {"average_last": 0.1}),
    "average-half": (None, {"average_last": 0.5}),
    "time-sigma-0.5": (None, {"time_sigma_halved_below": 0}),
    "time-sigma-0.25": (None, {"def_time_sigma": 0.25, "time_sigma_halved_below": 0}),
}
QUICK = ["default", "linear-prior", "refnet-prior"]
SERIES = ["breathing", "longitudinal", "chest", "chest_own_grids", "abdomen"]
LENGTHS = {"breathing": 10, "chest": 10, "longitudinal": 5}
"""Scans in each series that comes in other lengths; `<series><N>` (breathing5, chest7, longitudinal3, N from 3 to
9) is the series with N scans instead, the middle one held out: for what depends on a series' length (the time
scale, Preset.for_scans). Not in the default --series."""
OTHER_LENGTHS = [f"{kind}{count}" for kind, usual in LENGTHS.items() for count in range(3, 10) if count != usual]


def series_length(name: str) -> int:
    """The number of scans of the named series: OTHER_LENGTHS end in theirs, the others have their kind's (LENGTHS;
    longitudinal-psf the longitudinal series') or 10."""
    kind = name.rstrip("0123456789")
    if kind != name:
        return int(name[len(kind):])
    return next((usual for kind, usual in LENGTHS.items() if name.startswith(kind)), 10)


RENDERED = ["breathing-psf", "longitudinal-psf"]
"""The two phantoms with each voxel the mean of data.PSF_SUPERSAMPLING^3 sub-voxel samples (phantom.py,
`supersampling`: a box point-spread function one voxel wide) instead of the value at its centre, for what depends
on the point sampling of vessels finer than the grid. Not in the default --series."""
HOLDOUT = {name: series_length(name) // 2 for name in [*SERIES, *RENDERED, *OTHER_LENGTHS]}
"""The time index each series holds out by default: its middle one."""


@dataclasses.dataclass
class StudySeries:
    """A series with exact ground truth: per time index its time, image, labelmap, landmarks."""

    name: str
    times: list[float]
    images: list[sitk.Image]
    labelmaps: list[sitk.Image]
    landmarks: list[tuple[np.ndarray, np.ndarray]]


def load_series(name: str, seed: int, scratch: Path) -> StudySeries:
    """The named series at `seed` (the chest and abdomen series are written once to `scratch` and read back;
    chest_own_grids with each phase after the reference on a grid of its own, as the benchmark's)."""
    scans = series_length(name)
    if name.startswith("chest") or name == "abdomen":
        folder = scratch / f"{name}_3mm_seed{seed}"
        if not (folder / "meta.json").exists():
            if name.startswith("chest"):
                own_grids_mm = runners.OWN_GRIDS_SPACING * 3.0 if name == "chest_own_grids" else None
                data.chest_series(folder, 3.0, scans, HOLDOUT[name], seed, own_grids_mm=own_grids_mm)
            else:
                data.abdomen_series(folder, scans, HOLDOUT[name], seed)
        s = data.Series(folder)
        count = range(len(s.times))
        return StudySeries(name, s.times, [s.image(k) for k in count], [s.labelmap(k) for k in count],
                           [s.landmarks(k) for k in count])
    supersampling = data.PSF_SUPERSAMPLING if name in RENDERED else 1
    made = (phantom.breathing_series(n_phases=scans, seed=seed, supersampling=supersampling)
            if name.startswith("breathing")
            else phantom.longitudinal_series(n_fractions=scans, seed=seed, supersampling=supersampling))
    return StudySeries(name, made.times, made.images, made.labelmaps, made.landmarks)


class StageTimer(Reporter):
    """Records, per training stage, the time of its first and last iteration (iterations/s)."""

    def __init__(self) -> None:
        super().__init__(interval=float("inf"))
        self.stages: dict[str, list[float]] = {}

    def progress(self, stage: str, iteration: int, total: int, loss: float | None = None) -> None:
        """Record this report's time as the stage's last (the first report's also as its first) and its iteration."""
        now = time.perf_counter()
        record = self.stages.setdefault(stage, [now, now, 0])
        record[1:] = [now, iteration]

    def message(self, text: str) -> None:
        """Drop the log's messages: the study prints only its own rows."""
        pass

    def iterations(self, stage: str) -> int:
        """The last iteration of the stage (0 if it did not run)."""
        return int(self.stages.get(stage, [0, 0, 0])[2])

    def rate(self, stage: str) -> float:
        """Iterations per second after the first iteration (nan if the stage did not run)."""
        if stage not in self.stages or self.stages[stage][2] < 2:
            return float("nan")
        first, last, count = self.stages[stage]
        return (count - 1) / (last - first)


def evaluate(series: StudySeries, name: str, prior: str | None, overrides: dict, holdout: int | None) -> dict:
    """Fit the series without time index `holdout` and measure everything at every time point, each on its scan's
    grid."""
    keep = [k for k in range(len(series.times)) if k != holdout]
    options = Options(dataclasses.replace(DEFAULT, **overrides), prior=prior)
    timer = StageTimer()
    start = time.perf_counter()
    model = fit(series.images[0], series.times[0], [(series.times[k], series.images[k]) for k in keep[1:]],
                series.labelmaps[0], options, timer)
    wall = time.perf_counter() - start
    grid, window = Grid.of(series.images[0]), model.window
    ratio = next((r for r in model.deformation.trial_ratios if r is not None), float("nan"))
    row = {"series": series.name, "name": name, "wall": wall, "ref_its": timer.rate("refnet"),
           "def_its": timer.rate("defnet"), "def_n": timer.iterations("defnet"), "levels": model.deformation.kept,
           "ratio": ratio, "ref_psnr": float("nan"), "load": os.getloadavg()[0]}
    if model.ref_net is not None:
        reference = window.normalise(sitk.GetArrayFromImage(series.images[0]))
        row["ref_psnr"] = psnr(evaluate_on_grid(model.ref_net, reference.shape).numpy(), reference)
    at_reference = warp(model, series.times[0], grid).displacement
    row["u_ref_max"] = float(np.linalg.norm(at_reference, axis=-1).max())
    tre, tre_max, dice, folded = [], [], [], 0
    for k in keep[1:]:
        measured = _measure(model, series, k)
        tre.append(measured["tre_mean"])
        tre_max.append(measured["tre_max"])
        dice.append(measured["dice"])
        folded += measured["folded"]
    row.update(tre_mean=float(np.mean(tre)), tre_max=float(np.max(tre_max)), dice_min=float(np.min(dice)),
               folded=folded)
    if holdout is not None:
        measured = _measure(model, series, holdout)
        predicted = window.normalise(measured["image"])
        scans = {series.times[k]: series.images[k] for k in (holdout - 1, holdout + 1)}
        linear = window.normalise(scoring.linear(scans, series.times[holdout], series.images[holdout]))
        actual = window.normalise(sitk.GetArrayFromImage(series.images[holdout]))
        row.update(ho_psnr=psnr(predicted, actual), ho_ssim=ssim(predicted, actual),
                   lin_psnr=psnr(linear, actual), lin_ssim=ssim(linear, actual),
                   ho_tre=measured["tre_mean"], ho_dice=measured["dice"], ho_folded=measured["folded"])
    return row


def _measure(model: SeriesModel, series: StudySeries, k: int) -> dict:
    """TRE (mm), tumour Dice, folded voxels (metrics.score_time_point) and predicted image at phase k, on its scan's
    grid."""
    grid = Grid.of(series.images[k])
    warped = warp(model, series.times[k], grid)
    field = grid.image(warped.displacement.astype(np.float64), vector=True)
    scores = score_time_point(field=field, jacobian=sitk.GetArrayFromImage(jacobian_determinant(field)),
                              labelmaps=(cast("np.ndarray", warped.labelmap),
                                         sitk.GetArrayFromImage(series.labelmaps[k])), labels=[1],
                              landmarks=series.landmarks[k])
    return {"tre_mean": scores["tre_mean"], "tre_max": scores["tre_max"], "dice": scores["dice"]["1"],
            "folded": scores["folded_voxels"], "image": warped.image}


COLUMNS = [("series", "{:<12s}"), ("name", "{:<18s}"), ("ref_psnr", "{:8.2f}"), ("wall", "{:7.1f}"),
           ("ref_its", "{:7.1f}"), ("def_its", "{:7.1f}"), ("def_n", "{:5d}"), ("levels", "{:6d}"),
           ("ratio", "{:6.3f}"), ("tre_mean", "{:8.2f}"), ("tre_max", "{:7.2f}"), ("dice_min", "{:8.3f}"),
           ("folded", "{:6d}"), ("ho_psnr", "{:7.2f}"), ("lin_psnr", "{:8.2f}"), ("ho_ssim", "{:7.4f}"),
           ("lin_ssim", "{:8.4f}"), ("ho_tre", "{:6.2f}"), ("u_ref_max", "{:9.3f}"),
           ("load", "{:5.2f}")]


def print_row(row: dict) -> None:
    """Print one row as a line of the COLUMNS table (nan where a column was not measured)."""
    print(" ".join(fmt.format(row.get(key, float("nan"))) for key, fmt in COLUMNS), flush=True)


def main() -> None:
    """Fit every chosen variant on every chosen series (one time held out unless --holdout -1) and print a row
    each, also written to --out as they come; with --profile, profile the first variant on the first series instead."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(QUICK),
                        help=f"comma-separated names, or 'all' (known: {', '.join(VARIANTS)})")
    parser.add_argument("--series", default=",".join(SERIES),
                        help=f"comma-separated, of {', '.join([*SERIES, *RENDERED])}, or a series of N scans "
                             f"({', '.join(OTHER_LENGTHS)})")
    parser.add_argument("--holdout", type=int, default=None,
                        help=f"time index left out of training (-1: none; default per series {HOLDOUT})")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="the series' seed (training's seed stays 0)")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/stnerp_preset_study"))
    parser.add_argument("--out", type=Path, help="write the rows to OUT.json and OUT.md")
    parser.add_argument("--profile", type=int, metavar="N", default=0,
                        help="instead: profile N Def-Net iterations of the first variant on the first series")
    args = parser.parse_args()
    unknown = [name for name in args.series.split(",") if name not in HOLDOUT]
    if unknown:
        parser.error(f"unknown series {', '.join(unknown)}: use {', '.join(HOLDOUT)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        variant = args.variants.split(",")[0]
        profile(load_series(args.series.split(",")[0], args.seed, args.scratch), variant, args.profile)
        return
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    print(f"DEFAULT = {DEFAULT}")
    print(f"torch threads {torch.get_num_threads()}; series seed {args.seed}; wall = whole fit (s); "
          "its = iterations/s; TRE in mm over trained time points; ho_* at the held-out time point; "
          "lin_* = linear interpolation of its neighbours")
    print(" ".join(f"{key:>{len(fmt.format(0) if 's' not in fmt else fmt.format('x'))}s}"
                   for key, fmt in COLUMNS))
    rows, start_load = [], os.getloadavg()
    for series_name in args.series.split(","):
        if series_name == "abdomen" and not data.abdomen_available():
            print(f"abdomen: skipped, its CT is not in {data.ABDOMEN_CT}", flush=True)
            continue
        if series_name.startswith("chest") and not data.chest_available():
            print(f"{series_name}: skipped, its CT is not in {data.CHEST_CT}", flush=True)
            continue
        series = load_series(series_name, args.seed, args.scratch)
        holdout = HOLDOUT[series_name] if args.holdout is None else (None if args.holdout < 0 else args.holdout)
        for name in names:
            prior, overrides = VARIANTS[name]
            rows.append(evaluate(series, name, prior, overrides, holdout))
            print_row(rows[-1])
            if args.out:
                write_results(args.out, rows, vars(args), start_load)


def matmul_gflops(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """The machine's fp32 matrix-product rate at `threads` torch threads, GFLOP/s (best of 3 timings of
    `repeats` n x n products): what Def-Net's training throughput is measured against."""
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
    return 2 * n ** 3 * repeats / best / 1e9


FLOP_ITERATIONS = 100
"""Def-Net iterations over which --profile counts the matrix FLOPs of an iteration (their mean): which times
are drawn changes an iteration's work (the anchored reference is not integrated)."""


def profile(series: StudySeries, variant: str, iterations: int) -> None:
    """Where Def-Net training's time goes (torch.profiler, operators by self time), and its matrix
    FLOPs (torch's FlopCounterMode, the mean over FLOP_ITERATIONS iterations at every velocity level: the
    MLPs' products; an iteration that draws the anchored reference does less)
    per second against the measured fp32 matmul rate at the same thread count.
    Every level of the variant trains from the first iteration (level_start 0), so a variant with a
    fixed count (one-level, levels-2) is profiled in its steady state; an adaptive one decides at 20 %."""
    from torch.profiler import profile as torch_profile
    from torch.utils.flop_counter import FlopCounterMode
    threads = torch.get_num_threads()
    follow_ups = list(zip(series.times[1:], series.images[1:]))
    prior, overrides = VARIANTS[variant]
    preset = dataclasses.replace(DEFAULT, **overrides, level_start=0.0)
    counter = FlopCounterMode(display=False)
    with counter:
        fit(series.images[0], series.times[0], follow_ups, None,
            Options(dataclasses.replace(preset, def_iterations=FLOP_ITERATIONS), prior=prior), StageTimer())
    flops = counter.get_total_flops() / FLOP_ITERATIONS
    options = Options(dataclasses.replace(preset, def_iterations=iterations), prior=prior)
    timer = StageTimer()
    with torch_profile() as recorded:
        fit(series.images[0], series.times[0], follow_ups, None, options, timer)
    print(recorded.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    timer = StageTimer()
    fit(series.images[0], series.times[0], follow_ups, None, options, timer)   # unprofiled rate
    rate, matmul = timer.rate("defnet"), matmul_gflops(threads)
    achieved = flops * rate / 1e9
    print(f"{series.name}, {variant}: {rate:.1f} Def-Net iterations/s "
          f"({threads} threads, load {os.getloadavg()[0]:.2f}); "
          f"{flops / 1e6:.0f} MFLOP of matrix products per iteration = {achieved:.1f} GFLOP/s, "
          f"{100 * achieved / matmul:.1f} % of the measured matmul rate {matmul:.1f} GFLOP/s")


def write_results(out: Path, rows: list[dict], args: dict, start_load: tuple[float, float, float]) -> None:
    """OUT.json (rows, the commit, arguments, torch threads, load at start and now) and OUT.md (the table)."""
    commit, dirty = git_state()
    meta: dict[str, Any]
    meta = {"commit": commit, "uncommitted_changes": bool(dirty), "arguments": {k: str(v) for k, v in args.items()},
            "torch_threads": torch.get_num_threads(), "load_start": start_load, "load_end": os.getloadavg(),
            "default_preset": DEFAULT.to_dict(), "variants": {k: VARIANTS[k] for k in {r["name"] for r in rows}}}
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    lines = [f"# preset_study: commit {commit[:10]}{' (+ uncommitted changes)' if dirty else ''}", "",
             f"Series seed {args['seed']}; torch threads {meta['torch_threads']}; load average at start "
             f"{' '.join(f'{x:.2f}' for x in start_load)}, at end {' '.join(f'{x:.2f}' for x in meta['load_end'])} "
             "(2 cores shared with other jobs). wall = whole fit (s); TRE mm over trained time points; "
             "ho_* at the held-out time point, lin_* = linear interpolation of its neighbours.", "",
             "| " + " | ".join(key for key, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), fmt) for key, fmt in COLUMNS) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _cell(value: str | float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value).strip()


if __name__ == "__main__":
    main()
