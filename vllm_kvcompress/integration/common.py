"""Small helpers shared by the patch modules."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from vllm_kvcompress.config import ConfigError, KVCompressConfig

logger = logging.getLogger("vllm.kvcompress")  # under vLLM's logger: same handlers and format

CONFIG_KEY = "kv_compress"
_MARK = "__kvcompress_patched__"


def patch_method(owner: type, name: str, make_wrapper: Callable[[Callable], Callable], static: bool = False,
                 classmethod_: bool = False) -> bool:
    """Replace ``owner.name`` by ``make_wrapper(original)`` once; False if already patched."""
    raw = owner.__dict__.get(name)
    if raw is None:
        raise RuntimeError(f"vllm-kvcompress: {owner.__qualname__}.{name} not found in this vLLM")
    func = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
    if getattr(func, _MARK, False):
        return False
    original = getattr(owner, name) if (static or classmethod_) else func
    wrapper = make_wrapper(original)
    functools.update_wrapper(wrapper, func)
    setattr(wrapper, _MARK, True)
    if static:
        wrapper = staticmethod(wrapper)
    elif classmethod_:
        wrapper = classmethod(wrapper)
    setattr(owner, name, wrapper)
    return True


def kv_config_of(vllm_config: Any) -> KVCompressConfig:
    """The compression config carried in ``vllm_config.additional_config``."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    raw = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    if raw is None:
        return KVCompressConfig()
    if isinstance(raw, KVCompressConfig):
        return raw
    if isinstance(raw, str):
        return KVCompressConfig.from_json(raw)
    return KVCompressConfig.from_dict(raw)


def current_kv_config() -> KVCompressConfig:
    from vllm.config import get_current_vllm_config

    return kv_config_of(get_current_vllm_config())


__all__ = ["ConfigError", "CONFIG_KEY", "patch_method", "kv_config_of", "current_kv_config", "logger"]
