"""Patch point: ``vllm.v1.core.sched.scheduler.Scheduler.schedule``.

Two things happen before vLLM's scheduling step, and only where a KV-cache
group compresses (``kv_manager.CompressedKVCacheManager``):

* **Evicted pages go back first.** vLLM frees the pages a request no longer
  needs (``KVCacheManager.remove_skipped_blocks``) inside that request's own
  ``allocate_slots``, one running request after the other. A prompt prefilled
  in the last step still holds every page of its uncompressed prompt until its
  turn comes, so the requests scheduled before it found the pool empty, and
  vLLM preempted the newest request: the one that had just been prefilled,
  recomputed from scratch, and preempted again the next time (3 times in a row
  for one of 24 x 1.9K-token H2O requests at 25%, ~10 s of a 100 s run). The
  wrapper frees every running request's evicted pages before vLLM allocates
  any, with the same committed-token count vLLM uses (so a second call inside
  ``allocate_slots`` frees nothing more).
* **Prompts stay whole under** ``prefill_drop``. vLLM's chunked prefill fills a
  step's token budget by splitting the next waiting prompt, and a split prompt
  cannot drop (``integration.prefill_drop``): on 24 x 1.9K-token prompts with
  the CPU's 4,096-token budget about half were split, and the prefill cost twice
  what whole prompts cost. When every waiting request fits the step's token
  budget beside one token per running request, the step runs as with
  ``--no-enable-chunked-prefill``: a prompt that does not fit what is left of
  the budget waits for the next step. While some waiting request is longer
  (it could not fit whole until requests finish) vLLM chunks as usual, so no
  request can wait forever on the rule. ``--long-prefill-token-threshold``
  still splits prompts (vLLM applies it before this check).
"""

from __future__ import annotations

from vllm_kvcompress.integration.common import kv_config_of, patch_method


def _compressed(scheduler) -> bool:
    on = scheduler.__dict__.get("_kvcompress_compressed")
    if on is None:
        from vllm_kvcompress.integration.kv_manager import CompressedKVCacheManager

        managers = getattr(getattr(scheduler.kv_cache_manager, "coordinator", None), "single_type_managers", ())
        on = scheduler.__dict__["_kvcompress_compressed"] = any(
            isinstance(m, CompressedKVCacheManager) for m in managers)
    return on


def free_evicted(scheduler) -> None:
    """Free the pages every running request's compacted windows left behind."""
    kvm = scheduler.kv_cache_manager
    for req in scheduler.running:
        kvm.remove_skipped_blocks(req.request_id, max(0, req.num_computed_tokens - req.num_in_flight_tokens),
                                  num_prompt_tokens=req.num_prompt_tokens)


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
        if not _compressed(self):
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
