"""Patch points: ``vllm.v1.core.kv_cache_manager.KVCacheManager.prefix_cache_lookup_enabled``
and ``KVCacheManager.get_computed_blocks`` (the prefix-cache lookup of a new request), and
``vllm.v1.core.sched.scheduler.Scheduler._handle_blocked_waiting_request`` (whether a waiting
request is scheduled in this step).

vLLM's prefix cache shares full pages between requests with the same prefix.
How compressed groups take part is ``kv_manager``'s (copy on hit, cached prompt
pages kept intact); this module decides which requests look up and how far a
hit may reach:

* A request that may evict in some compressed group but whose config cannot
  share (``prompt_compaction: per-chunk``, ``prefill_drop``:
  ``KVCompressConfig.shares_prefix_cache``) skips the lookup, as before; vLLM's
  hit-rate metric then skips it too.
* Otherwise a hit is cut so that it
  - leaves the prompt's voting queries to the request (``BasePolicy.hit_limit``:
    PyramidInfer's and SnapKV's window, H2O's question window), so the scores
    that rank the prompt are the ones it would compute without the cache, and
  - stops before any page cached during this step (``kv_manager``'s ``fresh``):
    such a page is written by this step's forward pass, after the copies of a
    new hit have run, and the request that caches it votes into its scores.
    A new request whose hit would stop there waits one step instead (once):
    vanilla vLLM's hit reaches such pages in the same step, and without the
    wait the request would recompute the prefix another request is computing;
  - with ``prefix_hit: keep`` (the request keeps the hit prefix whole and reads the cached
    pages in place, adding its votes to their score slots), stops before any page whose
    score slots another request still votes into (``kv_manager``'s ``owner``: a prompt
    being prefilled), so that request ranks its prompt as it would alone; the hit it
    takes is the prefix it keeps (``kv_manager.FROZEN``);
  - fits the pool: the first step of a request that hits holds the cached pages
    and their copies, which must not exceed the whole pool, or vLLM would keep the
    request waiting for pages that never come.
"""

from __future__ import annotations

from vllm_kvcompress.integration.common import patch_method

#: request id -> tokens its last lookup took from the cache (``metrics`` reads it when the
#: request starts running; vLLM's Request keeps no such count once its first output is out)
LOOKUP_HITS: dict[str, int] = {}
#: request id -> what its last lookup lost to each cut, in tokens: ``found`` (the hit vLLM's
#: lookup returned) and the tokens cut by ``voting_window`` (``hit_limit``), ``same_step`` (pages
#: cached during this step) and ``pool`` (the hit and its copies must fit the pool); ``metrics``
#: sums them for the stats file
LOOKUP_CUTS: dict[str, dict[str, int]] = {}


def _compressed_managers(kv_cache_manager):
    from vllm_kvcompress.integration.kv_manager import compressed_groups

    return compressed_groups(kv_cache_manager)


def may_evict(kv_cache_manager, request) -> bool:
    """Whether any compressed KV-cache group of ``request`` can ever evict."""
    return any(m.may_evict(request) for _, m in _compressed_managers(kv_cache_manager))


def shares_cache(kv_cache_manager, request) -> bool:
    """Whether ``request`` may read vLLM's prefix cache in every compressed group."""
    return all(m.shares_cache(request) for _, m in _compressed_managers(kv_cache_manager))


def keeps_hits(kv_cache_manager) -> bool:
    """Whether requests keep a hit prefix whole (``prefix_hit: keep``)."""
    return any(m.keep_hits for _, m in _compressed_managers(kv_cache_manager))


def hit_limit(kv_cache_manager, request) -> int:
    """The longest hit (tokens) ``request`` may take: the prompt's voting queries stay its own, and
    a prefix it keeps whole (``prefix_hit: keep``) lies inside its prompt (a resumed request's
    generated tokens may be cached too)."""
    limit = request.num_tokens - 1
    for _, m in _compressed_managers(kv_cache_manager):
        if m.may_evict(request):
            limit = min(limit, m.policy.hit_limit(request.num_prompt_tokens))
        if m.keep_hits:
            limit = min(limit, request.num_prompt_tokens - 1)
    return limit


#: requests that wait one step for pages cached in the step they would have started in (dropped
#: when scheduled or freed), and how many waits there were in this process (``metrics``)
DEFERRED: set[str] = set()
DEFERRALS = [0]


def reaches_fresh_pages(kv_cache_manager, request) -> bool:
    """Whether ``request``'s prefix-cache hit would reach a page cached during this step
    (``kv_manager``'s ``fresh``) in a compressed group where it may evict: what :func:`_cut`
    would cut as ``same_step``."""
    managers = [(g, m) for g, m in _compressed_managers(kv_cache_manager) if m.fresh and m.may_evict(request)]
    if not managers or not kv_cache_manager.enable_caching or not shares_cache(kv_cache_manager, request):
        return False
    pool = kv_cache_manager.block_pool
    bs = managers[0][1].block_size
    groups = [g for g, _ in managers]
    for h in request.block_hashes[: max(hit_limit(kv_cache_manager, request), 0) // bs]:
        found = pool.get_cached_block(h, groups)
        if found is None:
            return False
        if any(b.block_id in m.fresh for b, (_, m) in zip(found, managers)):
            return True
    return False


def _stop_before(blocks, managers, n: int, pages_of) -> int:
    """The hit's first ``n`` pages cut before the first page that is in ``pages_of(manager)`` in
    any of ``managers``' groups."""
    for g, m in managers:
        marked = pages_of(m)
        for i, b in enumerate(blocks.blocks[g][:n]):
            if b.block_id in marked:
                n = i
                break
    return n


def _cut(kv_cache_manager, blocks, num_tokens: int, request, cuts: dict[str, int]):
    """(blocks, tokens) of the hit cut to whole pages below the request's limit and before the
    first page cached during this step; the tokens each cut took go into ``cuts``."""
    managers = _compressed_managers(kv_cache_manager)
    bs = max(m.block_size for _, m in managers)
    n = min(num_tokens, max(hit_limit(kv_cache_manager, request), 0)) // bs
    cuts["voting_window"] = num_tokens - n * bs
    n_limit = n
    n = _stop_before(blocks, managers, n, lambda m: m.fresh)
    cuts["same_step"] = (n_limit - n) * bs
    n_fresh = n
    # (whether a request's own tokens evict is known only after the hit: every request that keeps one)
    n = _stop_before(blocks, [(g, m) for g, m in managers if m.keep_hits], n, lambda m: m.owner)
    cuts["voter"] = (n_fresh - n) * bs
    n_fresh = n
    # admission asks for the cached pages and the copies of those the compacted window rewrites
    # (at most all of them, counted so here). Cut the hit to what the whole pool could give, so
    # a request alone is always admitted (vLLM would otherwise keep it waiting for pages that
    # never come)
    capacity = kv_cache_manager.block_pool.num_gpu_blocks - 1
    base = sum(m.admission_pages(request) for _, m in managers)
    copying = sum(1 for _, m in managers if m.may_evict(request) and not m.keep_hits)
    n = max(0, min(n, (capacity - base) // copying)) if copying else n
    cuts["pool"] = (n_fresh - n) * bs
    if n * bs == num_tokens:
        return blocks, num_tokens
    tokens = n * bs
    cut = tuple(list(group[: tokens // mgr.block_size]) for group, mgr in
                zip(blocks.blocks, kv_cache_manager.coordinator.single_type_managers))
    return kv_cache_manager.create_kv_cache_blocks(cut), tokens


def apply() -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    def wrap_enabled(original):
        def prefix_cache_lookup_enabled(self, request) -> bool:
            return original(self, request) and shares_cache(self, request)
        return prefix_cache_lookup_enabled

    def wrap_lookup(original):
        def get_computed_blocks(self, request):
            from vllm_kvcompress.integration.kv_manager import FROZEN, HITS

            HITS.pop(request.request_id, None)
            FROZEN.pop(request.request_id, None)
            blocks, num_tokens, boundary = original(self, request)
            cuts = LOOKUP_CUTS[request.request_id] = {"found": num_tokens}
            if num_tokens and (may_evict(self, request) or keeps_hits(self)):
                blocks, num_tokens = _cut(self, blocks, num_tokens, request, cuts)
                if num_tokens:
                    HITS[request.request_id] = request
                else:
                    blocks, boundary = self.empty_kv_cache_blocks, 0
            if num_tokens and keeps_hits(self):
                FROZEN[request.request_id] = num_tokens
            LOOKUP_HITS[request.request_id] = num_tokens
            return blocks, num_tokens, boundary
        return get_computed_blocks

    def wrap_blocked(original):
        def _handle_blocked_waiting_request(self, request) -> bool:
            if not original(self, request):
                return False
            rid = request.request_id
            if (request.num_computed_tokens == 0 and rid not in DEFERRED
                    and reaches_fresh_pages(self.kv_cache_manager, request)):
                DEFERRED.add(rid)  # its prefix is being cached in this step: take the hit in the next
                DEFERRALS[0] += 1
                return False
            DEFERRED.discard(rid)
            return True
        return _handle_blocked_waiting_request

    patch_method(KVCacheManager, "prefix_cache_lookup_enabled", wrap_enabled)
    patch_method(KVCacheManager, "get_computed_blocks", wrap_lookup)
    patch_method(Scheduler, "_handle_blocked_waiting_request", wrap_blocked)
