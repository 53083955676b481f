"""One style across the project: ruff's pycodestyle, pyflakes and annotation rules, as configured in pyproject.toml
([tool.ruff]: lines of at most 120 characters, blank lines as PEP 8 has them, no unused import; outside the tests
type hints on every function and a docstring on every public class, function and method)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_python_file_follows_the_projects_style():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
