"""Patch point: ``vllm.v1.core.kv_cache_manager.KVCacheManager.prefix_cache_lookup_enabled``.

vLLM's prefix cache shares full pages between requests with the same prefix
and lets a preempted request resume from its own pages without recomputing
them. Compaction rewrites a request's pages in place, so only requests that
never evict may take part: ``kv_manager.CompressedKVCacheManager.cache_blocks``
never caches the pages of a request that may evict, and this wrapper skips the
cache lookup for such a request (its prefix would otherwise land on pages it
is about to rewrite). Requests that never outgrow their budget (short chats,
or ``--kv-budget`` above prompt + output) keep vanilla vLLM's prefix caching,
which ``--no-enable-prefix-caching`` turns off as usual. vLLM's prefix-cache
hit rate then counts only those requests (it skips requests that skip the lookup).
"""

from __future__ import annotations

from vllm_kvcompress.integration.common import patch_method


def may_evict(kv_cache_manager, request) -> bool:
    """Whether any compressed KV-cache group of ``request`` can ever evict."""
    from vllm_kvcompress.integration.kv_manager import CompressedKVCacheManager

    return any(isinstance(m, CompressedKVCacheManager) and m.may_evict(request)
               for m in kv_cache_manager.coordinator.single_type_managers)


def apply() -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    def wrap(original):
        def prefix_cache_lookup_enabled(self, request) -> bool:
            return original(self, request) and not may_evict(self, request)
        return prefix_cache_lookup_enabled

    patch_method(KVCacheManager, "prefix_cache_lookup_enabled", wrap)
