"""``vllm_kvcompress.integration.triton_compat``: vLLM's TRITON_ATTN code on CPU tensors under
``TRITON_INTERPRET=1`` (float32, Hq=9, H=3, D=64, block 32).

TRITON_INTERPRET must be set before triton is imported, and importing vLLM imports triton,
so the ``triton_case_*`` tests run in a fresh interpreter subprocess started by
``test_triton_compat_interpreted``; in the main process they are skipped. The subprocess
imports ``triton_attn`` with vLLM's placeholders first, as the CPU worker does at start-up.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import run_interpreted

_CHILD = os.environ.get("KVC_TRITON_COMPAT_CHILD") == "1"
HQ, H, D, BS, NB = 9, 3, 64, 32, 24
G = HQ // H
SCALE = D ** -0.5

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


# ---------------------------------------------------------------- main process


def test_triton_compat_interpreted():
    if _CHILD:
        pytest.skip("running inside the interpreter subprocess")
    run_interpreted(__file__, "triton_case", "KVC_TRITON_COMPAT_CHILD", timeout=300)


def test_one_line_errors(monkeypatch):
    """Without TRITON_INTERPRET, or with it set after triton was imported: a one-line RuntimeError."""
    import triton.language as tl
    import vllm.triton_utils as tu
    from triton.runtime.interpreter import InterpretedFunction

    from vllm_kvcompress.integration import triton_compat as tc

    if tu.HAS_TRITON:
        pytest.skip("vLLM has Triton here: ensure_vllm_triton is a no-op")
    if isinstance(tl.cdiv, InterpretedFunction):
        pytest.skip("this process runs triton interpreted")
    monkeypatch.setattr(tc, "_ready", False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1") as e:
        tc.ensure_vllm_triton()
    assert "\n" not in str(e.value)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="after triton was imported") as e:
        tc.ensure_vllm_triton()
    assert "\n" not in str(e.value)
    assert tu.HAS_TRITON is False


# ---------------------------------------------------------------- interpreter subprocess


@pytest.fixture(scope="module")
def compat():
    if not _CHILD:
        pytest.skip("run under TRITON_INTERPRET=1 by test_triton_compat_interpreted")
    import vllm.triton_utils as tu
    import vllm.v1.attention.backends.triton_attn as ta  # placeholders, as in the CPU worker
    import vllm.v1.attention.ops.triton_unified_attention as ua
    from triton.runtime.interpreter import InterpretedFunction

    from vllm_kvcompress.integration import triton_compat

    assert not isinstance(ua.kernel_unified_attention, InterpretedFunction)
    triton_compat.ensure_vllm_triton()
    triton_compat.ensure_vllm_triton()  # idempotent
    ua = sys.modules["vllm.v1.attention.ops.triton_unified_attention"]
    rc = sys.modules["vllm.v1.attention.ops.triton_reshape_and_cache_flash"]
    assert isinstance(ua.kernel_unified_attention, InterpretedFunction)
    assert isinstance(rc.reshape_and_cache_kernel_flash, InterpretedFunction)
    assert ta.unified_attention is ua.unified_attention
    assert tu.HAS_TRITON is False and type(tu.triton).__name__ == "TritonPlaceholder"
    return triton_compat


def kv_cache(layout: str, seed: int, nb: int = NB) -> torch.Tensor:
    """Logical ``[nb, H, bs, 2D]`` layer cache (random contents) in vLLM's physical ``layout``."""
    g = torch.Generator().manual_seed(seed)
    if layout == "LBNHC":  # TRITON's default (no declared layout): [nb, bs, H, 2D] in memory
        return torch.randn(nb, BS, H, 2 * D, generator=g).transpose(1, 2)
    return torch.randn(nb, H, BS, 2 * D, generator=g)  # LBHNC


def kv_views(kv: torch.Tensor):
    return kv.transpose(1, 2).split(D, dim=-1)  # TRITON_ATTN's [nb, bs, H, D] key / value views


def one() -> torch.Tensor:
    return torch.ones(1, dtype=torch.float32)


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
def test_triton_case_write_kv(compat, layout):
    kv = kv_cache(layout, seed=1)
    key_cache, value_cache = kv_views(kv)
    T = 12
    g = torch.Generator().manual_seed(2)
    key, value = torch.randn(T, H, D, generator=g), torch.randn(T, H, D, generator=g)
    slots = torch.tensor([0, 31, 32, 33, -1, 5 * BS + 7, 100, -1, 23 * BS + 31, 64, 65, -1], dtype=torch.int64)
    expect = kv.clone()
    ek, ev = kv_views(expect)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            ek[s // BS, s % BS] = key[t]
            ev[s // BS, s % BS] = value[t]
    compat.write_kv(key, value, key_cache, value_cache, slots, "auto", one(), one())
    assert torch.equal(kv, expect)  # every written slot exact, nothing else touched (slot -1 skipped)


def window_case(compat, reqs, layout, seed):
    """Requests ``(S, R, n)``: window at block-table entry S, R retained + n new tokens.

    Returns the cache, unshifted / shifted block tables, the retained+new K/V per request
    (already in the cache except the new tokens) and the new tokens' queries, K, V, slots."""
    g = torch.Generator().manual_seed(seed)
    kv = kv_cache(layout, seed)
    key_cache, value_cache = kv_views(kv)
    perm = torch.randperm(NB, generator=g).tolist()
    rows, cases = [], []
    for S, R, n in reqs:
        cols = S + -(-(R + n) // BS)
        rows.append([perm.pop() for _ in range(cols)])
    width = max(len(r) for r in rows)
    bt = torch.zeros(len(reqs), width, dtype=torch.int32)
    sbt = torch.zeros(len(reqs), width, dtype=torch.int32)
    for i, ((S, R, n), row) in enumerate(zip(reqs, rows)):
        bt[i, :len(row)] = torch.tensor(row)
        sbt[i, :len(row) - S] = torch.tensor(row[S:])
        k, v = torch.randn(R + n, H, D, generator=g), torch.randn(R + n, H, D, generator=g)
        q = torch.randn(n, HQ, D, generator=g)
        slots = torch.tensor([row[S + p // BS] * BS + p % BS for p in range(R + n)], dtype=torch.int64)
        if R:
            compat.write_kv(k[:R], v[:R], key_cache, value_cache, slots[:R], "auto", one(), one())
        cases.append(SimpleNamespace(S=S, R=R, n=n, k=k, v=v, q=q, slots=slots[R:]))
    return kv, bt, sbt, cases


def reference_attention(c) -> torch.Tensor:
    """Causal attention of queries at window slots R..R+n-1 over slots 0..R+j (float64)."""
    k = c.k.double().repeat_interleave(G, dim=1)  # [L, Hq, D]
    v = c.v.double().repeat_interleave(G, dim=1)
    logits = torch.einsum("qhd,khd->hqk", c.q.double(), k) * SCALE
    L = c.R + c.n
    mask = torch.arange(L)[None, :] > (c.R + torch.arange(c.n))[:, None]
    probs = torch.softmax(logits.masked_fill(mask[None], float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).float()


def run_triton_attn(compat, kv, sbt, cases, pad: int = 2) -> torch.Tensor:
    """Write the new tokens with ``write_kv`` (padding slots -1), then vLLM's
    ``TritonAttentionImpl.forward`` on compacted metadata (2D path)."""
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl, TritonAttentionMetadata

    key_cache, value_cache = kv_views(kv)
    q = torch.cat([c.q for c in cases] + [torch.zeros(pad, HQ, D)])
    k = torch.cat([c.k[c.R:] for c in cases] + [torch.zeros(pad, H, D)])
    v = torch.cat([c.v[c.R:] for c in cases] + [torch.zeros(pad, H, D)])
    slots = torch.cat([c.slots for c in cases] + [torch.full((pad,), -1, dtype=torch.int64)])
    compat.write_kv(k, v, key_cache, value_cache, slots, "auto", one(), one())

    n_tok = sum(c.n for c in cases)
    qsl = torch.tensor([0] + [c.n for c in cases], dtype=torch.int32).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([c.R + c.n for c in cases], dtype=torch.int32)
    md = TritonAttentionMetadata(
        num_actual_tokens=n_tok, max_query_len=max(c.n for c in cases), query_start_loc=qsl,
        max_seq_len=int(seq_lens.max()), seq_lens=seq_lens, block_table=sbt, slot_mapping=slots,
        seq_threshold_3D=0,  # the builder's value (128 // H_kv) picks the slower 3D kernel for decode
        num_par_softmax_segments=16, softmax_segm_output=torch.empty(1, HQ, 16, D),
        softmax_segm_max=torch.empty(1, HQ, 16), softmax_segm_expsum=torch.empty(1, HQ, 16), causal=True)
    impl = TritonAttentionImpl(num_heads=HQ, head_size=D, scale=SCALE, num_kv_heads=H, alibi_slopes=None,
                               sliding_window=None, kv_cache_dtype="auto")
    layer = SimpleNamespace(_q_scale=one(), _k_scale=one(), _v_scale=one())
    out = torch.full((q.shape[0], HQ, D), 7.0)
    impl.forward(layer, q, k, v, kv, md, out)
    assert torch.equal(out[n_tok:], torch.full((pad, HQ, D), 7.0))  # padding rows untouched
    return out[:n_tok]


def test_triton_case_prefill(compat):
    # a compacted window (entry 1, 40 retained) + a fresh request, both prefilling a chunk
    kv, bt, sbt, cases = window_case(compat, [(1, 40, 20), (0, 0, 17)], "LBNHC", seed=3)
    out = run_triton_attn(compat, kv, sbt, cases)
    ref = torch.cat([reference_attention(c) for c in cases])
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC"])
def test_triton_case_decode(compat, layout):
    from vllm_kvcompress.triton_kernels import decode_attention_scores

    reqs = [(2, 70, 1), (0, 5, 1), (1, 31, 1)]  # R+n = 71, 6, 32 (a full page)
    kv, bt, sbt, cases = window_case(compat, reqs, layout, seed=4)
    out = run_triton_attn(compat, kv, sbt, cases, pad=1)
    ref = torch.cat([reference_attention(c) for c in cases])
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
    if layout == "LBNHC":  # our fused decode on the same strided views gives vLLM's output
        key_cache, value_cache = kv_views(kv)
        q = torch.cat([c.q for c in cases])
        lens = torch.tensor([c.R + c.n for c in cases], dtype=torch.int32)
        ours = decode_attention_scores(q, key_cache.permute(0, 2, 3, 1), value_cache.permute(0, 2, 1, 3), sbt,
                                       lens, SCALE)
        torch.testing.assert_close(ours, out, rtol=0, atol=2e-5)


# ---------------------------------------------------------------- our kernels on TRITON_ATTN's views


def our_views(kv):
    key_cache, value_cache = kv_views(kv)
    return key_cache.permute(0, 2, 3, 1), value_cache.permute(0, 2, 1, 3)  # k_t [nb,H,D,bs], v [nb,H,bs,D]


def shifted_rows(lens, seed):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(NB, generator=g).tolist()
    cols = max(-(-n // BS) for n in lens)
    sbt = torch.zeros(len(lens), cols, dtype=torch.int32)
    for i, n in enumerate(lens):
        sbt[i, :-(-n // BS)] = torch.tensor([perm.pop() for _ in range(-(-n // BS))])
    return sbt


def test_triton_case_decode_scores(compat):
    from vllm_kvcompress import ops
    from vllm_kvcompress.triton_kernels import decode_attention_scores

    kv = kv_cache("LBNHC", seed=5)
    k_t, v = our_views(kv)
    lens = torch.tensor([45, 1, 64], dtype=torch.int32)
    sbt = shifted_rows(lens.tolist(), seed=5)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(3, HQ, D, generator=g)
    w = torch.tensor([1.0, 0.5, 0.25])
    acc = torch.rand(NB, H, BS, generator=g)
    acc_ref = acc.clone()
    ref = ops.decode_attention_scores_reference(q, k_t, v, sbt, lens, SCALE, acc_ref, w)
    out = decode_attention_scores(q, k_t, v, sbt, lens, SCALE, acc, w)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(acc, acc_ref, rtol=1e-5, atol=2e-6)


def test_triton_case_window_scores(compat):
    from vllm_kvcompress import ops
    from vllm_kvcompress.triton_kernels import window_scores

    kv = kv_cache("LBNHC", seed=7)
    k_t, _ = our_views(kv)
    nr = torch.tensor([30, 0], dtype=torch.int32)  # retained
    nq = [20, 12]  # this chunk's queries
    lens = nr + torch.tensor(nq, dtype=torch.int32)
    sbt = shifted_rows(lens.tolist(), seed=7)
    qs = torch.tensor([0, nq[0], nq[0] + nq[1]], dtype=torch.int32)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(int(qs[-1]), HQ, D, generator=g)
    w = (torch.rand(int(qs[-1]), generator=g) > 0.4).float() * torch.rand(int(qs[-1]), generator=g)
    acc = torch.rand(NB, H, BS, generator=g)
    acc_ref = acc.clone()
    ops.window_scores_reference(q, qs, k_t, sbt, lens, nr, w, SCALE, acc_ref)
    window_scores(q, qs, k_t, sbt, lens, nr, w, SCALE, acc)
    torch.testing.assert_close(acc, acc_ref, rtol=1e-5, atol=2e-6)


def test_triton_case_compact(compat):
    from vllm_kvcompress import ops
    from vllm_kvcompress.triton_kernels import compact_windows

    kv = kv_cache("LBNHC", seed=9)
    g = torch.Generator().manual_seed(9)
    acc = torch.rand(NB, H, BS, generator=g)
    # unshifted rows; request 0 compacts its 80-slot window at entry 1 into entry 0 (overlapping),
    # request 1 its 50-slot window at entry 0 in place
    bt = torch.tensor([[3, 7, 11, 15, 19], [4, 8, 12, 0, 0]], dtype=torch.int32)
    old, new = torch.tensor([1, 0]), torch.tensor([0, 0])
    wlen, keep = [80, 50], torch.tensor([40, 20])
    kept = torch.full((2, H, 40), -1, dtype=torch.long)
    for i in range(2):
        for h in range(H):
            kept[i, h, :int(keep[i])] = torch.randperm(wlen[i], generator=g)[:int(keep[i])].sort().values
    kept[1, 2, 10] = -1  # padding inside keep ends that row
    kv_ref, acc_ref = kv.clone(), acc.clone()
    ops.compact_windows_reference(*our_views(kv_ref), acc_ref, bt, old, new, kept, keep)
    compact_windows(*our_views(kv), acc, bt, old, new, kept, keep)
    assert torch.equal(kv, kv_ref) and torch.equal(acc, acc_ref)
