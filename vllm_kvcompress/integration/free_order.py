"""Patch points: ``vllm.v1.core.kv_cache_coordinator.KVCacheCoordinator.free`` and
``KVCacheCoordinator.pop_blocks_for_free``.

vLLM frees a request's pages tail first, so that under memory pressure the
prefix cache loses the end of a prompt before its start, and a preempted
request resumes from most of its prompt. With several KV-cache groups (the
plugin puts every pyramid stage in its own group) vLLM frees group after group:
the free queue then holds all of group 0's pages before any of group 1's, new
allocations evict group 0's pages down to its first ones, and since a prefix
hit must cover every group, the hit shrinks to what group 0 kept. On 1.9K-token
prompts with 6 groups that cost a resumed request most of its prompt, which
vanilla vLLM (one group) resumed almost for free.

With a compressed group present, these wrappers free the pages of all groups
interleaved by position, tail first (``[g0 p_n, g1 p_n, ..., g0 p_n-1, ...]``),
so every group loses its tail at the same pace. Pages of requests that may
evict carry no hash (``kv_manager``) and their order does not matter. Models
whose groups are not all full attention keep vLLM's order.
"""

from __future__ import annotations

from itertools import zip_longest

from vllm_kvcompress.integration.common import patch_method


def _applies(coordinator) -> bool:
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    from vllm_kvcompress.integration.kv_manager import CompressedKVCacheManager

    managers = coordinator.single_type_managers
    return (len(managers) > 1 and any(isinstance(m, CompressedKVCacheManager) for m in managers)
            and all(isinstance(m, FullAttentionManager) and m.block_pool is coordinator.block_pool
                    for m in managers))


def interleave(per_group: list[list]) -> list:
    """Blocks of every group in position order: ``[g0 p0, g1 p0, ..., g0 p1, g1 p1, ...]``
    (reversed, the tail positions of all groups come first)."""
    return [b for row in zip_longest(*per_group) for b in row if b is not None]


def apply() -> None:
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator

    def wrap_pop(original):
        def pop_blocks_for_free(self, request_id):
            if not _applies(self):
                return original(self, request_id)
            return interleave([m.pop_blocks_for_free(request_id) for m in self.single_type_managers])
        return pop_blocks_for_free

    def wrap_free(original):
        def free(self, request_id):
            if not _applies(self):
                return original(self, request_id)
            self.block_pool.free_blocks(reversed(self.pop_blocks_for_free(request_id)))
        return free

    patch_method(KVCacheCoordinator, "pop_blocks_for_free", wrap_pop)
    patch_method(KVCacheCoordinator, "free", wrap_free)
