#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian machine: Debian's
# `prometheus` (prometheus, promtool) and `prometheus-alertmanager`
# (prometheus-alertmanager, amtool) — the paging tests run the real binaries —, Debian's `chromium`
# (the incident-report tests render reports headless),
# a virtual environment in .venv, PyTorch (CPU build where the index offers it)
# and gradwatch with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

packages=()
for binary in prometheus promtool; do
    command -v "$binary" >/dev/null 2>&1 || { packages+=(prometheus); break; }
done
for binary in prometheus-alertmanager amtool; do
    command -v "$binary" >/dev/null 2>&1 || { packages+=(prometheus-alertmanager); break; }
done
# The incident-report tests render reports in headless Chromium.
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
if [ "${#packages[@]}" -gt 0 ]; then
    as_root apt-get update -qq
    # The tests start their own instances on free ports; any system service the packages start is unused.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e '.[dev]'
