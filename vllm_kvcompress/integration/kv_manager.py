"""Scheduler side: the ``SingleTypeKVCacheManager`` of compressed layers
(registered for :class:`~vllm_kvcompress.integration.kv_spec.CompressedAttentionSpec`
by ``kv_spec``; subclass of vLLM's ``FullAttentionManager``).

It knows HOW MANY tokens each request's layers of this group retain (a pure
function of computed tokens and the stage budget, ``vllm_kvcompress.paging``),
never WHICH: it frees the pages in front of the compacted window, like vLLM's
sliding-window manager frees pages that left the window, and caps admission by
the most pages a request of this group can ever hold.
"""

from __future__ import annotations

from vllm.config import get_current_vllm_config_or_none
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from vllm_kvcompress import paging


class CompressedKVCacheManager(FullAttentionManager):
    def __init__(self, kv_cache_spec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        cfg = kv_cache_spec.compress_config
        self.interval = cfg.compress_interval
        vc = get_current_vllm_config_or_none()
        self.max_chunk = vc.scheduler_config.max_num_batched_tokens if vc is not None else 1 << 20

    def budget(self, prompt_len: int) -> int:
        return self.kv_cache_spec.budget(prompt_len)

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        if num_prompt_tokens is None or request_id not in self.req_to_blocks:
            return
        start = paging.window_start(processed_computed_tokens, self.budget(num_prompt_tokens),
                                    self.interval, self.block_size)
        if start > 0:
            blocks = self.req_to_blocks[request_id]
            self._remove_blocks_in_range(request_id, 0, min(start, len(blocks)))

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model,
                                   apply_admission_cap: bool = False, prefill_end: int = 0) -> int:
        if apply_admission_cap and prefill_end > 0:
            # Admission gate: the most pages a request of this group ever holds
            # (budget + compaction slack + one chunk + a partly used front page).
            budget = self.budget(prefill_end)
            cap = cdiv(budget + self.interval - 1 + self.max_chunk, self.block_size) + 1
            num_tokens = min(num_tokens, cap * self.block_size)
        return super().get_num_blocks_to_allocate(
            request_id, num_tokens, new_computed_blocks, total_computed_tokens, num_local_computed_tokens,
            num_tokens_main_model, apply_admission_cap=apply_admission_cap, prefill_end=prefill_end)
