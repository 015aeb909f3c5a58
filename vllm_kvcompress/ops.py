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

``VLLM_KVCOMPRESS_OPS=reference`` forces the torch reference (the only
implementation in this release; the fused kernels plug in here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from vllm_kvcompress.policies import BasePolicy, compress_step

IMPL = os.environ.get("VLLM_KVCOMPRESS_OPS", "reference")


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
