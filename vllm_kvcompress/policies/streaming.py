"""StreamingLLM (Xiao et al., 2023): attention sinks + a sliding window.

Scores are all zero; with :func:`~.base.select`'s tie rule (the more recent
token wins) the survivors are exactly the ``sinks`` oldest and the newest
``budget - sinks`` tokens, whatever ``recent_window`` resolves to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import DEFAULT_SINKS
from .base import BasePolicy, IntOrTensor

__all__ = ["StreamingLLMPolicy"]


@dataclass(frozen=True)
class StreamingLLMPolicy(BasePolicy):
    """Keep the first ``sinks`` (default 4) and the most recent tokens; attention is ignored."""

    name: ClassVar[str] = "streaming"
    reset_after_compaction: ClassVar[bool] = True
    needs_attention: ClassVar[bool] = False
    default_sinks: ClassVar[int] = DEFAULT_SINKS["streaming"]

    def default_recent(self, budget: IntOrTensor, count: IntOrTensor | None = None) -> IntOrTensor:
        s = self.sinks if self.sinks is not None else self.default_sinks
        r = budget - s
        return r.clamp_min(0) if isinstance(r, torch.Tensor) else max(r, 0)

    def query_weights(self, chunk_start, chunk_len, num_computed_after, is_prefill, prompt_len=None):
        return torch.zeros(chunk_len, dtype=torch.float32)

    def score(self, acc, valid_len=None, room=None):
        return torch.zeros_like(acc, dtype=torch.float32)
