"""Patch points: ``vllm.model_executor.layers.attention.Attention.get_kv_cache_spec``
and ``vllm.v1.kv_cache_spec_registry.KVCacheSpecRegistry._ensure_registered``.

With a policy on, every decoder attention layer reports a
:class:`CompressedAttentionSpec` carrying its pyramid *stage*. Specs of different
stages refuse to merge, so vLLM's hybrid allocator puts each stage (equally many
consecutive layers sharing one budget) in its own KV-cache group, all groups
drawing pages from one pool. The registry maps the spec to
:class:`~vllm_kvcompress.integration.kv_manager.CompressedKVCacheManager`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass

from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec

from vllm_kvcompress.config import KVCompressConfig
from vllm_kvcompress.integration.common import kv_config_of, patch_method
from vllm_kvcompress.policies import layer_budgets, stage_layout


@dataclass(frozen=True, kw_only=True)
class CompressedAttentionSpec(FullAttentionSpec):
    """Full attention whose retained tokens per request are capped by a budget."""

    kv_stage: int = 0
    kv_first_layer: int = 0  # first model layer of the stage (its budget is the stage's)
    kv_num_layers: int = 1  # layers in the model (the schedule's input)
    kv_config: str = "{}"  # KVCompressConfig as JSON (hashable)

    @classmethod
    def merge(cls, specs: list["CompressedAttentionSpec"]) -> "CompressedAttentionSpec":
        if not all(isinstance(s, CompressedAttentionSpec) and s == specs[0] for s in specs[1:]):
            raise AssertionError("compressed layers of different stages cannot share a KV-cache group")
        return copy.deepcopy(specs[0])

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(s == self for s in kv_cache_specs.values())

    @property
    def compress_config(self) -> KVCompressConfig:
        return _config_from_json(self.kv_config)

    def budget(self, prompt_len: int, request_budget: float | int | None = None) -> int:
        """This stage's retained-token budget for a request with ``prompt_len`` prompt tokens
        (and, if it asked for one, its own lower ``kv_budget``)."""
        return _stage_budget(self.kv_config, self.kv_num_layers, self.kv_first_layer, int(prompt_len),
                             request_budget)

    def budget_of_layer(self, layer: int, prompt_len: int, request_budget: float | int | None = None) -> int:
        """:meth:`budget` of model layer ``layer`` (any stage)."""
        return _stage_budget(self.kv_config, self.kv_num_layers, layer, int(prompt_len), request_budget)

    @property
    def num_layers_in_stage(self) -> int:
        return len(stages_for(self.compress_config, self.kv_num_layers)[self.kv_stage])


@functools.lru_cache(maxsize=64)
def _config_from_json(s: str) -> KVCompressConfig:
    return KVCompressConfig.from_json(s)


@functools.lru_cache(maxsize=65536)
def _stage_budget(cfg_json: str, num_layers: int, layer: int, prompt_len: int,
                  request_budget: float | int | None = None) -> int:
    cfg = _config_from_json(cfg_json)
    b = layer_budgets(cfg, num_layers, prompt_len)[layer]
    if request_budget is not None:
        try:  # validated by the frontend (integration.request_budget); a bad value changes nothing
            lower = dataclasses.replace(cfg, budget=request_budget)
        except ValueError:
            return b
        b = min(b, layer_budgets(lower, num_layers, prompt_len)[layer])
    return b


def stages_for(cfg: KVCompressConfig, num_layers: int) -> list[list[int]]:
    """Layer indices per KV-cache group: one group when every layer shares the budget."""
    if cfg.resolved_schedule == "uniform":
        return [list(range(num_layers))]
    return stage_layout(cfg, num_layers)


def compressed_spec(spec: FullAttentionSpec, cfg: KVCompressConfig, layer_idx: int,
                    num_layers: int) -> CompressedAttentionSpec:
    stages = stages_for(cfg, num_layers)
    stage = next(i for i, layers in enumerate(stages) if layer_idx in layers)
    base = {f.name: getattr(spec, f.name) for f in dataclasses.fields(FullAttentionSpec) if f.init}
    return CompressedAttentionSpec(**base, kv_stage=stage, kv_first_layer=stages[stage][0],
                                   kv_num_layers=num_layers, kv_config=cfg.to_json())


def _register() -> None:
    from vllm.v1.kv_cache_spec_registry import _REGISTRY_KVCACHESPEC_LIST, KVCacheSpecRegistry

    from vllm_kvcompress.integration.kv_manager import CompressedKVCacheManager

    if CompressedAttentionSpec not in _REGISTRY_KVCACHESPEC_LIST:
        KVCacheSpecRegistry.register(CompressedAttentionSpec, CompressedKVCacheManager,
                                     uniform_type_base_spec=CompressedAttentionSpec)


def apply() -> None:
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    def wrap_spec(original):
        def get_kv_cache_spec(self, vllm_config):
            spec = original(self, vllm_config)
            cfg = kv_config_of(vllm_config)
            if not cfg.enabled or type(spec) is not FullAttentionSpec or spec.sliding_window is not None:
                return spec
            num_layers = vllm_config.model_config.get_total_num_hidden_layers()
            return compressed_spec(spec, cfg, extract_layer_index(self.layer_name), num_layers)
        return get_kv_cache_spec

    def wrap_registry(original):
        def _ensure_registered(cls, vllm_config=None):
            original.__func__(cls, vllm_config)
            _register()
        return _ensure_registered

    patch_method(Attention, "get_kv_cache_spec", wrap_spec)
    patch_method(KVCacheSpecRegistry, "_ensure_registered", wrap_registry, classmethod_=True)
