#!/usr/bin/env bash
# The one set-up path (README commands 1 and 2, and .ci/run use it).
# Creates .venv in the repo, installs the plugin with vLLM's CPU build and the
# test tools, repairs the CPU build's known install traps, and prepares the
# embedded model and essays. Idempotent: on a ready machine it takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.kvcompress-setup
want=$(cat pyproject.toml setup.py scripts/setup.sh scripts/fix_vllm_cli.py $(ls csrc/*.cpp csrc/*.h 2>/dev/null) | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing vllm-kvcompress[cpu,test] into .venv (first run: a few minutes)"
    python -m pip install --quiet --upgrade pip
    # torch==2.13.0+cpu comes from the local wheel pip finds through its find-links.
    python -m pip install --quiet -e '.[cpu,test]'
    # a stale egg-info in the source tree would shadow the installed entry points
    rm -rf vllm_kvcompress.egg-info
    # PyPI torchvision/torchaudio/torchcodec break `import transformers` beside the CPU torch.
    python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
    python scripts/fix_vllm_cli.py
    echo "$want" > "$stamp"
fi
# The C++ CPU kernels (csrc/), compiled once per user and source hash (seconds when cached).
# (An editable install compiles nothing at install time: setup.py builds them into wheels only.)
python -m vllm_kvcompress._ext >/dev/null
# Embedded model (GGUF -> bf16 HF checkpoint) and haystack essays, once per user.
python -m vllm_kvcompress.assets all >/dev/null
echo "[setup] ready: $(vllm --version 2>/dev/null | tail -1), model at $(python -m vllm_kvcompress.assets model)"
