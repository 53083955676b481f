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
    .venv-peers/bin/python -m pip install -q antspyx==0.6.3 itk-elastix==0.25.4 SimpleITK scipy pytest pytest-xdist
    .venv-peers/bin/python -m pip install -q --no-deps -e .
    exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test]'
# numba compiles the kernels once and caches them; ahead, so that the first run does not spend ~31 s on it.
.venv/bin/python -m STNeRPLib.kernel_cache
# The report's browser test opens the report in the system's Chromium; install it where we may
# (root with apt, as in CI). Without it that test skips and says why.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }; } >/dev/null 2>&1 \
    || echo "setup.sh: could not install chromium; the report's browser test will skip" >&2
fi
# The report's figures draw structure names in Chinese, Japanese, … with an installed font that has them; CI gets
# one (Droid Sans Fallback, 2 MB) where it may, so their test runs. Without one that test skips and says why.
if ! dpkg-query -W -f '${Status}' fonts-droid-fallback 2>/dev/null | grep -q "ok installed" \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get install -y -qq fonts-droid-fallback \
      || { apt-get update -qq && apt-get install -y -qq fonts-droid-fallback; }; } >/dev/null 2>&1 \
    || echo "setup.sh: could not install a CJK font; the report's CJK-names test will skip" >&2
fi
