"""The real worker as the tests run it: a subprocess of this Python, `python -m STNeRPLib`."""
from __future__ import annotations

import subprocess
import sys

WORKER = [sys.executable, "-m", "STNeRPLib"]


def stnerp(*args, **kwargs) -> subprocess.CompletedProcess:
    """Run `stnerp ARGS` (each argument as text) to its end; stdout and stderr captured as text."""
    return subprocess.run([*WORKER, *map(str, args)], capture_output=True, text=True, timeout=300, **kwargs)
