"""The wheel, installed non-editable in a fresh venv, runs the C++ kernels (issue #30).

CI's proof of the install path the Dockerfile takes: ``scripts/install_wheel.sh`` (the
Dockerfile's install step, unchanged) builds the wheel from a copy of the repository
with ``pip wheel . -w DIST --no-build-isolation --no-deps`` against the set-up venv's
torch and installs it with ``pip install DIST/vllm_kvcompress-*.whl`` into a fresh venv.
Then, in that venv, with no C++ compiler (``CXX=/bin/false``) and an empty kernel
cache, the installed package must report the C++ path from its prebuilt library and
serve one compressed request through ``LLM.generate`` that evicts tokens.

The fresh venv reuses the set-up venv's packages (vLLM, torch, ...) through a ``.pth``
line that puts the set-up site-packages AFTER its own (a plain path: the set-up
venv's editable-install finder is not run), so its own copy of vllm-kvcompress is the
one imported and the one whose entry points vLLM loads. pip settings keep the install
offline and beside that editable copy of the same version: ``PIP_NO_INDEX``,
``PIP_NO_DEPS`` (the dependencies are the set-up venv's) and ``PIP_FORCE_REINSTALL``
(pip would otherwise call 0.1.0 "already installed"; it never uninstalls outside the
fresh venv). ~40 s on 2 cores: a 20 s compile, a 10 s engine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# what the Dockerfile copies into the image before running the same script
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "csrc", "vllm_kvcompress",
           "scripts/install_wheel.sh")

needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None,
    reason="building the wheel's kernels needs a C++ compiler and ninja")

CHECK = r"""
import importlib.metadata as md, json, sys
import vllm_kvcompress
from vllm_kvcompress import _ext, ops
from vllm import LLM, SamplingParams

res = {"package": vllm_kvcompress.__file__,
       "dist": str(md.distribution("vllm-kvcompress").locate_file("vllm_kvcompress")),
       "plugin": [ep.value for ep in md.entry_points(group="vllm.general_plugins") if ep.name == "kvcompress"],
       "impl": ops.impl_for("cpu"), "origin": _ext.origin(), "library": str(_ext.library())}
llm = LLM(sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=1024, kv_cache_memory_bytes=64 << 20,
          seed=0, additional_config={"kv_compress": {"policy": "h2o", "budget": 0.25}})
out = llm.generate(["The quick brown fox jumps over the lazy dog. " * 40],
                   SamplingParams(max_tokens=8, temperature=0.0))[0]
sched = llm.llm_engine.engine_core.engine_core.scheduler
res["evicted"] = sum(getattr(m, "evicted_tokens", 0) for m in sched.kv_cache_manager.coordinator.single_type_managers)
res["prompt_tokens"] = len(out.prompt_token_ids)
res["output_tokens"] = len(out.outputs[0].token_ids)
res["loaded_after"] = str(_ext.library())
print("RESULT " + json.dumps(res))
"""


def _copy_sources(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")
    for rel in SOURCES:
        src = REPO / rel
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst / rel, ignore=ignore)
        else:
            shutil.copy2(src, dst / rel)


@needs_compiler
def test_wheel_in_fresh_venv_runs_cpp_kernels(tmp_path, model_dir):
    src, dist, venv, cache = tmp_path / "src", tmp_path / "dist", tmp_path / "venv", tmp_path / "cache"
    _copy_sources(src)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    own = Path(subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip())
    (own / "zz_setup_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHON=str(vpy), DIST=str(dist), PIP_NO_INDEX="1", PIP_NO_DEPS="1", PIP_FORCE_REINSTALL="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")

    # the Dockerfile's install step
    inst = subprocess.run([str(src / "scripts" / "install_wheel.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    log = inst.stdout + inst.stderr
    assert inst.returncode == 0, log[-4000:]
    wheels = list(dist.glob("vllm_kvcompress-*.whl"))
    assert len(wheels) == 1, log[-2000:]
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    assert {"vllm_kvcompress/_kvcompress_cpu.so", "vllm_kvcompress/_kvcompress_cpu.json",
            "vllm_kvcompress/csrc/kvcompress_cpu.cpp"} <= names, sorted(names)
    assert "C++ kernels: loaded, prebuilt in the package" in inst.stdout, log[-3000:]  # the doctor's report
    assert all(f"{op} " in inst.stdout for op in ("decode_attention_scores", "compact_windows")), inst.stdout

    # the installed package: prebuilt kernels with no compiler and no cache, one compressed request
    run_env = dict(env, CXX="/bin/false", VLLM_KVCOMPRESS_CACHE=str(cache), VLLM_ENABLE_V1_MULTIPROCESSING="0",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for k in ("PYTHON", "DIST", "VLLM_KVCOMPRESS_OPS", "VLLM_KVCOMPRESS_PREBUILT"):
        run_env.pop(k, None)
    proc = subprocess.run([str(vpy), "-c", CHECK, model_dir], cwd=tmp_path, env=run_env, capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads(lines[-1][len("RESULT "):])
    site = str(own)
    assert res["package"].startswith(site), res  # the wheel's copy, not the repository's
    assert res["dist"].startswith(site) and res["plugin"] == ["vllm_kvcompress:register"], res
    assert res["impl"] == "cpp" and res["origin"] == "prebuilt", res
    assert res["library"].startswith(site) and res["loaded_after"] == res["library"], res
    assert res["output_tokens"] == 8 and res["evicted"] > 0, res  # budget 0.25 of a ~400-token prompt
    assert not cache.exists() or not any(cache.rglob("*.so")), "nothing may be compiled into the cache"


def test_prebuilt_library_used_only_where_it_matches(tmp_path, monkeypatch):
    """A prebuilt library is loaded only for the torch, ISA flags and source it was built with."""
    import torch

    from vllm_kvcompress import _ext

    monkeypatch.setattr(_ext, "_HERE", tmp_path)
    assert _ext.prebuilt()[0] is None and "no prebuilt library" in _ext.prebuilt()[1]
    lib = tmp_path / (_ext.PREBUILT_NAME + ".so")
    lib.write_bytes(b"")
    src = tmp_path / "csrc" / "kvcompress_cpu.cpp"
    src.parent.mkdir()
    src.write_text("// source\n")
    record = {"torch": torch.__version__, "isa_flags": _ext.isa_flags(), "source_sha256": _ext.source_digest(src)}
    rec = tmp_path / _ext.PREBUILT_RECORD
    rec.write_text(json.dumps(record))
    assert _ext.prebuilt() == (lib, "")
    rec.write_text(json.dumps(dict(record, torch="0.0.1")))
    assert _ext.prebuilt()[1] == f"the prebuilt library is for torch 0.0.1, this is torch {torch.__version__}"
    rec.write_text(json.dumps(dict(record, isa_flags=["-mfoo"])))
    assert "compiled with ISA flags -mfoo" in _ext.prebuilt()[1]
    rec.write_text(json.dumps(dict(record, source_sha256="0" * 64)))
    assert "from another kvcompress_cpu.cpp" in _ext.prebuilt()[1]
    rec.write_text(json.dumps(record))
    monkeypatch.setenv("VLLM_KVCOMPRESS_PREBUILT", "0")
    assert _ext.prebuilt() == (None, "VLLM_KVCOMPRESS_PREBUILT=0")


def test_no_compiler_is_one_warning_line_and_the_doctor_says_reference(tmp_path):
    """No prebuilt library (the editable checkout), no cached build, no compiler: one warning
    line naming the missing compiler, the torch reference, and the doctor's exit status 1."""
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_KVCOMPRESS_OPS", "PYTHONPATH")}
    env.update(CXX=str(tmp_path / "no-such-c++"), VLLM_KVCOMPRESS_CACHE=str(tmp_path / "cache"),
               VLLM_KVCOMPRESS_PREBUILT="0")
    code = ("import logging; logging.basicConfig(format='%(message)s')\n"
            "from vllm_kvcompress import _ext, ops\n"
            "print('IMPL', ops.impl_for('cpu'))\nprint('ERROR', _ext.error())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "IMPL reference" in proc.stdout
    warnings = [ln for ln in proc.stderr.splitlines() if "C++ CPU kernels unavailable" in ln]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0] and "no-such-c++" in warnings[0], proc.stderr
    doc = subprocess.run([sys.executable, "-m", "vllm_kvcompress._ext", "--doctor"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert doc.returncode == 1, doc.stdout + doc.stderr
    assert "C++ kernels: unavailable: RuntimeError: no C++ compiler" in doc.stdout
    assert "compact_windows            reference" in doc.stdout, doc.stdout
