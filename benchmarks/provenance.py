"""Where a benchmark figure came from, one definition for every script in benchmarks/: the commit
checked out, whether its tracked files had uncommitted changes, and the machine's load average."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_state(root: Path = ROOT) -> tuple[str, bool]:
    """The commit checked out in `root` and whether any tracked file there has uncommitted changes."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                            capture_output=True, text=True, check=True)
    return commit.stdout.strip(), bool(status.stdout.strip())


def commit_label(root: Path = ROOT) -> str:
    """The commit, with " (with uncommitted changes)" when the tracked files differ from it."""
    commit, dirty = git_state(root)
    return commit + (" (with uncommitted changes)" if dirty else "")


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages, as text."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())
