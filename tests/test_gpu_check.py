"""``benchmarks/gpu_check.py --smoke``: the GPU check's code, run small (on CPU under the
Triton interpreter when there is no CUDA), in a subprocess in which importing vLLM fails:
the check must run on a box that has only torch and triton."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"

# Runs the script with every `import vllm...` raising ImportError (vllm_kvcompress is allowed).
_NO_VLLM = """
import runpy, sys
class _NoVLLM:
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("gpu_check must not import vLLM: " + name)
        return None
sys.meta_path.insert(0, _NoVLLM())
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def _run(args, timeout=600, **env):
    e = dict(os.environ, PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-c", _NO_VLLM, str(SCRIPT), *args], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=timeout)


def test_gpu_check_smoke(tmp_path):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    proc = _run(["--smoke", "--out-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "overall: PASS" in proc.stdout, proc.stdout[-2000:]
    rep = json.loads((tmp_path / "gpu_check_smoke.json").read_text())
    assert (tmp_path / "gpu_check_smoke.md").read_text().startswith("# GPU check (smoke): PASS")

    env = rep["environment"]
    assert env["mode"] == "smoke" and env["dtypes"] == ["float32"] and not env["vllm_imported"]
    for key in ("torch", "triton", "device", "python"):
        assert env[key]
    if env["device_type"] == "cpu":
        assert env["triton_interpret"] == "1" and env["kernel_object"] == "InterpretedFunction"

    secs = rep["sections"]
    assert set(secs) == {"correctness", "speed", "cuda_graph"}
    cases = secs["correctness"]["cases"]
    assert {c["kernel"] for c in cases} == {"decode", "window", "compact"}
    assert len(cases) >= 9
    bad = [c for c in cases if c["status"] != "pass"]
    assert not bad, bad
    for c in cases:
        assert all(isinstance(v, float) for v in c["max_abs_err"].values()), c
    assert secs["speed"]["cases"] and all(r["status"] == "ok" for r in secs["speed"]["cases"])
    if env["device_type"] == "cpu":
        assert secs["cuda_graph"]["cases"] == [] and any("skipped" in n for n in secs["cuda_graph"]["notes"])
        assert any("skipped" in n for n in secs["speed"]["notes"])
    else:
        assert all(r["status"] == "pass" for r in secs["cuda_graph"]["cases"])
    assert rep["summary"]["overall"] == "PASS"


def test_gpu_check_without_cuda_says_so(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = _run(["--out-dir", str(tmp_path)], timeout=120)
    assert proc.returncode == 2
    msg = proc.stderr.strip()
    assert len(msg.splitlines()) == 1 and "CUDA is required" in msg and "--smoke" in msg, msg
    assert not list(tmp_path.iterdir())
