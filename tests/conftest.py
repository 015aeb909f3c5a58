"""Shared fixtures. A vLLM engine takes ~30-60 s to start on 2 cores, so engines
are shared: one vanilla engine for the whole session."""

from __future__ import annotations

import os

import pytest

# Every engine in the tests: explicit KV size, eager mode, no hub access.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")

ENGINE_DEFAULTS = dict(
    kv_cache_memory_bytes=256 << 20,
    max_model_len=4096,
    enforce_eager=True,
    dtype="bfloat16",
    seed=0,
)


@pytest.fixture(scope="session")
def model_dir() -> str:
    from vllm_kvcompress.assets import model_path

    return str(model_path())


def make_llm(model_dir: str, **overrides):
    from vllm import LLM

    kw = dict(ENGINE_DEFAULTS)
    kw.update(overrides)
    return LLM(model_dir, **kw)


@pytest.fixture(scope="session")
def vanilla_llm(model_dir):
    llm = make_llm(model_dir)
    yield llm
    del llm
