"""Budget schedules, stage layout and the retained-count rule."""

from __future__ import annotations

import math

import numpy as np

import pytest

from vllm_kvcompress.config import KVCompressConfig
from vllm_kvcompress.policies.schedule import (
    UNBOUNDED,
    budget_floor,
    layer_budgets,
    max_slots,
    pyramidinfer_shape,
    retained_count,
    stage_budgets,
    stage_layout,
)


# ----------------------------------------------------------------------------- retained count
@pytest.mark.parametrize(
    "C,budget,interval,expected",
    [
        (0, 20, 4, 0),
        (10, 20, 4, 10),
        (20, 20, 4, 20),
        (21, 20, 4, 21),
        (23, 20, 4, 23),
        (24, 20, 4, 20),  # compacts back to the budget
        (25, 20, 4, 21),
        (1000, 100, 32, 104),  # one big prefill chunk: 100 + 900 % 32
        (57, 50, 1, 50),  # interval 1: always exactly the budget
    ],
)
def test_retained_count(C, budget, interval, expected):
    assert retained_count(C, budget, interval) == expected


def test_retained_count_decode_sawtooth():
    budget, interval = 10, 4
    seq = [retained_count(c, budget, interval) for c in range(1, 30)]
    assert max(seq) == budget + interval - 1
    for a, b in zip(seq, seq[1:]):
        assert b == a + 1 or (b == budget and a == budget + interval - 1)
    assert retained_count(10**9, 7, 5) < 7 + 5
    assert retained_count(10**6, UNBOUNDED, 32) == 10**6


def test_retained_count_grows_past_grow_from():
    """decode_evict false: compaction stops at the prompt (grow_from); every later token is kept."""
    budget, interval, prompt = 10, 4, 25
    seq = [retained_count(c, budget, interval, prompt) for c in range(1, 40)]
    assert seq[:prompt] == [retained_count(c, budget, interval) for c in range(1, prompt + 1)]
    assert seq[prompt - 1] == 13  # 10 + (25 - 10) % 4
    assert seq[prompt:] == list(range(14, 14 + 40 - 1 - prompt))
    # arrays: one grow_from per request, None = never
    import numpy as np
    got = retained_count(np.array([30, 30]), np.array([10, 10]), 4, np.array([25, 1 << 60]))
    assert got.tolist() == [18, 10]


def test_max_slots():
    assert max_slots(100, 32, 1) == 132
    # a step computing `chunk` tokens never needs more slots than max_slots
    budget, interval, chunk = 50, 8, 16
    for c in range(0, 400, chunk):
        held_before = retained_count(c, budget, interval)
        assert held_before + chunk <= max_slots(budget, interval, chunk)


# ----------------------------------------------------------------------------- stages
@pytest.mark.parametrize(
    "L,num_stages,sizes",
    [(30, 6, [5] * 6), (30, 4, [10] * 3), (32, 6, [8] * 4), (30, 7, [5] * 6), (7, 6, [7]), (4, 6, [1] * 4), (30, 1, [30])],
)
def test_stage_layout(L, num_stages, sizes):
    cfg = KVCompressConfig(policy="h2o", budget=0.5, num_stages=num_stages)
    lay = stage_layout(cfg, L)
    assert [len(s) for s in lay] == sizes
    assert [i for s in lay for i in s] == list(range(L))


# ----------------------------------------------------------------------------- helpers
def _is_piecewise_constant(b, layout):
    return all(len({b[i] for i in s}) == 1 for s in layout)


def _mean(b):
    return sum(b) / len(b)


# ----------------------------------------------------------------------------- uniform
def test_keep_all_is_unbounded():
    assert layer_budgets(KVCompressConfig(), 30, 500) == [UNBOUNDED] * 30
    assert layer_budgets(KVCompressConfig(policy="h2o", budget=1.0), 30, 500) == [UNBOUNDED] * 30


def test_uniform_fraction_and_tokens():
    assert layer_budgets(KVCompressConfig(policy="h2o", budget=0.25), 30, 1001) == [251] * 30  # ceil
    assert layer_budgets(KVCompressConfig(policy="h2o", budget=128), 30, 1000) == [128] * 30
    # budget larger than the prompt stays as computed (retained_count keeps everything)
    assert layer_budgets(KVCompressConfig(policy="h2o", budget=128), 30, 50) == [128] * 30


def test_uniform_floors():
    # 10% of 300 = 30 < min_layer_budget 64
    assert layer_budgets(KVCompressConfig(policy="h2o", budget=0.1), 30, 300) == [64] * 30
    # prompt shorter than min_layer_budget: the floor is the prompt length
    assert layer_budgets(KVCompressConfig(policy="h2o", budget=0.25), 30, 40) == [40] * 30
    # sinks + recent floor (snapkv window 32 + 40 sinks) above min_layer_budget
    cfg = KVCompressConfig(policy="snapkv", budget=0.1, sinks=40, min_layer_budget=16)
    assert budget_floor(cfg, 300) == 72
    assert layer_budgets(cfg, 30, 300) == [72] * 30


# ----------------------------------------------------------------------------- pyramid schedules
PYRAMIDS = ["pyramidinfer-cosine", "pyramidinfer-linear", "pyramidkv"]


@pytest.mark.parametrize("schedule", PYRAMIDS)
@pytest.mark.parametrize("L,P,budget", [(30, 1000, 0.25), (30, 4000, 0.1), (32, 8000, 2048), (30, 600, 0.5), (24, 2000, 300)])
def test_pyramid_properties(schedule, L, P, budget):
    cfg = KVCompressConfig(policy="h2o", budget=budget, schedule=schedule)
    b = layer_budgets(cfg, L, P)
    B = cfg.prompt_budget(P)
    layout = stage_layout(cfg, L)
    assert len(b) == L
    assert all(x >= y for x, y in zip(b, b[1:])), b  # non-increasing with depth
    assert b[0] > b[-1]  # really a pyramid
    assert _is_piecewise_constant(b, layout)
    assert min(b) >= budget_floor(cfg, P)
    assert abs(_mean(b) - B) <= 0.5 + 1e-9, (_mean(b), B)  # the configured budget is the mean
    assert stage_budgets(cfg, L, P) == [b[s[0]] for s in layout]


@pytest.mark.parametrize("schedule", PYRAMIDS)
def test_pyramid_floor_binds_and_keeps_mean(schedule):
    # mean 100 tokens; the deep layers would want far fewer than the 80-token floor
    cfg = KVCompressConfig(policy="h2o", budget=0.1, schedule=schedule, min_layer_budget=80, num_stages=30)
    b = layer_budgets(cfg, 30, 1000)
    assert min(b) == 80 and b.count(80) > 1
    assert abs(_mean(b) - 100) <= 0.5
    assert all(x >= y for x, y in zip(b, b[1:]))


def test_pyramid_mean_below_floor_gives_floor():
    cfg = KVCompressConfig(policy="h2o", budget=0.05, schedule="pyramidkv")
    assert layer_budgets(cfg, 30, 1000) == [64] * 30


def test_deterministic():
    cfg = KVCompressConfig(policy="pyramid", budget=0.3)
    assert layer_budgets(cfg, 30, 777) == layer_budgets(cfg, 30, 777)


# ----------------------------------------------------------------------------- reference formulas
def _pyramidinfer_reference_ctx(ctx0: int, L: int, d: float, strategy: str) -> list[int]:
    """Transcription of mutonix/pyramidinfer prefill (without the min_context_length rule):
    layer idx stores the current context, then keeps int(ctx * r(idx)) of it for the next
    layer. NB: the reference's if/if/else chain turns 'linear' into a constant r = d; this
    transcription uses the intended formula only for 'cosine'."""
    out, ctx = [], ctx0
    for idx in range(L):
        out.append(ctx)
        assert strategy == "cosine"
        r = (1.0 - d) * (math.cos(math.pi * idx / L) + 1) / 2 + d
        ctx = int(ctx * r)
    return out


def test_pyramidinfer_cosine_matches_reference_shape():
    L, d, ctx0 = 32, 0.9, 100_000  # reference config: llama2_7b.json (32 layers, prefill_decay_ratio 0.9)
    ref = _pyramidinfer_reference_ctx(ctx0, L, d, "cosine")
    shape = pyramidinfer_shape(L, d, "cosine")
    for l in range(L):
        assert abs(shape[l] * ctx0 - ref[l]) <= l + 1  # int() truncations only
    assert shape[0] == shape[1] == 1.0  # r(0) = 1
    assert 0.15 < shape[-1] < 0.25  # ~0.19 of the context survives to the last layer

    # and the budgets follow it, scaled so that the mean is the configured budget
    cfg = KVCompressConfig(policy="pyramid", budget=1000, num_stages=L, min_layer_budget=1, sinks=0)
    b = layer_budgets(cfg, L, 100_000)
    m = sum(shape) / L
    for l in range(L):
        assert abs(b[l] - 1000 * shape[l] / m) <= 0.5 + 1e-9


def test_pyramidinfer_linear_is_really_linear():
    L, d = 30, 0.8
    s = pyramidinfer_shape(L, d, "linear")
    ratios = [s[j + 1] / s[j] for j in range(L - 1)]
    assert ratios[0] == pytest.approx(1.0)
    diffs = [ratios[j + 1] - ratios[j] for j in range(L - 2)]
    assert all(x == pytest.approx(-(1 - d) / L) for x in diffs)  # the per-layer keep ratio falls linearly
    # not the reference's accidental constant ratio d
    assert s[-1] > d ** (L - 1)


def _pyramidkv_reference(cap: int, w: int, L: int, q_len: int, beta: int) -> list[int]:
    """Transcription of KVCache-Factory PyramidKVCluster.update_kv (integer arithmetic),
    for q_len >= 2 * (cap - w): layer l keeps (max_num - l * steps) selected + w window."""
    min_num = (cap - w) // beta
    max_num = (cap - w) * 2 - min_num
    if max_num >= q_len - w:
        max_num = q_len - w
        min_num = (cap - w) * 2 - max_num
    steps = (max_num - min_num) // (L - 1)
    return [max_num - l * steps + w for l in range(L)]


def _pyramidkv_float(cap, w, L, q_len, beta):
    """kvpress PyramidKVPress.get_layer_budget (float arithmetic, round) + window."""
    lo = (cap - w) / beta
    hi = (cap - w) * 2 - lo
    if hi >= q_len - w:
        hi = q_len - w
        lo = (cap - w) * 2 - hi
    steps = (hi - lo) / (L - 1)
    return [hi - l * steps + w for l in range(L)]


@pytest.mark.parametrize("cap,q_len", [(2048, 8000), (2048, 3000), (512, 4000), (128, 1000)])
def test_pyramidkv_matches_reference(cap, q_len):
    L, w, beta = 32, 32, 20  # KVCache-Factory defaults: window_size 32, beta 20; Llama-2-7B layers
    cfg = KVCompressConfig(policy="snapkv", budget=cap, schedule="pyramidkv", num_stages=L, min_layer_budget=1)
    b = layer_budgets(cfg, L, q_len)
    exact = _pyramidkv_float(cap, w, L, q_len, beta)
    ref = _pyramidkv_reference(cap, w, L, q_len, beta)
    for l in range(L):
        assert abs(b[l] - exact[l]) <= 0.5 + 1e-9
        assert abs(b[l] - ref[l]) <= L  # the reference floors `steps` to an integer
    assert abs(_mean(b) - cap) <= 0.5
    if cap == 2048 and q_len == 3000:
        assert b[0] == q_len  # clamped: the top layer keeps the whole prompt


def test_retained_count_hold_until_prompt_end():
    """prompt_compaction once (hold_until = the prompt length): every token is kept until the
    prompt's last chunk, which compacts to what a one-step prefill holds; from there on the
    rule is unchanged (also with grow_from)."""
    budget, interval, prompt = 10, 4, 25
    held = [retained_count(c, budget, interval, hold_until=prompt) for c in range(1, 40)]
    assert held[:prompt - 1] == list(range(1, prompt))
    assert held[prompt - 1:] == [retained_count(c, budget, interval) for c in range(prompt, 40)]
    both = [retained_count(c, budget, interval, grow_from=prompt, hold_until=prompt) for c in range(1, 40)]
    assert both == [c if c < prompt else retained_count(c, budget, interval, grow_from=prompt) for c in range(1, 40)]
    got = retained_count(np.array([20, 30]), np.array([10, 10]), 4, hold_until=np.array([25, 25]))
    assert got.tolist() == [20, retained_count(30, 10, 4)]
    cfg = KVCompressConfig(policy="snapkv", budget=0.5)
    assert cfg.retention_args(900) == {"grow_from": None, "hold_until": 900}
    cfg = KVCompressConfig(policy="snapkv", budget=0.5, decode_evict=False, prompt_compaction="per-chunk")
    assert cfg.retention_args(900) == {"grow_from": 900, "hold_until": None}
