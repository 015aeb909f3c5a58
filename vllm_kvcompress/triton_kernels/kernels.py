"""Triton versions of the batched ops (CUDA path of ``vllm_kvcompress.ops``).

Same semantics as the C++ CPU kernels and the torch references in ``ops.py``
(see there). The page layout is taken from strides, so any paged layout works
as long as the caller passes views shaped ``k_t [nb, H, D, bs]``,
``v [nb, H, bs, D]``, ``acc [nb, H, bs]`` (e.g. vLLM's CUDA cache
``[nb, bs, H, D]`` -> ``k.permute(0, 2, 3, 1)``, ``v.permute(0, 2, 1, 3)``).
Block size and (padded) head size must be powers of two for ``tl.arange``;
the head size is padded to the next power of two with masks.

Checked two ways: under ``TRITON_INTERPRET=1`` in the test suite (float32: the
interpreter multiplies bf16 bit patterns, triton-lang/triton#11584, so the
16-bit dots below are switched off there), and compiled on an NVIDIA H200 by
``benchmarks/gpu_check.py`` (docs/results/gpu_check/). Dots take float32
operands with ``input_precision="ieee"`` for float32 caches; for 16-bit caches
on a GPU the logits use 16-bit (window) or tf32 (decode) tensor-core dots,
whose products of bf16/fp16 values are exact in float32, so scores match the
float32 references within the score tolerance.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _p2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


# ---------------------------------------------------------------- (a) decode attention + scores
#
# Split-K ("flash decoding"): the window of each (request, KV head) is cut into
# NS splits of SPLIT slots, one program each, so a single long request still
# fills the GPU. Pass 1 (``_decode_partial_kernel``) walks its split in tiles
# of TILE slots (any page size: the page of every slot is looked up) with two
# tensor-core dots per tile (all G query heads of the KV head at once) and
# writes its running max, sum and unnormalised output. Pass 2
# (``_decode_combine_kernel``) merges the NS partials per query head into the
# output (split 0's program) and, with scores, re-reads its split's keys to add
# the normalised probabilities of the step (each slot has one owner: no
# atomics). The dots take float32 operands: "tf32" for 16-bit caches on a GPU
# (bf16/fp16 keys and queries are exact in tf32, so the logits are the float32
# ones; only the probabilities are rounded to tf32 for P @ V), "ieee" for
# float32 caches and under the interpreter.

DECODE_TILE = 64  # slots per inner iteration
DECODE_TARGET_PROGRAMS = 4 * 132  # programs to fill an H100/H200 (132 SMs) a few times (window kernel too)


# Dot precision (constexpr PREC): 0 = float32 operands, "ieee"; 1 = float32 operands,
# "tf32"; 2 = the cache's 16-bit operands as they are (float32 accumulation).
@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    if PREC == 2:
        return tl.dot(a, b)
    elif PREC == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _tile_logits(q, k_ptr, bt_ptr, i, h, t0, hi, sk0, sk1, skd, sks, sbt0, scale, d, dm, t,
                 BS: tl.constexpr, PREC: tl.constexpr):
    """Scaled logits [rows, TILE] of the query rows ``q`` against window slots
    ``t0 + t`` of request ``i``, KV head ``h`` (slots >= ``hi``: -inf), looking the
    page of every slot up in the block table; also the slots, their in-range mask,
    pages and offsets."""
    kslot = t0 + t
    km = kslot < hi
    blk = tl.load(bt_ptr + i * sbt0 + kslot // BS, mask=km, other=0).to(tl.int64)
    off = kslot % BS
    k = tl.load(k_ptr + blk[None, :] * sk0 + h * sk1 + d[:, None] * skd + off[None, :] * sks,
                mask=dm[:, None] & km[None, :], other=0.0)  # [DP, TILE]
    lg = _dot(q, k, PREC)
    return tl.where(km[None, :], lg * scale, float("-inf")), kslot, km, blk, off


@triton.jit
def _decode_partial_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr, m_ptr, l_ptr, o_ptr,
                           sq0, sq1, sk0, sk1, skd, sks, sv0, sv1, svs, svd, sbt0,
                           Hq, NS, SPLIT, scale,
                           G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                           BS: tl.constexpr, TILE: tl.constexpr, PREC: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    L = tl.load(sl_ptr + i)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    t = tl.arange(0, TILE)
    gm = g < G
    dm = d < D
    qh = h * G + g
    q = tl.load(q_ptr + i * sq0 + qh[:, None] * sq1 + d[None, :], mask=gm[:, None] & dm[None, :],
                other=0.0).to(tl.float32)  # [GP, DP]
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    o = tl.zeros([GP, DP], tl.float32)
    lo = sp * SPLIT
    hi = tl.minimum(lo + SPLIT, L)
    for t0 in range(lo, hi, TILE):
        lg, slot, sm, blk, off = _tile_logits(q, k_ptr, bt_ptr, i, h, t0, hi, sk0, sk1, skd, sks, sbt0, scale,
                                              d, dm, t, BS, PREC)  # [GP, TILE]
        m_new = tl.maximum(m_i, tl.max(lg, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(lg - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vv = tl.load(v_ptr + blk[:, None] * sv0 + h * sv1 + off[:, None] * svs + d[None, :] * svd,
                     mask=sm[:, None] & dm[None, :], other=0.0)  # [TILE, DP]
        o = o * alpha[:, None] + _dot(p, vv, PREC)
        m_i = m_new
    row = (i * Hq + qh) * NS + sp  # partial row of (request, query head, split)
    tl.store(m_ptr + row, m_i, mask=gm)
    tl.store(l_ptr + row, l_i, mask=gm)
    tl.store(o_ptr + row[:, None] * DP + d[None, :], o, mask=gm[:, None])


@triton.jit
def _decode_combine_kernel(q_ptr, k_ptr, bt_ptr, sl_ptr, w_ptr, acc_ptr, out_ptr, m_ptr, l_ptr, o_ptr,
                           sq0, sq1, sk0, sk1, skd, sks, sa0, sa1, sas, sbt0, so0, so1,
                           Hq, NS, SPLIT, scale,
                           G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                           BS: tl.constexpr, TILE: tl.constexpr, NSP: tl.constexpr,
                           HAS_ACC: tl.constexpr, PREC: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    ns = tl.arange(0, NSP)
    gm = g < G
    dm = d < D
    qh = h * G + g
    # the partials of this KV head's query heads: [GP, NSP]
    row = (i * Hq + qh)[:, None] * NS + ns[None, :]
    pm = gm[:, None] & (ns < NS)[None, :]
    m_s = tl.load(m_ptr + row, mask=pm, other=float("-inf"))
    l_s = tl.load(l_ptr + row, mask=pm, other=0.0)
    m = tl.max(m_s, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    f = tl.exp(m_s - m_safe[:, None])  # [GP, NSP]; empty splits -> 0
    l_tot = tl.sum(l_s * f, axis=1)
    l_safe = tl.where(l_tot > 0, l_tot, 1.0)
    if sp == 0:
        res = tl.zeros([GP, DP], tl.float32)
        for s in range(0, NS):
            fs = tl.sum(tl.where(ns[None, :] == s, f, 0.0), axis=1)  # [GP]
            os_ = tl.load(o_ptr + ((i * Hq + qh) * NS + s)[:, None] * DP + d[None, :], mask=gm[:, None],
                          other=0.0)
            res += os_ * fs[:, None]
        res = res / l_safe[:, None]
        tl.store(out_ptr + i * so0 + qh[:, None] * so1 + d[None, :], res.to(out_ptr.dtype.element_ty),
                 mask=gm[:, None] & dm[None, :])
    if HAS_ACC:
        # this split's slots: normalised probabilities of the step, mean over the group, into the scores
        L = tl.load(sl_ptr + i)
        t = tl.arange(0, TILE)
        q = tl.load(q_ptr + i * sq0 + qh[:, None] * sq1 + d[None, :], mask=gm[:, None] & dm[None, :],
                    other=0.0).to(tl.float32)
        coef = tl.where(gm, (tl.load(w_ptr + i) / G) / l_safe, 0.0)
        lo = sp * SPLIT
        hi = tl.minimum(lo + SPLIT, L)
        for t0 in range(lo, hi, TILE):
            lg, slot, sm, blk, off = _tile_logits(q, k_ptr, bt_ptr, i, h, t0, hi, sk0, sk1, skd, sks, sbt0, scale,
                                                  d, dm, t, BS, PREC)
            p = tl.exp(lg - m_safe[:, None]) * coef[:, None]
            sc = tl.sum(p, axis=0)  # [TILE]
            ap = acc_ptr + blk * sa0 + h * sa1 + off * sas
            a = tl.load(ap, mask=sm, other=0.0)
            a = tl.where(slot == L - 1, 0.0, a)
            tl.store(ap, a + sc, mask=sm)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def key_splits(num_programs: int, capacity: int, tile: int = DECODE_TILE,
                  target: int = DECODE_TARGET_PROGRAMS, force: int | None = None) -> tuple[int, int]:
    """Split-K plan of the decode and window kernels: (number of splits, slots per
    split) for ``num_programs`` programs whose windows
    hold at most ``capacity`` slots (the block table's width x page size: known on the
    host, so no device sync, and a captured CUDA graph stays valid when the lengths
    change). Splits are whole tiles; ``force`` asks for a split count (tests)."""
    tiles = max(1, triton.cdiv(max(int(capacity), 1), tile))
    want = triton.cdiv(target, max(int(num_programs), 1)) if force is None else int(force)
    ns = max(1, min(tiles, want))
    per = triton.cdiv(tiles, ns)
    return triton.cdiv(tiles, per), per * tile


def decode_attention_scores(query: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float, acc: torch.Tensor | None = None,
                            weights: torch.Tensor | None = None, out: torch.Tensor | None = None,
                            num_splits: int | None = None) -> torch.Tensor:
    R, Hq, D = query.shape
    H, bs = k_t.shape[1], k_t.shape[3]
    G = Hq // H
    if out is None:
        out = torch.empty_like(query)
    if R == 0:
        return out
    assert query.stride(2) == 1 and out.stride(2) == 1, "query/out rows must be contiguous"
    dev = query.device
    bt = block_table.to(torch.int32)
    sl = seq_lens.to(device=dev, dtype=torch.int32).contiguous()
    ns, split = key_splits(R * H, bt.shape[1] * bs, force=num_splits)
    GP, DP = max(_p2(G), 16), max(_p2(D), 16)  # tl.dot needs 16 rows / a 16-wide inner dim
    prec = 1 if k_t.dtype != torch.float32 and not _interpreting() else 0  # tf32 / ieee (P @ V too)
    m = torch.empty(R * Hq * ns, device=dev, dtype=torch.float32)
    lsum = torch.empty_like(m)
    o = torch.empty(R * Hq * ns, DP, device=dev, dtype=torch.float32)
    _decode_partial_kernel[(R, H, ns)](
        query, k_t, v, bt, sl, m, lsum, o,
        query.stride(0), query.stride(1), k_t.stride(0), k_t.stride(1), k_t.stride(2), k_t.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3), bt.stride(0),
        Hq, ns, split, float(scale),
        G=G, GP=GP, D=D, DP=DP, BS=bs, TILE=DECODE_TILE, PREC=prec)
    has_acc = acc is not None
    if has_acc:
        w = weights.to(device=dev, dtype=torch.float32).contiguous()
        a = acc
    else:
        w = torch.zeros(1, device=dev, dtype=torch.float32)
        a = w.view(1, 1, 1)
    _decode_combine_kernel[(R, H, ns if has_acc else 1)](
        query, k_t, bt, sl, w, a, out, m, lsum, o,
        query.stride(0), query.stride(1), k_t.stride(0), k_t.stride(1), k_t.stride(2), k_t.stride(3),
        a.stride(0), a.stride(1), a.stride(2), bt.stride(0), out.stride(0), out.stride(1),
        Hq, ns, split, float(scale),
        G=G, GP=GP, D=D, DP=DP, BS=bs, TILE=DECODE_TILE, NSP=_p2(ns), HAS_ACC=has_acc, PREC=prec)
    return out


# ---------------------------------------------------------------- (b) prefill-chunk scores


@triton.jit
def _zero_new_kernel(acc_ptr, bt_ptr, sl_ptr, nr_ptr, sa0, sa1, sas, sbt0, BS: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    L = tl.load(sl_ptr + i)
    nr = tl.load(nr_ptr + i)
    s = tl.arange(0, BS)
    for pg in range(nr // BS, tl.cdiv(L, BS)):
        blk = tl.load(bt_ptr + i * sbt0 + pg).to(tl.int64)
        slot = pg * BS + s
        tl.store(acc_ptr + blk * sa0 + h * sa1 + s * sas, tl.zeros([BS], tl.float32),
                 mask=(slot >= nr) & (slot < L))


@triton.jit
def _window_kernel(q_ptr, k_ptr, bt_ptr, sl_ptr, tok_ptr, slot_ptr, wv_ptr, ws_ptr, acc_ptr, m_ptr, l_ptr,
                   sq0, sq1, sk0, sk1, skd, sks, sa0, sa1, sas, sbt0, scale, H, NSK, SPLIT,
                   G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr,
                   BQ: tl.constexpr, TILE: tl.constexpr, NSKP: tl.constexpr, SCORES: tl.constexpr,
                   PREC: tl.constexpr):
    # One program: BQ weighted queries (x GP query heads) of one request and KV head,
    # against one split of SPLIT window slots (up to the last query's slot), in tiles
    # of TILE slots (the page of every slot is looked up: any page size works).
    # SCORES=False: the rows' max and sum over the split, into the partials.
    # SCORES=True: the partials of all splits give each row's softmax statistics; the
    # normalised probabilities x weight / G, summed over the rows, go into the scores
    # (atomics: the query tiles of one request share slots).
    i = tl.program_id(0)
    h = tl.program_id(1)
    qt = tl.program_id(2) // NSK
    ks = tl.program_id(2) % NSK
    w0 = tl.load(ws_ptr + i)
    w1 = tl.load(ws_ptr + i + 1)
    r0 = w0 + qt * BQ
    if r0 < w1:
        L = tl.load(sl_ptr + i)
        rr = tl.arange(0, BQ * GP)
        g = rr % GP
        widx = r0 + rr // GP
        live = widx < w1
        rm = live & (g < G)
        tok = tl.load(tok_ptr + widx, mask=rm, other=0).to(tl.int64)
        qslot = tl.load(slot_ptr + widx, mask=rm, other=-1)
        d = tl.arange(0, DP)
        dm = d < D
        t = tl.arange(0, TILE)
        q = tl.load(q_ptr + tok[:, None] * sq0 + (h * G + g)[:, None] * sq1 + d[None, :],
                    mask=rm[:, None] & dm[None, :], other=0.0)  # [RP, DP]
        kmax = tl.minimum(tl.max(qslot, axis=0) + 1, L)
        lo = ks * SPLIT
        hi = tl.minimum(lo + SPLIT, kmax)
        prow = ((widx * H + h) * GP + g) * NSK  # partials of (weighted query, KV head, group row)
        if not SCORES:
            m_i = tl.full([BQ * GP], float("-inf"), tl.float32)
            l_i = tl.zeros([BQ * GP], tl.float32)
            for t0 in range(lo, hi, TILE):
                lg, kslot, km, blk, off = _tile_logits(q, k_ptr, bt_ptr, i, h, t0, hi, sk0, sk1, skd, sks,
                                                       sbt0, scale, d, dm, t, BS, PREC)
                ok = (kslot[None, :] <= qslot[:, None]) & km[None, :]  # causal, per query row
                lg = tl.where(ok, lg, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(lg, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(lg - m_safe[:, None]), axis=1)
                m_i = m_new
            tl.store(m_ptr + prow + ks, m_i, mask=live)
            tl.store(l_ptr + prow + ks, l_i, mask=live)
        else:
            ns = tl.arange(0, NSKP)
            pm = live[:, None] & (ns < NSK)[None, :]
            m_s = tl.load(m_ptr + prow[:, None] + ns[None, :], mask=pm, other=float("-inf"))
            l_s = tl.load(l_ptr + prow[:, None] + ns[None, :], mask=pm, other=0.0)
            m = tl.max(m_s, axis=1)
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            l_i = tl.sum(l_s * tl.exp(m_s - m_safe[:, None]), axis=1)
            wt = tl.load(wv_ptr + widx, mask=rm, other=0.0)
            coef = tl.where(l_i > 0, (wt / G) / tl.where(l_i > 0, l_i, 1.0), 0.0)
            for t0 in range(lo, hi, TILE):
                lg, kslot, km, blk, off = _tile_logits(q, k_ptr, bt_ptr, i, h, t0, hi, sk0, sk1, skd, sks,
                                                       sbt0, scale, d, dm, t, BS, PREC)
                ok = (kslot[None, :] <= qslot[:, None]) & km[None, :]  # causal, per query row
                lg = tl.where(ok, lg, float("-inf"))
                p = tl.where(ok, tl.exp(lg - m_safe[:, None]), 0.0) * coef[:, None]
                sc = tl.sum(p, axis=0)
                tl.atomic_add(acc_ptr + blk * sa0 + h * sa1 + off * sas, sc, mask=km)


WINDOW_TILE = 64  # key slots per inner iteration of the window kernel


def window_scores(query: torch.Tensor, query_start: torch.Tensor, k_t: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, num_retained: torch.Tensor, weights: torch.Tensor, scale: float,
                  acc: torch.Tensor, block_rows: int = 64, num_splits: int | None = None) -> None:
    dev = query.device
    R = seq_lens.shape[0]
    if R == 0:
        return
    Hq, D = query.shape[1], query.shape[2]
    H, bs = k_t.shape[1], k_t.shape[3]
    G = Hq // H
    assert query.stride(2) == 1, "query rows must be contiguous"
    bt = block_table.to(torch.int32)
    sl = seq_lens.to(device=dev, dtype=torch.int32).contiguous()
    nr = num_retained.to(device=dev, dtype=torch.int32).contiguous()
    _zero_new_kernel[(R, H)](acc, bt, sl, nr, acc.stride(0), acc.stride(1), acc.stride(2), bt.stride(0), BS=bs)
    # The weighted queries, grouped by request (token index, window slot, weight).
    # Built where query_start / num_retained / weights live: given on the host (as
    # the backend does) this needs no device-to-host synchronisation; a request with
    # queries always has seq_len >= 1, so only the weights select.
    hdev = query_start.device
    qs = query_start.to(dtype=torch.long)
    n_tok = int(qs[-1])
    tok_req = torch.repeat_interleave(torch.arange(R, device=hdev), qs.diff())
    w_all = weights[:n_tok].to(device=hdev, dtype=torch.float32)
    sel = torch.nonzero(w_all > 0).flatten()
    if sel.numel() == 0:
        return
    req = tok_req[sel]
    slot = (num_retained.to(device=hdev, dtype=torch.long)[req] + (sel - qs[req])).to(torch.int32)
    cnt = torch.bincount(req, minlength=R)
    ws = torch.zeros(R + 1, device=hdev, dtype=torch.int32)
    ws[1:] = torch.cumsum(cnt, 0)
    GP = _p2(G)
    bq = max(1, _p2(block_rows) // GP)  # BQ * GP query-head rows per program (>= 16 for tl.dot)
    qtiles = triton.cdiv(int(cnt.max()), bq)
    nsk, split = key_splits(R * H * qtiles, bt.shape[1] * bs, tile=WINDOW_TILE, force=num_splits)
    n_sel = int(sel.numel())
    m = torch.empty(n_sel * H * GP * nsk, device=dev, dtype=torch.float32)
    lsum = torch.empty_like(m)
    native = k_t.dtype in (torch.bfloat16, torch.float16) and query.dtype == k_t.dtype and not _interpreting()

    def on_dev(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().to(dev, non_blocking=True)

    args = (query, k_t, bt, sl, on_dev(sel), on_dev(slot), on_dev(w_all[sel]), on_dev(ws), acc, m, lsum,
            query.stride(0), query.stride(1), k_t.stride(0), k_t.stride(1), k_t.stride(2), k_t.stride(3),
            acc.stride(0), acc.stride(1), acc.stride(2), bt.stride(0), float(scale), H, nsk, split)
    for scores in (False, True):  # statistics of every split first, then the probabilities
        _window_kernel[(R, H, qtiles * nsk)](
            *args, G=G, GP=GP, D=D, DP=max(_p2(D), 16), BS=bs, BQ=bq, TILE=WINDOW_TILE, NSKP=_p2(nsk),
            SCORES=scores, PREC=2 if native else 0)


# ---------------------------------------------------------------- (c) compaction (gather, then scatter)


@triton.jit
def _compact_kernel(k_ptr, v_ptr, acc_ptr, bt_ptr, os_ptr, ns_ptr, kept_ptr, n_ptr, nacc_ptr,
                    kbuf_ptr, vbuf_ptr, abuf_ptr,
                    sk0, sk1, skd, sks, sv0, sv1, svs, svd, sa0, sa1, sas, sbt0, skr, skh, snr, snh,
                    H, KMAX,
                    D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
                    HAS_ACC: tl.constexpr, HAS_NEW: tl.constexpr, SCATTER: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    kt = tl.program_id(2)
    n = tl.load(n_ptr + i * H + h)
    k = kt * BK + tl.arange(0, BK)
    km = k < n
    d = tl.arange(0, DP)
    dm = d < D
    m2 = km[:, None] & dm[None, :]
    buf = ((i * H + h) * KMAX + k).to(tl.int64)  # scratch row of (i, h, k)
    if SCATTER:
        e = tl.load(ns_ptr + i) + k // BS
        blk = tl.load(bt_ptr + i * sbt0 + e, mask=km, other=0).to(tl.int64)
        off = k % BS
        kk = tl.load(kbuf_ptr + buf[:, None] * D + d[None, :], mask=m2)
        tl.store(k_ptr + blk[:, None] * sk0 + h * sk1 + d[None, :] * skd + off[:, None] * sks, kk, mask=m2)
        vv = tl.load(vbuf_ptr + buf[:, None] * D + d[None, :], mask=m2)
        tl.store(v_ptr + blk[:, None] * sv0 + h * sv1 + off[:, None] * svs + d[None, :] * svd, vv, mask=m2)
        if HAS_ACC:
            if HAS_NEW:
                a = tl.load(nacc_ptr + i * snr + h * snh + k, mask=km, other=0.0)
            else:
                a = tl.load(abuf_ptr + buf, mask=km, other=0.0)
            tl.store(acc_ptr + blk * sa0 + h * sa1 + off * sas, a, mask=km)
    else:
        src = tl.load(kept_ptr + i * skr + h * skh + k, mask=km, other=0)
        e = tl.load(os_ptr + i) + src // BS
        blk = tl.load(bt_ptr + i * sbt0 + e, mask=km, other=0).to(tl.int64)
        off = src % BS
        kk = tl.load(k_ptr + blk[:, None] * sk0 + h * sk1 + d[None, :] * skd + off[:, None] * sks, mask=m2)
        tl.store(kbuf_ptr + buf[:, None] * D + d[None, :], kk, mask=m2)
        vv = tl.load(v_ptr + blk[:, None] * sv0 + h * sv1 + off[:, None] * svs + d[None, :] * svd, mask=m2)
        tl.store(vbuf_ptr + buf[:, None] * D + d[None, :], vv, mask=m2)
        if HAS_ACC:
            if not HAS_NEW:
                a = tl.load(acc_ptr + blk * sa0 + h * sa1 + off * sas, mask=km, other=0.0)
                tl.store(abuf_ptr + buf, a, mask=km)


def compact_windows(k_t: torch.Tensor, v: torch.Tensor, acc: torch.Tensor | None, block_table: torch.Tensor,
                    old_start: torch.Tensor, new_start: torch.Tensor, kept: torch.Tensor, keep: torch.Tensor,
                    new_acc: torch.Tensor | None = None, block_k: int = 64) -> None:
    R, H, kmax = kept.shape
    if R == 0 or kmax == 0:
        return
    dev = k_t.device
    D, bs = k_t.shape[2], k_t.shape[3]
    kept = kept.to(device=dev, dtype=torch.long)
    # per (request, head): leading valid entries (< keep, a negative entry ends the row)
    ok = (torch.arange(kmax, device=dev)[None, None, :] < keep.to(device=dev, dtype=torch.long)[:, None, None])
    ok = ok & (kept >= 0)
    n = ok.to(torch.int32).cumprod(-1).sum(-1).to(torch.int32).contiguous()  # [R, H]
    bt = block_table.to(torch.int32)
    os_ = old_start.to(device=dev, dtype=torch.long).contiguous()
    ns_ = new_start.to(device=dev, dtype=torch.long).contiguous()
    kbuf = torch.empty(R * H * kmax, D, device=dev, dtype=k_t.dtype)
    vbuf = torch.empty(R * H * kmax, D, device=dev, dtype=v.dtype)
    has_acc = acc is not None
    has_new = has_acc and new_acc is not None
    abuf = torch.empty(R * H * kmax if has_acc else 1, device=dev, dtype=torch.float32)
    a = acc if has_acc else abuf[:1].view(1, 1, 1)
    na = new_acc.to(device=dev, dtype=torch.float32) if has_new else abuf[:1].view(1, 1, 1)
    bk = min(_p2(block_k), _p2(kmax))
    grid = (R, H, triton.cdiv(kmax, bk))
    for scatter in (False, True):  # the launch boundary orders every gather before any write
        _compact_kernel[grid](
            k_t, v, a, bt, os_, ns_, kept, n, na, kbuf, vbuf, abuf,
            k_t.stride(0), k_t.stride(1), k_t.stride(2), k_t.stride(3),
            v.stride(0), v.stride(1), v.stride(2), v.stride(3),
            a.stride(0), a.stride(1), a.stride(2), bt.stride(0), kept.stride(0), kept.stride(1),
            na.stride(0), na.stride(1), H, kmax,
            D=D, DP=_p2(D), BS=bs, BK=bk, HAS_ACC=has_acc, HAS_NEW=has_new, SCATTER=scatter)
