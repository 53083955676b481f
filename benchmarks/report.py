"""The benchmark's result files: provenance, the markdown tables and the targets of issue 11.

Every result (benchmarks/results/benchmark_<date>.json and .md) records where it came from
(PROVENANCE_KEYS): the commit and whether the tree had uncommitted changes, the date (UTC), the
machine, the interpreter the peers ran under, the load average at the start and the end, the thread count,
and every method's settings.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks import methods
from benchmarks.provenance import git_state

if TYPE_CHECKING:
    from collections.abc import Sequence

ROOT = Path(__file__).resolve().parents[1]
PROVENANCE_KEYS = ("commit", "dirty", "date", "machine", "peers_ran_under", "load_start", "load_end", "threads",
                   "configs")


def _version(package: str, python: str | None) -> str | None:
    """A package's version in this interpreter, or in `python` (the peers' venv)."""
    if python:
        code = f"from importlib import metadata; print(metadata.version({package!r}))"
        found = subprocess.run([python, "-c", code], capture_output=True, text=True)
        return found.stdout.strip() or None
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine(peers_python: str | None) -> dict:
    """CPU, cores, RAM, platform and the versions of what the methods run on."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    meminfo = Path("/proc/meminfo").read_text().splitlines() if Path("/proc/meminfo").exists() else []
    memory = next((int(line.split()[1]) / 1024**2 for line in meminfo if line.startswith("MemTotal")), None)
    versions = {"python": platform.python_version(),
                **{p: _version(p, None) for p in ("torch", "SimpleITK", "numpy", "scipy")},
                **{f"{p} (peers)": _version(p, peers_python) for p in ("antspyx", "itk-elastix", "numpy")}}
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(memory, 1) if memory else None,
            "platform": platform.platform(), "versions": versions}


def provenance(threads: int, configs: dict, peers_python: str | None) -> dict:
    """Everything PROVENANCE_KEYS names but the load at the end (`finish` adds it). `peers_ran_under` is the
    interpreter the peers ran under: the peers' venv, or this one when there is none (`--peers-python`, an
    argument, may name a venv that does not exist)."""
    commit, dirty = git_state()
    return {"commit": commit, "dirty": dirty,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(peers_python), "peers_ran_under": peers_python or sys.executable,
            "load_start": os.getloadavg(), "threads": threads, "configs": configs}


def finish(report: dict, partial: bool) -> dict:
    """Complete `report` in place and return it: the load average at the end, whether it is partial, and
    issue 11's targets on every series that ran."""
    report["load_end"] = os.getloadavg()
    report["partial"] = partial
    report["targets"] = {name: targets(entry) for name, entry in report["series"].items() if "methods" in entry}
    return report


def write(report: dict, stem: Path) -> str:
    """stem.json and stem.md; returns the markdown."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=float))
    stem.with_suffix(".md").write_text(text)
    return text


# ----------------------------------------------------------------------------- targets


TRE_RATIO = 0.9
"""Issue 11: STNeRP's mean TRE at most this times the most accurate peer's on every series."""
WALL_RATIO = 0.7
"""Issue 11: STNeRP's whole-series wall time (fit and every output) at most this times demons' for the pairs."""
REFERENCE_DISPLACEMENT_MM = 0.01
"""Issue 11: |u| at the reference time below this everywhere (mm)."""
HELDOUT_GAIN_DB = 2.0
"""Issue 11: the predicted image at the held-out time at least this above linear interpolation (PSNR, dB)."""
DEMONS = "sitk_demons"
"""The peer whose time the wall-time target and whose per-time Dice the fraction target are measured against."""
PER_TIME_DICE_SERIES = ("longitudinal", "lung_tumour", "lung_nodule")
"""Series whose first structure's Dice must be at least demons' at every registered time (issue 11: the tumour
at each weekly fraction), not only on average."""


def targets(entry: dict) -> list[dict]:
    """Issue 11's targets for STNeRP default on one series, each {"met": True / False / None (not measured in
    this file), "text": the figures}: mean TRE <= TRE_RATIO x the most accurate peer's; no folded voxel; wall
    time <= WALL_RATIO x demons'; |u| at the reference time < REFERENCE_DISPLACEMENT_MM; the held-out image
    >= linear interpolation + HELDOUT_GAIN_DB (beside the exact motion's gain by the same recipe, its
    ceiling); on PER_TIME_DICE_SERIES, the first structure's Dice >= demons' at every time."""
    rows = entry["methods"]
    d = rows.get("stnerp_default")
    if not d or not d.get("ok"):
        return []
    peers = {m: r for m, r in rows.items() if methods.kind(m) == "peer" and r.get("ok")}
    out = [_tre_target(d, peers)] if peers else []
    out.append({"met": d["summary"]["folded_voxels"] == 0,
                "text": f"{d['summary']['folded_voxels']} folded voxels "
                        f"(min det J {d['summary']['jacobian_min']:.3f})"})
    if DEMONS in peers:
        out.append(_wall_target(d, peers[DEMONS]))
    out.append(_reference_target(d))
    out += _heldout_target(entry.get("heldout", {}))
    if entry["meta"]["name"] in PER_TIME_DICE_SERIES and DEMONS in peers:
        out.append(_per_time_dice_target(entry, d, peers[DEMONS]))
    return out


def _tre_target(d: dict, peers: dict) -> dict:
    best = min(peers, key=lambda m: peers[m]["summary"]["tre_mean"])
    ours, theirs = d["summary"]["tre_mean"], peers[best]["summary"]["tre_mean"]
    return {"met": ours <= TRE_RATIO * theirs,
            "text": f"mean TRE {ours:.2f} mm = {ours / theirs:.2f} x the most accurate peer's ({methods.label(best)} "
                    f"{theirs:.2f} mm; target <= {TRE_RATIO:g} x)"}


def _wall_target(d: dict, demons: dict) -> dict:
    ours, theirs = d["wall"]["median"], demons["wall"]["median"]
    return {"met": ours <= WALL_RATIO * theirs,
            "text": f"median wall time {ours:.1f} s = {ours / theirs:.2f} x demons' {theirs:.1f} s "
                    f"(N = {d['wall']['n']}; target <= {WALL_RATIO:g} x)"}


def _reference_target(d: dict) -> dict:
    largest = d.get("reference_displacement_max")
    if largest is None:
        return {"met": None, "text": "|u| at the reference time: not measured in this run"}
    return {"met": largest < REFERENCE_DISPLACEMENT_MM,
            "text": f"largest |u| at the reference time {largest:.2g} mm (target < {REFERENCE_DISPLACEMENT_MM:g} mm)"}


def _heldout_target(heldout: dict) -> list[dict]:
    h, linear, exact = heldout.get("stnerp_default"), heldout.get("none"), heldout.get("exact")
    if not (h and h.get("ok") and linear and "predicted" in h):
        return []
    gain = h["predicted"]["psnr"] - linear["predicted"]["psnr"]
    exact_gain = exact["predicted"]["psnr"] - linear["predicted"]["psnr"] if exact and exact.get("ok") else None
    ceiling = "" if exact_gain is None else f"; the exact motion by the same recipe {exact_gain:+.2f} dB"
    if exact_gain is not None and exact_gain > 0:
        ceiling += f", so {100 * gain / exact_gain:.0f} % of its gain"
    return [{"met": gain >= HELDOUT_GAIN_DB,
             "text": f"held-out t = {h['time']:g}: predicted image {h['predicted']['psnr']:.2f} dB vs linear "
                     f"interpolation {linear['predicted']['psnr']:.2f} dB ({gain:+.2f} dB{ceiling}; target "
                     f"+{HELDOUT_GAIN_DB:g})"}]


def _per_time_dice_target(entry: dict, d: dict, demons: dict) -> dict:
    label = next(iter(entry["meta"]["labels"]))
    ours = [p["dice"][label] for p in d["per_time"]]
    theirs = [p["dice"][label] for p in demons["per_time"]]
    name = entry["meta"]["labels"][label]
    return {"met": all(a >= b for a, b in zip(ours, theirs)),
            "text": f"{name} Dice at each time {' / '.join(f'{a:.3f}' for a in ours)} vs demons' "
                    f"{' / '.join(f'{b:.3f}' for b in theirs)}"}


# ----------------------------------------------------------------------------- markdown


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _wall(row: dict) -> str:
    w = row.get("wall")
    if not w:
        return "–"
    return f"{w['median']:.1f} ({w['min']:.1f}–{w['max']:.1f}), N = {w['n']}"


def _peak(row: dict) -> float | None:
    """Peak RSS (MB) of a row, if measured as the process's own VmHWM."""
    return row.get("peak_rss_mb") if row.get("peak_rss_source") == "VmHWM" else None


def _load(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def header(report: dict) -> list[str]:
    """The report's Markdown title and preamble: commit, machine, versions, threads, load average, and what the
    wall time and peak RSS cover; quick and partial runs flagged."""
    m = report["machine"]
    dirty = " **with uncommitted changes**" if report["dirty"] else ""
    lines = [f"# STNeRP benchmark — {report['date']}", "",
             f"Commit `{report['commit'][:12]}`{dirty}. Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB "
             f"RAM, {m['platform']}; versions {', '.join(f'{k} {v}' for k, v in m['versions'].items() if v)}. "
             f"Peers ran under {report.get('peers_ran_under', 'an interpreter not recorded')}. "
             f"{report['threads']} thread(s) for every method. Load average (1, 5, 15 min) at start "
             f"{_load(report['load_start'])}, at end {_load(report.get('load_end', []))}: others shared the "
             f"{m['cores']} cores when it was above ~{report['threads']}, which is why the timed methods are "
             "interleaved and repeated.", "",
             "Wall time: median (min–max) over N repeats, every method once per repeat, the order rotated "
             "by one place each repeat; it covers reading the images, the registration or fit, and writing "
             "every output (STNeRP: displacement, Jacobian, labelmap, predicted image, inverse displacement of "
             "every time point, and the model; peers: displacement and Jacobian of every pair); imports (and "
             "the loading of numba's compiled kernels, 0.3 s a process) are outside it. Scores are those of "
             "the first repeat (the spread of the mean TRE over the repeats is in the JSON, `tre_mean_runs`). "
             "Peak RSS: the high-water mark of the method's own process (VmHWM), the largest over the repeats.", ""]
    if report.get("quick"):
        lines += ["**Quick mode** (half-size volumes, few iterations): for development, not for figures.", ""]
    if report.get("partial"):
        lines = ["**Partial: the benchmark was still running (or was interrupted).**", ""] + lines
    return lines


def series_table(name: str, entry: dict) -> list[str]:
    """One series' Markdown section: its description and role (tuning or reporting series), a row per method
    (TRE, dense error, Dice, folded voxels, PSNR, SSIM, wall time, peak RSS), then distance_table and heldout_table."""
    meta = entry["meta"]
    labels = meta["labels"]
    role = ("**tuning series** (the default preset was tuned on it: its figures flatter STNeRP)"
            if entry["role"] == "tuning" else "**reporting series** (not used to tune the default preset)")
    lines = [f"## {name}: {meta['description']}", "", f"{role}. Grid {meta['size']} voxels of "
             f"{[round(s, 2) for s in meta['spacing']]} mm; {len(meta['times'])} time points (reference = first); "
             f"peers make {len(meta['times']) - 1} pairwise registrations. Dice: "
             f"{', '.join(f'{k} = {v}' for k, v in labels.items())}.", "",
             "| method | TRE mean ± std (max) mm | dense err mm | " + " | ".join(f"Dice {k}" for k in labels)
             + " | det J ≤ 0 | PSNR dB | SSIM | wall s, median (min–max) | peak RSS MB |",
             "|---" * (8 + len(labels)) + "|"]
    for method, r in entry["methods"].items():
        if not r.get("ok"):
            lines.append(f"| {methods.label(method)} | failed: {str(r.get('error', '?'))[:80]} |"
                         + " |" * (6 + len(labels)))
            continue
        s = r["summary"]
        dice = " | ".join(_fmt(s["dice"].get(k), 3) for k in labels)
        lines.append(f"| {methods.label(method)} | {_fmt(s['tre_mean'])} ± {_fmt(s['tre_std'])} "
                     f"({_fmt(s['tre_max'], 1)}) | {_fmt(s['dense_error_mean'])} | {dice} | {s['folded_voxels']} | "
                     f"{_fmt(s['psnr'])} | {_fmt(s['ssim'], 3)} | {_wall(r)} | {_fmt(_peak(r), 0)} |")
    if any(r.get("ok") and methods.kind(m) != "baseline" and _peak(r) is None
           for m, r in entry["methods"].items()):
        lines += ["", "(Peak RSS not shown: this file's runs recorded ru_maxrss, which Linux carries over from "
                  "the parent process across fork and exec, so every method read the benchmark parent's size.)"]
    lines.append("")
    return lines + distance_table(entry) + heldout_table(entry)


def distance_table(entry: dict) -> list[str]:
    """Where each method's landmark error lies: mean (max) TRE and landmark count by the distance of the
    landmarks' reference points from the series' first structure, over every registered time point."""
    rows = {m: r["summary"]["tre_by_distance"] for m, r in entry["methods"].items()
            if r.get("ok") and "tre_by_distance" in r["summary"]}
    if not rows:
        return []
    first = next(iter(entry["meta"]["labels"].items()))
    bands = next(iter(rows.values()))
    lines = [f"TRE by the distance of the landmarks from label {first[0]} ({first[1]}; 0 inside it): mean (max) mm, "
             "landmarks of every registered time point.", "",
             "| method | " + " | ".join(f"{b['low_mm']:g}–{b['high_mm']:g} mm" for b in bands) + " |",
             "|---" * (len(bands) + 1) + "|"]
    for method, row in rows.items():
        cells = ["–" if b["tre_mean"] is None
                 else f"{_fmt(b['tre_mean'])} ({_fmt(b['tre_max'], 1)}), n = {b['count']}" for b in row]
        lines.append(f"| {methods.label(method)} | " + " | ".join(cells) + " |")
    return lines + [""]


def heldout_table(entry: dict) -> list[str]:
    """The held-out time's Markdown table, per method: the predicted image's PSNR / SSIM and its gain over linear
    interpolation, the TRE and warped-reference PSNR of its u at that time, and a peer's own registration of it."""
    rows = entry.get("heldout") or {}
    if not rows:
        return []
    h = entry["meta"]["heldout"]
    times = entry["meta"]["times"]
    lines = [f"Held-out time {times[h]:g}: like with like. Every method predicts the image at {times[h]:g} from the "
             f"scans at {times[h - 1]:g} and {times[h + 1]:g} only, by STNeRP's own recipe (each scan carried to "
             f"{times[h]:g} through the method's motion, cubic B-spline, blended linearly in time): STNeRP trained "
             "without that time; a peer registered the reference to those two scans, its u at the held-out time "
             "is its two fields blended linearly in time; 'no registration' is linear interpolation of the two "
             "scans; the exact motion is the recipe's ceiling. TRE and warped-reference PSNR are of that u. "
             "The last column is a peer's own pairwise registration of the held-out image (it saw the image).", "",
             "| method | predicted image PSNR dB / SSIM | − linear interpolation dB | u at held-out time: TRE mm, "
             "warped-reference PSNR dB | peer registered to the held-out image: TRE mm, PSNR dB |",
             "|---|---|---|---|---|"]
    linear = rows.get("none", {}).get("predicted", {}).get("psnr")
    for method, r in rows.items():
        if not r.get("ok"):
            lines.append(f"| {methods.label(method)} | failed: {str(r.get('error', '?'))[:80]} | | | |")
            continue
        p, f, seen = r["predicted"], r["field"], r.get("registered_at_h")
        gain = _fmt(p["psnr"] - linear) if linear is not None else "–"
        registered = f"{_fmt(seen['tre_mean'])}, {_fmt(seen['psnr'])}" if seen else "–"
        lines.append(f"| {methods.label(method)} | {_fmt(p['psnr'])} / {_fmt(p['ssim'], 3)} | {gain} | "
                     f"{_fmt(f['tre_mean'])}, {_fmt(f['psnr'])} | {registered} |")
    return lines + [""]


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "MISSED"


def markdown(report: dict) -> str:
    """The whole report as Markdown: header, each series' tables (or why it was skipped), issue 11's targets on
    each series, and every method's settings."""
    lines = header(report)
    for name, entry in report["series"].items():
        if "methods" not in entry:
            lines += [f"## {name}: skipped ({entry.get('skipped', '?')})", ""]
            continue
        lines += series_table(name, entry)
    for name, entry in report["series"].items():
        items = targets(entry) if "methods" in entry else []
        if items:
            lines += [f"## Issue 11 targets on {name} (STNeRP default)", ""]
            lines += [f"- {_verdict(t['met'])}: {t['text']}" for t in items] + [""]
    lines += ["## Settings", ""] + [f"- {methods.label(m)}: {text}" for m, text in report["configs"].items()]
    lines += ([f"- skipped (package missing): {', '.join(report['skipped_methods'])}"]
              if report.get("skipped_methods") else [])
    return "\n".join(lines) + "\n"
