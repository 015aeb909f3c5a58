"""CUDA wiring of ``platform_config`` (issue #15), checked on a CPU without an engine.

Real vLLM config objects (``ModelConfig`` of the embedded checkpoint, ``VllmConfig``
and its sub-configs) are built while ``vllm.platforms.current_platform`` is vLLM's
own CUDA platform class (``vllm.platforms.cuda.CudaPlatform``; only the device
capability is answered without a GPU), so ``VllmConfig.__post_init__`` runs its
CUDA path in its real order: the plugin's ``apply_config_platform_defaults`` hook,
vLLM's optimization-level defaults, ``CudaPlatform.check_and_update_config`` plus
our ``adjust``, then vLLM's own normalisations after the hook.
"""

from __future__ import annotations

import logging
import sys
import types

import pytest

from vllm_kvcompress.config import ConfigError, KVCompressConfig

H2O = {"policy": "h2o", "budget": 0.5}


@pytest.fixture(scope="module")
def cuda_platform_cls():
    # vllm/platforms/cuda.py imports the CUDA extension at module level, which the CPU wheel lacks
    mp = pytest.MonkeyPatch()
    if "vllm.platforms.cuda" not in sys.modules:
        try:
            import vllm._C_stable_libtorch  # noqa: F401
        except ImportError:
            mp.setitem(sys.modules, "vllm._C_stable_libtorch", types.ModuleType("vllm._C_stable_libtorch"))
    try:
        from vllm.platforms.cuda import CudaPlatform
        from vllm.platforms.interface import DeviceCapability
    finally:
        mp.undo()

    class H200(CudaPlatform):  # vLLM's CUDA platform; only what would query the GPU is answered here
        @classmethod
        def get_device_capability(cls, device_id: int = 0):
            return DeviceCapability(9, 0)

    return H200


@pytest.fixture(scope="module")
def plugin_model():
    import vllm_kvcompress

    from vllm_kvcompress.assets import model_path

    vllm_kvcompress.register()  # the plugin as a CPU process loads it (before the platform is swapped)
    path = str(model_path())
    _model(path)  # load the HF config once on the CPU platform
    return path


def _model(path: str, **kw):
    from vllm.config import ModelConfig

    return ModelConfig(path, max_model_len=1024, **kw)


@pytest.fixture
def cuda(monkeypatch, cuda_platform_cls, plugin_model):
    """current_platform is CUDA; the plugin's platform patches are applied to the CUDA class."""
    import vllm.config.vllm as vllm_config_module
    import vllm.platforms
    from vllm.platforms.cuda import CudaPlatformBase

    from vllm_kvcompress.integration import platform_config

    # undo our patch of the CUDA class afterwards (monkeypatch reads the raw classmethod from __dict__)
    monkeypatch.setattr(CudaPlatformBase, "check_and_update_config",
                        CudaPlatformBase.__dict__["check_and_update_config"])
    monkeypatch.setattr(vllm.platforms, "_current_platform", cuda_platform_cls())
    # as in the CUDA wheel, where Triton is present and vLLM's own choice is Model Runner V2
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    platform_config.apply()
    return plugin_model


@pytest.fixture
def logs():
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    log = logging.getLogger("vllm.kvcompress")
    old = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield lambda: [r.getMessage() for r in records]
    log.removeHandler(handler)
    log.setLevel(old)


def build(path: str, kv: dict | None = None, eager: bool = False, **kw):
    from vllm.config import VllmConfig

    return VllmConfig(model_config=_model(path, enforce_eager=eager),
                      additional_config={} if kv is None else {"kv_compress": kv}, **kw)


def raised_config_error(fn) -> ConfigError:
    """The plugin's ConfigError (pydantic wraps errors raised inside VllmConfig.__post_init__)."""
    from pydantic import ValidationError

    try:
        fn()
    except ConfigError as e:
        return e
    except ValidationError as e:
        err = e.errors()[0].get("ctx", {}).get("error")
        assert isinstance(err, ConfigError), e
        return err
    raise AssertionError("no error raised")


def v2_by_vllm(cfg) -> bool:
    from vllm.config import VllmConfig

    return VllmConfig.use_v2_model_runner.fget.__wrapped__(cfg)


def test_cuda_policy_on_is_wired(cuda, logs):
    from vllm.config.compilation import CompilationMode, CUDAGraphMode
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.core.sched.scheduler import Scheduler

    cfg = build(cuda, H2O)
    assert cfg.attention_config.backend == AttentionBackendEnum.CUSTOM
    assert cfg.compilation_config.mode == CompilationMode.VLLM_COMPILE
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert cfg.compilation_config.cudagraph_capture_sizes  # piecewise graphs are still captured
    assert v2_by_vllm(cfg) is True and cfg.use_v2_model_runner is False
    assert cfg.scheduler_config.async_scheduling is False
    assert cfg.scheduler_config.get_scheduler_cls() is Scheduler
    assert cfg.cache_config.block_size == 32 and cfg.model_config.disable_cascade_attn
    text = "\n".join(logs())
    for line in ("attention backend CUSTOM", "CUDA graphs PIECEWISE (was FULL_AND_PIECEWISE)",
                 "Model Runner V1", "async scheduling off"):
        assert line in text, text


def test_score_cache_share_is_taken_off_gpu_memory_utilization(cuda, logs):
    from vllm_kvcompress.integration.step_plan import score_cache_share

    cfg = build(cuda, H2O)
    share = score_cache_share(cfg.model_config.get_head_size(), cfg.model_config.dtype)
    assert share == 4 / (2 * 64 * cfg.model_config.dtype.itemsize)
    vanilla = build(cuda, None).cache_config.gpu_memory_utilization
    assert cfg.cache_config.gpu_memory_utilization == pytest.approx(vanilla * (1 - share))
    assert "kept for the compression score cache" in "\n".join(logs())


def test_prefill_drop_refused_on_cuda(cuda):
    msg = str(raised_config_error(lambda: build(cuda, {"policy": "pyramid", "budget": 0.5, "prefill_drop": True}, eager=True)))
    assert "\n" not in msg and msg.startswith("kv_compress.prefill_drop") and "CPU" in msg, msg


def test_policy_none_on_cuda_is_vllms_own(cuda):
    from vllm.config.compilation import CUDAGraphMode

    for kv in (None, {"policy": "none"}):
        cfg = build(cuda, kv)
        assert cfg.attention_config.backend is None
        assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE
        assert cfg.use_v2_model_runner is True
        assert cfg.scheduler_config.async_scheduling is True
        assert cfg.cache_config.block_size == 16  # CUDA's default page, not ours


def test_eager_and_allowed_cudagraph_modes_are_kept(cuda, logs):
    from vllm.config import CompilationConfig
    from vllm.config.compilation import CUDAGraphMode

    assert build(cuda, H2O, eager=True).compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    for mode in ("PIECEWISE", "NONE"):
        cfg = build(cuda, H2O, compilation_config=CompilationConfig(cudagraph_mode=mode))
        assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode[mode]
    # -O1's default is PIECEWISE already, -O0's NONE
    assert build(cuda, H2O, optimization_level=1).compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert build(cuda, H2O, optimization_level=0).compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    assert not any("CUDA graphs PIECEWISE" in m for m in logs())


@pytest.mark.parametrize("mode", ["FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"])
def test_user_full_cudagraphs_refused(cuda, mode):
    from vllm.config import CompilationConfig

    err = raised_config_error(lambda: build(cuda, H2O, compilation_config=CompilationConfig(cudagraph_mode=mode)))
    msg = str(err)
    assert "\n" not in msg and "-cc.cudagraph_mode" in msg and mode in msg and "PIECEWISE, NONE" in msg, msg


def test_user_full_cudagraphs_with_eager_is_none(cuda):
    from vllm.config import CompilationConfig
    from vllm.config.compilation import CUDAGraphMode

    cfg = build(cuda, H2O, eager=True, compilation_config=CompilationConfig(cudagraph_mode="FULL"))
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.NONE


@pytest.mark.parametrize("backend", ["TRITON_ATTN", "CUSTOM"])
def test_triton_or_custom_backend_becomes_custom(cuda, backend):
    from vllm.config import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    cfg = build(cuda, H2O, attention_config=AttentionConfig(backend=backend))
    assert cfg.attention_config.backend == AttentionBackendEnum.CUSTOM


def _configs():
    from vllm.config import AttentionConfig, CacheConfig, CompilationConfig

    return {
        "fp8": (dict(cache_config=CacheConfig(cache_dtype="fp8")), ("--kv-cache-dtype fp8", "auto, bfloat16")),
        "block48": (dict(cache_config=CacheConfig(block_size=48)), ("--block-size 48", "16, 32, 64, 128")),
        "block256": (dict(cache_config=CacheConfig(block_size=256)), ("--block-size 256", "16, 32, 64, 128")),
        "flash": (dict(attention_config=AttentionConfig(backend="FLASH_ATTN")),
                  ("--attention-backend", "FLASH_ATTN", "auto, TRITON_ATTN, CUSTOM")),
        "fuse_attn_quant": (dict(compilation_config=CompilationConfig(pass_config={"fuse_attn_quant": True})),
                            ("fuse_attn_quant", "allowed: false")),
    }


@pytest.mark.parametrize("case", ["fp8", "block48", "block256", "flash", "fuse_attn_quant"])
def test_cuda_refusals_are_one_line(cuda, case):
    kw, needles = _configs()[case]
    msg = str(raised_config_error(lambda: build(cuda, H2O, **kw)))
    assert "\n" not in msg and msg.startswith("kv_compress."), msg
    for n in needles:
        assert n in msg, msg


@pytest.mark.parametrize("field,needle", [
    ("decode_context_parallel_size", "--decode-context-parallel-size 2"),
    ("prefill_context_parallel_size", "--prefill-context-parallel-size 2"),
    ("backend_per_kind", "attention_config.backend_per_kind"),
    ("v2_env", "VLLM_USE_V2_MODEL_RUNNER=1"),
])
def test_adjust_refusals_are_one_line(cuda, monkeypatch, field, needle):
    """Settings a 1-layer CPU box cannot build a VllmConfig for: set on a built one, then adjust()."""
    import vllm.envs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_kvcompress.integration import platform_config

    cfg = build(cuda)  # policy none: vLLM's own config
    cfg.additional_config = {"kv_compress": H2O}
    if field == "backend_per_kind":
        cfg.attention_config.backend_per_kind = {"full_attention": AttentionBackendEnum.FLASH_ATTN}
    elif field == "v2_env":
        monkeypatch.setattr(vllm.envs, "VLLM_USE_V2_MODEL_RUNNER", True, raising=False)
    else:
        setattr(cfg.parallel_config, field, 2)
    with pytest.raises(ConfigError) as e:
        platform_config.adjust(cfg)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg, msg
    assert "allowed" in msg, msg
    assert cfg.attention_config.backend is None  # refused before anything was changed


def test_refuse_on_parsed_flags(cuda):
    from vllm_kvcompress.integration.platform_config import refuse

    cfg = KVCompressConfig.from_dict(H2O)
    flags = dict(speculative=False, kv_transfer=False, disable_hma=False)
    for bs in (None, 16, 32, 64, 128):
        refuse(cfg, block_size=bs, **flags)
    with pytest.raises(ConfigError) as e:
        refuse(cfg, block_size=24, **flags)
    assert "\n" not in str(e.value) and "--block-size 24" in str(e.value)
    refuse(KVCompressConfig(), block_size=24, **flags)  # policy none: vLLM's own checks only


def test_other_accelerators_refused_in_one_line(monkeypatch, plugin_model):
    import vllm.platforms
    from vllm.platforms.interface import Platform, PlatformEnum

    from vllm_kvcompress.integration.platform_config import refuse

    class Rocm(Platform):
        _enum = PlatformEnum.ROCM

    monkeypatch.setattr(vllm.platforms, "_current_platform", Rocm())
    with pytest.raises(ConfigError) as e:
        refuse(KVCompressConfig.from_dict(H2O), speculative=False, kv_transfer=False, disable_hma=False,
               block_size=None)
    assert "\n" not in str(e.value) and "--kv-policy none" in str(e.value)


def test_cpu_is_unchanged(plugin_model, monkeypatch):
    from vllm.config.compilation import CUDAGraphMode
    from vllm.platforms import current_platform

    from vllm_kvcompress.integration import platform_config
    from vllm_kvcompress.integration.platform_config import refuse

    assert current_platform.is_cpu()

    def boom(*a, **k):
        raise AssertionError("CUDA wiring ran on the CPU platform")

    monkeypatch.setattr(platform_config, "_adjust_cuda", boom)
    monkeypatch.setattr(platform_config, "check_requested_cudagraph_mode", boom)
    cfg = build(plugin_model, H2O, eager=True)
    assert cfg.attention_config.backend is None  # vLLM picks CPU_ATTN (the plugin's subclass) itself
    assert cfg.cache_config.block_size == 32 and cfg.model_config.disable_cascade_attn
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    assert cfg.use_v2_model_runner is False and cfg.scheduler_config.async_scheduling is False
    vanilla = build(plugin_model, None, eager=True)
    assert vanilla.cache_config.block_size == 128
    # the CUDA page-size rule is CUDA's only
    refuse(KVCompressConfig.from_dict(H2O), speculative=False, kv_transfer=False, disable_hma=False, block_size=48)
