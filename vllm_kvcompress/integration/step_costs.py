"""Opt-in per-step cost counters (issue #18): seconds and calls per category, split
by step kind. ``VLLM_KVCOMPRESS_STEP_COSTS=1`` turns them on (read once, at import);
off, :func:`timed` returns one shared no-op context manager and
:func:`timed_build` returns the builder's method undecorated. No vLLM symbol is
patched here; ``step_plan`` and ``compaction`` wrap their calls, and
``benchmarks/bench_step_costs.py`` reads the counters of the in-process worker
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``).

Categories (what is inside each ``with``):

* ``metadata``: a whole ``CompressedBuilderMixin.build`` (every KV-cache group,
  compressed or not, vanilla included); ``vllm_build``: vLLM's own ``build``
  calls inside it. The plugin's builder work is ``metadata - vllm_build``.
* ``attention`` / ``attention_plain``: vLLM's attention (``_attend``) on a
  compressed layer / an uncompressed layer (vanilla: every layer);
* ``fused_decode``: ``ops.decode_attention_scores`` (pure decode, compressed layers);
* ``fused_prefill``: ``ops.prefill_attention_scores`` (other steps of compressed layers where
  ``step_plan.fuse_prefill`` picks it: mostly scored queries, or the AVX512-BF16 path);
* ``scoring``: ``ops.window_scores``;
* ``selection``: ``ops.read_scores`` + ``policies.compress_step`` in
  ``compaction.compact_requests`` (and ``prefill_drop``'s per-layer selection);
* ``compaction``: ``ops.compact_windows`` (the move);
* ``cache_write``: ``_write_kv`` (the cache write of every layer);
* ``step``: one engine step, timed by the caller with :func:`step` (the bench
  wraps ``LLMEngine.step``).

Step kind: the builder sets it (``decode`` when every request has one new token,
``prefill`` otherwise, mixed steps included); categories timed before the first
build of a step (and steps that build nothing) count as ``idle``. Times use
``time.perf_counter``; a region given a CUDA device is bracketed by
``torch.cuda.synchronize`` (only while timing is on).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time

ENV = "VLLM_KVCOMPRESS_STEP_COSTS"
ENABLED: bool = os.environ.get(ENV, "0") == "1"

KINDS = ("prefill", "decode", "idle")
#: the timed parts of a step (``vllm_build`` lies inside ``metadata``; :func:`per_kind`
#: counts it in ``rest``, with vLLM's other overhead)
PARTS = ("attention", "attention_plain", "fused_decode", "fused_prefill", "scoring", "selection", "compaction", "cache_write",
         "metadata")

_NULL = contextlib.nullcontext()
_kind: str | None = None  # the current step's kind, set by the builder
_acc: dict[tuple[str, str], list] = {}  # (kind, category) -> [seconds, calls]


def enable(on: bool = True) -> None:
    """Turn the counters on/off in this process (tests; the bench sets the env var
    before vLLM is imported, so the builder's method is wrapped too)."""
    global ENABLED
    ENABLED = bool(on)


def reset() -> None:
    global _kind
    _acc.clear()
    _kind = None


def snapshot() -> dict:
    """``{kind: {category: {"s": seconds, "calls": n}}}`` (a copy)."""
    out: dict = {}
    for (kind, cat), (s, n) in _acc.items():
        out.setdefault(kind, {})[cat] = {"s": s, "calls": n}
    return out


def set_kind(kind: str | None) -> None:
    global _kind
    _kind = kind


def kind_of(query_start_loc_cpu) -> str:
    """``decode`` when every request of the step has exactly one new token."""
    q = query_start_loc_cpu
    n = len(q) - 1
    return "decode" if n > 0 and int(q[-1]) - int(q[0]) == n and bool(((q[1:] - q[:-1]) == 1).all()) else "prefill"


def _add(cat: str, seconds: float, kind: str | None = None) -> None:
    key = (kind or _kind or "idle", cat)
    a = _acc.get(key)
    if a is None:
        _acc[key] = [seconds, 1]
    else:
        a[0] += seconds
        a[1] += 1


def _sync(device) -> None:
    if device is not None and getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize(device)


class _Timer:
    __slots__ = ("cat", "device", "t0")

    def __init__(self, cat: str, device):
        self.cat, self.device = cat, device

    def __enter__(self):
        _sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        _add(self.cat, time.perf_counter() - self.t0)
        return False


def timed(cat: str, device=None):
    """``with timed("scoring", query.device): ...`` — a no-op while off."""
    if not ENABLED:
        return _NULL
    return _Timer(cat, device)


def timed_build(fn):
    """Decorator for ``CompressedBuilderMixin.build(self, common_prefix_len,
    common_attn_metadata, ...)``: sets the step kind and times the call as
    ``metadata``. Returns ``fn`` itself unless the counters were on at import."""
    if not ENABLED:
        return fn

    @functools.wraps(fn)
    def build(self, common_prefix_len, common_attn_metadata, *args, **kwargs):
        if not ENABLED:
            return fn(self, common_prefix_len, common_attn_metadata, *args, **kwargs)
        set_kind(kind_of(common_attn_metadata.query_start_loc_cpu))
        with _Timer("metadata", None):
            return fn(self, common_prefix_len, common_attn_metadata, *args, **kwargs)

    return build


@contextlib.contextmanager
def step():
    """Time one engine step as ``step`` under the kind its builders set (``idle``
    when nothing was built). The caller wraps e.g. ``LLMEngine.step``."""
    if not ENABLED:
        yield
        return
    set_kind(None)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _add("step", time.perf_counter() - t0)
        set_kind(None)


def per_kind(snap: dict, kind: str) -> dict:
    """Seconds per category for one kind, ``steps`` = its engine steps,
    ``metadata_plugin`` = ``metadata - vllm_build`` (the plugin's builder work), and
    ``rest`` = step time - the timed parts other than vLLM's own build (model
    matmuls, sampling, scheduling, vLLM's metadata build, Python glue)."""
    d = snap.get(kind, {})
    s = {cat: v["s"] for cat, v in d.items()}
    out = {cat: s.get(cat, 0.0) for cat in (*PARTS, "vllm_build", "step")}
    out["steps"] = d.get("step", {}).get("calls", 0)
    out["metadata_plugin"] = out["metadata"] - out["vllm_build"]
    out["rest"] = out["step"] - sum(out[c] for c in PARTS) + out["vllm_build"]
    return out
