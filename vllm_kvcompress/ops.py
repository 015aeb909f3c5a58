"""Compression ops on the paged KV cache: dispatch + torch references.

The ops run ONE fixed scoring rule and move what they are told to move; which
tokens survive is decided above them (``vllm_kvcompress.integration.compaction``
calls the policy's selection), so this module imports neither the policies nor
vLLM.

Batched ops (one call per layer and step for all requests; a padded torch
reference beside each kernel):

* :func:`decode_attention_scores` — paged decode attention over each request's
  window fused with the score update of the step (one query per request);
* :func:`window_scores` — attention probabilities of the step's weighted
  queries over each request's retained + new keys, folded into the float32
  score cache (prefill chunks; ``acc[p] += sum_q w_q * mean_g(probs[q, g, p])``:
  the H2O accumulator, the observation-window scores of PyramidInfer / SnapKV);
* :func:`prefill_attention_scores` — paged causal attention of prefill chunks
  with :func:`window_scores`'s update from the same logits (C++ and reference
  only; the CPU backend's prefill path where it beats vLLM's attention);
* :func:`compact_windows` — per request and KV head, move the kept slots'
  keys, values and scores to the front of the request's new window
  (``vllm_kvcompress.paging``).

:func:`accumulate_scores` is the per-request torch reference of the scoring
rule (tests check the batched references against it).

Cache views (:class:`PagedLayer`): a key page per (block, head) seen as
``k_t [num_blocks, H, D, block_size]``, values as ``v [num_blocks, H,
block_size, D]``, scores ``acc [num_blocks, H, block_size]`` float32. They are
views, so any physical layout with these logical axes works: vLLM's CPU_ATTN
"vec" pages (key page stored transposed, checked at start-up by the CPU
backend) and TRITON_ATTN's ``[num_blocks, block_size, H, D]`` halves (strided).

Dispatch (``VLLM_KVCOMPRESS_OPS``): ``auto`` (default) uses the C++ kernels on
CPU tensors when the extension builds/loads (``vllm_kvcompress._ext``), the
Triton kernels on CUDA tensors when triton is importable, else the torch
reference; ``reference`` forces the torch reference; ``cpp`` / ``triton``
require that implementation (error if it is unavailable). ``triton`` on CPU
tensors runs the Triton kernels in Triton's interpreter and needs
``TRITON_INTERPRET=1`` (tests, and debugging the GPU path without a GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

IMPL = os.environ.get("VLLM_KVCOMPRESS_OPS", "auto").strip().lower() or "auto"
_IMPLS = ("auto", "reference", "cpp", "triton")


@dataclass
class PagedLayer:
    """Views of one layer's paged cache in the layout above."""

    k_t: torch.Tensor  # [nb, H, D, bs] (transposed key pages)
    v: torch.Tensor  # [nb, H, bs, D]
    acc: torch.Tensor | None  # [nb, H, bs] float32
    # vLLM's CPU "amx" packing inside each page (see unpack_amx): k_t / v are then the
    # pages' memory only, and keys() / values() / put() do not apply
    amx: bool = False

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


def paged_view(key_cache: torch.Tensor, value_cache: torch.Tensor, acc: torch.Tensor | None,
               amx: bool = False) -> PagedLayer:
    """Views of vLLM CPU_ATTN halves ``[nb, H, bs, D]``: "vec" pages (the key half holds
    each page transposed, so it is reinterpreted as ``[nb, H, D, bs]``), or with ``amx``
    the "amx" pages, passed to the kernels as the same shapes."""
    nb, h, bs, d = value_cache.shape
    return PagedLayer(k_t=key_cache.view(nb, h, d, bs), v=value_cache, acc=acc, amx=amx)


# ---------------------------------------------------------------- vLLM's CPU "amx" pages
#
# On CPUs with AMX tiles vLLM 0.32's CPU attention picks ISA "amx" for bf16 caches
# with block_size % 32 == 0. Its pages have the same [nb, H, bs, D] halves, but each
# (block, head) region is packed as AMX B tiles of 16 rows x 32 bf16, a pair of bf16
# in each 32-bit word: keys in groups of 16 tokens, a word = two adjacent head dims of
# one token; values in groups of 16 head dims, a word = two adjacent tokens
# (vllm-project/vllm csrc/cpu/cpu_attn_amx.hpp, reshape_and_cache; checked against
# vLLM's own cache-write op by tests/test_amx_layout.py, which runs anywhere: the write
# op uses no AMX instruction). These are the torch reference of the packing; the C++
# kernels read and write it directly (``amx=True``); compressed layers keep it (the default)
# unless VLLM_KVCOMPRESS_CPU_AMX=0 (integration.attention_backend).


def amx_key_index(block_size: int, head_size: int) -> torch.Tensor:
    """[bs, D] flat offset of key (token t, dim d) inside one (block, head) key region."""
    t = torch.arange(block_size)[:, None]
    d = torch.arange(head_size)[None, :]
    return (t // 16) * 16 * head_size + (d // 2) * 32 + (t % 16) * 2 + d % 2


def amx_value_index(block_size: int, head_size: int) -> torch.Tensor:
    """[bs, D] flat offset of value (token t, dim d) inside one (block, head) value region."""
    t = torch.arange(block_size)[:, None]
    d = torch.arange(head_size)[None, :]
    return (d // 16) * 16 * block_size + (t // 2) * 32 + (d % 16) * 2 + t % 2


def unpack_amx(key_cache: torch.Tensor, value_cache: torch.Tensor | None) -> PagedLayer:
    """A "vec"-layout copy (:class:`PagedLayer`, no scores) of "amx" halves ``[nb, H, bs, D]``
    (``value_cache`` None: keys only, ``v`` left empty)."""
    nb, h, bs, d = key_cache.shape
    kf = key_cache.reshape(nb, h, bs * d)
    keys = kf[:, :, amx_key_index(bs, d).flatten()].view(nb, h, bs, d)
    values = torch.empty(0)
    if value_cache is not None:
        values = value_cache.reshape(nb, h, bs * d)[:, :, amx_value_index(bs, d).flatten()].view(nb, h, bs, d)
    return PagedLayer(k_t=keys.transpose(2, 3).contiguous(), v=values.contiguous(), acc=None)


def _amx_pages(k_t: torch.Tensor, v: torch.Tensor | None) -> PagedLayer:
    """"vec" copies of the "amx" pages behind kernel views (k_t [nb, H, D, bs], v [nb, H, bs, D])."""
    nb, h, d, bs = k_t.shape
    return unpack_amx(k_t.view(nb, h, bs, d), v)


def pack_amx(layer: PagedLayer, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    """Write a "vec"-layout :class:`PagedLayer` into "amx" halves (inverse of :func:`unpack_amx`)."""
    nb, h, bs, d = value_cache.shape
    kf = torch.empty(nb, h, bs * d, dtype=key_cache.dtype)
    vf = torch.empty_like(kf)
    kf[:, :, amx_key_index(bs, d).flatten()] = layer.k_t.transpose(2, 3).reshape(nb, h, bs * d)
    vf[:, :, amx_value_index(bs, d).flatten()] = layer.v.reshape(nb, h, bs * d)
    key_cache.copy_(kf.view(nb, h, bs, d))
    value_cache.copy_(vf.view(nb, h, bs, d))


def window_slots(block_row: torch.Tensor, start_entry: int, count: int, block_size: int):
    """(block ids, offsets) of window slots ``0..count-1`` of a block-table row."""
    p = torch.arange(count, dtype=torch.long)
    return block_row[start_entry + p // block_size].long(), p % block_size


def accumulate_scores(layer: PagedLayer, block_row: torch.Tensor, start_entry: int, num_retained: int,
                      query: torch.Tensor, weights: torch.Tensor, scale: float) -> None:
    """Fold one request's step into its score window (per-request torch reference of
    the one scoring rule every kernel runs: ``acc[p] += sum_q w_q * mean_g(probs[q, g, p])``).

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
        acc = acc + torch.einsum("hmk,m->hk", probs.reshape(h_kv, g, rows.numel(), count).mean(1),
                                 weights[rows].to(torch.float32))
    layer.put(blk, off, acc=acc)


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


def _check_amx(amx: bool, impl: str) -> None:
    if amx and impl == "triton":
        raise ValueError("vLLM's CPU 'amx' pages are read by the C++ kernels and the torch reference only")


def _int32_rows(block_table: torch.Tensor) -> torch.Tensor:
    """The block table as the C++ kernels take it: int32 with contiguous rows (no copy if it is)."""
    if block_table.dtype == torch.int32 and block_table.stride(-1) == 1:
        return block_table
    return block_table.to(torch.int32).contiguous()


def bf16_dot(dtype: torch.dtype, head_size: int) -> bool:
    """Whether the C++ chunk kernels (:func:`prefill_attention_scores`, :func:`window_scores`)
    run QK / PV on AVX512-BF16 dot products for this cache ("vec" or "amx" pages): a bf16
    cache, and the kernels' own condition (``kvcompress::bf16_dot``: head size % 16 == 0,
    a CPU with avx512_bf16, ``VLLM_KVCOMPRESS_CPU_BF16DOT`` not ``0``). The decode kernel
    also needs page size % 16 == 0 and at most 8 query heads per KV head. The inputs are
    the same bf16 values either way (float32 logits, softmax and scores); the dot path
    rounds the probabilities fed to PV to bf16, as vLLM's AMX attention does."""
    if dtype != torch.bfloat16 or impl_for("cpu") != "cpp":
        return False
    return bool(torch.ops.kvcompress.bf16_dot(head_size))


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
    if device.type == "cpu" and impl == "triton" and os.environ.get("TRITON_INTERPRET") == "1" and triton_available():
        return "triton"  # Triton's interpreter (tests / debugging the GPU path on CPU)
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
                            weights: torch.Tensor | None = None, out: torch.Tensor | None = None,
                            amx: bool = False) -> torch.Tensor:
    """Paged decode attention fused with the step's score update.

    ``query`` [R, Hq, D] (one query per request: its window's LAST slot);
    ``block_table`` [R, cols] int32 shifted rows; ``seq_lens`` [R] window slots
    including the new token; ``acc`` [nb, H, bs] float32 or None;
    ``weights`` [R] float32. Returns ``out`` [R, Hq, D] (query dtype; written
    in place when given, e.g. a view of vLLM's output) and, when ``acc`` is
    given, sets for every window slot ``p``::

        acc[p] = (0 if p == seq_len-1 else acc[p]) + weights[i] * mean_g(probs[g, p])

    ``amx``: the pages use vLLM's CPU "amx" packing (C++ kernels and the reference only).
    """
    impl = impl_for(query.device)
    _check_amx(amx, impl)
    if amx and impl != "cpp":
        lay = _amx_pages(k_t, v)
        return decode_attention_scores_reference(query, lay.k_t, lay.v, block_table, seq_lens, scale, acc, weights,
                                                 out)
    if impl == "cpp":
        if out is None:
            out = torch.empty_like(query)
        bt = _int32_rows(block_table)
        w = None if weights is None else weights.to(torch.float32).contiguous()
        torch.ops.kvcompress.decode_attention_scores(query, k_t, v, bt, seq_lens.to(torch.int32).contiguous(),
                                                     float(scale), acc, w, out, amx)
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
                  acc: torch.Tensor, amx: bool = False) -> None:
    """Batched :func:`accumulate_scores` (prefill chunks; any query count per request).

    ``query`` [T, Hq, D]; request ``i`` owns queries ``query_start[i] ..
    query_start[i+1]-1`` (``query_start`` [R+1]); query ``k`` of request ``i``
    sits at window slot ``num_retained[i] + k`` and sees window keys
    ``0 .. min(num_retained[i] + k, seq_lens[i]-1)`` (causal). ``weights``
    [T] float32. For every request: slots ``num_retained[i] .. seq_lens[i]-1``
    start at 0, then ``acc[p] += sum_q w_q * mean_g(probs[q, g, p])`` over its
    queries with ``w_q > 0``. ``block_table`` holds shifted rows. ``amx`` as in
    :func:`decode_attention_scores`.
    """
    impl = impl_for(query.device)
    _check_amx(amx, impl)
    if amx and impl != "cpp":
        k_t = _amx_pages(k_t, None).k_t
    if impl == "cpp":
        bt = _int32_rows(block_table)
        i32 = torch.int32
        torch.ops.kvcompress.window_scores(query, query_start.to(i32).contiguous(), k_t, bt,
                                           seq_lens.to(i32).contiguous(), num_retained.to(i32).contiguous(),
                                           weights.to(torch.float32).contiguous(), float(scale), acc, amx)
        return
    if impl == "triton":
        from vllm_kvcompress.triton_kernels import window_scores as triton_window

        triton_window(query, query_start, k_t, block_table, seq_lens, num_retained, weights, scale, acc)
        return
    window_scores_reference(query, query_start, k_t, block_table, seq_lens, num_retained, weights, scale, acc)


def prefill_attention_scores_reference(query: torch.Tensor, query_start: torch.Tensor, k_t: torch.Tensor,
                                       v: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                                       num_retained: torch.Tensor, scale: float, weights: torch.Tensor | None = None,
                                       acc: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of :func:`prefill_attention_scores`: dense causal attention per
    request over its window, then :func:`window_scores_reference` for the scores."""
    T, Hq, D = query.shape
    H, bs = k_t.shape[1], k_t.shape[3]
    G = Hq // H
    if out is None:
        out = torch.empty_like(query)
    qs = query_start.tolist()
    lens = seq_lens.tolist()
    nr = num_retained.tolist()
    dev = query.device
    for i in range(len(lens)):
        n, L = qs[i + 1] - qs[i], lens[i]
        if n == 0:
            continue
        if L <= 0:  # an empty window: outputs 0
            out[qs[i]:qs[i + 1]] = 0
            continue
        j = torch.arange(L, device=dev)
        blk, off = block_table[i].to(dev).long()[j // bs], j % bs
        keys = k_t.permute(0, 3, 1, 2)[blk, off].to(torch.float32)  # [L, H, D]
        vals = v.permute(0, 2, 1, 3)[blk, off].to(torch.float32)
        q = query[qs[i]:qs[i + 1]].to(torch.float32).view(n, H, G, D)
        logits = torch.einsum("nhgd,lhd->hgnl", q, keys) * scale
        slot = nr[i] + torch.arange(n, device=dev)
        logits = logits.masked_fill(j[None, :] > slot[:, None], float("-inf"))  # causal
        probs = torch.softmax(logits, dim=-1)
        o = torch.einsum("hgnl,lhd->nhgd", probs, vals).reshape(n, Hq, D)
        out[qs[i]:qs[i + 1]] = o.to(out.dtype)
    if acc is not None:
        if weights is None:
            raise ValueError("weights are required with acc")
        window_scores_reference(query, query_start, k_t, block_table, seq_lens, num_retained, weights, scale, acc)
    return out


def prefill_attention_scores(query: torch.Tensor, query_start: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor,
                             block_table: torch.Tensor, seq_lens: torch.Tensor, num_retained: torch.Tensor,
                             scale: float, weights: torch.Tensor | None = None, acc: torch.Tensor | None = None,
                             out: torch.Tensor | None = None, amx: bool = False) -> torch.Tensor:
    """Paged causal attention of prefill chunks fused with :func:`window_scores`.

    Arguments as in :func:`window_scores` plus the value pages ``v``: query ``k``
    of request ``i`` (window slot ``num_retained[i] + k``) attends to window slots
    ``0 .. num_retained[i] + k``; its output goes to ``out`` [T, Hq, D] (query
    dtype; a view of vLLM's output, written in place). With ``acc`` (and
    ``weights``) the scores are updated exactly as :func:`window_scores` does,
    from the same logits: H2O's every-query scoring then costs one extra
    multiply-add per probability instead of a second attention pass.

    C++ kernels (CPU) and the torch reference only: the CPU backend uses it where it
    measures faster than vLLM's own attention (``integration.step_plan``).
    """
    impl = impl_for(query.device)
    _check_amx(amx, impl)
    if impl == "cpp":
        if out is None:
            out = torch.empty_like(query)
        bt = _int32_rows(block_table)
        i32 = torch.int32
        w = None if weights is None else weights.to(torch.float32).contiguous()
        torch.ops.kvcompress.prefill_attention_scores(query, query_start.to(i32).contiguous(), k_t, v, bt,
                                                      seq_lens.to(i32).contiguous(),
                                                      num_retained.to(i32).contiguous(), w, float(scale), acc, out,
                                                      amx)
        return out
    if amx:
        lay = _amx_pages(k_t, v)
        k_t, v = lay.k_t, lay.v
    return prefill_attention_scores_reference(query, query_start, k_t, v, block_table, seq_lens, num_retained, scale,
                                              weights, acc, out)


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
                    new_acc: torch.Tensor | None = None, amx: bool = False) -> None:
    """Move, per request ``i`` and KV head ``h``, window slots ``kept[i, h, :keep[i]]``
    (ascending; a negative entry is padding and ends the row) of the window at entry
    ``old_start[i]`` to slots ``0 .. keep[i]-1`` of the window at entry
    ``new_start[i]`` — keys, values and scores. ``block_table`` holds UNshifted
    rows; the windows may overlap. Scores written: ``new_acc[i, h, k]`` when
    given (``compress_step``'s output), else the moved ``acc`` values. ``amx`` as in
    :func:`decode_attention_scores`.
    """
    impl = impl_for(k_t.device)
    _check_amx(amx, impl)
    if amx and impl != "cpp":
        lay = _amx_pages(k_t, v)
        compact_windows_reference(lay.k_t, lay.v, acc, block_table, old_start, new_start, kept, keep, new_acc)
        nb, h, d, bs = k_t.shape
        pack_amx(lay, k_t.view(nb, h, bs, d), v)
        return
    if impl == "cpp":
        bt = _int32_rows(block_table)
        i64 = torch.long
        na = None if new_acc is None else new_acc.to(torch.float32)
        if na is not None and na.stride(-1) != 1:
            na = na.contiguous()
        kp = kept.to(i64)
        if kp.stride(-1) != 1:
            kp = kp.contiguous()
        torch.ops.kvcompress.compact_windows(k_t, v, acc, bt, old_start.to(i64).contiguous(),
                                             new_start.to(i64).contiguous(), kp, keep.to(i64).contiguous(), na, amx)
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
