"""The Triton backend: vLLM's TRITON_ATTN (``vllm/v1/attention/backends/triton_attn.py``:
``TritonAttentionBackend``, ``TritonAttentionMetadataBuilder``, ``TritonAttentionImpl``)
with the device-neutral compression of ``step_plan`` mixed in and our Triton kernels
behind ``ops``.

Registered (by ``attention_backend.apply``) as ``AttentionBackendEnum.CUSTOM``;
``platform_config`` selects CUSTOM on CUDA when a policy is on. With
``VLLM_KVCOMPRESS_BACKEND=triton`` and ``TRITON_INTERPRET=1`` vLLM's CPU engine runs
this same class (as CPU_ATTN, :class:`KVCompressTritonOnCPUBackend`), its Triton
kernels and vLLM's interpreted: that is how the CUDA code path is tested without a GPU.

What differs from the CPU backend, all in four hooks:

* layout: TRITON_ATTN's logical cache ``[num_blocks, H, block_size, 2*D]`` seen as
  ``kv_cache.transpose(1, 2).split(D, -1)`` = key / value ``[num_blocks, block_size,
  H, D]`` (strided); our ops get ``k_t = key.permute(0, 2, 3, 1)`` and ``v =
  value.permute(0, 2, 1, 3)`` views of the same memory;
* the cache write: vLLM's ``triton_reshape_and_cache_flash`` at OUR compacted slots
  (``forward_includes_kv_cache_update = True``: vLLM's own ``do_kv_cache_update``
  would write at the runner's unmapped slots);
* attention: ``TritonAttentionImpl.forward`` unchanged, on the window metadata;
* CUDA graphs: the builder declares ``AttentionCGSupport.NEVER`` (compaction changes
  shapes and reads host numbers), so vLLM runs PIECEWISE graphs with attention eager.

The score cache (``[num_blocks, H, block_size]`` float32 per compressed layer:
``4 / (2 * D * dtype bytes)`` of that layer's KV memory, 0.8% for bf16 at D=128) is
allocated lazily on the cache's device, outside vLLM's memory profiler;
``platform_config`` lowers ``gpu_memory_utilization`` by that share (docs/gpu.md).
"""

from __future__ import annotations

import torch

from vllm_kvcompress.integration import triton_compat

triton_compat.ensure_vllm_triton()  # before vLLM's Triton modules are imported (CPU interpreter)

from vllm.v1.attention.backend import AttentionCGSupport  # noqa: E402
from vllm.v1.attention.backends.triton_attn import (  # noqa: E402
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from vllm_kvcompress import ops  # noqa: E402
from vllm_kvcompress.integration.step_plan import CompressedBuilderMixin, CompressedImplMixin  # noqa: E402


class KVCompressTritonBuilder(CompressedBuilderMixin, TritonAttentionMetadataBuilder):
    """TRITON_ATTN's metadata builder + the window mapping of compressed groups."""

    _cudagraph_support = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_compression(kv_cache_spec)
        if torch.device(device).type == "cpu":
            self.seq_threshold_3D = 0  # interpreter: the 2D kernel (the 3D split is slower to interpret)


class KVCompressTritonImpl(CompressedImplMixin, TritonAttentionImpl):
    """vLLM's Triton attention + compression (hooks of ``CompressedImplMixin``)."""

    def _halves(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return kv_cache.transpose(1, 2).split(self.head_size, dim=-1)  # [nb, bs, H, D] each

    def _views(self, kv_cache: torch.Tensor, layer=None) -> ops.PagedLayer:
        key_cache, value_cache = self._halves(kv_cache)
        return paged_views(key_cache, value_cache)

    def _write_kv(self, layer, key, value, kv_cache, slot_mapping) -> None:
        key_cache, value_cache = self._halves(kv_cache)
        triton_compat.write_kv(key, value, key_cache, value_cache, slot_mapping, self.kv_cache_dtype,
                               layer._k_scale, layer._v_scale)

    def _attend(self, layer, query, key, value, kv_cache, md, output, output_scale, output_block_scale):
        return TritonAttentionImpl.forward(self, layer, query, key, value, kv_cache, md, output, output_scale,
                                           output_block_scale)

    def _check_layout(self, kv_cache: torch.Tensor, paged: ops.PagedLayer) -> None:
        """Write known keys/values with vLLM's Triton cache write into a scratch cache of
        this layer's shape and read them back through our views."""
        nb, h, bs, two_d = kv_cache.shape
        scratch = torch.zeros(2, h, bs, two_d, dtype=kv_cache.dtype, device=kv_cache.device)
        d = two_d // 2
        key = torch.randn(3, h, d, device=kv_cache.device).to(kv_cache.dtype)
        val = torch.randn(3, h, d, device=kv_cache.device).to(kv_cache.dtype)
        slots = torch.tensor([0, bs - 1, bs + 1], dtype=torch.long, device=kv_cache.device)
        kc, vc = self._halves(scratch)
        one = torch.ones((), dtype=torch.float32, device=kv_cache.device)
        triton_compat.write_kv(key, val, kc, vc, slots, "auto", one, one)
        view = self._views(scratch)
        blk, off = slots // bs, slots % bs
        if not (torch.equal(view.keys(blk, off), key) and torch.equal(view.values(blk, off), val)):
            raise RuntimeError("vllm-kvcompress: the Triton attention KV-cache layout is not the one this release "
                               "was built for (vLLM 0.32 TRITON_ATTN); refusing to run compressed layers")


def paged_views(key_cache: torch.Tensor, value_cache: torch.Tensor, acc: torch.Tensor | None = None) -> ops.PagedLayer:
    """``ops.PagedLayer`` views of TRITON_ATTN's key / value halves ``[nb, bs, H, D]``."""
    return ops.PagedLayer(k_t=key_cache.permute(0, 2, 3, 1), v=value_cache.permute(0, 2, 1, 3), acc=acc)


class KVCompressTritonBackend(TritonAttentionBackend):
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return KVCompressTritonImpl

    @staticmethod
    def get_builder_cls():
        return KVCompressTritonBuilder


class KVCompressTritonOnCPUBackend(KVCompressTritonBackend):
    """The same backend serving vLLM's CPU engine (registered as CPU_ATTN, the only
    backend vLLM's CPU platform asks for) under ``TRITON_INTERPRET=1``."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"
