"""Build and load the C++ CPU kernels (``csrc/kvcompress_cpu.cpp``).

The extension is compiled once per (source, flags, torch version) with
``torch.utils.cpp_extension.load`` (ninja, JIT) into
``vllm_kvcompress.assets.cache_dir()/torch_extensions/<name>`` and loaded as a
plain shared library: it registers the ops ``torch.ops.kvcompress.*`` (no
Python module, so no pybind11 in the build). Later processes load the built
``.so`` directly, without running ninja.

Flags: ``-O3`` plus ``-mavx2 -mfma -mf16c`` when this CPU has all three
(never ``-march=native``: the cache directory may be shared by machines with
different CPUs, so the flags are part of the build name), and ``-fopenmp``
when the compiler accepts it (the extension then shares torch's libgomp, so
``torch.set_num_threads`` applies to the kernels too).

``build()`` is what the setup script calls (once); ``available()`` is what
``ops.py`` asks (builds on first use if needed, never raises).
``VLLM_KVCOMPRESS_BUILD_VERBOSE=1`` shows the compiler output.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger("vllm_kvcompress")

_SOURCE_NAME = "kvcompress_cpu.cpp"
_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None}


def source_path() -> Path | None:
    """The kernel source: inside the package (wheel installs) or at the repo root (editable)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc" / _SOURCE_NAME, here.parent / "csrc" / _SOURCE_NAME):
        if cand.is_file():
            return cand
    return None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler_accepts(flag: str) -> bool:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return False
    with tempfile.TemporaryDirectory() as td:
        src = Path(td) / "t.cpp"
        src.write_text("int main() { return 0; }\n")
        proc = subprocess.run([cxx, flag, str(src), "-o", str(Path(td) / "t")], capture_output=True)
        return proc.returncode == 0


def isa_flags() -> list[str]:
    """SIMD flags for this CPU (part of the build name)."""
    if {"avx2", "fma", "f16c"} <= _cpu_flags():
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def compile_flags() -> tuple[list[str], list[str]]:
    """(cflags, ldflags) for this machine (probes the compiler for OpenMP)."""
    cflags = ["-O3", "-std=c++17", *isa_flags()]
    ldflags: list[str] = []
    if _compiler_accepts("-fopenmp"):
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def _build_name(src: Path) -> str:
    h = hashlib.sha256()
    h.update(src.read_bytes())
    h.update(" ".join(isa_flags()).encode())
    h.update(torch.__version__.encode())
    return f"kvcompress_cpu_{h.hexdigest()[:12]}"


def _build_root() -> Path:
    from vllm_kvcompress.assets import cache_dir

    return cache_dir() / "torch_extensions"


def build(verbose: bool | None = None) -> Path:
    """Compile (if needed) and load the extension; returns the shared library path.

    Raises on failure (the setup script reports it); safe to call repeatedly.
    """
    with _lock:
        return _build_locked(verbose)


def _build_locked(verbose: bool | None) -> Path:
    if verbose is None:
        verbose = os.environ.get("VLLM_KVCOMPRESS_BUILD_VERBOSE", "") not in ("", "0")
    src = source_path()
    if src is None:
        raise RuntimeError(f"{_SOURCE_NAME} not found (looked in the package and the repository root)")
    name = _build_name(src)
    bdir = _build_root() / name
    lib = bdir / f"{name}.so"
    if _state["loaded"]:
        return lib
    loaded = False
    if lib.is_file():
        try:
            torch.ops.load_library(str(lib))
            loaded = True
        except OSError as exc:  # e.g. another process is still linking it: go through ninja + its lock
            logger.warning("vllm-kvcompress: cannot load %s (%s); building", lib, exc)
    if not loaded:
        cflags, ldflags = compile_flags()
        bdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        logger.info("vllm-kvcompress: compiling the CPU kernels (%s) into %s", " ".join(cflags), bdir)
        from torch.utils import cpp_extension

        # torch's load() takes a file lock in bdir, builds with ninja and loads the library
        cpp_extension.load(name=name, sources=[str(src)], extra_cflags=cflags, extra_ldflags=ldflags,
                           build_directory=str(bdir), is_python_module=False, verbose=verbose)
        logger.info("vllm-kvcompress: CPU kernels built in %.1f s", time.perf_counter() - t0)
    _state["loaded"] = True
    _state["path"] = lib
    return lib


def available() -> bool:
    """True when ``torch.ops.kvcompress`` is loaded (building it on first use)."""
    if _state["loaded"]:
        return True
    if _state["error"] is not None:
        return False
    try:
        build()
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means "use the torch reference"
        _state["error"] = f"{type(exc).__name__}: {exc}"
        logger.warning("vllm-kvcompress: C++ CPU kernels unavailable, using the torch reference (%s)",
                       _state["error"].splitlines()[0][:300])
        return False


def error() -> str | None:
    """Why the extension is unavailable (None if it loaded or was not tried)."""
    return _state["error"]


def main() -> None:
    """``python -m vllm_kvcompress._ext``: build once and print the library path."""
    t0 = time.perf_counter()
    lib = build()
    print(f"{lib} ({time.perf_counter() - t0:.1f} s, simd width {torch.ops.kvcompress.simd_width()})")


if __name__ == "__main__":
    main()
