"""Per-step cost breakdown (issue #18): where an engine step's time goes, for vanilla
vLLM and each policy, on a prefill-only and a decode workload, on whatever CPU runs it.

Engines are offline ``vllm.LLM`` objects run one after the other in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with the plugin's step-cost counters on
(``VLLM_KVCOMPRESS_STEP_COSTS=1``, ``vllm_kvcompress.integration.step_costs``), so
the bench reads the worker's counters directly. ``LLMEngine.step`` is wrapped to
time whole engine steps; each step is filed under the kind its attention-metadata
builder saw (*prefill*: any request with more than one new token, mixed steps
included; *decode*: one new token per request).

Columns (ms per engine step of the table's kind, and / vanilla's total step time):

* *attn plain*: vLLM's CPU attention on layers that do not compress (vanilla: every
  layer; the plugin's CPU backend class also serves policy none);
* *attn compr*: vLLM's attention on compressed layers (prefill where
  ``step_plan.fuse_prefill`` does not pick our kernel, and decode when the fused kernel
  is off);
* *fused decode*: ``ops.decode_attention_scores`` (attention + scores, pure decode);
* *fused prefill*: ``ops.prefill_attention_scores`` (attention + scores of the other
  steps, where ``step_plan.fuse_prefill`` picks it);
* *scoring*: ``ops.window_scores``; *selection*: ``read_scores`` + the policy's
  ``compress_step``; *compaction*: ``ops.compact_windows``; *cache write*: the KV write;
* *metadata*: the plugin's builder work (our ``build`` minus vLLM's own ``build``
  inside it);
* *rest*: step time minus all of the above: model matmuls, sampling, scheduling,
  vLLM's own metadata build, output processing, Python.

Workloads: *prefill* = ``--num-prompts`` prompts of ``--prompt-tokens`` essay tokens,
``max_tokens=1`` (table: prefill steps); *decode* = the same prompts,
``--output-tokens`` out with ``ignore_eos`` (table: decode steps; its prefill steps
are in the JSON). Each engine first runs one warm-up request (another prompt);
prefix caching is off.

Engine settings are ``bench_throughput.py``'s (``Runner.engine_flags``: eager,
explicit ``--kv-cache-memory-bytes``, max model len, seed 0, page 32); ``--dtype auto``
picks bfloat16 where the CPU has avx512_bf16/amx_bf16 (``benchmarks/machine.py``).

    python benchmarks/bench_step_costs.py                 # SmolLM2-135M, 4 x 1024 tokens, 64 out
    python benchmarks/bench_step_costs.py --model DIR --num-prompts 2 --prompt-tokens 256 --output-tokens 16
    python benchmarks/bench_step_costs.py --amx-ab        # each policy on "amx" pages, then on "vec" pages

``--amx-ab`` (issue #28) runs each policy twice, ``VLLM_KVCOMPRESS_CPU_AMX=1`` (compressed
layers keep vLLM's "amx" pages and its AMX prefill attention where vLLM picks them) then
``=0`` ("vec" pages, our dot-path kernels): on an AMX CPU the two rows say where the time
goes on each layout. The *pages* column is what the engine's attention layers actually
use (their ``isa``); on a CPU without AMX both runs say "vec" (vLLM never picks "amx").

Writes ``step_costs.{json,md}`` under ``--out-dir``.
"""

from __future__ import annotations

import os

# before vLLM or the plugin is imported: counters on, engines in this process
os.environ["VLLM_KVCOMPRESS_STEP_COSTS"] = "1"
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import machine  # noqa: E402
from bench_throughput import MIB, Runner, csv_list, parse_bytes  # noqa: E402

REPO = HERE.parent
AMX_ENV = "VLLM_KVCOMPRESS_CPU_AMX"  # read when an engine's attention builders are made: switchable per engine
COLUMNS = [("attn plain", "attention_plain"), ("attn compr", "attention"), ("fused decode", "fused_decode"),
           ("fused prefill", "fused_prefill"),
           ("scoring", "scoring"), ("selection", "selection"), ("compaction", "compaction"),
           ("cache write", "cache_write"), ("metadata", "metadata_plugin"), ("rest", "rest")]


def engine_kwargs(args) -> dict:
    """``bench_throughput``'s engine flags as ``vllm.LLM`` keyword arguments."""
    flags = Runner(SimpleNamespace(dtype=args.dtype, max_model_len=args.max_model_len, kv_bytes=args.kv_bytes,
                                   block_size=args.block_size, cpu_bind=None), Path(".")).engine_flags()
    kw: dict = {}
    i = 0
    while i < len(flags):
        key = flags[i].lstrip("-").replace("-", "_")
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            val = flags[i + 1]
            kw[key] = int(val) if val.isdigit() else val
            i += 2
        else:
            kw[key] = True
            i += 1
    return kw


def make_prompts(model_dir: str, n: int, length: int) -> list[list[int]]:
    """``n`` disjoint runs of ``length`` essay tokens (token ids: exact lengths)."""
    from transformers import AutoTokenizer

    from vllm_kvcompress.assets import essays_text

    ids = AutoTokenizer.from_pretrained(model_dir)(essays_text()).input_ids
    if n * length > len(ids):
        raise SystemExit(f"{n} x {length} tokens > the essays' {len(ids)} tokens")
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def worker_threads(vllm_config, requested: int | None) -> tuple[int, str]:
    """The OpenMP thread count of the in-process worker: ``requested``, or what vLLM's
    multiprocess executor gives its worker (``OMPProcessManager``: the cores of
    ``VLLM_CPU_OMP_THREADS_BIND``, by default every core of the NUMA node but the
    ones reserved for the front end; 1 on a 2-core machine). In-process, vLLM's
    worker blocks ``torch.set_num_threads`` before vLLM's own "reduce to 1 thread"
    runs, so the engine would otherwise keep torch's default (every core): on a
    busy machine each OpenMP region then waits for a preempted thread (~ms)."""
    import torch

    if requested:
        n, why = requested, "--threads"
    else:
        try:
            from vllm.utils.ompmultiprocessing import OMPProcessManager

            mgr = OMPProcessManager(vllm_config)
            n = len(mgr.cpu_lists[0]) if not mgr.skip_setup and mgr.cpu_lists else torch.get_num_threads()
            bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
            why = f"vLLM's worker binding (VLLM_CPU_OMP_THREADS_BIND={bind})"
        except Exception as e:  # noqa: BLE001
            n, why = torch.get_num_threads(), f"torch default ({e!r})"
    torch._C.set_num_threads(n)  # torch.set_num_threads is vLLM's no-op stub once its worker is up
    return torch.get_num_threads(), why


def page_layout(llm) -> str:
    """The KV page layout of the engine's attention layers (vLLM's CPU ``isa`` each layer
    was given, ``VLLM_KVCOMPRESS_CPU_AMX`` applied), e.g. ``vec`` or ``amx x24, vec x6``."""
    from collections import Counter

    try:
        ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
        isas = Counter(str(m.isa) for m in ctx.values() if hasattr(m, "isa"))
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        return f"unknown ({type(e).__name__})"
    if not isas:
        return "unknown"
    return next(iter(isas)) if len(isas) == 1 else ", ".join(f"{k} x{n}" for k, n in sorted(isas.items()))


def run_engine(label: str, model: str, kw: dict, kv: dict | None, prompts, warm, args,
               env: dict[str, str] | None = None) -> dict:
    """One engine's workloads; ``env``: environment variables set while it runs (restored after)."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        return _run_engine(label, model, kw, kv, prompts, warm, args, env)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_engine(label: str, model: str, kw: dict, kv: dict | None, prompts, warm, args, env) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_kvcompress.integration import step_costs

    t0 = time.time()
    llm = LLM(model, **kw, **({"additional_config": {"kv_compress": kv}} if kv else {}))
    threads, why = worker_threads(llm.llm_engine.vllm_config, args.threads)
    pages = page_layout(llm)
    print(f"[{label}] engine up in {time.time() - t0:.0f}s; {threads} OpenMP thread(s): {why}; "
          f"attention pages: {pages}", flush=True)
    engine = llm.llm_engine
    inner = engine.step

    def step():
        with step_costs.step():
            return inner()

    engine.step = step
    sched = llm.llm_engine.vllm_config.scheduler_config
    out = {"label": label, "kv_compress": kv, "env": dict(env or {}), "pages": pages,
           "omp_threads": threads, "omp_threads_from": why,
           "max_num_batched_tokens": sched.max_num_batched_tokens,
           "async_scheduling": bool(getattr(sched, "async_scheduling", False)), "workloads": {}}
    try:
        llm.generate([{"prompt_token_ids": warm}], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                     use_tqdm=False)
        for wl, max_tokens in (("prefill", 1), ("decode", args.output_tokens)):
            sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            step_costs.reset()
            t1 = time.perf_counter()
            res = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            wall = time.perf_counter() - t1
            snap = step_costs.snapshot()
            n_out = sum(len(r.outputs[0].token_ids) for r in res)
            kinds = {k: step_costs.per_kind(snap, k) for k in snap}
            steps_s = sum(v["step"] for v in kinds.values())
            out["workloads"][wl] = {"wall_s": wall, "output_tokens": n_out, "per_kind": kinds, "raw": snap,
                                    "step_coverage": steps_s / wall if wall else None}
            focus = kinds.get(wl, {})
            print(f"[{label}] {wl}: {wall:.1f}s, {n_out} tokens out, {focus.get('steps', 0)} {wl} steps "
                  f"({1000 * focus.get('step', 0) / max(focus.get('steps', 0), 1):.1f} ms each)", flush=True)
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001
            pass
        del llm, engine
        gc.collect()
    return out


def table(runs: list[dict], wl: str) -> tuple[list[str], list[list[str]]]:
    """Rows of one workload's table (its own kind of step), ms per step and / vanilla's step."""
    base = runs[0]["workloads"][wl]["per_kind"].get(wl)
    base_ms = 1000 * base["step"] / base["steps"] if base and base["steps"] else None
    cols = ["run", "pages", "steps", "step ms"] + [c for c, _ in COLUMNS]
    rows = []
    for r in runs:
        k = r["workloads"][wl]["per_kind"].get(wl)
        if not k or not k["steps"]:
            rows.append([r["label"], r.get("pages", "n/a"), "0"] + ["n/a"] * (len(cols) - 3))
            continue
        per = lambda key: 1000 * k[key] / k["steps"]  # noqa: E731
        cell = lambda ms: f"{ms:.2f} ({ms / base_ms:.2f})" if base_ms else f"{ms:.2f}"  # noqa: E731
        rows.append([r["label"], r.get("pages", "n/a"), str(k["steps"]), cell(per("step"))]
                    + [cell(per(key)) for _, key in COLUMNS])
    return cols, rows


def amx_ab_lines(runs: list[dict]) -> list[str]:
    """What the ``--amx-ab`` pairs ran on: each policy's pages with VLLM_KVCOMPRESS_CPU_AMX=1 and =0."""
    pairs: dict[str, dict[str, str]] = {}
    for r in runs:
        amx = (r.get("env") or {}).get(AMX_ENV)
        if amx is not None:
            pairs.setdefault(r["label"].rsplit(" ", 1)[0], {})[amx] = r.get("pages", "unknown")
    out = []
    for name, by in pairs.items():
        note = ""
        if by.get("1") == by.get("0") == "vec":
            note = " (the same layout: vLLM picks no 'amx' pages on this CPU, so the switch changes nothing here)"
        elif by.get("1") == by.get("0"):
            note = " (the same layout: the switch changed nothing)"
        out.append(f"{AMX_ENV} A/B of {name}: =1 on {by.get('1', 'n/a')} pages, =0 on {by.get('0', 'n/a')} pages"
                   + note)
    return out


def render(cols, rows) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def line(xs):
        return "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(xs, widths)))

    return "\n".join([line(cols)] + [line(r) for r in rows])


def md_table(cols, rows) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from vllm_kvcompress.assets import model_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF checkpoint dir (default: the embedded SmolLM2-135M)")
    ap.add_argument("--policies", type=csv_list(str), default=["pyramid", "h2o"],
                    help="default pyramid,h2o (pyramid+drop = pyramid with prefill_drop)")
    ap.add_argument("--retention", type=float, default=0.25,
                    help="kv budget: a fraction of the prompt in (0, 1), or a whole number of tokens "
                         "(e.g. 4096: nothing evicted)")
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--output-tokens", type=int, default=64, help="decode workload tokens out (64)")
    ap.add_argument("--dtype", default="auto", choices=machine.DTYPES,
                    help="auto: bfloat16 where the CPU has avx512_bf16/amx_bf16 and the model is bf16, else float32")
    ap.add_argument("--kv-bytes", type=parse_bytes, default=256 * MIB, help="--kv-cache-memory-bytes (256MiB)")
    ap.add_argument("--block-size", type=int, default=32, help="page size of every engine (32)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None,
                    help="OpenMP threads of the in-process engine (default: what vLLM's multiprocess worker gets)")
    ap.add_argument("--amx-ab", action="store_true",
                    help=f"run each policy with {AMX_ENV}=1 ('amx' pages where vLLM picks them) and then =0 ('vec' "
                         "pages); on a CPU without AMX both use 'vec' (the pages column says so)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "docs" / "results" / "step_costs")
    args = ap.parse_args(argv)
    model = args.model or str(model_path())
    if args.prompt_tokens + args.output_tokens > args.max_model_len:
        ap.error("--prompt-tokens + --output-tokens must fit --max-model-len")

    from vllm_kvcompress.config import ConfigError, KVCompressConfig
    from vllm_kvcompress.eval.quality import kv_settings

    for p in args.policies:  # bad budgets fail here, in one line, not after the vanilla run
        try:
            KVCompressConfig(**kv_settings(p, args.retention))
        except ConfigError as e:
            raise SystemExit(f"bench_step_costs.py: --retention {args.retention:g} / --policies {p}: {e}") from None

    command = "python benchmarks/bench_step_costs.py" + "".join(" " + shlex.quote(a) for a in argv)
    args.dtype, args.dtype_reason = machine.choose_dtype(args.dtype, model)
    rec = machine.machine_record(args.dtype, args.dtype_reason, model, [args.block_size])
    kw = engine_kwargs(args)
    kw["enable_prefix_caching"] = False  # every workload prefills its prompts in full
    print(f"$ {command}\nmachine: {machine.describe(rec)}\nengine: {kw}", flush=True)
    *prompts, warm = make_prompts(model, args.num_prompts + 1, args.prompt_tokens)

    t_start = time.time()
    runs = [run_engine("vanilla", model, kw, None, prompts, warm, args)]
    van_plain = runs[0]["workloads"]["prefill"]["raw"].get("prefill", {}).get("attention_plain", {}).get("calls", 0)
    if not van_plain:
        print("WARNING: vanilla's attention was not timed (is the plugin's CPU backend serving policy none?)")
    for p in args.policies:
        for amx in ("1", "0") if args.amx_ab else (None,):
            runs.append(run_engine(f"{p} @{args.retention:g}" + (f" {AMX_ENV}={amx}" if amx else ""), model, kw,
                                   kv_settings(p, args.retention), prompts, warm, args,
                                   env={AMX_ENV: amx} if amx else None))

    text, md = [], []
    for wl, title in (("prefill", f"prefill-only ({args.num_prompts} x {args.prompt_tokens} tokens, 1 out): "
                                  "prefill steps"),
                      ("decode", f"decode ({args.num_prompts} x {args.prompt_tokens} tokens, {args.output_tokens} "
                                 "out): decode steps")):
        cols, rows = table(runs, wl)
        text += ["", f"{title}; ms per step (/ vanilla's step ms)", render(cols, rows)]
        md += ["", f"## {title}", "", "ms per step (/ vanilla's total step time)", "", *md_table(cols, rows)]
    ab = amx_ab_lines(runs) if args.amx_ab else []
    print("\n".join(text + ab))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "machine": rec, "model": model, "engine_kwargs": kw,
               "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "runs": runs, "seconds": time.time() - t_start}
    from vllm_kvcompress.portable_paths import portable  # repository-relative paths or <cache>, <out-dir>, <venv>

    dirs = {"out_dir": args.out_dir.absolute()}
    (args.out_dir / "step_costs.json").write_text(json.dumps(portable(payload, **dirs), indent=2, default=str))
    cov = ", ".join(f"{r['label']} {wl} {w['step_coverage']:.0%}" for r in runs for wl, w in r["workloads"].items())
    (args.out_dir / "step_costs.md").write_text(portable("\n".join(
        [f"# Per-step cost breakdown: vanilla vs {', '.join(args.policies)} at retention {args.retention:g}", "",
         f"Model `{Path(model).name}`, {args.dtype} ({args.dtype_reason}), engine {kw}.", "",
         f"Machine: {machine.describe(rec)}.", "", *md[1:], "",
         "Columns: see `benchmarks/bench_step_costs.py`; *rest* = step time - the timed parts (model matmuls, "
         "sampling, scheduling, vLLM's own metadata build, Python). Share of `generate` wall time inside engine "
         f"steps: {cov}.", *(["", *ab] if ab else []), "", "Command:", "", "```bash", command, "```", ""]), **dirs))
    print(f"\n{(time.time() - t_start) / 60:.1f} min; wrote {args.out_dir / 'step_costs.json'}, "
          f"{args.out_dir / 'step_costs.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
