"""Policies: hand-computed eviction traces, ties, GQA grouping, batching."""

from __future__ import annotations

import pytest
import torch

from vllm_kvcompress.config import KVCompressConfig
from vllm_kvcompress.policies import (
    POLICIES,
    H2OPolicy,
    NoPolicy,
    PyramidInferPolicy,
    SnapKVPolicy,
    StreamingLLMPolicy,
    compress_step,
    drop_counts,
    get_policy,
    group_mean,
    retained_count,
    select,
    select_tokens,
)


class Layer:
    """A one-layer, slot-level driver of the contract (what the worker/oracle do)."""

    def __init__(self, policy, budget, interval=1, h_kv=1):
        self.policy, self.budget, self.interval = policy, budget, interval
        self.acc = torch.zeros(h_kv, 0)
        self.pos = torch.zeros(h_kv, 0, dtype=torch.long)
        self.C = 0

    def step(self, probs, is_prefill=False, prompt_len=None):
        """probs: [H_q, Q, n + Q] over the retained keys + this step's keys."""
        Q = probs.shape[-2]
        start, self.C = self.C, self.C + Q
        w = self.policy.query_weights(start, Q, self.C, is_prefill, prompt_len)
        self.acc = self.policy.accumulate(self.acc, probs, w)
        self.pos = torch.cat([self.pos, torch.arange(start, self.C).expand(self.pos.shape[0], Q)], dim=1)
        keep = retained_count(self.C, self.budget, self.interval)
        if self.pos.shape[1] > keep:
            kept, self.acc = compress_step(self.policy, self.acc, keep, self.budget)
            self.pos = self.pos.gather(1, kept)
        return self.pos


def _p(*rows):
    """One head, one query per row -> [1, Q, K]."""
    return torch.tensor([rows], dtype=torch.float32)


# dyadic probabilities so that float32 sums are exact (and ties are real ties)
H2O_TRACE = [
    ([1.0], [0]),  # A
    ([0.5, 0.5], [0, 1]),  # B
    ([0.25, 0.25, 0.5], [0, 1, 2]),  # C        acc A=1.75 B=.75 C=.5
    ([0.125, 0.25, 0.5, 0.125], [0, 2, 3]),  # D: acc A=1.875 B=1 C=1 D=.125 -> B/C tie, C (newer) wins
    ([0.25, 0.125, 0.5, 0.125], [0, 2, 4]),  # E over [A,C,D,E]: A=2.125 C=1.125 D=.625 ; E recent
]


def test_h2o_hand_trace_cache_of_3():
    layer = Layer(H2OPolicy(kernel=1), budget=3)  # recent = 3 // 2 = 1, sinks 0
    for probs, expected in H2O_TRACE:
        assert layer.step(_p(probs))[0].tolist() == expected
    # H2O keeps the accumulated scores of the survivors
    assert layer.acc[0].tolist() == [2.125, 1.125, 0.125]


def test_h2o_tie_older_loses_in_select():
    s = torch.tensor([[1.0, 2.0, 2.0, 0.5, 2.0, 0.1]])
    # keep 3, no protected slots: the three 2.0 tie -> all kept; keep 2 -> the two newest 2.0s
    assert select(s, 3, 0, 0).tolist() == [[1, 2, 4]]
    assert select(s, 2, 0, 0).tolist() == [[2, 4]]
    assert select(torch.zeros(1, 6), 3, 1, 0).tolist() == [[0, 4, 5]]


def test_interval_batches_compaction():
    layer = Layer(H2OPolicy(kernel=1), budget=3, interval=2)
    sizes = []
    rows = [[1.0], [0.5, 0.5], [0.25, 0.25, 0.5], [0.125, 0.25, 0.5, 0.125], [0.25, 0.125, 0.25, 0.25, 0.125]]
    for r in rows:
        sizes.append(layer.step(_p(r)).shape[1])
    assert sizes == [1, 2, 3, 4, 3]  # grows to budget + interval - 1, then back to budget
    # at C=5 the five scores are A=2.125 B=1.125 C=1.25 D=.375 E=.125(recent) -> A, C, E
    assert layer.pos[0].tolist() == [0, 2, 4]


def test_context_shorter_than_budget_keeps_all():
    for pol in (H2OPolicy(kernel=1), PyramidInferPolicy(), SnapKVPolicy(window=2), StreamingLLMPolicy()):
        layer = Layer(pol, budget=10, interval=1)
        probs = torch.softmax(torch.randn(1, 6, 6), -1).tril()
        assert layer.step(probs, is_prefill=True)[0].tolist() == list(range(6))
    assert select(torch.rand(2, 5), 8, 1, 1).tolist() == [list(range(5))] * 2


def test_prefill_chunk_then_decode_h2o():
    layer = Layer(H2OPolicy(kernel=1), budget=4, interval=1)
    # prefill chunk of 6 queries: keys 1 and 2 get heavy attention
    probs = torch.zeros(1, 6, 6)
    probs[0, 0, 0] = 1
    for q in range(1, 6):
        probs[0, q, 1] = 0.5
        probs[0, q, q] += 0.25
        probs[0, q, 2 if q >= 2 else 0] += 0.25
    # acc: key0 1.25, key1 2.75, key2 1.25, keys 3-5 .25; recent 2 -> 4, 5; key0/key2 tie -> key2 (newer)
    assert layer.step(probs, is_prefill=True)[0].tolist() == [1, 2, 4, 5]


def test_pyramid_resets_scores_only_when_asked():
    layer = Layer(PyramidInferPolicy(reset_scores=True), budget=3)
    for probs, _ in H2O_TRACE[:4]:
        layer.step(_p(probs))
    assert layer.pos.shape[1] == 3
    assert torch.count_nonzero(layer.acc) == 0  # reset after the compaction
    layer.step(_p([0.5, 0.25, 0.125, 0.125]))
    assert layer.acc.shape[1] == 3 and torch.count_nonzero(layer.acc) == 0
    layer = Layer(PyramidInferPolicy(sinks=0, recent_window=1, kernel=1, reset_scores=False), budget=3)  # carry
    for probs, _ in H2O_TRACE[:4]:
        layer.step(_p(probs))
    # decode queries weigh 1: acc A=1.875 B=1 C=1 D=.125 -> keep the recent D, then A and C (tie -> newer)
    assert layer.pos[0].tolist() == [0, 2, 3] and layer.acc[0].tolist() == [1.875, 1.0, 0.125]


def test_decode_compaction_keeps_what_the_prompt_voted_for():
    """Prefill votes carry into decode-time compactions: a few decode queries that look
    elsewhere do not evict the key the prompt's window chose (the earlier reset did)."""
    probs = torch.zeros(1, 8, 8)
    probs[0, 5:, 2] = 1.0  # SnapKV window (last 3 queries) votes for key 2
    for reset, survivor in ((False, 2), (True, 5)):
        layer = Layer(SnapKVPolicy(window=3, kernel=1, reset_scores=reset), budget=4)
        assert layer.step(probs, is_prefill=True)[0].tolist() == [2, 5, 6, 7]
        d = torch.zeros(1, 1, 5)
        d[0, 0, 1] = 1.0  # one decode query attends to slot 1 (key 5); budget 4, recent 3: key 2 or key 5 goes
        assert layer.step(d)[0].tolist() == [survivor, 6, 7, 8]


def test_h2o_question_window_weights():
    pol = H2OPolicy(kernel=1, window=2, window_weight=1.0, last_query_weight=0.0)
    # prompt of 10: the last 2 queries get 1 + 1.0 * (10 - 2) / 2 = 5
    assert pol.query_weights(0, 10, 10, True, prompt_len=10).tolist() == [1.0] * 8 + [5.0, 5.0]
    assert pol.query_weights(0, 6, 6, True, prompt_len=10).tolist() == [1.0] * 6  # chunk before the window
    assert pol.query_weights(6, 4, 10, True, prompt_len=10).tolist() == [1.0, 1.0, 5.0, 5.0]
    assert pol.query_weights(10, 1, 11, False, prompt_len=10).tolist() == [1.0]  # decode
    assert pol.query_weights(0, 10, 10, True).tolist() == [1.0] * 10  # prompt length unknown
    ref = H2OPolicy(kernel=1, window_weight=0.0, last_query_weight=0.0)  # the reference: every query weighs 1
    assert ref.query_weights(0, 10, 10, True, prompt_len=10).tolist() == [1.0] * 10
    # the question's vote keeps the fact plain H2O evicts for the essay's heavy hitter
    probs = torch.zeros(1, 10, 10)
    probs[0, :8, 1] = 1.0  # the essay's queries all look at key 1 (a heavy hitter)
    probs[0, 8:, 4] = 1.0  # the question looks at key 4 (the fact)
    plain = Layer(H2OPolicy(kernel=1, window_weight=0.0, last_query_weight=0.0, recent_window=1), budget=2)
    assert plain.step(probs, is_prefill=True)[0].tolist() == [1, 9]
    layer = Layer(H2OPolicy(kernel=1, window=2, window_weight=1.0, last_query_weight=0.0, recent_window=1), budget=3)
    assert layer.step(probs, is_prefill=True, prompt_len=10)[0].tolist() == [1, 4, 9]
    layer = Layer(H2OPolicy(kernel=1, window=2, window_weight=1.0, last_query_weight=0.0, recent_window=1), budget=2)
    assert layer.step(probs, is_prefill=True, prompt_len=10)[0].tolist() == [4, 9]  # 10 votes vs 8


@pytest.mark.parametrize("name", ["pyramid", "snapkv", "h2o"])
def test_last_query_vote(name):
    """``last_query_weight``: the prompt's last query votes ``1 + weight x`` its window's whole
    vote; 0 is the policy's own rule; no other query and no decode query changes."""
    cfg = dict(policy=name, budget=0.5, pyramid_window=4, snapkv_window=4, h2o_window=4)
    ref = get_policy(KVCompressConfig(**cfg, last_query_weight=0))
    pol = get_policy(KVCompressConfig(**cfg, last_query_weight=2.0))
    assert get_policy(KVCompressConfig(**cfg)).last_query_weight == 1.0  # the default
    P = 12
    base = ref.query_weights(0, P, P, True, prompt_len=P)
    window = float(ref.query_weights(P - 4, 4, P, True, prompt_len=P).sum())
    w = pol.query_weights(0, P, P, True, prompt_len=P)
    assert torch.equal(w[:-1], base[:-1]) and w[-1].item() == pytest.approx(base[-1].item() + 2.0 * window)
    # a chunk that ends before the prompt's last token, a later chunk holding it, decode
    assert torch.equal(pol.query_weights(0, 8, 8, True, prompt_len=P), ref.query_weights(0, 8, 8, True, prompt_len=P))
    assert pol.query_weights(8, 4, P, True, prompt_len=P)[-1].item() == pytest.approx(w[-1].item())
    assert torch.equal(pol.query_weights(P, 1, P + 1, False, prompt_len=P), ref.query_weights(P, 1, P + 1, False, prompt_len=P))
    assert torch.equal(pol.query_weights(0, P, P, True), ref.query_weights(0, P, P, True))  # prompt length unknown
    # the question's queries look at the later fact (key 5), its last query at the queried one (key 2):
    # the window's vote keeps the later fact, the last query's keeps the queried fact
    probs = torch.zeros(1, P, P)
    probs[0, :, 0] = 1.0
    probs[0, P - 4:, 0] = 0.0
    probs[0, P - 4:P - 1, 5] = 1.0
    probs[0, P - 1, 2] = 1.0
    pick = {}
    for weight in (0.0, 1.0):
        p = get_policy(KVCompressConfig(**cfg, last_query_weight=weight, sinks=0, recent_window=4,
                                        pyramid_kernel=1, snapkv_kernel=1, h2o_kernel=1, h2o_window_weight=1.0))
        kept = Layer(p, budget=5).step(probs, is_prefill=True, prompt_len=P)[0].tolist()
        pick[weight] = [k for k in kept if k < P - 4]
    assert pick == {0.0: [5], 1.0: [2]}, pick


def test_pyramid_window_is_kept_whole_and_not_ranked():
    """The observation window's own keys are protected (the reference ranks only the
    context before the window), so the window's self-attention cannot flood the top-k."""
    pol = PyramidInferPolicy(obs_window=3, sinks=0, kernel=1)
    probs = torch.zeros(1, 10, 10)
    probs[0, 7:, 7:] = torch.tensor([[1.0, 0, 0], [0.75, 0.25, 0], [0.5, 0.25, 0.25]])  # self-attention
    probs[0, 7:, 2] = 0.0
    probs[0, 9, 2] = 0.125  # ... and a little to key 2
    probs[0, 9, 7:] = torch.tensor([0.5, 0.25, 0.125])
    assert pol.sinks_recent(4) == (0, 3)
    assert Layer(pol, budget=4).step(probs, is_prefill=True)[0].tolist() == [2, 7, 8, 9]
    # the reference mode (obs_window 0): the window is ceil(0.2 * held tokens), also kept whole
    ref = PyramidInferPolicy(obs_window=0, obs_window_ratio=0.2, sinks=0, kernel=1)
    assert ref.sinks_recent(4, 10) == (0, 2) and ref.sinks_recent(4) == (0, 1)


def test_pyramid_query_weights():
    pol = PyramidInferPolicy(obs_window=0, obs_window_ratio=0.2, kernel=1)
    w = pol.query_weights(0, 10, 10, True)  # window = last ceil(0.2 * 10) = 2 positions
    assert w.tolist() == pytest.approx([0] * 8 + [1.0, 1.2])
    w = pol.query_weights(10, 10, 20, True)  # window 16..19, rising 1.0 -> 1.2
    assert w.tolist() == pytest.approx([0] * 6 + [1.0, 1.0 + 0.2 / 3, 1.0 + 0.4 / 3, 1.2])
    w = pol.query_weights(18, 2, 20, True)  # clipped to the chunk
    assert w.tolist() == pytest.approx([1.0 + 0.4 / 3, 1.2])
    w = pol.query_weights(0, 3, 3, True)  # window of one position
    assert w.tolist() == [0.0, 0.0, 1.0]
    assert pol.query_weights(30, 1, 31, False).tolist() == [1.0]
    assert pol.query_weights(30, 4, 34, False).tolist() == [1.0] * 4
    # the observation window only counts queries inside it
    layer = Layer(pol, budget=5)
    probs = torch.zeros(1, 10, 10)
    probs[0, :8, 1] = 1.0  # early queries love key 1 (ignored)
    probs[0, 8:, 3] = 1.0  # the window's queries pick key 3
    assert layer.step(probs, is_prefill=True)[0].tolist() == [0, 1, 2, 3, 9]  # 4 sinks win the budget
    layer = Layer(PyramidInferPolicy(obs_window=0, sinks=0, kernel=1), budget=3)
    assert layer.step(probs, is_prefill=True)[0].tolist() == [3, 8, 9]  # the window (2 of 10) kept + key 3
    short = PyramidInferPolicy(kernel=1, obs_window=4)  # the default: a fixed window of obs_window queries
    assert short.query_weights(0, 10, 10, True).tolist() == pytest.approx([0] * 6 + [1.0, 1 + 0.2 / 3, 1 + 0.4 / 3, 1.2])
    assert short.query_weights(0, 2, 2, True).tolist() == pytest.approx([1.0, 1.2])  # context shorter than it


def test_snapkv_query_weights_and_window():
    pol = SnapKVPolicy(window=3, kernel=1)
    assert pol.query_weights(0, 8, 8, True).tolist() == [0] * 5 + [1] * 3
    assert pol.query_weights(8, 2, 10, True).tolist() == [1, 1]  # chunk shorter than the window
    assert pol.query_weights(10, 1, 11, False).tolist() == [1]
    probs = torch.zeros(1, 8, 8)
    probs[0, :5, 1] = 1.0  # outside the window: ignored
    probs[0, 5:, 2] = 1.0
    layer = Layer(pol, budget=4)
    assert layer.step(probs, is_prefill=True)[0].tolist() == [2, 5, 6, 7]  # window (3) always kept
    assert torch.count_nonzero(layer.acc) == 0  # reset after the compaction (the default)
    layer = Layer(SnapKVPolicy(window=3, kernel=1, reset_scores=False), budget=4)
    layer.step(probs, is_prefill=True)
    assert layer.acc[0].tolist() == [3.0, 0.0, 0.0, 0.0]  # reset_scores false: the prompt's votes carry
    layer = Layer(SnapKVPolicy(window=3, kernel=1, reset_scores=True), budget=4)
    layer.step(probs, is_prefill=True)
    assert torch.count_nonzero(layer.acc) == 0


def test_snapkv_pooling():
    acc = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0]])
    avg3 = SnapKVPolicy(kernel=3, pooling="avg").score(acc)
    assert avg3[0].tolist() == pytest.approx([0, 5 / 3, 5 / 3, 5 / 3, 0, 0, 0])
    avg5 = SnapKVPolicy(kernel=5, pooling="avg").score(acc)
    assert avg5[0].tolist() == pytest.approx([1, 1, 1, 1, 1, 0, 0])  # zero padding counted at the edge
    mx = SnapKVPolicy(kernel=3, pooling="max").score(acc)
    assert mx.tolist() == [[0, 5, 5, 5, 0, 0, 0]]
    assert SnapKVPolicy(kernel=5).score(torch.rand(2, 3, 11)).shape == (2, 3, 11)
    # the valid length masks garbage past the end before pooling
    acc2 = torch.tensor([[0.0, 0.0, 0.0, 9.0, 9.0]])
    assert SnapKVPolicy(kernel=3, pooling="avg").score(acc2, valid_len=3).tolist() == [[0, 0, 0, 0, 0]]
    # pooling keeps the neighbourhood of a spike: clustered selection
    acc3 = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.2, 0.3, 0.0, 0.0]])
    kept, _ = compress_step(SnapKVPolicy(window=2, kernel=3, pooling="avg"), acc3, 5, 5)
    assert kept.tolist() == [[3, 4, 5, 10, 11]]


def test_streaming_sinks_and_window():
    pol = StreamingLLMPolicy()  # sinks 4
    assert pol.sinks_recent(10) == (4, 6)
    layer = Layer(StreamingLLMPolicy(sinks=2), budget=6)
    for c in range(1, 11):
        probs = torch.zeros(1, 1, layer.pos.shape[1] + 1)
        probs[0, 0, 0] = 1.0  # attention is ignored
        layer.step(probs)
    assert layer.pos[0].tolist() == [0, 1, 6, 7, 8, 9]
    # one prefill chunk too
    layer = Layer(StreamingLLMPolicy(), budget=8, interval=4)
    layer.step(torch.rand(1, 20, 20), is_prefill=True)
    assert layer.pos[0].tolist() == [0, 1, 2, 3] + list(range(20 - 4, 20))  # 20 -> retained_count = 8 + 0


def test_gqa_grouping_mean():
    # 4 query heads, 2 KV heads: heads 0, 1 -> KV 0; heads 2, 3 -> KV 1 (HF repeat_kv layout)
    probs = torch.zeros(4, 1, 4)
    probs[0, 0, 0] = 1.0
    probs[1, 0, 0] = 0.5
    probs[1, 0, 1] = 0.5
    probs[2, 0, 3] = 1.0
    probs[3, 0, 2] = 1.0
    acc = H2OPolicy(kernel=1).accumulate(torch.zeros(2, 0), probs, torch.ones(1))
    assert acc.tolist() == [[0.75, 0.25, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]
    assert group_mean(probs, 2).shape == (2, 1, 4)
    with pytest.raises(ValueError):
        group_mean(probs, 3)
    kept, _ = compress_step(H2OPolicy(kernel=1, recent_window=0), acc, 1, 2)
    assert kept.tolist() == [[0], [3]]  # tie between keys 2 and 3 of KV head 1 -> newer


def test_weights_scale_contributions():
    probs = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.25, 0.75]]])  # [1, 2, 3]
    acc = H2OPolicy(kernel=1).accumulate(torch.tensor([[1.0, 1.0]]), probs, torch.tensor([2.0, 0.0]))
    assert acc.tolist() == [[2.0, 2.0, 0.0]]  # zero-padded for the new key, second query ignored
    assert StreamingLLMPolicy().accumulate(torch.zeros(1, 1), probs, torch.ones(2)).tolist() == [[0, 0, 0]]


def test_batched_select_matches_per_row():
    torch.manual_seed(0)
    scores = torch.rand(3, 2, 10)
    scores[1, :, 2] = scores[1, :, 5]  # a tie
    keep = torch.tensor([4, 6, 3])
    valid = torch.tensor([10, 7, 2])
    sinks = torch.tensor([1, 0, 2])
    recent = torch.tensor([2, 3, 0])
    out = select(scores, keep, sinks, recent, valid)
    assert out.shape == (3, 2, 6)
    for b in range(3):
        n = min(int(keep[b]), int(valid[b]))
        row = select(scores[b, :, : int(valid[b])], n, int(sinks[b]), int(recent[b]))
        assert torch.equal(out[b, :, :n], row)
        assert (out[b, :, n:] == -1).all()
    # rows are ascending and distinct, all inside the valid length
    for b in range(3):
        r = out[b][:, : min(int(keep[b]), int(valid[b]))]
        assert (r[:, 1:] > r[:, :-1]).all() and (r < valid[b]).all()


def test_batched_accumulate_with_mask_and_compress_step():
    probs = torch.full((2, 2, 1, 3), 1 / 3)  # [B, H_q, Q, K], 2 q-heads share 1 KV head
    mask = torch.tensor([[True, True, True], [True, True, False]])
    w = torch.tensor([[1.0], [2.0]])
    acc = H2OPolicy(kernel=1).accumulate(torch.zeros(2, 1, 3), probs, w, key_mask=mask)
    assert acc[0, 0].tolist() == pytest.approx([1 / 3] * 3)
    assert acc[1, 0].tolist() == pytest.approx([2 / 3, 2 / 3, 0.0])
    kept, new_acc = compress_step(H2OPolicy(kernel=1, recent_window=0), acc, torch.tensor([2, 2]), torch.tensor([2, 2]), valid_len=torch.tensor([3, 1]))
    assert kept.tolist() == [[[1, 2]], [[0, -1]]]
    assert new_acc[1, 0].tolist() == pytest.approx([2 / 3, 0.0])


def test_compress_step_gathers_or_resets():
    acc = torch.tensor([[3.0, 1.0, 2.0, 0.5]])
    kept, new = compress_step(H2OPolicy(kernel=1, recent_window=1), acc, 3, 3)
    assert kept.tolist() == [[0, 2, 3]] and new.tolist() == [[3.0, 2.0, 0.5]]
    kept, new = compress_step(PyramidInferPolicy(sinks=0, recent_window=1, kernel=1, reset_scores=True), acc, 3, 3)
    assert kept.tolist() == [[0, 2, 3]] and new.tolist() == [[0.0, 0.0, 0.0]]


def test_pyramid_pooling_keeps_spans():
    # one key the window loves (a pass key's first digit) and its neighbours (the other digits)
    acc = torch.tensor([[0.0, 0.3, 0.0, 0.0, 1.0, 0.01, 0.0, 0.0, 0.2, 0.0, 0.0, 0.0]])
    kept, _ = compress_step(PyramidInferPolicy(sinks=0, recent_window=0, kernel=1), acc, 3, 3)
    assert kept.tolist() == [[1, 4, 8]]  # the reference ranks single tokens
    kept, _ = compress_step(PyramidInferPolicy(sinks=0, recent_window=0, kernel=3), acc, 3, 3)
    assert kept.tolist() == [[3, 4, 5]]  # max-pooled: the span around the peak (ties -> newest)
    assert get_policy(KVCompressConfig(policy="pyramid", budget=0.2)).kernel == 21
    assert get_policy(KVCompressConfig(policy="pyramid", budget=0.2, pyramid_kernel=1)).kernel == 1
    # slots past the valid length never leak into pooled scores
    pol = PyramidInferPolicy(kernel=3)
    assert pol.score(torch.tensor([[0.0, 0.0, 0.0, 9.0]]), valid_len=3).tolist() == [[0, 0, 0, 0]]


def test_registry_and_defaults():
    assert POLICIES == ("none", "h2o", "pyramid", "snapkv", "streaming")
    assert isinstance(get_policy(KVCompressConfig()), NoPolicy)
    h = get_policy(KVCompressConfig(policy="h2o", budget=0.2))
    assert isinstance(h, H2OPolicy) and h.sinks_recent(100) == (0, 50) and h.sinks_recent(101) == (0, 50)
    assert not h.resets_scores and (h.window, h.window_weight, h.kernel) == (32, 1.0, 21)
    p = get_policy(KVCompressConfig(policy="pyramid", budget=0.2))
    assert isinstance(p, PyramidInferPolicy) and p.sinks_recent(100) == (4, 32) and p.resets_scores
    assert (p.obs_window, p.kernel) == (32, 21)
    p = get_policy(KVCompressConfig(policy="pyramid", budget=0.2, pyramid_window=0, obs_window_ratio=0.25,
                                    reset_scores=False))
    assert p.sinks_recent(100) == (4, 25) and p.sinks_recent(100, 400) == (4, 100) and not p.resets_scores
    s = get_policy(KVCompressConfig(policy="snapkv", budget=0.2, snapkv_window=16, snapkv_kernel=7, snapkv_pooling="max"))
    assert isinstance(s, SnapKVPolicy) and (s.window, s.kernel, s.pooling) == (16, 7, "max")
    assert s.sinks_recent(100) == (0, 16) and s.resets_scores
    assert get_policy(KVCompressConfig(policy="snapkv", budget=0.2)).kernel == 21
    h = get_policy(KVCompressConfig(policy="h2o", budget=0.2, h2o_window=8, h2o_window_weight=0, h2o_kernel=5))
    assert (h.window, h.window_weight, h.kernel) == (8, 0.0, 5)
    st = get_policy(KVCompressConfig(policy="streaming", budget=0.2))
    assert isinstance(st, StreamingLLMPolicy) and st.sinks_recent(100) == (4, 96)
    o = get_policy(KVCompressConfig(policy="h2o", budget=0.2, sinks=2, recent_window=7))
    assert o.sinks_recent(100) == (2, 7)


def test_sinks_recent_vectorised():
    b = torch.tensor([100, 51, 7])
    assert H2OPolicy(kernel=1).sinks_recent(b)[1].tolist() == [50, 25, 3]
    pol = PyramidInferPolicy(obs_window=0, obs_window_ratio=0.2, kernel=1)
    assert pol.sinks_recent(b)[1].tolist() == [pol.sinks_recent(int(x))[1] for x in b] == [20, 11, 2]
    assert StreamingLLMPolicy().sinks_recent(b)[1].tolist() == [96, 47, 3]


def test_select_tokens_one_set_for_all_heads():
    """prefill_drop keeps one token set: the head-mean of the policy's scores, sinks and
    recent window of the target budget, and always the last token."""
    p = PyramidInferPolicy(sinks=1, recent_window=0, kernel=1)
    acc = torch.tensor([[0.0, 9.0, 0.0, 0.0, 1.0, 0.0, 0.0],    # head 0 likes slot 1
                        [0.0, 0.0, 0.0, 8.0, 1.0, 0.0, 0.0]])   # head 1 likes slot 3
    # per head, select would keep {0, 1 or 3, 6}; one set for both heads: slots 1 and 3 by the mean
    assert select_tokens(p, acc, keep=4, budget=4).tolist() == [0, 1, 3, 6]  # 6: the last token
    assert select_tokens(p, acc, keep=3, budget=3).tolist() == [0, 1, 6]
    # batched, with a shorter valid length in the second row
    b = select_tokens(p, torch.stack([acc, acc]), keep=torch.tensor([3, 3]), budget=torch.tensor([3, 3]),
                      valid_len=torch.tensor([7, 4]))
    assert b.tolist() == [[0, 1, 6], [0, 1, 3]]


def test_drop_counts_nested_or_none():
    # retained_count(1000, b, 32) = b + (1000 - b) % 32
    assert drop_counts([600, 600, 300, 100], 1000, 32) == [1000, 616, 328, 104]  # layer 0 computes all
    # prefill_drop_from: the layers before it compute every token
    assert drop_counts([600, 600, 300, 100], 1000, 32, first=3) == [1000, 1000, 1000, 104]
    assert drop_counts([600, 600, 300, 100], 1000, 32, first=4) is None  # nothing is dropped
    assert drop_counts([600, 700, 300], 1000, 32) == [1000, 712, 328]  # layer 1 chooses among all of layer 0's
    assert drop_counts([600, 300, 700], 1000, 32) is None  # a deeper layer would need tokens already dropped
    assert drop_counts([2000, 2000], 1000, 32) is None  # nothing is dropped


def test_accumulate_cannot_be_overridden():
    """Serving runs the fixed accumulation rule inside the kernels: a policy that overrides
    accumulate() would agree with the oracle and be silently wrong in vLLM, so it is refused."""
    from dataclasses import dataclass

    with pytest.raises(TypeError, match="query_weights"):
        @dataclass(frozen=True)
        class Squared(H2OPolicy):
            def accumulate(self, acc, probs, weights, key_mask=None):
                return acc + probs.sum()


@pytest.mark.parametrize("name", ["pyramid", "snapkv", "h2o"])
def test_pooling_ranks_selectable_slots_only(name):
    """The protected slots (sinks, recent window) are kept anyway; their scores must not be
    max-pooled onto the slots beside them (issue #27: 7 of 20 picks went to slots 0-6).
    A faint peak in the middle of the selectable range wins the free slots, not the
    neighbours of a huge sink score or of the window's strongly local votes."""
    from vllm_kvcompress.policies import compress_step, get_policy, select_tokens

    cfg = KVCompressConfig(policy=name, budget=0.25, sinks=4, recent_window=32)
    policy = get_policy(cfg)
    K, free = 400, 5
    acc = torch.full((3, K), 1e-4)
    acc[:, :4] = 50.0  # sinks
    acc[:, -32:] = 5.0  # the observation window's own keys
    peak = 200
    acc[:, peak] = 0.5
    keep = 4 + 32 + free
    kept, _ = compress_step(policy, acc, keep, keep)
    chosen = [s for s in kept[0].tolist() if 4 <= s < K - 32]
    assert len(chosen) == free
    assert all(abs(s - peak) <= policy.kernel // 2 for s in chosen), chosen
    toks = select_tokens(policy, acc, keep, keep).tolist()
    assert all(abs(s - peak) <= policy.kernel // 2 for s in toks if 4 <= s < K - 32), toks


def test_narrow_kernel_fits_min_spans():
    from vllm_kvcompress.policies.base import narrow_kernel

    # the largest odd width at which min_spans spans fit the selectable slots, within 1..kernel
    assert [narrow_kernel(21, r, 4) for r in (0, 3, 8, 12, 28, 84, 88, 500)] == [1, 1, 1, 3, 7, 21, 21, 21]
    assert narrow_kernel(21, 10, 0) == 21 and narrow_kernel(1, 10, 4) == 1 and narrow_kernel(21, None, 4) == 21
    rooms = torch.arange(0, 200)
    assert narrow_kernel(21, rooms, 6).tolist() == [narrow_kernel(21, int(r), 6) for r in rooms]


@pytest.mark.parametrize("name", ["pyramid", "snapkv", "h2o"])
def test_pooling_narrows_with_the_layer_budget(name):
    """pool_min_spans: a layer with few selectable slots pools narrower, so two separate peaks
    both keep their span where the full kernel would spend the slots on one; a batch of
    rows with different keep counts ranks each row as that row alone."""
    from vllm_kvcompress.policies.base import narrow_kernel

    cfg = dict(policy=name, budget=0.25, sinks=0, recent_window=0)
    wide = get_policy(KVCompressConfig(**cfg))
    narrow = get_policy(KVCompressConfig(**cfg, pool_min_spans=4))
    assert narrow.min_spans == 4 and wide.min_spans == 0
    K = 300
    acc = torch.full((1, K), 1e-4)
    acc[0, 100], acc[0, 200] = 1.0, 0.9  # two facts, each a first digit
    keep = 14  # room for two 7-wide spans, not for a 21-wide one beside another
    kept_w, _ = compress_step(wide, acc, keep, keep)
    kept_n, _ = compress_step(narrow, acc, keep, keep)
    assert narrow_kernel(21, keep, 4) == 3
    assert any(abs(s - 200) <= 1 for s in kept_n[0].tolist())  # both peaks kept
    assert not any(abs(s - 200) <= 1 for s in kept_w[0].tolist())  # the wide kernel drops the second
    # batched rows with different room: each row equals its own compress_step
    torch.manual_seed(0)
    accs = torch.rand(4, 3, 160)
    keeps = torch.tensor([20, 40, 90, 150])
    valid = torch.tensor([160, 120, 160, 150])
    kept_b, _ = compress_step(narrow, accs, keeps, keeps, valid_len=valid)
    for r in range(4):
        n = int(keeps[r])
        kept_r, _ = compress_step(narrow, accs[r, :, : int(valid[r])], n, n)
        assert torch.equal(kept_b[r, :, :n], kept_r), r


def test_select_tiebreak_is_lexicographic():
    """``select(..., tiebreak=t)``: protected slots, then the highest score, then the highest
    ``t``, then the later slot -- checked against a brute-force sort on rows with many ties."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        K = int(torch.randint(1, 40, (1,), generator=g))
        scores = torch.randint(0, 3, (2, K), generator=g).float()
        tb = torch.randint(0, 3, (2, K), generator=g).float()
        keep = int(torch.randint(0, K + 1, (1,), generator=g))
        sinks = int(torch.randint(0, 3, (1,), generator=g))
        recent = int(torch.randint(0, 3, (1,), generator=g))
        got = select(scores, keep, sinks, recent, tiebreak=tb)
        s_n = min(sinks, keep)
        r_n = min(recent, keep - s_n)
        for h in range(2):
            forced = set(range(s_n)) | set(range(K - r_n, K))
            rest = sorted((i for i in range(K) if i not in forced),
                          key=lambda i: (-float(scores[h, i]), -float(tb[h, i]), -i))
            want = sorted(forced | set(rest[: keep - len(forced)]))
            assert got[h].tolist() == want, (K, keep, sinks, recent)


@pytest.mark.parametrize("name", ["pyramid", "snapkv", "h2o"])
def test_pool_tiebreak_keeps_the_peak_of_a_cut_plateau(name):
    """A max-pooled peak is a plateau of ``kernel`` equal scores. When the slots left cut
    it, ``pool_tiebreak: newest`` keeps the plateau's late edge, away from the peak;
    ``score`` keeps the peak and its strongest neighbours."""
    cfg = dict(policy=name, budget=0.25, sinks=0, recent_window=0)
    newest = get_policy(KVCompressConfig(**cfg))
    by_score = get_policy(KVCompressConfig(**cfg, pool_tiebreak="score"))
    assert not newest.pool_tiebreak and by_score.pool_tiebreak
    assert not get_policy(KVCompressConfig(**cfg, pool_tiebreak="score", **{f"{name}_kernel": 1})).pool_tiebreak
    acc = torch.full((1, 100), 1e-4)
    acc[0, 40:45] = torch.tensor([1.0, 0.6, 0.5, 0.4, 0.3])  # a number: first digit strongest
    kept_new, _ = compress_step(newest, acc, 5, 5)
    kept_score, _ = compress_step(by_score, acc, 5, 5)
    assert kept_score[0].tolist() == [40, 41, 42, 43, 44]
    assert kept_new[0].tolist() == [46, 47, 48, 49, 50]  # the plateau's tail: no digit kept
    toks = select_tokens(by_score, acc[None], 5, 5)  # the last token is always computed
    assert toks[0].tolist() == [40, 41, 42, 43, 99]
