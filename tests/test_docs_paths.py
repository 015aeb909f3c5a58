"""No absolute path of the machine that wrote them in README.md or docs/ (issue #30).

Result files name paths relative to the repository or as placeholders (``<cache>``,
``<work-dir>``, ``<out-dir>``, ``<venv>``; ``vllm_kvcompress.portable_paths``), so a
command in them reads the same on any machine. Checked: every text file under docs/
and README.md, against machine roots (/work, /root, /home, /tmp, /opt, ...) and this
machine's repository, Python prefix, home and plugin cache; and the writers of
``benchmarks/bench_throughput.py``, fed this machine's paths.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from vllm_kvcompress.assets import cache_dir
from vllm_kvcompress.portable_paths import machine_paths, portable

REPO = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = {".md", ".json", ".jsonl", ".txt", ".csv", ".yaml", ".yml", ".log", ".rst", ".html"}
THIS_MACHINE = (str(REPO), sys.prefix, str(Path.home()), str(cache_dir()))


def _doc_files() -> list[Path]:
    return sorted(p for p in (REPO / "docs").rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def _leftovers(path: Path) -> list[str]:
    return sorted(set(machine_paths(path.read_text(errors="replace"), extra=THIS_MACHINE)))


def test_docs_name_no_machine_paths():
    files = _doc_files()
    assert len(files) > 20  # the result files are there
    bad = {str(p.relative_to(REPO)): found[:5] for p in files if (found := _leftovers(p))}
    assert not bad, f"absolute machine paths (use vllm_kvcompress.portable_paths): {bad}"


def test_readme_names_no_machine_paths():
    found = _leftovers(REPO / "README.md")
    assert not found, f"README.md names absolute machine paths: {found}"


def _venv_python() -> str:
    prefix = Path(sys.prefix)
    inside = prefix == REPO or REPO in prefix.parents
    return str(prefix.relative_to(REPO) / "bin/python") if inside else "<venv>/bin/python"


@pytest.mark.parametrize("text,want", [
    (f"{REPO}/benchmarks/x.py --out-dir {REPO}/docs/results", "benchmarks/x.py --out-dir docs/results"),
    (f"--model {cache_dir()}/SmolLM2-135M-Instruct", "--model <cache>/SmolLM2-135M-Instruct"),
    ("--output-json /tmp/bench_throughput-x1/01_vanilla.json", "--output-json <work-dir>/01_vanilla.json"),
    (f"{sys.prefix}/bin/python -m vllm_kvcompress._ext", f"{_venv_python()} -m vllm_kvcompress._ext"),
    (f"{REPO}2/x", f"{REPO}2/x"),  # a directory that merely starts like the repository's
])
def test_portable_rules(text, want):
    assert portable(text, work_dir="/tmp/bench_throughput-x1") == want


def test_bench_throughput_writes_no_machine_paths(tmp_path):
    """The writer, fed a committed run with this machine's paths put back, writes none of them."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_throughput as bt
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    work = tmp_path / "work"
    raw = (REPO / "docs/results/throughput_bf16/throughput.json").read_text()
    raw = (raw.replace("<work-dir>", str(work)).replace("<cache>", str(cache_dir()))
           .replace(".venv/bin/python ", sys.executable + " ").replace(" benchmarks/", f" {REPO}/benchmarks/"))
    d = json.loads(raw)
    assert machine_paths(raw, extra=THIS_MACHINE)  # the input does carry machine paths
    args = argparse.Namespace(**d["config"])
    args.dtype, args.dtype_reason = d["machine"]["dtype"], d["machine"]["dtype_reason"]
    bt._RUN_DIRS.clear()
    bt._RUN_DIRS.update(work_dir=work, out_dir=tmp_path / "out")
    try:
        text, cols, rows = bt.print_table(d["main"], args)
        md = tmp_path / "throughput.md"
        bt.write_main_md(md, d["main"], text, cols, rows, d["targets"], d["bounds"], d["command"], args, d["machine"])
        js = json.dumps(bt._portable(d), indent=2, default=str)
    finally:
        bt._RUN_DIRS.clear()
    for out in (md.read_text(), js):
        assert not machine_paths(out, extra=THIS_MACHINE + (str(tmp_path),)), machine_paths(out)
    assert "<work-dir>/essays_24x1920.jsonl" in md.read_text() and "<cache>/SmolLM2-135M-Instruct" in js
