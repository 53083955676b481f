"""numba, where installed: how the compiled kernels (trilinear, cubic_lookup: the training's and the outputs';
label_lookup and metrics' Jacobian: the outputs') are compiled, and the two processor operations they need that
Python has no word for.

Without numba (PythonSlicer unless it is installed) `numba` is None, no kernel is ever called, and torch or
numpy computes the same numbers more slowly (SimpleITK resamples the predicted image, to 0.01 HU). The kernels are
compiled at their first call for the host's processor and kept in numba's cache (STNeRPLib/__pycache__, or numba's
user cache where that is not writable); `python -m STNeRPLib.kernel_cache` (setup.sh) compiles them all ahead.
With the environment variable STNERP_NUMBA=0 numba is not even imported, as if it were missing: the benchmark's
peers run so, their clock and memory their own (numba's import and a kernel's loading take ~130 MB).
"""
from __future__ import annotations

import os
from typing import Any

numba: Any = None
if os.environ.get("STNERP_NUMBA") != "0":
    try:
        import numba
        from llvmlite import ir
        from numba.core import cgutils, types
        from numba.extending import intrinsic
    except ImportError:
        numba = None


def kernel(function: Any) -> Any:
    """numba's no-Python compilation of `function`, releasing the GIL, cached; or `function` without numba."""
    return function if numba is None else numba.njit(nogil=True, cache=True)(function)


def inlined(helper: Any) -> Any:
    """A kernel's helper, compiled into each kernel that calls it (numba inlines it before typing)."""
    return helper if numba is None else numba.njit(inline="always")(helper)


def _fused_multiply_add(typing_context: Any, a: Any, b: Any, c: Any) -> Any:
    """a * b + c rounded once (LLVM's fma: the processor's instruction, or an exact emulation). Torch's vectorised CPU
    kernels compute addcmul_ so (its compiler contracts the product and the sum)."""
    def generate(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.fma(*args)
    return a(a, b, c), generate


def _prefetch(typing_context: Any, array: Any, index: Any) -> Any:
    """Ask the processor to bring the cache line of array[index] (a 1-D array) in for reading: a hint (LLVM's
    prefetch), which changes no value."""
    def generate(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        array_type = signature.args[0]
        data = context.make_array(array_type)(context, builder, value=args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, data, [args[1]], wraparound=False)
        byte, word = ir.IntType(8).as_pointer(), ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte, word, word, word]), "llvm.prefetch.p0")
        read, keep, data_cache = ir.Constant(word, 0), ir.Constant(word, 3), ir.Constant(word, 1)
        builder.call(function, [builder.bitcast(pointer, byte), read, keep, data_cache])
        return context.get_dummy_value()
    return types.void(array, index), generate


fused_multiply_add: Any = None if numba is None else intrinsic(_fused_multiply_add)
"""fused_multiply_add(a, b, c) in a kernel: _fused_multiply_add."""
prefetch: Any = None if numba is None else intrinsic(_prefetch)
"""prefetch(array, index) in a kernel: _prefetch."""
