"""Property-based tests (hypothesis) of the batched kernels and the page arithmetic.

* C++ kernels (``ops.decode_attention_scores`` / ``window_scores`` / ``prefill_attention_scores`` /
  ``compact_windows`` with ``ops.impl_for("cpu") == "cpp"``) equal their torch
  references on generated shapes: page sizes 8/16/32, GQA 1-3, D 16/64, 1-4
  requests, window offsets, empty and full windows, zero weights, overlapping
  compaction windows in both directions, -1 padding in ``kept``. The torch
  references are in turn checked against slot-by-slot brute force.
* Every cache slot outside the windows is poisoned (NaN in keys, values and
  scores; unused block-table entries point at a NaN page), so a kernel that
  reads or writes outside its window shows up as a NaN or a changed bit.
* The Triton kernels on a few small float32 cases, under ``TRITON_INTERPRET=1``
  in a subprocess (the flag must precede triton's import; vLLM imports triton).
* ``paging`` / ``retained_count`` against a brute-force simulation of a layer
  fed chunk by chunk.

Example counts are bounded (``PROFILE``); the file runs in well under 90 s on 2 cores.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import expected_compaction, run_interpreted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_kvcompress import _ext, ops, paging
from vllm_kvcompress.policies import retained_count
from vllm_kvcompress.policies.schedule import UNBOUNDED, max_slots

torch.set_num_threads(min(2, torch.get_num_threads()))

_TRITON_CHILD = os.environ.get("KVC_PROPS_TRITON_CHILD") == "1"


def bounded(n: int):
    """Bounded example count, no deadline (shared CPU), no example database in the repo."""
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


OUT_TOL = dict(rtol=1e-5, atol=1e-5)
ACC_TOL = dict(rtol=1e-5, atol=2e-6, equal_nan=True)  # NaN = poisoned slot: must stay NaN
BF16_OUT_TOL = dict(rtol=1e-2, atol=2e-2)  # bf16 inputs/outputs (and, on AVX512-BF16, bf16 probabilities in PV)
BF16_ACC_TOL = dict(rtol=1e-4, atol=1e-5, equal_nan=True)  # float32 scores from another summation order
BRUTE_TOL = dict(rtol=1e-4, atol=1e-5, equal_nan=True)  # float32 reference vs float64 brute force
NAN = float("nan")


@pytest.fixture(scope="module")
def cpp():
    if _TRITON_CHILD:
        pytest.skip("triton interpreter subprocess")
    if not _ext.available():
        pytest.skip(f"C++ extension unavailable: {_ext.error()}")
    if ops.impl_for("cpu") != "cpp":
        pytest.skip(f"VLLM_KVCOMPRESS_OPS={ops.IMPL}: the batched ops do not dispatch to C++")


# ---------------------------------------------------------------- builders


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN-aware): compaction moves must be exact copies."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {4: torch.int32, 2: torch.int16, 1: torch.int8}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def pool(nb: int, H: int, D: int, bs: int, dtype, with_acc: bool = True):
    """A vLLM-layout layer cache ``[nb, H, 2*bs, D]``: block 0 (vLLM's null block) zeros,
    every other slot NaN until :func:`fill_window` writes it."""
    cache = torch.full((nb, H, 2 * bs, D), NAN, dtype=dtype)
    cache[0] = 0
    k, v = cache.chunk(2, dim=2)
    acc = None
    if with_acc:
        acc = torch.full((nb, H, bs), NAN)
        acc[0] = 0
    return cache, ops.paged_view(k, v, acc)


def fill_window(layer, blocks, n: int, gen, qmag: float = 1.0) -> None:
    """Random keys/values/scores in window slots ``0..n-1`` of the pages ``blocks``."""
    bs, H, D = layer.block_size, layer.v.shape[1], layer.v.shape[3]
    for pg, b in enumerate(blocks):
        m = min(bs, n - pg * bs)
        if m <= 0:
            break
        layer.k_t[b, :, :, :m] = (torch.randn(H, D, m, generator=gen) * qmag).to(layer.k_t.dtype)
        layer.v[b, :, :m] = torch.randn(H, m, D, generator=gen).to(layer.v.dtype)
        if layer.acc is not None:
            layer.acc[b, :, :m] = torch.rand(H, m, generator=gen) * 2


def pages(n: int, bs: int) -> int:
    return -(-n // bs)


def window_len(bs: int):
    """Window lengths around page boundaries, plus anything up to 4 pages (0 = empty)."""
    return st.one_of(st.sampled_from([0, 1, bs - 1, bs, bs + 1, 2 * bs, 3 * bs + 1]), st.integers(0, 4 * bs + 3))


def shifted_table(lens, bs, col_off, extra_cols, gen):
    """Shifted block-table rows (entry 0 = window's first page) as a column-sliced view of a
    wider int32 table. Window pages get distinct random blocks ``2..``; every other entry
    is block 1, a page that stays NaN. Returns (table view, per-request page lists, nb)."""
    need = [pages(n, bs) for n in lens]
    nb = 2 + sum(need) + 1
    perm = (torch.randperm(nb - 2, generator=gen) + 2).tolist()
    cols = max(need + [1]) + extra_cols
    big = torch.ones(len(lens), col_off + cols, dtype=torch.int32)
    rows, o = [], 0
    for i, k in enumerate(need):
        blocks = perm[o:o + k]
        o += k
        big[i, col_off:col_off + k] = torch.tensor(blocks, dtype=torch.int32)
        rows.append(blocks)
    return big[:, col_off:], rows, nb


def window_slots(blocks, n, bs):
    p = torch.arange(n)
    return torch.tensor(blocks, dtype=torch.long)[p // bs] if n else torch.zeros(0, dtype=torch.long), p % bs


def shapes(draw, small):
    """(bs, G, H, D); ``small``: interpreter-sized (Triton)."""
    return (draw(st.sampled_from([8, 16] if small else [8, 16, 32])), draw(st.sampled_from([1, 2, 3])),
            draw(st.integers(1, 2 if small else 3)), draw(st.sampled_from([16] if small else [16, 64])))
WEIGHT = st.sampled_from([0.0, 0.0, 0.25, 1.0, 3.0])


# ---------------------------------------------------------------- (a) decode attention + scores


@st.composite
def decode_specs(draw, small=False):
    bs, G, H, D = shapes(draw, small)
    R = draw(st.integers(1, 2 if small else 4))
    return dict(
        bs=bs, G=G, H=H, D=D,
        lens=draw(st.lists(window_len(bs), min_size=R, max_size=R)),
        weights=draw(st.lists(WEIGHT, min_size=R, max_size=R)),
        col_off=draw(st.integers(0, 2)), extra_cols=draw(st.integers(0, 2)),
        scale=draw(st.sampled_from([0.0, 0.1])) or D ** -0.5,  # logits std <= 3: float32-tolerable
        qmag=draw(st.sampled_from([0.0, 1.0, 3.0])),  # 0: uniform softmax, 3: peaky
        with_acc=draw(st.sampled_from([True, True, True, False])),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def decode_case(spec, dtype=torch.float32):
    gen = torch.Generator().manual_seed(spec["seed"])
    bs, G, H, D, lens = spec["bs"], spec["G"], spec["H"], spec["D"], spec["lens"]
    bt, rows, nb = shifted_table(lens, bs, spec["col_off"], spec["extra_cols"], gen)
    cache, layer = pool(nb, H, D, bs, dtype, spec["with_acc"])
    for blocks, n in zip(rows, lens):
        fill_window(layer, blocks, n, gen)
    q = (torch.randn(len(lens), G * H, D, generator=gen) * spec["qmag"]).to(dtype)
    w = torch.tensor(spec["weights"], dtype=torch.float32) if spec["with_acc"] else None
    return cache, layer, bt, rows, torch.tensor(lens, dtype=torch.int32), q, w


def brute_decode(spec, layer, rows, q, w):
    """Slot-by-slot decode attention + score update in float64."""
    bs, G, H = spec["bs"], spec["G"], spec["H"]
    out = torch.zeros(q.shape, dtype=torch.float64)
    acc = None if layer.acc is None else layer.acc.clone()
    for i, (blocks, L) in enumerate(zip(rows, spec["lens"])):
        if L == 0:
            continue
        blk, off = window_slots(blocks, L, bs)
        K = layer.k_t[blk, :, :, off].double()  # [L, H, D]
        V = layer.v[blk, :, off].double()
        for h in range(H):
            probs = torch.stack([torch.softmax(K[:, h] @ q[i, h * G + g].double() * spec["scale"], 0)
                                 for g in range(G)])  # [G, L]
            out[i, h * G:(h + 1) * G] = probs @ V[:, h]
            if acc is not None:
                old = layer.acc[blk, h, off].double()
                old[L - 1] = 0.0
                acc[blk, h, off] = (old + float(w[i]) * probs.mean(0)).float()
    return out, acc


def check_decode(spec, dtype, out_tol, acc_tol):
    """ops.decode_attention_scores vs its reference on ``decode_case(spec, dtype)``: output
    within ``out_tol`` and never NaN, the cache read only, scores within ``acc_tol``."""
    cache, layer, bt, rows, lens, q, w = decode_case(spec, dtype)
    acc0 = None if layer.acc is None else layer.acc.clone()
    acc_ref = None if acc0 is None else acc0.clone()
    out_ref = ops.decode_attention_scores_reference(q, layer.k_t, layer.v, bt, lens, spec["scale"], acc_ref, w)
    out = torch.full_like(q, NAN)
    cache0 = cache.clone()
    got = ops.decode_attention_scores(q, layer.k_t, layer.v, bt, lens, spec["scale"], layer.acc, w, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out.float(), out_ref.float(), **out_tol)
    assert not out.isnan().any()
    assert same_bits(cache, cache0)  # keys/values are read-only
    if acc0 is not None:
        torch.testing.assert_close(layer.acc, acc_ref, **acc_tol)
    return layer, rows, q, w, acc0, acc_ref, out_ref


@bounded(120)
@given(spec=decode_specs())
def test_decode_cpp_matches_reference(cpp, spec):
    layer, rows, q, w, acc0, acc_ref, out_ref = check_decode(spec, torch.float32, OUT_TOL, ACC_TOL)
    # the reference itself against slot-by-slot float64 math
    if acc0 is not None:
        layer.acc.copy_(acc0)
    out_bf, acc_bf = brute_decode(spec, layer, rows, q, w)
    torch.testing.assert_close(out_ref.double(), out_bf, rtol=1e-4, atol=1e-5)
    if acc0 is not None:
        torch.testing.assert_close(acc_ref, acc_bf, **BRUTE_TOL)


@bounded(80)
@given(spec=decode_specs())
def test_decode_bf16_matches_reference(cpp, spec):
    """bf16 pages: on a CPU with AVX512-BF16 the decode kernel reads 16-token key chunks and
    token-pair value rows straight from the pages into vdpbf16ps (the NaN-poisoned slots
    past each window share those chunks and must not leak), else the AVX2 float path;
    within bf16 rounding of the reference, scores within float32 rounding."""
    check_decode(spec, torch.bfloat16, BF16_OUT_TOL, BF16_ACC_TOL)


# ---------------------------------------------------------------- (b) prefill-chunk scores


@st.composite
def window_specs(draw, small=False):
    bs, G, H, D = shapes(draw, small)
    R = draw(st.integers(1, 2 if small else 4))
    reqs = []
    for _ in range(R):
        nr = draw(st.one_of(st.just(0), st.sampled_from([bs - 1, bs, 2 * bs + 1]), st.integers(0, 3 * bs)))
        n = draw(st.one_of(st.sampled_from([0, 1, bs]), st.integers(0, 2 * bs + 1)))
        # seq_len = nr + n, or shorter: queries past the window see keys up to seq_len - 1
        short = draw(st.integers(0, n)) if draw(st.integers(0, 4)) == 0 else 0
        w = draw(st.lists(WEIGHT, min_size=n, max_size=n))
        reqs.append((nr, n, nr + n - short, w))
    return dict(bs=bs, G=G, H=H, D=D, reqs=reqs, pad_tokens=draw(st.integers(0, 2)),
                col_off=draw(st.integers(0, 2)), extra_cols=draw(st.integers(0, 2)),
                scale=draw(st.sampled_from([0.0, 0.1])) or D ** -0.5,  # logits std <= 3: float32-tolerable
                qmag=draw(st.sampled_from([0.0, 1.0, 3.0])), seed=draw(st.integers(0, 2 ** 31 - 1)))


def window_case(spec, dtype=torch.float32):
    gen = torch.Generator().manual_seed(spec["seed"])
    bs, G, H, D, reqs = spec["bs"], spec["G"], spec["H"], spec["D"], spec["reqs"]
    lens = [L for _, _, L, _ in reqs]
    bt, rows, nb = shifted_table(lens, bs, spec["col_off"], spec["extra_cols"], gen)
    cache, layer = pool(nb, H, D, bs, dtype)
    for blocks, L in zip(rows, lens):
        fill_window(layer, blocks, L, gen)
    T = sum(n for _, n, _, _ in reqs)
    q = (torch.randn(T + spec["pad_tokens"], G * H, D, generator=gen) * spec["qmag"]).to(dtype)
    w = torch.tensor([x for *_, ws in reqs for x in ws] + [1.0] * spec["pad_tokens"], dtype=torch.float32)
    qs = torch.tensor([0] + [n for _, n, _, _ in reqs], dtype=torch.int32).cumsum(0).to(torch.int32)
    nr = torch.tensor([r[0] for r in reqs], dtype=torch.int32)
    return cache, layer, bt, rows, qs, torch.tensor(lens, dtype=torch.int32), nr, q, w


def brute_window(spec, layer, rows, qs, q):
    bs, G, H = spec["bs"], spec["G"], spec["H"]
    acc = layer.acc.clone()
    for i, ((nr, n, L, ws), blocks) in enumerate(zip(spec["reqs"], rows)):
        if L == 0:
            continue
        blk, off = window_slots(blocks, L, bs)
        K = layer.k_t[blk, :, :, off].double()
        for h in range(H):
            a = layer.acc[blk, h, off].double()
            a[nr:] = 0.0
            for k in range(n):
                if ws[k] <= 0:
                    continue
                vis = min(nr + k, L - 1) + 1
                qv = q[int(qs[i]) + k].double()
                pr = torch.stack([torch.softmax(K[:vis, h] @ qv[h * G + g] * spec["scale"], 0) for g in range(G)])
                a[:vis] += ws[k] * pr.mean(0)
            acc[blk, h, off] = a.float()
    return acc


@bounded(120)
@given(spec=window_specs())
def test_window_scores_cpp_matches_reference(cpp, spec):
    cache, layer, bt, rows, qs, lens, nr, q, w = window_case(spec)
    acc0 = layer.acc.clone()
    acc_ref = acc0.clone()
    ops.window_scores_reference(q, qs, layer.k_t, bt, lens, nr, w, spec["scale"], acc_ref,
                                max_chunk_elems=1 << 10)  # several query chunks
    cache0 = cache.clone()
    ops.window_scores(q, qs, layer.k_t, bt, lens, nr, w, spec["scale"], layer.acc)
    torch.testing.assert_close(layer.acc, acc_ref, **ACC_TOL)
    assert same_bits(cache, cache0)
    layer.acc.copy_(acc0)
    torch.testing.assert_close(acc_ref, brute_window(spec, layer, rows, qs, q), **BRUTE_TOL)


def brute_attention(spec, layer, rows, qs, q):
    """Causal attention of every query over its request's window, one query at a time (float64)."""
    bs, G, H, D = spec["bs"], spec["G"], spec["H"], spec["D"]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, ((nr, n, L, _), blocks) in enumerate(zip(spec["reqs"], rows)):
        if L == 0:
            continue
        blk, off = window_slots(blocks, L, bs)
        K = layer.k_t[blk, :, :, off].double()  # [L, H, D]
        V = layer.v[blk, :, off].double()
        for k in range(n):
            vis = min(nr + k, L - 1) + 1
            qv = q[int(qs[i]) + k].double()
            for hq in range(H * G):
                p = torch.softmax(K[:vis, hq // G] @ qv[hq] * spec["scale"], 0)
                out[int(qs[i]) + k, hq] = p @ V[:vis, hq // G]
    return out


def check_prefill(spec, scored, dtype, out_tol, acc_tol):
    """ops.prefill_attention_scores vs its reference on ``window_case(spec, dtype)``: every
    query's output within ``out_tol``, rows of padding tokens not written, the cache read
    only, and (scored) the scores within ``acc_tol`` or (unscored) untouched."""
    cache, layer, bt, rows, qs, lens, nr, q, w = window_case(spec, dtype)
    acc0 = layer.acc.clone()
    acc_ref = acc0.clone()
    T = int(qs[-1])
    ref = ops.prefill_attention_scores_reference(q, qs, layer.k_t, layer.v, bt, lens, nr, spec["scale"],
                                                 w if scored else None, acc_ref if scored else None)
    cache0 = cache.clone()
    out = torch.full_like(q, 7.0)
    ops.prefill_attention_scores(q, qs, layer.k_t, layer.v, bt, lens, nr, spec["scale"], w if scored else None,
                                 layer.acc if scored else None, out=out)
    torch.testing.assert_close(out[:T].float(), ref[:T].float(), **out_tol)
    assert bool((out[T:] == 7.0).all())
    assert same_bits(cache, cache0)
    if scored:
        torch.testing.assert_close(layer.acc, acc_ref, **acc_tol)
    else:
        assert same_bits(layer.acc, acc0)
    return layer, bt, rows, qs, lens, nr, q, w, acc0, acc_ref, ref


@bounded(120)
@given(spec=window_specs(), scored=st.booleans())
def test_prefill_attention_cpp_matches_reference(cpp, spec, scored):
    """ops.prefill_attention_scores: the output of every query (and, scored, the same
    score update as window_scores) vs the torch reference and a per-query brute force;
    the cache is read only, rows of padding tokens are not written."""
    # outputs ~1: float32 summation order costs ~1e-6
    layer, bt, rows, qs, lens, nr, q, w, acc0, acc_ref, ref = check_prefill(spec, scored, torch.float32, OUT_TOL,
                                                                            ACC_TOL)
    T = int(qs[-1])
    if scored:
        layer.acc.copy_(acc0)
        ops.window_scores_reference(q, qs, layer.k_t, bt, lens, nr, w, spec["scale"], acc0)
        torch.testing.assert_close(acc_ref, acc0, **ACC_TOL)
    torch.testing.assert_close(ref[:T].double(), brute_attention(spec, layer, rows, qs, q)[:T], **BRUTE_TOL)


@bounded(80)
@given(spec=window_specs(), scored=st.booleans())
def test_prefill_attention_bf16_matches_reference(cpp, spec, scored):
    """bf16 pages: on a CPU with AVX512-BF16 the kernel runs QK / PV on vdpbf16ps with
    per-item packed windows (zero past the window: the NaN-poisoned slots around it must not
    leak), else the AVX2 float path; either way within bf16 rounding of the reference, the
    scores within float32 rounding, the cache read only."""
    check_prefill(spec, scored, torch.bfloat16, BF16_OUT_TOL, BF16_ACC_TOL)


# ---------------------------------------------------------------- (c) compaction


@st.composite
def compact_specs(draw, small=False):
    bs, _, H, D = shapes(draw, small)
    R = draw(st.integers(1, 2 if small else 4))
    reqs = []
    for _ in range(R):
        count = draw(window_len(bs))
        keep = draw(st.one_of(st.just(count), st.just(0), st.integers(0, count)))
        old = draw(st.integers(0, 3))
        new = draw(st.integers(0, old + 2))  # overlapping windows, both directions
        # valid entries past keep (must not move) in some rows
        over = draw(st.integers(1, 2)) if draw(st.integers(0, 4)) == 0 else 0
        m = min(count, keep + over)
        heads = []
        for _h in range(H):
            # kept slots: ascending, distinct, < count; maybe fewer than keep (-1 padding ends the row)
            sel = sorted(draw(st.sets(st.integers(0, max(count - 1, 0)), min_size=m, max_size=m))) if m else []
            cut = draw(st.integers(0, min(keep, m))) if sel and draw(st.integers(0, 5)) == 0 else len(sel)
            heads.append(sel[:cut])
        keep_arg = keep + (draw(st.integers(0, 2)) if draw(st.integers(0, 5)) == 0 else 0)  # keep past Kmax
        reqs.append(dict(count=count, keep=keep_arg, old=old, new=new, kept=heads))
    garbage_after_pad = draw(st.booleans())  # valid-looking slots after a -1 must be ignored
    return dict(bs=bs, H=H, D=D, reqs=reqs, kmax_extra=draw(st.integers(0, 2)),
                dtype="float32" if small else draw(st.sampled_from(["float32", "bfloat16"])),
                acc=draw(st.sampled_from(["move", "new", "none"])), garbage_after_pad=garbage_after_pad,
                extra_cols=draw(st.integers(0, 2)), seed=draw(st.integers(0, 2 ** 31 - 1)))


def compact_case(spec):
    """Unshifted rows: old window pages and new window pages (their union) get distinct
    blocks; every other entry is 0 (freed, vLLM's null block) or block 1 (NaN page)."""
    gen = torch.Generator().manual_seed(spec["seed"])
    bs, H, D, reqs = spec["bs"], spec["H"], spec["D"], spec["reqs"]
    dtype = getattr(torch, spec["dtype"])
    kmax = max([max((len(k) for k in r["kept"]), default=0) for r in reqs] + [0]) + spec["kmax_extra"]
    used = []
    for r in reqs:
        n_new = min(r["keep"], kmax)
        used.append(sorted(set(range(r["old"], r["old"] + pages(r["count"], bs)))
                           | set(range(r["new"], r["new"] + pages(n_new, bs)))))
    cols = max(max(u, default=0) for u in used) + 1 + spec["extra_cols"]
    nb = 2 + sum(len(u) for u in used)
    perm = (torch.randperm(nb - 2, generator=gen) + 2).tolist()
    bt = torch.zeros(len(reqs), cols, dtype=torch.int32)
    o = 0
    for i, u in enumerate(used):
        bt[i, len(u) and max(u) + 1:] = 1  # entries past the windows: the NaN page
        for e in u:
            bt[i, e] = perm[o]
            o += 1
    cache, layer = pool(nb, H, D, bs, dtype, spec["acc"] != "none")
    for i, r in enumerate(reqs):
        blocks = [int(bt[i, r["old"] + p]) for p in range(pages(r["count"], bs))]
        fill_window(layer, blocks, r["count"], gen)
    kept = torch.full((len(reqs), H, kmax), -1, dtype=torch.long)
    for i, r in enumerate(reqs):
        for h, sel in enumerate(r["kept"]):
            kept[i, h, :len(sel)] = torch.tensor(sel, dtype=torch.long)
            if spec["garbage_after_pad"] and len(sel) + 1 < kmax and r["count"] > 0:
                kept[i, h, len(sel) + 1:] = 0  # after the -1: must not be moved
    keep = torch.tensor([r["keep"] for r in reqs], dtype=torch.long)
    old = torch.tensor([r["old"] for r in reqs], dtype=torch.long)
    new = torch.tensor([r["new"] for r in reqs], dtype=torch.long)
    new_acc = torch.rand(len(reqs), H, kmax, generator=gen) if spec["acc"] == "new" else None
    return cache, layer, bt, old, new, kept, keep, new_acc


def run_compact(fn, spec):
    cache, layer, bt, old, new, kept, keep, new_acc = compact_case(spec)
    exp_cache, exp_acc = expected_compaction(cache, layer, bt, old, new, kept, keep, new_acc)
    fn(layer.k_t, layer.v, layer.acc, bt, old, new, kept, keep, new_acc)
    return cache, layer.acc, exp_cache, exp_acc


@bounded(150)
@given(spec=compact_specs())
def test_compact_windows_cpp_matches_reference(cpp, spec):
    ref_cache, ref_acc, exp_cache, exp_acc = run_compact(ops.compact_windows_reference, spec)
    assert same_bits(ref_cache, exp_cache), "reference != slot-by-slot brute force (cache)"
    assert exp_acc is None or same_bits(ref_acc, exp_acc), "reference != brute force (scores)"
    got_cache, got_acc, _, _ = run_compact(ops.compact_windows, spec)  # same seed: same input
    assert same_bits(got_cache, ref_cache), "C++ compaction != reference (keys/values)"
    assert ref_acc is None or same_bits(got_acc, ref_acc), "C++ compaction != reference (scores)"


# ---------------------------------------------------------------- (d) Triton, interpreted


def test_triton_kernels_properties_interpreted():
    """Runs the ``test_triton_child_*`` tests below in a subprocess with TRITON_INTERPRET=1."""
    if _TRITON_CHILD:
        pytest.skip("inside the interpreter subprocess")
    run_interpreted(__file__, "triton_child", "KVC_PROPS_TRITON_CHILD", timeout=300)


@pytest.fixture(scope="module")
def tk():
    if not _TRITON_CHILD:
        pytest.skip("run under TRITON_INTERPRET=1 by test_triton_kernels_properties_interpreted")
    import vllm_kvcompress.triton_kernels.kernels as mod
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(mod._decode_partial_kernel, InterpretedFunction), "TRITON_INTERPRET=1 was not in effect"
    return mod


@bounded(10)
@given(spec=decode_specs(small=True), splits=st.sampled_from([None, 1, 2, 3, 64]))
def test_triton_child_decode(tk, spec, splits):
    """``splits`` forces the split-K count (None: the kernel's own choice); splits are whole
    64-slot tiles, so windows past 64 slots span several splits and later splits can be empty."""
    cache, layer, bt, rows, lens, q, w = decode_case(spec)
    acc_ref = None if layer.acc is None else layer.acc.clone()
    ref = ops.decode_attention_scores_reference(q, layer.k_t, layer.v, bt, lens, spec["scale"], acc_ref, w)
    out = tk.decode_attention_scores(q, layer.k_t, layer.v, bt, lens, spec["scale"], layer.acc, w,
                                     num_splits=splits)
    torch.testing.assert_close(out, ref, **OUT_TOL)
    if acc_ref is not None:
        torch.testing.assert_close(layer.acc, acc_ref, **ACC_TOL)


@bounded(15)
@given(spec=window_specs(small=True), splits=st.sampled_from([None, 1, 2, 3, 64]))
def test_triton_child_window(tk, spec, splits):
    """``splits`` forces the number of key splits (whole 64-slot tiles)."""
    cache, layer, bt, rows, qs, lens, nr, q, w = window_case(spec)
    acc_ref = layer.acc.clone()
    ops.window_scores_reference(q, qs, layer.k_t, bt, lens, nr, w, spec["scale"], acc_ref)
    tk.window_scores(q, qs, layer.k_t, bt, lens, nr, w, spec["scale"], layer.acc, num_splits=splits)
    torch.testing.assert_close(layer.acc, acc_ref, **ACC_TOL)


@bounded(15)
@given(spec=compact_specs(small=True))
def test_triton_child_compact(tk, spec):
    ref_cache, ref_acc, _, _ = run_compact(ops.compact_windows_reference, spec)
    got_cache, got_acc, _, _ = run_compact(tk.compact_windows, spec)
    assert same_bits(got_cache, ref_cache)
    assert ref_acc is None or same_bits(got_acc, ref_acc)


@settings(max_examples=300, deadline=None, database=None)
@given(programs=st.integers(1, 100_000), capacity=st.integers(0, 1 << 21), tile=st.sampled_from([16, 64, 128]),
       target=st.integers(1, 2000))
def test_splits_cover_the_window_once(programs, capacity, tile, target):
    """The split-K plan of the Triton decode kernel: whole tiles, every slot up to the
    capacity in exactly one split, no split wholly past the capacity, at least one split."""
    pytest.importorskip("triton")
    from vllm_kvcompress.triton_kernels.kernels import key_splits

    ns, per = key_splits(programs, capacity, tile=tile, target=target)
    tiles = max(1, -(-capacity // tile))
    assert ns >= 1 and per % tile == 0 and per > 0
    assert ns * per >= tiles * tile, "slots left uncovered"
    assert (ns - 1) * per < max(capacity, 1), "a split starts past the capacity"
    assert ns <= max(1, -(-target // programs)), "more programs than the target asks for"


# ---------------------------------------------------------------- (e) page arithmetic


@st.composite
def layer_runs(draw):
    bs = draw(st.sampled_from([1, 2, 3, 8, 16, 32]))
    budget = draw(st.one_of(st.integers(1, 200), st.just(UNBOUNDED)))
    interval = draw(st.one_of(st.just(1), st.integers(1, 64)))
    prompt = draw(st.integers(1, 600))
    # a chunked prefill followed by decode steps (1 token) and the odd multi-token step
    rest = draw(st.lists(st.one_of(st.just(1), st.integers(1, 80)), min_size=0, max_size=40))
    first = draw(st.lists(st.integers(1, 256), min_size=0, max_size=3))
    # decode_evict false: past the prompt the layer only grows
    grow_from = sum(first) + prompt if draw(st.booleans()) else None
    return dict(bs=bs, budget=budget, interval=interval, chunks=[c for c in first if c] + [prompt] + rest,
                grow_from=grow_from)


def _int(x):
    assert type(x) is int, f"{x!r} is {type(x).__name__}, not int"
    return x


@bounded(300)
@given(run=layer_runs())
def test_page_arithmetic_matches_brute_force_layer(run):
    """A layer holding a list of slots, fed chunk by chunk, compacting whenever it reaches
    ``budget + interval`` (token by token) vs retained_count / window_start / live_blocks;
    with ``grow_from`` (``decode_evict: false``) it stops compacting past the prompt."""
    bs, B, I, F = run["bs"], run["budget"], run["interval"], run["grow_from"]
    held = 0  # brute force: slots the layer holds
    C = 0  # computed tokens
    allocated = 0  # block-table entries vLLM has allocated (the row only grows)
    freed: set[int] = set()  # entries the scheduler has nulled
    S_prev = E_prev = 0
    for n in run["chunks"]:
        R = _int(retained_count(C, B, I, F))
        assert R == held, (C, R, held)
        E = _int(paging.evicted_count(C, B, I, F))
        S = _int(paging.window_start(C, B, I, bs, F))
        assert E == C - held and S == (C - held) // bs
        assert S >= S_prev and E >= E_prev, "the window start / evicted count went backwards"
        # this step: vLLM allocates the row up to C + n, the scheduler frees entries < S
        allocated = max(allocated, -(-(C + n) // bs))
        freed |= set(range(S))
        held_pages = set(range(allocated)) - freed
        live = _int(paging.live_blocks(C, n, B, I, bs, F))
        assert live == len(held_pages), (C, n, live, sorted(held_pages))
        # the window's R + n slots (retained, then the step's new tokens) fit in the row ...
        assert S * bs + R + n <= C + n
        window_pages = {S + p // bs for p in range(R + n)}
        assert window_pages <= held_pages
        assert len(held_pages) - len(window_pages) <= 1  # at most one page of slack
        if F is None or C + n <= F:  # past grow_from a layer grows without bound
            assert R + n <= max_slots(B, I, n)
        # the worker computes the step, then compacts (token by token: whenever the
        # layer reaches budget + interval it keeps budget)
        for t in range(n):
            held += 1
            if held == B + I and (F is None or C + t + 1 <= F):
                held = B
        C += n
        # ... and so does the compacted window of the new S, before anything is freed
        S_new = paging.window_start(C, B, I, bs, F)
        assert S_new * bs + held <= allocated * bs
        S_prev, E_prev = S, E
    assert retained_count(C, B, I, F) == held
    assert C - held == paging.evicted_count(C, B, I, F)


@bounded(200)
@given(C=st.integers(0, 10 ** 6), n=st.integers(0, 5000), B=st.integers(1, 5000), I=st.integers(1, 512),
       bs=st.sampled_from([1, 8, 16, 32, 128]))
def test_page_arithmetic_scalar_identities(C, n, B, I, bs):
    R = _int(retained_count(C, B, I))
    assert R == (C if C <= B else B + (C - B) % I)
    assert R <= max(C, 0) and (C <= B or B <= R < B + I)
    assert _int(paging.evicted_count(C, B, I)) == C - R
    S = _int(paging.window_start(C, B, I, bs))
    live = _int(paging.live_blocks(C, n, B, I, bs))
    assert live == -(-(C + n) // bs) - S
    assert live >= -(-(R + n) // bs)  # the window's pages are all held
    # one more token never moves the window start back
    assert paging.window_start(C + 1, B, I, bs) >= S
