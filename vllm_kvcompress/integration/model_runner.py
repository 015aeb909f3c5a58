"""Patch points: ``vllm.v1.worker.gpu_model_runner.GPUModelRunner._build_attention_metadata``
and ``GPUModelRunner._update_states`` (the CPU model runner inherits both).

The attention-metadata builders of compressed groups need each scheduled
request's prompt length (fraction budgets are a fraction of the prompt) and
its own ``kv_budget`` if it asked for one (``request_budget``), and the most
tokens it can ever hold (a request that can never outgrow its budget needs no
scores). vLLM's ``CommonAttentionMetadata`` carries none of these, so this
wrapper records them, in batch order, just before the builders run. Dummy/profiling runs (no real
requests in the batch) record nothing, and the builders then pass through.

With ``prefix_hit: keep`` a request keeps the prefix its prefix-cache hit gave it whole
(``paging``'s ``frozen``). The scheduler knows that hit from its lookup; the workers take
it from the computed-token count a request arrives with, new or resumed after a
preemption (``_update_states``), which is that same hit.
"""

from __future__ import annotations

import numpy as np

from vllm_kvcompress.integration.block_copies import Pending
from vllm_kvcompress.integration.common import patch_method
from vllm_kvcompress.integration.request_budget import requested


class StepContext:
    """What the current step's builders may read (one per worker process)."""

    prompt_lens: np.ndarray | None = None
    #: per request in batch order: its kv_budget, or None (the server's budget)
    request_budgets: list | None = None
    #: per request in batch order: the most tokens it can ever hold (prompt + max_tokens)
    max_lens: np.ndarray | None = None
    #: the step's prefill_drop.DropPlan, built by the first compressed group's builder
    #: (False: no request drops this step)
    drop_plan: object | None = None
    #: this step's page copies (``block_copies``): [n, 2] (src, dst) of vLLM's copies on a
    #: prefix hit, and of the copies that keep cached pages intact (or None)
    hit_pairs: np.ndarray | None = None
    save_pairs: np.ndarray | None = None
    #: per request in batch order: the prompt tokens it keeps whole (``prefix_hit: keep``), or None
    frozen: np.ndarray | None = None
    #: the hook below ran at least once in this process (a model runner that bypasses
    #: it, e.g. vLLM's Model Runner V2, would leave compressed layers unmapped)
    hooked: bool = False


def _request_info(runner, num_reqs: int, prompt_lens: np.ndarray) -> tuple[list | None, np.ndarray]:
    budgets = None
    max_new = np.full(num_reqs, 1 << 40, dtype=np.int64)
    requests = runner.requests
    for i, rid in enumerate(runner.input_batch.req_ids[:num_reqs]):
        state = requests.get(rid)
        params = state.sampling_params if state is not None else None
        if params is None:
            continue
        if params.max_tokens is not None:
            max_new[i] = params.max_tokens
        value = requested(params)
        if value is not None:
            if budgets is None:
                budgets = [None] * num_reqs
            budgets[i] = value
    return budgets, prompt_lens + max_new


def _frozen(runner, num_reqs: int) -> np.ndarray | None:
    kept = runner.__dict__.get("_kvcompress_frozen")
    if not kept:
        return None
    return np.fromiter((kept.get(rid, 0) for rid in runner.input_batch.req_ids[:num_reqs]), dtype=np.int64,
                       count=num_reqs)


def _record_arrivals(runner, scheduler_output) -> None:
    """``prefix_hit: keep``: the computed tokens each new or resumed request arrives with."""
    kept = runner.__dict__.get("_kvcompress_frozen")
    if kept is None:
        from vllm_kvcompress.integration.common import kv_config_of

        cfg = kv_config_of(runner.vllm_config)
        kept = runner.__dict__["_kvcompress_frozen"] = {} if cfg is not None and cfg.keeps_prefix_hits else False
    if kept is False:
        return
    for rid in scheduler_output.finished_req_ids:
        kept.pop(rid, None)
    for new in scheduler_output.scheduled_new_reqs:
        kept[new.req_id] = new.num_computed_tokens
    cached = scheduler_output.scheduled_cached_reqs
    for i, rid in enumerate(cached.req_ids):
        if rid in cached.resumed_req_ids:
            kept[rid] = cached.num_computed_tokens[i]


def apply() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def wrap(original):
        def _build_attention_metadata(self, num_tokens, num_reqs, *args, **kwargs):
            batch = self.input_batch
            StepContext.drop_plan = None
            StepContext.hooked = True
            StepContext.hit_pairs, StepContext.save_pairs = Pending.take()
            if batch.num_reqs >= num_reqs > 0:
                StepContext.prompt_lens = batch.num_prompt_tokens[:num_reqs].astype(np.int64)
                StepContext.request_budgets, StepContext.max_lens = _request_info(
                    self, num_reqs, StepContext.prompt_lens)
                StepContext.frozen = _frozen(self, num_reqs)
            else:
                StepContext.prompt_lens = None
            try:
                return original(self, num_tokens, num_reqs, *args, **kwargs)
            finally:
                StepContext.prompt_lens = None
                StepContext.request_budgets = StepContext.max_lens = StepContext.frozen = None
                StepContext.drop_plan = None
                StepContext.hit_pairs = StepContext.save_pairs = None
        return _build_attention_metadata

    def wrap_update(original):
        def _update_states(self, scheduler_output):
            _record_arrivals(self, scheduler_output)
            return original(self, scheduler_output)
        return _update_states

    patch_method(GPUModelRunner, "_build_attention_metadata", wrap)
    patch_method(GPUModelRunner, "_update_states", wrap_update)
