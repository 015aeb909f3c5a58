"""Triton kernels of the batched ops (CUDA path; see ``kernels.py``).

Lives inside the package on purpose: a top-level ``triton_kernels`` would
shadow the unrelated ``triton_kernels`` package vLLM imports for MXFP4 MoE.
Importing this package needs triton; ``vllm_kvcompress.ops`` imports it only
when it dispatches to Triton.
"""

from vllm_kvcompress.triton_kernels.kernels import compact_windows, decode_attention_scores, window_scores

__all__ = ["decode_attention_scores", "window_scores", "compact_windows"]
