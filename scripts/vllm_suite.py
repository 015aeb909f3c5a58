"""Run vLLM's own scheduler / KV-cache tests twice: plain, and with every patch of the plugin applied.

    .venv/bin/python scripts/vllm_suite.py [--out docs/results/vllm_suite] [--tests tests/v1/core ...]

What it does (issue #16: "the plugin changes nothing when off"):

1. Gets the ``vllm==0.32.0`` source distribution from the package index (cached in
   ``~/.cache/vllm-kvcompress/vllm-src/``) and extracts only its ``tests/`` tree and
   ``pyproject.toml`` (vLLM's pytest markers) there. Nothing of vLLM's test code is
   copied into this repository.
2. Runs the selected test paths (default: all of ``tests/v1/core/``, which holds
   ``test_scheduler.py``, ``test_prefix_caching.py``, ``test_kv_cache_utils.py`` and
   ``test_single_type_kv_cache_manager.py``) on the installed vLLM build, one pytest
   process at a time:

   * **plain**: ``VLLM_PLUGINS`` lists every installed vLLM plugin *except* ``kvcompress``,
     so vLLM's own entry-point loading never imports the plugin;
   * **patched**: ``VLLM_PLUGINS`` unset (vLLM may load the entry point itself, as on a
     user's machine) and ``vllm_kvcompress.register()`` called at pytest start, before
     any test module is imported. No ``kv_compress`` config: policy ``none``.

   A small pytest plugin written into a temp dir checks this *inside* each run, at start
   and at the end: the plain run must never import ``vllm_kvcompress`` and no vLLM symbol
   may carry the plugin's patch mark; the patched run must have the patch marks and the
   CPU attention-backend override. The parent script refuses the results otherwise.
3. vLLM's root ``tests/conftest.py`` imports test-only packages (tblib, HF runners, ...).
   It is not loaded (``--confcutdir tests/<first level>``); instead a stand-in module is
   generated from it at run time (``ast``): only its pytest hooks, its autouse fixtures and
   the fixtures the selected test files request, with the imports they need, verbatim.
   Hub model configs are served offline from a temp ``HF_HOME`` laid out as the HF cache:
   ``config.json`` only (no weights, no tokenizer) of the models those tests name, with
   the values published on the hub (see ``HUB_CONFIGS``).
4. Parses both junit xml files and prints per file passed/failed/skipped plain vs patched,
   the tests that pass plain and fail patched (exit 1 if any), and the plain failures
   grouped by reason. Writes ``--out`` .json and .md.

Exit status: 0 no regression; 1 a test passes plain and fails patched; 2 the harness
itself failed (download, a run that did not produce results, a plain run that had the
plugin loaded, a patched run that did not).
"""

from __future__ import annotations

import argparse
import ast
import collections
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLLM_VERSION = "0.32.0"
SDIST = f"vllm-{VLLM_VERSION}.tar.gz"
SRC_DIRNAME = f"vllm-{VLLM_VERSION}"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vllm-kvcompress" / "vllm-src"
DEFAULT_TESTS = ["tests/v1/core"]
PLUGIN_NAME = "kvcompress"  # our vllm.general_plugins entry point
VLLM_PLUGIN_GROUPS = ("vllm.general_plugins", "vllm.platform_plugins", "vllm.stat_logger_plugins",
                      "vllm.io_processor_plugins", "vllm.endpoint_plugins")

# config.json of the hub models these tests name, as published on the hub (public metadata;
# no weights, no tokenizer). ModelConfig only reads the config for the scheduler tests.
HUB_CONFIGS: dict[str, dict] = {
    "facebook/opt-125m": {
        "_name_or_path": "facebook/opt-125m", "activation_dropout": 0.0, "activation_function": "relu",
        "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 2,
        "do_layer_norm_before": True, "dropout": 0.1, "eos_token_id": 2, "ffn_dim": 3072, "hidden_size": 768,
        "init_std": 0.02, "layerdrop": 0.0, "max_position_embeddings": 2048, "model_type": "opt",
        "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "prefix": "</s>",
        "torch_dtype": "float16", "transformers_version": "4.21.0.dev0", "use_cache": True, "vocab_size": 50272,
        "word_embed_proj_dim": 768},
    "facebook/opt-350m": {
        "_name_or_path": "facebook/opt-350m", "activation_dropout": 0.0, "activation_function": "relu",
        "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 2,
        "do_layer_norm_before": False, "dropout": 0.1, "eos_token_id": 2, "ffn_dim": 4096, "hidden_size": 1024,
        "init_std": 0.02, "layerdrop": 0.0, "max_position_embeddings": 2048, "model_type": "opt",
        "num_attention_heads": 16, "num_hidden_layers": 24, "pad_token_id": 1, "prefix": "</s>",
        "torch_dtype": "float16", "transformers_version": "4.19.2", "use_cache": True, "vocab_size": 50272,
        "word_embed_proj_dim": 512},
    "Qwen/Qwen3-0.6B": {  # vLLM's default ModelConfig() model
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
        "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936},
    "Qwen/Qwen1.5-7B": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 11008, "max_position_embeddings": 32768, "max_window_layers": 28,
        "model_type": "qwen2", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.37.0", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936},
    "llava-hf/llava-1.5-7b-hf": {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
        "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
        "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                        "torch_dtype": "float16", "vocab_size": 32064},
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                          "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064},
}
STANDIN_REVISION = "0" * 40  # snapshot name of the stand-in configs in the temp HF cache

STANDIN_MODULE = "kvc_vllm_suite_conftest"
CHECK_MODULE = "kvc_vllm_suite_check"

# The pytest plugin that verifies, inside each run, which mode it really ran in.
CHECK_SOURCE = r'''
"""vllm_suite.py: plain / patched mode, applied and verified inside the pytest process."""
import json
import os
import sys

MODE = os.environ["KVC_VLLM_SUITE_MODE"]
REPORT = os.environ["KVC_VLLM_SUITE_REPORT"]
MARK = "__kvcompress_patched__"
_state = {"mode": MODE, "pid": os.getpid()}


def _patched_symbols():
    """Every attribute of a class defined in a loaded vllm.* module that carries the plugin's patch mark."""
    found = set()
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "vllm" or name.startswith("vllm.")):
            continue
        try:
            members = list(vars(mod).items())
        except TypeError:
            continue
        for _, cls in members:
            if not isinstance(cls, type) or getattr(cls, "__module__", None) != name:
                continue
            for attr, raw in list(vars(cls).items()):
                try:
                    func = getattr(raw, "__func__", raw)
                    if getattr(func, MARK, False) is True:
                        found.add(f"{name}.{cls.__qualname__}.{attr}")
                except Exception:
                    pass
    return sorted(found)


def _snapshot():
    snap = {"vllm_kvcompress_imported": "vllm_kvcompress" in sys.modules,
            "patched_symbols": _patched_symbols()}
    reg = sys.modules.get("vllm.v1.attention.backends.registry")
    if reg is not None:
        snap["attention_backend_overrides"] = {k.name: v for k, v in reg._ATTN_OVERRIDES.items()}
    plugins = sys.modules.get("vllm.plugins")
    snap["vllm_loaded_general_plugins"] = bool(getattr(plugins, "plugins_loaded", False))
    pkg = sys.modules.get("vllm_kvcompress")
    snap["registered"] = bool(getattr(pkg, "_registered", False))
    return snap


def _problems(snap):
    out = []
    if MODE == "plain":
        if snap["vllm_kvcompress_imported"]:
            out.append("vllm_kvcompress was imported in the plain run")
        if snap["patched_symbols"]:
            out.append(f"patched vLLM symbols in the plain run: {snap['patched_symbols']}")
        if any("vllm_kvcompress" in v for v in snap.get("attention_backend_overrides", {}).values()):
            out.append("the plugin's attention backend is registered in the plain run")
    else:
        if not snap["registered"]:
            out.append("vllm_kvcompress.register() did not complete")
        if not snap["patched_symbols"]:
            out.append("no vLLM symbol carries the plugin's patch mark in the patched run")
        if "vllm_kvcompress" not in snap.get("attention_backend_overrides", {}).get("CPU_ATTN", ""):
            out.append("CPU_ATTN is not overridden by the plugin's backend in the patched run")
    return out


def _write():
    with open(REPORT, "w") as f:
        json.dump(_state, f, indent=1)


def pytest_configure(config):
    # before collection: before any vLLM test module is imported
    import vllm  # noqa: F401
    from vllm.platforms import current_platform

    _state["vllm_version"] = vllm.__version__
    _state["platform"] = type(current_platform).__name__
    _state["VLLM_PLUGINS"] = os.environ.get("VLLM_PLUGINS")
    if MODE == "patched":
        import vllm_kvcompress
        from vllm_kvcompress.config import KVCompressConfig

        vllm_kvcompress.register()  # what the vllm.general_plugins entry point runs
        cfg = KVCompressConfig()  # no kv_compress config anywhere in these tests
        _state["policy"] = cfg.policy
        _state["policy_enabled"] = bool(cfg.enabled)
    _state["start"] = _snapshot()
    _state["start_problems"] = _problems(_state["start"])
    _write()
    if _state["start_problems"]:
        raise RuntimeError("vllm_suite: " + "; ".join(_state["start_problems"]))


def pytest_report_header(config):
    s = _state.get("start", {})
    return [f"vllm_suite mode={MODE}: VLLM_PLUGINS={_state.get('VLLM_PLUGINS')!r}, "
            f"vllm_kvcompress imported={s.get('vllm_kvcompress_imported')}, "
            f"{len(s.get('patched_symbols', []))} patched vLLM symbols"]


def pytest_sessionfinish(session, exitstatus):
    _state["end"] = _snapshot()
    _state["end_problems"] = _problems(_state["end"])
    lost = sorted(set(_state["start"]["patched_symbols"]) - set(_state["end"]["patched_symbols"]))
    if lost:
        _state["end_problems"].append(f"patches lost during the run: {lost}")
    _state["exitstatus"] = int(exitstatus)
    _write()
'''


# --------------------------------------------------------------------------- source


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip_index_url() -> str:
    """The index pip itself is configured with (its config files, else pip's own default)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                         capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        return out.stdout.strip()
    from pip._internal.models.index import PyPI

    return PyPI.simple_url


def _download_from_index(dest: Path) -> None:
    """The sdist through the index's simple API (PEP 691 JSON, the protocol pip uses), sha256-checked."""
    index = os.environ.get("PIP_INDEX_URL") or _pip_index_url()
    index = index.rstrip("/")
    req = urllib.request.Request(f"{index}/vllm/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    entry = next((f for f in files if f["filename"] == SDIST), None)
    if entry is None:
        raise RuntimeError(f"{SDIST} not listed by {index}/vllm/")
    part = dest.with_suffix(".part")
    with urllib.request.urlopen(entry["url"], timeout=600) as r, open(part, "wb") as f:
        shutil.copyfileobj(r, f)
    want = entry.get("hashes", {}).get("sha256")
    if want and _sha256(part) != want:
        part.unlink()
        raise RuntimeError(f"{SDIST}: sha256 mismatch")
    part.replace(dest)


def fetch_sdist(cache: Path) -> tuple[Path, str]:
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / SDIST
    if dest.exists():
        return dest, "cache"
    print(f"[vllm_suite] downloading {SDIST} with pip into {cache}", flush=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        # --no-build-isolation: otherwise pip would build vLLM's build requirements (torch, ...)
        # from source just to read the sdist's metadata.
        p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "--no-build-isolation", f"vllm=={VLLM_VERSION}", "-d", tmp],
                           capture_output=True, text=True)
        got = Path(tmp) / SDIST
        if p.returncode == 0 and got.exists():
            got.replace(dest)
            return dest, "pip download"
    # pip download always prepares the sdist's metadata, i.e. runs vLLM's setup.py, which imports
    # setuptools-rust, setuptools-scm and torch's build helpers; without those pip discards the file.
    tail = (p.stdout + p.stderr).strip().splitlines()[-12:]
    print("[vllm_suite] pip download failed while preparing vLLM's metadata (its setup.py needs vLLM's "
          "build requirements):\n    " + "\n    ".join(tail) +
          "\n[vllm_suite] fetching the same file from the index's simple API instead (sha256-checked)", flush=True)
    _download_from_index(dest)
    return dest, "index simple API (pip download cannot prepare vLLM's metadata without its build deps)"


def extract_tests(sdist: Path, cache: Path, digest: str) -> Path:
    """``tests/`` and ``pyproject.toml`` of the sdist under ``cache/vllm-X.Y.Z``; returns that folder."""
    src = cache / SRC_DIRNAME
    stamp = src / f".extracted-{digest[:16]}"
    if stamp.exists():
        return src
    if src.exists():
        shutil.rmtree(src)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.name == f"{SRC_DIRNAME}/pyproject.toml" or m.name.startswith(f"{SRC_DIRNAME}/tests/")]
        tar.extractall(cache, members=members, filter="data")
    stamp.write_text(f"{sdist.name} sha256={digest}\n")
    return src


# --------------------------------------------------------------------------- stand-ins


def _fixture_names_requested(test_files: list[Path]) -> set[str]:
    """Parameter names of every function in the test files, plus usefixtures/getfixturevalue strings."""
    names: set[str] = set()
    for path in test_files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names.update(x.arg for x in a.posonlyargs + a.args + a.kwonlyargs)
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("usefixtures", "getfixturevalue"):
                names.update(c.value for c in node.args if isinstance(c, ast.Constant) and isinstance(c.value, str))
    return names


def _is_fixture(node: ast.AST) -> tuple[bool, bool]:
    """(is a pytest fixture, is autouse)"""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return False, False
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if ast.unparse(target) in ("pytest.fixture", "fixture"):
            autouse = isinstance(d, ast.Call) and any(
                k.arg == "autouse" and isinstance(k.value, ast.Constant) and k.value.value is True for k in d.keywords)
            return True, autouse
    return False, False


def build_standin_conftest(conftest: Path, test_files: list[Path]) -> tuple[str, list[str]]:
    """A module made of vLLM's root conftest's hooks, autouse fixtures and the fixtures the test files
    request (and what those need: other fixtures, helpers, globals and imports), copied verbatim."""
    text = conftest.read_text()
    lines = text.splitlines(keepends=True)
    tree = ast.parse(text, str(conftest))
    defs: dict[str, ast.stmt] = {}
    imports: dict[str, tuple[ast.stmt, ast.alias]] = {}
    assigns: dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                imports[bound] = (node, alias)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        assigns[n.id] = node
    fixtures = {n for n, d in defs.items() if _is_fixture(d)[0]}
    roots = {n for n, d in defs.items() if _is_fixture(d)[1] or (n.startswith("pytest_") and not _is_fixture(d)[0])}
    roots |= fixtures & _fixture_names_requested(test_files)

    chosen: set[str] = set()
    stmts: dict[int, ast.stmt] = {}
    needed_imports: dict[int, list[ast.alias]] = collections.defaultdict(list)
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in chosen:
            continue
        chosen.add(name)
        if name in defs:
            node = defs[name]
        elif name in assigns:
            node = assigns[name]
        elif name in imports:
            node, alias = imports[name]
            if alias not in needed_imports[id(node)]:
                needed_imports[id(node)].append(alias)
            stmts[id(node)] = node
            continue
        else:
            continue  # a builtin or a local name
        stmts[id(node)] = node
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load):
                todo.append(sub.id)
            elif isinstance(sub, ast.arg):  # fixture parameters: other fixtures
                todo.append(sub.arg)
            elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
                todo.append(sub.value.id)

    out = [f'"""Generated by scripts/vllm_suite.py from vLLM {VLLM_VERSION}\'s tests/conftest.py:\n'
           "its pytest hooks, autouse fixtures and the fixtures the selected tests request, verbatim,\n"
           'with only the imports those need (the full conftest imports test-only packages)."""\n']
    for node in sorted(stmts.values(), key=lambda n: n.lineno):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            keep = needed_imports[id(node)]
            if isinstance(node, ast.Import):
                new = ast.Import(names=keep)
            else:
                new = ast.ImportFrom(module=node.module, names=keep, level=node.level)
            out.append(ast.unparse(new) + "\n")
        else:
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            out.append("\n\n" + "".join(lines[start - 1:node.end_lineno]))
    taken = sorted(n for n in chosen if n in defs)
    return "".join(out), taken


def write_hf_cache(hf_home: Path) -> None:
    hub = hf_home / "hub"
    for repo, cfg in HUB_CONFIGS.items():
        d = hub / ("models--" + repo.replace("/", "--"))
        snap = d / "snapshots" / STANDIN_REVISION
        snap.mkdir(parents=True, exist_ok=True)
        (d / "refs").mkdir(exist_ok=True)
        (d / "refs" / "main").write_text(STANDIN_REVISION)
        (snap / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def other_vllm_plugins() -> list[str]:
    names = set()
    for group in VLLM_PLUGIN_GROUPS:
        names.update(ep.name for ep in entry_points(group=group))
    names.discard(PLUGIN_NAME)
    return sorted(names)


# --------------------------------------------------------------------------- runs


def run_pytest(mode: str, src: Path, tests: list[str], tmp: Path, confcutdir: Path, extra: list[str],
               timeout: int) -> dict:
    xml = tmp / f"junit-{mode}.xml"
    report = tmp / f"check-{mode}.json"
    log = tmp / f"pytest-{mode}.log"
    env = dict(os.environ)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_HUB_ENABLE_HF_TRANSFER",
                "VLLM_KVCOMPRESS_STATS_FILE", "PYTEST_ADDOPTS", "PYTEST_PLUGINS"):
        env.pop(var, None)
    pythonpath = [str(tmp / "plugins")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update(HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(pythonpath),
               KVC_VLLM_SUITE_MODE=mode, KVC_VLLM_SUITE_REPORT=str(report))
    if mode == "plain":
        env["VLLM_PLUGINS"] = ",".join(other_vllm_plugins())  # "" loads none
    else:
        env.pop("VLLM_PLUGINS", None)
    cmd = [sys.executable, "-m", "pytest", *tests, "-c", str(src / "pyproject.toml"), "--rootdir", str(src),
           "--confcutdir", str(confcutdir), "-p", "no:cacheprovider", "-p", STANDIN_MODULE, "-p", CHECK_MODULE,
           "-o", "junit_family=xunit1", "-o", "junit_logging=all", "--junitxml", str(xml),
           "-q", "--tb=short", *extra]
    print(f"[vllm_suite] {mode} run: VLLM_PLUGINS={env.get('VLLM_PLUGINS', '<unset>')!r}", flush=True)
    t0 = time.monotonic()
    with open(log, "w") as f:
        try:
            p = subprocess.run(cmd, cwd=src, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = None
    secs = time.monotonic() - t0
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
    print(f"[vllm_suite] {mode} run: exit {rc} in {secs:.0f}s: {tail[0] if tail else ''}", flush=True)
    check = json.loads(report.read_text()) if report.exists() else None
    return {"mode": mode, "returncode": rc, "seconds": round(secs, 1), "xml": xml, "log": log, "check": check,
            "cmd": cmd, "VLLM_PLUGINS": env.get("VLLM_PLUGINS")}


_ERR_LINE = re.compile(r"((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception)\b:.*)$")
# errors that only say the cause is elsewhere (a subprocess, the logs)
_WRAPPERS = ("check the logs", "See root cause above", "See stack trace for root cause", "Error raised in subprocess",
             "returned non-zero exit status")


def _reason(elem: ET.Element) -> str:
    """First line of the error (for pydantic's wrapper, with its 'Value error, ...' line)."""
    text = elem.text or ""
    e_lines = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ") and ln[1:].strip()]
    msg = (elem.get("message") or "").strip().splitlines()
    reason = e_lines[0] if e_lines else (msg[0] if msg else elem.tag)
    if "validation error for" in reason:
        val = next((ln for ln in e_lines[1:] if ln.startswith("Value error,")), None)
        if val:
            reason += " | " + re.sub(r"\s*\[type=.*$", "", val)
    return reason[:500]


def _cause(reason: str, captured: str) -> str:
    """For an error that only points elsewhere (a subprocess, the logs): the last other error line of the
    test's captured output (stdout, stderr, log), e.g. the subprocess's own exception."""
    if not any(w in reason for w in _WRAPPERS):
        return ""
    causes = [m.group(1).strip() for ln in captured.splitlines() if (m := _ERR_LINE.search(ln))]
    causes = [c for c in causes if not any(w in c for w in _WRAPPERS)]
    return causes[-1][:500] if causes else ""


def parse_junit(xml: Path, tmp: Path) -> dict[str, dict]:
    """test id -> {"status": passed|failed|error|skipped, "file", "reason", "cause"}"""
    out: dict[str, dict] = {}
    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    for tc in ET.parse(xml).getroot().iter("testcase"):
        file = tc.get("file") or ""
        classname = tc.get("classname") or ""
        mod = file[:-3].replace("/", ".") if file.endswith(".py") else ""
        cls = classname[len(mod) + 1:] if mod and classname.startswith(mod + ".") else ""
        if not file:
            file = classname.replace(".", "/") + ".py" if classname else "<collection>"
        tid = "::".join(x for x in (file, cls, tc.get("name")) if x)
        status, reason, cause = "passed", "", ""
        captured = "".join(c.text or "" for c in tc if c.tag in ("system-out", "system-err"))
        for ch in tc:
            st = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(ch.tag)
            if st and rank[st] > rank[status]:
                status = st
                if st == "skipped":
                    reason, cause = (ch.get("message") or "").strip(), ""
                else:
                    reason = _reason(ch)
                    cause = _cause(reason, captured).replace(str(tmp), "$TMP")
        prev = out.get(tid)
        if prev is None or rank[status] > rank[prev["status"]]:
            out[tid] = {"status": status, "file": file, "reason": reason, "cause": cause}
    return out


def _passed(r: dict | None) -> bool:
    return r is not None and r["status"] == "passed"


def _failed(r: dict | None) -> bool:
    return r is not None and r["status"] in ("failed", "error")


# --------------------------------------------------------------------------- report


def counts(results: dict[str, dict]) -> dict[str, dict[str, int]]:
    per: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"passed": 0, "failed": 0, "skipped": 0})
    for r in results.values():
        key = "failed" if r["status"] in ("failed", "error") else r["status"]
        per[r["file"]][key] += 1
    return dict(sorted(per.items()))


def _total(per: dict[str, dict[str, int]]) -> dict[str, int]:
    return {k: sum(v[k] for v in per.values()) for k in ("passed", "failed", "skipped")}


def group_failures(results: dict[str, dict]) -> list[dict]:
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for tid, r in results.items():
        if _failed(r):
            groups[r["reason"]].append(tid)
    out = []
    for reason, tids in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        causes = collections.Counter(results[t]["cause"] for t in tids if results[t]["cause"])
        out.append({"reason": reason, "count": len(tids),
                    "causes_in_captured_output": [{"cause": c, "tests": n} for c, n in causes.most_common()],
                    "tests": sorted(tids)})
    return out


def render_markdown(summary: dict) -> str:
    s = summary
    L = [f"# vLLM {s['vllm_version']}'s own tests with vllm-kvcompress off (issue #16)", "",
         f"`{s['command']}` — {s['date']}, {s['machine']}.", "",
         f"vLLM's `{'`, `'.join(s['tests'])}` from the `vllm=={VLLM_VERSION}` sdist "
         f"(sha256 `{s['sdist_sha256'][:16]}…`), run twice on the installed vLLM build "
         f"({s['platform']}), one pytest process each:", "",
         f"* **plain** — `VLLM_PLUGINS={s['runs']['plain']['VLLM_PLUGINS']!r}` (every installed vLLM plugin but "
         "`kvcompress`); checked inside the run: `vllm_kvcompress` never imported, no vLLM symbol patched. "
         f"{s['runs']['plain']['seconds']:.0f} s.",
         "* **patched** — `VLLM_PLUGINS` unset and `vllm_kvcompress.register()` (the entry point, "
         f"`apply_all()`) called at pytest start, no `kv_compress` config (policy `{s['policy']}`); "
         f"checked inside the run at start and end: {len(s['patched_symbols'])} patched vLLM symbols, "
         f"`CPU_ATTN` → the plugin's backend. {s['runs']['patched']['seconds']:.0f} s.", "",
         "vLLM's root `tests/conftest.py` is not loaded (it imports test-only packages); a stand-in generated "
         "from it holds, verbatim, its hooks, autouse fixtures and the fixtures these tests request: "
         f"`{'`, `'.join(s['standin_conftest'])}`. Hub configs are served offline from a temp HF cache "
         f"(`config.json` only, published values, no weights or tokenizer): `{'`, `'.join(s['hub_configs'])}`.", "",
         "## Result", "",
         f"**{len(s['regressions'])} tests pass plain and fail patched.** "
         f"Plain: {s['totals']['plain']['passed']} passed / {s['totals']['plain']['failed']} failed / "
         f"{s['totals']['plain']['skipped']} skipped; patched: {s['totals']['patched']['passed']} passed / "
         f"{s['totals']['patched']['failed']} failed / {s['totals']['patched']['skipped']} skipped.", "",
         "| file | plain passed / failed / skipped | patched passed / failed / skipped |",
         "| --- | --- | --- |"]
    for f in sorted(set(s["per_file"]["plain"]) | set(s["per_file"]["patched"])):
        a = s["per_file"]["plain"].get(f, {"passed": 0, "failed": 0, "skipped": 0})
        b = s["per_file"]["patched"].get(f, {"passed": 0, "failed": 0, "skipped": 0})
        mark = "" if a == b else " ⚠"
        L.append(f"| `{f}` | {a['passed']} / {a['failed']} / {a['skipped']} | "
                 f"{b['passed']} / {b['failed']} / {b['skipped']}{mark} |")
    L.append("")
    if s["regressions"]:
        L += ["## Pass plain, fail patched", ""]
        L += [f"* `{r['test']}`: {r['patched_reason']}" for r in s["regressions"]]
        L.append("")
    if s["other_differences"]:
        L += ["## Other differences between the runs", ""]
        L += [f"* `{d['test']}`: plain {d['plain']}, patched {d['patched']}" for d in s["other_differences"]]
        L.append("")
    fp = sorted(t for g in s["plain_failures"] for t in g["tests"])
    fq = sorted(t for g in s["patched_failures"] for t in g["tests"])
    diffs = s["failure_reason_differences"]
    L += ["## Tests that fail plain, by reason", ""]
    if fp == fq and not diffs:
        L += ["The patched run fails exactly these tests, with the same first error line.", ""]
    elif fp == fq:
        L += ["The patched run fails exactly these tests, with the same first error line except:", ""]
        L += [f"* `{d['test']}`: plain `{d['plain']}`, patched `{d['patched']}`" for d in diffs]
        L.append("")
    else:
        L += ["The patched run fails other tests than these: see above and `patched_failures` in the JSON file.", ""]
    for g in s["plain_failures"]:
        L.append(f"* **{g['count']}** — {g['reason']}")
        for c in g["causes_in_captured_output"]:
            L.append(f"  * cause, in the captured output of {c['tests']} of them: {c['cause']}")
        L.append("  <details><summary>tests</summary>\n")
        L += [f"  * `{t}`" for t in g["tests"]]
        L.append("\n  </details>")
    L.append("")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/results/vllm_suite",
                    help="output path without suffix (.json and .md are written); default %(default)s")
    ap.add_argument("--tests", nargs="+", default=DEFAULT_TESTS,
                    help="test paths inside vLLM's source tree (default %(default)s)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="sdist cache (default %(default)s)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per pytest run")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (junit xml, logs, stand-ins)")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after --")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.suffix in (".json", ".md"):
        out = out.with_suffix("")
    if not out.is_absolute():
        out = ROOT / out
    t_start = time.monotonic()

    import vllm  # the installed build under test

    if not vllm.__version__.startswith(VLLM_VERSION):
        print(f"[vllm_suite] installed vLLM is {vllm.__version__}, tests are {VLLM_VERSION}'s", file=sys.stderr)
        return 2
    try:
        sdist, how = fetch_sdist(args.cache)
    except Exception as e:  # network, index
        print(f"[vllm_suite] cannot get {SDIST}: {e}", file=sys.stderr)
        return 2
    digest = _sha256(sdist)
    src = extract_tests(sdist, args.cache, digest)
    print(f"[vllm_suite] {SDIST} ({how}), sha256 {digest[:16]}…, tests in {src / 'tests'}", flush=True)

    test_paths = []
    for t in args.tests:
        p = (src / t).resolve()
        if not p.exists() or src.resolve() / "tests" not in [p, *p.parents]:
            print(f"[vllm_suite] no such test path in vLLM's tests/: {t}", file=sys.stderr)
            return 2
        test_paths.append(p)
    firsts = {p.relative_to(src.resolve() / "tests").parts[:1] for p in test_paths}
    if len(firsts) != 1 or firsts == {()}:
        print("[vllm_suite] give test paths under one first-level folder of tests/ (e.g. tests/v1/...)",
              file=sys.stderr)
        return 2
    confcutdir = src.resolve() / "tests" / next(iter(firsts))[0]  # skips only the root tests/conftest.py
    test_files = sorted({f for p in test_paths for f in ([p] if p.is_file() else p.rglob("*.py"))})

    tmp = Path(tempfile.mkdtemp(prefix="vllm_suite-"))
    try:
        (tmp / "plugins").mkdir()
        standin, taken = build_standin_conftest(src / "tests" / "conftest.py", test_files)
        (tmp / "plugins" / f"{STANDIN_MODULE}.py").write_text(standin)
        (tmp / "plugins" / f"{CHECK_MODULE}.py").write_text(CHECK_SOURCE)
        write_hf_cache(tmp / "hf_home")
        print(f"[vllm_suite] stand-in conftest: {', '.join(taken)}", flush=True)

        tests_rel = [str(p.relative_to(src.resolve())) for p in test_paths]
        runs = {m: run_pytest(m, src, tests_rel, tmp, confcutdir, args.pytest_args, args.timeout)
                for m in ("plain", "patched")}
        problems = []
        for m, r in runs.items():
            c = r["check"]
            if r["returncode"] not in (0, 1) or not r["xml"].exists():
                problems.append(f"{m} run: pytest exit {r['returncode']} (see {r['log']})")
            if c is None or "end" not in c:
                problems.append(f"{m} run: the in-run check did not report")
            else:
                problems += [f"{m} run: {p}" for p in c.get("start_problems", []) + c.get("end_problems", [])]
        if problems:
            print("[vllm_suite] HARNESS FAILURE:\n  " + "\n  ".join(problems), file=sys.stderr)
            for r in runs.values():
                if r["log"].exists():
                    print(f"--- tail of {r['mode']} log:\n" + "\n".join(r["log"].read_text().splitlines()[-30:]),
                          file=sys.stderr)
            args.keep_tmp = True
            return 2

        plain, patched = parse_junit(runs["plain"]["xml"], tmp), parse_junit(runs["patched"]["xml"], tmp)
        regressions, other = [], []
        for tid in sorted(set(plain) | set(patched)):
            a, b = plain.get(tid), patched.get(tid)
            if _passed(a) and not _passed(b) and (b is None or _failed(b)):
                regressions.append({"test": tid, "patched_status": b["status"] if b else "missing",
                                    "patched_reason": b["reason"] if b else "not run in the patched run"})
            elif (a or {}).get("status") != (b or {}).get("status"):
                other.append({"test": tid, "plain": a["status"] if a else "missing",
                              "patched": b["status"] if b else "missing"})
        per_file = {"plain": counts(plain), "patched": counts(patched)}
        reason_diffs = [{"test": t, "plain": plain[t]["reason"], "patched": patched[t]["reason"]}
                        for t in sorted(set(plain) & set(patched))
                        if _failed(plain[t]) and _failed(patched[t]) and plain[t]["reason"] != patched[t]["reason"]]
        check_p = runs["patched"]["check"]
        summary = {
            "issue": 16,
            "command": " ".join([".venv/bin/python", "scripts/vllm_suite.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "machine": f"{os.cpu_count()} CPUs",
            "vllm_version": runs["plain"]["check"]["vllm_version"],
            "platform": runs["plain"]["check"]["platform"],
            "sdist": SDIST, "sdist_sha256": digest, "sdist_source": how,
            "tests": tests_rel,
            "standin_conftest": taken,
            "hub_configs": sorted(HUB_CONFIGS),
            "policy": check_p.get("policy"),
            "patched_symbols": check_p["start"]["patched_symbols"],
            "attention_backend_overrides": check_p["start"].get("attention_backend_overrides", {}),
            "runs": {m: {"returncode": r["returncode"], "seconds": r["seconds"], "VLLM_PLUGINS": r["VLLM_PLUGINS"],
                         "check": r["check"]} for m, r in runs.items()},
            "total_seconds": round(time.monotonic() - t_start, 1),
            "per_file": per_file,
            "totals": {m: _total(v) for m, v in per_file.items()},
            "regressions": regressions,
            "other_differences": other,
            "failure_reason_differences": reason_diffs,
            "plain_failures": group_failures(plain),
            "patched_failures": group_failures(patched),
            "tests_run": {"plain": len(plain), "patched": len(patched)},
        }

        # console
        w = max(len(f) for f in set(per_file["plain"]) | set(per_file["patched"]))
        print(f"\n{'file':<{w}}  {'plain p/f/s':>14}  {'patched p/f/s':>14}")
        for f in sorted(set(per_file["plain"]) | set(per_file["patched"])):
            a = per_file["plain"].get(f, {"passed": 0, "failed": 0, "skipped": 0})
            b = per_file["patched"].get(f, {"passed": 0, "failed": 0, "skipped": 0})
            fa = f"{a['passed']}/{a['failed']}/{a['skipped']}"
            fb = f"{b['passed']}/{b['failed']}/{b['skipped']}"
            print(f"{f:<{w}}  {fa:>14}  {fb:>14}{'' if a == b else '  <-- differs'}")
        tp, tq = summary["totals"]["plain"], summary["totals"]["patched"]
        print(f"{'TOTAL':<{w}}  {tp['passed']}/{tp['failed']}/{tp['skipped']:>4}  "
              f"{tq['passed']}/{tq['failed']}/{tq['skipped']}")
        print(f"\npatched run: {len(summary['patched_symbols'])} patched vLLM symbols, "
              f"attention overrides {summary['attention_backend_overrides']}")
        print(f"\npass plain, fail patched: {len(regressions)}")
        for r in regressions:
            print(f"  {r['test']}: {r['patched_status']}: {r['patched_reason']}")
        if other:
            print(f"other differences: {len(other)}")
            for d in other:
                print(f"  {d['test']}: plain {d['plain']}, patched {d['patched']}")
        for d in reason_diffs:
            print(f"fails in both runs, first error line differs: {d['test']}:\n  plain:   {d['plain']}\n"
                  f"  patched: {d['patched']}")
        print("\nfail plain, by reason:")
        for g in summary["plain_failures"]:
            print(f"  {g['count']:4d}  {g['reason']}")
            for c in g["causes_in_captured_output"]:
                print(f"          cause, in the captured output of {c['tests']} of them: {c['cause']}")
            for t in g["tests"][:3]:
                print(f"          e.g. {t}")

        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
        out.with_suffix(".md").write_text(render_markdown(summary))
        print(f"\n[vllm_suite] wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} "
              f"({summary['total_seconds']:.0f}s)")
        return 1 if regressions else 0
    finally:
        if args.keep_tmp:
            print(f"[vllm_suite] temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
