"""Time and peak memory of reading an RT Structure Set as `--segmentation` (dicom_in, through io.read_labelmap), on
two structure sets written as a planning system would (benchmarks.data.write_rtstruct):

- clinical: 25 ROIs on 512 x 512 x 150 at 0.977 x 0.977 x 3 mm, an elliptic BODY of 1 000 points on every slice
  and 24 organs of 300 points on 5-49 slices each (835 contours);
- dense: one slice holding three nested contours of 10 000 points each (a body, a hole, an island), as an export
  that keeps every traced point writes them.

    .venv/bin/python benchmarks/structure_set_read.py

Each read runs in a fresh Python process, which prints its seconds and its peak resident memory (VmHWM) beside
that of the same process before the read.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.data import write_rtstruct  # noqa: E402

GRIDS = {"clinical": ((512, 512, 150), (0.977, 0.977, 3.0), (-250.0, -250.0, -225.0)),
         "dense": ((512, 512, 4), (0.977, 0.977, 3.0), (-250.0, -250.0, -3.0))}

READ = """
import re, sys, time
from pathlib import Path
from STNeRPLib.geometry import Grid
from STNeRPLib.io import read_labelmap
def peak():  # VmHWM: this process image's own peak (ru_maxrss keeps the forking parent's)
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024
size, spacing, origin = eval(sys.argv[2])
grid = Grid(size, spacing, origin, (1, 0, 0, 0, 1, 0, 0, 0, 1))
before = peak()
start = time.perf_counter()
read_labelmap(sys.argv[1], grid, "segmentation")
print(f"{time.perf_counter() - start:.2f} s, peak RSS {peak()} MB (before the read {before} MB)")
"""


def ellipse(centre: tuple[float, float] | np.ndarray, radii: tuple[float, float] | np.ndarray, z: float,
            points: int) -> list[float]:
    """Contour Data of a wavy ellipse (LPS mm) on the plane z."""
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    wave = 1 + 0.05 * np.sin(7 * t)
    x, y = centre[0] + radii[0] * wave * np.cos(t), centre[1] + radii[1] * wave * np.sin(t)
    return [float(v) for point in zip(x, y, np.full(points, z)) for v in point]


def clinical() -> dict[int, tuple[str, list[list[float]]]]:
    """The clinical structure set, ROI Number -> (ROI Name, contours): a BODY ellipse of 1 000 points on every
    slice and 24 organs (seeded) of 300 points on 5-49 consecutive slices each."""
    rng = np.random.default_rng(0)
    size, spacing, origin = GRIDS["clinical"]
    planes = origin[2] + spacing[2] * np.arange(size[2])
    rois = {1: ("BODY", [ellipse((0, 0), (200, 150), z, 1000) for z in planes])}
    for number in range(2, 26):
        centre, radii = rng.uniform(-120, 120, 2) * (1, 0.75), rng.uniform(10, 60, 2)
        first = rng.integers(0, 100)
        rois[number] = (f"organ {number}", [ellipse(centre, radii, z, 300)
                                            for z in planes[first:first + rng.integers(5, 50)]])
    return rois


def dense() -> dict[int, tuple[str, list[list[float]]]]:
    """The dense structure set: one BODY of three nested contours of 10 000 points on the plane z = 0 (radii 200,
    100, 50 mm)."""
    return {1: ("BODY", [ellipse((0, 0), (radius, radius), 0.0, 10_000) for radius in (200, 100, 50)])}


def main() -> None:
    """Write each structure set to a temporary folder, read it onto its grid in a fresh Python process, and print
    its ROI and contour counts beside the read's seconds and peak RSS."""
    with tempfile.TemporaryDirectory() as folder:
        for name, rois in (("clinical", clinical()), ("dense", dense())):
            path = Path(folder) / f"{name}.dcm"
            write_rtstruct(path, rois)
            result = subprocess.run([sys.executable, "-c", READ, str(path), repr(GRIDS[name])], cwd=ROOT,
                                    capture_output=True, text=True, check=True)
            contours = sum(len(c) for _, c in rois.values())
            print(f"{name}: {len(rois)} ROIs, {contours} contours: {result.stdout.strip()}")


if __name__ == "__main__":
    main()
