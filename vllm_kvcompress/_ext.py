"""Load (or build) the C++ CPU kernels (``csrc/kvcompress_cpu.cpp``).

The kernels are one shared library that registers the ops ``torch.ops.kvcompress.*``
(no Python module, so no pybind11 in the build). ``available()`` (what ``ops.py``
asks) takes the first of:

1. **prebuilt**: ``vllm_kvcompress/_kvcompress_cpu*.so``, compiled when the wheel was
   built (``setup.py``, against the torch of the build environment; a
   ``_kvcompress_cpu.json`` beside it records that torch version, the ISA flags and
   the source hash). Loaded only when all three match this process (same torch, the
   flags this CPU gets, the source shipped beside it), so no compiler is needed at run
   time;
2. **built from source** once per (source, flags, torch version) with
   ``torch.utils.cpp_extension.load`` (ninja) into
   ``vllm_kvcompress.assets.cache_dir()/torch_extensions/<name>``: the source is
   ``vllm_kvcompress/csrc/`` in an installed wheel, ``csrc/`` at the repository root in
   an editable install. Later processes load the built ``.so`` without ninja;
3. neither: one warning line saying why, and ``ops`` runs the torch reference.

Flags (the same for both builds): ``-O3 -std=c++17`` plus ``-mavx2 -mfma -mf16c`` when
this CPU has all three (never ``-march=native``: a wheel or a shared cache directory
may serve other CPUs, so the flags are part of the build name and of the prebuilt
library's record), and ``-fopenmp`` when the compiler accepts it (the library then
shares torch's libgomp, so ``torch.set_num_threads`` applies to the kernels too).
AVX512-BF16 dot products are chosen inside the library at run time.

``python -m vllm_kvcompress._ext`` builds/loads once and prints the library path (the
setup script runs it); ``python -m vllm_kvcompress._ext --doctor`` (or
``vllm-kvcompress-doctor``) prints which path each op takes on this machine and where
the library came from. ``VLLM_KVCOMPRESS_BUILD_VERBOSE=1`` shows the compiler output;
``VLLM_KVCOMPRESS_PREBUILT=0`` ignores a prebuilt library.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger("vllm_kvcompress")

_SOURCE_NAME = "kvcompress_cpu.cpp"
#: the prebuilt library's module name inside the package (``vllm_kvcompress._kvcompress_cpu``)
PREBUILT_NAME = "_kvcompress_cpu"
#: its record (torch version, ISA flags, source hash), written by setup.py beside it
PREBUILT_RECORD = PREBUILT_NAME + ".json"
_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None, "path": None, "origin": None}

_HERE = Path(__file__).resolve().parent


def source_path() -> Path | None:
    """The kernel source: inside the package (wheel installs) or at the repo root (editable)."""
    for cand in (_HERE / "csrc" / _SOURCE_NAME, _HERE.parent / "csrc" / _SOURCE_NAME):
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


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _compiler_accepts(flag: str) -> bool:
    cxx = _compiler()
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
    """(cflags, ldflags) for this machine (probes the compiler for OpenMP); setup.py uses them too."""
    cflags = ["-O3", "-std=c++17", *isa_flags()]
    ldflags: list[str] = []
    if _compiler_accepts("-fopenmp"):
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def source_digest(src: Path) -> str:
    return hashlib.sha256(src.read_bytes()).hexdigest()


def _build_name(src: Path) -> str:
    h = hashlib.sha256()
    h.update(src.read_bytes())
    h.update(" ".join(isa_flags()).encode())
    h.update(torch.__version__.encode())
    return f"kvcompress_cpu_{h.hexdigest()[:12]}"


def _build_root() -> Path:
    from vllm_kvcompress.assets import cache_dir

    return cache_dir() / "torch_extensions"


def prebuilt() -> tuple[Path | None, str]:
    """``(library, "")`` when the package holds a prebuilt library usable here, else
    ``(None, why not)``."""
    if os.environ.get("VLLM_KVCOMPRESS_PREBUILT", "1").strip() == "0":
        return None, "VLLM_KVCOMPRESS_PREBUILT=0"
    libs = [_HERE / (PREBUILT_NAME + s) for s in importlib.machinery.EXTENSION_SUFFIXES]
    lib = next((p for p in libs if p.is_file()), None)
    if lib is None:
        return None, "the package has no prebuilt library (an editable install, or a wheel built without torch)"
    try:
        rec = json.loads((_HERE / PREBUILT_RECORD).read_text())
    except (OSError, ValueError) as exc:
        return None, f"{PREBUILT_RECORD} unreadable ({type(exc).__name__})"
    if rec.get("torch") != torch.__version__:
        return None, f"the prebuilt library is for torch {rec.get('torch')}, this is torch {torch.__version__}"
    if list(rec.get("isa_flags", [])) != isa_flags():
        return None, (f"the prebuilt library was compiled with ISA flags {' '.join(rec.get('isa_flags', [])) or '(none)'}"
                      f", this CPU gets {' '.join(isa_flags()) or '(none)'}")
    src = source_path()
    if src is not None and rec.get("source_sha256") != source_digest(src):
        return None, f"the prebuilt library was compiled from another {_SOURCE_NAME} than {src}"
    return lib, ""


def build(verbose: bool | None = None) -> Path:
    """Load the kernels (prebuilt, else compiled if needed); returns the shared library path.

    Raises on failure with a one-line message (the setup script reports it); safe to
    call repeatedly.
    """
    with _lock:
        return _build_locked(verbose)


def _build_locked(verbose: bool | None) -> Path:
    if _state["loaded"]:
        return _state["path"]
    if verbose is None:
        verbose = os.environ.get("VLLM_KVCOMPRESS_BUILD_VERBOSE", "") not in ("", "0")
    lib, why = prebuilt()
    if lib is not None:
        try:
            torch.ops.load_library(str(lib))
            return _loaded(lib, "prebuilt", why="")
        except OSError as exc:
            why = f"cannot load the prebuilt {lib.name} ({str(exc).splitlines()[0][:200]})"
            logger.warning("vllm-kvcompress: %s; building from source", why)
    _state["prebuilt_why"] = why
    src = source_path()
    if src is None:
        raise RuntimeError(f"no usable prebuilt kernel library ({why}) and no {_SOURCE_NAME} to build one "
                           f"(looked in the package and the repository root)")
    name = _build_name(src)
    bdir = _build_root() / name
    lib = bdir / f"{name}.so"
    if lib.is_file():
        try:
            torch.ops.load_library(str(lib))
            return _loaded(lib, "cache", why)
        except OSError as exc:  # e.g. another process is still linking it: go through ninja + its lock
            logger.warning("vllm-kvcompress: cannot load %s (%s); building", lib, exc)
    from torch.utils import cpp_extension

    cxx = _compiler()
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} is not on PATH) to build the kernels from {src}, and no "
                           f"usable prebuilt library ({why}); install g++ and ninja, or a vllm-kvcompress wheel "
                           f"built against torch {torch.__version__}")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError(f"ninja is not installed (pip install ninja) to build the kernels from {src}, and no "
                           f"usable prebuilt library ({why})")
    cflags, ldflags = compile_flags()
    bdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    logger.info("vllm-kvcompress: compiling the CPU kernels (%s) into %s", " ".join(cflags), bdir)
    # torch's load() takes a file lock in bdir, builds with ninja and loads the library
    cpp_extension.load(name=name, sources=[str(src)], extra_cflags=cflags, extra_ldflags=ldflags,
                       build_directory=str(bdir), is_python_module=False, verbose=verbose)
    logger.info("vllm-kvcompress: CPU kernels built in %.1f s", time.perf_counter() - t0)
    return _loaded(lib, "built", why)


def _loaded(lib: Path, origin: str, why: str) -> Path:
    _state.update(loaded=True, path=lib, origin=origin, prebuilt_why=why)
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
        first = (str(exc).strip().splitlines() or [""])[0][:400]
        _state["error"] = f"{type(exc).__name__}: {first}"
        logger.warning("vllm-kvcompress: C++ CPU kernels unavailable, every compressed layer runs the slower "
                       "torch reference (%s)", _state["error"])
        return False


def error() -> str | None:
    """Why the extension is unavailable (None if it loaded or was not tried)."""
    return _state["error"]


def origin() -> str | None:
    """Where the loaded library came from: ``prebuilt`` (the package), ``cache`` (built
    earlier from source), ``built`` (compiled by this process); None if not loaded."""
    return _state["origin"]


def library() -> Path | None:
    """The loaded shared library (None if not loaded)."""
    return _state["path"]


# ---------------------------------------------------------------------------- doctor

_OPS = ("decode_attention_scores", "window_scores", "prefill_attention_scores", "compact_windows")


def doctor() -> tuple[list[str], bool]:
    """The lines ``--doctor`` prints, and whether CPU tensors take the C++ path."""
    import vllm_kvcompress
    from vllm_kvcompress import ops

    lines = [f"vllm-kvcompress {vllm_kvcompress.__version__} from {Path(vllm_kvcompress.__file__).parent}, "
             f"torch {torch.__version__}, VLLM_KVCOMPRESS_OPS={ops.IMPL}"]
    try:
        cpu_impl = ops.impl_for("cpu")
    except Exception as exc:  # noqa: BLE001 - e.g. VLLM_KVCOMPRESS_OPS=cpp without the kernels
        cpu_impl = f"error: {str(exc).splitlines()[0]}"
    if _state["loaded"]:
        where = {"prebuilt": "prebuilt in the package (compiled when the wheel was built)",
                 "cache": "built earlier from source, loaded from the cache",
                 "built": "compiled from source just now"}[_state["origin"]]
        lines.append(f"C++ kernels: loaded, {where}: {_state['path']}")
        if _state["origin"] != "prebuilt":
            lines.append(f"  (no prebuilt library used: {_state.get('prebuilt_why') or 'n/a'})")
        lines.append(f"  SIMD width {torch.ops.kvcompress.simd_width()} floats "
                     f"({'AVX2 + FMA + F16C' if isa_flags() else 'scalar: this CPU lacks avx2/fma/f16c'})")
        dot = bool(torch.ops.kvcompress.bf16_dot(64))
        cpu_has = "avx512_bf16" in _cpu_flags()
        lines.append("  bf16 caches (head size % 16 == 0): "
                     + ("AVX512-BF16 dot products (vdpbf16ps)" if dot else
                        "float32 FMA (" + ("VLLM_KVCOMPRESS_CPU_BF16DOT=0" if cpu_has else "this CPU lacks avx512_bf16")
                        + ")"))
    elif _state["error"] is not None:
        lines.append(f"C++ kernels: unavailable: {_state['error']}")
    else:
        lines.append(f"C++ kernels: not tried (VLLM_KVCOMPRESS_OPS={ops.IMPL})")
    cuda = torch.cuda.is_available()
    try:
        cuda_impl = ops.impl_for("cuda") if cuda else "no CUDA device"
    except Exception as exc:  # noqa: BLE001
        cuda_impl = f"error: {str(exc).splitlines()[0]}"
    lines.append(f"{'op':<26} {'CPU tensors':<12} CUDA tensors")
    for op in _OPS:
        c = cuda_impl
        if op == "prefill_attention_scores" and cuda:
            c = "not used on CUDA (C++ and reference only)"
        lines.append(f"{op:<26} {cpu_impl:<12} {c}")
    return lines, cpu_impl == "cpp"


def main(argv: list[str] | None = None) -> int:
    """``python -m vllm_kvcompress._ext``: build/load once and print the library path;
    ``--doctor``: print which path each op takes (exit status 1 if CPU tensors would run
    the torch reference)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vllm_kvcompress._ext", description=main.__doc__)
    ap.add_argument("--doctor", action="store_true", help="print which kernel path each op takes here")
    args = ap.parse_args(argv)
    if args.doctor:
        lines, cpp = doctor()
        print("\n".join(lines))
        return 0 if cpp else 1
    t0 = time.perf_counter()
    lib = build()
    print(f"{lib} ({_state['origin']}, {time.perf_counter() - t0:.1f} s, simd width "
          f"{torch.ops.kvcompress.simd_width()})")
    return 0


def doctor_main() -> int:
    """``vllm-kvcompress-doctor`` console script."""
    return main(["--doctor", *sys.argv[1:]])


if __name__ == "__main__":
    # run the package's own module (``ops`` imports it), not this ``__main__`` copy of it
    from vllm_kvcompress._ext import main as _main

    sys.exit(_main())
