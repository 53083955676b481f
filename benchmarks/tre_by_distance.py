"""Where a method's landmark error lies: TRE binned by each landmark's distance from one reference structure.

A mean TRE says how far off a field is, not where. This splits it by the distance (mm) of each landmark's
reference point from the surface of one structure of the reference labelmap (0 inside it): on the
longitudinal phantom, label 1 is the shrinking tumour, whose radial motion reaches ~30 mm into the lung.

Inputs are files: a phantom folder as `phantom.write_series` writes it (image_<k>.nrrd, labelmap_0.nrrd,
landmarks.csv, whose times order the images: image_<k> is the k-th) and run folders holding
t_<time>/displacement.nrrd (STNeRP's run layout: u on the time-t grid, mapping a time-t point q to the reference
point q + u(q), mm, LPS).
`--peer NAME` also registers each time point with a benchmark peer (benchmarks/peers.py) and scores it alike.

    .venv/bin/python benchmarks/tre_by_distance.py --phantom runs/demo-X/phantom --run default=runs/demo-X/run \
        --peer sitk_demons --out benchmarks/results/tre_by_distance_<date>
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import map_coordinates

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.provenance import git_state  # noqa: E402
from STNeRPLib.io import read_landmarks  # noqa: E402
from STNeRPLib.metrics import map_points  # noqa: E402

BANDS_MM = (0.0, 10.0, 20.0, 40.0, 80.0, float("inf"))
"""Band edges (mm from the structure's surface): inside and the first 10 mm, the radial motion's reach
(10-40 mm), the rest of the lung and beyond."""


def distance_from(labelmap: sitk.Image, label: int) -> sitk.Image:
    """Distance (mm, float32) of every voxel centre from the surface of `label`, 0 inside it."""
    structure = sitk.Cast(labelmap == label, sitk.sitkUInt8)
    if not np.any(sitk.GetArrayViewFromImage(structure)):
        raise ValueError(f"label {label} is not in the reference labelmap")
    signed = sitk.SignedMaurerDistanceMap(structure, insideIsPositive=False, squaredDistance=False,
                                          useImageSpacing=True)
    return sitk.Cast(sitk.Clamp(signed, lowerBound=0.0), sitk.sitkFloat32)


def distances_at(distance: sitk.Image, points: np.ndarray) -> np.ndarray:
    """The distance map at (N, 3) LPS mm points, linearly interpolated (beyond the grid: its border value)."""
    array = sitk.GetArrayViewFromImage(distance)
    index = np.array([distance.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in points])
    index = np.clip(index, 0, np.array(distance.GetSize()) - 1)
    return map_coordinates(array, index[:, ::-1].T, order=1, mode="nearest")


def binned(errors: np.ndarray, distances: np.ndarray, edges: tuple[float, ...] = BANDS_MM) -> list[dict]:
    """Per band [low, high) of distance: the landmarks in it, their mean and largest error (mm)."""
    rows = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (distances >= low) & (distances < high)
        rows.append({"low_mm": low, "high_mm": high, "count": int(inside.sum()),
                     "tre_mean": float(errors[inside].mean()) if inside.any() else None,
                     "tre_max": float(errors[inside].max()) if inside.any() else None})
    return rows


def landmark_errors(fields: dict[float, sitk.Image], landmarks: dict[float, tuple[np.ndarray, np.ndarray]]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per landmark of every time with a field: |q + u(q) - reference| (mm), and its reference point."""
    errors, references = [], []
    for t, field in fields.items():
        points, reference = landmarks[t]
        errors.append(np.linalg.norm(map_points(field, points) - reference, axis=1))
        references.append(reference)
    return np.concatenate(errors), np.concatenate(references)


def run_fields(run: Path, times: list[float]) -> dict[float, sitk.Image]:
    """The displacement of each follow-up time from a run folder (t_<time>/displacement.nrrd)."""
    return {t: sitk.ReadImage(str(run / f"t_{t:g}" / "displacement.nrrd")) for t in times}


def peer_fields(name: str, phantom: Path, times: list[float]) -> dict[float, sitk.Image]:
    """A benchmark peer's field for each follow-up (fixed = time-t image, moving = the reference)."""
    from benchmarks import peers
    reference = sitk.ReadImage(str(phantom / "image_0.nrrd"))
    return {t: peers.register(name, sitk.ReadImage(str(phantom / f"image_{k}.nrrd")), reference)
            for k, t in enumerate(times, 1)}


def table(results: dict[str, list[dict]], label: int) -> str:
    """Markdown: one row per method, one column per band (mean (max) mm, n landmarks)."""
    bands = next(iter(results.values()))
    head = ["every landmark"] + [f"{b['low_mm']:g}–{b['high_mm']:g} mm" for b in bands[1:]]
    lines = [f"| method (distance from label {label}) | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, rows in results.items():
        cells = ["–" if r["tre_mean"] is None else f"{r['tre_mean']:.3f} ({r['tre_max']:.2f}), n = {r['count']}"
                 for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Score each --run folder and --peer on the phantom's follow-ups, print their TRE by distance from --label as
    a Markdown table, and with --out write it (JSON and Markdown) with the commit and the load."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phantom", type=Path, required=True, help="folder written by phantom.write_series")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=DIR", help="a run folder to score")
    parser.add_argument("--peer", action="append", default=[], help="a benchmark peer to register and score")
    parser.add_argument("--label", type=int, default=1, help="the reference structure (default 1: the tumour)")
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    args = parser.parse_args()
    landmarks = read_landmarks(args.phantom / "landmarks.csv")
    times = sorted(landmarks)[1:]                                  # the follow-ups; the first is the reference
    distance = distance_from(sitk.ReadImage(str(args.phantom / "labelmap_0.nrrd")), args.label)
    fields = {name: run_fields(Path(folder), times) for name, folder in (r.split("=", 1) for r in args.run)}
    fields.update({name: peer_fields(name, args.phantom, times) for name in args.peer})
    results = {}
    for name, by_time in fields.items():
        errors, references = landmark_errors(by_time, landmarks)
        distances = distances_at(distance, references)
        results[name] = binned(errors, distances, (0.0, float("inf"))) + binned(errors, distances)
    text = table(results, args.label)
    print(text)
    if args.out:
        commit, dirty = git_state()
        meta = {"commit": commit, "uncommitted_changes": bool(dirty), "phantom": str(args.phantom),
                "runs": args.run, "peers": args.peer, "label": args.label, "load": os.getloadavg()}
        args.out.with_suffix(".json").write_text(json.dumps({**meta, "results": results}, indent=1))
        args.out.with_suffix(".md").write_text(
            f"# TRE by distance from label {args.label}: commit {commit[:10]}{' (+ uncommitted)' if dirty else ''}\n\n"
            f"Phantom {args.phantom}; first column: every landmark of every follow-up; load at the end "
            f"{' '.join(f'{x:.2f}' for x in meta['load'])}.\n\n{text}\n")


if __name__ == "__main__":
    main()
