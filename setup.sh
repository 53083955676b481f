#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and installs STNeRPLib (with test tools).
# torch is installed first and pinned, so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test]'
