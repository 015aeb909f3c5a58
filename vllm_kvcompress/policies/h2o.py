"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention + a recent window.

Reference: FMInference/H2O ``h2o_hf/utils_real_drop/modify_llama.py``
(``H2OKVCache_LayerWise``): every query's attention probabilities are summed
into a per-key score that keeps accumulating across steps; the cache keeps the
``recent_size`` newest tokens plus the ``hh_size`` top-scored older ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import BasePolicy, IntOrTensor

__all__ = ["H2OPolicy"]


@dataclass(frozen=True)
class H2OPolicy(BasePolicy):
    """Every query (prefill and decode) weighs 1; scores accumulate for a token's lifetime.

    Default window: no sinks, ``recent = budget // 2`` (the paper's half heavy
    hitters / half recent split).
    """

    name: ClassVar[str] = "h2o"
    reset_after_compaction: ClassVar[bool] = False
    default_sinks: ClassVar[int] = 0

    def default_recent(self, budget: IntOrTensor) -> IntOrTensor:
        return budget // 2
