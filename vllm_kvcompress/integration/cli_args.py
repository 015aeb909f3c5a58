"""Patch point: ``vllm.engine.arg_utils.EngineArgs.add_cli_args`` and
``EngineArgs.from_cli_args``.

Adds ``--kv-policy``, ``--kv-budget``, ``--kv-schedule``, ``--kv-recent-window``, ``--kv-sinks``,
``--kv-compress-interval``, ``--kv-prefill-drop``, ``--kv-prefill-drop-from``, ``--kv-decode-evict``, ``--kv-prompt-compaction``, ``--kv-pin-prefix-hits``, ``--kv-prefix-hit`` and ``--kv-config FILE.yaml`` to every EngineArgs parser
(``vllm serve``, ``vllm bench ...``), and moves their values into
``additional_config["kv_compress"]`` — the same place offline users put them:
``LLM(..., additional_config={"kv_compress": {...}})``. Explicit flags override
the YAML file. A bad value exits at once with a one-line error naming the option and
what it accepts: flags, the ``--kv-config`` file (unreadable, not UTF-8, not YAML),
``--additional-config``'s ``kv_compress`` (a mapping, or a JSON object in a string, as
``kv_config_of`` reads it) and a ``--kv-prefill-drop-from`` beyond the model's layers.
Policy and schedule names are case-insensitive, as in the config.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping

from vllm_kvcompress.config import (BUDGET_UNITS, POLICY_NAMES, PREFIX_HIT_NAMES, PROMPT_COMPACTION_NAMES,
                                    SCHEDULE_NAMES, ConfigError, KVCompressConfig)
from vllm_kvcompress.integration import platform_config
from vllm_kvcompress.integration.common import CONFIG_KEY, patch_method

# flag -> config field
FLAGS = {
    "kv_policy": "policy",
    "kv_budget": "budget",
    "kv_schedule": "schedule",
    "kv_recent_window": "recent_window",
    "kv_sinks": "sinks",
    "kv_compress_interval": "compress_interval",
    "kv_prefill_drop": "prefill_drop",
    "kv_prefill_drop_from": "prefill_drop_from",
    "kv_decode_evict": "decode_evict",
    "kv_prompt_compaction": "prompt_compaction",
    "kv_pin_prefix_hits": "pin_prefix_hits",
    "kv_prefix_hit": "prefix_hit",
}


def _lower(value: str) -> str:
    """``--kv-policy`` / ``--kv-schedule`` values: case-insensitive, like the config."""
    return value.strip().lower()


def _budget(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number; the budget is {BUDGET_UNITS}") from None


def add_flags(parser) -> None:
    if any("--kv-policy" in a.option_strings for a in parser._actions):
        return
    g = parser.add_argument_group("KV-cache compression (vllm-kvcompress)")
    g.add_argument("--kv-policy", type=_lower, choices=POLICY_NAMES, default=None,
                   help="Eviction policy for the KV cache (default: none; case-insensitive).")
    g.add_argument("--kv-budget", type=_budget, default=None, metavar="BUDGET",
                   help=f"Retained tokens per layer (mean over layers): {BUDGET_UNITS}.")
    g.add_argument("--kv-schedule", type=_lower, choices=SCHEDULE_NAMES, default=None,
                   help="How the budget is spread over the layers (default: the policy's; pyramid: "
                        "pyramidinfer-cosine, snapkv: pyramidkv, others: uniform).")
    g.add_argument("--kv-recent-window", type=int, default=None,
                   help="Newest tokens always kept per layer (default: the policy's).")
    g.add_argument("--kv-sinks", type=int, default=None,
                   help="Oldest tokens always kept per layer (default: the policy's).")
    g.add_argument("--kv-compress-interval", type=int, default=None,
                   help="A layer grows this many tokens past its budget before compacting (default 32).")
    g.add_argument("--kv-prefill-drop", action="store_true", default=None,
                   help="PyramidInfer only: in prefill, deeper layers compute only the tokens they keep "
                        "(drops the other tokens' hidden states, as the reference does). Needs --enforce-eager.")
    g.add_argument("--kv-prefill-drop-from", type=int, default=None, metavar="LAYER",
                   help="With --kv-prefill-drop: the first layer that computes fewer tokens; the layers before "
                        "it compute the whole prompt (default 1, the reference).")
    g.add_argument("--kv-decode-evict", action=argparse.BooleanOptionalAction, default=None,
                   help="Compact generated tokens into the budget (default). --no-kv-decode-evict: never evict "
                        "after the prompt, the SnapKV reference (pages grow with the answer).")
    g.add_argument("--kv-prompt-compaction", choices=PROMPT_COMPACTION_NAMES, default=None,
                   type=lambda s: s.strip().lower(),
                   help="When a prompt split by chunked prefill is compressed: once, at its last chunk, ranked "
                        "by the prompt's last queries (default), or per-chunk, after every chunk (a prompt then "
                        "holds at most budget + one chunk per layer, at a retrieval cost).")
    g.add_argument("--kv-pin-prefix-hits", action=argparse.BooleanOptionalAction, default=None,
                   help="With prefix caching: a request that evicts keeps holding the cached prefix pages it "
                        "hit until it finishes, so a prefix in use stays cached (default). "
                        "--no-kv-pin-prefix-hits: it lets go of them after copying them.")
    g.add_argument("--kv-prefix-hit", choices=PREFIX_HIT_NAMES, default=None, type=lambda s: s.strip().lower(),
                   help="With prefix caching, a request whose prompt starts with cached pages: compress that "
                        "prefix with its prompt, into pages of its own (default: tokens as without the cache), "
                        "or keep it whole in the shared pages and compress only its own tokens (keep).")
    g.add_argument("--kv-config", default=None, metavar="FILE.yaml",
                   help="YAML file with a kv_compress mapping (see configs/); flags override it.")


def additional_config_dict(base) -> dict:
    """``--additional-config``'s ``kv_compress`` value as a dict of options (a mapping, a
    :class:`KVCompressConfig`, or a JSON object in a string, as ``kv_config_of`` takes it);
    a one-line :class:`ConfigError` naming the option otherwise."""
    where = "--additional-config kv_compress"
    example = 'e.g. {"policy": "h2o", "budget": 0.25} (or that mapping as a JSON string)'
    if base is None:
        return {}
    if isinstance(base, KVCompressConfig):
        return base.to_dict()
    if isinstance(base, str):
        try:
            base = json.loads(base)
        except json.JSONDecodeError:
            raise ConfigError(f"{where}: expected a mapping of options, {example}, got the string "
                              f"{base[:80]!r}") from None
    if not isinstance(base, Mapping):
        raise ConfigError(f"{where}: expected a mapping of options, {example}, got {type(base).__name__} "
                          f"{str(base)[:80]!r}")
    if set(base) == {CONFIG_KEY}:  # the configs/*.yaml layout, as KVCompressConfig.from_dict takes it
        return additional_config_dict(base[CONFIG_KEY])
    return dict(base)


def config_from_args(args: argparse.Namespace, base=None) -> dict | None:
    """The kv_compress dict from parsed flags over ``--additional-config``'s ``kv_compress``
    (``base``), validated; None if neither gives an option."""
    d: dict = additional_config_dict(base)
    path = getattr(args, "kv_config", None)
    if path:
        try:
            d.update(KVCompressConfig.from_yaml(path).to_dict())
        except ConfigError as e:
            raise ConfigError(f"--kv-config: {e}") from None
    given = {field: getattr(args, flag) for flag, field in FLAGS.items() if getattr(args, flag, None) is not None}
    if not path and not given and base is None:
        return None
    d.update(given)
    return KVCompressConfig.from_dict(d).to_dict()


def _num_layers(engine_args) -> int | None:
    """The model's layer count (None if its config cannot be read here: vLLM reports that)."""
    try:
        return engine_args.create_model_config().get_total_num_hidden_layers()
    except Exception:  # noqa: BLE001
        return None


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    def wrap_add(original):
        def add_cli_args(parser, *a, **kw):
            parser = original(parser, *a, **kw)
            add_flags(parser)
            return parser
        return add_cli_args

    def wrap_from(original):
        def from_cli_args(cls, args, *a, **kw):
            engine_args = original.__func__(cls, args, *a, **kw)
            extra = dict(engine_args.additional_config or {})
            try:
                cfg = config_from_args(args, extra.get(CONFIG_KEY))
                if cfg is not None:  # what cannot run with eviction: refuse now, in one line
                    platform_config.refuse(KVCompressConfig.from_dict(cfg),
                                           speculative=engine_args.speculative_config is not None,
                                           kv_transfer=engine_args.kv_transfer_config is not None,
                                           disable_hma=bool(engine_args.disable_hybrid_kv_cache_manager),
                                           block_size=engine_args.block_size,
                                           eager=bool(engine_args.enforce_eager),
                                           parallel=engine_args.tensor_parallel_size * engine_args.pipeline_parallel_size,
                                           pipeline=engine_args.pipeline_parallel_size)
                    kv = KVCompressConfig.from_dict(cfg)
                    if kv.enabled and kv.prefill_drop and kv.prefill_drop_from > 1:
                        layers = _num_layers(engine_args)
                        if layers is not None:
                            platform_config.check_layers(kv, layers)
            except ConfigError as e:
                sys.exit(f"vllm: error: {e}")
            if cfg is not None:
                extra[CONFIG_KEY] = cfg
                engine_args.additional_config = extra
            return engine_args
        return from_cli_args

    patch_method(EngineArgs, "add_cli_args", wrap_add, static=True)
    patch_method(EngineArgs, "from_cli_args", wrap_from, classmethod_=True)
