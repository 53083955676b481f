"""Speed and accuracy of the DEFAULT preset (and variants) on the built-in breathing phantom.

Fits the 10-phase phantom (96 x 96 x 64 voxels of 3 x 3 x 4 mm) with one phase held out, through
the real engine (pipeline.fit, warping.warp), and prints per configuration: Ref-Net PSNR, fit wall
time, Ref-Net and Def-Net iterations/s (measured in-process), mean/max TRE over the trained
phases (mm), tumour (label 1) Dice, folded voxels (det J <= 0), and at the held-out phase the
predicted image's PSNR/SSIM beside linear intensity interpolation of its two neighbours.

    .venv/bin/python benchmarks/preset_study.py                     # default, trilinear prior, Ref-Net prior
    .venv/bin/python benchmarks/preset_study.py --variants all      # every variant below
    .venv/bin/python benchmarks/preset_study.py --variants default --holdout 3

Timings depend on the machine's load: the load average is printed beside them.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from STNeRPLib import phantom  # noqa: E402
from STNeRPLib.geometry import Grid  # noqa: E402
from STNeRPLib.metrics import (dice_per_label, folding_statistics, jacobian_determinant,  # noqa: E402
                               map_points, psnr, ssim, target_registration_error)
from STNeRPLib.pipeline import fit  # noqa: E402
from STNeRPLib.presets import Options  # noqa: E402
from STNeRPLib.presets import DEFAULT  # noqa: E402
from STNeRPLib.priors import evaluate_on_grid  # noqa: E402
from STNeRPLib.progress import Reporter  # noqa: E402
from STNeRPLib.warping import linear_interpolation, warp  # noqa: E402

VARIANTS: dict[str, tuple[str | None, dict]] = {
    # name: (prior, None: the preset's; overrides of DEFAULT)
    "default": (None, {}),
    "linear-prior": (None, {"prior_interpolation": "linear"}),
    "refnet-prior": ("refnet", {}),
    "refnet-direct": ("refnet", {"prior_cache": False}),
    "constant-lr": (None, {"lr_final": 1.0}),
    "all-times": (None, {"def_times": 0}),
    "velocity-16mm": (None, {"velocity_spacing": 16.0}),
    "defnet-600": (None, {"def_iterations": 600}),
}
QUICK = ["default", "linear-prior", "refnet-prior"]


class StageTimer(Reporter):
    """Records, per training stage, the time of its first and last iteration (iterations/s)."""

    def __init__(self):
        super().__init__(interval=float("inf"))
        self.stages: dict[str, list[float]] = {}

    def progress(self, stage, iteration, total, loss=None) -> None:
        now = time.perf_counter()
        record = self.stages.setdefault(stage, [now, now, 0])
        record[1:] = [now, iteration]

    def message(self, text: str) -> None:
        pass

    def rate(self, stage: str) -> float:
        """Iterations per second after the first iteration (nan if the stage did not run)."""
        if stage not in self.stages or self.stages[stage][2] < 2:
            return float("nan")
        first, last, count = self.stages[stage]
        return (count - 1) / (last - first)


def evaluate(series, name: str, prior: str | None, overrides: dict, holdout: int | None, seed: int) -> dict:
    """Fit the series without phase `holdout` and measure everything at every phase."""
    keep = [k for k in range(len(series.times)) if k != holdout]
    options = Options(dataclasses.replace(DEFAULT, **overrides), prior=prior, seed=seed)
    timer = StageTimer()
    start = time.perf_counter()
    model, _ = fit(series.images[0], series.times[0], [(series.times[k], series.images[k]) for k in keep[1:]],
                   series.labelmaps[0], options, timer)
    wall = time.perf_counter() - start
    grid, window = Grid.of(series.images[0]), model.window
    normalised = [window.normalise(sitk.GetArrayFromImage(image)) for image in series.images]
    row = {"name": name, "wall": wall, "ref_its": timer.rate("refnet"), "def_its": timer.rate("defnet"),
           "ref_psnr": float("nan"), "load": os.getloadavg()[0]}
    if model.ref_net is not None:
        row["ref_psnr"] = psnr(evaluate_on_grid(model.ref_net, normalised[0].shape).numpy(), normalised[0])
    tre, tre_max, dice, folded = [], [], [], 0
    for k in keep[1:]:
        measured = _measure(model, series, k, grid)
        tre.append(measured["tre_mean"])
        tre_max.append(measured["tre_max"])
        dice.append(measured["dice"])
        folded += measured["folded"]
    row.update(tre_mean=float(np.mean(tre)), tre_max=float(np.max(tre_max)), dice_min=float(np.min(dice)),
               folded=folded)
    if holdout is not None:
        measured = _measure(model, series, holdout, grid)
        predicted = window.normalise(measured["image"])
        scans = {series.times[k]: sitk.GetArrayFromImage(series.images[k]) for k in (holdout - 1, holdout + 1)}
        linear = window.normalise(linear_interpolation(scans, series.times[holdout]))
        actual = normalised[holdout]
        row.update(ho_psnr=psnr(predicted, actual), ho_ssim=ssim(predicted, actual),
                   lin_psnr=psnr(linear, actual), lin_ssim=ssim(linear, actual),
                   ho_tre=measured["tre_mean"], ho_dice=measured["dice"], ho_folded=measured["folded"])
    return row


def _measure(model, series, k: int, grid: Grid) -> dict:
    """TRE (mm), tumour Dice, folded voxels and predicted image at phase k."""
    warped = warp(model, series.times[k], grid)
    field = grid.image(warped.displacement.astype(np.float64), vector=True)
    points, reference_points = series.landmarks[k]
    tre = target_registration_error(map_points(field, points), reference_points)
    truth = sitk.GetArrayFromImage(series.labelmaps[k])
    return {"tre_mean": tre["tre_mean"], "tre_max": tre["tre_max"],
            "dice": dice_per_label(warped.labelmap, truth, [1])[1],
            "folded": folding_statistics(sitk.GetArrayFromImage(jacobian_determinant(field)))["folded_voxels"],
            "image": warped.image}


COLUMNS = [("name", "{:<14s}"), ("ref_psnr", "{:8.2f}"), ("wall", "{:7.1f}"), ("ref_its", "{:7.1f}"),
           ("def_its", "{:7.1f}"), ("tre_mean", "{:8.2f}"), ("tre_max", "{:7.2f}"), ("dice_min", "{:8.3f}"),
           ("folded", "{:6d}"), ("ho_psnr", "{:7.2f}"), ("lin_psnr", "{:8.2f}"), ("ho_ssim", "{:7.4f}"),
           ("lin_ssim", "{:8.4f}"), ("ho_tre", "{:6.2f}"), ("load", "{:5.2f}")]


def print_row(row: dict) -> None:
    cells = []
    for key, fmt in COLUMNS:
        value = row.get(key, float("nan"))
        cells.append(fmt.format(value) if value is not None else "-")
    print(" ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(QUICK),
                        help=f"comma-separated names, or 'all' (known: {', '.join(VARIANTS)})")
    parser.add_argument("--holdout", type=int, default=5, help="phase left out of training (-1: none)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    holdout = None if args.holdout < 0 else args.holdout
    series = phantom.breathing_series()
    print(f"DEFAULT = {DEFAULT}")
    print(f"torch threads {torch.get_num_threads()}; held-out phase {holdout}; wall = whole fit (s); "
          "its = iterations/s; TRE in mm over trained phases; ho_* at the held-out phase; "
          "lin_* = linear interpolation of its neighbours")
    print(" ".join(f"{key:>{len(fmt.format(0) if 's' not in fmt else fmt.format('x'))}s}"
                   for key, fmt in COLUMNS))
    for name in names:
        prior, overrides = VARIANTS[name]
        print_row(evaluate(series, name, prior, overrides, holdout, args.seed))


if __name__ == "__main__":
    main()
