"""Which tokens of the queried fact and of the distractor fact each layer keeps (issue #27).

The quality harness's ``distractor`` prompts state one fact for the queried word and one
of the same shape for another word. This runs the dense oracle (``vllm_kvcompress.oracle``,
float32, no vLLM) on those prompts, prefilled in chunks as ``vllm serve`` does with
``prompt_compaction: once``, and prints per layer the share of each fact's tokens x KV
heads still held after the prompt, with the oracle's greedy answer. From the repository
root::

    python benchmarks/fact_coverage.py --lengths 1024,8000 --depth 0.75 \
        --policies snapkv,pyramid --retention 0.125
"""

from __future__ import annotations

import argparse

import torch


def fact_span(ids: list[int], tok, value: str) -> tuple[int, int]:
    """Token range of the fact stating ``value``: its value tokens, the period after them and
    the 6 tokens before (`` special magic number for <word> is``)."""
    core = tok.encode(f" {value}", add_special_tokens=False)
    for s in range(len(ids) - len(core) + 1):
        if ids[s:s + len(core)] == core:
            return s - 6, s + len(core) + 1
    raise ValueError(f"value {value} not found in the prompt")


def held_share(kept: torch.Tensor, span: tuple[int, int]) -> float:
    """Share of ``span``'s positions x heads in ``kept`` (LongTensor[H, n] of positions)."""
    inside = (kept >= span[0]) & (kept < span[1])
    return int(inside.sum()) / (kept.shape[0] * (span[1] - span[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="1024,8000", help="prompt lengths (tokens), comma-separated")
    ap.add_argument("--depth", type=float, default=0.75, help="depth of the queried fact (the harness's grid)")
    ap.add_argument("--depths", type=int, default=5, help="depths of the harness's grid (as its --depths)")
    ap.add_argument("--policies", default="snapkv,pyramid")
    ap.add_argument("--retention", type=float, default=0.125)
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens); 0 = one step")
    ap.add_argument("--seed", type=int, default=0, help="prompt seed (as the harness's --seed)")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from vllm_kvcompress.assets import essays_text, model_path
    from vllm_kvcompress.config import KVCompressConfig
    from vllm_kvcompress.eval.prompts import Haystack, depth_grid, multikey_prompts
    from vllm_kvcompress.oracle import DenseOracle, load_model

    tok = AutoTokenizer.from_pretrained(str(model_path()))
    hay = Haystack(tok, essays_text())
    lengths = [int(x) for x in args.lengths.split(",")]
    # the harness's lengths, so the seed stream gives the same prompts as its runs
    grid = sorted(set(lengths) | {1024, 2048, 4096, 8000})
    items = [it for it in multikey_prompts(hay, grid, depth_grid(args.depths), num_keys=2, seed=args.seed,
                                           task="distractor")
             if it["length"] in lengths and abs(it["depth"] - args.depth) < 1e-9]
    model = load_model(None, torch.float32)
    for it in items:
        ids = list(it["ids"])
        (other, dvalue), = it["distractors"].items()
        q, d = fact_span(ids, tok, it["answer"]), fact_span(ids, tok, dvalue)
        print(f"== {it['length']} tokens, depth {it['depth']}: queried {it['word']} = {it['answer']} at {q}, "
              f"distractor {other} = {dvalue} at {d}")
        for policy in args.policies.split(","):
            oracle = DenseOracle(KVCompressConfig.from_dict(dict(policy=policy, budget=args.retention)), model=model)
            out, kept = oracle.generate(ids, 8, chunk_size=args.chunk or None)
            print(f"  {policy}@{args.retention}: answer {tok.decode(out)!r}; tokens held per layer "
                  f"{kept[0].shape[1]} (first) .. {kept[-1].shape[1]} (last)")
            print("    queried fact held, per layer:", " ".join(f"{held_share(k, q):.1f}" for k in kept))
            print("    distractor held, per layer:  ", " ".join(f"{held_share(k, d):.1f}" for k in kept))


if __name__ == "__main__":
    main()
