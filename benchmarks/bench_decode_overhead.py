"""End-to-end cost of compression when nothing is evicted, with vLLM's own
``vllm bench throughput`` (offline, random prompts).

Runs vanilla vLLM (plugin installed, no policy) and each policy with a budget
that covers every request (so every scoring pass runs but nothing is evicted),
same engine settings, and prints output tokens/s and the ratio to vanilla.

    python benchmarks/bench_decode_overhead.py [--policies h2o,pyramid] [--input-len 512]
        [--output-len 256] [--num-prompts 16] [--block-size N]

``--block-size`` is passed to every run (vanilla included); without it vanilla
uses vLLM's CPU default (128) and the plugin its default page (32), and the
smaller page alone costs vLLM's own attention kernel ~13% here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from vllm_kvcompress.assets import model_path


def run(extra: list[str], args) -> dict:
    vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [vllm, "bench", "throughput", "--model", str(model_path()), "--dataset-name", "random",
               "--input-len", str(args.input_len), "--output-len", str(args.output_len),
               "--num-prompts", str(args.num_prompts), "--dtype", "float32", "--enforce-eager",
               "--kv-cache-memory-bytes", str(512 << 20), "--max-model-len", "4096", "--seed", "0",
               "--output-json", f.name, *args.block_size_flag, *extra]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = json.load(open(f.name))
    out["output_tokens_per_second"] = out["num_requests"] * args.output_len / out["elapsed_time"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default="h2o,pyramid")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=None)
    args = ap.parse_args()
    args.block_size_flag = [] if args.block_size is None else ["--block-size", str(args.block_size)]
    base = run([], args)
    rows = [("vanilla", base)]
    budget = str(args.input_len + args.output_len + 64)  # covers every request: nothing evicted
    for p in args.policies.split(","):
        rows.append((f"{p} (budget {budget}, nothing evicted)", run(["--kv-policy", p, "--kv-budget", budget], args)))
    print(f"\n{args.num_prompts} prompts x {args.input_len} in / {args.output_len} out, float32, 2 cores")
    print(f"{'run':44s} {'req/s':>7s} {'out tok/s':>10s} {'vs vanilla':>10s}")
    for name, r in rows:
        ratio = r["output_tokens_per_second"] / base["output_tokens_per_second"]
        print(f"{name:44s} {r['requests_per_second']:7.3f} {r['output_tokens_per_second']:10.1f} {ratio:9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
