"""The README's demo figures, traceable: runs the README's first command (`stnerp demo`, default
preset, breathing phantom) in a scratch folder, and writes its summary.json with the commit, the
load, the machine's cores and the wall time to benchmarks/results/demo_<date>.{json,md}.

    .venv/bin/python benchmarks/demo_figures.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import commit_label, load_average  # noqa: E402


def run_demo() -> dict:
    """The demo's summary, with how it was obtained."""
    with tempfile.TemporaryDirectory() as scratch:
        load_start, started = load_average(), time.monotonic()
        subprocess.run([sys.executable, "-m", "STNeRPLib", "demo", "--output", f"{scratch}/demo"], cwd=ROOT,
                       check=True)
        wall = time.monotonic() - started
        summary = json.loads(Path(scratch, "demo", "summary.json").read_text())
    return {"commit": commit_label(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cores": os.cpu_count(), "load_start": load_start, "load_end": load_average(),
            "wall_s": round(wall, 1), "command": "stnerp demo", "summary": summary}


def markdown(result: dict) -> str:
    """The demo's result as Markdown: provenance, then TRE, tumour Dice and folded voxels at the trained phases and,
    at the held-out phase, TRE, Dice and the predicted image's PSNR / SSIM beside linear interpolation."""
    s, held, base = result["summary"], result["summary"]["held_out"], result["summary"]["interpolation"]
    return "\n".join([
        f"# stnerp demo — {result['date']}", "",
        f"commit {result['commit']}; {result['cores']} cores; load average {result['load_start']} at start, "
        f"{result['load_end']} at end; {result['wall_s']} s in all (phantom, training, outputs, evaluation, report).",
        "", "| | registered | unregistered |", "|---|---|---|",
        f"| TRE at trained phases, mean / max | {s['tre_mean']:.2f} / {s['tre_max']:.2f} mm | "
        f"{s['tre_unregistered']:.2f} mm mean |",
        f"| tumour Dice at trained phases, lowest | {s['tumour_dice_min']:.3f} | |",
        f"| voxels with det J ≤ 0, all phases | {s['folded_voxels']} | |",
        f"| held-out phase {s['held_out_time']:g}: TRE | {held['tre_mean']:.2f} mm | {held['tre_none']:.2f} mm |",
        f"| held-out phase {s['held_out_time']:g}: tumour Dice | {held['tumour_dice']:.3f} | |",
        f"| held-out phase {s['held_out_time']:g}: PSNR / SSIM of the predicted image | {held['psnr']:.2f} dB / "
        f"{held['ssim']:.3f} | linear interpolation of its neighbours: {base['psnr']:.2f} dB / {base['ssim']:.3f} |",
        ""])


def main() -> int:
    """Run the demo, write its result (JSON and Markdown) to benchmarks/results and print the Markdown."""
    result = run_demo()
    stem = ROOT / "benchmarks" / "results" / f"demo_{time.strftime('%Y-%m-%d_%H%M', time.gmtime())}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
