"""Paging arithmetic shared by the vLLM scheduler and the workers (pure Python).

A compressed layer with budget ``B`` and compaction interval ``I`` that has
computed ``C`` tokens holds ``R(C) = retained_count(C, B, I)`` of them. Its
request's block-table row keeps vLLM's convention (entry ``j`` nominally covers
tokens ``[j*bs, (j+1)*bs)`` and the row only grows), but the retained tokens
live *compacted* in a window of the row that starts at entry

    S(C) = (C - R(C)) // bs        (whole pages' worth of evicted tokens)

slot ``p`` of the window being entry ``S(C) + p // bs``, offset ``p % bs``. The
scheduler frees (nulls) entries ``< S(C)`` exactly like vLLM's sliding-window
manager frees pages that left the window; the worker moves the retained tokens
into the window of the new ``S`` when it compacts, at the end of the step that
made ``C`` tokens computed — before the scheduler frees anything. The ``n``
tokens of the next step land at window slots ``R(C) .. R(C)+n-1``, which always
fall inside the row vLLM allocates (``S*bs + R + n <= C + n``).

Example (``B = 8``, ``I = 4``, ``bs = 4``)::

    C      : 8  9 10 11 12 13
    R(C)   : 8  9 10 11  8  9     (grows to B + I - 1, compacts back to B)
    S(C)   : 0  0  0  0  1  1     (entry 0 is freed once 4 tokens are evicted)

With ``decode_evict: false`` every function also takes ``grow_from`` (the
prompt length, ``KVCompressConfig.grow_from``): past it a layer only grows,
``R(C) = R(F) + (C - F)``, so ``S`` stops moving and the row keeps its pages.
With ``prompt_compaction: once`` (the default) they take ``hold_until`` (the prompt
length again): before it ``R(C) = C`` and ``S = 0``, so a chunked prompt keeps its
pages until its last chunk. Callers pass both as ``**cfg.retention_args(prompt_len)``.

**A kept prefix** (``prefix_hit: keep``): a request whose prompt starts with ``F``
tokens hit in vLLM's prefix cache (a whole number of pages) keeps them whole, in
the shared cached pages, and compresses only its own tokens. Every function then
takes ``frozen=F``: the rule above applies to the ``C - F`` tokens after the
prefix, with the budget and ``retention_args`` of its own ``P - F`` prompt tokens
(callers pass those), so the layer holds ``F + R(C - F)``. Its row keeps entries
``< F/bs`` (the prefix) and frees ``[F/bs, F/bs + S)``, where ``S =
window_start(C, ..., frozen=F)``; slot ``p`` lives at entry ``p // bs`` below ``F``
and ``p // bs + S`` from ``F`` on (:func:`entry_of`). ``frozen=0`` is the rule above.

Nothing here talks to the other side: the scheduler's KV manager
(``integration.kv_manager``) and the workers' metadata builders
(``integration.step_plan``) call these same functions with ``(C, B, I, bs)``.
Every function takes ints (returns an int) or numpy arrays (returns an array).
"""

from __future__ import annotations

from vllm_kvcompress.policies.schedule import retained_count

__all__ = ["retained_count", "held_count", "evicted_count", "window_start", "live_blocks", "entry_of"]


def held_count(num_computed, budget, interval, grow_from=None, hold_until=None, frozen=0):
    """Tokens a layer holds once ``num_computed`` tokens are computed: ``retained_count``,
    plus a kept prefix of ``frozen`` tokens that is never compressed."""
    return frozen + retained_count(num_computed - frozen, budget, interval, grow_from, hold_until)


def evicted_count(num_computed, budget, interval, grow_from=None, hold_until=None, frozen=0):
    """Tokens a layer has evicted once ``num_computed`` tokens are computed."""
    return num_computed - held_count(num_computed, budget, interval, grow_from, hold_until, frozen)


def window_start(num_computed, budget, interval, block_size, grow_from=None, hold_until=None, frozen=0):
    """First live block-table entry of a compressed layer (entries before it are freed); with
    a kept prefix, the entries freed after it: ``[frozen/bs, frozen/bs + window_start)``."""
    return evicted_count(num_computed, budget, interval, grow_from, hold_until, frozen) // block_size


def live_blocks(num_computed, num_new, budget, interval, block_size, grow_from=None, hold_until=None, frozen=0):
    """Pages a request holds in a compressed group while it computes ``num_new`` tokens."""
    total_entries = -(-(num_computed + num_new) // block_size)
    return total_entries - window_start(num_computed, budget, interval, block_size, grow_from, hold_until, frozen)


def entry_of(slot, start, block_size, frozen=0):
    """Row entry of window slot ``slot`` (``start = window_start(...)``): slots of a kept prefix
    sit at their own page, the others ``start`` entries further on."""
    e = slot // block_size
    return e + start * (slot >= frozen)
