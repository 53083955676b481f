"""How many threads the worker computes with: the CPUs it may use, fewer when others keep them busy.

torch's intra-op threads wait for each other at the end of every operation, so one thread that
shares its core with another busy process holds the whole team back (issue 11: a 10-phase fit took
224 s instead of 27 s beside one CPU-heavy process on 2 cores; demons, 31 -> 50 s). The worker
therefore leaves to other processes the cores they keep busy, judged once at its start from the
1-minute load average (Linux counts processes waiting for disk in it too: a busy disk looks like
busy cores, which errs towards fewer threads).

numpy's BLAS (OpenBLAS) keeps a team of its own, which busy-waits beside torch's on shared cores;
the engine's numpy products are (N, 3) @ (3, 3) point transforms, so it gets BLAS_THREADS. The outputs'
own numpy loops (labels, det J, SSIM) share their ranges among the same number of threads (map_ranges).
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Callable, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count used, and what it was decided from (load: 1-minute load average, None
    where the system has none; own_load: this process's share of it; requested: --threads)."""

    threads: int
    allowed_cpus: int
    machine_cpus: int
    load: float | None
    own_load: float
    requested: int | None
    blas_threads: int | None = None     # numpy's BLAS threads once limited (None: not limited)
    resumed: bool = False               # the count of the run a --resume continues

    def describe(self) -> str:
        """One line for the log: the thread count and what it was decided from."""
        if self.resumed:
            return f"{self.threads} thread(s), as the run it resumes (a fit's numbers depend on the count)"
        if self.requested is not None:
            return f"{self.threads} thread(s), as asked (--threads)"
        load = "unknown" if self.load is None else f"{self.load:.2f}"
        return (f"{self.threads} thread(s): {self.allowed_cpus} CPU(s) usable of {self.machine_cpus}, "
                f"1-minute load {load} ({self.own_load:.2f} of it this process)")

    def to_dict(self) -> dict:
        """The choice as a dict, for run.json's threads."""
        return asdict(self)


def choose_threads(allowed_cpus: int, machine_cpus: int, load: float | None, own_load: float = 0.0,
                   requested: int | None = None) -> int:
    """Threads to use: `requested` if given; else the usable CPUs, less the cores other processes
    keep busy (load - own_load, rounded to the nearest core) when fewer than that are free on the
    machine; at least 1. Unknown load (None): every usable CPU."""
    if requested is not None:
        return max(1, requested)
    if load is None:
        return max(1, allowed_cpus)
    busy = math.floor(max(0.0, load - own_load) + 0.5)
    return max(1, min(allowed_cpus, machine_cpus - busy))


def measure(requested: int | None = None) -> ThreadChoice:
    """The choice for this process now (usable CPUs: its affinity where the system has one)."""
    machine = os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else machine
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    # A process busy for s CPU-seconds has added about s / 60 to the 1-minute average (s << 60).
    own = 0.0 if load is None else min(load, time.process_time() / 60)
    return ThreadChoice(choose_threads(allowed, machine, load, own, requested), allowed, machine, load, own,
                        requested)


_applied: ThreadChoice | None = None


def use(requested: int | None = None, resumed: int | None = None) -> ThreadChoice:
    """Decide now (measure) and use the result for torch's intra-op work and as ITK's global default;
    numpy's BLAS gets BLAS_THREADS. `resumed`: the count of the run a --resume continues, taken unless `requested`
    (--threads): a fit's numbers depend on the count, so the resumed run is bit-identical to one uninterrupted."""
    global _applied
    import SimpleITK as sitk
    import torch
    taken = requested is None and resumed is not None
    choice = replace(measure(resumed if taken else requested), requested=requested, blas_threads=_limit_blas(),
                     resumed=taken)
    torch.set_num_threads(choice.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(choice.threads)
    _applied = choice
    return choice


def current() -> int:
    """The threads this process computes with: use()'s choice; 1 where none was applied (a library
    caller's numpy work then stays on its calling thread)."""
    return _applied.threads if _applied is not None else 1


def map_ranges(work: Callable[[int, int], T], total: int, size: int) -> list[T]:
    """[work(start, end)] over consecutive ranges that cover 0..total, in order, computed on current()
    threads at once with each range size / current() long: the ranges in flight hold together what one
    range of `size` holds alone, so memory stays as with one thread. For numpy and scipy.ndimage work on
    large arrays, which releases the GIL, each call writing only its own part of any output."""
    count = current()
    step = max(1, size // count)
    ranges = [(start, min(start + step, total)) for start in range(0, total, step)]
    if count == 1 or len(ranges) == 1:
        return [work(start, end) for start, end in ranges]
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda bounds: work(*bounds), ranges))


BLAS_THREADS = 1
"""numpy's BLAS threads. A 256x256x150 time point's outputs (2 torch threads, load ~3.5) took 0.62x
the wall time and 0.55x the CPU time with 1 than with OpenBLAS's default 2; a (4M, 3) @ (3, 3)
product took 0.05 s instead of ~2 s."""


def _limit_blas() -> int | None:
    """Limit numpy's BLAS to BLAS_THREADS (threadpoolctl); None where threadpoolctl is not installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    threadpool_limits(BLAS_THREADS, user_api="blas")
    return BLAS_THREADS


def record() -> dict:
    """For run.json: the choice applied in this process, or torch's thread count if none was."""
    if _applied is not None:
        return _applied.to_dict()
    import torch
    return {"threads": torch.get_num_threads()}
