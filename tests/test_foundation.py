"""Foundation: the plugin is discoverable, assets prepare idempotently, and
vanilla vLLM on the embedded model answers correctly."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from vllm_kvcompress import assets


def test_entry_point_registered():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "kvcompress"]
    assert len(eps) == 1
    assert eps[0].value == "vllm_kvcompress:register"
    register = eps[0].load()
    register()
    register()  # idempotent


def test_vllm_loads_our_plugin():
    code = (
        "from vllm.plugins import load_general_plugins; load_general_plugins();"
        "import vllm_kvcompress; print(vllm_kvcompress._registered)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_vllm_cli_version():
    vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
    out = subprocess.run([vllm, "--version"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "0.32.0+cpu"


def test_assets_idempotent():
    m1 = assets.model_path()
    stamp = (m1 / "model.safetensors").stat().st_mtime_ns
    m2 = assets.model_path()
    assert m1 == m2 and (m2 / "model.safetensors").stat().st_mtime_ns == stamp
    assert (m1 / "config.json").exists() and (m1 / "tokenizer.json").exists()
    e1 = assets.essays_dir()
    assert e1 == assets.essays_dir()
    assert len(list(e1.glob("*.txt"))) >= 40
    assert len(assets.essays_text()) > 500_000


def test_asset_install_failure_is_one_line(monkeypatch):
    # No index, no find-links: pip cannot find the package and must fail fast.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(assets.AssetError) as ei:
        assets._package_dir("kvcompress-no-such-package==9.9.9", "kvcompress_no_such_module")
    msg = str(ei.value)
    assert "\n" not in msg
    assert "kvcompress-no-such-package==9.9.9" in msg


def test_assets_cli_reports_error(tmp_path):
    env = dict(os.environ, VLLM_KVCOMPRESS_CACHE=str(tmp_path), PIP_NO_INDEX="1", PIP_FIND_LINKS="")
    code = (
        "import sys; from vllm_kvcompress import assets;"
        "assets.ESSAYS_PACKAGE=('kvcompress-no-such-package==9.9.9','kvcompress_no_such_module');"
        "sys.exit(assets.main(['essays']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot install")


def test_vanilla_greedy_paris(vanilla_llm):
    from vllm import SamplingParams

    out = vanilla_llm.chat(
        [[{"role": "user", "content": "What is the capital of France?"}]],
        SamplingParams(temperature=0.0, max_tokens=32),
    )
    assert "Paris" in out[0].outputs[0].text, out[0].outputs[0].text
