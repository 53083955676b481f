"""One style across the project: ruff's pycodestyle, pyflakes and annotation rules, as configured in pyproject.toml
([tool.ruff]: lines of at most 120 characters, blank lines as PEP 8 has them, no unused import; outside the tests
type hints on every function and a docstring on every public class, function and method); and the type hints
agree with the code: mypy, as configured in pyproject.toml ([tool.mypy]: the engine, the module and the
benchmarks; packages without type information taken as they come)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_python_file_follows_the_projects_style():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_type_hints_agree_with_the_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
