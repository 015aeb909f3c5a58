"""Per-layer retained-token budgets and the retained-count rule (pure Python).

Both the vLLM scheduler (which only knows token counts) and the worker / the
dense oracle (which decide *which* tokens) use these functions, so they must be
deterministic functions of their integer arguments.

Formulas are written out in ``docs/policies.md``.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import KVCompressConfig

__all__ = [
    "UNBOUNDED",
    "layer_budgets",
    "stage_budgets",
    "stage_layout",
    "num_stages_for",
    "retained_count",
    "max_slots",
    "drop_counts",
    "budget_floor",
    "pyramidinfer_shape",
    "pyramidkv_budgets",
]

#: the "budget" of a layer that never evicts (policy 'none' or budget 1.0)
UNBOUNDED: int = 1 << 60


# ---------------------------------------------------------------------------- retained count
def retained_count(num_computed, budget, interval, grow_from=None, hold_until=None):
    """Tokens a layer holds after a step that brought its computed context to ``num_computed``.

    ``C if C <= budget else budget + (C - budget) % interval``: a layer grows to
    ``budget + interval - 1`` and then compacts back to ``budget``.

    ``hold_until`` (``KVCompressConfig.hold_until``: the prompt length with
    ``prompt_compaction: once``, else None): before that many computed tokens the
    layer keeps everything, ``R(C) = C`` for ``C < H``, so a prompt prefilled in
    chunks is compacted once, at its last chunk, to the same count a one-step
    prefill gives; from ``H`` on the rule above applies unchanged.

    ``grow_from`` (``KVCompressConfig.grow_from``: the prompt length with
    ``decode_evict: false``, else None): past that many computed tokens the layer
    never compacts again, ``R(C) = R(F) + (C - F)`` for ``C > F``.

    The one home of this rule (``vllm_kvcompress.paging`` derives the page
    window from it; ``KVCompressConfig.retention_args`` gives both keywords). Ints
    in, int out; numpy arrays (any argument) in, an int64 array out (the worker
    evaluates a whole batch at once).
    """
    c = np.asarray(num_computed, dtype=np.int64)
    b = np.asarray(budget, dtype=np.int64)
    f = c if grow_from is None else np.minimum(c, np.asarray(grow_from, dtype=np.int64))
    held = np.where(f <= b, f, b + (f - b) % np.int64(interval)) + (c - f)
    if hold_until is not None:
        held = np.where(c < np.asarray(hold_until, dtype=np.int64), c, held)
    return int(held) if held.ndim == 0 else held


def max_slots(budget: int, interval: int, chunk: int, hold_until: int | None = None) -> int:
    """Most KV slots a layer ever needs during a step that computes ``chunk`` tokens
    (while it still compacts: with ``decode_evict: false`` it grows after the prompt).
    With ``hold_until`` (a chunked prompt kept whole until its last chunk) a step may
    start from ``hold_until - 1`` held tokens."""
    most = budget + interval - 1
    if hold_until is not None:
        most = max(most, hold_until - 1)
    return most + chunk


def drop_counts(budgets: list[int], prompt_len: int, interval: int, first: int = 1) -> list[int] | None:
    """Tokens the layers of each stage compute when a whole prompt is prefilled with
    ``prefill_drop`` (layer 0 always computes all ``prompt_len``).

    Layer ``l >= first`` computes ``k_l = retained_count(prompt_len, budgets[l], interval)``
    tokens, exactly what it holds after the step, so it never compacts in prefill; the
    layers before ``first`` (``prefill_drop_from``) compute all ``prompt_len`` and compact
    like the default path.
    Each stage's tokens are chosen among the previous stage's, so the counts must
    not grow with depth; returns None when they do or when nothing is dropped.
    """
    k = [prompt_len if i < first else retained_count(prompt_len, b, interval) for i, b in enumerate(budgets)]
    if any(b > a for a, b in zip(k, k[1:])) or k[-1] >= prompt_len:
        return None
    return k


# ---------------------------------------------------------------------------- stages
def num_stages_for(cfg: KVCompressConfig, num_layers: int) -> int:
    """Largest divisor of ``num_layers`` that is <= ``cfg.num_stages``."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    n = min(cfg.num_stages, num_layers)
    while num_layers % n:
        n -= 1
    return n


def stage_layout(cfg: KVCompressConfig, num_layers: int) -> list[list[int]]:
    """Layer indices of each stage: equally many consecutive layers per stage."""
    n = num_stages_for(cfg, num_layers)
    per = num_layers // n
    return [list(range(s * per, (s + 1) * per)) for s in range(n)]


# ---------------------------------------------------------------------------- shapes
def pyramidinfer_shape(num_layers: int, floor_ratio: float, strategy: str) -> list[float]:
    """Relative KV length of each layer under PyramidInfer's layer-wise decay.

    The reference keeps ``r(j)`` of the context after layer ``j`` (dropping hidden
    states), so layer ``l`` stores ``s(l) = prod_{j<l} r(j)`` of it, with
    ``d = floor_ratio`` and ``L = num_layers``:

    * cosine: ``r(j) = d + (1 - d) * (1 + cos(pi * j / L)) / 2``
    * linear: ``r(j) = d + (1 - d) * (1 - j / L)``  (same end points as cosine)
    """
    d = float(floor_ratio)
    out, s = [], 1.0
    for j in range(num_layers):
        out.append(s)
        if strategy == "cosine":
            r = d + (1.0 - d) * (1.0 + math.cos(math.pi * j / num_layers)) / 2.0
        elif strategy == "linear":
            r = d + (1.0 - d) * (1.0 - j / num_layers)
        else:
            raise ValueError(f"unknown pyramidinfer strategy {strategy!r}")
        s *= r
    return out


def pyramidkv_budgets(mean_budget: float, num_layers: int, prompt_len: int, window: int, beta: float) -> list[float]:
    """KVCache-Factory / kvpress PyramidKV per-layer budgets (float, before floors).

    ``c = B - w`` selectable tokens on average; ``min = c / beta``, ``max = 2c - min``;
    if ``max > P - w`` then ``max = P - w`` and ``min = 2c - max``; layer ``l``
    gets ``w + max - l * (max - min) / (L - 1)``. Uniform ``B`` when the pyramid is
    undefined (``c <= 0``, one layer, or ``P <= B``).
    """
    B, L, P, w = float(mean_budget), num_layers, prompt_len, window
    c = B - w
    if L == 1 or c <= 0 or P <= B:
        return [B] * L
    lo = c / beta
    hi = 2 * c - lo
    if hi > P - w:
        hi = P - w
        lo = 2 * c - hi
    step = (hi - lo) / (L - 1)
    return [w + hi - l * step for l in range(L)]


# ---------------------------------------------------------------------------- budgets
def budget_floor(cfg: KVCompressConfig, prompt_len: int) -> int:
    """No layer budget goes below this: max(min(min_layer_budget, P), sinks + fixed recent)."""
    return max(min(cfg.min_layer_budget, prompt_len), cfg.resolved_sinks + (cfg.fixed_recent or 0), 1)


def _floor_keep_mean(values: list[float], lo: float) -> list[float]:
    """Raise values below ``lo`` to ``lo``; take the excess from the others in
    proportion to their height above ``lo`` so the mean is preserved (when the
    mean allows it; otherwise everything becomes ``lo``). Order-preserving."""
    L = len(values)
    mean = sum(values) / L
    if mean <= lo:
        return [float(lo)] * L
    deficit = sum(lo - v for v in values if v < lo)
    if deficit <= 0:
        return list(values)
    room = sum(v - lo for v in values if v > lo)
    t = deficit / room  # < 1 because mean > lo
    return [lo if v <= lo else lo + (1.0 - t) * (v - lo) for v in values]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def layer_budgets(cfg: KVCompressConfig, num_layers: int, prompt_len: int) -> list[int]:
    """Retained-token budget of each layer for a request with ``prompt_len`` prompt tokens.

    The configured budget is the mean over layers. Budgets are piecewise constant
    over :func:`stage_layout`, never below :func:`budget_floor`, and non-increasing
    with depth for the pyramid schedules. Returns ``[UNBOUNDED] * num_layers`` when
    the config keeps everything.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if cfg.keeps_all:
        return [UNBOUNDED] * num_layers
    P = max(int(prompt_len), 1)
    B = float(cfg.prompt_budget(P))
    L = num_layers
    sched = cfg.resolved_schedule

    if sched == "uniform":
        raw = [B] * L
    elif sched in ("pyramidinfer-cosine", "pyramidinfer-linear"):
        shape = pyramidinfer_shape(L, cfg.resolved_floor_ratio, sched.split("-", 1)[1])
        m = sum(shape) / L
        raw = [B * s / m for s in shape]
    elif sched == "pyramidkv":
        raw = pyramidkv_budgets(B, L, P, cfg.snapkv_window, cfg.pyramidkv_beta)
    else:  # validated by the config
        raise ValueError(f"unknown schedule {sched!r}")

    lo = budget_floor(cfg, P)
    vals = _floor_keep_mean(raw, lo)
    out = [0] * L
    for layers in stage_layout(cfg, L):
        v = _round_half_up(sum(vals[i] for i in layers) / len(layers))
        v = max(v, lo)
        for i in layers:
            out[i] = v
    return out


def stage_budgets(cfg: KVCompressConfig, num_layers: int, prompt_len: int) -> list[int]:
    """One budget per stage of :func:`stage_layout` (the layers of a stage share it)."""
    b = layer_budgets(cfg, num_layers, prompt_len)
    return [b[layers[0]] for layers in stage_layout(cfg, num_layers)]
