"""Shared by every suite: the engine (STNeRPLib) and the module's Qt-free package
(STNeRPModuleLib) import from the source tree, as Slicer's scripted-modules folder holds them.

The suite runs its files on pytest-xdist workers (pyproject's addopts: one per CPU). Each worker's
in-process torch and ITK work gets its share of the CPUs: torch's intra-op threads wait for each
other at every operation, so two workers each using every core run several times slower than one.
Worker subprocesses choose their own threads from the load (STNeRPLib.threads).
"""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "STNeRP")]


def _share_the_cpus(workers: int) -> None:
    """Give this worker's torch (where installed: the peers' venv has none) and ITK its share."""
    import SimpleITK as sitk
    share = max(1, len(os.sched_getaffinity(0)) // workers)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(share)
    if importlib.util.find_spec("torch"):
        import torch
        torch.set_num_threads(share)


if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share_the_cpus(int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
