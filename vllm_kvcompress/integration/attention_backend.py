"""Patch point: ``vllm.v1.attention.backends.registry.AttentionBackendEnum.CPU_ATTN``
(overridden with ``register_backend``; on CPU vLLM always picks CPU_ATTN), and
``AttentionBackendEnum.CUSTOM`` (registered for the Triton backend of
``attention_triton``, which ``platform_config`` selects on CUDA).

:class:`KVCompressCPUBackend` is vLLM's CPU attention (``cpu_attn.py``) with the
device-neutral compression of ``step_plan`` mixed in, and the C++ kernels behind
``ops``. What is CPU-specific lives here: the "vec" page layout (checked once
against vLLM's own cache-write op), the cache write, and keeping compressed
layers off vLLM's AMX page layout.

``VLLM_KVCOMPRESS_BACKEND=triton`` (CPU only, needs ``TRITON_INTERPRET=1``)
registers the Triton backend for CPU_ATTN instead: vLLM's CPU engine then runs
the very class CUDA uses, with its Triton kernels interpreted (tests, and
debugging the GPU path without a GPU).

Adding a backend (FlashInfer, say): one module with a ``*Backend`` / builder /
impl that mix in ``step_plan``'s two classes and implement the four impl hooks,
plus one ``register_backend`` line in :func:`apply` (docs/gpu.md).
"""

from __future__ import annotations

import os

import torch
from vllm import _custom_ops as vllm_ops
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from vllm_kvcompress import ops
from vllm_kvcompress.integration.step_plan import CompressedBuilderMixin, CompressedImplMixin

#: which backend class serves vLLM's CPU engine: "cpu" (default) or "triton"
BACKEND_ENV = "VLLM_KVCOMPRESS_BACKEND"
#: "1" (default): compressed layers keep vLLM's "amx" pages where vLLM picks them (CPUs
#: with AMX tiles, bf16, block size % 32 == 0), so their prefill runs vLLM's AMX attention,
#: the fastest path vLLM has for the same layer, and the C++ kernels (decode attention +
#: scores, window scores, compaction) read that packing; "0" moves them to "vec" pages,
#: our dot-path kernels for every step (the escape hatch, and the other side of the A/B
#: that ``python benchmarks/bench_ab.py`` runs on an AMX machine).
AMX_ENV = "VLLM_KVCOMPRESS_CPU_AMX"
TRITON_BACKEND_PATH = "vllm_kvcompress.integration.attention_triton.KVCompressTritonBackend"
TRITON_ON_CPU_PATH = "vllm_kvcompress.integration.attention_triton.KVCompressTritonOnCPUBackend"


class KVCompressMetadataBuilder(CompressedBuilderMixin, CPUAttentionMetadataBuilder):
    """vLLM's CPU metadata builder + the window mapping of compressed groups."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_compression(kv_cache_spec)
        # "amx" pages where vLLM picks them unless VLLM_KVCOMPRESS_CPU_AMX=0 ("amx" packing:
        # ops.unpack_amx, tests/test_amx_layout.py)
        if self.compressed and self.isa == "amx" and not amx_pages_enabled():
            self.isa = "vec"
            self._set_isa_to_layers(layer_names)


class KVCompressCPUImpl(CompressedImplMixin, CPUAttentionBackendImpl):
    """vLLM's CPU attention + compression (hooks of ``CompressedImplMixin``)."""

    def _views(self, kv_cache: torch.Tensor, layer=None) -> ops.PagedLayer:
        key_cache, value_cache = _halves(kv_cache)
        return ops.paged_view(key_cache, value_cache, None, amx=getattr(layer, "isa", "vec") == "amx")

    def _write_kv(self, layer, key, value, kv_cache, slot_mapping) -> None:
        key_cache, value_cache = _halves(kv_cache)
        vllm_ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, layer.isa,
                                            k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
                                            kv_cache_dtype=self.kv_cache_dtype)

    def _attend(self, layer, query, key, value, kv_cache, md, output, output_scale, output_block_scale):
        return CPUAttentionBackendImpl.forward(self, layer, query, key, value, kv_cache, md, output, output_scale,
                                               output_block_scale)

    def _check_layout(self, kv_cache: torch.Tensor, paged: ops.PagedLayer) -> None:
        check_layout(*_halves(kv_cache), isa="amx" if paged.amx else "vec")


def _halves(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nb, h, bs, _ = kv_cache.size()
    return kv_cache.view(nb, h, bs * 2, -1).chunk(2, dim=2)


def amx_pages_enabled() -> bool:
    """``VLLM_KVCOMPRESS_CPU_AMX``: "1" (default) keeps vLLM's "amx" pages for compressed
    layers, "0" moves them to "vec" pages."""
    choice = os.environ.get(AMX_ENV, "1").strip() or "1"
    if choice not in ("0", "1"):
        raise ValueError(f"{AMX_ENV}={choice!r}: expected 0 or 1")
    return choice == "1"


def check_layout(key_cache: torch.Tensor, value_cache: torch.Tensor, isa: str = "vec") -> None:
    """Write known keys/values with vLLM's own CPU cache-write op (``isa`` "vec" or
    "amx") and read them back through ``ops.paged_view`` / ``ops.unpack_amx``; refuse
    to run on a layout we do not know."""
    _, h, bs, d = value_cache.shape
    kc = torch.zeros(2, h, 2 * bs, d, dtype=value_cache.dtype)
    k_half, v_half = kc.chunk(2, dim=2)
    t = 3
    key = torch.randn(t, h, d).to(value_cache.dtype)
    val = torch.randn(t, h, d).to(value_cache.dtype)
    slots = torch.tensor([0, bs - 1, bs + 1], dtype=torch.long)
    vllm_ops.cpu_attn_reshape_and_cache(key, val, k_half, v_half, slots, isa, k_scale=1.0, v_scale=1.0,
                                        kv_cache_dtype="auto")
    view = ops.unpack_amx(k_half, v_half) if isa == "amx" else ops.paged_view(k_half, v_half, None)
    blk, off = slots // bs, slots % bs
    if not (torch.equal(view.keys(blk, off), key) and torch.equal(view.values(blk, off), val)):
        raise RuntimeError(f"vllm-kvcompress: the CPU attention KV-cache layout ('{isa}' pages) is not the one "
                           "this release was built for (vLLM 0.32); refusing to run compressed layers")


class KVCompressCPUBackend(CPUAttentionBackend):
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls():
        return KVCompressCPUImpl

    @staticmethod
    def get_builder_cls():
        return KVCompressMetadataBuilder


def cpu_backend_choice() -> str:
    """``VLLM_KVCOMPRESS_BACKEND``: "cpu" (default) or "triton" (one-line error otherwise)."""
    choice = os.environ.get(BACKEND_ENV, "cpu").strip().lower() or "cpu"
    if choice not in ("cpu", "triton"):
        raise ValueError(f"{BACKEND_ENV}={choice!r}: expected cpu or triton")
    if choice == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{BACKEND_ENV}=triton on CPU needs TRITON_INTERPRET=1 (Triton's interpreter)")
    return choice


def apply() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, TRITON_BACKEND_PATH)
    if current_platform.is_cpu():
        path = TRITON_ON_CPU_PATH if cpu_backend_choice() == "triton" else f"{__name__}.KVCompressCPUBackend"
        register_backend(AttentionBackendEnum.CPU_ATTN, path)
