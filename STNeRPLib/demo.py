"""The demo: the whole pipeline on the built-in phantom, with a table of metrics against its
exact ground truth and a held-out time point predicted without ever being scanned."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import cast

import numpy as np
import SimpleITK as sitk

from .contract import write_json
from .evaluation import evaluate_run
from .metrics import psnr, ssim
from .phantom import PhantomSeries, breathing_series, longitudinal_series, write_series
from .pipeline import run_training
from .preprocessing import IntensityWindow
from .presets import Options
from .progress import Reporter
from .record import RunRecord
from .series import load_series
from .warping import linear_interpolation


# The default demo grid (voxels, mm): the whole phantom thorax. Other sizes keep this field of view.
DEMO_SIZE, DEMO_SPACING = (96, 96, 64), (3.0, 3.0, 4.0)


def demo_series(longitudinal: bool, size: tuple[int, int, int]) -> tuple[PhantomSeries, int]:
    """The phantom series on `size` voxels spanning the whole thorax, and the index of the time
    point held out of training."""
    spacing = cast("tuple[float, float, float]", tuple(s * n / m for s, n, m in zip(DEMO_SPACING, DEMO_SIZE, size)))
    if longitudinal:
        return longitudinal_series(size=size, spacing=spacing), 2
    return breathing_series(size=size, spacing=spacing), 3


DEMO_SUMMARY = "summary.json"
"""The demo's figures (as printed) in its output folder, beside phantom/ and run/."""


def run_demo(folder: Path, series: PhantomSeries, held_out: int, options: Options,
             record: RunRecord, reporter: Reporter) -> dict:
    """Write the phantom to folder/phantom, train on every time but `held_out` into folder/run,
    predict the held-out time, evaluate everything, print the summary and write it to
    folder/summary.json; returns the summary."""
    files = write_series(series, folder / "phantom")
    trained = [k for k in range(len(series.times)) if k != held_out]
    times = series.times
    landmarks = _landmarks_subset(files["landmarks"], [times[k] for k in trained], folder / "phantom")
    inputs = load_series(str(files["images"][0]), times[0],
                         [(str(files["images"][k]), times[k]) for k in trained[1:]],
                         str(files["labelmaps"][0]), str(landmarks),
                         [(str(files["labelmaps"][k]), times[k]) for k in trained[1:]])
    run = folder / "run"
    record.set(inputs={**record.data["inputs"], "reference": str(files["images"][0]), "reference_time": times[0],
                       "follow_ups": [[str(files["images"][k]), times[k]] for k in trained[1:]],
                       "segmentation": str(files["labelmaps"][0]),
                       "label_names": str(_label_names(folder / "phantom"))})
    run_training(inputs, options, run, reporter, [times[held_out]], record)
    rows = evaluate_run(run, [(str(p), t) for p, t in zip(files["images"], times)],
                        [(str(p), t) for p, t in zip(files["labelmaps"], times)],
                        str(files["landmarks"]), reporter)
    summary = summarise(rows, series, held_out, record.data["intensity_window"],
                        record.data["time_points"])
    write_json(summary, folder / DEMO_SUMMARY)
    reporter.message(format_summary(summary))
    return summary


def interpolation_baseline(series: PhantomSeries, held_out: int, window: list[float]) -> dict:
    """PSNR/SSIM at the held-out time of linear intensity interpolation of its two neighbours."""
    scans = {series.times[k]: sitk.GetArrayFromImage(series.images[k]) for k in (held_out - 1, held_out + 1)}
    normal = IntensityWindow(*window).normalise
    guess = normal(linear_interpolation(scans, series.times[held_out]))
    truth = normal(sitk.GetArrayFromImage(series.images[held_out]))
    return {"psnr": psnr(guess, truth), "ssim": ssim(guess, truth)}


def summarise(rows: list[dict], series: PhantomSeries, held_out: int, window: list[float],
              time_points: list[dict]) -> dict:
    """Figures of the demo: registration at trained times, prediction at the held-out time."""
    held_time = series.times[held_out]
    trained = [r for r in rows if r["time"] not in (series.times[0], held_time)]
    held = next(r for r in rows if r["time"] == held_time)
    return {
        "tre_mean": float(np.mean([r["tre_mean"] for r in trained])),
        "tre_max": float(np.max([r["tre_max"] for r in trained])),
        "tre_unregistered": float(np.mean([r["tre_none"] for r in trained])),
        "tumour_dice_min": float(np.min([_tumour_dice(r) for r in trained])),
        "folded_voxels": int(sum(e["metrics"]["folded_voxels"] for e in time_points)),
        "held_out_time": held_time,
        "held_out": {k: held.get(k) for k in ("psnr", "ssim", "tre_mean", "tre_none")}
        | {"tumour_dice": _tumour_dice(held)},
        "interpolation": interpolation_baseline(series, held_out, window),
    }


def _tumour_dice(row: dict) -> float:
    """Tumour (label 1) Dice of an evaluation row; NaN when no tumour voxel is on the grid (a very
    coarse grid can miss it)."""
    return row["dice"].get("1", float("nan"))


def format_summary(s: dict) -> str:
    """The summary as the demo prints it: the trained time points' TRE (mm), lowest tumour Dice and folded voxels, the
    held-out time's PSNR (dB), SSIM, TRE and tumour Dice, and linear interpolation's PSNR and SSIM for comparison."""
    held, base = s["held_out"], s["interpolation"]
    return "\n".join([
        "",
        f"trained time points: TRE {s['tre_mean']:.2f} mm mean, {s['tre_max']:.2f} mm max "
        f"(unregistered {s['tre_unregistered']:.2f} mm); tumour Dice >= {s['tumour_dice_min']:.3f}; "
        f"voxels with det J <= 0: {s['folded_voxels']}",
        f"held-out time {s['held_out_time']:g} (never trained on): PSNR {held['psnr']:.2f} dB, "
        f"SSIM {held['ssim']:.3f}, TRE {held['tre_mean']:.2f} mm (unregistered {held['tre_none']:.2f}), "
        f"tumour Dice {held['tumour_dice']:.3f}",
        f"linear interpolation of its neighbours: PSNR {base['psnr']:.2f} dB, SSIM {base['ssim']:.3f}",
    ])


def _landmarks_subset(path: Path, times: list[float], folder: Path) -> Path:
    """A copy of the landmark CSV with only the rows at the given times."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    subset = folder / "landmarks_trained.csv"
    with subset.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if float(r["time"]) in times)
    return subset


def _label_names(folder: Path) -> Path:
    """labels.json: the phantom's structure names, for the report."""
    path = folder / "labels.json"
    path.write_text(json.dumps({"1": "tumour", "2": "right lung", "3": "left lung"}))
    return path
