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

As in the reference, the observation window's own keys are not ranked: the
window is kept whole (the protected recent part) and the top-k is taken over
the context before it.

Deviations by default, each with the option that restores the reference
(measurements in docs/policies.md):

* a short voting window, ``obs_window`` = 32 queries (like SnapKV's) instead of
  the last ``obs_window_ratio`` (0.2) of the context: 20% of a 2K prompt is ~400
  essay tokens whose votes drown the question's (``obs_window: 0`` restores it);
* the scores are max-pooled along keys (``kernel`` 21) before the top-k, so a
  multi-token fact survives whole; the reference ranks single tokens, which kept
  the first digits of a pass key and lost the rest (``kernel: 1`` restores it);
* the prompt's last query votes once more with its observation window's whole weight
  (``last_query_weight`` 1.0): the question's other queries attend to the words every
  fact of its shape shares, so the later of two such facts won their vote; the last
  query predicts the answer's first token. At 12.5% on held-out seeds it lifted the
  retrieval answers from 55 to 59 of 60 (``last_query_weight: 0`` restores it);
* scores restart from 0 after each compaction (``reset_scores: true``), so a
  decode-time compaction ranks by the decode queries since the previous one;
  ``reset_scores: false`` carries the votes over (it cost +10.6% perplexity under
  chunked prefill at 25%; docs/policies.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import DEFAULT_SINKS
from .base import IntOrTensor, PooledPolicy, ceil_ratio, option_default

__all__ = ["PyramidInferPolicy"]


@dataclass(frozen=True)
class PyramidInferPolicy(PooledPolicy):
    """Prefill: the observation window (last ``W(C)`` positions of the prompt, or with
    ``whole_prompt`` False of the context computed so far, clipped to this chunk) weighs
    1.0 (oldest) .. 1.2 (newest), other queries 0;
    decode: every query weighs 1. ``W(C) = min(obs_window, C)``, or with
    ``obs_window`` 0 the reference's ``ceil(obs_window_ratio * C)``. Default
    protected window: 4 sinks and the observation window (``recent = obs_window``,
    or ``ceil(obs_window_ratio * count)`` of the ``count`` tokens being compacted)."""

    name: ClassVar[str] = "pyramid"
    default_sinks: ClassVar[int] = DEFAULT_SINKS["pyramid"]
    #: reference configs: ``distance_weight`` = 1.2
    distance_weight: ClassVar[float] = 1.2

    #: voting queries (and protected newest tokens); 0 = ``ceil(obs_window_ratio * C)`` (the reference)
    obs_window: int = option_default("pyramid_window")
    #: the reference's observation window as a fraction of the context (used when ``obs_window`` is 0)
    obs_window_ratio: float = option_default("obs_window_ratio")
    #: max-pool kernel of the scores along keys (odd; 1 = the reference's per-token ranking)
    kernel: int = option_default("pyramid_kernel")
    #: restart kept tokens' scores from 0 after each compaction (false: votes carry over)
    reset_scores: bool = option_default("reset_scores")

    @classmethod
    def from_config(cls, cfg) -> "PyramidInferPolicy":
        return cls(sinks=cfg.sinks, recent_window=cfg.recent_window, obs_window=cfg.pyramid_window,
                   obs_window_ratio=cfg.obs_window_ratio, kernel=cfg.pyramid_kernel, reset_scores=cfg.reset_scores,
                   min_spans=cfg.pool_min_spans, tiebreak=cfg.pool_tiebreak,
                   last_query_weight=cfg.last_query_weight)

    @property
    def resets_scores(self) -> bool:
        return self.reset_scores

    def default_recent(self, budget: IntOrTensor, count: IntOrTensor | None = None) -> IntOrTensor:
        if self.obs_window:
            return self.obs_window
        return ceil_ratio(budget if count is None else count, self.obs_window_ratio)

    def window_len(self, num_computed_after: int) -> int:
        """Observation window of a context of ``num_computed_after`` tokens."""
        if self.obs_window:
            return min(self.obs_window, int(num_computed_after))
        return ceil_ratio(num_computed_after, self.obs_window_ratio)

    def voting_window(self, prompt_len: int) -> int:
        return max(1, self.window_len(prompt_len))

    def vote_weights(self, chunk_start, chunk_len, num_computed_after, is_prefill, prompt_len=None):
        if not is_prefill:
            return torch.ones(chunk_len, dtype=torch.float32)
        C = self.vote_end(num_computed_after, is_prefill, prompt_len)
        W = max(1, self.window_len(C))
        lo = C - W  # first position of the window
        pos = torch.arange(chunk_start, chunk_start + chunk_len, dtype=torch.float64)
        if W > 1:
            w = 1.0 + (self.distance_weight - 1.0) * (pos - lo) / (W - 1)
        else:
            w = torch.ones_like(pos)
        w = torch.where(pos >= lo, w, torch.zeros_like(w))
        return w.to(torch.float32)

    def score(self, acc: torch.Tensor, valid_len: IntOrTensor | None = None,
              room: IntOrTensor | None = None) -> torch.Tensor:
        if self.kernel == 1:  # the reference: per-token scores
            return acc
        return self.pool(acc, valid_len, room)
