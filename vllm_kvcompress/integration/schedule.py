"""Patch point: ``vllm.v1.core.sched.scheduler.Scheduler.schedule``.

Two things happen before vLLM's scheduling step, and only where a KV-cache
group compresses (``kv_manager.CompressedKVCacheManager``):

* **Evicted pages go back first.** vLLM frees the pages a request no longer
  needs (``KVCacheManager.remove_skipped_blocks``) inside that request's own
  ``allocate_slots``, one running request after the other. A prompt prefilled
  in the last step still holds every page of its uncompressed prompt until its
  turn comes, so the requests scheduled before it found the pool empty, and
  vLLM preempted the newest request: the one that had just been prefilled,
  recomputed from scratch, and could be preempted again the next time (what held
  H2O at 25% below 1.4x vanilla in ``benchmarks/bench_throughput.py``). The
  wrapper frees every running request's evicted pages before vLLM allocates
  any, with the same committed-token count vLLM uses (so the call inside
  ``allocate_slots`` frees nothing more).
* **Prompts stay whole under** ``prefill_drop``. vLLM's chunked prefill fills a
  step's token budget by splitting the next waiting prompt, and a split prompt
  cannot drop (``integration.prefill_drop``): a 4,096-token step holds two
  1.9K-token prompts and part of a third, so about one prompt in two was split,
  and the prefill-only run of ``benchmarks/bench_throughput.py`` took 1.38 s per
  prompt against 0.76-0.79 s with whole prompts. When every waiting request fits the step's token
  budget beside one token per running request, the step runs as with
  ``--no-enable-chunked-prefill``: a prompt that does not fit what is left of
  the budget waits for the next step. While some waiting request is longer
  (it could not fit whole until requests finish) vLLM chunks as usual, so no
  request can wait forever on the rule. ``--long-prefill-token-threshold``
  still splits prompts (vLLM applies it before this check).
"""

from __future__ import annotations

from vllm_kvcompress.integration.common import kv_config_of, patch_method


def _compressed(scheduler):
    """The first compressed KV-cache manager of ``scheduler``, or None."""
    if "_kvcompress_manager" not in scheduler.__dict__:
        from vllm_kvcompress.integration.kv_manager import CompressedKVCacheManager

        managers = getattr(getattr(scheduler.kv_cache_manager, "coordinator", None), "single_type_managers", ())
        scheduler.__dict__["_kvcompress_manager"] = next(
            (m for m in managers if isinstance(m, CompressedKVCacheManager)), None)
    return scheduler.__dict__["_kvcompress_manager"]


def free_evicted(scheduler) -> None:
    """Free the pages every running request's compacted windows left behind: a prompt's
    (or chunk's) uncompressed pages after its prefill, and the pages a compaction freed
    (``compress_interval`` tokens at a time: more than one page when pages are smaller)."""
    kvm = scheduler.kv_cache_manager
    for req in scheduler.running:
        # the committed-token count vLLM's allocate_slots frees by (kv_cache_manager.py)
        done = max(0, req.num_computed_tokens - req.num_in_flight_tokens)
        kvm.remove_skipped_blocks(req.request_id, done, num_prompt_tokens=req.num_prompt_tokens)


def _waiting(scheduler):
    for name in ("kv_holding_waiting", "waiting"):  # every request vLLM's scan may reach
        yield from getattr(scheduler, name, None) or ()


def keeps_prompts_whole(scheduler) -> bool:
    """Whether this step schedules waiting prompts unsplit: ``prefill_drop`` is on,
    vLLM would chunk, some request waits, and every waiting request's remaining tokens
    fit the step's token budget (vLLM's ``max_num_scheduled_tokens``) beside one token
    per running request."""
    cfg = scheduler.scheduler_config
    on = scheduler.__dict__.get("_kvcompress_prefill_drop")
    if on is None:
        on = scheduler.__dict__["_kvcompress_prefill_drop"] = kv_config_of(scheduler.vllm_config).prefill_drop
    if not (on and cfg.enable_chunked_prefill):
        return False
    room = scheduler.max_num_scheduled_tokens - len(scheduler.running)
    waiting = False
    for req in _waiting(scheduler):
        if req.num_tokens - req.num_computed_tokens > room:
            return False
        waiting = True
    return waiting


def _wrap_schedule(original):
    def schedule(self, *args, **kwargs):
        if _compressed(self) is None:
            return original(self, *args, **kwargs)
        free_evicted(self)
        if not keeps_prompts_whole(self):
            return original(self, *args, **kwargs)
        cfg = self.scheduler_config
        cfg.enable_chunked_prefill = False  # vLLM's scan then defers a prompt that does not fit
        try:
            return original(self, *args, **kwargs)
        finally:
            cfg.enable_chunked_prefill = True
    return schedule


def apply() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    patch_method(Scheduler, "schedule", _wrap_schedule)
