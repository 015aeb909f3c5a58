"""Dense oracle: exact HF parity when keeping everything; real eviction otherwise."""

from __future__ import annotations

import pytest
import torch

from vllm_kvcompress.config import KVCompressConfig
from vllm_kvcompress.policies import layer_budgets, retained_count

transformers = pytest.importorskip("transformers")

from vllm_kvcompress.oracle import DenseOracle, load_model  # noqa: E402

NEW = 20


@pytest.fixture(scope="module")
def model():
    # tiny ops on a shared 2-core box: OpenMP threads only add contention
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_model(dtype=torch.float32)
    finally:
        torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def tok(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model.name_or_path)


@pytest.fixture(scope="module")
def short_prompt(tok):
    return tok("The capital of France is Paris. The capital of Germany is")["input_ids"]


@pytest.fixture(scope="module")
def long_prompt(tok):
    from vllm_kvcompress.assets import essays_text

    ids = tok(essays_text()[:2000])["input_ids"][:150]
    return ids + tok(" To sum up, the main point is")["input_ids"]


@pytest.fixture(scope="module")
def hf_short(model, short_prompt):
    x = torch.tensor([short_prompt])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False)
    return out[0, len(short_prompt) :].tolist()


@pytest.fixture(scope="module")
def full_long(model, long_prompt):
    return DenseOracle(model=model).generate(long_prompt, 8)[0]


def test_keep_everything_matches_hf_greedy(model, short_prompt, hf_short):
    assert len(hf_short) == NEW
    toks, kept = DenseOracle(KVCompressConfig(), model=model).generate(short_prompt, NEW)
    assert toks == hf_short
    P = len(short_prompt)
    assert len(kept) == model.config.num_hidden_layers
    assert all(k.shape == (3, P) and torch.equal(k[0], torch.arange(P)) for k in kept)


def test_keep_everything_chunked_prefill_matches_hf(model, short_prompt, hf_short):
    # a policy with budget 1.0 accumulates scores but never evicts
    o = DenseOracle(KVCompressConfig(policy="h2o", budget=1.0), model=model)
    toks, _ = o.generate(short_prompt, NEW, chunk_size=5)
    assert toks == hf_short
    assert all(s.size == len(short_prompt) + NEW - 1 for s in o.stores)


def test_budget_above_context_changes_nothing(model, long_prompt, full_long):
    cfg = KVCompressConfig(policy="h2o", budget=512)
    o = DenseOracle(cfg, model=model)
    toks, kept = o.generate(long_prompt, 8)
    assert toks == full_long
    assert all(k.shape[1] == len(long_prompt) for k in kept)


def test_h2o_small_budget_evicts(model, long_prompt, full_long):
    cfg = KVCompressConfig(policy="h2o", budget=32, min_layer_budget=16, compress_interval=8)
    o = DenseOracle(cfg, model=model)
    toks, kept = o.generate(long_prompt, 8, chunk_size=64)
    P = len(long_prompt)
    assert len(toks) == 8
    expect = retained_count(P, 32, 8)
    assert expect < P
    for k in kept:
        assert k.shape == (3, expect)
        assert (k[:, 1:] > k[:, :-1]).all()  # ascending true positions
        # the recent window (budget // 2 = 16) survives in every head
        assert torch.equal(k[:, -16:], torch.arange(P - 16, P).expand(3, 16))
    # heads choose differently somewhere (per-KV-head selection)
    assert any(not torch.equal(k[0], k[1]) for k in kept)
    C = P + len(toks) - 1
    assert o.num_computed == C
    assert [s.size for s in o.stores] == [retained_count(C, 32, 8)] * 30
    for s in o.stores:
        assert s.keys.shape == (3, s.size, 64) and s.acc.shape == (3, s.size)
        assert torch.equal(s.positions[:, -1], torch.full((3,), C - 1))


def test_pyramid_schedule_in_oracle(model, long_prompt):
    cfg = KVCompressConfig(policy="pyramid", budget=0.4, min_layer_budget=16, compress_interval=4)
    P = len(long_prompt)
    budgets = layer_budgets(cfg, 30, P)
    assert budgets[0] > budgets[-1]
    o = DenseOracle(cfg, model=model)
    toks, kept = o.generate(long_prompt, 4, chunk_size=48)
    assert [k.shape[1] for k in kept] == [retained_count(P, b, 4) for b in budgets]
    for k in kept:
        assert torch.equal(k[:, :4], torch.arange(4).expand(3, 4))  # 4 sinks
    C = P + len(toks) - 1
    assert [s.size for s in o.stores] == [retained_count(C, b, 4) for b in budgets]


def test_streaming_keeps_sinks_and_window(model, long_prompt):
    cfg = KVCompressConfig(policy="streaming", budget=40, min_layer_budget=16, compress_interval=1)
    o = DenseOracle(cfg, model=model)
    _, kept = o.generate(long_prompt, 2)
    P = len(long_prompt)
    want = torch.cat([torch.arange(4), torch.arange(P - 36, P)]).expand(3, 40)
    assert all(torch.equal(k, want) for k in kept)


def test_snapkv_protects_window(model, long_prompt):
    cfg = KVCompressConfig(policy="snapkv", budget=48, snapkv_window=16, min_layer_budget=16, compress_interval=1)
    o = DenseOracle(cfg, model=model)
    toks, kept = o.generate(long_prompt, 3)
    P = len(long_prompt)
    assert len(set(o.budgets)) > 1 and sum(o.budgets) / len(o.budgets) == pytest.approx(48, abs=0.5)  # PyramidKV's
    for k, b in zip(kept, o.budgets):
        assert k.shape == (3, b)
        assert torch.equal(k[:, -16:], torch.arange(P - 16, P).expand(3, 16))
    assert len(toks) == 3
