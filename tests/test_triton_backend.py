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

import pytest
from conftest import run_parity_workers

pytest.importorskip("triton")

POLICIES = "h2o,pyramid,snapkv"


@pytest.fixture(scope="module")
def parity(cut_model_dir, tmp_path_factory):
    runs = {"cpp": {"VLLM_KVCOMPRESS_OPS": "cpp"},
            "triton": {"TRITON_INTERPRET": "1", "VLLM_KVCOMPRESS_BACKEND": "triton", "VLLM_KVCOMPRESS_OPS": "triton"}}
    return run_parity_workers(cut_model_dir, tmp_path_factory.mktemp("parity"), POLICIES, runs)


@pytest.mark.parametrize("policy", POLICIES.split(","))
def test_triton_backend_generates_the_cpp_tokens(parity, policy):
    cpp, tri = parity["cpp"][policy], parity["triton"][policy]
    assert (cpp["impl"], cpp["ops"]) == (["KVCompressCPUImpl"], "cpp")
    assert (tri["impl"], tri["ops"]) == (["KVCompressTritonImpl"], "triton")
    assert sorted(cpp["tokens"]) == ["a", "again", "late", "long", "own"]
    assert all(len(t) == 24 for t in cpp["tokens"].values())
    assert tri["tokens"] == cpp["tokens"]
    if policy != "h2o":  # a prefix hit gives the cold cache's tokens (H2O: docs/serving.md)
        assert cpp["tokens"]["again"] == cpp["tokens"]["long"]


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
