"""Paths in result files: relative to the repository, or a placeholder (issue #30).

Result files (``docs/results``) are read on other machines, so what a writer records
(commands, log and data paths, the work directory) must not carry the paths of the
machine that wrote it. :func:`portable` rewrites every string of a JSON-like value (or
one text) with these rules, longest path first:

===========================  ==================================================
path                         becomes
===========================  ==================================================
the run's work directory     ``<work-dir>`` (logs, prompts, raw results)
the run's ``--out-dir``      ``<out-dir>`` when outside the repository
the repository               relative to it (``.venv/bin/python``,
                             ``benchmarks/x.py``, ``docs/results``; ``.`` alone)
the Python environment       ``<venv>`` when outside the repository
the plugin's cache           ``<cache>`` (``vllm_kvcompress.assets.cache_dir()``:
                             the model is ``<cache>/SmolLM2-135M-Instruct``,
                             ``python -m vllm_kvcompress.assets model`` prints it)
the home directory           ``~``
===========================  ==================================================

:func:`machine_paths` finds what is left (``tests/test_docs_paths.py`` runs it over
README.md and docs/). ``python -m vllm_kvcompress.portable_paths FILE...`` rewrites
committed result files in place with the same rules (``--work-dir`` / ``--out-dir``
name the run's directories when the file does not record them).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

#: absolute paths under these top-level directories are machine paths in a document
MACHINE_ROOTS = ("work", "root", "home", "tmp", "opt", "mnt", "srv", "scratch", "Users", "var/tmp", "private")
_MACHINE_RE = re.compile(r"(?<![\w.~<>/$-])/(?:" + "|".join(re.escape(r) for r in MACHINE_ROOTS)
                         + r")(?:/[^\s\"'`)\]>,;|]*)?(?![\w-])")


def repo_root() -> Path | None:
    """The repository this package runs from (None for an installed wheel)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "csrc").is_dir() else None


def _cache_dir() -> Path | None:
    try:
        from vllm_kvcompress.assets import cache_dir

        return cache_dir()
    except Exception:  # noqa: BLE001
        return None


def _inside(p: Path, root: Path | None) -> bool:
    if root is None:
        return False
    try:
        p.relative_to(root)
        return True
    except ValueError:
        return False


def rules(*, repo: str | Path | None = "auto", work_dir: str | Path | None = None, out_dir: str | Path | None = None,
          extra: dict[str, str] | None = None) -> list[tuple[re.Pattern, str]]:
    """The (pattern, replacement) pairs :func:`portable` applies, longest path first.

    ``repo="auto"``: :func:`repo_root`; ``extra``: more {path: placeholder} pairs (e.g. the
    paths of another machine when rewriting old files)."""
    root = repo_root() if repo == "auto" else (Path(repo) if repo else None)
    pairs: dict[str, str] = {}
    if work_dir:
        pairs[str(work_dir)] = "<work-dir>"
    if out_dir and not _inside(Path(out_dir).absolute(), root):
        pairs[str(out_dir)] = "<out-dir>"
    prefix = Path(sys.prefix)
    if not _inside(prefix, root):
        pairs[str(prefix)] = "<venv>"
    cache = _cache_dir()
    if cache is not None:
        pairs[str(cache)] = "<cache>"
    pairs.update(extra or {})
    home = str(Path.home())
    if home not in ("/", ""):
        pairs.setdefault(home, "~")
    out: list[tuple[int, re.Pattern, str]] = []
    for path, repl in pairs.items():
        if path.endswith("/") and len(path) > 1:  # a prefix: "/other/checkout/" -> "" (relative to it)
            out.append((len(path), re.compile(re.escape(path)), repl))
        elif path.rstrip("/"):
            path = path.rstrip("/")
            out.append((len(path), re.compile(re.escape(path) + r"(?![\w.-])"), repl))
    if root is not None:
        r = str(root).rstrip("/")
        out.append((len(r) + 1, re.compile(re.escape(r) + "/"), ""))  # relative to the repository
        out.append((len(r), re.compile(re.escape(r) + r"(?![\w.-])"), "."))
    out.sort(key=lambda t: -t[0])
    return [(pat, repl) for _, pat, repl in out]


def portable(value: Any, rule_list: list[tuple[re.Pattern, str]] | None = None, **kw) -> Any:
    """``value`` (a string, or dicts / lists / tuples of them) with machine paths rewritten
    (see the module docstring; ``kw`` goes to :func:`rules`)."""
    rs = rules(**kw) if rule_list is None else rule_list
    if isinstance(value, str):
        for pat, repl in rs:
            value = pat.sub(repl, value)
        return value
    if isinstance(value, Path):
        return portable(str(value), rs)
    if isinstance(value, dict):
        return {portable(k, rs) if isinstance(k, str) else k: portable(v, rs) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(portable(v, rs) for v in value)
    return value


def machine_paths(text: str, extra: tuple[str, ...] = ()) -> list[str]:
    """Absolute machine paths in ``text``: under :data:`MACHINE_ROOTS`, or starting with
    one of ``extra`` (e.g. this repository, ``sys.prefix``)."""
    found = [m.group(0) for m in _MACHINE_RE.finditer(text)]
    for p in extra:
        p = str(p).rstrip("/")
        if p and p != "/":
            found += [m.group(0) for m in re.finditer(re.escape(p) + r"(?:/[^\s\"'`)]*)?(?![\w.-])", text)]
    return found


# ---------------------------------------------------------------------------- rewriting committed files

def _recorded_dirs(data: Any) -> dict[str, str]:
    """{directory: placeholder} a result JSON records: its work / out directories and the
    folder of its prompt file."""
    found: dict[str, str] = {}
    if not isinstance(data, dict):
        return found
    cfg = data.get("config") if isinstance(data.get("config"), dict) else {}
    for d in (data.get("work_dir"), cfg.get("work_dir")):
        if isinstance(d, str) and d.startswith("/"):
            found[d] = "<work-dir>"
    for d in (cfg.get("out_dir"), data.get("out_dir")):
        if isinstance(d, str) and d.startswith("/") and not _inside(Path(d), repo_root()):
            found.setdefault(d, "<out-dir>")
    for section in ("main", "online", "scaling"):
        ds = data.get(section, {}).get("dataset") if isinstance(data.get(section), dict) else None
        if isinstance(ds, dict) and isinstance(ds.get("path"), str) and ds["path"].startswith("/"):
            found.setdefault(str(Path(ds["path"]).parent), "<work-dir>")
    return found


def rewrite_file(path: Path, extra: dict[str, str]) -> bool:
    """Rewrite one committed result file in place, as text (JSON keeps its layout: paths
    sit verbatim inside its strings, and the placeholders need no escaping). ``extra``:
    {path: placeholder}. Returns whether it changed."""
    text = path.read_text()
    new = portable(text, rules(extra=extra)).replace("$WORK/", "<work-dir>/")
    if new == text:
        return False
    if path.suffix == ".json":
        json.loads(new)  # still JSON
    path.write_text(new)
    return True


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vllm_kvcompress.portable_paths",
                                 description="Rewrite result files in place: machine paths -> repository-relative "
                                             "paths or placeholders. A .md file takes the directories recorded in "
                                             "the .json of the same name beside it.")
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--work-dir", action="append", default=[], help="a work directory of the run (repeatable)")
    ap.add_argument("--out-dir", action="append", default=[], help="an --out-dir of the run (repeatable)")
    ap.add_argument("--repo", action="append", default=[],
                    help="another checkout the run used, e.g. /work/main when rewriting here (repeatable)")
    ap.add_argument("--check", action="store_true", help="only list the machine paths left; exit 1 if any")
    a = ap.parse_args(argv)
    left = 0
    for f in a.files:
        extra: dict[str, str] = {}
        for r in a.repo:
            extra[r.rstrip("/") + "/"] = ""
        extra.update({d: "<work-dir>" for d in a.work_dir})
        extra.update({d: "<out-dir>" for d in a.out_dir})
        sibling = f if f.suffix == ".json" else f.with_suffix(".json")
        if sibling.is_file():
            try:
                extra.update(_recorded_dirs(json.loads(sibling.read_text())))
            except ValueError:
                pass
        if not a.check and rewrite_file(f, extra):
            print(f"rewrote {f}")
        rest = machine_paths(f.read_text())
        left += len(rest)
        for p in sorted(set(rest)):
            print(f"{f}: {p}", file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
