"""Shared fixtures. A vLLM engine takes ~30-60 s to start on 2 cores, so engines
are shared (module-scoped) and run in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so tests can read the scheduler's
KV-cache manager directly."""

from __future__ import annotations

import gc
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

KV_BYTES = 256 << 20

# Every engine in the tests: explicit KV size, eager mode, no hub access.
ENGINE_DEFAULTS = dict(
    kv_cache_memory_bytes=KV_BYTES,
    max_model_len=4096,
    enforce_eager=True,
    dtype="float32",  # 4x faster than bf16 on CPUs without AVX-512 BF16
    seed=0,
)


@pytest.fixture(scope="session")
def model_dir() -> str:
    from vllm_kvcompress.assets import model_path

    return str(model_path())


def make_llm(model_dir: str, kv: dict | None = None, **overrides):
    from vllm import LLM

    kw = dict(ENGINE_DEFAULTS)
    kw.update(overrides)
    if kv is not None:
        kw["additional_config"] = {"kv_compress": kv}
    return LLM(model_dir, **kw)


def close_llm(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def vanilla_llm(model_dir):
    """The plugin is installed but no policy is set: vLLM's own behaviour.

    Module-scoped: in-process engines share vLLM's process-global parallel state,
    so an engine must not be used after another one was shut down."""
    llm = make_llm(model_dir)
    yield llm
    close_llm(llm)


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


@pytest.fixture(scope="session")
def essay_prompts():
    """Three ~1.9K-token and three ~600-token completion prompts built from the essays."""
    from vllm_kvcompress.assets import essays_text

    text = essays_text()
    long = [text[i * 9000: i * 9000 + 8200] + "\n\nIn summary," for i in range(3)]
    short = [text[50000 + i * 3000: 50000 + i * 3000 + 2600] + "\n\nIn summary," for i in range(3)]
    return {"long": long, "short": short}


@pytest.fixture(scope="session")
def cut_model_dir(model_dir, tmp_path_factory) -> str:
    """The embedded model cut to its first 2 decoder layers, saved as an HF checkpoint
    (for engines whose kernels run interpreted: 2 layers instead of 30)."""
    return cut_checkpoint(model_dir, str(tmp_path_factory.mktemp("cut2")), num_layers=2)


def cut_checkpoint(model_dir: str, out_dir: str, num_layers: int) -> str:
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    src, dst = Path(model_dir), Path(out_dir)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = num_layers
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    keep = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if name.startswith("model.layers."):
            if int(name.split(".")[2]) >= num_layers:
                continue
        keep[name] = t.contiguous()
    save_file(keep, str(dst / "model.safetensors"))
    return str(dst)


def expected_compaction(cache, layer, bt, old, new, kept, keep, new_acc=None):
    """Slot-by-slot expectation of ``ops.compact_windows`` from the untouched input
    (no code shared with the kernels): ``cache`` is the ``[nb, H, 2*bs, D]`` layer
    cache that ``layer`` (``ops.paged_view``) views. Returns (cache, scores)."""
    from vllm_kvcompress import ops

    bs = layer.block_size
    exp_cache = cache.clone()
    ek, ev = exp_cache.chunk(2, dim=2)
    exp = ops.paged_view(ek, ev, None if layer.acc is None else layer.acc.clone())
    for i in range(kept.shape[0]):
        for h in range(kept.shape[1]):
            for k in range(min(int(keep[i]), kept.shape[2])):
                s = int(kept[i, h, k])
                if s < 0:
                    break
                sb, so = int(bt[i, old[i] + s // bs]), s % bs
                db, do = int(bt[i, new[i] + k // bs]), k % bs
                exp.k_t[db, h, :, do] = layer.k_t[sb, h, :, so]
                exp.v[db, h, do] = layer.v[sb, h, so]
                if exp.acc is not None:
                    exp.acc[db, h, do] = new_acc[i, h, k] if new_acc is not None else layer.acc[sb, h, so]
    return exp_cache, exp.acc


def run_interpreted(test_file: str, keyword: str, child_env: str, timeout: int = 600) -> None:
    """Run the tests of ``test_file`` matching ``keyword`` in a pytest subprocess with
    ``TRITON_INTERPRET=1`` (it must be set before triton is imported, which importing
    vLLM does) and ``child_env=1``; assert they all ran and passed."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: the Triton kernels are untested")
    env = dict(os.environ, TRITON_INTERPRET="1", **{child_env: "1"})
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-x", "-k", keyword, "-p", "no:cacheprovider",
           "-W", "ignore::RuntimeWarning"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert " passed" in last and "skipped" not in last, proc.stdout[-2000:]


def run_parity_workers(model_dir: str, out_dir, policies: str, runs: dict[str, dict], timeout: int = 1800) -> dict:
    """``tests/backend_parity_worker.py`` once per entry of ``runs`` (name -> extra
    environment), side by side, each from an environment without the plugin's and the
    worker's switches; returns name -> the worker's JSON (asserts every run succeeded)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("backend_parity_worker.py")
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("VLLM_KVCOMPRESS_", "TRITON_INTERPRET", "KVC_PARITY"))}
    procs = {name: subprocess.Popen([sys.executable, str(worker), model_dir, str(Path(out_dir) / f"{name}.json"),
                                     policies], env=dict(base, **env), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
             for name, env in runs.items()}
    results = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"{name} engine run failed:\n{out[-4000:]}"
        results[name] = json.loads((Path(out_dir) / f"{name}.json").read_text())
    return results
