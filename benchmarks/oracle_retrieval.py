"""Retrieval answers of the dense oracle for the values of one ``kv_compress`` option (no vLLM).

The quick way to choose a default on held-out prompt seeds before the engine grid reports it
on seed 0: the quality harness's retrieval prompts (``passkey``, ``passkey_once``,
``distractor``; the same seed gives the same prompts as ``python -m vllm_kvcompress.eval
quality --seed N``), answered greedily by ``vllm_kvcompress.oracle.DenseOracle`` (float32,
prefilled in ``--chunk``-token chunks as ``vllm serve`` does), scored as the harness scores
them. Prints one line per (seed, run, value) with the correct count per task and the misses.
From the repository root (``.venv`` active)::

    python benchmarks/oracle_retrieval.py --seeds 1,2,3 --lengths 1024 \\
        --runs snapkv@0.125,pyramid@0.125,h2o@0.25 --option last_query_weight --values 0,1,0.25
"""

from __future__ import annotations

import argparse
import time

import torch
import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1", help="prompt seeds, comma-separated (seed 0 is the reporting set)")
    ap.add_argument("--lengths", default="1024", help="prompt lengths (tokens), comma-separated")
    ap.add_argument("--depths", type=int, default=5, help="depths per length (as the harness's --depths)")
    ap.add_argument("--tasks", default="passkey,passkey_once,distractor")
    ap.add_argument("--runs", default="snapkv@0.125", help="policy@retention, comma-separated")
    ap.add_argument("--option", required=True, help="a kv_compress option, e.g. last_query_weight")
    ap.add_argument("--values", required=True, help="its values, comma-separated (YAML scalars)")
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens); 0 = one step")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from vllm_kvcompress.assets import essays_text, model_path
    from vllm_kvcompress.config import KVCompressConfig
    from vllm_kvcompress.eval.prompts import (PASSKEY_ONCE_NEEDLE, Haystack, depth_grid, multikey_prompts,
                                              passkey_prompts)
    from vllm_kvcompress.eval.quality import MULTIKEY_MAX_TOKENS, PASSKEY_MAX_TOKENS
    from vllm_kvcompress.eval.scoring import score_multikey, score_passkey
    from vllm_kvcompress.oracle import DenseOracle, load_model

    tok = AutoTokenizer.from_pretrained(str(model_path()))
    hay = Haystack(tok, essays_text())
    lengths = [int(x) for x in args.lengths.split(",")]
    tasks = args.tasks.split(",")
    values = [yaml.safe_load(v) for v in args.values.split(",")]
    model = load_model(None, torch.float32)
    depths = depth_grid(args.depths)
    t0 = time.time()
    for seed in [int(s) for s in args.seeds.split(",")]:
        # the harness's prompt lists for its default lengths, so a seed gives the harness's prompts
        grid = sorted(set(lengths) | {1024, 2048, 4096})
        prompts = dict(
            passkey=lambda: passkey_prompts(hay, grid, depths, seed=seed),
            passkey_once=lambda: passkey_prompts(hay, grid, depths, seed=seed, needle=PASSKEY_ONCE_NEEDLE,
                                                 task="passkey_once"),
            distractor=lambda: multikey_prompts(hay, sorted(set(grid) | {8000}), depths, num_keys=2, seed=seed,
                                                task="distractor"),
        )
        items = {t: [it for it in prompts[t]() if it["length"] in lengths] for t in tasks}
        for run in args.runs.split(","):
            policy, retention = run.split("@")
            for value in values:
                cfg = KVCompressConfig.from_dict({"policy": policy, "budget": float(retention), args.option: value})
                oracle = DenseOracle(cfg, model=model)
                parts, misses = [], []
                for task, its in items.items():
                    ok = 0
                    for it in its:
                        max_new = MULTIKEY_MAX_TOKENS if task == "distractor" else PASSKEY_MAX_TOKENS
                        out, _ = oracle.generate(list(it["ids"]), max_new, chunk_size=args.chunk or None)
                        text = tok.decode(out)
                        score = score_multikey if task == "distractor" else score_passkey
                        if score(text, it["answer"]):
                            ok += 1
                        else:
                            misses.append(f"{task} {it['length']}/{it['depth']}: {text.strip()[:10]!r} "
                                          f"(key {it['answer']})")
                    parts.append(f"{task} {ok}/{len(its)}")
                print(f"seed {seed} {run} {args.option}={value}: " + "  ".join(parts)
                      + f"  [{time.time() - t0:.0f} s]", flush=True)
                for m in misses:
                    print("    miss", m, flush=True)


if __name__ == "__main__":
    main()
