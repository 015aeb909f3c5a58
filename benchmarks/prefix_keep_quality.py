"""Answers with a cached shared prefix (issue #29): ``--kv-prefix-hit keep`` against the default
``compress`` and the full cache, on prompts that hit vLLM's prefix cache.

Every scored prompt is a shared prefix (the pass-key frame + ~1,536 tokens of essay text) that an
unscored warm-up request cached, then ~384 tokens of essay text of its own and the pass-key
question. Two sets, the key stated once (the harness's ``passkey_once`` needle):

* ``in_prefix``: the key is in the shared prefix (5 prefixes, depths 0.1-0.9 of the prefix's
  text), each asked by 2 requests with different own text: a document many users ask about;
* ``in_own``: the key is in the request's own text (10 requests, depths 0-1 of that text), after
  one shared prefix without a key: a shared system prompt, then the user's document.

Engines as ``vllm serve`` runs them (chunked prefill at 2,048 tokens, prefix caching on), bf16,
one subprocess each. Prints a table and writes ``results.json`` to ``--out-dir``. Command (from
the repository root, ``.venv`` active)::

    python benchmarks/prefix_keep_quality.py --out-dir docs/results/prefix_keep_quality
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PREFIX_LEN = 1536
OWN_LEN = 384
MAX_TOKENS = 12
CONFIGS = {
    "full": None,
    "pyramid@0.25": {"policy": "pyramid", "budget": 0.25},
    "pyramid@0.25 keep": {"policy": "pyramid", "budget": 0.25, "prefix_hit": "keep"},
    "h2o@0.25": {"policy": "h2o", "budget": 0.25},
    "h2o@0.25 keep": {"policy": "h2o", "budget": 0.25, "prefix_hit": "keep"},
    "pyramid@0.5 keep": {"policy": "pyramid", "budget": 0.5, "prefix_hit": "keep"},
    "h2o@0.5 keep": {"policy": "h2o", "budget": 0.5, "prefix_hit": "keep"},
}


def build_sets(seed: int = 0) -> dict:
    """Token ids of the warm-up and scored prompts of both sets (same for every engine)."""
    from transformers import AutoTokenizer

    from vllm_kvcompress.assets import essays_text, model_path
    from vllm_kvcompress.eval.prompts import (PASSKEY_ONCE_NEEDLE, PASSKEY_PREFIX, PASSKEY_QUESTION, Haystack,
                                              build_prompt, depth_grid)

    hay = Haystack(AutoTokenizer.from_pretrained(str(model_path())), essays_text())
    rng = np.random.default_rng([seed, 29])
    question = hay.encode(PASSKEY_QUESTION)

    def offset() -> int:
        return int(rng.integers(0, len(hay.ids) - 4 * PREFIX_LEN))

    def text(length: int, frame: str, needles) -> list[int]:
        return build_prompt(hay, length, frame, needles, "", offset()).ids

    def key() -> str:
        return str(int(rng.integers(10000, 100000)))

    sets: dict = {"in_prefix": {"warm": [], "items": []}, "in_own": {"warm": [], "items": []}}
    for d in (0.1, 0.3, 0.5, 0.7, 0.9):
        k = key()
        prefix = text(PREFIX_LEN, PASSKEY_PREFIX, [(d, PASSKEY_ONCE_NEEDLE.format(key=k))])
        sets["in_prefix"]["warm"].append(prefix + question)
        for _ in range(2):
            sets["in_prefix"]["items"].append(dict(depth=d, answer=k, ids=prefix + text(OWN_LEN, "", []) + question))
    prefix = text(PREFIX_LEN, PASSKEY_PREFIX, [])
    sets["in_own"]["warm"].append(prefix + question)
    for d in depth_grid(10):
        k = key()
        own = text(OWN_LEN, "", [(d, PASSKEY_ONCE_NEEDLE.format(key=k))])
        sets["in_own"]["items"].append(dict(depth=d, answer=k, ids=prefix + own + question))
    return sets


def run_engine(kv: dict | None, sets: dict) -> dict:
    """One engine: per set, the warm-up prompts (1 token each), then the scored ones."""
    from vllm import LLM, SamplingParams

    from vllm_kvcompress.assets import model_path
    from vllm_kvcompress.eval.quality import CHUNK, KV_BYTES, MAX_MODEL_LEN, PAGE

    kw = dict(dtype="bfloat16", enforce_eager=True, kv_cache_memory_bytes=KV_BYTES, max_model_len=MAX_MODEL_LEN,
              seed=0, block_size=PAGE, enable_prefix_caching=True, enable_chunked_prefill=True,
              max_num_batched_tokens=CHUNK)
    if kv is not None:
        kw["additional_config"] = {"kv_compress": kv}
    llm = LLM(str(model_path()), **kw)
    out = {}
    try:
        for name, s in sets.items():
            llm.generate([{"prompt_token_ids": ids} for ids in s["warm"]],
                         SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
            res = llm.generate([{"prompt_token_ids": it["ids"]} for it in s["items"]],
                               SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
            out[name] = [dict(text=o.outputs[0].text, cached=o.num_cached_tokens, prompt=len(o.prompt_token_ids))
                         for o in res]
    finally:
        llm.llm_engine.engine_core.shutdown()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default="/tmp/prefix_keep_quality")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:  # one engine in this process
        job = json.loads(Path(args.worker).read_text())
        Path(job["out"]).write_text(json.dumps(run_engine(job["kv"], job["sets"])))
        return 0
    from vllm_kvcompress.eval.scoring import score_passkey

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = build_sets(args.seed)
    results = {}
    for name in args.configs.split(","):
        t = time.perf_counter()
        job = out_dir / "job.json"
        job.write_text(json.dumps(dict(kv=CONFIGS[name], sets=sets, out=str(out_dir / "engine.json"))))
        subprocess.run([sys.executable, __file__, "--worker", str(job)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        raw = json.loads((out_dir / "engine.json").read_text())
        row = {}
        for s, items in sets.items():
            got = raw[s]
            ok = [score_passkey(g["text"], it["answer"]) for g, it in zip(got, items["items"])]
            row[s] = dict(correct=int(sum(ok)), total=len(ok), hit_tokens=[g["cached"] for g in got],
                          prompt_tokens=[g["prompt"] for g in got], answers=[g["text"] for g in got])
        results[name] = row
        print(f"{name:18s} " + "  ".join(f"{s}: {r['correct']}/{r['total']} (hits {min(r['hit_tokens'])}-"
                                           f"{max(r['hit_tokens'])} tokens)" for s, r in row.items())
              + f"  [{time.perf_counter() - t:.0f} s]", flush=True)
    for f in ("job.json", "engine.json"):
        (out_dir / f).unlink(missing_ok=True)
    (out_dir / "results.json").write_text(json.dumps(dict(seed=args.seed, results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
