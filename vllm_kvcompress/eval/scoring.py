"""Scoring of the quality harness: retrieval answers, perplexity, and summaries."""

from __future__ import annotations

import math
import re

import numpy as np

def score_passkey(output: str, key: str) -> bool:
    """The pass key appears in the output."""
    return key in output


def score_multikey(output: str, value: str) -> bool:
    """Exact match: the first number in the output is the queried value."""
    m = re.search(r"\d+", output)
    return m is not None and m.group(0) == value


def runs_on(output: str, value: str) -> bool:
    """The first number in the output is the queried value with more digits after it: the
    fact was retrieved (not the distractor's) but the answer did not stop. Counted apart,
    never as correct: a diagnostic of which way a multi-key / distractor answer failed."""
    m = re.search(r"\d+", output)
    return m is not None and m.group(0) != value and m.group(0).startswith(value)


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



def identical_prefix(a: list[int], b: list[int]) -> int:
    """Tokens two answers share before their first difference."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def rouge_l(a: list[int], b: list[int]) -> float:
    """ROUGE-L F1 over tokens: the longest common subsequence against both lengths. Once two
    greedy answers diverge, the identical prefix says nothing more; the LCS still credits a
    summary that goes on to make the same points in the same order (a reworded sentence,
    one fact fewer), which is what a reader of a long answer sees."""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def summarize_agreement(items: list[dict]) -> dict:
    """Mean identical prefix (tokens) and ROUGE-L F1 of long answers against the full cache's,
    overall and per prompt length (each item has ``prefix``, ``rouge_l``, ``length``)."""
    by_len: dict[str, list[dict]] = {}
    for it in items:
        by_len.setdefault(str(it["length"]), []).append(it)
    mean = lambda xs, k: float(np.mean([x[k] for x in xs])) if xs else float("nan")  # noqa: E731
    return dict(prefix=mean(items, "prefix"), rouge_l=mean(items, "rouge_l"),
                identical=float(np.mean([it["prefix"] == it["tokens_out"] for it in items])) if items else float("nan"),
                by_length={k: dict(prefix=mean(v, "prefix"), rouge_l=mean(v, "rouge_l")) for k, v in by_len.items()},
                n=len(items))
