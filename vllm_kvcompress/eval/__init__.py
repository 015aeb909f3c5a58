"""Evaluation harnesses for vllm-kvcompress (``python -m vllm_kvcompress.eval <subcommand>``).

Subcommands:

* ``quality`` — passkey retrieval, multi-key retrieval and chunked-prefill
  perplexity through offline vLLM, full cache vs each policy at each retention
  (:mod:`vllm_kvcompress.eval.quality`).
"""
