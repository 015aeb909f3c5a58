"""Selection + move: which window slots survive a compaction (the policy's choice,
``policies.compress_step``) and the batched move of their keys, values and scores
(``ops.compact_windows``). No vLLM symbol is patched here; both attention
backends call :func:`compact_requests`.

Selection lives on this side, not in ``ops``: the kernels run one fixed rule and
move what they are told.
"""

from __future__ import annotations

import torch

from vllm_kvcompress import ops
from vllm_kvcompress.integration import step_costs
from vllm_kvcompress.ops import PagedLayer, window_slots
from vllm_kvcompress.policies import BasePolicy, compress_step


def compact(layer: PagedLayer, policy: BasePolicy, block_row: torch.Tensor, old_start: int, count: int,
            new_start: int, keep: int, budget: int) -> torch.Tensor:
    """Per-request torch reference of :func:`compact_requests`: keep ``keep`` of a
    request's ``count`` window slots per KV head and move them (ascending order)
    to slots ``0..keep-1`` of the window at ``new_start``. Returns the kept old
    slot indices [H, keep]."""
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


def compact_requests(layer: PagedLayer, policy: BasePolicy, block_table: torch.Tensor, old_start: torch.Tensor,
                     count: torch.Tensor, new_start: torch.Tensor, keep: torch.Tensor,
                     budget: torch.Tensor) -> torch.Tensor:
    """Batched :func:`compact` for several requests (all tensors indexed by the
    same rows; ``block_table`` unshifted). Selection runs batched in torch
    (``compress_step`` with ``valid_len=count``), the move in
    ``ops.compact_windows``. Returns kept slots ``[R, H, Kmax]`` (-1 padded)."""
    dev = layer.v.device
    R, H = block_table.shape[0], layer.v.shape[1]
    count = count.to(device=dev, dtype=torch.long)
    keep = keep.to(device=dev, dtype=torch.long)
    budget = budget.to(device=dev, dtype=torch.long)
    old_start = old_start.to(device=dev, dtype=torch.long)
    new_start = new_start.to(device=dev, dtype=torch.long)
    with step_costs.timed("selection", dev):
        if layer.acc is not None:
            scores = ops.read_scores(layer, block_table, old_start, count)
        else:
            scores = torch.zeros(R, H, max(int(count.max()), 1) if R else 1, device=dev)
        kept, new_acc = compress_step(policy, scores, keep, budget, valid_len=count)
    with step_costs.timed("compaction", dev):
        ops.compact_windows(layer.k_t, layer.v, layer.acc, block_table, old_start, new_start, kept,
                            torch.minimum(keep, count), new_acc if layer.acc is not None else None, amx=layer.amx)
    return kept
