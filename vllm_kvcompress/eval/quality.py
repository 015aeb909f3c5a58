"""Quality harness: what KV eviction costs in answers, through offline vLLM.

    python -m vllm_kvcompress.eval quality [--policies h2o,pyramid,snapkv,streaming]
        [--retentions 0.5,0.25,0.125] [--lengths 1024,2048,4096] [--depths 10]
        [--multikey-depths 5] [--ppl-windows 4] [--out-dir docs/results] [--quick]

For the full cache (vanilla vLLM, no ``kv_compress`` config) and for every
(policy, retention) pair -- retention is ``--kv-budget`` as a fraction of the
prompt -- it runs the embedded SmolLM2-135M-Instruct on three tasks, all built
at run time from the Paul Graham essays (nothing is committed) with fixed seeds:

* **passkey**: a 5-digit pass key, stated three times in one needle sentence
  (later copies attend to the first: a needle that flatters accumulated-attention
  policies; kept for continuity with earlier results),
  hidden in essay text at ``--depths`` depths (evenly spaced, 0% = right after
  the instruction, 100% = right before the question) for each prompt length;
  completion-style, the prompt ends in "Question: What is the pass key?
  Answer: The pass key is"; greedy, 8 new tokens; correct when the key appears
  in the output.
* **passkey_once**: the same prompts (same keys, depths and essay text) with the
  key stated exactly ONCE (" The pass key is <key>."): the hard, fair case,
  reported separately.
* **multikey**: four "The special magic number for <word> is <6 digits>."
  needles (the queried one at ``--multikey-depths`` depths, the middles of
  equal parts of the text; the three distractors at random depths); the
  prompt ends in "... The special magic number for <word> is"; correct when
  the first number in the output equals the queried value.
* **ppl**: perplexity of ``--ppl-windows`` distinct 4096-token windows of essay
  text, computed from ``prompt_logprobs`` with chunked prefill of 32 tokens
  (= the page size), so a layer that evicts between chunks changes the
  log-probabilities of the later chunks.

Retrieval prompts are prefilled in ONE step (chunked prefill off, batch budget
= the model length): each layer scores the whole prompt, question included,
then compacts to its budget; the answer is then decoded from the compressed
cache (the first new token, a space, still comes from the full prefill; every
digit is decoded from the compressed cache). Perplexity uses a second engine
with ``max_num_batched_tokens=32``.

Every (configuration, engine) runs in its own subprocess (engine start, tasks,
exit), so nothing of one engine can leak into the next. Results go to
``<out-dir>/quality.json``, ``quality.md`` and ``quality_{passkey,multikey,ppl}.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import dataclasses
import functools
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vllm_kvcompress.config import KVCompressConfig, variant_settings

# ----------------------------------------------------------------------------- defaults
POLICIES = ("h2o", "pyramid", "snapkv", "streaming")
#: retrieval tasks (scored on generated text) and every task, in report order
RETRIEVAL_TASKS = ("passkey", "passkey_once", "multikey")
TASKS = RETRIEVAL_TASKS + ("ppl",)
TASK_TITLES = {"passkey": "passkey (key stated 3x)", "passkey_once": "passkey (key stated once)",
               "multikey": "multi-key", "ppl": "perplexity"}
#: --policies also accepts pyramid+drop and pyramid+drop@LAYER (config.variant_settings: pyramid
#: with prefill_drop; deeper layers compute only their kept tokens when a prompt is prefilled in
#: one step; the chunked perplexity runs never drop)
RETENTIONS = (0.5, 0.25, 0.125)
LENGTHS = (1024, 2048, 4096)
PASSKEY_DEPTHS = 10
MULTIKEY_DEPTHS = 5
MULTIKEY_NUM_KEYS = 4
PPL_WINDOWS = 4
PPL_LEN = 4096
PAGE = 32  # the plugin's default page size when compressing; vanilla gets it too
MAX_MODEL_LEN = 4608
KV_BYTES = 1 << 30
SEED = 0
PASSKEY_MAX_TOKENS = 8
MULTIKEY_MAX_TOKENS = 10

QUICK = dict(retentions=(0.25,), lengths=(1024,), depths=3, multikey_depths=1, ppl_windows=1, ppl_len=1024)
QUICK_OUT_DIR = Path(tempfile.gettempdir()) / "vllm-kvcompress-quality-quick"

# Targets (issue #6)
TARGET_FULL_PASSKEY = 0.95  # full cache at 1K and 2K
TARGET_PPL_REL = 0.03  # at 25% retention

PASSKEY_PREFIX = ("There is an important pass key hidden inside a lot of irrelevant text. "
                  "Find it and memorize it. I will quiz you about the pass key.\n\n")
# SmolLM2-135M needs the repeated needle and the Question/Answer frame to reach ~100% with the full cache;
# with one statement or without "Answer:" it often continues "The pass key is" with "a password that ...".
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. The pass key is {key}."
PASSKEY_QUESTION = "\n\nQuestion: What is the pass key?\nAnswer: The pass key is"
# The hard case: the key stated exactly once (the full cache still finds it at 1K-4K, 5 depths).
PASSKEY_ONCE_NEEDLE = " The pass key is {key}."

MULTIKEY_PREFIX = ("Some special magic numbers are hidden inside a lot of irrelevant text. "
                   "Find them and memorize them. I will quiz you about one of them.\n\n")
MULTIKEY_NEEDLE = " The special magic number for {word} is {value}."
MULTIKEY_QUESTION = "\n\nWhat is the special magic number for {word}? The special magic number for {word} is"
MULTIKEY_WORDS = ("apple", "river", "candle", "tiger", "window", "garden", "rocket", "violin", "marble",
                  "forest", "pencil", "island", "jacket", "lemon", "anchor", "castle", "mirror", "saddle",
                  "button", "harbor")


def depth_grid(n: int) -> list[float]:
    """``n`` evenly spaced depths in [0, 1], both ends included (``n == 1``: the middle)."""
    if n <= 1:
        return [0.5]
    return [round(float(x), 4) for x in np.linspace(0.0, 1.0, n)]


def mid_depth_grid(n: int) -> list[float]:
    """``n`` depths at the middles of ``n`` equal parts of [0, 1] (multi-key: interior needles)."""
    return [round((i + 0.5) / n, 4) for i in range(max(n, 1))]


# ----------------------------------------------------------------------------- haystack + prompts
class Haystack:
    """The essays as one token stream, with the sentence boundaries needles snap to."""

    def __init__(self, tokenizer, text: str) -> None:
        self.tok = tokenizer
        self.ids: list[int] = tokenizer(text, add_special_tokens=False).input_ids
        pieces = tokenizer.convert_ids_to_tokens(self.ids)
        # boundary b: a sentence ends with token b-1, so text can be cut before token b
        ends = [i + 1 for i, p in enumerate(pieces) if p.rstrip("Ċ").endswith((".", "?", "!", '."', '?"', '!"'))]
        self.boundaries = np.asarray(ends, dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    def snap(self, pos: int, lo: int, max_back: int = 64) -> int:
        """The last sentence boundary in ``[max(lo, pos - max_back), pos]``, else ``pos``."""
        i = int(np.searchsorted(self.boundaries, pos, side="right")) - 1
        if i >= 0:
            b = int(self.boundaries[i])
            if b >= max(lo, pos - max_back):
                return b
        return pos


@dataclass
class Prompt:
    ids: list[int]
    needle_pos: list[int]  # token index of each needle's first token (in needle order)
    hay_start: int  # first haystack token
    hay_tokens: int  # haystack tokens (excluding needles)


def build_prompt(hay: Haystack, target_len: int, prefix: str, needles: Sequence[tuple[float, str]],
                 question: str, offset: int) -> Prompt:
    """``prefix`` + essay text from ``offset`` with each needle text inserted at its depth + ``question``.

    Depth 0 puts a needle right after the prefix, 1 right before the question; in
    between a needle snaps back to the previous sentence end (at most 64 tokens).
    The haystack is sized so the whole prompt is ``target_len`` tokens (within a
    few tokens: text is re-tokenized across the cuts); it ends at a sentence end.
    """
    overhead = len(hay.encode(prefix)) + len(hay.encode(question)) + sum(len(hay.encode(t)) for _, t in needles)
    n_hay = target_len - overhead
    if n_hay < 16:
        raise ValueError(f"target length {target_len} leaves no room for the haystack")
    end = hay.snap(offset + n_hay, offset + n_hay // 2, max_back=256)
    start = end - n_hay
    if start < 0 or end > len(hay.ids):
        raise ValueError(f"offset {offset} + {n_hay} tokens is outside the essays ({len(hay.ids)} tokens)")
    seg = hay.ids[start:end]
    cuts = []
    for d, _ in needles:
        k = int(round(d * n_hay))
        if 0 < k < n_hay:
            k = hay.snap(start + k, start + 1) - start
        cuts.append(k)
    order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
    text = prefix
    prev = 0
    before: dict[int, str] = {}
    for i in order:
        text += hay.decode(seg[prev:cuts[i]])
        before[i] = text
        text += needles[i][1]
        prev = cuts[i]
        if prev < n_hay and not hay.decode(seg[prev:prev + 1])[:1].isspace():
            text += " "  # the essays often run sentences together ("accelerating.We")
    text += hay.decode(seg[prev:]) + question
    ids = hay.encode(text)
    return Prompt(ids=ids, needle_pos=[len(hay.encode(before[i])) for i in range(len(needles))],
                  hay_start=len(hay.encode(prefix)), hay_tokens=n_hay)


def _offset(rng: np.random.Generator, hay: Haystack, length: int) -> int:
    return int(rng.integers(0, len(hay.ids) - 2 * length))


def passkey_prompts(hay: Haystack, lengths: Sequence[int], depths: Sequence[float], seed: int = SEED,
                    needle: str = PASSKEY_NEEDLE, task: str = "passkey") -> list[dict]:
    """One prompt per (length, depth); the same seed gives the same keys and essay text for every needle."""
    rng = np.random.default_rng([seed, 1])
    items = []
    for length in lengths:
        for d in depths:
            key = str(int(rng.integers(10000, 100000)))
            p = build_prompt(hay, length, PASSKEY_PREFIX, [(d, needle.format(key=key))], PASSKEY_QUESTION,
                             _offset(rng, hay, length))
            items.append(dict(task=task, length=length, depth=d, answer=key, ids=p.ids,
                              needle_pos=p.needle_pos[0], hay_start=p.hay_start, hay_tokens=p.hay_tokens))
    return items


def multikey_prompts(hay: Haystack, lengths: Sequence[int], depths: Sequence[float], num_keys: int = MULTIKEY_NUM_KEYS,
                     seed: int = SEED) -> list[dict]:
    rng = np.random.default_rng([seed, 2])
    items = []
    for length in lengths:
        for d in depths:
            words = [str(w) for w in rng.choice(MULTIKEY_WORDS, size=num_keys, replace=False)]
            values = [str(v) for v in rng.choice(np.arange(100000, 1000000), size=num_keys, replace=False)]
            # distractor depths: random, at least 0.05 from each other and from the queried one
            ds = [d]
            while len(ds) < num_keys:
                x = round(float(rng.uniform(0.0, 1.0)), 4)
                if all(abs(x - y) >= 0.05 for y in ds):
                    ds.append(x)
            needles = [(ds[i], MULTIKEY_NEEDLE.format(word=words[i], value=values[i])) for i in range(num_keys)]
            p = build_prompt(hay, length, MULTIKEY_PREFIX, needles, MULTIKEY_QUESTION.format(word=words[0]),
                             _offset(rng, hay, length))
            items.append(dict(task="multikey", length=length, depth=d, answer=values[0], word=words[0],
                              distractors=dict(zip(words[1:], values[1:])), ids=p.ids, needle_pos=p.needle_pos[0],
                              hay_start=p.hay_start, hay_tokens=p.hay_tokens))
    return items


def ppl_windows(hay: Haystack, n: int, length: int = PPL_LEN, seed: int = SEED) -> list[dict]:
    """``n`` non-overlapping ``length``-token windows of the essay stream, one per equal segment."""
    rng = np.random.default_rng([seed, 3])
    seg = len(hay.ids) // max(n, 1)
    if seg < length:
        raise ValueError(f"{n} windows of {length} tokens do not fit into {len(hay.ids)} essay tokens")
    items = []
    for i in range(n):
        off = i * seg + int(rng.integers(0, seg - length + 1))
        items.append(dict(task="ppl", window=i, offset=off, ids=hay.ids[off:off + length]))
    return items


# ----------------------------------------------------------------------------- scoring
def score_passkey(output: str, key: str) -> bool:
    """The pass key appears in the output."""
    return key in output


def score_multikey(output: str, value: str) -> bool:
    """Exact match: the first number in the output is the queried value."""
    m = re.search(r"\d+", output)
    return m is not None and m.group(0) == value


def perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count) if count else float("nan")


def summarize(items: list[dict]) -> dict:
    """Accuracy overall, per length and per depth of scored retrieval items."""
    by_len: dict[str, list[bool]] = {}
    by_depth: dict[str, list[bool]] = {}
    for it in items:
        by_len.setdefault(str(it["length"]), []).append(bool(it["correct"]))
        by_depth.setdefault(str(it["depth"]), []).append(bool(it["correct"]))
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return dict(acc=mean([bool(it["correct"]) for it in items]),
                by_length={k: mean(v) for k, v in by_len.items()},
                by_depth={k: mean(v) for k, v in by_depth.items()}, n=len(items))


def summarize_ppl(windows: list[dict], tail_from: int) -> dict:
    """Pooled perplexity over all windows, and over positions >= ``tail_from`` only."""
    nll = sum(w["nll_sum"] for w in windows)
    cnt = sum(w["count"] for w in windows)
    tnll = sum(w["tail_nll_sum"] for w in windows)
    tcnt = sum(w["tail_count"] for w in windows)
    return dict(ppl=perplexity(nll, cnt), ppl_tail=perplexity(tnll, tcnt), tail_from=tail_from, tokens=cnt,
                per_window=[perplexity(w["nll_sum"], w["count"]) for w in windows])


# ----------------------------------------------------------------------------- engine side (worker subprocess)
def engine_kwargs(policy: str, retention: float, kind: str, options: dict | None = None,
                  dtype: str = "float32") -> dict:
    kw: dict[str, Any] = dict(dtype=dtype, enforce_eager=True, kv_cache_memory_bytes=KV_BYTES,
                              max_model_len=MAX_MODEL_LEN, seed=SEED, block_size=PAGE)
    if kind == "ppl":
        kw.update(max_num_batched_tokens=PAGE, enable_chunked_prefill=True)
    else:  # retrieval: each prompt is prefilled in one step
        kw.update(max_num_batched_tokens=MAX_MODEL_LEN, enable_chunked_prefill=False)
    if policy != "full":
        kw["additional_config"] = {"kv_compress": kv_settings(policy, retention, options)}
    return kw


def kv_settings(policy: str, retention: float, options: dict | None = None) -> dict:
    """The kv_compress mapping of a grid entry (``pyramid+drop``: pyramid with prefill_drop),
    plus ``options`` (``--kv KEY=VALUE``: e.g. an option that restores a paper's reference)."""
    d: dict[str, Any] = {**variant_settings(policy), "budget": retention}
    d.update(options or {})
    return d


def _tqdm_factory(desc: str):
    from tqdm.auto import tqdm

    return functools.partial(tqdm, desc=desc, leave=False, dynamic_ncols=True)


def run_worker(job: dict) -> dict:
    """Start one engine, run the job's tasks on it, return raw results (runs inside the subprocess)."""
    from vllm import LLM, SamplingParams

    from vllm_kvcompress.assets import model_path

    t0 = time.perf_counter()
    llm = LLM(str(model_path()), **job["engine"])
    out: dict[str, Any] = {"seconds": {"start": time.perf_counter() - t0}}
    tag = job["tag"]
    try:
        for task in RETRIEVAL_TASKS:
            items = job.get(task)
            if not items:
                continue
            t = time.perf_counter()
            sp = SamplingParams(temperature=0.0, max_tokens=MULTIKEY_MAX_TOKENS if task == "multikey"
                                else PASSKEY_MAX_TOKENS, seed=SEED)
            res = llm.generate([{"prompt_token_ids": it["ids"]} for it in items], sp,
                               use_tqdm=_tqdm_factory(f"{tag} {task}"))
            out[task] = [o.outputs[0].text for o in res]
            out["seconds"][task] = time.perf_counter() - t
        items = job.get("ppl")
        if items:
            t = time.perf_counter()
            sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, seed=SEED)
            res = llm.generate([{"prompt_token_ids": it["ids"]} for it in items], sp,
                               use_tqdm=_tqdm_factory(f"{tag} ppl"))
            tail_from = job["ppl_tail_from"]
            wins = []
            for it, o in zip(items, res):
                ids = it["ids"]
                lps = [o.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
                nll = -np.asarray(lps, dtype=np.float64)
                wins.append(dict(nll_sum=float(nll.sum()), count=int(nll.size),
                                 tail_nll_sum=float(nll[tail_from - 1:].sum()), tail_count=int(nll[tail_from - 1:].size)))
            out["ppl"] = wins
            out["seconds"]["ppl"] = time.perf_counter() - t
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        del llm
    return out


def _worker_main(job_path: str, out_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    res = run_worker(job)
    Path(out_path).write_text(json.dumps(res))
    return 0


def run_in_subprocess(job: dict, verbose: bool = False, timeout: float = 7200.0) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in the worker process itself
    if not verbose:
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    with tempfile.TemporaryDirectory(prefix="kvc-quality-") as d:
        jp, op = Path(d) / "job.json", Path(d) / "out.json"
        jp.write_text(json.dumps(job))
        cmd = [sys.executable, "-m", "vllm_kvcompress.eval", "quality", "--worker", str(jp), str(op)]
        log = Path(d) / "worker.log"
        with open(log, "w") as lf:
            # stderr (progress bars, warnings, tracebacks) to the terminal, stdout to a log
            proc = subprocess.run(cmd, env=env, stdout=None if verbose else lf, timeout=timeout)
        if proc.returncode != 0 or not op.exists():
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"worker for {job['tag']} failed (exit {proc.returncode}); its stderr is above; "
                               f"stdout tail:\n{tail}")
        return json.loads(op.read_text())


# ----------------------------------------------------------------------------- orchestration
def config_list(policies: Sequence[str], retentions: Sequence[float], full: bool = True) -> list[tuple[str, float]]:
    return [("full", 1.0)] * full + [(p, r) for p in policies for r in retentions]


def label(policy: str, retention: float) -> str:
    return "full cache" if policy == "full" else f"{policy} {retention:g}"


def run_grid(args, prompts: dict, progress=True, done: Sequence[dict] = (), on_run=None) -> list[dict]:
    """Run every configuration not already in ``done``; ``on_run(runs)`` after each one."""
    from tqdm.auto import tqdm

    runs = list(done)
    have = {(r["policy"], r["retention"]) for r in runs}
    configs = config_list(args.policies, args.retentions, not getattr(args, "no_full", False))
    tail_from = args.ppl_len // 2
    bar = tqdm(configs, desc="configs", disable=not progress, dynamic_ncols=True)
    for policy, retention in bar:
        tag = label(policy, retention)
        bar.set_postfix_str(tag)
        if (policy, retention) in have:
            bar.write(f"{tag}: kept from the previous run (--resume)")
            continue
        run: dict[str, Any] = dict(policy=policy, retention=retention, seconds={})
        if policy != "full":  # the resolved settings (policy defaults included) this run used
            run["kv_compress"] = dataclasses.asdict(KVCompressConfig(**kv_settings(policy, retention, args.kv)))
        t0 = time.perf_counter()
        jobs = []
        if any(prompts.get(t) for t in RETRIEVAL_TASKS):
            jobs.append(dict(tag=tag, engine=engine_kwargs(policy, retention, "retrieval", args.kv, args.dtype),
                             **{t: [dict(ids=it["ids"]) for it in prompts.get(t, [])] for t in RETRIEVAL_TASKS}))
        if prompts["ppl"]:
            jobs.append(dict(tag=tag, engine=engine_kwargs(policy, retention, "ppl", args.kv, args.dtype),
                             ppl=[dict(ids=it["ids"]) for it in prompts["ppl"]], ppl_tail_from=tail_from))
        for job in jobs:
            res = run_in_subprocess(job, verbose=args.verbose)
            kind = "ppl" if "ppl" in job else "retrieval"
            for k, v in res["seconds"].items():
                run["seconds"][f"{kind}_{k}" if k == "start" else k] = round(v, 2)
            for task in RETRIEVAL_TASKS:
                score = score_multikey if task == "multikey" else score_passkey
                if task in res:
                    items = []
                    for it, text in zip(prompts[task], res[task]):
                        row = {k: it[k] for k in ("length", "depth", "answer")}
                        row.update(output=text, correct=score(text, it["answer"]), tokens=len(it["ids"]))
                        items.append(row)
                    run[task] = dict(summarize(items), items=items)
            if "ppl" in res:
                run["ppl"] = summarize_ppl(res["ppl"], tail_from)
        run["seconds"]["total"] = round(time.perf_counter() - t0, 2)
        runs.append(run)
        bar.write(_one_line(run))
        if on_run is not None:
            on_run(runs)
    order = {c: i for i, c in enumerate(configs)}
    return sorted((r for r in runs if (r["policy"], r["retention"]) in order),
                  key=lambda r: order[(r["policy"], r["retention"])])


def _one_line(run: dict) -> str:
    parts = [f"{label(run['policy'], run['retention']):16s}"]
    if "passkey" in run:
        parts.append(f"passkey {run['passkey']['acc']:.0%}")
    if "passkey_once" in run:
        parts.append(f"passkey once {run['passkey_once']['acc']:.0%}")
    if "multikey" in run:
        parts.append(f"multikey {run['multikey']['acc']:.0%}")
    if "ppl" in run:
        parts.append(f"ppl {run['ppl']['ppl']:.3f}")
    parts.append(f"({run['seconds']['total']:.0f} s)")
    return "  ".join(parts)


# ----------------------------------------------------------------------------- targets, table, plots
def _full(result: dict) -> dict | None:
    return next((r for r in result["runs"] if r["policy"] == "full"), None)


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


#: issue #17: minimum pass-key accuracy (on EACH needle format) per policy, at 25% and 12.5% retention
TARGET_PASSKEY = {"pyramid": {0.25: 0.95, 0.125: 0.90}, "snapkv": {0.25: 0.95, 0.125: 0.90},
                  "h2o": {0.25: 0.90, 0.125: 0.80}}
TARGET_MULTIKEY_BEST = 0.60  # at 25%, the best policy


def check_targets(result: dict) -> list[dict]:
    """The issue #17 targets, each with its measured value and pass/fail."""
    full = _full(result)
    out = []
    if full is None:
        return out
    for task in ("passkey", "passkey_once"):
        fp = full.get(task)
        if fp:
            v = fp["acc"]
            out.append(dict(target=f"full cache {TASK_TITLES[task]} >= 95%", value=_pct(v), ok=v >= TARGET_FULL_PASSKEY))
    policies = sorted({r["policy"] for r in result["runs"] if r["policy"] != "full"},
                      key=lambda p: (POLICIES.index(p) if p in POLICIES else 99, p))
    for p in policies:
        runs = {r["retention"]: r for r in result["runs"] if r["policy"] == p}
        for retention, goal in TARGET_PASSKEY.get(p, {}).items():
            for task in ("passkey", "passkey_once"):
                if retention in runs and task in runs[retention]:
                    v = runs[retention][task]["acc"]
                    out.append(dict(target=f"{p} {retention:g}: {TASK_TITLES[task]} >= {_pct(goal)}", value=_pct(v),
                                    ok=v >= goal - 1e-9))
        if full.get("ppl") and 0.25 in runs and "ppl" in runs[0.25]:
            base, v = full["ppl"]["ppl"], runs[0.25]["ppl"]["ppl"]
            out.append(dict(target=f"{p} 25%: perplexity <= full cache +3% (<= {base * (1 + TARGET_PPL_REL):.3f})",
                            value=f"{v:.3f} ({100 * (v / base - 1):+.1f}%)", ok=v <= base * (1 + TARGET_PPL_REL)))
    mk = [(r["multikey"]["acc"], label(r["policy"], r["retention"])) for r in result["runs"]
          if r["policy"] != "full" and r["retention"] == 0.25 and "multikey" in r]
    if mk:
        v, who = max(mk)
        out.append(dict(target=f"best policy at 25%: multi-key >= {_pct(TARGET_MULTIKEY_BEST)}",
                        value=f"{_pct(v)} ({who})", ok=v >= TARGET_MULTIKEY_BEST - 1e-9))
    return out


def _ppl_cell(run: dict, full: dict | None) -> str:
    if "ppl" not in run:
        return "n/a"
    v = run["ppl"]["ppl"]
    if full is None or run is full or "ppl" not in full:
        return f"{v:.3f}"
    return f"{v:.3f} ({100 * (v / full['ppl']['ppl'] - 1):+.1f}%)"


def _ppl_tail_cell(run: dict, full: dict | None) -> str:
    if "ppl" not in run:
        return "n/a"
    v = run["ppl"]["ppl_tail"]
    if full is None or run is full or "ppl" not in full:
        return f"{v:.3f}"
    return f"{v:.3f} ({100 * (v / full['ppl']['ppl_tail'] - 1):+.1f}%)"


def write_markdown(result: dict, path: Path, plots: Sequence[str] = ()) -> Path:
    meta = result["meta"]
    full = _full(result)
    runs = result["runs"]
    lines = ["# Quality: passkey (key stated 3x and once), multi-key retrieval and perplexity under KV eviction", "",
             "Produced by (from the repository root, `.venv` active):", "", "```bash", meta["command"], "```", "",
             f"{meta['date']}, {meta['machine']}; model {meta['model']} ({meta.get('engine', {}).get('retrieval', {}).get('dtype', 'float32')}, greedy; "
             f"prompt seed {meta['seed']}); "
             f"wall time {meta['runtime_s'] / 60:.1f} min. Retention = `--kv-budget` as a fraction of the prompt "
             f"(mean retained tokens per layer); \"full cache\" is vanilla vLLM (no `kv_compress` config), "
             f"same engine settings (page size {PAGE})."
             + (f" Options set for every policy run (`--kv`): `{json.dumps(meta['kv_options'])}`."
                if meta.get("kv_options") else ""), ""]
    lines += ["## Summary", "",
              "| configuration | passkey (3x) | passkey (once) | multi-key | perplexity (4K, chunk 32) | "
              "perplexity, 2nd half | run time |",
              "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {label(r['policy'], r['retention'])} | {_pct(r.get('passkey', {}).get('acc'))} | "
                     f"{_pct(r.get('passkey_once', {}).get('acc'))} | "
                     f"{_pct(r.get('multikey', {}).get('acc'))} | {_ppl_cell(r, full)} | {_ppl_tail_cell(r, full)} | "
                     f"{r.get('seconds', {}).get('total', float('nan')) / 60:.1f} min |")
    targets = check_targets(result)
    if targets:
        lines += ["", "## Targets (issue #17)", "", "| target | measured | met |", "|---|---|---|"]
        for t in targets:
            lines.append(f"| {t['target']} | {t['value']} | {'yes' if t['ok'] else '**no**'} |")
    for task in RETRIEVAL_TASKS:
        title = f"{TASK_TITLES[task][0].upper()}{TASK_TITLES[task][1:]} accuracy by prompt length"
        lengths = meta["lengths"]
        if not any(task in r for r in runs):
            continue
        lines += ["", f"## {title}", "", "| configuration | " + " | ".join(f"{n} tok" for n in lengths) + " | all |",
                  "|---|" + "---|" * (len(lengths) + 1)]
        for r in runs:
            if task in r:
                cells = [_pct(r[task]["by_length"].get(str(n))) for n in lengths]
                lines.append(f"| {label(r['policy'], r['retention'])} | " + " | ".join(cells)
                             + f" | {_pct(r[task]['acc'])} |")
    for task in ("passkey", "passkey_once"):
        if not any(task in r for r in runs):
            continue
        depths = [str(d) for d in meta["passkey_depths"]]
        lines += ["", f"## {TASK_TITLES[task][0].upper()}{TASK_TITLES[task][1:]} accuracy by needle depth (all lengths)",
                  "", "| configuration | " + " | ".join(f"{float(d):.0%}" for d in depths) + " |",
                  "|---|" + "---|" * len(depths)]
        for r in runs:
            if task in r:
                lines.append(f"| {label(r['policy'], r['retention'])} | "
                             + " | ".join(_pct(r[task]["by_depth"].get(d)) for d in depths) + " |")
    # a setup line is one bullet: literal newlines (from the prompt strings) are shown as \\n
    lines += ["", "## Setup", ""] + [f"- {s}".replace("\n", "\\n") for s in meta["setup"]]
    notes = meta.get("notes")
    if notes:  # Markdown text (from --notes FILE), or a list of bullet points
        lines += ["", "## Notes", ""] + ([notes] if isinstance(notes, str) else [f"- {s}" for s in notes])
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    lines += ["", "Raw numbers, every prompt's output and timings: "
              f"[{Path(meta.get('json_name', 'quality.json')).name}]({Path(meta.get('json_name', 'quality.json')).name}).",
              ""]
    path.write_text("\n".join(lines))
    return path


def write_plots(result: dict, out_dir: Path, prefix: str = "quality") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = _full(result)
    policies = []
    for r in result["runs"]:
        if r["policy"] != "full" and r["policy"] not in policies:
            policies.append(r["policy"])
    paths = []
    specs = [("passkey", "passkey accuracy (key stated 3x)", lambda r: r["passkey"]["acc"]),
             ("passkey_once", "passkey accuracy (key stated once)", lambda r: r["passkey_once"]["acc"]),
             ("multikey", "multi-key accuracy", lambda r: r["multikey"]["acc"]),
             ("ppl", "perplexity (4K tokens, chunked prefill 32)", lambda r: r["ppl"]["ppl"])]
    for task, ylabel, get in specs:
        if not any(task in r for r in result["runs"]):
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        xs_all = set()
        for i, p in enumerate(policies):
            pts = sorted((r["retention"], get(r)) for r in result["runs"] if r["policy"] == p and task in r)
            if pts:
                xs_all.update(x for x, _ in pts)
                # distinct markers and sizes: lines that coincide (e.g. all at 100%) stay visible
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="osD^v<>"[i % 7], markersize=9 - 1.5 * (i % 4),
                        linewidth=1.6, alpha=0.85, label=p)
        if full is not None and task in full:
            ax.axhline(get(full), color="black", linestyle="--", linewidth=1.2, label="full cache")
        ax.set_xscale("log", base=2)
        if xs_all:
            ticks = sorted(xs_all)
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{x:.3g}" for x in ticks])
        ax.set_xlabel("retention (fraction of the prompt kept per layer)")
        ax.set_ylabel(ylabel)
        if task != "ppl":
            ax.set_ylim(-0.03, 1.03)
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.set_title(f"{ylabel} vs retention ({result['meta']['model']})", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{prefix}_{task}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _write_json(result: dict, out_dir: Path, prefix: str = "quality") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    result["meta"]["json_name"] = f"{prefix}.json"
    jpath = out_dir / f"{prefix}.json"
    tmp = jpath.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, jpath)
    return jpath


def write_outputs(result: dict, out_dir: Path, prefix: str = "quality") -> list[Path]:
    jpath = _write_json(result, out_dir, prefix)
    plots = write_plots(result, out_dir, prefix)
    md = write_markdown(result, out_dir / f"{prefix}.md", plots)
    return [jpath, md, *plots]


# ----------------------------------------------------------------------------- CLI
def _floats(s: str) -> tuple[float, ...]:
    vals = tuple(float(x) for x in s.split(",") if x.strip())
    for v in vals:
        if not 0 < v < 1:
            raise argparse.ArgumentTypeError(f"retention {v} is not in (0, 1)")
    return vals


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def _kv_option(s: str) -> tuple[str, Any]:
    import yaml

    key, eq, value = s.partition("=")
    key = key.strip()
    names = [f.name for f in dataclasses.fields(KVCompressConfig)]
    if not eq or key not in names or key in ("policy", "budget"):
        raise argparse.ArgumentTypeError(f"--kv takes KEY=VALUE with KEY a kv_compress option other than policy/budget, "
                                         f"got {s!r}")
    return key, yaml.safe_load(value)


def _policies(s: str) -> tuple[str, ...]:
    vals = tuple(x.strip() for x in s.split(",") if x.strip())
    for v in vals:
        try:
            variant_settings(v)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return vals


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m vllm_kvcompress.eval quality",
                                 description="Passkey / multi-key retrieval and chunked-prefill perplexity through "
                                             "offline vLLM: full cache vs each policy at each retention.")
    ap.add_argument("--policies", type=_policies, default=None, help=f"comma list (default {','.join(POLICIES)})")
    ap.add_argument("--retentions", type=_floats, default=None,
                    help="comma list of --kv-budget fractions (default 0.5,0.25,0.125)")
    ap.add_argument("--lengths", type=_ints, default=None, help="retrieval prompt lengths in tokens (default 1024,2048,4096)")
    ap.add_argument("--depths", type=int, default=None,
                    help=f"passkey needle depths, evenly spaced over 0..100%% (default {PASSKEY_DEPTHS})")
    ap.add_argument("--multikey-depths", type=int, default=None, help=f"multi-key depths (default {MULTIKEY_DEPTHS})")
    ap.add_argument("--ppl-windows", type=int, default=None, help=f"4K perplexity windows (default {PPL_WINDOWS})")
    ap.add_argument("--ppl-len", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {','.join(TASKS)}")
    ap.add_argument("--seed", type=int, default=SEED,
                    help=f"seed of the prompts: keys, essay offsets, distractor depths (default {SEED}); another "
                         "seed gives a held-out prompt set, to check a default chosen on the default one")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="model dtype of every engine (default float32; bfloat16 runs the bf16 kernels, e.g. the "
                         "AVX512-BF16 path where the CPU has it)")
    ap.add_argument("--kv", type=_kv_option, action="append", default=[], metavar="KEY=VALUE",
                    help="a kv_compress option for every policy run (repeatable), e.g. h2o_kernel=1 to measure "
                         "what a default that departs from a paper's reference buys")
    ap.add_argument("--no-full", action="store_true",
                    help="skip the full-cache run (ablations compare against a grid that has it)")
    ap.add_argument("--out-dir", type=Path, default=None, help="where results go (default docs/results; "
                                                               f"--quick: {QUICK_OUT_DIR})")
    ap.add_argument("--quick", action="store_true",
                    help="tiny grid for smoke testing: retention 0.25, 1K prompts, 3 passkey depths, "
                         "1 multi-key depth, one 1K perplexity window (explicit options still win)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the configurations already in <out-dir>/quality.json (same grid) and run the rest")
    ap.add_argument("--notes", type=Path, default=None,
                    help="Markdown file whose paragraphs go to the report's Notes section")
    ap.add_argument("--render", action="store_true",
                    help="only re-render quality.md and the plots from <out-dir>/quality.json (with --notes)")
    ap.add_argument("--verbose", action="store_true", help="show vLLM's logs")
    ap.add_argument("--worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return args
    q = QUICK if args.quick else {}
    args.policies = args.policies or POLICIES
    args.retentions = args.retentions or q.get("retentions", RETENTIONS)
    args.lengths = args.lengths or q.get("lengths", LENGTHS)
    args.depths = args.depths if args.depths is not None else q.get("depths", PASSKEY_DEPTHS)
    args.multikey_depths = (args.multikey_depths if args.multikey_depths is not None
                            else q.get("multikey_depths", MULTIKEY_DEPTHS))
    args.ppl_windows = args.ppl_windows if args.ppl_windows is not None else q.get("ppl_windows", PPL_WINDOWS)
    args.ppl_len = args.ppl_len or q.get("ppl_len", PPL_LEN)
    args.out_dir = args.out_dir or (QUICK_OUT_DIR if args.quick else Path("docs/results"))
    args.tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    args.kv = dict(args.kv)
    for p in args.policies:
        try:
            KVCompressConfig(**kv_settings(p, 0.25, args.kv))
        except ValueError as e:
            ap.error(str(e))
    for t in args.tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t!r}")
    if max(args.lengths) + MULTIKEY_MAX_TOKENS > MAX_MODEL_LEN or args.ppl_len + 1 > MAX_MODEL_LEN:
        ap.error(f"prompts must fit the engine's max_model_len {MAX_MODEL_LEN}")
    return args


def build_all_prompts(args) -> tuple[dict, Any]:
    from transformers import AutoTokenizer

    from vllm_kvcompress.assets import essays_text, model_path

    tok = AutoTokenizer.from_pretrained(str(model_path()))
    hay = Haystack(tok, essays_text())
    prompts = dict(
        passkey=(passkey_prompts(hay, args.lengths, depth_grid(args.depths), seed=args.seed)
                 if "passkey" in args.tasks else []),
        passkey_once=(passkey_prompts(hay, args.lengths, depth_grid(args.depths), seed=args.seed,
                                      needle=PASSKEY_ONCE_NEEDLE, task="passkey_once")
                      if "passkey_once" in args.tasks else []),
        multikey=(multikey_prompts(hay, args.lengths, mid_depth_grid(args.multikey_depths), seed=args.seed)
                  if "multikey" in args.tasks else []),
        ppl=(ppl_windows(hay, args.ppl_windows, args.ppl_len, seed=args.seed)
             if "ppl" in args.tasks and args.ppl_windows else []),
    )
    return prompts, hay


def _grid_key(meta: dict) -> dict:
    """What must match for runs of an earlier result to be reused (--resume)."""
    return {k: meta.get(k) for k in ("lengths", "passkey_depths", "multikey_depths", "ppl_windows", "seed", "engine",
                                     "prompt_format", "kv_options")}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return _worker_main(*args.worker)
    jpath = args.out_dir / "quality.json"
    notes = args.notes.read_text().strip() if args.notes else ""
    if args.render:  # re-render the Markdown / plots of an existing result (e.g. with --notes)
        result = json.loads(jpath.read_text())
        if args.notes:
            result["meta"]["notes"] = notes
        paths = write_outputs(result, args.out_dir)
        print(f"re-rendered {', '.join(str(p) for p in paths)}")
        return 0
    t0 = time.perf_counter()
    from vllm_kvcompress.assets import MODEL_NAME

    prompts, _ = build_all_prompts(args)
    meta = dict(
        # the command that reproduces the whole result in one go (--resume only changes how it was reached)
        command=shlex.join(["python", "-m", "vllm_kvcompress.eval", "quality", *(a for a in argv if a != "--resume")]),
        date=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        machine=f"{os.cpu_count()} CPU cores ({platform.machine()}), vLLM CPU build",
        model=MODEL_NAME, seed=args.seed, runtime_s=0.0,
        policies=list(args.policies), retentions=list(args.retentions), lengths=list(args.lengths),
        passkey_depths=depth_grid(args.depths) if {"passkey", "passkey_once"} & set(args.tasks) else [],
        multikey_depths=mid_depth_grid(args.multikey_depths) if "multikey" in args.tasks else [],
        ppl_windows=[dict(offset=w["offset"], tokens=len(w["ids"])) for w in prompts["ppl"]],
        engine=dict(retrieval=engine_kwargs("full", 1.0, "retrieval", dtype=args.dtype),
                    ppl=engine_kwargs("full", 1.0, "ppl", dtype=args.dtype)),
        **({"kv_options": args.kv} if args.kv else {}),
        prompt_format=dict(passkey=[PASSKEY_PREFIX, PASSKEY_NEEDLE, PASSKEY_QUESTION],
                           passkey_once=[PASSKEY_PREFIX, PASSKEY_ONCE_NEEDLE, PASSKEY_QUESTION],
                           multikey=[MULTIKEY_PREFIX, MULTIKEY_NEEDLE, MULTIKEY_QUESTION]),
        setup=setup_notes(args), notes=notes,
    )
    done: list[dict] = []
    prior_s = 0.0
    if args.resume and jpath.exists():
        old = json.loads(jpath.read_text())
        if _grid_key(old["meta"]) == _grid_key(json.loads(json.dumps(meta))):
            done = old["runs"]
            prior_s = float(old["meta"].get("runtime_s", 0.0))
            print(f"--resume: reusing {len(done)} configuration(s) from {jpath}")
        else:
            print(f"--resume: {jpath} was made with other settings; starting afresh")

    def save(runs, final=False):
        meta["runtime_s"] = round(prior_s + time.perf_counter() - t0, 1)
        meta["complete"] = final
        result = dict(meta=meta, runs=runs)
        return write_outputs(result, args.out_dir) if final else _write_json(result, args.out_dir)

    runs = run_grid(args, prompts, done=done, on_run=save)
    paths = save(runs, final=True)
    print(f"\nwrote {', '.join(str(p) for p in paths)} in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


def setup_notes(args) -> list[str]:
    n_pk = len(args.lengths) * args.depths if "passkey" in args.tasks else 0
    n_mk = len(args.lengths) * args.multikey_depths if "multikey" in args.tasks else 0
    return [
        f"**passkey** ({n_pk} prompts): a random 5-digit key, needle `{PASSKEY_NEEDLE.strip()}`, at "
        f"{args.depths} evenly spaced depths (0% = right after the instruction, 100% = right before the question) x "
        f"lengths {', '.join(map(str, args.lengths))} tokens (SmolLM2 tokenizer, within a few tokens) of essay text "
        f"from a random offset; prompt ends `{PASSKEY_QUESTION.strip()}`; greedy, {PASSKEY_MAX_TOKENS} new tokens; "
        "correct if the key appears in the output.",
        f"**passkey (once)** ({len(args.lengths) * args.depths if 'passkey_once' in args.tasks else 0} prompts): "
        f"the same keys, depths and essay text with the key stated exactly once, needle "
        f"`{PASSKEY_ONCE_NEEDLE.strip()}`; scored the same way. Later copies of a repeated key attend to the first, "
        "which accumulated-attention policies reward: this is the fair, hard case.",
        f"**multi-key** ({n_mk} prompts): {MULTIKEY_NUM_KEYS} needles `{MULTIKEY_NEEDLE.strip()}` with distinct words "
        f"and 6-digit values; the queried one at {args.multikey_depths} depth(s) "
        f"({', '.join(f'{d:.0%}' for d in mid_depth_grid(args.multikey_depths))}), the other "
        f"{MULTIKEY_NUM_KEYS - 1} at random depths; prompt ends `{MULTIKEY_QUESTION.strip()}`; "
        f"{MULTIKEY_MAX_TOKENS} new tokens; correct if the first number in the output is the queried value.",
        "Retrieval prompts are prefilled in one step (chunked prefill off, `max_num_batched_tokens` = "
        f"{MAX_MODEL_LEN}): every layer scores the whole prompt, question included, then compacts to its budget; "
        "the first new token (a space) comes from that full prefill, every digit is decoded from the compressed cache.",
        f"**perplexity**: {args.ppl_windows} non-overlapping {args.ppl_len}-token window(s) of essay text (one per "
        f"equal segment of the essays, random offset), `prompt_logprobs` with chunked prefill of {PAGE} tokens "
        f"(`max_num_batched_tokens={PAGE}`, page size {PAGE}), so every chunk attends to the cache as evicted after "
        "the previous chunks. Pooled over windows (mean NLL of all predicted tokens, then exp); \"2nd half\" counts "
        f"only positions >= {args.ppl_len // 2}, where every retention <= 0.5 is already evicting.",
        f"Engines: `LLM(model, dtype='{args.dtype}', enforce_eager=True, kv_cache_memory_bytes={KV_BYTES}, "
        f"max_model_len={MAX_MODEL_LEN}, seed={SEED}, block_size={PAGE}, ...)` plus "
        "`additional_config={'kv_compress': {'policy': P, 'budget': R}}` (policy defaults otherwise); each "
        "(configuration, engine) runs in its own subprocess.",
        "Essay text comes from `vllm_kvcompress.assets.essays_text()` at run time; prompts use fixed seeds, so every "
        "configuration sees exactly the same token ids.",
    ]


if __name__ == "__main__":
    sys.exit(main())
