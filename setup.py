"""Build of vllm-kvcompress: pyproject.toml declares the package; this file adds its C++
CPU kernels (``csrc/``) in two forms:

* ``vllm_kvcompress/_kvcompress_cpu.so``: compiled at wheel-build time against the torch
  of the build environment (like vLLM's own ``_C``), with the flags ``vllm_kvcompress._ext``
  uses at run time (``-O3 -std=c++17``, ``-mavx2 -mfma -mf16c`` when the build CPU has
  them, never ``-march=native``; ``-fopenmp`` when the compiler takes it), and
  ``_kvcompress_cpu.json`` beside it (torch version, ISA flags, source hash): ``_ext``
  loads it only when they match, so no compiler is needed at run time;
* ``vllm_kvcompress/csrc/*.cpp``: the source, for ``_ext``'s build-on-first-use fallback
  (another torch, another CPU).

Build against the torch you will run (pip's build isolation would install a fresh
torch from PyPI, several GB of CUDA wheels, and build against that)::

    python -m pip wheel . -w dist --no-build-isolation --no-deps

Without an importable torch or a C++ compiler the wheel has the source only (a warning
says so).
Editable installs (``pip install -e .``, the setup script) compile nothing here: they
keep building on first use from ``csrc/`` into the cache, as before.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SOURCE = CSRC / "kvcompress_cpu.cpp"
PACKAGE = "vllm_kvcompress"


def _editable(cmd) -> bool:
    return bool(getattr(cmd, "editable_mode", False) or getattr(cmd, "inplace", False))


class BuildPy(build_py):
    """Also ship ``csrc/`` as ``vllm_kvcompress/csrc/`` (source of the fallback build)."""

    def run(self):
        super().run()
        if _editable(self):
            return  # the editable package finds csrc/ at the repository root
        dst = Path(self.build_lib) / PACKAGE / "csrc"
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(CSRC.iterdir()):
            if f.suffix in (".cpp", ".h"):
                shutil.copy2(f, dst / f.name)


def _ext_helpers():
    """``vllm_kvcompress/_ext.py`` loaded on its own (not the package: no vLLM import)."""
    spec = importlib.util.spec_from_file_location("_kvcompress_build_ext", ROOT / PACKAGE / "_ext.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extension():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("vllm-kvcompress: torch is not importable in this build environment, so the wheel ships the C++ "
              "source only (built on first use); build with --no-build-isolation beside the torch you run",
              file=sys.stderr)
        return [], {}
    ext = _ext_helpers()
    if shutil.which(ext._compiler()) is None:
        print(f"vllm-kvcompress: no C++ compiler ({ext._compiler()!r}) in this build environment, so the wheel "
              "ships the C++ source only (built on first use where a compiler exists)", file=sys.stderr)
        return [], {}
    cflags, ldflags = ext.compile_flags()
    name = ext.PREBUILT_NAME
    record = {"torch": torch.__version__, "isa_flags": ext.isa_flags(), "cflags": cflags, "ldflags": ldflags,
              "source_sha256": ext.source_digest(SOURCE)}

    class BuildExt(BuildExtension.with_options(no_python_abi_suffix=True)):
        def build_extensions(self):
            # The compiler command lines of torch's JIT build (_ext): the compiler plus -fPIC, our
            # flags after; not Python's own CFLAGS / LDSHARED (-g, -fwrapv, -O2, -DNDEBUG, ...).
            cc = self.compiler
            cxx = ext._compiler()  # $CXX or c++, as torch's ninja build uses
            cc.set_executable("compiler_so", [cxx, "-fPIC"])
            cc.set_executable("compiler_cxx", [cxx])
            for attr in ("linker_so", "linker_so_cxx"):
                if getattr(cc, attr, None) is not None:
                    cc.set_executable(attr, [cxx, "-shared"])
            super().build_extensions()

        def run(self):
            if _editable(self):
                print("vllm-kvcompress: editable install: the C++ kernels are built on first use from csrc/",
                      file=sys.stderr)
                return
            super().run()
            out = Path(self.build_lib) / PACKAGE / ext.PREBUILT_RECORD
            out.write_text(json.dumps(record, indent=1) + "\n")

    mod = CppExtension(f"{PACKAGE}.{name}", [str(SOURCE.relative_to(ROOT))],
                       extra_compile_args=cflags, extra_link_args=ldflags)
    return [mod], {"build_ext": BuildExt}


ext_modules, ext_cmds = _extension()
(ROOT / "build").mkdir(exist_ok=True)
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPy, **ext_cmds},
      # egg-info under build/ (git-ignored), not in the source tree, where it would shadow the
      # set-up venv's entry points for anything run from the repository root
      options={"egg_info": {"egg_base": "build"}})
