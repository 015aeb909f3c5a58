"""Triton versions of the batched ops (CUDA path of ``vllm_kvcompress.ops``).

Same semantics as the C++ CPU kernels and the torch references in ``ops.py``
(see there). The page layout is taken from strides, so any paged layout works
as long as the caller passes views shaped ``k_t [nb, H, D, bs]``,
``v [nb, H, bs, D]``, ``acc [nb, H, bs]`` (e.g. vLLM's CUDA cache
``[nb, bs, H, D]`` -> ``k.permute(0, 2, 3, 1)``, ``v.permute(0, 2, 1, 3)``).
Block size and (padded) head size must be powers of two for ``tl.arange``;
the head size is padded to the next power of two with masks.

Verified only with ``TRITON_INTERPRET=1`` on small shapes in this release
(no GPU in CI): correctness, not speed. ``tl.dot`` runs on float32 operands
with ``input_precision="ieee"``: exact like the CPU kernels, and the only
form the interpreter computes correctly for bf16 caches (it multiplies bf16
bit patterns: triton-lang/triton#11584). A bf16 tensor-core dot is the
obvious GPU speed-up once it can be tested on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _p2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


# ---------------------------------------------------------------- (a) decode attention + scores


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr, w_ptr, acc_ptr, out_ptr,
                   sq0, sq1, sk0, sk1, skd, sks, sv0, sv1, svs, svd, sa0, sa1, sas, sbt0, so0, so1,
                   scale,
                   G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr,
                   HAS_ACC: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    L = tl.load(sl_ptr + i)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    s = tl.arange(0, BS)
    gm = g < G
    dm = d < D
    qh = h * G + g
    q = tl.load(q_ptr + i * sq0 + qh[:, None] * sq1 + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    q = q.to(tl.float32) * scale
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    o = tl.zeros([GP, DP], tl.float32)
    npg = tl.cdiv(L, BS)
    for pg in range(0, npg):
        blk = tl.load(bt_ptr + i * sbt0 + pg).to(tl.int64)
        slot = pg * BS + s
        sm = slot < L
        k = tl.load(k_ptr + blk * sk0 + h * sk1 + d[:, None] * skd + s[None, :] * sks,
                    mask=dm[:, None] & sm[None, :], other=0.0).to(tl.float32)  # [DP, BS]
        lg = tl.sum(q[:, :, None] * k[None, :, :], axis=1)  # [GP, BS]
        lg = tl.where(sm[None, :], lg, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(lg, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(lg - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vv = tl.load(v_ptr + blk * sv0 + h * sv1 + s[:, None] * svs + d[None, :] * svd,
                     mask=sm[:, None] & dm[None, :], other=0.0).to(tl.float32)  # [BS, DP]
        o = o * alpha[:, None] + tl.sum(p[:, :, None] * vv[None, :, :], axis=1)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    res = o / l_safe[:, None]
    tl.store(out_ptr + i * so0 + qh[:, None] * so1 + d[None, :], res.to(out_ptr.dtype.element_ty),
             mask=gm[:, None] & dm[None, :])
    if HAS_ACC:
        # second pass: normalised probabilities of this step, mean over the group, into the scores
        coef = tl.where(gm, (tl.load(w_ptr + i) / G) / l_safe, 0.0)
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        for pg in range(0, npg):
            blk = tl.load(bt_ptr + i * sbt0 + pg).to(tl.int64)
            slot = pg * BS + s
            sm = slot < L
            k = tl.load(k_ptr + blk * sk0 + h * sk1 + d[:, None] * skd + s[None, :] * sks,
                        mask=dm[:, None] & sm[None, :], other=0.0).to(tl.float32)
            lg = tl.sum(q[:, :, None] * k[None, :, :], axis=1)
            lg = tl.where(sm[None, :], lg, float("-inf"))
            p = tl.exp(lg - m_safe[:, None]) * coef[:, None]
            sc = tl.sum(p, axis=0)  # [BS]
            ap = acc_ptr + blk * sa0 + h * sa1 + s * sas
            a = tl.load(ap, mask=sm, other=0.0)
            a = tl.where(slot == L - 1, 0.0, a)
            tl.store(ap, a + sc, mask=sm)


def decode_attention_scores(query: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float, acc: torch.Tensor | None = None,
                            weights: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    R, Hq, D = query.shape
    H, bs = k_t.shape[1], k_t.shape[3]
    G = Hq // H
    if out is None:
        out = torch.empty_like(query)
    if R == 0:
        return out
    assert query.stride(2) == 1 and out.stride(2) == 1, "query/out rows must be contiguous"
    bt = block_table.to(torch.int32)
    sl = seq_lens.to(device=query.device, dtype=torch.int32).contiguous()
    has_acc = acc is not None
    if has_acc:
        w = weights.to(device=query.device, dtype=torch.float32).contiguous()
        a = acc
    else:
        w = torch.zeros(1, device=query.device, dtype=torch.float32)
        a = w.view(1, 1, 1)
    _decode_kernel[(R, H)](
        query, k_t, v, bt, sl, w, a, out,
        query.stride(0), query.stride(1), k_t.stride(0), k_t.stride(1), k_t.stride(2), k_t.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3), a.stride(0), a.stride(1), a.stride(2),
        bt.stride(0), out.stride(0), out.stride(1), float(scale),
        G=G, GP=_p2(G), D=D, DP=_p2(D), BS=bs, HAS_ACC=has_acc)
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
def _window_kernel(q_ptr, k_ptr, bt_ptr, sl_ptr, tok_ptr, slot_ptr, wv_ptr, ws_ptr, acc_ptr,
                   sq0, sq1, sk0, sk1, skd, sks, sa0, sa1, sas, sbt0, scale,
                   G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr,
                   BQ: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    qt = tl.program_id(2)
    w0 = tl.load(ws_ptr + i)
    w1 = tl.load(ws_ptr + i + 1)
    r0 = w0 + qt * BQ
    if r0 < w1:
        L = tl.load(sl_ptr + i)
        rr = tl.arange(0, BQ * GP)
        g = rr % GP
        widx = r0 + rr // GP
        rm = (widx < w1) & (g < G)
        tok = tl.load(tok_ptr + widx, mask=rm, other=0).to(tl.int64)
        qslot = tl.load(slot_ptr + widx, mask=rm, other=-1)
        wt = tl.load(wv_ptr + widx, mask=rm, other=0.0)
        d = tl.arange(0, DP)
        dm = d < D
        s = tl.arange(0, BS)
        q = tl.load(q_ptr + tok[:, None] * sq0 + (h * G + g)[:, None] * sq1 + d[None, :],
                    mask=rm[:, None] & dm[None, :], other=0.0).to(tl.float32)  # [RP, DP]
        kmax = tl.minimum(tl.max(qslot, axis=0) + 1, L)
        npg = tl.cdiv(kmax, BS)
        m_i = tl.full([BQ * GP], float("-inf"), tl.float32)
        l_i = tl.zeros([BQ * GP], tl.float32)
        for pg in range(0, npg):
            blk = tl.load(bt_ptr + i * sbt0 + pg).to(tl.int64)
            kslot = pg * BS + s
            k = tl.load(k_ptr + blk * sk0 + h * sk1 + d[:, None] * skd + s[None, :] * sks,
                        mask=dm[:, None] & (kslot < L)[None, :], other=0.0)  # [DP, BS]
            lg = tl.dot(q, k.to(tl.float32), input_precision="ieee") * scale
            ok = (kslot[None, :] <= qslot[:, None]) & (kslot < L)[None, :]
            lg = tl.where(ok, lg, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(lg, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(lg - m_safe[:, None]), axis=1)
            m_i = m_new
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        coef = tl.where(l_i > 0, (wt / G) / tl.where(l_i > 0, l_i, 1.0), 0.0)
        for pg in range(0, npg):
            blk = tl.load(bt_ptr + i * sbt0 + pg).to(tl.int64)
            kslot = pg * BS + s
            k = tl.load(k_ptr + blk * sk0 + h * sk1 + d[:, None] * skd + s[None, :] * sks,
                        mask=dm[:, None] & (kslot < L)[None, :], other=0.0)
            lg = tl.dot(q, k.to(tl.float32), input_precision="ieee") * scale
            ok = (kslot[None, :] <= qslot[:, None]) & (kslot < L)[None, :]
            p = tl.where(ok, tl.exp(lg - m_safe[:, None]), 0.0) * coef[:, None]
            sc = tl.sum(p, axis=0)
            tl.atomic_add(acc_ptr + blk * sa0 + h * sa1 + s * sas, sc, mask=kslot < kmax)


def window_scores(query: torch.Tensor, query_start: torch.Tensor, k_t: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, num_retained: torch.Tensor, weights: torch.Tensor, scale: float,
                  acc: torch.Tensor, block_rows: int = 64) -> None:
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
    grid = (R, H, triton.cdiv(int(cnt.max()), bq))

    def on_dev(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().to(dev, non_blocking=True)

    _window_kernel[grid](
        query, k_t, bt, sl, on_dev(sel), on_dev(slot), on_dev(w_all[sel]), on_dev(ws), acc,
        query.stride(0), query.stride(1), k_t.stride(0), k_t.stride(1), k_t.stride(2), k_t.stride(3),
        acc.stride(0), acc.stride(1), acc.stride(2), bt.stride(0), float(scale),
        G=G, GP=GP, D=D, DP=max(_p2(D), 16), BS=bs, BQ=bq)


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
