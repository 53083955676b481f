#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and installs STNeRPLib (with test tools).
# torch is installed first and pinned, so nothing pulls a multi-GB CUDA build.
# `bash setup.sh peers` creates .venv-peers instead: the benchmark's peers antspyx and itk-elastix
# need an older numpy and scipy than .venv's, so they get their own venv, with SimpleITK, pytest and
# this package without torch, to test the peers' field conversions (Testing/Python/test_benchmark_peers.py).
set -euo pipefail
cd "$(dirname "$0")"
if [ "${1:-}" = peers ]; then
    [ -x .venv-peers/bin/python ] || python3 -m venv .venv-peers
    .venv-peers/bin/python -m pip install -q --upgrade pip
    .venv-peers/bin/python -m pip install -q antspyx==0.6.3 itk-elastix==0.25.4 SimpleITK scipy pytest
    .venv-peers/bin/python -m pip install -q --no-deps -e .
    exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test]'
