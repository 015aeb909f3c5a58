"""Eviction policies (pure torch): H2O, PyramidInfer, SnapKV, StreamingLLM.

``get_policy(cfg)`` builds the policy of a :class:`~vllm_kvcompress.config.KVCompressConfig`;
``compress_step`` / ``select`` (``.base``) and ``layer_budgets`` /
``retained_count`` (``.schedule``) are what the vLLM worker and the dense
oracle share. See ``docs/policies.md``.
"""

from __future__ import annotations

import dataclasses

from ..config import POLICY_NAMES, KVCompressConfig
from .base import BasePolicy, NoPolicy, ceil_ratio, compress_step, group_mean, select, select_tokens
from .h2o import H2OPolicy
from .pyramid import PyramidInferPolicy
from .schedule import (
    UNBOUNDED,
    budget_floor,
    drop_counts,
    layer_budgets,
    max_slots,
    retained_count,
    stage_budgets,
    stage_layout,
)
from .snapkv import SnapKVPolicy
from .streaming import StreamingLLMPolicy

__all__ = [
    "POLICIES",
    "POLICY_CLASSES",
    "get_policy",
    "BasePolicy",
    "NoPolicy",
    "H2OPolicy",
    "PyramidInferPolicy",
    "SnapKVPolicy",
    "StreamingLLMPolicy",
    "select",
    "compress_step",
    "select_tokens",
    "drop_counts",
    "group_mean",
    "ceil_ratio",
    "UNBOUNDED",
    "layer_budgets",
    "stage_budgets",
    "stage_layout",
    "retained_count",
    "max_slots",
    "budget_floor",
]

#: policy names accepted by ``KVCompressConfig.policy``
POLICIES: tuple[str, ...] = POLICY_NAMES

POLICY_CLASSES: dict[str, type[BasePolicy]] = {
    "none": NoPolicy,
    "h2o": H2OPolicy,
    "pyramid": PyramidInferPolicy,
    "snapkv": SnapKVPolicy,
    "streaming": StreamingLLMPolicy,
}

if tuple(POLICY_CLASSES) != POLICY_NAMES:  # the config validates names, this registry builds them
    raise ImportError(f"policies.POLICY_CLASSES {tuple(POLICY_CLASSES)} != config.POLICY_NAMES {POLICY_NAMES}")


def get_policy(cfg: KVCompressConfig) -> BasePolicy:
    """The policy object for ``cfg`` (``NoPolicy`` for 'none')."""
    policy = POLICY_CLASSES[cfg.policy].from_config(cfg)
    return dataclasses.replace(policy, whole_prompt=cfg.prompt_compaction == "once")
