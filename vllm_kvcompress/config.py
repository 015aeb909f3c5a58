"""KV-cache compression configuration (pure Python; no vLLM, no torch).

One frozen dataclass, :class:`KVCompressConfig`, validated on construction.
Every validation failure raises :class:`ConfigError` (a ``ValueError``) whose
message is ONE line, starts with ``kv_compress.<option>:`` and, where there is
a closed set, lists the allowed values.

Budget convention
-----------------
``budget`` is the MEAN number of retained tokens per layer of a request:

* a value in ``(0, 1)``: a fraction of the prompt length, resolved per request
  as ``ceil(budget * prompt_len)`` tokens;
* a whole number ``> 1`` (``256`` or ``256.0``): that many tokens; it must also be
  ``>= min_layer_budget`` (default 64), ``>= sinks + recent_window`` where those are
  fixed, and ``>= the page size`` (checked where the page size is known);
* ``1`` / ``1.0``: keep everything (nothing is ever evicted).

:data:`BUDGET_UNITS` is the one wording of these units: the ``--kv-budget`` help and
every budget error use it (``2.0`` is 2 tokens, refused as below min_layer_budget,
and the message says fractions lie in (0, 1)).

See ``docs/policies.md`` for the semantics of the other options.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "BUDGET_UNITS",
    "ConfigError",
    "KVCompressConfig",
    "POLICY_NAMES",
    "SCHEDULE_NAMES",
    "POOLING_NAMES",
    "PROMPT_COMPACTION_NAMES",
    "PREFIX_HIT_NAMES",
    "DEFAULT_SCHEDULE",
    "DEFAULT_SINKS",
    "request_budget",
    "variant_settings",
]

POLICY_NAMES: tuple[str, ...] = ("none", "h2o", "pyramid", "snapkv", "streaming")
SCHEDULE_NAMES: tuple[str, ...] = ("uniform", "pyramidinfer-cosine", "pyramidinfer-linear", "pyramidkv")
POOLING_NAMES: tuple[str, ...] = ("avg", "max")
#: when a prompt prefilled in several chunks is compressed (``prompt_compaction``)
PROMPT_COMPACTION_NAMES: tuple[str, ...] = ("once", "per-chunk")
POOL_TIEBREAK_NAMES: tuple[str, ...] = ("newest", "score")
#: what a request that evicts does with the cached prefix its prompt starts with (``prefix_hit``)
PREFIX_HIT_NAMES: tuple[str, ...] = ("compress", "keep")

#: schedule used when ``schedule`` is None
DEFAULT_SCHEDULE: dict[str, str] = {
    "none": "uniform",
    "h2o": "uniform",
    "pyramid": "pyramidinfer-cosine",
    # SnapKV's selection with PyramidKV's per-layer budgets (the SnapKV paper: uniform);
    # the measured trade-off is in docs/policies.md
    "snapkv": "pyramidkv",
    "streaming": "uniform",
}
#: attention sinks kept when ``sinks`` is None
DEFAULT_SINKS: dict[str, int] = {"none": 0, "h2o": 0, "pyramid": 4, "snapkv": 0, "streaming": 4}
#: PyramidInfer reference ``prefill_decay_ratio`` (configs/llama*_*.json)
DEFAULT_PYRAMIDINFER_FLOOR_RATIO = 0.9

#: the units of ``budget`` / ``--kv-budget`` / a request's ``kv_budget``, in the flag help and every budget error
BUDGET_UNITS = ("a fraction of the prompt in (0, 1), a whole number of tokens >= min_layer_budget (default 64) "
                "and >= the page size (--block-size), or 1 to keep everything")

_PYRAMIDINFER_SCHEDULES = ("pyramidinfer-cosine", "pyramidinfer-linear")
_PREFIX = "kv_compress"


class ConfigError(ValueError):
    """Invalid KV-compression configuration; the message is one line naming the option."""


def _err(option: str, msg: str) -> ConfigError:
    return ConfigError(f"{_PREFIX}.{option}: {msg}".replace("\n", " "))


def _budget_err(msg: str) -> ConfigError:
    return _err("budget", f"{msg}; the budget is {BUDGET_UNITS}")


def _allowed(names: tuple[str, ...]) -> str:
    return ", ".join(names)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class KVCompressConfig:
    """Validated KV-cache compression settings (field names are the config keys)."""

    #: one of :data:`POLICY_NAMES`
    policy: str = "none"
    #: mean retained tokens per layer (:data:`BUDGET_UNITS`): (0, 1) = fraction of the prompt, a whole number > 1 =
    #: tokens (>= min_layer_budget and the page size), 1.0 = keep all
    budget: float = 1.0
    #: newest tokens always kept per layer; None = policy default (see docs/policies.md)
    recent_window: int | None = None
    #: oldest tokens always kept per layer (attention sinks); None = policy default
    sinks: int | None = None
    #: slack tokens: a layer grows to budget + interval - 1, then compacts back to budget
    compress_interval: int = 32
    #: one of :data:`SCHEDULE_NAMES`; None = policy default (:data:`DEFAULT_SCHEDULE`: pyramid -> pyramidinfer-cosine,
    #: snapkv -> pyramidkv, else uniform)
    schedule: str | None = None
    #: no layer budget goes below min(min_layer_budget, prompt_len) (PyramidInfer ``min_context_length``)
    min_layer_budget: int = 64
    #: pyramidinfer-* schedules: the per-layer keep ratio decays from 1 to this (reference ``prefill_decay_ratio``)
    floor_ratio: float | None = None
    #: pyramidkv schedule: the deepest layer gets 1/beta of the top layer's selectable budget (reference 20)
    pyramidkv_beta: float = 20
    #: number of KV-cache groups (consecutive layers sharing one budget); largest divisor of num_layers <= this
    num_stages: int = 6
    #: pyramid policy: prefill observation window (voting queries, kept whole) in tokens;
    #: 0 = the reference's last ceil(obs_window_ratio * context) positions
    pyramid_window: int = 32
    #: pyramid policy with pyramid_window 0: observation window as a fraction of the context (reference 0.2)
    obs_window_ratio: float = 0.2
    #: pyramid policy: max-pool the scores along keys with this odd kernel before the top-k, so
    #: multi-token spans (numbers are one token per digit) survive together; 1 = the reference's
    #: per-token scores (see docs/policies.md for the measurement behind the default)
    pyramid_kernel: int = 21
    #: snapkv policy: observation window (queries scored in prefill; protected recent tokens) (reference 32)
    snapkv_window: int = 32
    #: snapkv policy: pooling kernel along keys, odd (the SnapKV authors' LongBench configs: 7)
    snapkv_kernel: int = 21
    #: snapkv policy: "max" (max_pool1d, the SnapKV authors' LongBench configs) or "avg" (``init_snapkv``'s default)
    snapkv_pooling: str = "max"
    #: pyramid policy: in a prompt's prefill, drop the hidden states of the tokens a layer does
    #: not keep, so deeper layers compute only their retained tokens (the PyramidInfer reference;
    #: cuts prefill compute). Off: every layer computes every prompt token and then evicts.
    prefill_drop: bool = False
    #: with prefill_drop: the first layer that computes fewer tokens than the prompt; the layers
    #: before it compute every prompt token and evict per KV head like the default path, and the
    #: first drop is chosen by the attention of layer prefill_drop_from - 1 (1 = the reference:
    #: only layer 0 computes the whole prompt; a larger value trades prefill compute for retrieval)
    prefill_drop_from: int = 1
    #: h2o policy: question window, the last h2o_window prompt queries get an extra vote
    h2o_window: int = 32
    #: h2o policy: the question window's extra vote as a multiple of the rest of the prompt's (0 = reference H2O)
    h2o_window_weight: float = 1.0
    #: h2o policy: max-pool kernel of the scores along keys, odd (1 = the reference's per-token ranking)
    h2o_kernel: int = 21
    #: pyramid / snapkv / h2o: the pooling kernel narrows where a layer has few selectable slots
    #: (budget - sinks - recent window), to the largest odd width at which this many spans fit
    #: them; 0 = the configured kernel everywhere (docs/policies.md, pooling)
    pool_min_spans: int = 0
    #: pyramid / snapkv / h2o: how slots tied on the pooled score are ranked: "newest" (the
    #: later slot wins) or "score" (the slot's own score before pooling, then the later slot)
    pool_tiebreak: str = "newest"
    #: pyramid / snapkv / h2o: the prompt's last query gets an extra vote of this many times its
    #: observation window's whole vote (the query that predicts the answer's first token tells
    #: apart facts the rest of the question shares); 0 = the references' rule (docs/policies.md)
    last_query_weight: float = 1.0
    #: false: a layer never evicts once its prompt is computed: it keeps the prompt's compressed
    #: cache plus every generated token, so a request's pages grow by one token per layer per
    #: generated token (the SnapKV reference; see docs/policies.md). true: generated tokens are
    #: compacted into the budget like prompt tokens, ranked by the decode queries since the last
    #: compaction, and the request's pages stay bounded
    decode_evict: bool = True
    #: pyramid / snapkv: restart kept tokens' scores from 0 after each compaction, so each
    #: compaction ranks by the votes since the previous one (false: scores carry over: under
    #: chunked prefill PyramidInfer's perplexity rose +10.6% at 25%, see docs/policies.md)
    reset_scores: bool = True
    #: "once": while a prompt is prefilled in several chunks (vLLM's chunked prefill), a layer
    #: keeps every prompt token and compacts once, at the prompt's last chunk, ranked by the
    #: votes of the prompt's last queries (the question), as the references score a whole
    #: prompt. "per-chunk": a layer compacts after every chunk, ranked by that chunk's own
    #: last queries: a prompt never holds more than budget + one chunk per layer (the
    #: memory-bounded mode), at a retrieval cost (docs/policies.md)
    prompt_compaction: str = "once"
    #: with vLLM's prefix cache on: a request that evicts and whose prompt starts with cached pages
    #: copies them into pages of its own (it compacts those) and keeps holding the cached pages
    #: until it finishes, as vanilla's requests hold a shared prefix, so a prefix in use stays
    #: cached for the next request (docs/serving.md, "Prefix caching"). false: it lets go of them
    #: after the copy: more room for running requests, fewer hits
    pin_prefix_hits: bool = True
    #: with vLLM's prefix cache on, a request that evicts and whose prompt starts with cached
    #: pages: "compress" compresses that prefix with the rest of its prompt (into copies of the
    #: pages its compacted window rewrites), so its greedy tokens are those of the same request
    #: without the cache. "keep" keeps the hit prefix whole, reading the shared cached pages as
    #: vanilla vLLM does, and compresses only the request's own tokens, with the budget counting
    #: them (a fraction budget is a fraction of the tokens after the prefix): requests that share
    #: a prefix hold it once (docs/serving.md, "Prefix caching")
    prefix_hit: str = "compress"

    # ------------------------------------------------------------------ construction
    def __post_init__(self) -> None:
        self._normalize()
        self.validate()

    def _normalize(self) -> None:
        """Coerce integral floats (e.g. from JSON/YAML) for integer options; check types."""
        set_ = object.__setattr__
        for name in ("compress_interval", "min_layer_budget", "num_stages", "snapkv_window", "snapkv_kernel",
                     "pyramid_kernel", "pyramid_window", "h2o_window", "h2o_kernel", "prefill_drop_from",
                     "pool_min_spans"):
            set_(self, name, _as_int(name, getattr(self, name), optional=False))
        for name in ("recent_window", "sinks"):
            set_(self, name, _as_int(name, getattr(self, name), optional=True))
        for name in ("policy", "snapkv_pooling", "prompt_compaction", "pool_tiebreak", "prefix_hit"):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise _err(name, f"must be a string, got {v!r}")
            set_(self, name, v.strip().lower())
        for name in ("prefill_drop", "reset_scores", "decode_evict", "pin_prefix_hits"):
            if not isinstance(getattr(self, name), bool):
                raise _err(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.schedule is not None:
            if not isinstance(self.schedule, str):
                raise _err("schedule", f"must be a string or null, got {self.schedule!r}")
            set_(self, "schedule", self.schedule.strip().lower())
        b = self.budget
        if not _is_number(b) or (isinstance(b, float) and not math.isfinite(b)):
            raise _budget_err(f"must be a number, got {b!r}")
        if b > 1 and float(b).is_integer():
            set_(self, "budget", int(b))
        for name in ("pyramidkv_beta", "obs_window_ratio", "h2o_window_weight", "last_query_weight"):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v):
                raise _err(name, f"must be a number, got {v!r}")
        if self.floor_ratio is not None and (not _is_number(self.floor_ratio) or not math.isfinite(self.floor_ratio)):
            raise _err("floor_ratio", f"must be a number or null, got {self.floor_ratio!r}")

    def validate(self) -> None:
        """Raise :class:`ConfigError` (one line, naming the option) if anything is invalid."""
        if self.policy not in POLICY_NAMES:
            raise _err("policy", f"unknown policy {self.policy!r}; allowed: {_allowed(POLICY_NAMES)}")
        if self.schedule is not None and self.schedule not in SCHEDULE_NAMES:
            raise _err("schedule", f"unknown schedule {self.schedule!r}; allowed: {_allowed(SCHEDULE_NAMES)}")
        if self.snapkv_pooling not in POOLING_NAMES:
            raise _err("snapkv_pooling", f"unknown pooling {self.snapkv_pooling!r}; allowed: {_allowed(POOLING_NAMES)}")
        if self.prompt_compaction not in PROMPT_COMPACTION_NAMES:
            raise _err("prompt_compaction", f"unknown value {self.prompt_compaction!r}; allowed: "
                                            f"{_allowed(PROMPT_COMPACTION_NAMES)}")
        if self.prefix_hit not in PREFIX_HIT_NAMES:
            raise _err("prefix_hit", f"unknown value {self.prefix_hit!r}; allowed: {_allowed(PREFIX_HIT_NAMES)}")

        b = self.budget
        if b <= 0:
            raise _budget_err(f"must be > 0, got {b!r}")
        if b > 1 and not isinstance(b, int):
            raise _budget_err(f"{b!r} is neither a fraction below 1 nor a whole number of tokens")
        if self.policy == "none" and b != 1:
            raise _err("budget", f"policy 'none' keeps everything, so budget must be 1.0, got {b!r}")

        for name in ("recent_window", "sinks"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise _err(name, f"must be >= 0 or null (policy default), got {v}")
        for name in ("compress_interval", "min_layer_budget", "num_stages", "snapkv_window", "h2o_window",
                     "prefill_drop_from"):
            v = getattr(self, name)
            if v < 1:
                raise _err(name, f"must be an integer >= 1, got {v}")
        if self.pool_tiebreak not in POOL_TIEBREAK_NAMES:
            raise _err("pool_tiebreak", f"unknown value {self.pool_tiebreak!r}; allowed: {_allowed(POOL_TIEBREAK_NAMES)}")
        if self.pool_min_spans < 0:
            raise _err("pool_min_spans", f"must be an integer >= 0 (0 = never narrow the pooling kernel), got {self.pool_min_spans}")
        if self.pyramid_window < 0:
            raise _err("pyramid_window", f"must be an integer >= 0 (0 = obs_window_ratio of the context), got {self.pyramid_window}")
        if self.h2o_window_weight < 0:
            raise _err("h2o_window_weight", f"must be >= 0 (0 = reference H2O), got {self.h2o_window_weight!r}")
        if self.last_query_weight < 0:
            raise _err("last_query_weight",
                       f"must be >= 0 (0 = the references' vote), got {self.last_query_weight!r}")
        for name in ("snapkv_kernel", "pyramid_kernel", "h2o_kernel"):
            v = getattr(self, name)
            if v < 1 or v % 2 == 0:
                raise _err(name, f"must be an odd integer >= 1, got {v}")
        if not 0 < self.obs_window_ratio <= 1:
            raise _err("obs_window_ratio", f"must be in (0, 1], got {self.obs_window_ratio!r}")
        if self.pyramidkv_beta < 1:
            raise _err("pyramidkv_beta", f"must be >= 1, got {self.pyramidkv_beta!r}")
        if self.floor_ratio is not None:
            if not 0 < self.floor_ratio <= 1:
                raise _err("floor_ratio", f"must be in (0, 1] or null, got {self.floor_ratio!r}")
            if self.resolved_schedule not in _PYRAMIDINFER_SCHEDULES:
                raise _err(
                    "floor_ratio",
                    f"only used by schedules {', '.join(_PYRAMIDINFER_SCHEDULES)} (schedule is {self.resolved_schedule!r})",
                )

        if self.prefill_drop_from != 1 and not self.prefill_drop:
            raise _err("prefill_drop_from", f"only with prefill_drop: true (--kv-prefill-drop), got {self.prefill_drop_from}")
        if self.prefill_drop and self.policy != "pyramid":
            raise _err("prefill_drop", f"only with policy 'pyramid' (the PyramidInfer reference), got policy {self.policy!r}")

        if isinstance(b, int) and b > 1:
            fixed = self.resolved_sinks + (self.fixed_recent or 0)
            if b < fixed:
                raise _budget_err(
                    f"{b} tokens is less than sinks + recent_window = {self.resolved_sinks} + {self.fixed_recent or 0}"
                    f" for policy {self.policy!r}"
                )
            if b < self.min_layer_budget:
                raise _budget_err(
                    f"{b} tokens is below min_layer_budget ({self.min_layer_budget}), which a lower "
                    f"kv_compress.min_layer_budget allows"
                )

    # ------------------------------------------------------------------ derived values
    @property
    def enabled(self) -> bool:
        """True when a compression policy is configured (policy != 'none')."""
        return self.policy != "none"

    @property
    def keeps_all(self) -> bool:
        """True when nothing is ever evicted (policy 'none' or budget 1.0)."""
        return self.policy == "none" or self.budget == 1

    def grow_from(self, prompt_len):
        """The computed-token count after which a layer only grows (``retained_count``'s
        ``grow_from``): the prompt length with ``decode_evict: false``, else None (never).
        Works on ints and numpy arrays of prompt lengths alike."""
        return None if self.decode_evict else prompt_len

    def hold_until(self, prompt_len):
        """The computed-token count before which a layer keeps every token (``retained_count``'s
        ``hold_until``): the prompt length with ``prompt_compaction: once``, else None."""
        return prompt_len if self.prompt_compaction == "once" else None

    def retention_args(self, prompt_len) -> dict:
        """``grow_from`` and ``hold_until`` of a request with ``prompt_len`` prompt tokens (ints or
        numpy arrays): the keyword arguments every caller of ``retained_count`` / ``paging``
        passes, so the scheduler, the workers and the oracle apply one rule."""
        return dict(grow_from=self.grow_from(prompt_len), hold_until=self.hold_until(prompt_len))

    def paging_args(self, prompt_len, frozen=0) -> dict:
        """The ``paging`` keywords of a request that keeps its first ``frozen`` prompt tokens whole
        (``prefix_hit: keep``; 0: none): ``retention_args`` of its ``prompt_len - frozen`` own
        prompt tokens, and ``frozen``. Ints or numpy arrays."""
        return dict(self.retention_args(prompt_len - frozen), frozen=frozen)

    @property
    def shares_prefix_cache(self) -> bool:
        """Whether requests that evict may take part in vLLM's prefix cache (``integration.kv_manager``):
        their prompt is compacted once, after its last chunk, so the pages before the compacted
        window are never rewritten. Per-chunk compaction rewrites pages while the prompt is still
        being prefilled, and ``prefill_drop`` leaves deeper layers' pages partly unwritten."""
        return self.prompt_compaction == "once" and not self.prefill_drop

    @property
    def keeps_prefix_hits(self) -> bool:
        """Whether a request that hits vLLM's prefix cache keeps the hit prefix whole and compresses
        only its own tokens (``prefix_hit: keep``; ``paging``'s ``frozen``)."""
        return self.shares_prefix_cache and self.prefix_hit == "keep" and not self.keeps_all

    @property
    def budget_is_fraction(self) -> bool:
        return 0 < self.budget < 1

    @property
    def resolved_schedule(self) -> str:
        return self.schedule if self.schedule is not None else DEFAULT_SCHEDULE[self.policy]

    @property
    def resolved_sinks(self) -> int:
        return self.sinks if self.sinks is not None else DEFAULT_SINKS[self.policy]

    @property
    def resolved_floor_ratio(self) -> float:
        return self.floor_ratio if self.floor_ratio is not None else DEFAULT_PYRAMIDINFER_FLOOR_RATIO

    @property
    def fixed_recent(self) -> int | None:
        """The recent window when it does not depend on the layer budget, else None.

        h2o (budget // 2), pyramid with pyramid_window 0 (ceil(obs_window_ratio * count))
        and streaming (budget - sinks) default to budget-relative windows.
        """
        if self.recent_window is not None:
            return self.recent_window
        if self.policy == "snapkv":
            return self.snapkv_window
        if self.policy == "pyramid" and self.pyramid_window:
            return self.pyramid_window
        if self.policy == "none":
            return 0
        return None

    def prompt_budget(self, prompt_len: int) -> int:
        """The mean per-layer token budget of a request with ``prompt_len`` prompt tokens.

        Fractions round up. Meaningless when :attr:`keeps_all` (returns prompt_len).
        """
        if self.keeps_all:
            return prompt_len
        if self.budget_is_fraction:
            return max(1, math.ceil(self.budget * prompt_len - 1e-9))
        return int(self.budget)

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "KVCompressConfig":
        """Build from a mapping whose keys are field names.

        A mapping with the single key ``kv_compress`` is unwrapped first (the
        layout of ``configs/*.yaml``). Unknown keys raise :class:`ConfigError`.
        """
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ConfigError(f"{_PREFIX}: expected a mapping of options, got {type(d).__name__}")
        if set(d) == {_PREFIX}:
            d = d[_PREFIX] or {}
            if not isinstance(d, Mapping):
                raise ConfigError(f"{_PREFIX}: expected a mapping of options, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            raise _err(str(unknown[0]), f"unknown option; allowed: {_allowed(tuple(names))}")
        return cls(**dict(d))

    @classmethod
    def from_json(cls, s: str) -> "KVCompressConfig":
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{_PREFIX}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        return cls.from_dict(d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "KVCompressConfig":
        import yaml

        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{_PREFIX}: cannot read {str(p)!r}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{_PREFIX}: {str(p)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                              f"{e.start}); expected a UTF-8 YAML file with a kv_compress mapping") from None
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{_PREFIX}: invalid YAML in {str(p)!r}: {first}") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _as_int(name: str, v: Any, *, optional: bool) -> int | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not _is_number(v):
        what = "an integer or null" if optional else "an integer"
        raise _err(name, f"must be {what}, got {v!r}")
    if isinstance(v, float):
        if not (math.isfinite(v) and v.is_integer()):
            raise _err(name, f"must be an integer, got {v!r}")
        return int(v)
    return int(v)


def request_budget(cfg: KVCompressConfig, value: Any, block_size: int | None = None) -> float | int:
    """Validate a per-request ``kv_budget`` (``SamplingParams.extra_args``) against the server's config.

    Same units as :attr:`KVCompressConfig.budget` (:data:`BUDGET_UNITS`; 1 is refused:
    it would keep everything). A request may only LOWER its
    budget: a value above the server's budget in the same unit is refused (in
    mixed units the smaller of the two applies per layer). Returns the value
    normalised; raises :class:`ConfigError` with a one-line message starting
    ``kv_budget:``.
    """

    def err(msg: str) -> ConfigError:
        return ConfigError(f"kv_budget: {msg}")

    if not cfg.enabled:
        raise err("this server runs without KV compression (--kv-policy none), so a per-request budget has no effect")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise err(f"must be a number, got {value!r}; the budget is {BUDGET_UNITS}") from None
    if isinstance(value, bool) or not _is_number(value) or not math.isfinite(value):
        raise err(f"must be a number, got {value!r}; the budget is {BUDGET_UNITS}")
    if value <= 0:
        raise err(f"must be > 0, got {value!r}; the budget is {BUDGET_UNITS}")
    if value >= 1:
        if not float(value).is_integer():
            raise err(f"{value!r} is neither a fraction below 1 nor a whole number of tokens; the budget is {BUDGET_UNITS}")
        value = int(value)
        if value == 1:
            raise err("1 would keep everything; a request may only lower the server's budget")
    server = cfg.budget
    if not cfg.keeps_all:
        same_unit = (value < 1) == cfg.budget_is_fraction
        if same_unit and value > server:
            raise err(f"{value!r} is above the server's budget {server!r}; a request may only lower it")
    if isinstance(value, int):
        if block_size is not None and value < block_size:
            raise err(f"{value} tokens is below the page size ({block_size})")
        try:
            dataclasses.replace(cfg, budget=value)
        except ConfigError as e:
            raise err(str(e).split(": ", 1)[1]) from None
    return value


def variant_settings(name: str) -> dict[str, Any]:
    """The kv_compress options of a policy name as the eval and bench commands accept it:
    ``<policy>``, ``pyramid+drop`` (``prefill_drop``) or ``pyramid+drop@L`` (also
    ``prefill_drop_from: L``). Raises ``ValueError`` naming the allowed forms."""
    base, plus, variant = name.partition("+")
    allowed = f"allowed: {', '.join(POLICY_NAMES[1:])}, pyramid+drop, pyramid+drop@LAYER"
    if base not in POLICY_NAMES[1:]:
        raise ValueError(f"unknown policy {name!r}; {allowed}")
    d: dict[str, Any] = {"policy": base}
    if plus:
        kind, at, layer = variant.partition("@")
        if base != "pyramid" or kind != "drop" or (at and not layer.isdigit()):
            raise ValueError(f"unknown policy variant {name!r}; {allowed}")
        d["prefill_drop"] = True
        if at:
            d["prefill_drop_from"] = int(layer)
    return d
