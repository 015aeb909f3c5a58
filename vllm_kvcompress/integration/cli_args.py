"""Patch point: ``vllm.engine.arg_utils.EngineArgs.add_cli_args`` and
``EngineArgs.from_cli_args``.

Adds ``--kv-policy``, ``--kv-budget``, ``--kv-schedule``, ``--kv-recent-window``, ``--kv-sinks``,
``--kv-compress-interval``, ``--kv-prefill-drop``, ``--kv-prefill-drop-from``, ``--kv-decode-evict``, ``--kv-prompt-compaction`` and ``--kv-config FILE.yaml`` to every EngineArgs parser
(``vllm serve``, ``vllm bench ...``), and moves their values into
``additional_config["kv_compress"]`` — the same place offline users put them:
``LLM(..., additional_config={"kv_compress": {...}})``. Explicit flags override
the YAML file. A bad value exits at once with a one-line error.
"""

from __future__ import annotations

import argparse
import sys

from vllm_kvcompress.config import POLICY_NAMES, PROMPT_COMPACTION_NAMES, SCHEDULE_NAMES, ConfigError, KVCompressConfig
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
}


def add_flags(parser) -> None:
    if any("--kv-policy" in a.option_strings for a in parser._actions):
        return
    g = parser.add_argument_group("KV-cache compression (vllm-kvcompress)")
    g.add_argument("--kv-policy", choices=POLICY_NAMES, default=None,
                   help="Eviction policy for the KV cache (default: none).")
    g.add_argument("--kv-budget", type=float, default=None,
                   help="Retained tokens per layer (mean over layers): an integer >= 1 is tokens, "
                        "a value in (0, 1) a fraction of the prompt length.")
    g.add_argument("--kv-schedule", choices=SCHEDULE_NAMES, default=None,
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
    g.add_argument("--kv-config", default=None, metavar="FILE.yaml",
                   help="YAML file with a kv_compress mapping (see configs/); flags override it.")


def config_from_args(args: argparse.Namespace, base: dict | None = None) -> dict | None:
    """The kv_compress dict from parsed flags (None if no flag was given)."""
    d: dict = dict(base or {})
    path = getattr(args, "kv_config", None)
    if path:
        d.update(KVCompressConfig.from_yaml(path).to_dict())
    given = {field: getattr(args, flag) for flag, field in FLAGS.items() if getattr(args, flag, None) is not None}
    if not path and not given:
        return None
    d.update(given)
    return KVCompressConfig.from_dict(d).to_dict()


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
            except ConfigError as e:
                sys.exit(f"vllm: error: {e}")
            if cfg is not None:
                extra[CONFIG_KEY] = cfg
                engine_args.additional_config = extra
            return engine_args
        return from_cli_args

    patch_method(EngineArgs, "add_cli_args", wrap_add, static=True)
    patch_method(EngineArgs, "from_cli_args", wrap_from, classmethod_=True)
