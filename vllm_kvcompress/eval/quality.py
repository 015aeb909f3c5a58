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

from __future__ import annotations

import argparse
import datetime as _dt
import dataclasses
import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vllm_kvcompress.config import KVCompressConfig, variant_settings
from vllm_kvcompress.eval.prompts import (
    MULTIKEY_NEEDLE, MULTIKEY_NUM_KEYS, MULTIKEY_QUESTION, PASSKEY_NEEDLE, PASSKEY_ONCE_NEEDLE,
    PASSKEY_PREFIX, PASSKEY_QUESTION, MULTIKEY_PREFIX, PPL_LEN, SEED, SUMMARY_INSTRUCTION, SUMMARY_TOKENS, Haystack,
    depth_grid, mid_depth_grid, multikey_prompts, passkey_prompts, ppl_windows, summary_prompts)
from vllm_kvcompress.eval.report import GENERATION_TASKS, RETRIEVAL_TASKS, TASKS, label, write_json, write_outputs
from vllm_kvcompress.eval.scoring import (identical_prefix, rouge_l, score_multikey, score_passkey, summarize,
                                          summarize_agreement, summarize_ppl)

# ----------------------------------------------------------------------------- defaults
POLICIES = ("h2o", "pyramid", "snapkv", "streaming")
#: --policies also accepts pyramid+drop and pyramid+drop@LAYER (config.variant_settings: pyramid
#: with prefill_drop; deeper layers compute only their kept tokens when a prompt is prefilled in
#: one step; the chunked perplexity runs never drop)
RETENTIONS = (0.5, 0.25, 0.125)
LENGTHS = (1024, 2048, 4096, 8000)
#: vLLM's chunked prefill as `vllm serve` runs it on CPU: at most this many tokens per step
#: (--chunk; 0 prefills each retrieval prompt in one step)
CHUNK = 2048
SUMMARY_LENGTHS = (2048, 4096)
SUMMARY_PROMPTS = 4
PASSKEY_DEPTHS = 10
MULTIKEY_DEPTHS = 5
PPL_WINDOWS = 4
PAGE = 32  # the plugin's default page size when compressing; vanilla gets it too
MAX_MODEL_LEN = 8192  # the model's context
KV_BYTES = 1 << 30
PASSKEY_MAX_TOKENS = 8
MULTIKEY_MAX_TOKENS = 10

QUICK = dict(retentions=(0.25,), lengths=(1024,), depths=3, multikey_depths=1, ppl_windows=1, ppl_len=1024)
QUICK_OUT_DIR = Path(tempfile.gettempdir()) / "vllm-kvcompress-quality-quick"


# ----------------------------------------------------------------------------- engine side (worker subprocess)
def engine_kwargs(policy: str, retention: float, kind: str, options: dict | None = None,
                  dtype: str = "float32", chunk: int = CHUNK) -> dict:
    """``LLM(...)`` keywords of one engine: ``kind`` "retrieval" (every generation task) runs
    vLLM's chunked prefill at ``chunk`` tokens per step as a server does (0: each prompt in one
    step), "ppl" at the page size with ``prompt_compaction: per-chunk`` (a prompt compacted
    once would hold every token until its end, and prompt_logprobs would measure nothing)."""
    # Prefix caching off: the prompts of one length share the haystack before the needle, so
    # with the cache on a prompt's pages would come from another prompt of the set, and H2O's
    # answers (its cached prefix's own votes are not recomputed on a hit, docs/serving.md)
    # would depend on which prompt ran first. Each prompt is measured on its own.
    kw: dict[str, Any] = dict(dtype=dtype, enforce_eager=True, kv_cache_memory_bytes=KV_BYTES,
                              max_model_len=MAX_MODEL_LEN, seed=SEED, block_size=PAGE,
                              enable_prefix_caching=False)
    options = dict(options or {})
    if kind == "ppl":
        kw.update(max_num_batched_tokens=PAGE, enable_chunked_prefill=True)
        options["prompt_compaction"] = "per-chunk"
    elif chunk:
        kw.update(max_num_batched_tokens=chunk, enable_chunked_prefill=True)
    else:  # each prompt is prefilled in one step
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
        for task in GENERATION_TASKS:
            items = job.get(task)
            if not items:
                continue
            t = time.perf_counter()
            if task == "summary":  # long answers: exactly SUMMARY_TOKENS tokens each
                sp = SamplingParams(temperature=0.0, max_tokens=SUMMARY_TOKENS, min_tokens=SUMMARY_TOKENS, seed=SEED)
            else:
                sp = SamplingParams(temperature=0.0, max_tokens=MULTIKEY_MAX_TOKENS
                                    if task in ("multikey", "distractor") else PASSKEY_MAX_TOKENS, seed=SEED)
            res = llm.generate([{"prompt_token_ids": it["ids"]} for it in items], sp,
                               use_tqdm=_tqdm_factory(f"{tag} {task}"))
            out[task] = [o.outputs[0].text for o in res]
            if task == "summary":
                out["summary_ids"] = [list(o.outputs[0].token_ids) for o in res]
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
        cfg = None
        if policy != "full":  # the resolved settings (policy defaults included) this run used
            cfg = KVCompressConfig(**kv_settings(policy, retention, args.kv))
            run["kv_compress"] = dataclasses.asdict(cfg)
        t0 = time.perf_counter()
        jobs = []
        if any(prompts.get(t) for t in GENERATION_TASKS):
            jobs.append(dict(tag=tag, engine=engine_kwargs(policy, retention, "retrieval", args.kv, args.dtype,
                                                           args.chunk),
                             **{t: [dict(ids=it["ids"]) for it in prompts.get(t, [])] for t in GENERATION_TASKS}))
        if prompts["ppl"]:
            jobs.append(dict(tag=tag, engine=engine_kwargs(policy, retention, "ppl", args.kv, args.dtype),
                             ppl=[dict(ids=it["ids"]) for it in prompts["ppl"]], ppl_tail_from=tail_from))
        for job in jobs:
            res = run_in_subprocess(job, verbose=args.verbose)
            kind = "ppl" if "ppl" in job else "retrieval"
            for k, v in res["seconds"].items():
                run["seconds"][f"{kind}_{k}" if k == "start" else k] = round(v, 2)
            for task in RETRIEVAL_TASKS:
                score = score_multikey if task in ("multikey", "distractor") else score_passkey
                if task in res:
                    items = []
                    for it, text in zip(prompts[task], res[task]):
                        row = {k: it[k] for k in ("length", "depth", "answer")}
                        row.update(output=text, correct=score(text, it["answer"]), tokens=len(it["ids"]))
                        if cfg is not None:
                            row["held"] = round(held_fraction(cfg, len(it["ids"])), 4)
                        items.append(row)
                    run[task] = dict(summarize(items), items=items)
            if "summary" in res:
                run["summary"] = dict(items=[dict(length=it["length"], tokens=len(it["ids"]), output=text, ids=ids,
                                                  **({"held": round(held_fraction(cfg, len(it["ids"])), 4)}
                                                     if cfg is not None else {}))
                                             for it, text, ids in zip(prompts["summary"], res["summary"],
                                                                      res["summary_ids"])])
                agree_with_full(run, next((r for r in runs if r["policy"] == "full"), None))
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


def held_fraction(cfg: KVCompressConfig, prompt_len: int) -> float:
    """The retention a request actually holds right after its prompt: the mean over layers of
    the tokens kept (``retained_count``: a layer keeps its budget plus the compaction slack,
    ``(P - B) % compress_interval``) over the prompt length."""
    from vllm_kvcompress.policies import layer_budgets, retained_count

    budgets = layer_budgets(cfg, num_layers(), prompt_len)
    held = [retained_count(prompt_len, b, cfg.compress_interval, **cfg.retention_args(prompt_len)) for b in budgets]
    return float(np.mean(held)) / prompt_len


@functools.lru_cache(maxsize=1)
def num_layers() -> int:
    from transformers import AutoConfig

    from vllm_kvcompress.assets import model_path

    return int(AutoConfig.from_pretrained(str(model_path())).num_hidden_layers)


def agree_with_full(run: dict, full: dict | None) -> None:
    """Score a run's long answers against the full cache's own answers to the same prompts:
    identical prefix (tokens) and ROUGE-L F1 (``scoring.rouge_l``)."""
    if "summary" not in run or full is None or "summary" not in full:
        return
    items = run["summary"]["items"]
    for it, ref in zip(items, full["summary"]["items"]):
        it.update(prefix=identical_prefix(it["ids"], ref["ids"]), rouge_l=round(rouge_l(it["ids"], ref["ids"]), 4),
                  tokens_out=len(ref["ids"]))
    run["summary"].update(summarize_agreement(items))


def _one_line(run: dict) -> str:
    parts = [f"{label(run['policy'], run['retention']):16s}"]
    if "passkey" in run:
        parts.append(f"passkey {run['passkey']['acc']:.0%}")
    if "passkey_once" in run:
        parts.append(f"passkey once {run['passkey_once']['acc']:.0%}")
    if "distractor" in run:
        parts.append(f"distractor {run['distractor']['acc']:.0%}")
    if "multikey" in run:
        parts.append(f"multikey {run['multikey']['acc']:.0%}")
    if "summary" in run and "rouge_l" in run["summary"]:
        parts.append(f"summary prefix {run['summary']['prefix']:.0f} tok, ROUGE-L {run['summary']['rouge_l']:.2f}")
    if "ppl" in run:
        parts.append(f"ppl {run['ppl']['ppl']:.3f}")
    parts.append(f"({run['seconds']['total']:.0f} s)")
    return "  ".join(parts)

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
    ap.add_argument("--lengths", type=_ints, default=None,
                    help=f"retrieval prompt lengths in tokens (default {','.join(map(str, LENGTHS))})")
    ap.add_argument("--chunk", type=int, default=CHUNK,
                    help=f"vLLM's chunked prefill: at most this many tokens per step, as `vllm serve` runs on CPU "
                         f"(default {CHUNK}); 0 prefills each prompt in one step (chunked prefill off)")
    ap.add_argument("--summary-lengths", type=_ints, default=SUMMARY_LENGTHS,
                    help=f"summary task: essay prompt lengths (default {','.join(map(str, SUMMARY_LENGTHS))})")
    ap.add_argument("--summary-prompts", type=int, default=SUMMARY_PROMPTS,
                    help=f"summary task: prompts per length (default {SUMMARY_PROMPTS})")
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
    if args.chunk < 0:
        ap.error(f"--chunk must be >= 0 (0: one step per prompt), got {args.chunk}")
    if (max(args.lengths) + MULTIKEY_MAX_TOKENS > MAX_MODEL_LEN or args.ppl_len + 1 > MAX_MODEL_LEN
            or max(args.summary_lengths) + SUMMARY_TOKENS + 64 > MAX_MODEL_LEN):
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
        distractor=(multikey_prompts(hay, args.lengths, depth_grid(args.depths), num_keys=2, seed=args.seed,
                                     task="distractor") if "distractor" in args.tasks else []),
        summary=(summary_prompts(hay, args.summary_lengths, args.summary_prompts, seed=args.seed)
                 if "summary" in args.tasks else []),
        ppl=(ppl_windows(hay, args.ppl_windows, args.ppl_len, seed=args.seed)
             if "ppl" in args.tasks and args.ppl_windows else []),
    )
    return prompts, hay


def _grid_key(meta: dict) -> dict:
    """What must match for runs of an earlier result to be reused (--resume)."""
    return {k: meta.get(k) for k in ("lengths", "passkey_depths", "multikey_depths", "ppl_windows", "seed", "engine",
                                     "prompt_format", "kv_options", "summary_lengths", "tasks")}


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
        date=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"), commit=_commit(),
        machine=f"{os.cpu_count()} CPU cores ({platform.machine()}), vLLM CPU build",
        model=MODEL_NAME, seed=args.seed, runtime_s=0.0,
        policies=list(args.policies), retentions=list(args.retentions), lengths=list(args.lengths),
        tasks=list(args.tasks), chunk=args.chunk,
        summary_lengths=list(args.summary_lengths) if "summary" in args.tasks else [],
        passkey_depths=depth_grid(args.depths) if {"passkey", "passkey_once", "distractor"} & set(args.tasks) else [],
        multikey_depths=mid_depth_grid(args.multikey_depths) if "multikey" in args.tasks else [],
        ppl_windows=[dict(offset=w["offset"], tokens=len(w["ids"])) for w in prompts["ppl"]],
        engine=dict(retrieval=engine_kwargs("full", 1.0, "retrieval", dtype=args.dtype, chunk=args.chunk),
                    ppl=engine_kwargs("full", 1.0, "ppl", dtype=args.dtype)),
        **({"kv_options": args.kv} if args.kv else {}),
        prompt_format=dict(passkey=[PASSKEY_PREFIX, PASSKEY_NEEDLE, PASSKEY_QUESTION],
                           passkey_once=[PASSKEY_PREFIX, PASSKEY_ONCE_NEEDLE, PASSKEY_QUESTION],
                           multikey=[MULTIKEY_PREFIX, MULTIKEY_NEEDLE, MULTIKEY_QUESTION],
                           distractor=[MULTIKEY_PREFIX, MULTIKEY_NEEDLE, MULTIKEY_QUESTION],
                           summary=[SUMMARY_INSTRUCTION]),
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
        return write_outputs(result, args.out_dir) if final else write_json(result, args.out_dir)

    runs = run_grid(args, prompts, done=done, on_run=save)
    paths = save(runs, final=True)
    print(f"\nwrote {', '.join(str(p) for p in paths)} in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


def _commit() -> str | None:
    """The code's git commit (``-dirty`` with uncommitted changes), None outside a checkout."""
    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


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
        f"**distractor** ({len(args.lengths) * args.depths if 'distractor' in args.tasks else 0} prompts): the "
        f"multi-key needle stated once for the queried word at {args.depths} evenly spaced depths and once for a "
        "second word (a distractor fact of the same shape) at a random depth; scored as multi-key.",
        f"**summary** ({len(args.summary_lengths) * args.summary_prompts if 'summary' in args.tasks else 0} "
        f"prompts): the chat template around `{SUMMARY_INSTRUCTION.splitlines()[0]}` and an essay excerpt, prompts of "
        f"{', '.join(map(str, args.summary_lengths))} tokens; greedy, exactly {SUMMARY_TOKENS} new tokens "
        "(`min_tokens` = `max_tokens`). Each answer is scored against the full cache's answer to the same prompt: "
        "the identical prefix in tokens, and ROUGE-L F1 over tokens (longest common subsequence), which still "
        "credits an answer that diverged by a word but goes on to say the same things in the same order.",
        (f"Generation prompts are prefilled as `vllm serve` does on CPU: chunked prefill on, at most {args.chunk} "
         "tokens per step (`max_num_batched_tokens`; several prompts share a step). A prompt longer than a step is "
         "split, and with the default `prompt_compaction: once` each layer keeps the prompt until its last chunk, "
         "then compacts once with the question's votes; the answer is decoded from the compressed cache. "
         "vLLM's prefix cache is off: the prompts of one length share the haystack before the needle, and each "
         "is measured on its own."
         if args.chunk else
         "Generation prompts are prefilled in one step (chunked prefill off, `max_num_batched_tokens` = "
         f"{MAX_MODEL_LEN}): every layer scores the whole prompt, question included, then compacts to its budget; "
         "the first new token (a space) comes from that full prefill, every digit is decoded from the compressed "
         "cache."),
        "Retention *held* is what a request actually keeps right after its prompt, the mean over layers and prompts "
        "of retained tokens over prompt tokens: a layer keeps its budget plus the compaction slack "
        "(`(P - B) % compress_interval`), so it sits above the nominal retention.",
        f"**perplexity**: {args.ppl_windows} non-overlapping {args.ppl_len}-token window(s) of essay text (one per "
        f"equal segment of the essays, random offset), `prompt_logprobs` with chunked prefill of {PAGE} tokens "
        f"(`max_num_batched_tokens={PAGE}`, page size {PAGE}), so every chunk attends to the cache as evicted after "
        "the previous chunks (`prompt_compaction: per-chunk`: compacted once, a prompt would keep every token until "
        "its end). Pooled over windows (mean NLL of all predicted tokens, then exp); \"2nd half\" counts "
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

