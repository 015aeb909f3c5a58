"""End-to-end cost of compression when nothing is evicted, with vLLM's own
``vllm bench throughput`` (offline, random prompts).

Runs vanilla vLLM (plugin installed, no policy) and each policy with a budget
whose every layer covers prompt + output (``bench_throughput.nothing_evicted_budget``:
for pyramid the mean budget must be ~2.4x larger, since its deepest layers get the
least), same engine settings, and prints output tokens/s, the ratio to vanilla and
the evicted layer-tokens the engine reported (0 = nothing evicted). Such requests
skip scoring, so this measures what compression being on costs: the per-stage
KV-cache groups, the plugin's metadata and its attention path.

    python benchmarks/bench_decode_overhead.py [--policies h2o,pyramid] [--input-len 512]
        [--output-len 256] [--num-prompts 16] [--block-size 32] [--repeats 3]

``--block-size`` (default 32) is passed to every run (vanilla included); with
``--block-size 0`` vanilla uses vLLM's CPU default (128) and the plugin its default
page (32), and the smaller page alone costs vLLM's own attention kernel ~13% here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from vllm_kvcompress.assets import model_path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_throughput import nothing_evicted_budget  # noqa: E402


def run(extra: list[str], args) -> dict:
    vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
    with tempfile.NamedTemporaryFile(suffix=".json") as f, tempfile.NamedTemporaryFile(suffix=".json") as st:
        cmd = [vllm, "bench", "throughput", "--model", str(model_path()), "--dataset-name", "random",
               "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
               "--num-prompts", str(args.num_prompts), "--dtype", "float32", "--enforce-eager",
               "--kv-cache-memory-bytes", str(512 << 20), "--max-model-len", "4096", "--seed", "0",
               "--output-json", f.name, *args.block_size_flag, *extra]
        print("$ " + " ".join(cmd), flush=True)
        env = dict(os.environ, VLLM_KVCOMPRESS_STATS_FILE=st.name)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        out = json.load(open(f.name))
        # vLLM 0.32's random dataset reads --random-input-len/--random-output-len (their
        # defaults, 1024/128, win over the legacy --input-len/--output-len): check the sizes
        expect = args.num_prompts * (args.input_len + args.output_len)
        if abs(out["total_num_tokens"] - expect) > 0.02 * expect:
            raise SystemExit(f"bench ran {out['total_num_tokens']} tokens, expected ~{expect}")
        try:
            out["evicted_tokens"] = json.load(open(st.name)).get("evicted_tokens")
        except (OSError, ValueError):
            out["evicted_tokens"] = None
    out["output_tokens_per_second"] = out["num_requests"] * args.output_len / out["elapsed_time"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default="h2o,pyramid")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=32, help="page size of every run (0: each run its default)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the whole sequence N times and also print each ratio's median (noise here is ~±8%%)")
    args = ap.parse_args()
    args.block_size_flag = [] if not args.block_size else ["--block-size", str(args.block_size)]
    configs = [("vanilla", [])]
    for p in args.policies.split(","):
        budget = nothing_evicted_budget(p, args.input_len, args.output_len)
        configs.append((f"{p} (budget {budget}, nothing evicted)", ["--kv-policy", p, "--kv-budget", budget]))
    ratios: dict[str, list[float]] = {name: [] for name, _ in configs}
    for rep in range(args.repeats):
        rows = [(name, run(flags, args)) for name, flags in configs]
        base = rows[0][1]
        print(f"\n{args.num_prompts} prompts x {args.input_len} in / {args.output_len} out, float32, 2 cores"
              + (f" (run {rep + 1} of {args.repeats})" if args.repeats > 1 else ""))
        print(f"{'run':44s} {'req/s':>7s} {'out tok/s':>10s} {'vs vanilla':>10s} {'evicted':>8s}")
        for name, r in rows:
            ratio = r["output_tokens_per_second"] / base["output_tokens_per_second"]
            ratios[name].append(ratio)
            ev = r.get("evicted_tokens")
            print(f"{name:44s} {r['requests_per_second']:7.3f} {r['output_tokens_per_second']:10.1f} {ratio:9.2f}x"
                  f" {'n/a' if ev is None else ev:>8}", flush=True)
    if args.repeats > 1:
        print(f"\nmedian vs vanilla over {args.repeats} runs (each against its own vanilla run)")
        for name, rs in ratios.items():
            print(f"{name:44s} {statistics.median(rs):9.2f}x   ({', '.join(f'{x:.2f}' for x in rs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
