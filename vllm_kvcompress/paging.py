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

Nothing here talks to the other side: the scheduler's KV manager
(``integration.kv_manager``) and the workers' metadata builders
(``integration.step_plan``) call these same functions with ``(C, B, I, bs)``.
Every function takes ints (returns an int) or numpy arrays (returns an array).
"""

from __future__ import annotations

from vllm_kvcompress.policies.schedule import retained_count

__all__ = ["retained_count", "evicted_count", "window_start", "live_blocks"]


def evicted_count(num_computed, budget, interval, grow_from=None, hold_until=None):
    """Tokens a layer has evicted once ``num_computed`` tokens are computed."""
    return num_computed - retained_count(num_computed, budget, interval, grow_from, hold_until)


def window_start(num_computed, budget, interval, block_size, grow_from=None, hold_until=None):
    """First live block-table entry of a compressed layer (entries before it are freed)."""
    return evicted_count(num_computed, budget, interval, grow_from, hold_until) // block_size


def live_blocks(num_computed, num_new, budget, interval, block_size, grow_from=None, hold_until=None):
    """Pages a request holds in a compressed group while it computes ``num_new`` tokens."""
    total_entries = -(-(num_computed + num_new) // block_size)
    return total_entries - window_start(num_computed, budget, interval, block_size, grow_from, hold_until)
