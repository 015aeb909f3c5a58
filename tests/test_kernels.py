"""Fused kernels (C++ CPU, Triton under TRITON_INTERPRET=1) vs their torch references.

Chain of checks:
* the batched torch references (``ops.*_reference``) equal the per-request
  reference ops (``ops.accumulate_scores`` / ``integration.compaction.compact``) and, for the
  attention output, dense SDPA and vLLM's own CPU attention kernel;
* the C++ kernels equal the batched references on random and adversarial
  shapes (block boundaries, one-token windows, GQA 1/3/4, D 64/128, window
  starts > 0, overlapping compaction windows, -1 padded rows; fp32/bf16/fp16);
* the Triton kernels equal them on small shapes (interpreter).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from conftest import expected_compaction, run_interpreted

from vllm_kvcompress import _ext, ops
from vllm_kvcompress.integration import compaction
from vllm_kvcompress.policies import H2OPolicy, PyramidInferPolicy, SnapKVPolicy, StreamingLLMPolicy

torch.set_num_threads(min(2, torch.get_num_threads()))

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
ACC_TOL = dict(rtol=1e-5, atol=1e-6)  # scores are float32 math for every cache dtype


# ---------------------------------------------------------------- fixtures / builders


@pytest.fixture(scope="module")
def cpp():
    if not _ext.available():
        pytest.skip(f"C++ extension unavailable: {_ext.error()}")
    return torch.ops.kvcompress


def test_extension_builds():
    """With a C++ compiler present the extension must build and load (no silent fallback)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine: ops falls back to the torch reference")
    assert _ext.available(), _ext.error()
    assert ops.impl_for("cpu") in ("cpp", "reference")  # 'reference' only if forced by the env


def make_layer(nb, H, D, bs, dtype, gen, with_acc=True):
    cache = torch.randn(nb, H, 2 * bs, D, generator=gen).to(dtype)
    k, v = cache.chunk(2, dim=2)
    acc = torch.rand(nb, H, bs, generator=gen) if with_acc else None
    return cache, ops.paged_view(k, v, acc)


def make_rows(lens, starts, bs, nb, gen, extra_cols=1):
    """Unshifted block-table rows (distinct random blocks, block 0 = vLLM's null block) with
    windows of ``lens`` slots at entries ``starts``; entries before the window are 0 (freed)."""
    R = len(lens)
    need = [s + -(-max(n, 1) // bs) for n, s in zip(lens, starts)]
    cols = max(need) + extra_cols
    assert sum(need) < nb
    perm = torch.randperm(nb - 1, generator=gen) + 1
    bt = torch.zeros(R, cols, dtype=torch.int32)
    o = 0
    for i in range(R):
        n = need[i] - starts[i]
        bt[i, starts[i] : starts[i] + n] = perm[o : o + n].to(torch.int32)
        o += n
    return bt


def shift(bt, starts):
    """The builder's shifted rows: entry 0 = the window's first entry."""
    cols = bt.shape[1]
    idx = (torch.as_tensor(starts)[:, None] + torch.arange(cols)[None, :]).clamp(max=cols - 1)
    return bt.gather(1, idx)


def _dense_attention(query, layer, bt_row, start, n, scale):
    """Plain SDPA over one request's gathered window (independent of the paged references)."""
    blk, off = ops.window_slots(bt_row, start, n, layer.block_size)
    k = layer.keys(blk, off).float()  # [n, H, D]
    v = layer.values(blk, off).float()
    Hq, H = query.shape[0], k.shape[1]
    k = k.repeat_interleave(Hq // H, dim=1).transpose(0, 1)  # [Hq, n, D]
    v = v.repeat_interleave(Hq // H, dim=1).transpose(0, 1)
    q = query.float()[:, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)[:, 0]


def _vllm_cpu_attention(vops, cache, q, qsl, lens, bt, H):
    """vLLM's own CPU attention ("vec" pages ``cache`` [nb, H, 2*bs, D], causal, scale D^-1/2)."""
    D = q.shape[-1]
    try:
        md = vops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(lens), num_heads=q.shape[1], num_kv_heads=H, head_dim=D, seq_lens=lens, dtype=q.dtype,
            query_start_loc=qsl, causal=True, sliding_window_size=-1, isa="vec", enable_kv_split=False)
        ref = torch.empty_like(q)
        k_half, v_half = cache.chunk(2, dim=2)
        vops.cpu_attention_with_kv_cache(
            query=q, key_cache=k_half, value_cache=v_half, output=ref, query_start_loc=qsl, seq_lens=lens,
            scale=D ** -0.5, causal=True, alibi_slopes=None, sliding_window=-1, block_table=bt, softcap=0.0,
            scheduler_metadata=md, s_aux=None)
    except (AttributeError, RuntimeError) as exc:
        pytest.skip(f"vLLM CPU attention not callable here: {exc}")
    return ref


DECODE_LENS = {
    16: [1, 2, 15, 16, 17, 32, 47, 48, 49, 80],
    32: [1, 31, 32, 33, 64, 95, 97, 160],
}


def decode_case(G, H, D, bs, dtype, seed, starts=None):
    gen = torch.Generator().manual_seed(seed)
    lens = DECODE_LENS[bs]
    R = len(lens)
    starts = starts if starts is not None else [int(x) for x in torch.randint(0, 3, (R,), generator=gen)]
    nb = sum(s + -(-n // bs) for n, s in zip(lens, starts)) + 8
    cache, layer = make_layer(nb, H, D, bs, dtype, gen)
    bt = make_rows(lens, starts, bs, nb, gen)
    q = torch.randn(R, G * H, D, generator=gen).to(dtype)
    w = torch.rand(R, generator=gen)
    w[0] = 0.0  # a zero weight still resets the new slot
    return cache, layer, bt, starts, torch.tensor(lens, dtype=torch.int32), q, w


# ---------------------------------------------------------------- (a) decode attention + scores


@pytest.mark.parametrize("G,H,D", [(1, 2, 64), (3, 3, 64), (4, 2, 128)])
def test_decode_reference_matches_per_request_ops(G, H, D):
    bs, scale = 16, D ** -0.5
    cache, layer, bt, starts, lens, q, w = decode_case(G, H, D, bs, torch.float32, seed=G)
    acc0 = layer.acc.clone()
    out = ops.decode_attention_scores_reference(q, layer.k_t, layer.v, shift(bt, starts), lens, scale, layer.acc, w)
    got_acc = layer.acc.clone()
    layer.acc.copy_(acc0)
    for i in range(len(lens)):
        n = int(lens[i])
        ops.accumulate_scores(layer, bt[i], starts[i], n - 1, q[i : i + 1], w[i : i + 1], scale)
        dense = _dense_attention(q[i], layer, bt[i], starts[i], n, scale)
        torch.testing.assert_close(out[i], dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_acc, layer.acc, **ACC_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G,H,D,bs", [(1, 2, 64, 16), (3, 3, 64, 32), (4, 2, 128, 16), (3, 1, 128, 32)])
def test_decode_cpp(cpp, G, H, D, bs, dtype):
    scale = D ** -0.5
    cache, layer, bt, starts, lens, q, w = decode_case(G, H, D, bs, dtype, seed=7 * G + D)
    sbt = shift(bt, starts)
    acc_ref = layer.acc.clone()
    out_ref = ops.decode_attention_scores_reference(q, layer.k_t, layer.v, sbt, lens, scale, acc_ref, w)
    out = torch.full_like(q, float("nan"))
    cpp.decode_attention_scores(q, layer.k_t, layer.v, sbt, lens, scale, layer.acc, w, out)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(layer.acc, acc_ref, **ACC_TOL)
    # attention only: same output, scores untouched
    acc_before = layer.acc.clone()
    out2 = ops.decode_attention_scores(q, layer.k_t, layer.v, sbt, lens, scale)
    torch.testing.assert_close(out2.float(), out_ref.float(), rtol=rtol, atol=atol)
    assert torch.equal(layer.acc, acc_before)


@pytest.mark.parametrize("G,H,D,bs", [(3, 3, 64, 32), (8, 1, 64, 16), (2, 2, 80, 32), (1, 2, 128, 16), (9, 1, 64, 32)])
def test_decode_bf16_dot_path(cpp, monkeypatch, G, H, D, bs):
    """bf16 decode on AVX512-BF16 (G <= 8, page size and D % 16 == 0; G = 9 keeps the float
    path): output vs the reference and the float path (VLLM_KVCOMPRESS_CPU_BF16DOT=0), scores
    equal to float32 rounding. Window lengths cover partial 16-token chunks and odd tails."""
    if not cpp.bf16_dot(D):
        pytest.skip("CPU without AVX512-BF16 (or VLLM_KVCOMPRESS_CPU_BF16DOT=0): the dot path does not run")
    scale = D ** -0.5
    cache, layer, bt, starts, lens, q, w = decode_case(G, H, D, bs, torch.bfloat16, seed=5 * G + D)
    sbt = shift(bt, starts)
    acc0 = layer.acc.clone()
    acc_ref = acc0.clone()
    out_ref = ops.decode_attention_scores_reference(q, layer.k_t, layer.v, sbt, lens, scale, acc_ref, w)

    def run():
        acc, out = acc0.clone(), torch.full_like(q, float("nan"))
        cpp.decode_attention_scores(q, layer.k_t, layer.v, sbt, lens, scale, acc, w, out)
        return out, acc

    out, acc = run()
    monkeypatch.setenv("VLLM_KVCOMPRESS_CPU_BF16DOT", "0")
    out_f, acc_f = run()
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.float(), out_f.float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(out, out_f) is (G > 8)  # the dot path ran where it applies, and only there
    torch.testing.assert_close(acc, acc_ref, **ACC_TOL)
    torch.testing.assert_close(acc, acc_f, **ACC_TOL)


def test_decode_cpp_strided_views_and_fp16(cpp):
    """query/out as views of vLLM's [T, Hq*D] tensors, a sliced block table, fp16 cache."""
    G, H, D, bs, dtype = 3, 3, 64, 32, torch.float16
    cache, layer, bt, starts, lens, q, w = decode_case(G, H, D, bs, dtype, seed=3)
    R = len(lens)
    big_q = torch.randn(R + 3, G * H * D).to(dtype)
    big_q[:R] = q.reshape(R, -1)
    qv = big_q[:R].view(R, G * H, D)
    out_big = torch.zeros(R + 3, G * H * D, dtype=dtype)
    sbt = torch.cat([torch.zeros(R, 2, dtype=torch.int32), shift(bt, starts)], dim=1)[:, 2:]  # non-owning view
    acc_ref = layer.acc.clone()
    ref = ops.decode_attention_scores_reference(q, layer.k_t, layer.v, sbt, lens, D ** -0.5, acc_ref, w)
    cpp.decode_attention_scores(qv, layer.k_t, layer.v, sbt, lens, D ** -0.5, layer.acc, w,
                                out_big[:R].view(R, G * H, D))
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out_big[:R].view(R, G * H, D).float(), ref.float(), rtol=rtol, atol=atol)
    assert not out_big[R:].any()
    torch.testing.assert_close(layer.acc, acc_ref, **ACC_TOL)


def test_decode_cpp_matches_vllm_attention(cpp):
    """Our attention output vs vLLM's CPU attention kernel on the same paged cache (bf16)."""
    vops = pytest.importorskip("vllm._custom_ops")
    G, H, D, bs, dtype = 3, 3, 64, 32, torch.bfloat16
    cache, layer, bt, starts, lens, q, w = decode_case(G, H, D, bs, dtype, seed=11, starts=[0] * 8)
    ref = _vllm_cpu_attention(vops, cache, q, torch.arange(len(lens) + 1, dtype=torch.int32), lens, bt, H)
    out = ops.decode_attention_scores(q, layer.k_t, layer.v, bt, lens, D ** -0.5, layer.acc, w)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_decode_cpp_random_batches(cpp):
    gen = torch.Generator().manual_seed(123)
    for trial in range(4):
        G, D, bs = [(2, 64, 16), (4, 128, 32), (3, 64, 16), (1, 128, 32)][trial]
        H, R = 2, int(torch.randint(1, 12, (1,), generator=gen))
        lens = [int(x) for x in torch.randint(1, 6 * bs, (R,), generator=gen)]
        starts = [int(x) for x in torch.randint(0, 4, (R,), generator=gen)]
        nb = sum(s + -(-n // bs) for n, s in zip(lens, starts)) + 4
        _, layer = make_layer(nb, H, D, bs, torch.float32, gen)
        bt = shift(make_rows(lens, starts, bs, nb, gen), starts)
        q = torch.randn(R, G * H, D, generator=gen) * 3  # peaky softmax
        w = torch.rand(R, generator=gen)
        sl = torch.tensor(lens, dtype=torch.int32)
        acc_ref = layer.acc.clone()
        ref = ops.decode_attention_scores_reference(q, layer.k_t, layer.v, bt, sl, 0.1, acc_ref, w)
        out = ops.decode_attention_scores(q, layer.k_t, layer.v, bt, sl, 0.1, layer.acc, w)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.acc, acc_ref, **ACC_TOL)


def test_decode_cpp_rejects_bad_block_ids(cpp):
    _, layer, bt, starts, lens, q, w = decode_case(1, 2, 64, 16, torch.float32, seed=1)
    sbt = shift(bt, starts).clone()
    sbt[3, 0] = layer.v.shape[0]  # out of range
    with pytest.raises(RuntimeError, match="out of range"):
        ops.decode_attention_scores(q, layer.k_t, layer.v, sbt, lens, 0.1, layer.acc, w)


# ---------------------------------------------------------------- (b) prefill-chunk scores


def window_case(G, H, D, bs, dtype, seed):
    """Requests: (num_retained, chunk length, start entry, weights pattern)."""
    gen = torch.Generator().manual_seed(seed)
    spec = [
        (0, 1, 0, "ones"),  # one-token window, first chunk
        (0, bs, 0, "ones"),  # exactly one full page
        (bs - 1, 1, 1, "ones"),  # new token closes a page
        (bs, bs + 1, 2, "rand"),  # crosses a page boundary, start > 0
        (2 * bs + 1, 3, 0, "zeros"),  # no weighted query: new slots still zeroed
        (5, 2 * bs - 1, 1, "tail"),  # SnapKV-like: only the last queries weigh
        (3 * bs, 7, 3, "sparse"),
    ]
    nr = [s[0] for s in spec]
    n = [s[1] for s in spec]
    starts = [s[2] for s in spec]
    lens = [a + b for a, b in zip(nr, n)]
    nb = sum(s + -(-L // bs) for L, s in zip(lens, starts)) + 8
    cache, layer = make_layer(nb, H, D, bs, dtype, gen)
    bt = make_rows(lens, starts, bs, nb, gen)
    T = sum(n)
    q = torch.randn(T, G * H, D, generator=gen).to(dtype)
    ws = []
    for (_, m, _, kind) in spec:
        if kind == "ones":
            ws.append(torch.ones(m))
        elif kind == "zeros":
            ws.append(torch.zeros(m))
        elif kind == "tail":
            w = torch.zeros(m)
            w[-4:] = 1.0
            ws.append(w)
        elif kind == "sparse":
            ws.append(torch.tensor([0.0, 1.5, 0.0, 0.0, 2.0, 0.0, 0.5])[:m])
        else:
            ws.append(torch.rand(m, generator=gen) + 0.1)
    qs = torch.zeros(len(spec) + 1, dtype=torch.int32)
    qs[1:] = torch.cumsum(torch.tensor(n), 0)
    return layer, bt, starts, qs, torch.tensor(lens, dtype=torch.int32), torch.tensor(nr, dtype=torch.int32), q, \
        torch.cat(ws)


@pytest.mark.parametrize("G,H,D", [(1, 2, 64), (3, 3, 64), (4, 2, 128)])
def test_window_reference_matches_accumulate_scores(G, H, D):
    bs, scale = 16, D ** -0.5
    layer, bt, starts, qs, lens, nr, q, w = window_case(G, H, D, bs, torch.float32, seed=G)
    acc0 = layer.acc.clone()
    ops.window_scores_reference(q, qs, layer.k_t, shift(bt, starts), lens, nr, w, scale, layer.acc,
                                max_chunk_elems=1 << 12)  # several query chunks
    got = layer.acc.clone()
    layer.acc.copy_(acc0)
    for i in range(len(lens)):
        q0, q1 = int(qs[i]), int(qs[i + 1])
        ops.accumulate_scores(layer, bt[i], starts[i], int(nr[i]), q[q0:q1], w[q0:q1], scale)
    torch.testing.assert_close(got, layer.acc, **ACC_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G,H,D,bs", [(1, 2, 64, 16), (3, 3, 64, 32), (4, 2, 128, 16)])
def test_window_cpp(cpp, G, H, D, bs, dtype):
    scale = D ** -0.5
    layer, bt, starts, qs, lens, nr, q, w = window_case(G, H, D, bs, dtype, seed=5 * G + bs)
    sbt = shift(bt, starts)
    acc_ref = layer.acc.clone()
    ops.window_scores_reference(q, qs, layer.k_t, sbt, lens, nr, w, scale, acc_ref)
    cpp.window_scores(q, qs, layer.k_t, sbt, lens, nr, w, scale, layer.acc)
    torch.testing.assert_close(layer.acc, acc_ref, **ACC_TOL)


def test_window_cpp_long_prefill_split(cpp):
    """One long weighted chunk (split over threads by cost) + a short one, padded query tensor."""
    gen = torch.Generator().manual_seed(9)
    G, H, D, bs = 3, 3, 64, 32
    nr, n = [40, 0], [300, 20]
    lens = [a + b for a, b in zip(nr, n)]
    nb = sum(-(-L // bs) for L in lens) + 4
    _, layer = make_layer(nb, H, D, bs, torch.bfloat16, gen)
    bt = make_rows(lens, [0, 0], bs, nb, gen)
    T = sum(n)
    q = torch.randn(T + 5, G * H, D, generator=gen).to(torch.bfloat16)  # trailing padding tokens
    w = torch.ones(T + 5)
    qs = torch.tensor([0, n[0], T], dtype=torch.int32)
    sl, nrt = torch.tensor(lens, dtype=torch.int32), torch.tensor(nr, dtype=torch.int32)
    acc_ref = layer.acc.clone()
    ops.window_scores_reference(q, qs, layer.k_t, bt, sl, nrt, w, 0.125, acc_ref)
    ops.window_scores(q, qs, layer.k_t, bt, sl, nrt, w, 0.125, layer.acc)
    torch.testing.assert_close(layer.acc, acc_ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G,H,D,bs", [(1, 2, 64, 16), (3, 3, 64, 32), (4, 2, 128, 16)])
@pytest.mark.parametrize("scored", [True, False])
def test_prefill_attention_cpp(cpp, G, H, D, bs, dtype, scored):
    """Fused prefill attention + scores vs the reference; its scores equal window_scores'."""
    scale = D ** -0.5
    layer, bt, starts, qs, lens, nr, q, w = window_case(G, H, D, bs, dtype, seed=7 * G + bs)
    sbt = shift(bt, starts)
    acc_ws = layer.acc.clone()
    acc_ref = layer.acc.clone()
    ref = ops.prefill_attention_scores_reference(q, qs, layer.k_t, layer.v, sbt, lens, nr, scale,
                                                 w if scored else None, acc_ref if scored else None)
    out = torch.zeros_like(q)
    cpp.prefill_attention_scores(q, qs, layer.k_t, layer.v, sbt, lens, nr, w if scored else None, scale,
                                 layer.acc if scored else None, out)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)
    if scored:
        cpp.window_scores(q, qs, layer.k_t, sbt, lens, nr, w, scale, acc_ws)
        torch.testing.assert_close(layer.acc, acc_ref, **ACC_TOL)
        torch.testing.assert_close(layer.acc, acc_ws, **ACC_TOL)
    else:
        assert torch.equal(layer.acc, acc_ws)


@pytest.mark.parametrize("G,H,D,bs", [(3, 3, 64, 32), (1, 2, 128, 64), (2, 1, 80, 128), (3, 1, 64, 16), (2, 2, 64, 8)])
def test_prefill_bf16_dot_path(cpp, monkeypatch, G, H, D, bs):
    """bf16 "vec" pages on a CPU with AVX512-BF16 run QK / PV on vdpbf16ps (keys and values
    packed into dot pairs per work item, probabilities rounded to bf16 for PV): outputs vs
    the reference and the AVX2 float path (VLLM_KVCOMPRESS_CPU_BF16DOT=0), scores and
    window_scores equal to the float path's to float32 rounding. D=80 covers a 16-dim tail
    tile, bs=16 32-token blocks straddling pages, bs=8 the scalar key packing, bs=64/128
    pages holding several 32-token blocks."""
    if not cpp.bf16_dot(D):
        pytest.skip("CPU without AVX512-BF16 (or VLLM_KVCOMPRESS_CPU_BF16DOT=0): the dot path does not run")
    scale = D ** -0.5
    layer, bt, starts, qs, lens, nr, q, w = window_case(G, H, D, bs, torch.bfloat16, seed=11 * G + bs)
    sbt = shift(bt, starts)
    acc0 = layer.acc.clone()
    ref = ops.prefill_attention_scores_reference(q, qs, layer.k_t, layer.v, sbt, lens, nr, scale, w, acc0.clone())

    def run():
        acc, acc_ws, out = acc0.clone(), acc0.clone(), torch.zeros_like(q)
        cpp.prefill_attention_scores(q, qs, layer.k_t, layer.v, sbt, lens, nr, w, scale, acc, out)
        cpp.window_scores(q, qs, layer.k_t, sbt, lens, nr, w, scale, acc_ws)
        return out, acc, acc_ws

    out, acc, acc_ws = run()
    monkeypatch.setenv("VLLM_KVCOMPRESS_CPU_BF16DOT", "0")
    assert not cpp.bf16_dot(D)
    out_f, acc_f, acc_ws_f = run()
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.float(), out_f.float(), rtol=1e-2, atol=1e-2)
    assert not torch.equal(out, out_f)  # the two paths did run different code
    torch.testing.assert_close(acc, acc_f, **ACC_TOL)
    torch.testing.assert_close(acc_ws, acc_ws_f, **ACC_TOL)
    torch.testing.assert_close(acc, acc_ws, **ACC_TOL)


def test_prefill_attention_reference_matches_sdpa():
    """The reference's causal prefill attention vs SDPA on gathered windows (query k of a
    request sees window slots 0 .. num_retained + k)."""
    G, H, D, bs, scale = 3, 3, 64, 16, 0.125
    layer, bt, starts, qs, lens, nr, q, w = window_case(G, H, D, bs, torch.float32, seed=3)
    out = ops.prefill_attention_scores_reference(q, qs, layer.k_t, layer.v, shift(bt, starts), lens, nr, scale)
    for i in range(len(lens)):
        for k in range(int(qs[i + 1] - qs[i])):
            t = int(qs[i]) + k
            want = _dense_attention(q[t], layer, bt[i], starts[i], int(nr[i]) + k + 1, scale)
            torch.testing.assert_close(out[t], want, rtol=1e-5, atol=1e-5)


def test_prefill_attention_cpp_matches_vllm_attention(cpp):
    """Our prefill attention vs vLLM's CPU attention kernel on the same paged cache (bf16,
    chunks after retained slots, a one-token request in the batch)."""
    vops = pytest.importorskip("vllm._custom_ops")
    G, H, D, bs, dtype = 3, 3, 64, 32, torch.bfloat16
    layer, bt, starts, qs, lens, nr, q, w = window_case(G, H, D, bs, dtype, seed=21)
    nb = layer.v.shape[0]
    # vLLM's [nb, H, 2*bs, D] "vec" pages: the key half is each k_t page's memory as [bs, D]
    cache = torch.cat([layer.k_t.reshape(nb, H, bs, D), layer.v], dim=2)
    sbt = shift(bt, starts)
    ref = _vllm_cpu_attention(vops, cache, q, qs, lens, sbt, H)
    out = ops.prefill_attention_scores(q, qs, layer.k_t, layer.v, sbt, lens, nr, D ** -0.5)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- (c) compaction


def compact_case(H, D, bs, dtype, seed, with_acc=True):
    """Requests with overlapping old/new windows (new_start in [old_start, old_start+2])."""
    gen = torch.Generator().manual_seed(seed)
    spec = [  # (count, keep, old_start, new_start)
        (bs + 1, bs, 0, 0),  # same window, drop one slot
        (3 * bs, 2 * bs - 1, 0, 1),  # overlapping, destination one page later
        (5 * bs - 3, 2 * bs + 1, 1, 3),  # destination beyond the sinks' source pages
        (bs, 0, 2, 2),  # keep nothing
        (1, 1, 0, 0),  # one-token window
        (4 * bs + 5, 4 * bs + 5, 1, 1),  # keep everything (identity move)
        (2 * bs + 2, 5, 0, 2),  # tiny keep, far destination
    ]
    R = len(spec)
    cols = max(max(o + -(-c // bs), nw + -(-max(k, 1) // bs)) for c, k, o, nw in spec) + 1
    nb = R * cols + 4
    cache, layer = make_layer(nb, H, D, bs, dtype, gen, with_acc=with_acc)
    perm = torch.randperm(nb - 1, generator=gen) + 1
    bt = perm[: R * cols].view(R, cols).to(torch.int32)
    kmax = max(k for _, k, _, _ in spec) + 2  # extra -1 padding columns
    kept = torch.full((R, H, kmax), -1, dtype=torch.long)
    for i, (c, k, _, _) in enumerate(spec):
        for h in range(H):
            sel = torch.randperm(c, generator=gen)[:k]
            if k >= 2:
                sel[:2] = torch.tensor([0, c - 1])  # a sink and the newest slot
                sel = sel.unique()
                while sel.numel() < k:
                    sel = torch.cat([sel, torch.randperm(c, generator=gen)[:k]]).unique()[:k]
                    sel = torch.cat([torch.tensor([0, c - 1]), sel]).unique()[:k]
            kept[i, h, : sel.numel()] = sel.sort().values
    keep = torch.tensor([k for _, k, _, _ in spec])
    old = torch.tensor([o for _, _, o, _ in spec])
    new = torch.tensor([nw for _, _, _, nw in spec])
    return cache, layer, bt, old, new, kept, keep


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("dtype,H,D,bs", [(torch.float32, 2, 64, 16), (torch.bfloat16, 3, 128, 32)])
def test_compact(request, impl, dtype, H, D, bs):
    if impl == "cpp":
        request.getfixturevalue("cpp")
    fn = ops.compact_windows_reference if impl == "reference" else torch.ops.kvcompress.compact_windows
    for variant in ("move_acc", "new_acc", "no_acc"):
        cache, layer, bt, old, new, kept, keep = compact_case(H, D, bs, dtype, seed=D + bs,
                                                              with_acc=variant != "no_acc")
        new_acc = torch.rand(kept.shape) if variant == "new_acc" else None
        exp_cache, exp_acc = expected_compaction(cache, layer, bt, old, new, kept, keep, new_acc)
        fn(layer.k_t, layer.v, layer.acc, bt, old, new, kept, keep, new_acc)
        assert torch.equal(cache, exp_cache), variant
        if exp_acc is not None:
            assert torch.equal(layer.acc, exp_acc), variant


def test_compact_padding_ends_row(cpp):
    """-1 inside the first keep entries ends the row (both implementations)."""
    cache, layer, bt, old, new, kept, keep = compact_case(2, 64, 16, torch.float32, seed=4)
    kept[1, 0, 5] = -1
    c2 = cache.clone()
    k2, v2 = c2.chunk(2, dim=2)
    l2 = ops.paged_view(k2, v2, layer.acc.clone())
    exp_cache, exp_acc = expected_compaction(cache, layer, bt, old, new, kept, keep)
    ops.compact_windows_reference(l2.k_t, l2.v, l2.acc, bt, old, new, kept, keep)
    cpp.compact_windows(layer.k_t, layer.v, layer.acc, bt, old, new, kept, keep, None)
    assert torch.equal(cache, exp_cache) and torch.equal(c2, exp_cache)
    assert torch.equal(layer.acc, exp_acc) and torch.equal(l2.acc, exp_acc)


@pytest.mark.parametrize("policy", [H2OPolicy(), SnapKVPolicy(), PyramidInferPolicy(), StreamingLLMPolicy(sinks=2)],
                         ids=lambda p: p.name)
def test_compact_requests_matches_per_request_compact(cpp, policy):
    """Batched selection + move == the per-request reference compaction.compact."""
    gen = torch.Generator().manual_seed(17)
    H, D, bs = 2, 64, 16
    spec = [(40, 20, 0, 1, 24), (70, 33, 1, 3, 33), (17, 17, 0, 0, 20), (100, 48, 2, 5, 40)]  # count, keep, S, S', B
    R = len(spec)
    cols = 12
    nb = R * cols + 2
    cache, layer = make_layer(nb, H, D, bs, torch.bfloat16, gen)
    layer.acc.copy_(torch.randint(0, 6, layer.acc.shape, generator=gen).float())  # many ties
    bt = (torch.randperm(nb - 1, generator=gen)[: R * cols] + 1).view(R, cols).to(torch.int32)
    c2 = cache.clone()
    k2, v2 = c2.chunk(2, dim=2)
    l2 = ops.paged_view(k2, v2, layer.acc.clone())
    want = [compaction.compact(l2, policy, bt[i], s, c, s2, k, b) for i, (c, k, s, s2, b) in enumerate(spec)]
    col = lambda j: torch.tensor([x[j] for x in spec])  # noqa: E731
    kept = compaction.compact_requests(layer, policy, bt, col(2), col(0), col(3), col(1), col(4))
    for i, w in enumerate(want):
        assert torch.equal(kept[i, :, : w.shape[1]], w)
        assert (kept[i, :, w.shape[1]:] == -1).all()
    assert torch.equal(cache, c2)
    assert torch.equal(layer.acc, l2.acc)


def test_empty_batches_and_empty_windows(cpp):
    gen = torch.Generator().manual_seed(0)
    _, layer = make_layer(8, 2, 64, 16, torch.float32, gen)
    acc0 = layer.acc.clone()
    bt = torch.tensor([[3, 4], [5, 6]], dtype=torch.int32)
    q = torch.randn(2, 2, 64)
    lens = torch.tensor([0, 17], dtype=torch.int32)  # an empty window gives a zero output
    for fn in (ops.decode_attention_scores_reference, ops.decode_attention_scores):
        layer.acc.copy_(acc0)
        out = fn(q, layer.k_t, layer.v, bt, lens, 0.1, layer.acc, torch.ones(2))
        assert not out[0].any() and out[1].abs().sum() > 0
        assert torch.equal(layer.acc[3], acc0[3])
        if fn is ops.decode_attention_scores_reference:
            acc_ref, out_ref = layer.acc.clone(), out
    torch.testing.assert_close(layer.acc, acc_ref, **ACC_TOL)
    torch.testing.assert_close(out, out_ref)
    z = torch.zeros(0, dtype=torch.int32)
    ops.decode_attention_scores(q[:0], layer.k_t, layer.v, bt[:0], z, 0.1, layer.acc, torch.ones(0))
    ops.window_scores(q[:0], torch.zeros(1, dtype=torch.int32), layer.k_t, bt[:0], z, z, torch.ones(0), 0.1,
                      layer.acc)
    ops.compact_windows(layer.k_t, layer.v, layer.acc, bt[:0], z.long(), z.long(),
                        torch.zeros(0, 2, 0, dtype=torch.long), z.long())
    torch.testing.assert_close(layer.acc, acc_ref, **ACC_TOL)


# ---------------------------------------------------------------- dispatch


def test_dispatch(monkeypatch, cpp):
    monkeypatch.setattr(ops, "IMPL", "reference")
    assert ops.impl_for("cpu") == "reference"
    monkeypatch.setattr(ops, "IMPL", "auto")
    assert ops.impl_for("cpu") == "cpp"
    monkeypatch.setattr(ops, "IMPL", "triton")
    with pytest.raises(RuntimeError):
        ops.impl_for("cpu")
    monkeypatch.setattr(ops, "IMPL", "bogus")
    with pytest.raises(ValueError):
        ops.impl_for("cpu")


def test_forced_reference_is_used(monkeypatch):
    monkeypatch.setattr(ops, "IMPL", "reference")
    calls = []
    monkeypatch.setattr(ops, "decode_attention_scores_reference", lambda *a, **k: calls.append(1) or a[0])
    monkeypatch.setattr(torch.ops, "kvcompress", None, raising=False)  # any C++ call would fail
    q = torch.zeros(1, 1, 8)
    ops.decode_attention_scores(q, None, None, None, None, 1.0)
    assert calls == [1]


# ---------------------------------------------------------------- Triton (interpreter)


# TRITON_INTERPRET must be set before triton itself is imported (triton's own @jit helpers,
# e.g. tl.cdiv, are decorated at import), and other tests import vLLM, which imports triton.
# So the triton_case_* tests run in a fresh interpreter subprocess started by
# test_triton_kernels_interpreted; in the main process they are skipped.
_TRITON_CHILD = os.environ.get("KVC_TRITON_CHILD") == "1"


def test_triton_kernels_interpreted():
    if _TRITON_CHILD:
        pytest.skip("running inside the interpreter subprocess")
    run_interpreted(__file__, "triton_case", "KVC_TRITON_CHILD")


@pytest.fixture(scope="module")
def tk():
    if not _TRITON_CHILD:
        pytest.skip("run under TRITON_INTERPRET=1 by test_triton_kernels_interpreted")
    import vllm_kvcompress.triton_kernels.kernels as mod
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(mod._decode_partial_kernel, InterpretedFunction), "TRITON_INTERPRET=1 was not in effect"
    return mod


@pytest.mark.parametrize("dtype,G,D,splits", [(torch.float32, 1, 64, None), (torch.bfloat16, 3, 64, 1),
                                              (torch.float32, 4, 128, 3)])
def test_triton_case_decode(tk, dtype, G, D, splits):
    H, bs = 2, 16
    cache, layer, bt, starts, lens, q, w = decode_case(G, H, D, bs, dtype, seed=G)
    keep_lens = [0, 1, 2, 3, 5, 7, 9]  # a small subset (the interpreter is slow); 80 slots span 2 tiles
    lens, q, w, starts, bt = lens[keep_lens], q[keep_lens], w[keep_lens], [starts[i] for i in keep_lens], \
        bt[keep_lens]
    sbt = shift(bt, starts)
    acc_ref = layer.acc.clone()
    ref = ops.decode_attention_scores_reference(q, layer.k_t, layer.v, sbt, lens, D ** -0.5, acc_ref, w)
    out = tk.decode_attention_scores(q, layer.k_t, layer.v, sbt, lens, D ** -0.5, layer.acc, w, num_splits=splits)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(layer.acc, acc_ref, **ACC_TOL)


@pytest.mark.parametrize("dtype,G,D,splits", [(torch.float32, 3, 64, None), (torch.bfloat16, 4, 64, 3)])
def test_triton_case_window(tk, dtype, G, D, splits):
    H, bs = 2, 16
    layer, bt, starts, qs, lens, nr, q, w = window_case(G, H, D, bs, dtype, seed=G)
    sbt = shift(bt, starts)
    acc_ref = layer.acc.clone()
    ops.window_scores_reference(q, qs, layer.k_t, sbt, lens, nr, w, D ** -0.5, acc_ref)
    tk.window_scores(q, qs, layer.k_t, sbt, lens, nr, w, D ** -0.5, layer.acc, num_splits=splits)
    torch.testing.assert_close(layer.acc, acc_ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype,variant", [(torch.float32, "move_acc"), (torch.bfloat16, "new_acc"),
                                           (torch.float32, "no_acc")])
def test_triton_case_compact(tk, dtype, variant):
    H, D, bs = 2, 64, 16
    cache, layer, bt, old, new, kept, keep = compact_case(H, D, bs, dtype, seed=2, with_acc=variant != "no_acc")
    kept[1, 1, 4] = -1  # padding inside keep ends that row
    new_acc = torch.rand(kept.shape) if variant == "new_acc" else None
    exp_cache, exp_acc = expected_compaction(cache, layer, bt, old, new, kept, keep, new_acc)
    tk.compact_windows(layer.k_t, layer.v, layer.acc, bt, old, new, kept, keep, new_acc)
    assert torch.equal(cache, exp_cache)
    if exp_acc is not None:
        assert torch.equal(layer.acc, exp_acc)
