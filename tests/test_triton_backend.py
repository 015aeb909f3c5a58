"""The CUDA code path, proven inside vLLM's real engine without a GPU (issue #15).

vLLM's CPU engine runs our Triton backend (``attention_triton``: vLLM's TRITON_ATTN
+ our Triton kernels, all interpreted, float32) and, separately, the C++ path, on
the embedded model cut to 2 layers. Greedy, for h2o, pyramid and snapkv, with a
chunked prompt, a request with its own ``kv_budget`` and a batch mixing prefill and
decode (``backend_parity_worker.py``): the token ids and the true positions every
request retains per layer and KV head after every step must be identical.

Compiled-GPU behaviour, bf16, CUDA graphs and async scheduling are not covered here
(``benchmarks/gpu_check.py`` checks the kernels on a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

POLICIES = "h2o,pyramid,snapkv"
WORKER = Path(__file__).with_name("backend_parity_worker.py")


def _run(model_dir: str, out: Path, env: dict) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_KVCOMPRESS_", "TRITON_INTERPRET"))}
    full.update(env)
    proc = subprocess.Popen([sys.executable, str(WORKER), model_dir, str(out), POLICIES], env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc


@pytest.fixture(scope="module")
def parity(cut_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    runs = {"cpp": {"VLLM_KVCOMPRESS_OPS": "cpp"},
            "triton": {"TRITON_INTERPRET": "1", "VLLM_KVCOMPRESS_BACKEND": "triton", "VLLM_KVCOMPRESS_OPS": "triton"}}
    procs = {name: _run(cut_model_dir, tmp / f"{name}.json", env) for name, env in runs.items()}
    results = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=1800)
        assert proc.returncode == 0, f"{name} engine run failed:\n{out[-4000:]}"
        results[name] = json.loads((tmp / f"{name}.json").read_text())
    return results


@pytest.mark.parametrize("policy", POLICIES.split(","))
def test_triton_backend_generates_the_cpp_tokens(parity, policy):
    cpp, tri = parity["cpp"][policy], parity["triton"][policy]
    assert (cpp["impl"], cpp["ops"]) == (["KVCompressCPUImpl"], "cpp")
    assert (tri["impl"], tri["ops"]) == (["KVCompressTritonImpl"], "triton")
    assert sorted(cpp["tokens"]) == ["a", "late", "long", "own"]
    assert all(len(t) == 24 for t in cpp["tokens"].values())
    assert tri["tokens"] == cpp["tokens"]


@pytest.mark.parametrize("policy", POLICIES.split(","))
def test_triton_backend_retains_the_cpp_positions(parity, policy):
    cpp, tri = parity["cpp"][policy], parity["triton"][policy]
    assert len(tri["positions"]) == len(cpp["positions"])
    evicting = 0
    for step, (a, b) in enumerate(zip(cpp["positions"], tri["positions"])):
        assert b.keys() == a.keys(), f"step {step}"
        for key in a:
            assert b[key] == a[key], f"step {step}, {key}"
            evicting += len(a[key][0]) < max(a[key][0], default=-1) + 1
    assert evicting > 0  # the check covered windows that had evicted tokens
