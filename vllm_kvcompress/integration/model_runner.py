"""Patch point: ``vllm.v1.worker.gpu_model_runner.GPUModelRunner._build_attention_metadata``
(the CPU model runner inherits it).

The attention-metadata builders of compressed groups need each scheduled
request's prompt length (fraction budgets are a fraction of the prompt) and
its own ``kv_budget`` if it asked for one (``request_budget``). vLLM's
``CommonAttentionMetadata`` carries neither, so this wrapper records them, in
batch order, just before the builders run. Dummy/profiling runs (no real
requests in the batch) record nothing, and the builders then pass through.
"""

from __future__ import annotations

import numpy as np

from vllm_kvcompress.integration.common import patch_method
from vllm_kvcompress.integration.request_budget import requested


class StepContext:
    """What the current step's builders may read (one per worker process)."""

    prompt_lens: np.ndarray | None = None
    #: per request in batch order: its kv_budget, or None (the server's budget)
    request_budgets: list | None = None


def _request_budgets(runner, num_reqs: int) -> list | None:
    out = None
    requests = runner.requests
    for i, rid in enumerate(runner.input_batch.req_ids[:num_reqs]):
        state = requests.get(rid)
        value = requested(state.sampling_params) if state is not None else None
        if value is not None:
            if out is None:
                out = [None] * num_reqs
            out[i] = value
    return out


def apply() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def wrap(original):
        def _build_attention_metadata(self, num_tokens, num_reqs, *args, **kwargs):
            batch = self.input_batch
            if batch.num_reqs >= num_reqs > 0:
                StepContext.prompt_lens = batch.num_prompt_tokens[:num_reqs].astype(np.int64)
                StepContext.request_budgets = _request_budgets(self, num_reqs)
            else:
                StepContext.prompt_lens = None
            try:
                return original(self, num_tokens, num_reqs, *args, **kwargs)
            finally:
                StepContext.prompt_lens = None
                StepContext.request_budgets = None
        return _build_attention_metadata

    patch_method(GPUModelRunner, "_build_attention_metadata", wrap)
