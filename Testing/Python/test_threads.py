"""The worker's thread policy: every usable CPU on an idle machine, fewer when other processes keep
cores busy, what --threads asks when given; applied to torch and ITK, logged and recorded."""
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from STNeRPLib import compiling, metrics, threads, warping
from STNeRPLib.phantom import breathing_series, write_series
from STNeRPLib.threads import choose_threads
from worker_cli import stnerp


@pytest.mark.parametrize("allowed, machine, load, own, expected", [
    (2, 2, 0.1, 0.0, 2),     # idle machine: every CPU
    (2, 2, 0.4, 0.0, 2),     # a little background work does not cost a core
    (2, 2, 1.0, 0.0, 1),     # one busy process (a CPU burner) keeps a core: leave it
    (2, 2, 1.0, 1.0, 2),     # ...unless the load is this process's own
    (2, 2, 6.0, 0.0, 1),     # an overloaded machine: still one thread
    (4, 4, 1.4, 0.0, 3),
    (4, 4, 1.6, 0.0, 2),
    (2, 64, 30.0, 0.0, 2),   # 2 usable CPUs of a big, half-busy machine: both still free
    (8, 8, None, 0.0, 8),    # no load average on this system: every usable CPU
])
def test_threads_leave_the_cores_other_processes_keep_busy(allowed, machine, load, own, expected):
    assert choose_threads(allowed, machine, load, own) == expected


def test_threads_asked_for_are_used_whatever_the_load():
    assert choose_threads(2, 2, 6.0, requested=3) == 3
    assert choose_threads(2, 2, 0.0, requested=1) == 1


def test_use_sets_torch_and_itk_threads():
    before = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        choice = threads.use(1)
        assert choice.threads == torch.get_num_threads() == sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1
        assert threads.record()["threads"] == 1 and threads.record()["requested"] == 1
    finally:
        torch.set_num_threads(before[0])
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before[1])


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    series = breathing_series(size=(24, 24, 16), spacing=(12.0, 12.0, 14.0), n_phases=2, noise_hu=0)
    return write_series(series, tmp_path_factory.mktemp("phantom"))


def test_worker_logs_and_records_its_thread_choice(phantom, tmp_path):
    result = stnerp("train", "--reference", phantom["images"][0], "--follow-up", phantom["images"][1], 1,
                    "--iterations", 5, "--threads", 1, "--output", tmp_path / "run", "--no-report")
    assert result.returncode == 0, result.stderr
    assert "computing with 1 thread(s), as asked (--threads)" in result.stderr
    recorded = json.loads((tmp_path / "run/run.json").read_text())["threads"]
    assert recorded["threads"] == 1 and recorded["requested"] == 1 and recorded["allowed_cpus"] >= 1
    assert recorded["blas_threads"] == 1
    automatic = stnerp("train", "--reference", phantom["images"][0], "--follow-up", phantom["images"][1], 1,
                       "--iterations", 5, "--output", tmp_path / "auto", "--no-report")
    assert automatic.returncode == 0, automatic.stderr
    recorded = json.loads((tmp_path / "auto/run.json").read_text())["threads"]
    assert recorded["requested"] is None and 1 <= recorded["threads"] <= recorded["allowed_cpus"]
    assert recorded["load"] is not None and f"1-minute load {recorded['load']:.2f}" in automatic.stderr


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_worker_refuses_a_thread_count_that_is_not_a_positive_number(bad, phantom, tmp_path):
    result = stnerp("train", "--reference", phantom["images"][0], "--follow-up", phantom["images"][1], 1,
                    "--threads", bad, "--output", tmp_path / "run")
    assert result.returncode == 2 and "--threads" in result.stderr and "whole number >= 1" in result.stderr
    assert not (tmp_path / "run").exists()


def test_use_limits_numpys_blas_to_one_thread_whatever_torch_gets():
    """numpy's BLAS team busy-waits beside torch's on shared cores (0.62x the output wall time with 1)."""
    script = ("from STNeRPLib import threads; from threadpoolctl import threadpool_info; threads.use(2); "
              "print(sorted({p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas'}))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "OPENBLAS_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[1]"


def computing_with(monkeypatch, count: int) -> None:
    """As if the worker had chosen `count` threads (threads.use sets torch's and ITK's as well)."""
    monkeypatch.setattr(threads, "_applied", threads.ThreadChoice(count, count, count, None, 0.0, count))


@pytest.mark.parametrize("count, expected", [
    (1, [(0, 6), (6, 12), (12, 18), (18, 20)]),
    (2, [(0, 3), (3, 6), (6, 9), (9, 12), (12, 15), (15, 18), (18, 20)]),
    (3, [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12), (12, 14), (14, 16), (16, 18), (18, 20)]),
])
def test_ranges_cover_the_total_in_order_a_share_each_on_as_many_threads_as_chosen(monkeypatch, count, expected):
    computing_with(monkeypatch, count)
    seen = set()

    def work(start: int, end: int) -> tuple[int, int]:
        seen.add(threading.get_ident())
        time.sleep(0.01)
        return start, end

    assert threads.map_ranges(work, 20, 6) == expected
    assert len(seen) == count


def test_an_error_in_one_range_is_raised(monkeypatch):
    computing_with(monkeypatch, 2)

    def work(start: int, end: int) -> None:
        if start == 4:
            raise ValueError("range 4")

    with pytest.raises(ValueError, match="range 4"):
        threads.map_ranges(work, 10, 4)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("count", [2, 3])
def test_labels_jacobian_and_ssim_on_several_threads_equal_one_threads(monkeypatch, count, compiled):
    """Each range writes its own points or slices (labels, det J: the same numbers, by numba's kernels and by numpy
    where numba is missing); SSIM sums its slabs' local values in another grouping (float64 rounding)."""
    if not compiled:
        monkeypatch.setattr(compiling, "numba", None)
    rng = np.random.default_rng(7)
    labelmap = rng.integers(0, 4, (20, 24, 28)).astype(np.uint16)
    points = rng.uniform(-2, 30, (5000, 3))                            # some beyond the grid
    field = sitk.GetImageFromArray(rng.normal(0, 0.3, (21, 18, 16, 3)).astype(np.float32), isVector=True)
    field.SetSpacing((1.0, 1.5, 2.5))
    field.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    image, reference = rng.random((30, 20, 20)), rng.random((30, 20, 20))
    monkeypatch.setattr(warping, "LABEL_CHUNK", 1100)                  # 5 chunks at one thread, remainder

    def outputs() -> tuple:
        return (warping.propagate_labels(labelmap, points, "nearest"),
                warping.propagate_labels(labelmap, points, "linear"),
                sitk.GetArrayFromImage(metrics.jacobian_determinant(field, slab=5)),
                metrics.ssim(image, reference, slab=7))

    computing_with(monkeypatch, 1)
    alone = outputs()
    computing_with(monkeypatch, count)
    shared = outputs()
    for one, several in zip(alone[:3], shared[:3]):
        np.testing.assert_array_equal(several, one)
    assert shared[3] == pytest.approx(alone[3], abs=1e-12)
