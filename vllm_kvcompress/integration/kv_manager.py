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

Prefix caching (``docs/serving.md``): a request that can never outgrow this group's
budget (prompt + ``max_tokens`` <= budget) is never compacted, so its pages hold
exactly what vanilla vLLM's would and are cached and shared as usual. A request
that may evict (with ``prompt_compaction: once``, without ``prefill_drop``:
``KVCompressConfig.shares_prefix_cache``) takes part too, without ever writing a
page another request may read:

* **copy on hit, only where the window lands**: of the cached pages its prompt
  starts with, those its compacted window will rewrite (from
  ``paging.window_start`` of its prompt on) are copied into pages of its own
  before its first step (vLLM's copy-on-write transport, ``_apply_cow``); the
  pages before them are read in place, as vanilla reads a hit, and left behind
  by its compaction. Both kinds start with zeroed scores (the workers zero the
  copies' and the in-place pages' score slots, ``block_copies``). A page's
  score slots serve one voter at a time: the request that read it in place or
  cached it, until that request's prompt is compacted (``owner``); a request
  that hits a page another voter holds copies it instead. So compaction
  rewrites only a request's own pages and its scores never mix with another
  request's;
* **cached prompt pages stay intact**: it caches its full prompt pages as vanilla
  does; at the step that compacts its prompt, every cached page its compacted
  window will rewrite hands its cache entry to a fresh page that the workers fill
  with the page's content inside each layer, after the step's keys are written
  and before compaction (``save_copies``, ``block_copies``). Pages before the
  window are never written again. Generated tokens live in the window, so pages
  past the prompt are never cached.

Pages cached during the current step are not yet written when the step's copies
run, so a hit stops before them (``fresh``; ``prefix_cache``).

With ``prefix_hit: keep`` a request that hits keeps the hit prefix whole instead: its row
holds the cached pages, as a vanilla request's does, and only its own tokens are compacted
(``paging``'s ``frozen``: the budget and the rule of its ``P - F`` own prompt tokens; the
entries freed are those after the prefix). Nothing is copied on a hit; the lookup stops
before any page another request still votes into, whose scores its attention would add to.
"""

from __future__ import annotations

from vllm.config import get_current_vllm_config_or_none
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from vllm_kvcompress import paging
from vllm_kvcompress.integration.prefix_cache import DEFERRED, LOOKUP_CUTS, LOOKUP_HITS
from vllm_kvcompress.policies import get_policy
from vllm_kvcompress.policies.schedule import max_slots

#: request id -> the request's own ``kv_budget`` (filled by ``integration.request_budget``
#: when the scheduler admits a request, dropped when it is freed for good)
REQUEST_BUDGETS: dict[str, float | int] = {}
#: request id -> request, for requests whose prefix-cache lookup hit (``integration.prefix_cache``
#: fills it; vLLM passes the managers only the id). A group copies the hit pages of those that
#: may evict in it. Dropped when the request's pages are freed.
HITS: dict[str, object] = {}
#: request id -> the tokens of its prompt it keeps whole (``prefix_hit: keep``: its prefix-cache
#: hit, set by ``integration.prefix_cache`` at each lookup; dropped when its pages are freed)
FROZEN: dict[str, int] = {}


def compressed_groups(kv_cache_manager) -> list[tuple[int, "CompressedKVCacheManager"]]:
    """``(group id, manager)`` of every compressed KV-cache group of vLLM's ``KVCacheManager``
    (the groups are fixed at start-up: computed once per manager)."""
    found = kv_cache_manager.__dict__.get("_kvcompress_groups")
    if found is None:
        managers = getattr(getattr(kv_cache_manager, "coordinator", None), "single_type_managers", ())
        found = [(g, m) for g, m in enumerate(managers) if isinstance(m, CompressedKVCacheManager)]
        kv_cache_manager.__dict__["_kvcompress_groups"] = found
    return found


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
        self.paging_args = cfg.paging_args
        self.decode_evict = cfg.decode_evict
        self.num_layers = kv_cache_spec.num_layers_in_stage
        self.policy = get_policy(cfg)
        vc = get_current_vllm_config_or_none()
        self.max_chunk = vc.scheduler_config.max_num_batched_tokens if vc is not None else 1 << 20
        # metrics (integration.metrics reads them): per running request (computed, retained)
        # tokens per layer, and running totals of evicted layer-tokens and freed pages
        self.req_tokens: dict[str, tuple[int, int]] = {}
        self.evicted_tokens = 0
        self.freed_blocks = 0
        self._init_sharing(cfg)

    def budget(self, prompt_len: int, request_id: str | None = None) -> int:
        return self.kv_cache_spec.budget(prompt_len, REQUEST_BUDGETS.get(request_id))

    def may_evict(self, request) -> bool:
        """Whether ``request`` can ever hold more tokens than this group's budget (after a kept
        prefix: its own tokens against the budget of its own prompt tokens)."""
        max_new = request.max_tokens if request.max_tokens is not None else 1 << 40
        own = request.num_prompt_tokens - self.frozen(request.request_id)
        return own + max_new > self.budget(own, request.request_id)

    # ---------------------------------------------------------------- prefix caching
    supports_fine_grained_hash_lookup = False  # hits and copies are whole pages

    def _init_sharing(self, cfg) -> None:
        self.shares = cfg.shares_prefix_cache
        self.fresh: set[int] = set()  # block ids cached during the current step (not yet written)
        self.cow_pending: dict[str, list[tuple[int, object]]] = {}  # request -> hit pages to copy
        self.save_copies: list[tuple[object, object]] = []  # (rewritten page, its cache copy) this step
        self.saved: set[str] = set()  # requests whose prompt pages were handed over already
        self.step_end: dict[str, int] = {}  # request -> computed tokens after the step being allocated
        self.pin = cfg.pin_prefix_hits
        self.keep_hits = cfg.keeps_prefix_hits
        self.pinned: dict[str, list] = {}  # request -> the cached pages it hit, held until it is freed
        self.cow_pages = 0  # running totals (metrics, tests): hit pages copied,
        self.inplace_pages = 0  # hit pages read in place,
        self.saved_pages = 0  # cached pages handed to a copy before a compaction
        # score slots have one voter at a time: block id -> the request whose votes they hold until
        # its prompt is compacted (its own cached pages and the hit pages it reads in place)
        self.owner: dict[int, str] = {}
        self.owned: dict[str, list[int]] = {}
        self.zero_pages: list = []  # hit pages read in place from this step on: the workers zero their scores

    def shares_cache(self, request) -> bool:
        """Whether ``request`` reads and writes vLLM's prefix cache in this group."""
        return self.enable_caching and (self.shares or not self.may_evict(request))

    def new_step_starts(self) -> None:
        super().new_step_starts()
        self.fresh.clear()

    def cache_blocks(self, request, num_tokens, *args, **kwargs) -> None:
        if not self.may_evict(request):
            return super().cache_blocks(request, num_tokens, *args, **kwargs)
        if not self.shares:
            return  # compaction rewrites these pages: they must never be shared
        rid = request.request_id
        P = request.num_prompt_tokens
        before = self.num_cached_block.get(rid, 0)
        super().cache_blocks(request, min(num_tokens, P), *args, **kwargs)
        blocks = self.req_to_blocks[rid]
        after = self.num_cached_block.get(rid, 0)
        self.fresh.update(b.block_id for b in blocks[before:after] if not b.is_null)
        if rid not in self.saved:  # its votes fill these pages' score slots until its prompt is compacted
            self._own(rid, blocks[before:after])
        # vLLM passes whole pages here; the step's true end is what allocate_new_blocks saw
        if self.step_end.pop(rid, num_tokens) >= P and rid not in self.saved:
            self.saved.add(rid)
            self._save_before_compaction(request, after)

    def frozen(self, request_id: str) -> int:
        """Tokens of ``request_id``'s prompt kept whole (``prefix_hit: keep``), else 0."""
        return FROZEN.get(request_id, 0) if self.keep_hits else 0

    def rule(self, prompt_len: int, request_id: str) -> tuple[int, dict]:
        """``(budget, paging keywords)`` of a request: the budget and ``retention_args`` of its
        own prompt tokens (all of them unless it keeps a hit prefix), and ``frozen``."""
        f = self.frozen(request_id)
        return self.budget(prompt_len - f, request_id), self.paging_args(prompt_len, f)

    def prompt_window_start(self, request) -> int:
        """The first row entry ``request``'s compacted window writes once its prompt is done (the
        entries before it are never written again; ``paging.window_start`` is monotone)."""
        P, rid = request.num_prompt_tokens, request.request_id
        budget, rule = self.rule(P, rid)
        return rule["frozen"] // self.block_size + paging.window_start(P, budget, self.interval, self.block_size, **rule)

    def _save_before_compaction(self, request, num_cached: int) -> None:
        """This step compacts ``request``'s prompt: the cached pages from its new window's first
        entry on hand their cache entries to fresh pages (filled by the workers before the
        compaction), or drop them when the pool has no room to spare."""
        rid = request.request_id
        first = self.prompt_window_start(request)
        blocks = self.req_to_blocks[rid]
        todo = [b for b in blocks[first:num_cached] if not b.is_null and b.block_hash is not None]
        if not todo:
            return
        pool = self.block_pool
        spare = pool.get_num_free_blocks() - len(self.req_to_blocks)  # one page per running request
        n = max(0, min(len(todo), spare))
        for b, f in zip(todo[:n], pool.get_new_blocks(n) if n else ()):
            pool.move_block_hashes(b, f)
            b.ref_cnt += 1  # both ends stay held until the step ran (freed by vLLM's copy retention)
            self.save_copies.append((b, f))
            self.fresh.add(f.block_id)
        self.saved_pages += n
        for b in todo[n:]:
            pool._maybe_evict_cached_block(b)

    def add_local_computed_blocks(self, request_id, new_computed_blocks, num_local_computed_tokens,
                                  num_external_computed_tokens) -> None:
        super().add_local_computed_blocks(request_id, new_computed_blocks, num_local_computed_tokens,
                                          num_external_computed_tokens)
        if self._copies_hits(request_id):
            hits = [(i, b) for i, b in enumerate(self.req_to_blocks[request_id]) if not b.is_null]
            if hits:
                self.cow_pending[request_id] = hits

    def _copies_hits(self, request_id: str) -> bool:
        req = HITS.get(request_id)
        return req is not None and self.shares and self.may_evict(req) and not self.frozen(request_id)

    def _to_copy(self, request_id: str, hits) -> list[bool]:
        """For each hit ``(entry, page)`` of a request that may evict: whether it must be copied
        (its compacted window will rewrite the entry, or another request votes into the page's
        score slots) rather than read in place."""
        first = self.prompt_window_start(HITS[request_id])
        return [i >= first or b.block_id in self.owner for i, b in hits]

    def _own(self, request_id: str, blocks) -> None:
        mine = self.owned.setdefault(request_id, [])
        for b in blocks:
            if not b.is_null and b.block_id not in self.owner:
                self.owner[b.block_id] = request_id
                mine.append(b.block_id)

    def _release(self, request_id: str) -> None:
        for bid in self.owned.pop(request_id, ()):
            if self.owner.get(bid) == request_id:
                del self.owner[bid]

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        self.step_end[request_id] = num_tokens_main_model  # computed tokens after this step
        hits = self.cow_pending.pop(request_id, None)
        copies = []
        if hits:
            # the entries the compacted window rewrites get pages of their own before the first step;
            # the others read the cached page in place, with this request as their scores' voter
            copy = self._to_copy(request_id, hits)
            todo = [h for h, c in zip(hits, copy) if c]
            for (i, src), dst in zip(todo, self.block_pool.get_new_blocks(len(todo))):
                self._apply_cow(request_id, i, src, dst)
                copies.append(dst)
            inplace = [b for (_, b), c in zip(hits, copy) if not c]
            self._own(request_id, inplace)
            for b in inplace:
                b.ref_cnt += 1  # held until the step that zeroes its scores ran (vLLM's copy retention)
            self.zero_pages.extend(inplace)
            self.cow_pages += len(todo)
            self.inplace_pages += len(inplace)
            if self.pin:
                # the request keeps holding the shared pages it hit, as vanilla's requests do, so a
                # prefix in use stays cached (freed with the request's own pages)
                for _, src in hits:
                    src.ref_cnt += 1
                self.pinned[request_id] = [src for _, src in hits]
        return copies + super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        if num_prompt_tokens is None or request_id not in self.req_to_blocks:
            return
        c = processed_computed_tokens
        budget, rule = self.rule(num_prompt_tokens, request_id)
        kept = paging.held_count(c, budget, self.interval, **rule)
        prev_c, prev_kept = self.req_tokens.get(request_id, (0, 0))
        self.evicted_tokens += max((c - kept) - (prev_c - prev_kept), 0) * self.num_layers
        self.req_tokens[request_id] = (c, kept)
        if c >= num_prompt_tokens and request_id in self.owned:
            # its prompt step ran: its row holds no cached page any more (the pages before its window
            # were dropped, the cache entries from the window on were handed to copies), so no other
            # request can read a page it still votes into
            self._release(request_id)
        start = paging.window_start(c, budget, self.interval, self.block_size, **rule)
        if start > 0:
            first = rule["frozen"] // self.block_size  # a kept prefix stays
            blocks = self.req_to_blocks[request_id]
            end = min(first + start, len(blocks))
            i = end - 1
            while i >= first and blocks[i] is not self._null_block:  # what the removal below frees
                i -= 1
            self.freed_blocks += end - 1 - i
            self._remove_blocks_in_range(request_id, first, end)

    def pop_blocks_for_free(self, request_id: str) -> list:
        # every way out (free, preemption, deferred free, ``free_order``) pops here
        self.req_tokens.pop(request_id, None)
        self.cow_pending.pop(request_id, None)
        self.saved.discard(request_id)
        self.step_end.pop(request_id, None)
        HITS.pop(request_id, None)
        FROZEN.pop(request_id, None)
        LOOKUP_HITS.pop(request_id, None)
        LOOKUP_CUTS.pop(request_id, None)
        DEFERRED.discard(request_id)
        self._release(request_id)
        # pinned hit pages first: freed in reverse order, the prompt's start is evicted last
        return self.pinned.pop(request_id, []) + super().pop_blocks_for_free(request_id)

    def cap_pages(self, prefill_end: int, request_id: str | None = None) -> int:
        """Admission gate: the most pages a request of this group ever holds (budget +
        compaction slack + one chunk + a partly used front page; with prompt_compaction
        "once" a chunked prompt holds its tokens until its last chunk: up to prefill_end - 1
        + one chunk). With decode_evict false a request grows after its prompt (a resumed
        one holds its generated tokens too): no cap, admission counts tokens as vLLM does."""
        f = self.frozen(request_id) if request_id is not None else 0
        budget = self.budget(prefill_end - f, request_id)
        hold = self.retention_args(prefill_end - f)["hold_until"]
        return f // self.block_size + cdiv(max_slots(budget, self.interval, self.max_chunk, hold), self.block_size) + 1

    def admission_pages(self, request) -> int:
        """Pages vLLM's admission asks of this group for ``request`` (its whole sequence, capped)."""
        pages = cdiv(request.num_tokens + (request.max_tokens or 0), self.block_size)
        return min(pages, self.cap_pages(request.num_prompt_tokens, request.request_id)) if self.decode_evict else pages

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model,
                                   apply_admission_cap: bool = False, prefill_end: int = 0) -> int:
        if apply_admission_cap and prefill_end > 0 and self.decode_evict:
            num_tokens = min(num_tokens, self.cap_pages(prefill_end, request_id) * self.block_size)
        n = super().get_num_blocks_to_allocate(
            request_id, num_tokens, new_computed_blocks, total_computed_tokens, num_local_computed_tokens,
            num_tokens_main_model, apply_admission_cap=apply_admission_cap, prefill_end=prefill_end)
        if request_id not in self.num_cached_block and self._copies_hits(request_id):
            # copy on hit: a page of its own for each entry its compacted window will rewrite
            hits = [(i, b) for i, b in enumerate(new_computed_blocks) if not b.is_null]
            n += sum(self._to_copy(request_id, hits))
        return n
