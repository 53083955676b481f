"""How long the panel waits while Apply writes the worker's inputs: a 256 x 256 x 128 CT (the
engine's breathing phantom, in HU) written N times (a reference and follow-ups) through Slicer's
volume storage node, gzip-compressed (the module's old export) and raw (its export now).

    .venv/bin/python benchmarks/module_export.py [--volumes 10] [--size 256 256 128]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import SimpleITK as sitk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "STNeRP"), ROOT]

from STNeRPModuleLib import scene_files  # noqa: E402
from STNeRPLib import phantom  # noqa: E402


def main() -> None:
    """Read a phantom CT into an MRML scene and time writing it --volumes times through its volume storage node,
    gzip-compressed then raw; print the seconds and the file size (MB) of each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=10)
    parser.add_argument("--size", type=int, nargs=3, default=[256, 256, 128])
    args = parser.parse_args()
    import slicer
    scene = slicer.vtkMRMLScene()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ct.nrrd")
        sitk.WriteImage(phantom.breathing_series(size=tuple(args.size), n_phases=2).images[0], path)
        node = scene_files.read_volume(scene, path, "ct")
        for compression in (True, False):
            start = time.perf_counter()
            for i in range(args.volumes):
                scene_files.write_volume(node, os.path.join(folder, f"out_{i}.nrrd"), compression=compression)
            seconds = time.perf_counter() - start
            size = os.path.getsize(os.path.join(folder, "out_0.nrrd")) / 1e6
            print(f"{'gzip' if compression else 'raw '}: {seconds:6.2f} s for {args.volumes} volumes of "
                  f"{'x'.join(map(str, args.size))} ({seconds / args.volumes:.2f} s each, {size:.0f} MB each)")


if __name__ == "__main__":
    main()
