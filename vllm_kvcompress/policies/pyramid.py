"""PyramidInfer (Yang et al., 2024) as per-layer KV eviction.

Reference: mutonix/pyramidinfer ``models/modeling_llama_pyramidinfer.py`` and
``configs/llama*_*.json``. In prefill the reference scores the context keys by
the attention of the recent ``recent_ratio`` (0.2) of the sequence, each
recent query weighted by ``linspace(1.0, distance_weight=1.2)`` (oldest ->
newest), averaged over heads; 4 sink tokens are always kept; then it drops the
*hidden states* of the unselected tokens so deeper layers compute fewer KV
entries. We keep the scoring and the per-layer retention (the pyramid, see
``schedule.pyramidinfer_shape``) and evict KV entries per layer and KV head; with
``prefill_drop`` a whole-prompt prefill also drops the hidden states, one token
set for all heads (``base.select_tokens``, ``schedule.drop_counts``).

One deviation by default: the scores are max-pooled along keys (``kernel`` 7, as
SnapKV's LongBench configuration) before the top-k. The reference ranks single
tokens; on the embedded model that kept the first digits of a pass key and lost
the rest (``kernel=1`` restores the reference ranking; docs/policies.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import BasePolicy, IntOrTensor, ceil_ratio, pool_scores

__all__ = ["PyramidInferPolicy"]


@dataclass(frozen=True)
class PyramidInferPolicy(BasePolicy):
    """Prefill: the observation window (last ``ceil(obs_window_ratio * C)`` positions
    of the context, clipped to this chunk) weighs 1.0 (oldest) .. 1.2 (newest),
    other queries 0; decode: every query weighs 1. Scores are reset after each
    compaction. Default window: 4 sinks, ``recent = ceil(obs_window_ratio * budget)``."""

    name: ClassVar[str] = "pyramid"
    reset_after_compaction: ClassVar[bool] = True
    default_sinks: ClassVar[int] = 4
    #: reference configs: ``distance_weight`` = 1.2
    distance_weight: ClassVar[float] = 1.2

    obs_window_ratio: float = 0.2
    kernel: int = 7

    @classmethod
    def from_config(cls, cfg) -> "PyramidInferPolicy":
        return cls(sinks=cfg.sinks, recent_window=cfg.recent_window, obs_window_ratio=cfg.obs_window_ratio,
                   kernel=cfg.pyramid_kernel)

    def default_recent(self, budget: IntOrTensor) -> IntOrTensor:
        return ceil_ratio(budget, self.obs_window_ratio)

    def obs_window(self, num_computed_after: int) -> int:
        return ceil_ratio(num_computed_after, self.obs_window_ratio)

    def query_weights(self, chunk_start, chunk_len, num_computed_after, is_prefill):
        if not is_prefill:
            return torch.ones(chunk_len, dtype=torch.float32)
        C = int(num_computed_after)
        W = max(1, self.obs_window(C))
        lo = C - W  # first position of the window
        pos = torch.arange(chunk_start, chunk_start + chunk_len, dtype=torch.float64)
        if W > 1:
            w = 1.0 + (self.distance_weight - 1.0) * (pos - lo) / (W - 1)
        else:
            w = torch.ones_like(pos)
        w = torch.where(pos >= lo, w, torch.zeros_like(w))
        return w.to(torch.float32)

    def score(self, acc: torch.Tensor, valid_len: IntOrTensor | None = None) -> torch.Tensor:
        if self.kernel == 1:  # the reference: per-token scores
            return acc
        return pool_scores(acc, self.kernel, "max", valid_len)
