#!/usr/bin/env bash
# Build the vllm-kvcompress wheel against this interpreter's torch and install it
# (non-editable), then report which kernel path each op takes. The Dockerfile's install
# step is this script; tests/test_wheel.py runs it too, into a fresh venv.
#
#   PYTHON=python3 DIST=dist scripts/install_wheel.sh
#
# --no-build-isolation: compile the C++ kernels against the torch already installed (an
# isolated build would download a CUDA torch from PyPI, several GB, and build against
# that). Needs a C++ compiler, ninja and setuptools at build time; none at run time.
set -euo pipefail
PY=${PYTHON:-python3}
SRC=$(cd "$(dirname "$0")/.." && pwd)
DIST=$(mkdir -p "${DIST:-$SRC/dist}" && cd "${DIST:-$SRC/dist}" && pwd)
rm -f "$DIST"/vllm_kvcompress-*.whl
(cd "$SRC" && "$PY" -m pip wheel . -w "$DIST" --no-build-isolation --no-deps)
"$PY" -m pip install "$DIST"/vllm_kvcompress-*.whl
# outside the source tree, so the installed package is the one imported
(cd / && "$PY" -m vllm_kvcompress._ext --doctor) || true
