"""Scheduler side: the ``SingleTypeKVCacheManager`` of compressed layers
(registered for :class:`~vllm_kvcompress.integration.kv_spec.CompressedAttentionSpec`
by ``kv_spec``; subclass of vLLM's ``FullAttentionManager``).

It knows HOW MANY tokens each request's layers of this group retain (a pure
function of computed tokens and the stage budget, ``vllm_kvcompress.paging``),
never WHICH: it frees the pages in front of the compacted window, like vLLM's
sliding-window manager frees pages that left the window, and caps admission by
the most pages a request of this group can ever hold.

With ``decode_evict: false`` a request's layers grow past the prompt
(``grow_from``), so there is no admission cap: vLLM counts its tokens as usual.

Prefix caching: a request that can never outgrow this group's budget (prompt +
``max_tokens`` <= budget) is never compacted, so its pages hold exactly what
vanilla vLLM's would and are cached and shared as usual; pages of a request
that may evict are rewritten in place by compaction and are never cached
(``cache_blocks``) nor looked up (``integration.prefix_cache``).
"""

from __future__ import annotations

from vllm.config import get_current_vllm_config_or_none
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from vllm_kvcompress import paging
from vllm_kvcompress.policies.schedule import max_slots

#: request id -> the request's own ``kv_budget`` (filled by ``integration.request_budget``
#: when the scheduler admits a request, dropped when it is freed for good)
REQUEST_BUDGETS: dict[str, float | int] = {}


class CompressedKVCacheManager(FullAttentionManager):
    """vLLM's full-attention manager whose requests hold only their compacted window.

    After a step brings a request to ``C`` computed tokens, its entries before
    ``paging.window_start(C, budget, interval, block_size)`` are freed (nulled),
    as ``SlidingWindowManager`` frees pages that left its window.
    """

    def __init__(self, kv_cache_spec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        cfg = kv_cache_spec.compress_config
        self.interval = cfg.compress_interval
        self.retention_args = cfg.retention_args
        self.decode_evict = cfg.decode_evict
        self.num_layers = kv_cache_spec.num_layers_in_stage
        vc = get_current_vllm_config_or_none()
        self.max_chunk = vc.scheduler_config.max_num_batched_tokens if vc is not None else 1 << 20
        # metrics (integration.metrics reads them): per running request (computed, retained)
        # tokens per layer, and running totals of evicted layer-tokens and freed pages
        self.req_tokens: dict[str, tuple[int, int]] = {}
        self.evicted_tokens = 0
        self.freed_blocks = 0

    def budget(self, prompt_len: int, request_id: str | None = None) -> int:
        return self.kv_cache_spec.budget(prompt_len, REQUEST_BUDGETS.get(request_id))

    def may_evict(self, request) -> bool:
        """Whether ``request`` can ever hold more tokens than this group's budget."""
        max_new = request.max_tokens if request.max_tokens is not None else 1 << 40
        return request.num_prompt_tokens + max_new > self.budget(request.num_prompt_tokens, request.request_id)

    def cache_blocks(self, request, num_tokens, *args, **kwargs) -> None:
        if self.may_evict(request):
            return  # compaction rewrites these pages: they must never be shared
        super().cache_blocks(request, num_tokens, *args, **kwargs)

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        if num_prompt_tokens is None or request_id not in self.req_to_blocks:
            return
        c = processed_computed_tokens
        budget = self.budget(num_prompt_tokens, request_id)
        rule = self.retention_args(num_prompt_tokens)
        kept = paging.retained_count(c, budget, self.interval, **rule)
        prev_c, prev_kept = self.req_tokens.get(request_id, (0, 0))
        self.evicted_tokens += max((c - kept) - (prev_c - prev_kept), 0) * self.num_layers
        self.req_tokens[request_id] = (c, kept)
        start = paging.window_start(c, budget, self.interval, self.block_size, **rule)
        if start > 0:
            blocks = self.req_to_blocks[request_id]
            end = min(start, len(blocks))
            i = end - 1
            while i >= 0 and blocks[i] is not self._null_block:  # what the removal below frees
                i -= 1
            self.freed_blocks += end - 1 - i
            self._remove_blocks_in_range(request_id, 0, end)

    def pop_blocks_for_free(self, request_id: str) -> list:
        # every way out (free, preemption, deferred free, ``free_order``) pops here
        self.req_tokens.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model,
                                   apply_admission_cap: bool = False, prefill_end: int = 0) -> int:
        if apply_admission_cap and prefill_end > 0 and self.decode_evict:
            # Admission gate: the most pages a request of this group ever holds
            # (budget + compaction slack + one chunk + a partly used front page; with
            # prompt_compaction "once" a chunked prompt holds its tokens until its last
            # chunk: up to prefill_end - 1 + one chunk). With decode_evict false a request
            # grows after its prompt (a resumed one holds its generated tokens too): no
            # cap, admission counts tokens as vLLM does.
            budget = self.budget(prefill_end, request_id)
            hold = self.retention_args(prefill_end)["hold_until"]
            cap = cdiv(max_slots(budget, self.interval, self.max_chunk, hold), self.block_size) + 1
            num_tokens = min(num_tokens, cap * self.block_size)
        return super().get_num_blocks_to_allocate(
            request_id, num_tokens, new_computed_blocks, total_computed_tokens, num_local_computed_tokens,
            num_tokens_main_model, apply_admission_cap=apply_admission_cap, prefill_end=prefill_end)
