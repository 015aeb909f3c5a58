"""Patch point: ``vllm.v1.worker.gpu_model_runner.GPUModelRunner._build_attention_metadata``
(the CPU model runner inherits it).

The attention-metadata builders of compressed groups need each scheduled
request's prompt length (fraction budgets are a fraction of the prompt). vLLM's
``CommonAttentionMetadata`` does not carry it, so this wrapper records it, in
batch order, just before the builders run. Dummy/profiling runs (no real
requests in the batch) record nothing, and the builders then pass through.
"""

from __future__ import annotations

import numpy as np

from vllm_kvcompress.integration.common import patch_method


class StepContext:
    """What the current step's builders may read (one per worker process)."""

    prompt_lens: np.ndarray | None = None


def apply() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def wrap(original):
        def _build_attention_metadata(self, num_tokens, num_reqs, *args, **kwargs):
            batch = self.input_batch
            if batch.num_reqs >= num_reqs > 0:
                StepContext.prompt_lens = batch.num_prompt_tokens[:num_reqs].astype(np.int64)
            else:
                StepContext.prompt_lens = None
            try:
                return original(self, num_tokens, num_reqs, *args, **kwargs)
            finally:
                StepContext.prompt_lens = None
        return _build_attention_metadata

    patch_method(GPUModelRunner, "_build_attention_metadata", wrap)
