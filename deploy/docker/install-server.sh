#!/bin/sh
# The server image's one install step, also run by tests/test_deploy_image.py in a fresh virtual
# environment: gradwatch with the `server` extra only (no torch), then a check that the server
# imports and torch does not.
#
#   sh deploy/docker/install-server.sh SOURCE_DIR VENV_DIR      # $PYTHON picks the interpreter (python3)
set -eu
src=${1:?usage: install-server.sh SOURCE_DIR VENV_DIR}
venv=${2:?usage: install-server.sh SOURCE_DIR VENV_DIR}
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet "$src[server]"
"$venv/bin/python" - <<'PY'
import importlib.util
import sys

import gradwatch.cli
import gradwatch.server.app

if importlib.util.find_spec("torch") is not None:
    sys.exit("install-server.sh: torch is installed, the server image must not carry it")
if "torch" in sys.modules:
    sys.exit("install-server.sh: importing the server imported torch")
print(f"gradwatch {gradwatch.cli.__version__} server installed without torch")
PY
