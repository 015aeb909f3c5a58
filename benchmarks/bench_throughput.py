"""Throughput and KV memory against vanilla vLLM at the same KV-cache memory, in one run
(issue #7), with vLLM's own benchmarks (``vllm bench throughput``, ``vllm bench serve``).

Every run is a separate ``vllm bench throughput`` subprocess on the same essay prompts
(Paul Graham essays, chat template applied, 1920 tokens each (within 0.5%), exactly
``--output-len`` output tokens: vLLM's throughput benchmark always sets
``ignore_eos``; the output counts are checked) with the same engine flags::

    --dtype <auto> --enforce-eager --max-model-len 4096 --seed 0
    --kv-cache-memory-bytes 256MiB --block-size 32

``--dtype auto`` (default; issue #18) is the model's native dtype where the CPU
runs it natively (bfloat16 with avx512_bf16 or amx_bf16), float32 otherwise
(``benchmarks/machine.py``); the choice, the reason, the CPU model, its ISA flags
and vLLM's CPU attention ISA are printed and recorded in every result file.

Runs: vanilla vLLM (plugin installed, no policy); each policy with a budget whose
every layer covers prompt + output ("nothing evicted": the plugin's per-stage paging
and attention path with nothing freed; such requests skip scoring since the backend
change of 26b44b8; for pyramid this needs a mean budget of ~2.4x prompt + output); each
policy at each retention (``--kv-budget 0.25`` = 25% of the prompt); and
prefill-only runs (1 output token) of vanilla and of each policy at the first
retention, which bound what any KV saving can buy on this machine (each run by its
own policy's prefill cost). Prints ratios to vanilla (requests/s, output tokens/s, peak running
requests, KV held per running request), pass/fail against the issue's targets and
what bounds the result; writes ``throughput.{json,md}`` under ``--out-dir``.

Running requests and pages per running request come from the plugin's
``VLLM_KVCOMPRESS_STATS_FILE`` (engine-core scheduler counters, also for vanilla);
missing keys are reported as n/a.

Paths in the result files are relative to the repository (``.venv/bin/python``,
``benchmarks/...``) or placeholders: ``<cache>`` for the plugin's cache (the model is
``<cache>/SmolLM2-135M-Instruct``: ``python -m vllm_kvcompress.assets model``),
``<work-dir>`` for ``--work-dir`` (logs, prompts, raw results), ``<out-dir>`` for an
``--out-dir`` outside the repository, ``<venv>`` for a venv outside it
(``vllm_kvcompress.portable_paths``); the console output keeps the real paths.

    python benchmarks/bench_throughput.py                        # main table, ~35 min
    python benchmarks/bench_throughput.py --no-main --scaling    # vs prompt length / retention + PNGs, ~35 min
    python benchmarks/bench_throughput.py --no-main --online     # vllm serve + vllm bench serve: TTFT/TPOT, ~10 min
    python benchmarks/bench_throughput.py --quick                # smoke test of the main table, ~5 min

(durations estimated from runs on the shared 2-core machine; vLLM's CPU backend
computes on one core, the other is reserved for its front end.) ``--scaling`` and
``--online`` add to the main table unless ``--no-main``; each mode writes its own
files (``throughput_scaling.{json,md}`` + two PNGs, ``online.{json,md}``).

Page size: vanilla vLLM's CPU default page is 128 tokens, the plugin's default (policy
on) 32; ``--block-size`` (default 32) forces one page size for every run
(``--block-size 0`` leaves each run its own default) and the report says which was used.

``vllm bench throughput`` in vLLM 0.32 handles ``--dataset-name custom`` (JSONL
prompts) but leaves it out of its argparse choices, ``sharegpt`` drops prompts over
1024 tokens, and vLLM reads custom JSONL with pandas, which the CPU build does not
install; so both benchmarks run through ``benchmarks/vllm_cli_custom_dataset.py``:
the ``vllm`` console entry point with ``custom`` allowed and a json-module reader.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_kvcompress.assets import essays_text, model_path
from vllm_kvcompress.portable_paths import portable

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import machine  # noqa: E402  (the CPU/ISA/dtype record, shared with bench_step_costs.py)

REPO = HERE.parent
VLLM_SHIM = HERE / "vllm_cli_custom_dataset.py"
VLLM = Path(sys.executable).with_name("vllm")
STATS_ENV = "VLLM_KVCOMPRESS_STATS_FILE"
#: the run's directories, for :func:`_portable` (set by main)
_RUN_DIRS: dict = {}
PATHS_NOTE = ("Paths: `<cache>` is the plugin's cache (`python -m vllm_kvcompress.assets model` prints the model's "
              "path), `<work-dir>` the run's `--work-dir` (logs, prompts, raw results); others are relative to the "
              "repository.")


def _portable(value):
    """``value`` with this machine's paths made repository-relative or placeholders (result files)."""
    return portable(value, **_RUN_DIRS)
INSTRUCTION = "\n\nSummarize the text above in a few sentences."
MIB = 1 << 20

# targets of issue #18 (requests/s relative to vanilla, same KV memory): (kind, retention,
# with --kv-prefill-drop, goal); drop None = either
TARGETS = [("retention", 0.25, False, 1.4), ("retention", 0.25, True, 3.0), ("nothing-evicted", None, None, 0.95)]


# --------------------------------------------------------------------------- helpers

def parse_bytes(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*", s, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (e.g. 268435456, 256MiB, 1GiB)")
    num, unit = float(m.group(1)), (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    return int(num * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit])


def fmt_bytes(n: int) -> str:
    return f"{n // MIB}MiB" if n % MIB == 0 else str(n)


def csv_list(typ):
    return lambda s: [typ(x) for x in s.split(",") if x.strip()]


def fmt(v, spec=".2f", na="n/a") -> str:
    return na if v is None else format(v, spec)


def fx(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def model_geometry() -> dict:
    cfg = json.loads((model_path() / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    layers, kv_heads = cfg["num_hidden_layers"], cfg["num_key_value_heads"]
    return {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
            "bytes_per_token_all_layers_fp32": layers * kv_heads * head_dim * 2 * 4}


# --------------------------------------------------------------------------- prompts

_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer
        _TOKENIZER = AutoTokenizer.from_pretrained(str(model_path()))
    return _TOKENIZER


def templated_len(body: str) -> int:
    """Prompt tokens vLLM's custom dataset will send: chat template applied to body + instruction."""
    tok = tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": body + INSTRUCTION}], add_generation_prompt=True,
                                   tokenize=False)
    return len(tok(text).input_ids)


def build_prompts(path: Path, n: int, input_len: int, output_len: int) -> dict:
    """JSONL of ``n`` essay excerpts, each ``input_len`` tokens (-3..0) after the chat template.

    Excerpts start at sentence starts spread evenly over the essays (disjoint while
    ``n * input_len`` fits in the ~154K-token text)."""
    text = essays_text()
    sentence_starts = [m.end() for m in re.finditer(r"[.?!][\"')]?\s+(?=[A-Z])", text)]
    stride = len(text) / n
    chars_per_token = 4.2
    rows, lens = [], []
    for i in range(n):
        target = int(i * stride)
        start = next((s for s in sentence_starts if s >= target), 0)
        # binary search the longest whitespace-cut excerpt whose templated length <= input_len
        lo, hi = 0, min(len(text) - start, int(input_len * chars_per_token * 2))
        best, best_len = "", 0
        while lo <= hi:
            mid = (lo + hi) // 2
            cut = text.rfind(" ", start, start + mid)
            body = text[start:cut if cut > start else start + mid].strip()
            n_tok = templated_len(body)
            if n_tok <= input_len:
                if n_tok > best_len:
                    best, best_len = body, n_tok
                lo = mid + 1
            else:
                hi = mid - 1
            if best_len >= input_len - 3:
                break
        if best_len < input_len - 3 and start > 0:  # ran off the end of the text: wrap
            body = (text[start:] + "\n\n" + text)[: int(input_len * chars_per_token * 2)]
            words = body.split(" ")
            lo, hi = 1, len(words)
            while lo <= hi:
                mid = (lo + hi) // 2
                cand = " ".join(words[:mid])
                n_tok = templated_len(cand)
                if n_tok <= input_len:
                    best, best_len, lo = cand, n_tok, mid + 1
                else:
                    hi = mid - 1
        rows.append({"prompt": best + INSTRUCTION, "output_tokens": output_len})
        lens.append(best_len)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"path": str(path), "num_prompts": n, "target_input_len": input_len, "min_len": min(lens),
            "max_len": max(lens), "mean_len": sum(lens) / len(lens)}


# --------------------------------------------------------------------------- one offline run

class Runner:
    def __init__(self, args, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.datasets: dict[tuple[int, int, int], dict] = {}
        self.count = 0

    def dataset(self, n: int, input_len: int, output_len: int) -> dict:
        key = (n, input_len)  # output_tokens in the file is unused: --custom-output-len sets it
        if key not in self.datasets:
            t0 = time.time()
            info = build_prompts(self.workdir / f"essays_{n}x{input_len}.jsonl", n, input_len, output_len)
            print(f"  prompts: {n} essay excerpts, {info['min_len']}-{info['max_len']} tokens "
                  f"(target {input_len}, chat template included) [{time.time() - t0:.0f}s]", flush=True)
            self.datasets[key] = info
        return self.datasets[key]

    def env_extra(self) -> dict[str, str]:
        return {"VLLM_CPU_OMP_THREADS_BIND": self.args.cpu_bind} if self.args.cpu_bind else {}

    def engine_flags(self, kv_bytes: int | None = None) -> list[str]:
        a = self.args
        flags = ["--dtype", a.dtype, "--enforce-eager", "--max-model-len", str(a.max_model_len), "--seed", "0",
                 "--kv-cache-memory-bytes", str(kv_bytes or a.kv_bytes)]
        if a.block_size:
            flags += ["--block-size", str(a.block_size)]
        return flags

    def throughput(self, label: str, extra: list[str], *, n: int, input_len: int, output_len: int,
                   dataset_n: int | None = None, env: dict[str, str] | None = None,
                   dataset_flags: list[str] | None = None) -> dict:
        """One ``vllm bench throughput`` run on ``n`` prompts (the first ``n`` of the
        ``dataset_n``-prompt file, vLLM's seeded shuffle applied); ``env``: extra environment
        variables of this one subprocess (e.g. ``VLLM_KVCOMPRESS_CPU_AMX=0``: benchmarks/bench_ab.py),
        recorded in the result's ``env`` and ``command``."""
        self.count += 1
        tag = f"{self.count:02d}_" + re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")
        out_json = self.workdir / f"{tag}.json"
        stats_json = self.workdir / f"{tag}.stats.json"
        log = self.workdir / f"{tag}.log"
        if dataset_flags is None:  # the essay prompts (dataset_flags: another of vllm bench's datasets)
            ds = self.dataset(dataset_n or n, input_len, output_len)
            dataset_flags = ["--dataset-name", "custom", "--dataset-path", ds["path"],
                             "--custom-output-len", str(output_len)]
        cmd = [sys.executable, str(VLLM_SHIM), "bench", "throughput", "--model", str(model_path()),
               *dataset_flags, "--num-prompts", str(n), *self.engine_flags(), "--output-json", str(out_json), *extra]
        env_run = {**self.env_extra(), **(env or {})}
        proc_env = dict(os.environ, **env_run, **{STATS_ENV: str(stats_json)})
        shown = " ".join(shlex.quote(c) for c in cmd)
        shown_env = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
        print(f"[{label}] $ {shown_env}{STATS_ENV}={stats_json} {shown}", flush=True)
        t0 = time.time()
        with open(log, "w") as lf:
            proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=proc_env, start_new_session=True)
            sampler = SessionCPU(proc.pid)
            try:
                rc = proc.wait(timeout=self.args.run_timeout)
            except BaseException:
                _kill_group(proc)
                raise
            finally:
                cpu = sampler.stop()
        wall = time.time() - t0
        text = log.read_text(errors="replace")
        if rc != 0 or not out_json.exists():
            tail = "\n".join(text.splitlines()[-25:])
            raise RuntimeError(f"run {label!r} failed (exit {rc}); log {log}:\n{tail}")
        res = json.loads(out_json.read_text())
        m_in = re.search(r"Total num prompt tokens:\s+(\d+)", text)
        m_out = re.search(r"Total num output tokens:\s+(\d+)", text)
        prompt_tokens = int(m_in.group(1)) if m_in else None
        output_tokens = int(m_out.group(1)) if m_out else None
        elapsed = res["elapsed_time"]
        stats = json.loads(stats_json.read_text()) if stats_json.exists() else {}
        m_bs = re.search(r"block_size[=:]\s*(\d+)", text)
        r = {
            "label": label, "extra_flags": extra, "num_prompts": res["num_requests"], "input_len": input_len,
            "output_len": output_len, "elapsed_s": elapsed, "wall_s": wall, "cpu_s": cpu,
            "requests_per_s": res["requests_per_second"],
            "output_tokens_per_s": (output_tokens / elapsed) if output_tokens is not None else None,
            "total_tokens_per_s": res["tokens_per_second"],
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "mean_prompt_tokens": prompt_tokens / res["num_requests"] if prompt_tokens is not None else None,
            "exact_output_len": output_tokens == res["num_requests"] * output_len if output_tokens else None,
            "stats": stats, "log": str(log),
            "command": (" ".join(f"{k}={shlex.quote(v)}" for k, v in env_run.items()) + f" {STATS_ENV}=... {shown}").strip(),
        }
        if env:
            r["env"] = dict(env)
        r.update(self.memory_figures(stats))
        if r["block_size"] is None and m_bs:
            r["block_size"] = int(m_bs.group(1))
        print(f"[{label}] {r['requests_per_s']:.3f} req/s, {fmt(r['output_tokens_per_s'], '.1f')} out tok/s, "
              f"peak running {fmt(r['peak_running'], 'd')}, pages/req {fmt(r['pages_per_req'], '.1f')}, "
              f"prefix-cache hits {fmt(stats.get('prefix_cache_hit_rate'), '.0%')}, "
              f"{elapsed:.0f}s timed, {wall:.0f}s wall, {cpu:.0f} CPU-s", flush=True)
        return r

    def memory_figures(self, stats: dict) -> dict:
        """KV held per running request, from the stats file (None where a key is missing).

        ``pages x block_size`` counts a page as block_size token slots; with a policy on,
        the layers are split over several KV-cache groups, each page holding one group's
        layers only, so the comparable figure is the share of the pool per request
        (``pages / num_blocks``) x the pool's capacity in all-layer token slots."""
        geo = model_geometry()
        elem = 2 if self.args.dtype in ("bfloat16", "float16") else 4  # KV cache dtype = model dtype
        pool_tokens = self.args.kv_bytes // (geo["bytes_per_token_all_layers_fp32"] // 4 * elem)
        pages = stats.get("mean_pages_per_running_req")
        nb, bs = stats.get("num_blocks"), stats.get("block_size")
        share = ratio(pages, nb)
        return {
            "peak_running": stats.get("peak_running_reqs"),
            "mean_running": stats.get("mean_running_reqs"),
            "pages_per_req": pages,
            "block_size": bs,
            "num_blocks": nb,
            "kv_tokens_per_req_pages_x_bs": pages * bs if pages is not None and bs else None,
            "pool_share_per_req": share,
            "kv_token_slots_per_req_all_layers": share * pool_tokens if share is not None else None,
            "kv_capacity_reqs": ratio(nb, pages),  # requests the pool holds at this footprint
            "pool_token_slots_all_layers": pool_tokens,
            "evicted_tokens": stats.get("evicted_tokens"),
            "freed_pages": stats.get("freed_pages"),
            "preemptions": stats.get("preemptions"),
        }


class SessionCPU:
    """CPU seconds (user + system) of every process in a session, sampled from /proc.

    ``getrusage(RUSAGE_CHILDREN)`` misses vLLM's worker process (its parent, the
    engine core, is force-killed at shutdown before reaping it), so the processes of
    the subprocess's session are polled instead; the last sample of each pid counts."""

    def __init__(self, sid: int, every: float = 1.0):
        import threading

        self.sid, self.every, self.seen = sid, every, {}
        self.tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == self.sid:  # session id
                self.seen[int(d)] = (int(fields[11]) + int(fields[12])) / self.tick

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return sum(self.seen.values())


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=20)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def drops(policy: str) -> bool:
    """Whether a policy name runs with ``--kv-prefill-drop`` (``pyramid+drop``, ``pyramid+drop@L``)."""
    from vllm_kvcompress.config import variant_settings

    return bool(variant_settings(policy).get("prefill_drop"))


def policy_flags(policy: str, budget: str) -> list[str]:
    """The engine flags of a policy name (``vllm_kvcompress.config.variant_settings``):
    ``pyramid+drop`` = ``--kv-policy pyramid --kv-prefill-drop`` (deeper layers compute only
    their kept tokens in prefill), ``pyramid+drop@L`` adds ``--kv-prefill-drop-from L``."""
    from vllm_kvcompress.config import variant_settings
    from vllm_kvcompress.integration.cli_args import FLAGS

    try:
        opts = variant_settings(policy)
    except ValueError as e:
        raise SystemExit(f"bench_throughput: {e}") from None
    flag_of = {field: "--" + flag.replace("_", "-") for flag, field in FLAGS.items()}
    flags = ["--kv-policy", opts.pop("policy"), "--kv-budget", budget]
    for field, v in opts.items():
        flags += [flag_of[field]] if v is True else [flag_of[field], str(v)]
    return flags


def nothing_evicted_budget(policy: str, input_len: int, output_len: int) -> str:
    """Smallest ``--kv-budget`` (tokens, the mean over layers) whose *every* layer budget
    covers prompt + output, so nothing is evicted (the backend then skips scoring for
    these requests: this row measures the plugin's paging and attention path).

    For uniform schedules (h2o, snapkv, streaming) that is prompt + output + 64 (as in
    bench_decode_overhead.py); the pyramid schedule gives its deepest layers ~0.42x the
    mean, so its mean budget must be ~2.4x larger. Computed with the plugin's own
    ``layer_budgets``; the ``evicted tok`` column checks it (0 = nothing evicted)."""
    need = input_len + output_len + 64
    try:
        from vllm_kvcompress.config import KVCompressConfig
        from vllm_kvcompress.policies import layer_budgets

        layers = model_geometry()["layers"]

        def ok(b: int) -> bool:
            cfg = KVCompressConfig.from_dict({"policy": policy.partition("+")[0], "budget": b})
            return min(layer_budgets(cfg, layers, input_len)) >= need

        lo, hi = need, need
        while not ok(hi):
            lo, hi = hi, hi * 2
            if hi > 1 << 22:
                return str(need)
        while lo < hi:  # smallest ok budget in [lo, hi]
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
        return str(hi)
    except Exception as e:  # plugin API changed: fall back to the uniform rule
        print(f"  (nothing-evicted budget for {policy}: {e!r}; using {need})")
        return str(need)


# --------------------------------------------------------------------------- main table

def main_table(runner: Runner, args) -> dict:
    n, L, O = args.num_prompts, args.input_len, args.output_len
    runs: list[dict] = []
    t0 = time.time()
    van = runner.throughput("vanilla", [], n=n, input_len=L, output_len=O)
    van["kind"] = "vanilla"
    runs.append(van)
    for p in args.policies:
        if "+" in p:  # a prefill variant: with nothing evicted it is the base policy's run
            continue
        budget = nothing_evicted_budget(p, L, O)
        r = runner.throughput(f"{p} nothing evicted (budget {budget})", policy_flags(p, budget),
                              n=n, input_len=L, output_len=O)
        r.update(kind="nothing-evicted", policy=p, retention=None)
        runs.append(r)
    for ret in args.retentions:
        for p in args.policies:
            r = runner.throughput(f"{p} {ret:.1%}", policy_flags(p, str(ret)),
                                  n=n, input_len=L, output_len=O)
            r.update(kind="retention", policy=p, retention=ret)
            runs.append(r)
    prefill = None
    if not args.no_prefill_bound:
        prefill = runner.throughput("vanilla prefill only (1 output token)", [], n=min(n, args.prefill_prompts),
                                    input_len=L, output_len=1, dataset_n=n)
        prefill["kind"] = "prefill-bound"
    # each policy's own prefill compute (the first retention): what --kv-prefill-drop cuts, and what our
    # prefill kernels cost against vLLM's attention
    prefill_policy = []
    if not args.no_prefill_bound and args.retentions:
        ret = args.retentions[0]
        for p in args.policies:
            r = runner.throughput(f"{p} {ret:.1%} prefill only (1 output token)", policy_flags(p, str(ret)),
                                  n=min(n, args.prefill_prompts), input_len=L, output_len=1, dataset_n=n)
            r.update(kind="prefill-bound", policy=p, retention=ret)
            prefill_policy.append(r)
    for r in runs:
        r["vs_vanilla"] = {k: ratio(r[k], van[k]) for k in
                           ("requests_per_s", "output_tokens_per_s", "peak_running", "mean_running",
                            "pool_share_per_req", "kv_token_slots_per_req_all_layers", "kv_capacity_reqs")}
    return {"runs": runs, "prefill_bound": prefill, "prefill_policy": prefill_policy, "seconds": time.time() - t0,
            "dataset": runner.dataset(n, L, O)}


def policy_prefill(table: dict) -> list[dict]:
    """The policies' prefill-only runs (``prefill_drop``: result files from before every policy had one)."""
    return table.get("prefill_policy") or table.get("prefill_drop") or []


def targets_and_bounds(table: dict, args) -> tuple[list[dict], list[str]]:
    runs = table["runs"]
    van = runs[0]
    checks = []
    for kind, ret, drop, goal in TARGETS:
        sel = [r for r in runs if r.get("kind") == kind and (ret is None or abs(r["retention"] - ret) < 1e-9)
               and (drop is None or drops(r["policy"]) == drop)]
        for r in sel:
            x = r["vs_vanilla"]["requests_per_s"]
            checks.append({"run": r["label"], "metric": "requests/s vs vanilla", "target": f">= {goal:.2f}x",
                           "value": x, "pass": x is not None and x >= goal})
    lines = []
    pre = table.get("prefill_bound")
    n = van["num_prompts"]
    if pre:
        t_pre = pre["elapsed_s"] / pre["num_prompts"]
        cap = 1.0 / t_pre
        lines.append(f"prefill compute: vanilla's prefill-only run takes {t_pre:.2f} s per ~{pre['mean_prompt_tokens'] or 0:.0f}-token "
                     f"prompt on this machine, so a run with vanilla's prefill cost cannot exceed "
                     f"{cap:.3f} req/s = {cap / van['requests_per_s']:.2f}x vanilla (decode free), whatever KV it saves; "
                     f"vanilla spends ~{min(t_pre * n / van['elapsed_s'], 1.0):.0%} of its time on prefill.")
    ceilings = {}
    for d in policy_prefill(table):
        t_d = d["elapsed_s"] / d["num_prompts"]
        ceilings[d["policy"]] = 1.0 / t_d / van["requests_per_s"]
        why = ("deeper layers compute only the tokens they keep" if drops(d["policy"])
               else "every layer computes every prompt token")
        lines.append(f"prefill compute of {d['label'].split(' prefill')[0]}: {t_d:.2f} s per prompt"
                     + (f", {t_d / t_pre:.2f}x vanilla's" if pre else "")
                     + f" ({why}): ceiling {ceilings[d['policy']]:.2f}x vanilla.")
    if van.get("num_blocks") and van.get("block_size"):
        per_req_tokens = van["input_len"] + van["output_len"]
        fit = van["num_blocks"] // math.ceil(per_req_tokens / van["block_size"])
        lines.append(f"admission: {fmt_bytes(args.kv_bytes)} KV = {van['num_blocks']} pages of {van['block_size']} tokens "
                     f"(~{van['pool_token_slots_all_layers']} token slots x {model_geometry()['layers']} layers): "
                     f"vanilla fits {fit} whole request(s) of {per_req_tokens} tokens; peak running "
                     f"{fmt(van['peak_running'], 'd')} (mean {fmt(van['mean_running'], '.1f')}).")
        lines.append("admission with compression: a request is admitted only when the pool has room for its whole "
                     "uncompressed prompt (prefill runs before eviction), so at most 1 + (pool slots - prompt) / "
                     "(KV slots per compressed request) run at once; 'staging bound' below.")
    for r in runs[1:]:
        if r.get("kind") != "retention":
            continue
        pk, sh = r["vs_vanilla"]["peak_running"], r["vs_vanilla"]["pool_share_per_req"]
        rq = r["vs_vanilla"]["requests_per_s"]
        slots, prompt = r.get("kv_token_slots_per_req_all_layers"), r.get("mean_prompt_tokens")
        staging = (1 + int((r["pool_token_slots_all_layers"] - prompt) // slots)
                   if slots and prompt and r["pool_token_slots_all_layers"] > prompt else None)
        capped = r["peak_running"] is not None and r["peak_running"] >= r["num_prompts"]
        lines.append(f"{r['label']}: KV per running request {fx(sh)} vanilla's -> peak running "
                     f"{fmt(r['peak_running'], 'd')} ({fx(pk)}{'; = all prompts: capped by --num-prompts' if capped else ''}"
                     f"; staging bound {fmt(staging, 'd')}, "
                     f"{fmt(r['kv_capacity_reqs'], '.1f')} if prompts were admitted compressed), "
                     f"mean running {fmt(r['mean_running'], '.1f')}; "
                     f"requests/s {fx(rq)}" + (
                         f" (its prefill-only ceiling at {policy_prefill(table)[0]['retention']:.1%}: "
                         f"{ceilings[r['policy']]:.2f}x)" if r["policy"] in ceilings else
                         f" of vanilla's prefill-bound ceiling of "
                         f"{1.0 / (pre['elapsed_s'] / pre['num_prompts']) / van['requests_per_s']:.2f}x"
                         if pre and not drops(r["policy"]) else ""))
    if not van.get("stats"):
        lines.append("stats file: not written (VLLM_KVCOMPRESS_STATS_FILE not supported by this plugin build): "
                     "running-request and page figures are n/a.")
    return checks, lines


def print_table(table: dict, args) -> tuple[str, list, list]:
    runs = table["runs"]
    ds = table["dataset"]
    bs_used = sorted({r.get("block_size") for r in runs if r.get("block_size")})
    hdr = (f"{ds['num_prompts']} essay prompts x {ds['mean_len']:.0f} tokens (chat template incl., "
           f"{ds['min_len']}-{ds['max_len']}) in / {args.output_len} out (ignore_eos), {args.dtype}, eager, "
           f"KV {fmt_bytes(args.kv_bytes)}, page size "
           f"{args.block_size if args.block_size else 'per-run default'} (used: {', '.join(map(str, bs_used)) or 'n/a'}), "
           f"{os.cpu_count()} CPU cores")
    cols = ["run", "req/s", "x van", "out tok/s", "x van", "peak run", "x van", "mean run", "pages/req",
            "pages x bs", "KV slots/req", "x van", "KV fits req", "evicted tok", "preempted"]
    rows = []
    for r in runs:
        v = r["vs_vanilla"]
        rows.append([r["label"], fmt(r["requests_per_s"], ".3f"), fmt(v["requests_per_s"], ".2f"),
                     fmt(r["output_tokens_per_s"], ".1f"), fmt(v["output_tokens_per_s"], ".2f"),
                     fmt(r["peak_running"], "d"), fmt(v["peak_running"], ".2f"), fmt(r["mean_running"], ".1f"),
                     fmt(r["pages_per_req"], ".1f"), fmt(r["kv_tokens_per_req_pages_x_bs"], ".0f"),
                     fmt(r["kv_token_slots_per_req_all_layers"], ".0f"),
                     fmt(v["kv_token_slots_per_req_all_layers"], ".2f"), fmt(r["kv_capacity_reqs"], ".1f"),
                     fmt(r["evicted_tokens"], "d"), fmt(r["preemptions"], "d")])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    out = [hdr, "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))]
    for row in rows:
        out.append("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(row, widths))))
    pre = table.get("prefill_bound")
    if pre:
        out.append(f"prefill only (vanilla, 1 output token): {pre['requests_per_s']:.3f} req/s "
                   f"({pre['elapsed_s'] / pre['num_prompts']:.2f} s per prompt)")
    for d in policy_prefill(table):
        out.append(f"prefill only ({d['label']}): {d['requests_per_s']:.3f} req/s "
                   f"({d['elapsed_s'] / d['num_prompts']:.2f} s per prompt)")
    text = "\n".join(out)
    print("\n" + text)
    return text, cols, rows


# --------------------------------------------------------------------------- scaling

def scaling(runner: Runner, args) -> dict:
    n, O = args.scaling_num_prompts, args.output_len
    res: dict = {"prompt_len": [], "retention": [], "num_prompts": n}
    t0 = time.time()
    for L in args.scaling_input_lens:
        r = runner.throughput(f"scaling len {L}: vanilla", [], n=n, input_len=L, output_len=O)
        r.update(kind="vanilla", policy=None, retention=None)
        res["prompt_len"].append(r)
        for p in args.scaling_policies:
            r = runner.throughput(f"scaling len {L}: {p} 25%", policy_flags(p, "0.25"),
                                  n=n, input_len=L, output_len=O)
            r.update(kind="retention", policy=p, retention=0.25)
            res["prompt_len"].append(r)
    L = args.input_len
    van = next((r for r in res["prompt_len"] if r["kind"] == "vanilla" and r["input_len"] == L), None)
    if van is None:
        van = runner.throughput(f"scaling ret: vanilla (len {L})", [], n=n, input_len=L, output_len=O)
        van.update(kind="vanilla", policy=None, retention=None)
    res["retention"].append(van)
    for p in args.scaling_policies:
        for ret in args.scaling_retentions:
            if ret >= 1.0:
                flags = policy_flags(p, nothing_evicted_budget(p, L, O))
            else:
                flags = policy_flags(p, str(ret))
            have = next((r for r in res["prompt_len"] if r.get("policy") == p and r["input_len"] == L
                         and r.get("retention") == ret), None)
            if have is None:
                have = runner.throughput(f"scaling ret {ret:g}: {p} (len {L})", flags, n=n, input_len=L, output_len=O)
                have.update(kind="retention", policy=p, retention=ret)
            res["retention"].append(have)
    res["seconds"] = time.time() - t0
    return res


def plot_scaling(res: dict, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    # throughput vs prompt length
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list] = {}
    for r in res["prompt_len"]:
        name = "vanilla" if r["kind"] == "vanilla" else f"{r['policy']} 25%"
        series.setdefault(name, []).append(r)
    van = {r["input_len"]: r for r in series.get("vanilla", [])}
    for name, rs in series.items():
        xs = [r["mean_prompt_tokens"] or r["input_len"] for r in rs]
        ax1.plot(xs, [r["requests_per_s"] for r in rs], marker="o", label=name)
        if name != "vanilla":
            ax2.plot(xs, [ratio(r["requests_per_s"], van.get(r["input_len"], {}).get("requests_per_s")) or float("nan")
                          for r in rs], marker="o", label=name)
    ax1.set(xlabel="prompt tokens", ylabel="requests/s", title="Throughput vs prompt length")
    ax2.axhline(1.0, color="gray", ls="--", lw=1)
    ax2.set(xlabel="prompt tokens", ylabel="x vanilla requests/s", title="Speed-up over vanilla (same KV memory)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{res['num_prompts']} essay prompts, {res['prompt_len'][0]['output_len']} output tokens, "
                 f"KV {fmt_bytes(res['kv_bytes'])}, page {res['block_size']}", fontsize=9)
    fig.tight_layout()
    p = out_dir / "throughput_vs_prompt_len.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)

    # throughput vs retention
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    van_r = next(r for r in res["retention"] if r["kind"] == "vanilla")
    by_p: dict[str, list] = {}
    for r in res["retention"]:
        if r["kind"] != "vanilla":
            by_p.setdefault(r["policy"], []).append(r)
    for p_name, rs in by_p.items():
        rs = sorted(rs, key=lambda r: -r["retention"])
        xs = [r["retention"] for r in rs]
        ax1.plot(xs, [r["requests_per_s"] for r in rs], marker="o", label=p_name)
        ax2.plot(xs, [r["requests_per_s"] / van_r["requests_per_s"] for r in rs], marker="o", label=p_name)
    ax1.axhline(van_r["requests_per_s"], color="black", ls="--", lw=1, label="vanilla")
    ax2.axhline(1.0, color="black", ls="--", lw=1, label="vanilla")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.invert_xaxis()
        ax.set_xticks([1.0, 0.5, 0.25, 0.125], ["1.0\n(nothing evicted)", "0.5", "0.25", "0.125"])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set(xlabel="retention (fraction of the prompt kept)", ylabel="requests/s", title="Throughput vs retention")
    ax2.set(xlabel="retention (fraction of the prompt kept)", ylabel="x vanilla requests/s",
            title="Speed-up over vanilla (same KV memory)")
    fig.suptitle(f"{res['num_prompts']} essay prompts x ~{van_r['mean_prompt_tokens'] or van_r['input_len']:.0f} tokens, "
                 f"{van_r['output_len']} output tokens, KV {fmt_bytes(res['kv_bytes'])}, page {res['block_size']}",
                 fontsize=9)
    fig.tight_layout()
    p = out_dir / "throughput_vs_retention.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths


def scaling_md(res: dict) -> str:
    lines = ["| series | prompt tokens | retention | req/s | x vanilla | out tok/s | peak running | KV slots/req |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    vans = {r["input_len"]: r for r in res["prompt_len"] + res["retention"] if r["kind"] == "vanilla"}
    seen = set()
    for r in res["prompt_len"] + res["retention"]:
        if id(r) in seen:
            continue
        seen.add(id(r))
        v = vans.get(r["input_len"])
        ret = "-" if r["kind"] == "vanilla" else ("1.0 (nothing evicted)" if r["retention"] >= 1 else f"{r['retention']:g}")
        lines.append(f"| {'vanilla' if r['kind'] == 'vanilla' else r['policy']} | {fmt(r['mean_prompt_tokens'], '.0f')} | "
                     f"{ret} | {r['requests_per_s']:.3f} | {fmt(ratio(r['requests_per_s'], v and v['requests_per_s']), '.2f')} | "
                     f"{fmt(r['output_tokens_per_s'], '.1f')} | {fmt(r['peak_running'], 'd')} | "
                     f"{fmt(r['kv_token_slots_per_req_all_layers'], '.0f')} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- online

def online(runner: Runner, args) -> dict:
    from vllm_kvcompress.demo import stop_server, wait_ready

    n, L, O = args.online_num_prompts, args.input_len, args.output_len
    ds = runner.dataset(n, L, O)
    results = []
    t0 = time.time()
    for label, flags in [("vanilla", []),
                         (f"{args.online_policy} 25%", policy_flags(args.online_policy, "0.25"))]:
        tag = re.sub(r"[^A-Za-z0-9]+", "_", label)
        log = runner.workdir / f"online_{tag}.serve.log"
        stats_json = runner.workdir / f"online_{tag}.stats.json"
        serve_cmd = [str(VLLM), "serve", str(model_path()), "--host", "127.0.0.1", "--port", str(args.port),
                     "--served-model-name", "smollm2", *runner.engine_flags(), *flags]
        env = dict(os.environ, **runner.env_extra(), **{STATS_ENV: str(stats_json)})
        print(f"[online {label}] $ {' '.join(shlex.quote(c) for c in serve_cmd)}", flush=True)
        with open(log, "w") as lf:
            proc = subprocess.Popen(serve_cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            ts = time.time()
            wait_ready(proc, args.port, log)
            print(f"[online {label}] server ready in {time.time() - ts:.0f}s", flush=True)
            result_file = runner.workdir / f"online_{tag}.result.json"
            bench_cmd = [sys.executable, str(VLLM_SHIM), "bench", "serve", "--backend", "openai", "--base-url", f"http://127.0.0.1:{args.port}",
                         "--model", "smollm2", "--tokenizer", str(model_path()), "--dataset-name", "custom",
                         "--dataset-path", ds["path"], "--custom-output-len", str(O), "--ignore-eos",
                         "--num-prompts", str(n), "--request-rate", str(args.online_rate),
                         "--max-concurrency", str(args.online_concurrency), "--seed", "0",
                         "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
                         "--save-result", "--result-dir", str(runner.workdir), "--result-filename", result_file.name,
                         "--disable-tqdm"]
            print(f"[online {label}] $ {' '.join(shlex.quote(c) for c in bench_cmd)}", flush=True)
            tb = time.time()
            bp = subprocess.run(bench_cmd, capture_output=True, text=True, timeout=args.run_timeout)
            (runner.workdir / f"online_{tag}.bench.log").write_text(bp.stdout + bp.stderr)
            if bp.returncode != 0 or not result_file.exists():
                raise RuntimeError(f"vllm bench serve failed ({bp.returncode}):\n" + "\n".join(
                    (bp.stdout + bp.stderr).splitlines()[-25:]))
            res = json.loads(result_file.read_text())
        finally:
            stop_server(proc)
        time.sleep(2)  # let the server's stats file land
        stats = json.loads(stats_json.read_text()) if stats_json.exists() else {}
        keep = {k: res.get(k) for k in ("completed", "duration", "request_throughput", "output_throughput",
                                        "total_input_tokens", "total_output_tokens",
                                        "mean_ttft_ms", "median_ttft_ms", "p50_ttft_ms", "p99_ttft_ms",
                                        "mean_tpot_ms", "median_tpot_ms", "p50_tpot_ms", "p99_tpot_ms",
                                        "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
                                        "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms")}
        r = {"label": label, "flags": flags, "serve_command": " ".join(shlex.quote(c) for c in serve_cmd),
             "bench_command": " ".join(shlex.quote(c) for c in bench_cmd), "result": keep, "stats": stats,
             "peak_running": stats.get("peak_running_reqs"), "mean_running": stats.get("mean_running_reqs"),
             "bench_wall_s": time.time() - tb}
        print(f"[online {label}] TTFT mean/median/p99 {fmt(keep['mean_ttft_ms'], '.0f')}/"
              f"{fmt(keep['median_ttft_ms'], '.0f')}/{fmt(keep['p99_ttft_ms'], '.0f')} ms, TPOT "
              f"{fmt(keep['mean_tpot_ms'], '.1f')}/{fmt(keep['median_tpot_ms'], '.1f')}/{fmt(keep['p99_tpot_ms'], '.1f')} ms, "
              f"{fmt(keep['request_throughput'], '.3f')} req/s, peak running {fmt(r['peak_running'], 'd')}", flush=True)
        results.append(r)
    return {"runs": results, "num_prompts": n, "rate": args.online_rate, "max_concurrency": args.online_concurrency,
            "dataset": ds, "seconds": time.time() - t0}


def online_md(on: dict, command: str, args) -> str:
    ds = on["dataset"]
    van = on["runs"][0]["result"]
    lines = [f"# Online: `vllm serve` + `vllm bench serve`, vanilla vs {args.online_policy} at 25%", "",
             f"{on['num_prompts']} essay prompts x ~{ds['mean_len']:.0f} tokens in (chat template incl.) / "
             f"{args.output_len} out (`--ignore-eos`), request rate {on['rate']}, max concurrency "
             f"{on['max_concurrency']}, KV {fmt_bytes(args.kv_bytes)}, page size {args.block_size or 'per-run default'}, "
             f"{args.dtype}, eager, {os.cpu_count()} CPU cores. TTFT includes the time a request waits for admission.", "",
             "| server | req/s | out tok/s | TTFT mean | TTFT median | TTFT p99 | TPOT mean | TPOT median | TPOT p99 | "
             "E2E mean | peak running |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in on["runs"]:
        x = r["result"]
        lines.append(f"| {r['label']} | {fmt(x['request_throughput'], '.3f')} | {fmt(x['output_throughput'], '.1f')} | "
                     f"{fmt(x['mean_ttft_ms'], '.0f')} ms | {fmt(x['median_ttft_ms'], '.0f')} ms | "
                     f"{fmt(x['p99_ttft_ms'], '.0f')} ms | {fmt(x['mean_tpot_ms'], '.1f')} ms | "
                     f"{fmt(x['median_tpot_ms'], '.1f')} ms | {fmt(x['p99_tpot_ms'], '.1f')} ms | "
                     f"{fmt(x['mean_e2el_ms'], '.0f')} ms | {fmt(r['peak_running'], 'd')} |")
    pol = on["runs"][1]["result"]
    lines += ["", "Ratios (policy / vanilla): " + ", ".join(
        f"{k} {fx(ratio(pol.get(k), van.get(k)))}" for k in
        ("request_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms"))]
    lines += ["", "Command:", "", "```bash", command, "```", "", "Per server:", ""]
    for r in on["runs"]:
        lines += ["```bash", r["serve_command"], r["bench_command"].replace(str(Path(ds["path"]).parent), "<work-dir>"),
                  "```"]
    lines += ["", PATHS_NOTE]
    return _portable("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- reporting

def machine_info(args=None) -> dict:
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        info["git_dirty"] = bool(dirty)
    except OSError:
        pass
    try:
        from importlib.metadata import version
        info["vllm"] = version("vllm-cpu")
        info["torch"] = version("torch")
    except Exception:
        pass
    if args is not None:  # CPU model, ISA flags, torch's/vLLM's view, dtype and why (issue #18)
        info.update(machine.machine_record(args.dtype, args.dtype_reason, model_path(),
                                           [args.block_size] if args.block_size else [128, 32]))
    return info


def write_main_md(path: Path, table: dict, text: str, cols, rows, checks, bounds, command: str, args, info) -> None:
    ds = table["dataset"]
    bs_used = sorted({r.get("block_size") for r in table["runs"] if r.get("block_size")})
    L = ["# Throughput and KV memory vs vanilla vLLM (same KV memory)" + (" — QUICK SMOKE RUN, not a result" if args.quick else ""),
         "",
         f"`vllm bench throughput`, {ds['num_prompts']} essay prompts x ~{ds['mean_len']:.0f} tokens "
         f"({ds['min_len']}-{ds['max_len']}, chat template included) in, exactly {args.output_len} tokens out "
         f"(`ignore_eos`), `--kv-cache-memory-bytes {fmt_bytes(args.kv_bytes)}`, page size "
         f"{args.block_size if args.block_size else 'each run its default'} (used: {', '.join(map(str, bs_used)) or 'n/a'}), "
         f"{args.dtype} ({info.get('dtype_reason')}), `--enforce-eager`, SmolLM2-135M, {info.get('cpu_count')} CPU cores ({info.get('cpu', '?')}), "
         f"vLLM {info.get('vllm', '?')}, commit {info.get('git_commit', '?')}{' (dirty)' if info.get('git_dirty') else ''}.",
         "", f"Machine: {machine.describe(info)}.", "",
         "| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    L += ["| " + " | ".join(r) + " |" for r in rows]
    pre = table.get("prefill_bound")
    if pre:
        L += ["", f"Prefill only (vanilla, 1 output token): {pre['requests_per_s']:.3f} req/s, "
                  f"{pre['elapsed_s'] / pre['num_prompts']:.2f} s per prompt."]
    for d in policy_prefill(table):
        L += ["", f"Prefill only ({d['label']}): {d['requests_per_s']:.3f} req/s, "
                  f"{d['elapsed_s'] / d['num_prompts']:.2f} s per prompt."]
    L += ["", "Columns: *peak run* / *mean run* = running requests per engine step (peak, mean over steps with any "
              "running); *pages/req* = KV pages in use / running requests, averaged over steps; *pages x bs* = that x "
              "page size (token slots per page; with a policy on, a page holds one KV-cache group's layers only); "
              "*KV slots/req* = share of the pool per running request x the pool's capacity in token slots over all "
              "layers (comparable across runs); *KV fits req* = pool pages / pages per running request, the "
              "concurrency the KV memory allows at that footprint; *evicted tok* = tokens evicted, summed over layers; "
              "*preempted* = preemptions (each recomputes a request's prompt). From the plugin's "
              "`VLLM_KVCOMPRESS_STATS_FILE`; n/a = not reported.",
          "", "## Targets", "", "| run | metric | target | measured | result |", "|---|---|---|---:|---|"]
    for c in checks:
        L.append(f"| {c['run']} | {c['metric']} | {c['target']} | {fx(c['value'])} | "
                 f"{'PASS' if c['pass'] else 'FAIL'} |")
    L += ["", "## What bounds the result", ""] + [f"- {b}" for b in bounds]
    L += ["", "## Command", "", "```bash", command, "```", "",
          "Each run is one `vllm bench throughput` subprocess (through `benchmarks/vllm_cli_custom_dataset.py`, the "
          "`vllm` entry point with `--dataset-name custom` allowed); per run:", "", "```bash"]
    for r in table["runs"] + ([pre] if pre else []) + policy_prefill(table):
        L.append(r["command"].replace(str(Path(table["dataset"]["path"]).parent), "<work-dir>"))
    L += ["```", "", PATHS_NOTE, ""]
    path.write_text(_portable("\n".join(L)))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", type=csv_list(str), default=None, help="main table policies (default pyramid,pyramid+drop,h2o; pyramid+drop = "
                         "--kv-policy pyramid --kv-prefill-drop)")
    ap.add_argument("--retentions", type=csv_list(float), default=None, help="default 0.25,0.125")
    ap.add_argument("--num-prompts", type=int, default=None, help="main table prompts (default 12)")
    ap.add_argument("--input-len", type=int, default=None, help="prompt tokens incl. chat template (default 1920)")
    ap.add_argument("--output-len", type=int, default=None, help="output tokens per request (default 128)")
    ap.add_argument("--block-size", type=int, default=None,
                    help="page size for every run (default 32; 0 = each run its own default: vanilla 128, policy 32)")
    ap.add_argument("--dtype", default="auto", choices=machine.DTYPES,
                    help="model dtype of every run (default auto: bfloat16 where the CPU has avx512_bf16/amx_bf16 "
                         "and the model is bfloat16, else float32)")
    ap.add_argument("--kv-bytes", type=parse_bytes, default=None, help="--kv-cache-memory-bytes of every run (256MiB)")
    ap.add_argument("--max-model-len", type=int, default=None, help="default 4096 (--quick: 1024)")
    ap.add_argument("--scaling", action="store_true", help="also throughput vs prompt length and vs retention + PNGs")
    ap.add_argument("--scaling-input-lens", type=csv_list(int), default=None, help="default 1024,1920,3968 (1920 reuses the retention runs)")
    ap.add_argument("--scaling-retentions", type=csv_list(float), default=None, help="default 1.0,0.5,0.25,0.125")
    ap.add_argument("--scaling-policies", type=csv_list(str), default=None, help="default pyramid")
    ap.add_argument("--scaling-num-prompts", type=int, default=None, help="default 8")
    ap.add_argument("--online", action="store_true", help="also vllm serve + vllm bench serve: TTFT / TPOT")
    ap.add_argument("--online-policy", default="pyramid")
    ap.add_argument("--online-num-prompts", type=int, default=None, help="default 12")
    ap.add_argument("--online-concurrency", type=int, default=None, help="default = online prompts (a burst)")
    ap.add_argument("--online-rate", default="inf", help="request rate for vllm bench serve (default inf)")
    ap.add_argument("--port", type=int, default=8766)
    ap.add_argument("--no-main", action="store_true", help="skip the main table (only --scaling / --online)")
    ap.add_argument("--prefill-prompts", type=int, default=4, help="prompts of the prefill-only run (default 4)")
    ap.add_argument("--no-prefill-bound", action="store_true",
                    help="skip the prefill-only runs (vanilla and each policy)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 6 prompts x 512 in / 32 out, KV 48MiB, max-model-len 1024, pyramid only; "
                         "writes to <out-dir>/quick")
    ap.add_argument("--out-dir", type=Path, default=REPO / "docs" / "results")
    ap.add_argument("--work-dir", type=Path, default=None, help="logs, prompts, raw JSON (default: a new temp dir)")
    ap.add_argument("--cpu-bind", default=None, metavar="CORES",
                    help="VLLM_CPU_OMP_THREADS_BIND for every engine (default: vLLM's 'auto', which computes on one "
                         "core, 0, and reserves the other for the front end); e.g. 1 to keep off a core someone "
                         "else's engine is pinned to")
    ap.add_argument("--run-timeout", type=float, default=3600.0, help="seconds per subprocess")
    args = ap.parse_args(argv)

    q = args.quick
    defaults = {
        "policies": ["pyramid", "pyramid+drop"] if q else ["pyramid", "pyramid+drop", "h2o"], "retentions": [0.25, 0.125],
        "num_prompts": 6 if q else 12, "input_len": 512 if q else 1920, "output_len": 32 if q else 128,
        "block_size": 32, "kv_bytes": 48 * MIB if q else 256 * MIB, "max_model_len": 1024 if q else 4096,
        "scaling_input_lens": [256, 512, 960] if q else [1024, 1920, 3968],
        "scaling_retentions": [1.0, 0.5, 0.25, 0.125], "scaling_policies": ["pyramid"],
        "scaling_num_prompts": 4 if q else 8, "online_num_prompts": 6 if q else 12,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.online_concurrency is None:
        args.online_concurrency = args.online_num_prompts
    if any(L + args.output_len > args.max_model_len for L in [args.input_len, *args.scaling_input_lens]):
        ap.error(f"input + output length must fit --max-model-len {args.max_model_len}")
    out_dir = args.out_dir / "quick" if q else args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_throughput-"))
    workdir.mkdir(parents=True, exist_ok=True)
    _RUN_DIRS.update(work_dir=workdir.absolute(), out_dir=out_dir.absolute())
    command = "python benchmarks/bench_throughput.py" + "".join(" " + shlex.quote(a) for a in argv)
    args.dtype, args.dtype_reason = machine.choose_dtype(args.dtype, model_path())
    info = machine_info(args)
    print(f"$ {command}\nlogs, prompts and raw results: {workdir}\nresults: {out_dir}", flush=True)
    print(f"machine: {info.get('cpu_count')} cores ({info.get('cpu', '?')}), load average at start "
          f"{', '.join(f'{x:.2f}' for x in info.get('loadavg_at_start', ()))}", flush=True)
    print(f"dtype: {args.dtype} ({args.dtype_reason})\nmachine: {machine.describe(info)}", flush=True)

    runner = Runner(args, workdir)
    t_start = time.time()
    header = {"command": command, "machine": info, "quick": q,
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "engine_flags": runner.engine_flags(), "work_dir": str(workdir)}

    def dump(name: str, payload: dict) -> Path:
        path = out_dir / name
        path.write_text(json.dumps(_portable({**header, **payload}), indent=2, default=str))
        return path

    written: list[Path] = []
    if not args.no_main:
        table = main_table(runner, args)
        text, cols, rows = print_table(table, args)
        checks, bounds = targets_and_bounds(table, args)
        print("\nTargets (same KV memory, requests/s vs vanilla):")
        for c in checks:
            print(f"  {'PASS' if c['pass'] else 'FAIL'}  {c['run']}: {fx(c['value'])} (target {c['target']})")
        print("What bounds the result:")
        for b in bounds:
            print(f"  - {b}")
        write_main_md(out_dir / "throughput.md", table, text, cols, rows, checks, bounds, command, args, info)
        written += [out_dir / "throughput.md", dump("throughput.json", {"main": table, "targets": checks,
                                                                          "bounds": bounds})]
        print(f"main table: {table['seconds'] / 60:.1f} min", flush=True)

    if args.scaling:
        sc = scaling(runner, args)
        sc.update(kv_bytes=args.kv_bytes, block_size=args.block_size or "per-run default")
        pngs = plot_scaling(sc, out_dir)
        md = scaling_md(sc)
        print("\nScaling:\n" + md)
        (out_dir / "throughput_scaling.md").write_text(_portable(
            f"# Throughput vs prompt length and vs retention (same KV memory {fmt_bytes(args.kv_bytes)})"
            + (" — QUICK SMOKE RUN, not a result" if q else "") + "\n\n"
            f"{sc['num_prompts']} essay prompts per point, {args.output_len} output tokens, page size "
            f"{args.block_size or 'per-run default'}, {args.dtype}, eager, {os.cpu_count()} CPU cores. Retention 1.0 = "
            f"the policy on with a budget covering prompt + output (nothing evicted). Plots: "
            + ", ".join(f"[{p.name}]({p.name})" for p in pngs) + "\n\n" + md
            + f"\n\nMachine: {machine.describe(info)}.\n\nCommand:\n\n```bash\n{command}\n```\n"))
        written += [*pngs, out_dir / "throughput_scaling.md", dump("throughput_scaling.json", {"scaling": sc})]
        print(f"scaling: {sc['seconds'] / 60:.1f} min", flush=True)

    if args.online:
        on = online(runner, args)
        (out_dir / "online.md").write_text(online_md(on, command, args) + f"\nMachine: {machine.describe(info)}.\n")
        written += [out_dir / "online.md", dump("online.json", {"online": on})]
        print(f"online: {on['seconds'] / 60:.1f} min", flush=True)

    print(f"\ntotal {(time.time() - t_start) / 60:.1f} min; wrote:\n  " + "\n  ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
