"""Prompts of the quality harness, built at run time from the Paul Graham essays
(``vllm_kvcompress.assets.essays_text``; nothing is committed): needles hidden in essay
text at chosen depths, and perplexity windows. Fixed seeds: every configuration sees
exactly the same token ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

SEED = 0
MULTIKEY_NUM_KEYS = 4
PPL_LEN = 4096

PASSKEY_PREFIX = ("There is an important pass key hidden inside a lot of irrelevant text. "
                  "Find it and memorize it. I will quiz you about the pass key.\n\n")
# SmolLM2-135M needs the repeated needle and the Question/Answer frame to reach ~100% with the full cache;
# with one statement or without "Answer:" it often continues "The pass key is" with "a password that ...".
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. The pass key is {key}."
PASSKEY_QUESTION = "\n\nQuestion: What is the pass key?\nAnswer: The pass key is"
# The hard case: the key stated exactly once (the full cache still finds it at 1K-4K, 5 depths).
PASSKEY_ONCE_NEEDLE = " The pass key is {key}."

MULTIKEY_PREFIX = ("Some special magic numbers are hidden inside a lot of irrelevant text. "
                   "Find them and memorize them. I will quiz you about one of them.\n\n")
MULTIKEY_NEEDLE = " The special magic number for {word} is {value}."
MULTIKEY_QUESTION = "\n\nWhat is the special magic number for {word}? The special magic number for {word} is"
MULTIKEY_WORDS = ("apple", "river", "candle", "tiger", "window", "garden", "rocket", "violin", "marble",
                  "forest", "pencil", "island", "jacket", "lemon", "anchor", "castle", "mirror", "saddle",
                  "button", "harbor")



def depth_grid(n: int) -> list[float]:
    """``n`` evenly spaced depths in [0, 1], both ends included (``n == 1``: the middle)."""
    if n <= 1:
        return [0.5]
    return [round(float(x), 4) for x in np.linspace(0.0, 1.0, n)]


def mid_depth_grid(n: int) -> list[float]:
    """``n`` depths at the middles of ``n`` equal parts of [0, 1] (multi-key: interior needles)."""
    return [round((i + 0.5) / n, 4) for i in range(max(n, 1))]


class Haystack:
    """The essays as one token stream, with the sentence boundaries needles snap to."""

    def __init__(self, tokenizer, text: str) -> None:
        self.tok = tokenizer
        self.ids: list[int] = tokenizer(text, add_special_tokens=False).input_ids
        pieces = tokenizer.convert_ids_to_tokens(self.ids)
        # boundary b: a sentence ends with token b-1, so text can be cut before token b
        ends = [i + 1 for i, p in enumerate(pieces) if p.rstrip("Ċ").endswith((".", "?", "!", '."', '?"', '!"'))]
        self.boundaries = np.asarray(ends, dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    def snap(self, pos: int, lo: int, max_back: int = 64) -> int:
        """The last sentence boundary in ``[max(lo, pos - max_back), pos]``, else ``pos``."""
        i = int(np.searchsorted(self.boundaries, pos, side="right")) - 1
        if i >= 0:
            b = int(self.boundaries[i])
            if b >= max(lo, pos - max_back):
                return b
        return pos


@dataclass
class Prompt:
    ids: list[int]
    needle_pos: list[int]  # token index of each needle's first token (in needle order)
    hay_start: int  # first haystack token
    hay_tokens: int  # haystack tokens (excluding needles)


def build_prompt(hay: Haystack, target_len: int, prefix: str, needles: Sequence[tuple[float, str]],
                 question: str, offset: int) -> Prompt:
    """``prefix`` + essay text from ``offset`` with each needle text inserted at its depth + ``question``.

    Depth 0 puts a needle right after the prefix, 1 right before the question; in
    between a needle snaps back to the previous sentence end (at most 64 tokens).
    The haystack is sized so the whole prompt is ``target_len`` tokens (within a
    few tokens: text is re-tokenized across the cuts); it ends at a sentence end.
    """
    overhead = len(hay.encode(prefix)) + len(hay.encode(question)) + sum(len(hay.encode(t)) for _, t in needles)
    n_hay = target_len - overhead
    if n_hay < 16:
        raise ValueError(f"target length {target_len} leaves no room for the haystack")
    end = hay.snap(offset + n_hay, offset + n_hay // 2, max_back=256)
    start = end - n_hay
    if start < 0 or end > len(hay.ids):
        raise ValueError(f"offset {offset} + {n_hay} tokens is outside the essays ({len(hay.ids)} tokens)")
    seg = hay.ids[start:end]
    cuts = []
    for d, _ in needles:
        k = int(round(d * n_hay))
        if 0 < k < n_hay:
            k = hay.snap(start + k, start + 1) - start
        cuts.append(k)
    order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
    text = prefix
    prev = 0
    before: dict[int, str] = {}
    for i in order:
        text += hay.decode(seg[prev:cuts[i]])
        before[i] = text
        text += needles[i][1]
        prev = cuts[i]
        if prev < n_hay and not hay.decode(seg[prev:prev + 1])[:1].isspace():
            text += " "  # the essays often run sentences together ("accelerating.We")
    text += hay.decode(seg[prev:]) + question
    ids = hay.encode(text)
    return Prompt(ids=ids, needle_pos=[len(hay.encode(before[i])) for i in range(len(needles))],
                  hay_start=len(hay.encode(prefix)), hay_tokens=n_hay)


def _offset(rng: np.random.Generator, hay: Haystack, length: int) -> int:
    return int(rng.integers(0, len(hay.ids) - 2 * length))


def passkey_prompts(hay: Haystack, lengths: Sequence[int], depths: Sequence[float], seed: int = SEED,
                    needle: str = PASSKEY_NEEDLE, task: str = "passkey") -> list[dict]:
    """One prompt per (length, depth); the same seed gives the same keys and essay text for every needle."""
    rng = np.random.default_rng([seed, 1])
    items = []
    for length in lengths:
        for d in depths:
            key = str(int(rng.integers(10000, 100000)))
            p = build_prompt(hay, length, PASSKEY_PREFIX, [(d, needle.format(key=key))], PASSKEY_QUESTION,
                             _offset(rng, hay, length))
            items.append(dict(task=task, length=length, depth=d, answer=key, ids=p.ids,
                              needle_pos=p.needle_pos[0], hay_start=p.hay_start, hay_tokens=p.hay_tokens))
    return items


def multikey_prompts(hay: Haystack, lengths: Sequence[int], depths: Sequence[float], num_keys: int = MULTIKEY_NUM_KEYS,
                     seed: int = SEED, task: str = "multikey") -> list[dict]:
    """One prompt per (length, depth): ``num_keys`` needles of one shape (the queried one at
    the depth, the others at random depths). ``task`` "distractor" (``num_keys`` 2): one fact
    stated once and one distractor fact of the same shape, from a seed stream of its own."""
    rng = np.random.default_rng([seed, 2 if task == "multikey" else 4])
    items = []
    for length in lengths:
        for d in depths:
            words = [str(w) for w in rng.choice(MULTIKEY_WORDS, size=num_keys, replace=False)]
            values = [str(v) for v in rng.choice(np.arange(100000, 1000000), size=num_keys, replace=False)]
            # distractor depths: random, at least 0.05 from each other and from the queried one
            ds = [d]
            while len(ds) < num_keys:
                x = round(float(rng.uniform(0.0, 1.0)), 4)
                if all(abs(x - y) >= 0.05 for y in ds):
                    ds.append(x)
            needles = [(ds[i], MULTIKEY_NEEDLE.format(word=words[i], value=values[i])) for i in range(num_keys)]
            p = build_prompt(hay, length, MULTIKEY_PREFIX, needles, MULTIKEY_QUESTION.format(word=words[0]),
                             _offset(rng, hay, length))
            items.append(dict(task=task, length=length, depth=d, answer=values[0], word=words[0],
                              distractors=dict(zip(words[1:], values[1:])), ids=p.ids, needle_pos=p.needle_pos[0],
                              hay_start=p.hay_start, hay_tokens=p.hay_tokens))
    return items


def ppl_windows(hay: Haystack, n: int, length: int = PPL_LEN, seed: int = SEED) -> list[dict]:
    """``n`` non-overlapping ``length``-token windows of the essay stream, one per equal segment."""
    rng = np.random.default_rng([seed, 3])
    seg = len(hay.ids) // max(n, 1)
    if seg < length:
        raise ValueError(f"{n} windows of {length} tokens do not fit into {len(hay.ids)} essay tokens")
    items = []
    for i in range(n):
        off = i * seg + int(rng.integers(0, seg - length + 1))
        items.append(dict(task="ppl", window=i, offset=off, ids=hay.ids[off:off + length]))
    return items



SUMMARY_INSTRUCTION = "Summarize the following essay in detail.\n\n{essay}"
SUMMARY_TOKENS = 256


def summary_prompts(hay: Haystack, lengths: Sequence[int], n: int, seed: int = SEED) -> list[dict]:
    """``n`` chat prompts per length asking for a detailed summary of an essay excerpt (the
    model's chat template; the excerpt sized so the prompt is ``length`` tokens within a
    few, cut at a sentence end); the answers are long (``SUMMARY_TOKENS``)."""
    rng = np.random.default_rng([seed, 5])
    items = []
    for length in lengths:
        shell = hay.tok.apply_chat_template([{"role": "user", "content": SUMMARY_INSTRUCTION.format(essay="")}],
                                            add_generation_prompt=True, tokenize=True)
        overhead = len(shell if isinstance(shell, list) else shell["input_ids"])
        for _ in range(n):
            off = _offset(rng, hay, length)
            start = hay.snap(off, max(off - 256, 0), max_back=256)
            end = hay.snap(start + length - overhead, start + (length - overhead) // 2, max_back=256)
            text = hay.decode(hay.ids[start:end]).strip()
            ids = hay.tok.apply_chat_template([{"role": "user", "content": SUMMARY_INSTRUCTION.format(essay=text)}],
                                              add_generation_prompt=True, tokenize=True)
            ids = list(ids if isinstance(ids, list) else ids["input_ids"])
            items.append(dict(task="summary", length=length, depth=None, answer=None, ids=ids))
    return items
