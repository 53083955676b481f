"""The package's numba kernels are compiled ahead, every one (kernel_cache.load_kernels, which setup.sh runs and the
benchmark's warm-up calls): no run spends the compilation (~31 s at one thread), and no benchmark clock counts it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from STNeRPLib import compiling

ROOT = Path(__file__).resolve().parents[2]

UNCOMPILED = """
import importlib, pkgutil
import STNeRPLib
from STNeRPLib import compiling, kernel_cache
modules = [importlib.import_module("STNeRPLib." + m.name) for m in pkgutil.iter_modules(STNeRPLib.__path__)
           if m.name != "__main__"]
kernel_cache.load_kernels()
kernels = [(module.__name__, name) for module in modules for name, value in vars(module).items()
           if isinstance(value, compiling.numba.core.registry.CPUDispatcher) and value.__module__ == module.__name__
           and value.targetoptions.get("nogil")]
print(len(kernels), sorted(f"{module}.{name}" for module, name in kernels
                           if not getattr(importlib.import_module(module), name).signatures))
"""


def test_loading_the_kernels_compiles_every_kernel_of_the_package():
    """In a fresh process, after load_kernels every kernel (compiling.kernel: numba's nogil functions; the inlined
    helpers compile into them) has been compiled for at least one signature: a kernel added without a call there
    would be compiled inside a run's clock."""
    if compiling.numba is None:
        pytest.skip("numba is not installed: no kernel to compile")
    result = subprocess.run([sys.executable, "-c", UNCOMPILED], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    count, uncompiled = result.stdout.split(" ", 1)
    assert int(count) >= 9, result.stdout       # the nine of 2026-12-07: the enumeration finds them
    assert uncompiled.strip() == "[]", result.stdout
