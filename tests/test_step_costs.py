"""Step-cost counters (``integration.step_costs``, issue #18) and the benchmarks' machine
record (``benchmarks/machine.py``). No engine: ``benchmarks/bench_step_costs.py`` runs
them end to end; timing itself is measured there, not asserted here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vllm_kvcompress.integration import step_costs

REPO = Path(__file__).resolve().parent.parent


def _load_machine():
    spec = importlib.util.spec_from_file_location("bench_machine", REPO / "benchmarks" / "machine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


machine = _load_machine()


class _CM:  # the one field of vLLM's CommonAttentionMetadata the timer reads
    def __init__(self, qsl):
        self.query_start_loc_cpu = torch.tensor(qsl, dtype=torch.int32)


@pytest.fixture
def costs():
    was = step_costs.ENABLED
    step_costs.reset()
    yield step_costs
    step_costs.enable(was)
    step_costs.reset()


def test_off_is_a_no_op(costs):
    costs.enable(False)

    def build(self, common_prefix_len, cm):
        return "md"

    assert costs.timed_build(build) is build  # undecorated
    assert costs.timed("attention") is costs.timed("scoring")  # one shared null context
    with costs.timed("attention"), costs.step():
        pass
    assert costs.snapshot() == {}


def test_step_plan_not_wrapped_unless_env():
    """In this process the env var is unset: the builder's method is not wrapped.
    With it set, importing step_plan wraps ``build`` (checked in a child process)."""
    if os.environ.get(step_costs.ENV) == "1":
        pytest.skip(f"{step_costs.ENV}=1 in the test environment")
    from vllm_kvcompress.integration.step_plan import CompressedBuilderMixin

    assert not hasattr(CompressedBuilderMixin.build, "__wrapped__")
    code = ("from vllm_kvcompress.integration import step_costs, step_plan; "
            "assert step_costs.ENABLED; assert hasattr(step_plan.CompressedBuilderMixin.build, '__wrapped__')")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, step_costs.ENV: "1"}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_accumulates_by_step_kind(costs):
    costs.enable(True)
    calls = []

    @costs.timed_build
    def build(self, common_prefix_len, cm, fast_build=False):
        calls.append(fast_build)
        return "md"

    with costs.timed("scoring"):  # before any build: idle
        time.sleep(0.002)
    with costs.step():  # a prefill (mixed) step: one request with 5 new tokens
        assert build(None, 0, _CM([0, 5, 6]), fast_build=True) == "md"
        with costs.timed("attention"):
            time.sleep(0.002)
    for _ in range(3):  # pure decode steps, two groups built per step
        with costs.step():
            build(None, 0, _CM([0, 1, 2]))
            build(None, 0, _CM([0, 1, 2]))
            with costs.timed("attention_plain"):
                pass
            with costs.timed("vllm_build"):
                pass
    with costs.step():  # nothing built
        pass
    snap = costs.snapshot()
    assert calls == [True] + [False] * 6
    assert snap["idle"]["scoring"]["calls"] == 1 and snap["idle"]["scoring"]["s"] >= 0.002
    assert snap["idle"]["step"]["calls"] == 1
    assert snap["prefill"]["step"]["calls"] == 1 and snap["prefill"]["metadata"]["calls"] == 1
    assert snap["prefill"]["attention"]["s"] >= 0.002
    assert snap["decode"]["step"]["calls"] == 3 and snap["decode"]["metadata"]["calls"] == 6
    assert snap["decode"]["attention_plain"]["calls"] == 3

    pre = costs.per_kind(snap, "prefill")
    assert pre["steps"] == 1
    parts = sum(pre[c] for c in costs.PARTS) - pre["vllm_build"]
    assert pre["rest"] == pytest.approx(pre["step"] - parts)
    assert 0 <= pre["rest"] <= pre["step"]
    dec = costs.per_kind(snap, "decode")
    assert dec["metadata_plugin"] == pytest.approx(dec["metadata"] - dec["vllm_build"])
    assert costs.per_kind(snap, "prefill")["fused_decode"] == 0.0

    costs.reset()
    assert costs.snapshot() == {}


def test_kind_of():
    assert step_costs.kind_of(torch.tensor([0, 1, 2, 3])) == "decode"
    assert step_costs.kind_of(torch.tensor([0, 1, 3])) == "prefill"
    assert step_costs.kind_of(torch.tensor([0, 4])) == "prefill"


def test_compaction_split_into_selection_and_move(costs):
    from vllm_kvcompress import ops
    from vllm_kvcompress.integration import compaction
    from vllm_kvcompress.policies import H2OPolicy

    costs.enable(True)
    gen = torch.Generator().manual_seed(0)
    nb, H, D, bs = 9, 2, 64, 16
    cache = torch.randn(nb, H, 2 * bs, D, generator=gen)
    k, v = cache.chunk(2, dim=2)
    layer = ops.paged_view(k, v, torch.rand(nb, H, bs, generator=gen))
    bt = torch.arange(1, 9, dtype=torch.int32).view(2, 4)
    t = lambda *x: torch.tensor(x)  # noqa: E731
    compaction.compact_requests(layer, H2OPolicy(), bt, t(0, 0), t(40, 30), t(0, 0), t(20, 16), t(24, 20))
    idle = costs.snapshot()["idle"]
    assert idle["selection"]["calls"] == 1 and idle["compaction"]["calls"] == 1


def test_choose_dtype(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    none = {f: False for f in machine.ISA_FLAGS}
    assert machine.choose_dtype("auto", tmp_path, {**none, "avx512_bf16": True})[0] == "bfloat16"
    assert machine.choose_dtype("auto", tmp_path, {**none, "amx_bf16": True})[0] == "bfloat16"
    d, why = machine.choose_dtype("auto", tmp_path, {**none, "avx512f": True, "avx2": True})
    assert d == "float32" and "neither" in why
    assert machine.choose_dtype("bfloat16", tmp_path, none) == ("bfloat16", "--dtype bfloat16")
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert machine.choose_dtype("auto", tmp_path, {**none, "avx512_bf16": True})[0] == "float32"


def test_cpu_flags_parse():
    info = "processor: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f amx_tile amx_bf16 sse\n"
    assert machine.cpu_model(info) == "Some CPU"
    assert machine.cpu_flags(info) == {"avx2": True, "avx512f": True, "avx512_bf16": False, "avx512_vnni": False,
                                       "amx_tile": True, "amx_bf16": True}


def test_machine_record_fields(model_dir):
    dtype, why = machine.choose_dtype("auto", model_dir)
    rec = machine.machine_record(dtype, why, model_dir, [32, 128])
    for key in ("cpu", "cpu_count", "isa_flags", "torch_isa", "vllm_attn_isa", "dtype", "dtype_reason",
                "model_native_dtype", "git_commit"):
        assert key in rec, key
    assert set(rec["isa_flags"]) == set(machine.ISA_FLAGS)
    assert {"avx512", "amx_tile"} <= set(rec["torch_isa"])
    assert [x["block_size"] for x in rec["vllm_attn_isa"]] == [32, 128]
    assert all(x["vllm"] for x in rec["vllm_attn_isa"]), rec["vllm_attn_isa"]
    assert rec["dtype"] in ("float32", "bfloat16")
    json.dumps(rec)
    assert rec["dtype"] in machine.describe(rec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", ["h2o", "pyramid", "snapkv"])
def test_fused_prefill_chosen_where_it_is_faster(policy, dtype):
    """The fused prefill kernel replaces vLLM's attention where a second softmax pass over
    most queries would follow (H2O's prefill), and on bf16 pages wherever our kernels run on
    AVX512-BF16 dot products (ops.bf16_dot); float32 pages with a window of voters
    (PyramidInfer, SnapKV) keep vLLM's attention; "amx" pages always do."""
    import numpy as np

    from vllm_kvcompress import ops
    from vllm_kvcompress.config import KVCompressConfig
    from vllm_kvcompress.integration.step_plan import FUSED_PREFILL, StepPlan, fuse_prefill
    from vllm_kvcompress.policies import get_policy

    pol = get_policy(KVCompressConfig(policy=policy, budget=0.25))
    P = 1900
    w = pol.query_weights(0, P, P, True, P)
    z = np.zeros(1, dtype=np.int64)
    plan = StepPlan(policy=pol, block_table=torch.zeros(1, 60, dtype=torch.int32), query_start=np.array([0, P]),
                    num_new=np.array([P]), prompt_lens=np.array([P]), budget=np.array([475]), retained=z, start=z,
                    retained_after=np.array([475]), start_after=np.array([1]), weights=w, block_size=32)
    assert plan.mostly_scored is (policy == "h2o")
    if ops.impl_for("cpu") != "cpp" or not FUSED_PREFILL:
        pytest.skip("the fused prefill kernel is C++ only (and VLLM_KVCOMPRESS_FUSED_PREFILL=0 turns it off)")
    k, v = torch.zeros(4, 3, 64, 64, dtype=dtype).chunk(2, dim=2)
    dot = dtype == torch.bfloat16 and ops.bf16_dot(dtype, 64)
    assert fuse_prefill(plan, ops.paged_view(k, v, None)) is (policy == "h2o" or dot)
    assert fuse_prefill(plan, ops.paged_view(k, v, None, amx=dtype == torch.bfloat16)) is (
        dtype != torch.bfloat16 and policy == "h2o")
    # VLLM_KVCOMPRESS_FUSED_PREFILL=amx: H2O's prefill (most queries vote) fuses on "amx" pages too
    from vllm_kvcompress.integration import step_plan

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(step_plan, "FUSED_PREFILL_AMX", True)
        assert fuse_prefill(plan, ops.paged_view(k, v, None, amx=dtype == torch.bfloat16)) is (policy == "h2o" or (
            dtype != torch.bfloat16 and dot))
    plan.weights = None
    assert plan.mostly_scored is False
