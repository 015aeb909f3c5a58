"""Patch point: ``<current platform class>.check_and_update_config``
(``vllm.platforms.cpu.CpuPlatform`` on CPU, ``CudaPlatform`` on CUDA), which
``VllmConfig.__post_init__`` calls once per engine.

With a compression policy on, it validates the ``kv_compress`` config (one-line
errors), picks a 32-token page when the user did not choose one (pages are the
unit in which eviction frees memory), and refuses features that cannot work with
eviction.
"""

from __future__ import annotations

from vllm_kvcompress.config import ConfigError
from vllm_kvcompress.integration.common import kv_config_of, logger, patch_method

DEFAULT_BLOCK_SIZE = 32


def refuse(cfg, *, speculative: bool, kv_transfer: bool, disable_hma: bool, block_size: int | None,
           eager: bool = True, parallel: int = 1) -> None:
    """Raise a one-line :class:`ConfigError` for a setting that cannot run with eviction.

    Called by :func:`adjust` (every engine) and, earlier, by ``cli_args`` on the
    parsed flags so that ``vllm serve`` exits with that one line."""
    from vllm.platforms import current_platform

    if not cfg.enabled:
        return
    if not current_platform.is_cpu():
        raise ConfigError("kv_compress.policy: this release compresses on vLLM's CPU backend only; the CUDA "
                          "attention backend is not implemented yet (use --kv-policy none on GPUs)")
    if speculative:
        raise ConfigError("kv_compress.policy: speculative decoding cannot run with KV eviction; "
                          "drop --speculative-config or use --kv-policy none")
    if kv_transfer:
        raise ConfigError("kv_compress.policy: KV connectors (--kv-transfer-config) cannot run with KV eviction; "
                          "drop --kv-transfer-config or use --kv-policy none")
    if disable_hma:
        raise ConfigError("kv_compress.policy: needs vLLM's hybrid KV-cache manager; "
                          "drop --disable-hybrid-kv-cache-manager or use --kv-policy none")
    if cfg.prefill_drop and not eager:
        raise ConfigError("kv_compress.prefill_drop: needs --enforce-eager (the number of tokens changes between "
                          "layers inside the forward pass, which torch.compile cannot trace)")
    if cfg.prefill_drop and parallel > 1:
        raise ConfigError("kv_compress.prefill_drop: needs --tensor-parallel-size 1 and --pipeline-parallel-size 1 "
                          "(each rank would pick different tokens from its own heads)")
    bs = block_size or DEFAULT_BLOCK_SIZE
    if not cfg.keeps_all and not cfg.budget_is_fraction and cfg.budget < bs:
        raise ConfigError(f"kv_compress.budget: {cfg.budget} tokens is below the page size (--block-size {bs}); "
                          f"use a budget >= {bs} or a smaller --block-size")


def adjust(vllm_config) -> None:
    cfg = kv_config_of(vllm_config)  # raises ConfigError on bad input
    if not cfg.enabled:
        return
    cache = vllm_config.cache_config
    sched = vllm_config.scheduler_config
    model = vllm_config.model_config
    user_bs = getattr(cache, "user_specified_block_size", False)
    refuse(cfg, speculative=vllm_config.speculative_config is not None,
           kv_transfer=vllm_config.kv_transfer_config is not None,
           disable_hma=bool(sched.disable_hybrid_kv_cache_manager),
           block_size=cache.block_size if user_bs else None,
           eager=bool(model is None or model.enforce_eager),
           parallel=vllm_config.parallel_config.tensor_parallel_size
           * vllm_config.parallel_config.pipeline_parallel_size)
    if not user_bs:
        cache.block_size = DEFAULT_BLOCK_SIZE
    if model is not None:
        model.disable_cascade_attn = True
        if not cfg.keeps_all and not cfg.budget_is_fraction and cfg.budget >= model.max_model_len:
            logger.warning("vllm-kvcompress: kv_compress.budget %s >= max model length %d: nothing will be evicted",
                           cfg.budget, model.max_model_len)
    logger.info("vllm-kvcompress: %s", cfg.to_json())


def apply() -> None:
    from vllm.platforms import current_platform

    def wrap(original):
        def check_and_update_config(cls, vllm_config):
            original.__func__(cls, vllm_config)
            adjust(vllm_config)
        return check_and_update_config

    owner = type(current_platform)
    # patch the class that defines the method so subclasses see it too
    for klass in owner.__mro__:
        if "check_and_update_config" in klass.__dict__:
            patch_method(klass, "check_and_update_config", wrap, classmethod_=True)
            break
