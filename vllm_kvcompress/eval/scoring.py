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

