"""Compression ops on the paged KV cache: dispatch + torch references.

The backend calls two ops per compressed layer and step:

* :func:`accumulate_scores` — attention probabilities of this step's weighted
  queries over each request's retained + new keys, folded into the float32
  score cache (the H2O accumulator; the observation-window scores of
  PyramidInfer / SnapKV);
* :func:`compact` — per request and KV head, keep the policy's choice of
  ``R'`` slots and move their keys, values and scores to the front of the
  request's new window (``vllm_kvcompress.paging``).

Cache layout (vLLM CPU_ATTN "vec" ISA, checked at start-up by
:func:`check_layout`): the layer cache ``[num_blocks, H, 2*block_size, D]`` is
split into key and value halves; a (block, head) key page is stored transposed,
``[D, block_size]``; a value page is ``[block_size, D]``. Scores are
``[num_blocks, H, block_size]`` float32.

Batched ops (one call per layer and step for all requests; padded torch
references beside the kernels):

* :func:`decode_attention_scores` — paged decode attention over each request's
  window fused with the score update of the step (one query per request);
* :func:`window_scores` — the batched :func:`accumulate_scores` for prefill
  chunks (weighted causal queries against the window);
* :func:`compact_windows` — the batched move part of :func:`compact`
  (selection stays in torch: :func:`compact_requests` = batched
  ``compress_step`` + :func:`compact_windows`).

Dispatch (``VLLM_KVCOMPRESS_OPS``): ``auto`` (default) uses the C++ kernels on
CPU tensors when the extension builds/loads (``vllm_kvcompress._ext``), the
Triton kernels on CUDA tensors when triton is importable, else the torch
reference; ``reference`` forces the torch reference; ``cpp`` / ``triton``
require that implementation (error if it is unavailable).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from vllm_kvcompress.policies import BasePolicy, compress_step

IMPL = os.environ.get("VLLM_KVCOMPRESS_OPS", "auto").strip().lower() or "auto"
_IMPLS = ("auto", "reference", "cpp", "triton")


@dataclass
class PagedLayer:
    """Views of one layer's paged cache in the layout above."""

    k_t: torch.Tensor  # [nb, H, D, bs] (transposed key pages)
    v: torch.Tensor  # [nb, H, bs, D]
    acc: torch.Tensor | None  # [nb, H, bs] float32

    @property
    def block_size(self) -> int:
        return self.v.shape[2]

    def keys(self, blk: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        """[len, H, D] keys at (block, offset) slots."""
        return self.k_t.permute(0, 3, 1, 2)[blk, off]

    def values(self, blk: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        return self.v.permute(0, 2, 1, 3)[blk, off]

    def scores(self, blk: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        """[H, len] scores."""
        return self.acc.permute(0, 2, 1)[blk, off].T

    def put(self, blk, off, k=None, v=None, acc=None) -> None:
        if k is not None:
            self.k_t.permute(0, 3, 1, 2)[blk, off] = k
        if v is not None:
            self.v.permute(0, 2, 1, 3)[blk, off] = v
        if acc is not None:
            self.acc.permute(0, 2, 1)[blk, off] = acc.T


def paged_view(key_cache: torch.Tensor, value_cache: torch.Tensor, acc: torch.Tensor | None) -> PagedLayer:
    nb, h, bs, d = value_cache.shape
    return PagedLayer(k_t=key_cache.view(nb, h, d, bs), v=value_cache, acc=acc)


def window_slots(block_row: torch.Tensor, start_entry: int, count: int, block_size: int):
    """(block ids, offsets) of window slots ``0..count-1`` of a block-table row."""
    p = torch.arange(count, dtype=torch.long)
    return block_row[start_entry + p // block_size].long(), p % block_size


def accumulate_scores(layer: PagedLayer, policy: BasePolicy, block_row: torch.Tensor, start_entry: int,
                      num_retained: int, query: torch.Tensor, weights: torch.Tensor, scale: float) -> None:
    """Fold one request's step into its score window (torch reference).

    ``query`` [n, H_q, D] are the step's queries (the new tokens sit at window
    slots ``num_retained .. num_retained+n-1``, causal); ``weights`` [n].
    New slots start at score 0.
    """
    n = query.shape[0]
    count = num_retained + n
    blk, off = window_slots(block_row, start_entry, count, layer.block_size)
    acc = layer.scores(blk, off).clone()
    acc[:, num_retained:] = 0.0
    rows = torch.nonzero(weights > 0).flatten()
    if rows.numel():
        keys = layer.keys(blk, off).to(torch.float32)  # [count, H, D]
        q = query[rows].to(torch.float32)  # [m, Hq, D]
        h_kv = keys.shape[1]
        g = q.shape[1] // h_kv
        qg = q.view(q.shape[0], h_kv, g, -1)
        logits = torch.einsum("mhgd,khd->hgmk", qg, keys) * scale  # [H, G, m, count]
        qpos = num_retained + rows  # window slot of each query
        mask = torch.arange(count)[None, :] > qpos[:, None]  # [m, count] future keys
        logits.masked_fill_(mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1).reshape(h_kv * g, rows.numel(), count)
        acc = policy.accumulate(acc, probs, weights[rows])
    layer.put(blk, off, acc=acc)


def compact(layer: PagedLayer, policy: BasePolicy, block_row: torch.Tensor, old_start: int, count: int,
            new_start: int, keep: int, budget: int) -> torch.Tensor:
    """Keep ``keep`` of a request's ``count`` window slots per KV head; move them
    (ascending order) to slots ``0..keep-1`` of the window at ``new_start``.
    Returns the kept old slot indices [H, keep]."""
    bs = layer.block_size
    blk, off = window_slots(block_row, old_start, count, bs)
    acc = layer.scores(blk, off) if layer.acc is not None else torch.zeros(layer.v.shape[1], count)
    kept, new_acc = compress_step(policy, acc, keep, budget)  # [H, keep]
    keys = layer.keys(blk, off)  # [count, H, D]
    vals = layer.values(blk, off)
    h_idx = torch.arange(kept.shape[0])[:, None]
    k_sel = keys[kept, h_idx]  # [H, keep, D]
    v_sel = vals[kept, h_idx]
    dblk, doff = window_slots(block_row, new_start, keep, bs)
    layer.put(dblk, doff, k=k_sel.transpose(0, 1), v=v_sel.transpose(0, 1),
              acc=new_acc if layer.acc is not None else None)
    return kept


def check_layout(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    """Write known keys/values with vLLM's own cache-write op and read them back
    through :class:`PagedLayer`; refuse to run on a layout we do not know."""
    from vllm import _custom_ops as vllm_ops

    _, h, bs, d = value_cache.shape
    kc = torch.zeros(2, h, 2 * bs, d, dtype=value_cache.dtype)
    k_half, v_half = kc.chunk(2, dim=2)
    t = 3
    key = torch.randn(t, h, d).to(value_cache.dtype)
    val = torch.randn(t, h, d).to(value_cache.dtype)
    slots = torch.tensor([0, bs - 1, bs + 1], dtype=torch.long)
    vllm_ops.cpu_attn_reshape_and_cache(key, val, k_half, v_half, slots, "vec", k_scale=1.0, v_scale=1.0,
                                        kv_cache_dtype="auto")
    view = paged_view(k_half, v_half, None)
    blk, off = slots // bs, slots % bs
    if not (torch.equal(view.keys(blk, off), key) and torch.equal(view.values(blk, off), val)):
        raise RuntimeError("vllm-kvcompress: the CPU attention KV-cache layout is not the one this release "
                           "was built for (vLLM 0.32 'vec' pages); refusing to run compressed layers")


# ====================================================================== batched kernels
#
# Shared conventions: ``block_table`` rows are *shifted* (entry 0 is the
# window's first block) except in :func:`compact_windows`; window slot ``p`` of
# request ``i`` is block ``block_table[i, p // bs]``, offset ``p % bs``.
# ``acc`` is the layer's float32 score cache ``[nb, H, bs]`` (None: attention
# only / no scores). GQA: a KV head's score is the mean over its query heads.


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def impl_for(device: torch.device | str) -> str:
    """Which implementation the batched ops use for tensors on ``device``."""
    device = torch.device(device)
    impl = IMPL
    if impl not in _IMPLS:
        raise ValueError(f"VLLM_KVCOMPRESS_OPS={impl!r}: expected one of {', '.join(_IMPLS)}")
    if impl == "reference":
        return "reference"
    if device.type == "cpu" and impl in ("auto", "cpp"):
        from vllm_kvcompress import _ext

        if _ext.available():
            return "cpp"
        if impl == "cpp":
            raise RuntimeError(f"VLLM_KVCOMPRESS_OPS=cpp but the C++ kernels are unavailable: {_ext.error()}")
    if device.type == "cuda" and impl in ("auto", "triton"):
        if triton_available():
            return "triton"
    if impl in ("cpp", "triton"):
        raise RuntimeError(f"VLLM_KVCOMPRESS_OPS={impl} is not available for {device.type} tensors")
    return "reference"


def _window_index(block_table: torch.Tensor, lens: torch.Tensor, block_size: int, width: int,
                  start: torch.Tensor | None = None):
    """Block ids, offsets [R, width] of window slots ``0..width-1`` and their validity (slot < len).

    Invalid slots point at block 0 / the row's first entry (never written)."""
    dev = block_table.device
    R, cols = block_table.shape
    p = torch.arange(width, device=dev)
    col = (p // block_size)[None, :].expand(R, width)
    if start is not None:
        col = col + start.to(device=dev, dtype=torch.long)[:, None]
    valid = p[None, :] < lens.to(device=dev, dtype=torch.long)[:, None]
    col = torch.where(valid, col, torch.zeros_like(col)).clamp_(0, max(cols - 1, 0))
    blk = block_table.gather(1, col).long()
    blk = torch.where(valid, blk, torch.zeros_like(blk))
    off = (p % block_size)[None, :].expand(R, width)
    return blk, off, valid


def decode_attention_scores_reference(query: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor,
                                      block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                      acc: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of :func:`decode_attention_scores` (padded over requests)."""
    R, Hq, D = query.shape
    H, bs = k_t.shape[1], k_t.shape[3]
    G = Hq // H
    if out is None:
        out = torch.empty_like(query)
    if R == 0:
        return out
    lens = seq_lens.to(device=query.device, dtype=torch.long)
    width = max(int(lens.max()), 1)
    blk, off, valid = _window_index(block_table[:R], lens, bs, width)
    keys = k_t.permute(0, 3, 1, 2)[blk, off].to(torch.float32)  # [R, L, H, D]
    vals = v.permute(0, 2, 1, 3)[blk, off].to(torch.float32)
    q = query.to(torch.float32).reshape(R, H, G, D)
    logits = torch.einsum("rhgd,rkhd->rhgk", q, keys) * scale
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # empty windows -> 0
    out.copy_(torch.einsum("rhgk,rkhd->rhgd", probs, vals).reshape(R, Hq, D))
    if acc is not None:
        if weights is None:
            raise ValueError("weights are required with acc")
        w = weights.to(device=query.device, dtype=torch.float32)
        a = acc.permute(0, 2, 1)[blk, off]  # [R, L, H]
        last = torch.arange(width, device=query.device)[None, :] == (lens - 1)[:, None]
        a = a.masked_fill(last[..., None], 0.0)
        contrib = probs.mean(dim=2) * w[:, None, None]  # [R, H, L]
        new = a + contrib.transpose(1, 2)
        acc.permute(0, 2, 1)[blk[valid], off[valid]] = new[valid]
    return out


def decode_attention_scores(query: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float, acc: torch.Tensor | None = None,
                            weights: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Paged decode attention fused with the step's score update.

    ``query`` [R, Hq, D] (one query per request: its window's LAST slot);
    ``block_table`` [R, cols] int32 shifted rows; ``seq_lens`` [R] window slots
    including the new token; ``acc`` [nb, H, bs] float32 or None;
    ``weights`` [R] float32. Returns ``out`` [R, Hq, D] (query dtype; written
    in place when given, e.g. a view of vLLM's output) and, when ``acc`` is
    given, sets for every window slot ``p``::

        acc[p] = (0 if p == seq_len-1 else acc[p]) + weights[i] * mean_g(probs[g, p])
    """
    impl = impl_for(query.device)
    if impl == "cpp":
        if out is None:
            out = torch.empty_like(query)
        bt = block_table if block_table.dtype == torch.int32 and block_table.stride(-1) == 1 \
            else block_table.to(torch.int32).contiguous()
        w = None if weights is None else weights.to(torch.float32).contiguous()
        torch.ops.kvcompress.decode_attention_scores(query, k_t, v, bt, seq_lens.to(torch.int32).contiguous(),
                                                     float(scale), acc, w, out)
        return out
    if impl == "triton":
        from vllm_kvcompress.triton_kernels import decode_attention_scores as triton_decode

        return triton_decode(query, k_t, v, block_table, seq_lens, scale, acc, weights, out)
    return decode_attention_scores_reference(query, k_t, v, block_table, seq_lens, scale, acc, weights, out)


def window_scores_reference(query: torch.Tensor, query_start: torch.Tensor, k_t: torch.Tensor,
                            block_table: torch.Tensor, seq_lens: torch.Tensor, num_retained: torch.Tensor,
                            weights: torch.Tensor, scale: float, acc: torch.Tensor,
                            max_chunk_elems: int = 1 << 24) -> None:
    """Torch reference of :func:`window_scores`: weighted queries padded over
    requests, processed in query chunks of at most ``max_chunk_elems`` logits."""
    dev = query.device
    R = seq_lens.shape[0]
    if R == 0:
        return
    Hq, D = query.shape[1], query.shape[2]
    H, bs = k_t.shape[1], k_t.shape[3]
    G = Hq // H
    qs = query_start.to(device=dev, dtype=torch.long)
    lens = seq_lens.to(device=dev, dtype=torch.long)
    nr = num_retained.to(device=dev, dtype=torch.long)
    width = max(int(lens.max()), 1)
    blk, off, valid = _window_index(block_table[:R], lens, bs, width)
    pos = torch.arange(width, device=dev)
    a = acc.permute(0, 2, 1)[blk, off]  # [R, L, H]
    a = a.masked_fill((pos[None, :] >= nr[:, None])[..., None], 0.0)

    n_tok = int(qs[-1])
    tok_req = torch.repeat_interleave(torch.arange(R, device=dev), qs.diff())
    w_all = weights[:n_tok].to(device=dev, dtype=torch.float32)
    sel = torch.nonzero((w_all > 0) & (lens[tok_req] > 0)).flatten()
    if sel.numel():
        req = tok_req[sel]
        slot = nr[req] + (sel - qs[req])
        cnt = torch.bincount(req, minlength=R)
        rank = torch.arange(sel.numel(), device=dev) - (torch.cumsum(cnt, 0) - cnt)[req]
        wmax = int(cnt.max())
        qpad = torch.zeros(R, wmax, Hq, D, device=dev, dtype=torch.float32)
        qpad[req, rank] = query[sel].to(torch.float32)
        wpad = torch.zeros(R, wmax, device=dev, dtype=torch.float32)
        wpad[req, rank] = w_all[sel]
        spad = torch.full((R, wmax), -1, device=dev, dtype=torch.long)
        spad[req, rank] = slot
        keys = k_t.permute(0, 3, 1, 2)[blk, off].to(torch.float32)  # [R, L, H, D]
        contrib = torch.zeros(R, H, width, device=dev, dtype=torch.float32)
        qc = max(1, max_chunk_elems // max(1, R * Hq * width))
        for c0 in range(0, wmax, qc):
            c1 = min(wmax, c0 + qc)
            q = qpad[:, c0:c1].reshape(R, c1 - c0, H, G, D)
            logits = torch.einsum("rqhgd,rkhd->rhgqk", q, keys) * scale
            mask = (pos[None, None, :] > spad[:, c0:c1, None]) | ~valid[:, None, :]  # [R, q, L]
            logits.masked_fill_(mask[:, None, None], float("-inf"))
            probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # padded rows -> 0
            contrib += torch.einsum("rhgqk,rq->rhk", probs, wpad[:, c0:c1]) / G
        a = a + contrib.transpose(1, 2)
    acc.permute(0, 2, 1)[blk[valid], off[valid]] = a[valid]


def window_scores(query: torch.Tensor, query_start: torch.Tensor, k_t: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, num_retained: torch.Tensor, weights: torch.Tensor, scale: float,
                  acc: torch.Tensor) -> None:
    """Batched :func:`accumulate_scores` (prefill chunks; any query count per request).

    ``query`` [T, Hq, D]; request ``i`` owns queries ``query_start[i] ..
    query_start[i+1]-1`` (``query_start`` [R+1]); query ``k`` of request ``i``
    sits at window slot ``num_retained[i] + k`` and sees window keys
    ``0 .. min(num_retained[i] + k, seq_lens[i]-1)`` (causal). ``weights``
    [T] float32. For every request: slots ``num_retained[i] .. seq_lens[i]-1``
    start at 0, then ``acc[p] += sum_q w_q * mean_g(probs[q, g, p])`` over its
    queries with ``w_q > 0``. ``block_table`` holds shifted rows.
    """
    impl = impl_for(query.device)
    if impl == "cpp":
        bt = block_table if block_table.dtype == torch.int32 and block_table.stride(-1) == 1 \
            else block_table.to(torch.int32).contiguous()
        i32 = torch.int32
        torch.ops.kvcompress.window_scores(query, query_start.to(i32).contiguous(), k_t, bt,
                                           seq_lens.to(i32).contiguous(), num_retained.to(i32).contiguous(),
                                           weights.to(torch.float32).contiguous(), float(scale), acc)
        return
    if impl == "triton":
        from vllm_kvcompress.triton_kernels import window_scores as triton_window

        triton_window(query, query_start, k_t, block_table, seq_lens, num_retained, weights, scale, acc)
        return
    window_scores_reference(query, query_start, k_t, block_table, seq_lens, num_retained, weights, scale, acc)


def compact_windows_reference(k_t: torch.Tensor, v: torch.Tensor, acc: torch.Tensor | None,
                              block_table: torch.Tensor, old_start: torch.Tensor, new_start: torch.Tensor,
                              kept: torch.Tensor, keep: torch.Tensor, new_acc: torch.Tensor | None = None) -> None:
    """Torch reference of :func:`compact_windows` (gather, then scatter: overlap-safe)."""
    R, H, kmax = kept.shape
    if R == 0 or kmax == 0:
        return
    dev = k_t.device
    bs = k_t.shape[3]
    k_idx = torch.arange(kmax, device=dev)
    kept = kept.to(device=dev, dtype=torch.long)
    ok = (k_idx[None, None, :] < keep.to(device=dev, dtype=torch.long)[:, None, None]) & (kept >= 0)
    ok = ok.to(torch.int8).cumprod(-1).bool()  # a negative entry (padding) ends the row
    r_i, h_i, k_i = torch.nonzero(ok, as_tuple=True)
    if r_i.numel() == 0:
        return
    src = kept[r_i, h_i, k_i]
    bt = block_table.to(dev)
    os_, ns_ = old_start.to(device=dev, dtype=torch.long), new_start.to(device=dev, dtype=torch.long)
    sblk, soff = bt[r_i, os_[r_i] + src // bs].long(), src % bs
    dblk, doff = bt[r_i, ns_[r_i] + k_i // bs].long(), k_i % bs
    k_sel = k_t[sblk, h_i, :, soff]  # [M, D] (copies)
    v_sel = v[sblk, h_i, soff]
    a_sel = None
    if acc is not None:
        a_sel = new_acc.to(dev)[r_i, h_i, k_i].to(torch.float32) if new_acc is not None else acc[sblk, h_i, soff]
    k_t[dblk, h_i, :, doff] = k_sel
    v[dblk, h_i, doff] = v_sel
    if acc is not None:
        acc[dblk, h_i, doff] = a_sel


def compact_windows(k_t: torch.Tensor, v: torch.Tensor, acc: torch.Tensor | None, block_table: torch.Tensor,
                    old_start: torch.Tensor, new_start: torch.Tensor, kept: torch.Tensor, keep: torch.Tensor,
                    new_acc: torch.Tensor | None = None) -> None:
    """Move, per request ``i`` and KV head ``h``, window slots ``kept[i, h, :keep[i]]``
    (ascending; a negative entry is padding and ends the row) of the window at entry
    ``old_start[i]`` to slots ``0 .. keep[i]-1`` of the window at entry
    ``new_start[i]`` — keys, values and scores. ``block_table`` holds UNshifted
    rows; the windows may overlap. Scores written: ``new_acc[i, h, k]`` when
    given (``compress_step``'s output), else the moved ``acc`` values.
    """
    impl = impl_for(k_t.device)
    if impl == "cpp":
        bt = block_table if block_table.dtype == torch.int32 and block_table.stride(-1) == 1 \
            else block_table.to(torch.int32).contiguous()
        i64 = torch.long
        na = None if new_acc is None else new_acc.to(torch.float32)
        if na is not None and na.stride(-1) != 1:
            na = na.contiguous()
        kp = kept.to(i64)
        if kp.stride(-1) != 1:
            kp = kp.contiguous()
        torch.ops.kvcompress.compact_windows(k_t, v, acc, bt, old_start.to(i64).contiguous(),
                                             new_start.to(i64).contiguous(), kp, keep.to(i64).contiguous(), na)
        return
    if impl == "triton":
        from vllm_kvcompress.triton_kernels import compact_windows as triton_compact

        triton_compact(k_t, v, acc, block_table, old_start, new_start, kept, keep, new_acc)
        return
    compact_windows_reference(k_t, v, acc, block_table, old_start, new_start, kept, keep, new_acc)


def read_scores(layer: PagedLayer, block_table: torch.Tensor, start: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Accumulated scores ``[R, H, max(count)]`` of window slots ``0..count-1`` of each
    row (``block_table`` unshifted, window at entry ``start``); 0 past ``count``."""
    dev = layer.v.device
    count = count.to(device=dev, dtype=torch.long)
    width = max(int(count.max()), 1) if len(count) else 1
    blk, off, valid = _window_index(block_table, count, layer.block_size, width, start=start)
    return layer.acc.permute(0, 2, 1)[blk, off].masked_fill(~valid[..., None], 0.0).transpose(1, 2)


def compact_requests(layer: PagedLayer, policy: BasePolicy, block_table: torch.Tensor, old_start: torch.Tensor,
                     count: torch.Tensor, new_start: torch.Tensor, keep: torch.Tensor,
                     budget: torch.Tensor) -> torch.Tensor:
    """Batched :func:`compact` for several requests (all tensors indexed by the
    same rows; ``block_table`` unshifted). Selection runs batched in torch
    (``compress_step`` with ``valid_len=count``), the move in
    :func:`compact_windows`. Returns kept slots ``[R, H, Kmax]`` (-1 padded)."""
    dev = layer.v.device
    R, H = block_table.shape[0], layer.v.shape[1]
    count = count.to(device=dev, dtype=torch.long)
    keep = keep.to(device=dev, dtype=torch.long)
    budget = budget.to(device=dev, dtype=torch.long)
    old_start = old_start.to(device=dev, dtype=torch.long)
    new_start = new_start.to(device=dev, dtype=torch.long)
    if layer.acc is not None:
        scores = read_scores(layer, block_table, old_start, count)
    else:
        scores = torch.zeros(R, H, max(int(count.max()), 1) if R else 1, device=dev)
    kept, new_acc = compress_step(policy, scores, keep, budget, valid_len=count)
    compact_windows(layer.k_t, layer.v, layer.acc, block_table, old_start, new_start, kept,
                    torch.minimum(keep, count), new_acc if layer.acc is not None else None)
    return kept
