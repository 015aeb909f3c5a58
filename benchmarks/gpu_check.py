"""GPU check of the Triton kernels: correctness, speed and CUDA-graph capture.

Runs on any CUDA machine that has only torch and triton installed (no vLLM, no
package index): copy this repository over and run, from its root::

    PYTHONPATH=. python benchmarks/gpu_check.py [--out-dir DIR] [--budget-s N]

It imports only ``vllm_kvcompress.triton_kernels`` (the kernels) and
``vllm_kvcompress.ops`` (their torch references); neither imports vLLM, and
this script must never need it. Under 8 minutes on an H100/H200 by default
(``--budget-s 360`` for the three sections, plus start-up).

Sections (each has its own share of the time budget; when it is spent the
remaining cases of that section are listed as skipped, not run):

1. ``correctness`` (60%): each kernel (``decode_attention_scores``,
   ``window_scores``, ``compact_windows``) compiled for real and compared with
   its torch reference in ``ops`` on GQA shapes 9/3 x 64, 32/8 x 128 and
   64/8 x 128, page sizes 16/32/64, bf16/fp16/fp32 caches in vLLM's
   TRITON_ATTN page layout (``[nb, bs, H, 2*D]``, K|V per head), with
   boundary cases (window length 1, exactly a page, a page + 1, empty windows
   and empty new-token sets, windows starting mid-row, overlapping compaction
   windows, -1 padding, many requests of very different lengths). Max abs
   error per case against per-dtype tolerances (compaction must be exact).
   Order: bf16, edge cases, fp16, fp32; most of the time is Triton compiling
   (a few kernel variants per shape x page x dtype), so a run with a cold
   Triton cache may skip the last fp32 cases where a rerun will not.
2. ``speed`` (30%): the fused decode kernel (attention + scores), the same
   kernel without scores, and a dense floor (torch
   ``scaled_dot_product_attention`` on contiguous K/V of the same length) at
   requests R in 1/8/64/256 x context L in 1k/8k/32k with R*L <= 2M tokens
   (bf16, 32/8 x 128, page 16). Eager calls; median
   of CUDA-event timings after warm-up, L2 flushed before each repeat;
   microseconds and GB/s of KV read (K and V once) vs the card's peak
   bandwidth (from ``torch.cuda.get_device_properties``, else a table, else
   'unknown').
3. ``cuda_graph`` (10%): capture the decode kernel (with and without scores;
   bf16 and fp32) in a ``torch.cuda.CUDAGraph``, replay it, compare with eager
   (bit-exact), replay again with new queries and shorter ``seq_lens`` written
   into the captured buffers; replay vs eager time.

Output: ``gpu_check.json`` and ``gpu_check.md`` in ``--out-dir`` (default
``docs/results/gpu_check/``; the JSON is rewritten after each section, so a
killed run still leaves results) and a printed summary with the overall
PASS/FAIL. Exit code 1 if any correctness or graph case failed or any case
raised, 2 if the check cannot run here (no CUDA without ``--smoke``, no
triton).

``--smoke`` runs the same code small: float32 only, one or two tiny shapes
per kernel (on a GPU: one speed case, fp32 graphs). Without CUDA it runs on CPU under the Triton interpreter (it sets
``TRITON_INTERPRET=1`` itself before importing triton), times the torch floor
once and skips the kernel timings and the graph section (interpreted timings
mean nothing; graphs need CUDA). The test suite runs it
(``tests/test_gpu_check.py``); results go to ``gpu_check_smoke.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # so the check works without PYTHONPATH too

# Share of --budget-s per section.
BUDGET_SHARE = {"correctness": 0.60, "speed": 0.30, "cuda_graph": 0.10}
DEFAULT_BUDGET_S = {"full": 360.0, "smoke": 120.0}

SHAPES = [(9, 3, 64), (32, 8, 128), (64, 8, 128)]  # (query heads, KV heads, head size)
PAGE_SIZES = [16, 32, 64]
SMOKE_CASES = [((9, 3, 64), 16), ((4, 2, 32), 32)]  # (shape, page size)

# (rtol, atol) of the attention output per cache dtype: the kernel and the
# reference both compute in float32 and round once to the cache dtype.
OUT_TOL = {"float32": (1e-4, 1e-5), "bfloat16": (1e-2, 1e-2), "float16": (2e-3, 2e-3)}
SCORE_TOL = (1e-4, 1e-5)  # the float32 score cache, for every cache dtype
EXACT = (0.0, 0.0)  # compaction moves values: must be bit-exact

# speed grid: (requests, context length); cases above MAX_SPEED_TOKENS are left out
SPEED_GRID = [(r, n) for n in (1024, 8192, 32768) for r in (1, 8, 64, 256)]
MAX_SPEED_TOKENS = 1 << 21
SPEED_SHAPE, SPEED_BS, SPEED_DTYPE = (32, 8, 128), 16, "bfloat16"

# peak memory bandwidth (bytes/s) by device-name substring, when the properties lack it
BANDWIDTH_TABLE = [
    ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
]

torch = None  # imported in main() (after TRITON_INTERPRET is settled)
tk = None  # vllm_kvcompress.triton_kernels.kernels
ops = None  # vllm_kvcompress.ops


# ====================================================================== sections and results


@dataclass
class Section:
    name: str
    budget_s: float
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    elapsed_s: float = 0.0
    ran: bool = False

    def spent(self) -> bool:
        return time.perf_counter() - self.t0 > self.budget_s

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.ran = True

    def finish(self) -> None:
        self.elapsed_s = round(time.perf_counter() - self.t0, 2)
        skipped = sum(r["status"] == "skipped" and r.get("reason") == "budget" for r in self.rows)
        if skipped:
            self.notes.append(f"time budget ({self.budget_s:.0f} s) spent: {skipped} case(s) skipped")

    def counts(self) -> dict:
        out: dict = {}
        for r in self.rows:
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out

    def to_json(self) -> dict:
        return {"budget_s": round(self.budget_s, 1), "elapsed_s": self.elapsed_s, "ran": self.ran,
                "counts": self.counts(), "notes": self.notes, "cases": self.rows}


def _num(x: float):
    """JSON-safe float (NaN/inf as strings)."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def _err_text(exc: BaseException) -> str:
    line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {line[:300]}"


def compare(got, want, rtol: float, atol: float) -> tuple[float, bool]:
    """Max abs error and whether every element is within ``atol + rtol*|want|`` (NaN fails)."""
    got, want = got.float(), want.float()
    if got.shape != want.shape:
        return float("nan"), False
    if got.numel() == 0:
        return 0.0, True
    err = (got - want).abs()
    ok = bool((err <= atol + rtol * want.abs()).all())
    return float(err.max()), ok


# ====================================================================== input builders


@dataclass
class Paged:
    """One layer's paged cache: the physical buffer and the kernels' views of it."""

    phys: object  # NHD: [nb, bs, H, 2D] (vLLM TRITON_ATTN default); HND: [nb, H, bs, 2D]
    k_t: object  # [nb, H, D, bs]
    v: object  # [nb, H, bs, D]
    acc: object  # [nb, H, bs] float32 or None
    layout: str

    def clone(self) -> "Paged":
        return paged_views(self.phys.clone(), None if self.acc is None else self.acc.clone(), self.layout)


def paged_views(phys, acc, layout: str) -> Paged:
    D = phys.shape[-1] // 2
    k, v = phys.split(D, dim=-1)
    if layout == "NHD":  # k, v: [nb, bs, H, D]
        return Paged(phys, k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3), acc, layout)
    return Paged(phys, k.transpose(2, 3), v, acc, layout)  # HND: k, v [nb, H, bs, D]


def make_paged(nb, H, D, bs, dtype, dgen, dev, with_acc=True, layout="NHD") -> Paged:
    dims = (nb, bs, H, 2 * D) if layout == "NHD" else (nb, H, bs, 2 * D)
    phys = torch.randn(dims, generator=dgen, device=dev, dtype=torch.float32).to(dtype)
    acc = torch.rand(nb, H, bs, generator=dgen, device=dev) if with_acc else None
    return paged_views(phys, acc, layout)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def make_rows(lens, starts, bs, nb, gen):
    """Unshifted block-table rows (distinct random blocks; block 0 is vLLM's null block);
    window ``i`` has ``lens[i]`` slots from entry ``starts[i]``, earlier entries are 0 (freed)."""
    need = [s + cdiv(max(n, 1), bs) for n, s in zip(lens, starts)]
    perm = torch.randperm(nb - 1, generator=gen) + 1
    bt = torch.zeros(len(lens), max(need) + 1, dtype=torch.int32)
    o = 0
    for i, (n_pages, s) in enumerate(zip(need, starts)):
        k = n_pages - s
        bt[i, s:s + k] = perm[o:o + k].to(torch.int32)
        o += k
    return bt


def blocks_needed(lens, starts, bs) -> int:
    return sum(s + cdiv(max(n, 1), bs) for n, s in zip(lens, starts)) + 4


def shift(bt, starts):
    """The builder's shifted rows: entry 0 is the window's first entry."""
    cols = bt.shape[1]
    idx = (torch.as_tensor(starts)[:, None] + torch.arange(cols)[None, :]).clamp(max=cols - 1)
    return bt.gather(1, idx)


def log_uniform(n: int, lo: int, hi: int, gen) -> list[int]:
    u = torch.rand(n, generator=gen)
    vals = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))).round().long()
    vals[0], vals[-1] = lo, hi
    return [int(x) for x in vals]


def generators(seed: int, dev):
    gen = torch.Generator().manual_seed(seed)
    dgen = torch.Generator(device=dev).manual_seed(seed)
    return gen, dgen


# ====================================================================== the correctness cases


@dataclass
class Case:
    kernel: str  # decode | window | compact
    name: str
    shape: tuple  # (Hq, H, D)
    bs: int
    dtype: str
    opts: dict = field(default_factory=dict)

    def row(self) -> dict:
        Hq, H, D = self.shape
        return {"kernel": self.kernel, "case": self.name, "shape": f"{Hq}/{H}x{D}", "block_size": self.bs,
                "dtype": self.dtype}


def decode_lens(bs: int, smoke: bool) -> list[int]:
    if smoke:
        return [1, bs - 1, bs, bs + 1, 2 * bs + 3]
    return [1, 2, bs - 1, bs, bs + 1, 2 * bs, 3 * bs - 1, 5 * bs + 7, 1000 + bs // 2, 1537]


def window_spec(bs: int, smoke: bool) -> list[tuple]:
    """(retained slots, new tokens, start entry, weight pattern) per request."""
    spec = [
        (0, 1, 0, "ones"),  # window of length 1
        (0, bs, 0, "ones"),  # exactly one page
        (bs - 1, 1, 1, "ones"),  # the new token closes a page, start mid-row
        (bs, bs + 1, 2, "rand"),  # a page + 1 new tokens across a page boundary
        (2 * bs + 1, 3, 0, "zeros"),  # no weighted query: new slots still zeroed
        (bs + 3, 0, 1, "ones"),  # empty new-token set
        (5, 2 * bs - 1, 1, "tail"),  # SnapKV-like: only the last queries weigh
    ]
    if not smoke:
        spec += [(600, 64, 3, "rand"), (3 * bs, 7, 3, "sparse")]
    return spec


def compact_spec(bs: int, smoke: bool) -> list[tuple]:
    """(window slots, kept, old start entry, new start entry) per request; windows overlap."""
    spec = [
        (bs + 1, bs, 0, 0),  # keep exactly a page
        (3 * bs, 2 * bs - 1, 0, 1),  # destination one page later (overlapping)
        (bs + 1, bs + 1, 0, 1),  # keep a page + 1, all of it, shifted
        (bs, 0, 2, 2),  # keep nothing
        (1, 1, 0, 0),  # window of length 1
        (2 * bs + 2, 5, 0, 2),  # tiny keep, far destination
    ]
    if not smoke:
        spec += [(5 * bs - 3, 2 * bs + 1, 1, 3), (4 * bs + 5, 4 * bs + 5, 1, 1), (40 * bs + 3, 9 * bs, 2, 4)]
    return spec


def chunk_weights(kind: str, m: int, gen):
    if kind == "ones":
        return torch.ones(m)
    if kind == "zeros":
        return torch.zeros(m)
    if kind == "tail":
        w = torch.zeros(m)
        w[-4:] = 1.0
        return w
    if kind == "sparse":
        w = torch.rand(m, generator=gen) + 0.1
        w[torch.arange(m) % 3 != 1] = 0.0
        return w
    return torch.rand(m, generator=gen) + 0.1


def run_decode(case: Case, dev, smoke: bool, seed: int) -> dict:
    Hq, H, D = case.shape
    bs, dtype = case.bs, getattr(torch, case.dtype)
    gen, dgen = generators(seed, dev)
    lens = case.opts.get("lens") or decode_lens(bs, smoke)
    if case.opts.get("many"):
        lens = log_uniform(*case.opts["many"], gen)
    R = len(lens)
    starts = [int(x) for x in torch.randint(0, 4, (R,), generator=gen)]
    starts[0] = 0
    nb = blocks_needed(lens, starts, bs)
    lay = make_paged(nb, H, D, bs, dtype, dgen, dev, layout=case.opts.get("layout", "NHD"))
    sbt = shift(make_rows(lens, starts, bs, nb, gen), starts).to(dev)
    sl = torch.tensor(lens, dtype=torch.int32, device=dev)
    q = torch.randn(R, Hq, D, generator=dgen, device=dev).to(dtype)
    w = torch.rand(R, generator=gen).to(dev)
    w[0] = 0.0  # a zero weight still resets the new slot
    scale = D ** -0.5
    acc_ref = lay.acc.clone()
    ref = ops.decode_attention_scores_reference(q, lay.k_t, lay.v, sbt, sl, scale, acc_ref, w)
    out = torch.full_like(q, float("nan"))
    tk.decode_attention_scores(q, lay.k_t, lay.v, sbt, sl, scale, lay.acc, w, out=out)
    checks = {"out": (out, ref, OUT_TOL[case.dtype]), "scores": (lay.acc, acc_ref, SCORE_TOL)}
    if case.opts.get("attn_only"):
        acc_before = lay.acc.clone()
        out2 = tk.decode_attention_scores(q, lay.k_t, lay.v, sbt, sl, scale)
        checks["out_attn_only"] = (out2, ref, OUT_TOL[case.dtype])
        checks["scores_untouched"] = (lay.acc, acc_before, EXACT)
    return checks


def window_inputs(case: Case, smoke: bool, gen):
    bs = case.bs
    if case.opts.get("many"):
        R, lo, hi = case.opts["many"]
        nr = log_uniform(R, lo, hi, gen)
        n = [int(x) for x in torch.randint(0, 81, (R,), generator=gen)]
        kinds = [["ones", "rand", "zeros", "tail", "sparse"][i % 5] for i in range(R)]
        spec = [(a, b, i % 4, k) for i, (a, b, k) in enumerate(zip(nr, n, kinds))]
    else:
        spec = window_spec(bs, smoke)
    if case.opts.get("no_weights"):
        spec = [(a, b, s, "zeros") for a, b, s, _ in spec]
    return spec


def run_window(case: Case, dev, smoke: bool, seed: int) -> dict:
    Hq, H, D = case.shape
    bs, dtype = case.bs, getattr(torch, case.dtype)
    gen, dgen = generators(seed, dev)
    spec = window_inputs(case, smoke, gen)
    nr = [s[0] for s in spec]
    n = [s[1] for s in spec]
    starts = [s[2] for s in spec]
    lens = [a + b for a, b in zip(nr, n)]
    nb = blocks_needed(lens, starts, bs)
    lay = make_paged(nb, H, D, bs, dtype, dgen, dev)
    sbt = shift(make_rows(lens, starts, bs, nb, gen), starts).to(dev)
    T = sum(n)
    q = torch.randn(T, Hq, D, generator=dgen, device=dev).to(dtype)
    w = torch.cat([chunk_weights(k, m, gen) for (_, m, _, k) in spec]).to(dev)
    qs = torch.zeros(len(spec) + 1, dtype=torch.int32)
    qs[1:] = torch.cumsum(torch.tensor(n), 0)
    qs, sl = qs.to(dev), torch.tensor(lens, dtype=torch.int32, device=dev)
    nrt = torch.tensor(nr, dtype=torch.int32, device=dev)
    scale = D ** -0.5
    acc_ref = lay.acc.clone()
    ops.window_scores_reference(q, qs, lay.k_t, sbt, sl, nrt, w, scale, acc_ref)
    tk.window_scores(q, qs, lay.k_t, sbt, sl, nrt, w, scale, lay.acc)
    return {"scores": (lay.acc, acc_ref, SCORE_TOL)}


def pick_kept(c: int, k: int, gen):
    """``k`` ascending slots of ``c``, always with the first (sink) and the newest when k >= 2."""
    if k >= c:
        return torch.arange(c)
    if k < 2:
        return torch.zeros(k, dtype=torch.long)
    middle = torch.randperm(c - 2, generator=gen)[:k - 2] + 1
    return torch.cat([torch.tensor([0, c - 1]), middle]).sort().values


def compact_inputs(case: Case, smoke: bool, gen):
    if case.opts.get("many"):
        R, lo, hi = case.opts["many"]
        counts = log_uniform(R, lo, hi, gen)
        spec = []
        for i, c in enumerate(counts):
            k = int(round(c * float(torch.rand(1, generator=gen))))
            o = i % 3
            spec.append((c, k, o, o + int(torch.randint(0, 3, (1,), generator=gen))))
        return spec
    return compact_spec(case.bs, smoke)


def run_compact(case: Case, dev, smoke: bool, seed: int) -> dict:
    Hq, H, D = case.shape
    bs, dtype = case.bs, getattr(torch, case.dtype)
    gen, dgen = generators(seed, dev)
    spec = compact_inputs(case, smoke, gen)
    R = len(spec)
    cols = max(max(o + cdiv(c, bs), nw + cdiv(max(k, 1), bs)) for c, k, o, nw in spec) + 1
    nb = R * cols + 4
    variant = case.opts.get("variant", "move_acc")
    lay = make_paged(nb, H, D, bs, dtype, dgen, dev, with_acc=variant != "no_acc")
    bt = ((torch.randperm(nb - 1, generator=gen)[:R * cols] + 1).view(R, cols).to(torch.int32)).to(dev)
    kmax = max(k for _, k, _, _ in spec) + 2  # extra -1 padding columns
    kept = torch.full((R, H, kmax), -1, dtype=torch.long)
    for i, (c, k, _, _) in enumerate(spec):
        for h in range(H):
            sel = pick_kept(c, k, gen)
            kept[i, h, :len(sel)] = sel
    if variant == "padding":
        i = next(j for j, s in enumerate(spec) if s[1] >= 4)
        kept[i, 0, 3] = -1  # a -1 inside the first keep entries ends that row
    kept = kept.to(dev)
    keep = torch.tensor([k for _, k, _, _ in spec], device=dev)
    old = torch.tensor([o for _, _, o, _ in spec], device=dev)
    new = torch.tensor([nw for _, _, _, nw in spec], device=dev)
    new_acc = torch.rand(kept.shape, generator=dgen, device=dev) if variant == "new_acc" else None
    ref = lay.clone()
    ops.compact_windows_reference(ref.k_t, ref.v, ref.acc, bt, old, new, kept, keep, new_acc)
    tk.compact_windows(lay.k_t, lay.v, lay.acc, bt, old, new, kept, keep, new_acc)
    checks = {"cache": (lay.phys, ref.phys, EXACT)}
    if lay.acc is not None:
        checks["scores"] = (lay.acc, ref.acc, EXACT)
    return checks


RUNNERS = {"decode": run_decode, "window": run_window, "compact": run_compact}


def correctness_cases(smoke: bool) -> list[Case]:
    """bf16 first (what users run), then the edge cases, then fp16 and fp32."""
    if smoke:
        (s1, b1), (s2, b2) = SMOKE_CASES
        cases = [Case(k, "mixed", s, b, "float32") for s, b in SMOKE_CASES for k in ("decode", "window", "compact")]
        return cases + [
            Case("decode", "empty window + attention only", s1, b1, "float32",
                 {"lens": [0, 1, b1 + 1], "attn_only": True}),
            Case("window", "no weighted query", s2, b2, "float32", {"no_weights": True}),
            Case("compact", "new scores", s1, b1, "float32", {"variant": "new_acc"}),
            Case("compact", "no scores", s2, b2, "float32", {"variant": "no_acc"}),
            Case("compact", "-1 padding ends a row", s2, b2, "float32", {"variant": "padding"}),
            Case("decode", "HND page layout", s2, b2, "float32", {"layout": "HND"}),
            Case("decode", "12 requests, lengths 1..300", s1, b1, "float32", {"many": (12, 1, 300)}),
            Case("window", "8 requests, retained 1..200", s1, b1, "float32", {"many": (8, 1, 200)}),
            Case("compact", "8 requests, windows 1..200", s1, b1, "float32", {"many": (8, 1, 200)}),
        ]

    def matrix(dtype: str) -> list[Case]:
        return [Case(k, "mixed", s, b, dtype) for s in SHAPES for b in PAGE_SIZES
                for k in ("decode", "window", "compact")]

    s, b = SHAPES[1], 16
    edge = [
        Case("decode", "empty window + attention only", s, b, "bfloat16",
             {"lens": [0, 1, b, b + 1, 0, 3 * b], "attn_only": True}),
        Case("decode", "40 requests, lengths 1..4000", s, b, "bfloat16", {"many": (40, 1, 4000)}),
        Case("decode", "HND page layout", s, 32, "bfloat16", {"layout": "HND"}),
        Case("decode", "40 requests, lengths 1..4000", SHAPES[0], 64, "float32", {"many": (40, 1, 4000)}),
        Case("window", "24 requests, retained 1..3000", s, b, "bfloat16", {"many": (24, 1, 3000)}),
        Case("window", "no weighted query", s, b, "bfloat16", {"no_weights": True}),
        Case("compact", "new scores", s, b, "bfloat16", {"variant": "new_acc"}),
        Case("compact", "no scores", s, b, "bfloat16", {"variant": "no_acc"}),
        Case("compact", "-1 padding ends a row", s, b, "bfloat16", {"variant": "padding"}),
        Case("compact", "32 requests, windows 1..3000", s, b, "bfloat16", {"many": (32, 1, 3000)}),
    ]
    return matrix("bfloat16") + edge + matrix("float16") + matrix("float32")


def run_correctness(sec: Section, dev, smoke: bool) -> None:
    for idx, case in enumerate(correctness_cases(smoke)):
        row = case.row()
        if sec.spent():
            sec.rows.append({**row, "status": "skipped", "reason": "budget"})
            continue
        t0 = time.perf_counter()
        try:
            checks = RUNNERS[case.kernel](case, dev, smoke, seed=1000 + idx)
            errs, tols, ok = {}, {}, True
            for name, (got, want, (rtol, atol)) in checks.items():
                err, good = compare(got, want, rtol, atol)
                errs[name], tols[name], ok = _num(err), f"rtol={rtol:g} atol={atol:g}", ok and good
            row.update(max_abs_err=errs, tol=tols, status="pass" if ok else "fail")
        except Exception as exc:  # noqa: BLE001 - one broken case must not stop the check
            row.update(status="error", error=_err_text(exc))
        row["seconds"] = round(time.perf_counter() - t0, 3)
        sec.rows.append(row)
        if row["status"] != "pass":
            print(f"  {row['status'].upper()}: {case.kernel} {case.name} {row['shape']} bs={case.bs} "
                  f"{case.dtype}: {row.get('max_abs_err') or row.get('error')}", flush=True)


# ====================================================================== speed


def peak_bandwidth(dev_index: int = 0) -> tuple[float | None, str]:
    """Peak memory bandwidth in bytes/s and where it came from."""
    p = torch.cuda.get_device_properties(dev_index)
    clock_khz, bus_bits = getattr(p, "memory_clock_rate", 0), getattr(p, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        bw = 2 * clock_khz * 1e3 * bus_bits / 8  # double data rate
        if 1e11 < bw < 5e13:
            return bw, "device properties (2 x memory clock x bus width)"
    for key, bw in BANDWIDTH_TABLE:
        if key in p.name:
            return bw, f"table ({key})"
    return None, "unknown"


def cuda_time_us(fn, flush, warmup: int = 3, reps: int = 20, max_s: float = 3.0) -> float:
    """Median CUDA-event time of ``fn`` (L2 flushed before each repeat, outside the events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times, t_end = [], time.perf_counter() + max_s
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
        if len(times) >= 5 and time.perf_counter() > t_end:
            break
    return statistics.median(times)


def dense_floor_fn(R: int, L: int, shape, dtype, dev):
    """SDPA on contiguous K/V of the same length: the flash backend with native GQA when it
    takes these inputs, else torch's default choice, else K/V expanded to the query heads."""
    Hq, H, D = shape
    q = torch.randn(R, Hq, 1, D, device=dev, dtype=dtype)
    k = torch.randn(R, H, L, D, device=dev, dtype=dtype)
    v = torch.randn(R, H, L, D, device=dev, dtype=dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        SDPBackend = sdpa_kernel = None

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, k, v, enable_gqa=True)

    attempts = [("default backend, enable_gqa", lambda: sdpa(q, k, v, enable_gqa=True))]
    if sdpa_kernel is not None:
        attempts.insert(0, ("flash backend, enable_gqa", flash))
    for how, fn in attempts:
        try:
            with warnings.catch_warnings():  # torch warns about every backend it cannot use
                warnings.simplefilter("ignore")
                fn()
            return fn, how
        except (TypeError, RuntimeError):
            continue
    k, v = k.repeat_interleave(Hq // H, dim=1), v.repeat_interleave(Hq // H, dim=1)
    return (lambda: sdpa(q, k, v)), f"K/V expanded to {Hq} heads (reads {Hq // H}x the bytes)"


def full_windows(R: int, L: int, H: int, D: int, bs: int, dtype, dev):
    """R windows of L slots on randomly placed pages of a TRITON_ATTN-layout cache:
    (views, block table, seq_lens)."""
    pages = cdiv(L, bs)
    nb = R * pages + 1
    phys = torch.randn(nb, bs, H, 2 * D, device=dev, dtype=dtype)
    lay = paged_views(phys, torch.zeros(nb, H, bs, device=dev), "NHD")
    bt = (torch.randperm(nb - 1, device=dev)[:R * pages] + 1).view(R, pages).to(torch.int32)
    return lay, bt, torch.full((R,), L, dtype=torch.int32, device=dev)


def paged_decode_fns(R: int, L: int, shape, bs: int, dtype, dev):
    Hq, H, D = shape
    lay, bt, sl = full_windows(R, L, H, D, bs, dtype, dev)
    q = torch.randn(R, Hq, D, device=dev, dtype=dtype)
    w = torch.ones(R, device=dev)
    out = torch.empty_like(q)
    scale = D ** -0.5

    def fused():
        tk.decode_attention_scores(q, lay.k_t, lay.v, bt, sl, scale, lay.acc, w, out=out)

    def attn_only():
        tk.decode_attention_scores(q, lay.k_t, lay.v, bt, sl, scale, out=out)

    return fused, attn_only


def speed_case(R: int, L: int, dev, peak, flush) -> dict:
    Hq, H, D = SPEED_SHAPE
    dtype = getattr(torch, SPEED_DTYPE)
    kv_bytes = R * L * H * D * 2 * dtype.itemsize
    row = {"name": f"R={R} L={L}", "requests": R, "context": L, "shape": f"{Hq}/{H}x{D}",
           "block_size": SPEED_BS, "dtype": SPEED_DTYPE, "kv_bytes": kv_bytes}
    free, _ = torch.cuda.mem_get_info()
    if 2.3 * kv_bytes > 0.8 * free:
        return {**row, "status": "skipped", "reason": f"needs ~{2.3 * kv_bytes / 1e9:.1f} GB"}
    fused, attn_only = paged_decode_fns(R, L, SPEED_SHAPE, SPEED_BS, dtype, dev)
    floor, how = dense_floor_fn(R, L, SPEED_SHAPE, dtype, dev)
    for key, fn in (("fused", fused), ("attn_only", attn_only), ("sdpa", floor)):
        us = cuda_time_us(fn, flush)
        row[f"{key}_us"] = round(us, 2)
        row[f"{key}_GBps"] = round(kv_bytes / (us * 1e-6) / 1e9, 1)
        if peak:
            row[f"{key}_pct_peak"] = round(100 * kv_bytes / (us * 1e-6) / peak, 1)
    row["fused_vs_sdpa"] = round(row["fused_us"] / row["sdpa_us"], 2)
    row["sdpa_variant"] = how
    row["status"] = "ok"
    return row


# prefill-chunk scores: (requests, window slots, weighted queries per request). q=64: the
# SnapKV / PyramidInfer observation window; q=L: H2O, which weights every prompt query.
WINDOW_GRID = [(1, 8192, 64), (8, 2048, 64), (1, 8192, 8192), (4, 2048, 2048)]


def window_speed_case(R: int, L: int, nq: int, dev, flush) -> dict:
    """``window_scores`` for the last ``nq`` queries of R windows of L slots, against the
    floor of attention itself: flash SDPA of the same queries over the same keys (causal
    when nq == L). The scores need softmax statistics and a second pass over the keys."""
    Hq, H, D = SPEED_SHAPE
    dtype = getattr(torch, SPEED_DTYPE)
    bs = SPEED_BS
    row = {"name": f"window R={R} L={L} q={nq}", "kind": "window", "requests": R, "context": L,
           "queries": nq, "shape": f"{Hq}/{H}x{D}", "block_size": bs, "dtype": SPEED_DTYPE}
    lay, bt, sl = full_windows(R, L, H, D, bs, dtype, dev)
    q = torch.randn(R * nq, Hq, D, device=dev, dtype=dtype)
    qs = torch.arange(R + 1, dtype=torch.int32) * nq  # host: as the backend passes it
    nr = torch.full((R,), L - nq, dtype=torch.int32)
    w = torch.ones(R * nq)
    scale = D ** -0.5

    def window():
        tk.window_scores(q, qs, lay.k_t, bt, sl, nr, w, scale, lay.acc)

    qd = q.view(R, nq, Hq, D).transpose(1, 2)
    kd = torch.randn(R, H, L, D, device=dev, dtype=dtype)
    vd = torch.randn_like(kd)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    try:
        sdpa(qd, kd, vd, is_causal=nq == L, enable_gqa=True)
        floor = lambda: sdpa(qd, kd, vd, is_causal=nq == L, enable_gqa=True)  # noqa: E731
    except (TypeError, RuntimeError):
        ke, ve = kd.repeat_interleave(Hq // H, dim=1), vd.repeat_interleave(Hq // H, dim=1)
        floor = lambda: sdpa(qd, ke, ve, is_causal=nq == L)  # noqa: E731
    row["window_us"] = round(cuda_time_us(window, flush), 2)
    row["sdpa_us"] = round(cuda_time_us(floor, flush), 2)
    row["window_vs_sdpa"] = round(row["window_us"] / row["sdpa_us"], 2)
    row["status"] = "ok"
    return row


def smoke_speed(sec: Section, dev) -> None:
    """Interpreter: one timing of the torch floor on a tiny shape; kernel timings skipped."""
    R, L, shape = 2, 256, SMOKE_CASES[0][0]
    floor, how = dense_floor_fn(R, L, shape, torch.float32, dev)
    floor()
    t0 = time.perf_counter()
    floor()
    us = (time.perf_counter() - t0) * 1e6
    Hq, H, D = shape
    sec.rows.append({"name": f"R={R} L={L}", "requests": R, "context": L, "shape": f"{Hq}/{H}x{D}",
                     "dtype": "float32", "sdpa_us": round(us, 1), "sdpa_variant": how, "status": "ok",
                     "reason": "CPU: one wall-clock timing of torch SDPA only"})
    sec.notes.append("Triton kernel timings skipped: under the interpreter they measure nothing; "
                     "the torch floor was timed once on CPU")


def run_speed(sec: Section, dev, smoke: bool, env: dict) -> None:
    if dev.type != "cuda":
        smoke_speed(sec, dev)
        return
    grid = [(8, 1024)] if smoke else [(r, n) for r, n in SPEED_GRID if r * n <= MAX_SPEED_TOKENS]
    left_out = [] if smoke else [(r, n) for r, n in SPEED_GRID if r * n > MAX_SPEED_TOKENS]
    if left_out:
        sec.notes.append(f"left out (over {MAX_SPEED_TOKENS} tokens): " + ", ".join(f"R={r} L={n}" for r, n in left_out))
    sec.notes.append("GB/s = K and V bytes read once / time (the fused kernel reads K twice and the scores "
                     "once more); eager calls, host launch overhead included; L2 flushed before every "
                     "timed repeat")
    peak = env.get("peak_bandwidth_Bps")
    torch.cuda.empty_cache()  # the correctness section's cached blocks, before mem_get_info
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)  # > any L2 today
    for R, L in grid:
        if sec.spent():
            sec.rows.append({"name": f"R={R} L={L}", "requests": R, "context": L, "status": "skipped",
                             "reason": "budget"})
            continue
        try:
            sec.rows.append(speed_case(R, L, dev, peak, flush))
        except Exception as exc:  # noqa: BLE001
            sec.rows.append({"name": f"R={R} L={L}", "requests": R, "context": L, "status": "error",
                             "error": _err_text(exc)})
        torch.cuda.empty_cache()
    for R, L, nq in ([] if smoke else WINDOW_GRID):
        if sec.spent():
            sec.rows.append({"name": f"window R={R} L={L} q={nq}", "kind": "window", "status": "skipped",
                             "reason": "budget"})
            continue
        try:
            sec.rows.append(window_speed_case(R, L, nq, dev, flush))
        except Exception as exc:  # noqa: BLE001
            sec.rows.append({"name": f"window R={R} L={L} q={nq}", "kind": "window", "status": "error",
                             "error": _err_text(exc)})
        torch.cuda.empty_cache()
    variants = sorted({r["sdpa_variant"] for r in sec.rows if "sdpa_variant" in r})
    if variants:
        sec.notes.append("SDPA floor: " + "; ".join(variants))


# ====================================================================== CUDA graph


def graph_inputs(dev, dtype, shape, bs: int, seed: int = 7):
    Hq, H, D = shape
    gen, dgen = generators(seed, dev)
    lens = [1, bs, bs + 1, 77, 300, 1000, 2 * bs - 1, 513]
    starts = [i % 3 for i in range(len(lens))]
    nb = blocks_needed(lens, starts, bs)
    lay = make_paged(nb, H, D, bs, dtype, dgen, dev)
    bt = shift(make_rows(lens, starts, bs, nb, gen), starts).to(dev)
    sl = torch.tensor(lens, dtype=torch.int32, device=dev)
    q = torch.randn(len(lens), Hq, D, generator=dgen, device=dev).to(dtype)
    w = torch.rand(len(lens), generator=dgen, device=dev)
    return lay, bt, sl, q, w


def capture(fn):
    """Warm up on a side stream (compiles the kernel), then capture ``fn`` in a graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def graph_check(with_scores: bool, dev, dtype, shape, bs: int) -> list[dict]:
    """Capture, replay == eager; then new queries and shorter seq_lens in the captured buffers."""
    Hq, H, D = shape
    lay, bt, sl, q, w = graph_inputs(dev, dtype, shape, bs)
    acc0 = lay.acc.clone()
    scale = D ** -0.5
    out = torch.empty_like(q)
    acc = lay.acc if with_scores else None
    wts = w if with_scores else None
    g = capture(lambda: tk.decode_attention_scores(q, lay.k_t, lay.v, bt, sl, scale, acc, wts, out=out))
    tag = "fused decode" if with_scores else "decode, attention only"
    rows = []
    for step, name in enumerate(("capture + replay", "replay, new queries and shorter seq_lens")):
        if step == 1:
            q.copy_(torch.randn_like(q))
            sl.copy_((sl - torch.arange(len(sl), device=dev, dtype=sl.dtype)).clamp_min(1))
        lay.acc.copy_(acc0)
        g.replay()
        torch.cuda.synchronize()
        got_out, got_acc = out.clone(), lay.acc.clone()
        lay.acc.copy_(acc0)
        ref = tk.decode_attention_scores(q, lay.k_t, lay.v, bt, sl, scale, acc, wts)
        err_o, ok_o = compare(got_out, ref, *EXACT)
        err_a, ok_a = compare(got_acc, lay.acc, *EXACT)
        rows.append({"case": f"{tag}: {name}", "shape": f"{Hq}/{H}x{D}", "block_size": bs, "dtype": str(dtype)[6:],
                     "max_abs_err": {"out": _num(err_o), "scores": _num(err_a)}, "tol": "bit-exact vs eager",
                     "status": "pass" if ok_o and ok_a else "fail"})
    flush = torch.empty(1, device=dev)
    rows[-1]["replay_us"] = round(cuda_time_us(g.replay, flush, reps=10), 2)
    rows[-1]["eager_us"] = round(cuda_time_us(
        lambda: tk.decode_attention_scores(q, lay.k_t, lay.v, bt, sl, scale, acc, wts, out=out), flush, reps=10), 2)
    return rows


def run_graph(sec: Section, dev, smoke: bool) -> None:
    if dev.type != "cuda":
        sec.notes.append("skipped: CUDA graphs need a CUDA device (CPU / Triton interpreter run)")
        return
    dtypes = ["float32"] if smoke else ["bfloat16", "float32"]
    for dt in dtypes:
        for with_scores in (True, False):
            tag = f"{'fused decode' if with_scores else 'decode, attention only'} {dt}"
            if sec.spent():
                sec.rows.append({"case": tag, "status": "skipped", "reason": "budget"})
                continue
            try:
                sec.rows.extend(graph_check(with_scores, dev, getattr(torch, dt), SPEED_SHAPE, SPEED_BS))
            except Exception as exc:  # noqa: BLE001
                sec.rows.append({"case": tag, "status": "error", "error": _err_text(exc)})


# ====================================================================== environment and output


def environment(dev, smoke: bool, dtypes: list[str]) -> dict:
    import triton

    env = {
        "mode": "smoke" if smoke else "full",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton.__version__,
        "device_type": dev.type,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "kernel_object": type(tk._decode_partial_kernel).__name__,
        "dtypes": dtypes,
        "vllm_imported": "vllm" in sys.modules,
        "repo_commit": _git_commit(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        bw, src = peak_bandwidth(0)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                   memory_GB=round(p.total_memory / 1e9, 1), peak_bandwidth_Bps=bw,
                   peak_bandwidth_GBps=None if bw is None else round(bw / 1e9),
                   peak_bandwidth_source=src)
    else:
        env.update(device=f"CPU ({platform.processor() or platform.machine()}), Triton interpreter",
                   torch_threads=torch.get_num_threads())
    return env


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def summary(sections: dict) -> dict:
    bad = {name: {k: v for k, v in s.counts().items() if k in ("fail", "error")} for name, s in sections.items()}
    failed = any(bad.values())
    corr = sections["correctness"].counts()
    return {"overall": "FAIL" if failed else "PASS", "problems": {k: v for k, v in bad.items() if v},
            "correctness": corr, "speed": sections["speed"].counts(), "cuda_graph": sections["cuda_graph"].counts()}


def report(env: dict, sections: dict) -> dict:
    return {"tool": "benchmarks/gpu_check.py", "environment": env,
            "sections": {k: s.to_json() for k, s in sections.items()}, "summary": summary(sections)}


def _fmt_err(errs) -> str:
    if not isinstance(errs, dict):
        return ""
    return ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in errs.items())


def markdown(rep: dict) -> str:
    env, secs = rep["environment"], rep["sections"]
    lines = [f"# GPU check ({env['mode']}): {rep['summary']['overall']}", "",
             "Written by `benchmarks/gpu_check.py`; see its docstring for what each section measures.", "",
             "| | |", "|---|---|"]
    for k in ("device", "capability", "memory_GB", "peak_bandwidth_GBps", "peak_bandwidth_source", "torch",
              "torch_cuda", "triton", "python", "dtypes", "triton_interpret", "kernel_object", "vllm_imported",
              "repo_commit", "started"):
        if k in env:
            lines.append(f"| {k} | {env[k]} |")
    lines += _md_section("Correctness", secs["correctness"],
                         ["kernel", "case", "shape", "block_size", "dtype", "status", "max abs err", "seconds"],
                         lambda r: [r.get("kernel"), r.get("case"), r.get("shape"), r.get("block_size"),
                                    r.get("dtype"), r["status"], _fmt_err(r.get("max_abs_err")) or
                                    r.get("error") or r.get("reason", ""), r.get("seconds", "")])
    dec = dict(secs["speed"], cases=[r for r in secs["speed"]["cases"] if r.get("kind") != "window"])
    lines += _md_section("Speed (fused decode vs dense SDPA floor)", dec,
                         ["case", "status", "fused us", "fused GB/s (% peak)", "attn-only us", "SDPA us",
                          "SDPA GB/s (% peak)", "fused / SDPA"],
                         lambda r: [r["name"], r["status"], r.get("fused_us", ""), _gbps(r, "fused"),
                                    r.get("attn_only_us", ""), r.get("sdpa_us", ""), _gbps(r, "sdpa"),
                                    r.get("fused_vs_sdpa", r.get("reason", r.get("error", "")))])
    win = [r for r in secs["speed"]["cases"] if r.get("kind") == "window"]
    if win:
        lines += ["", "### Prefill-chunk scores (`window_scores`) vs flash SDPA of the same queries", "",
                  "| case | status | window_scores us | SDPA us | window / SDPA |", "|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['status']} | {r.get('window_us', '')} | {r.get('sdpa_us', '')} | "
                  f"{r.get('window_vs_sdpa', r.get('reason', r.get('error', '')))} |" for r in win]
    lines += _md_section("CUDA graph", secs["cuda_graph"],
                         ["case", "shape", "dtype", "status", "max abs err", "replay us", "eager us"],
                         lambda r: [r.get("case"), r.get("shape", ""), r.get("dtype", ""), r["status"],
                                    _fmt_err(r.get("max_abs_err")) or r.get("error") or r.get("reason", ""),
                                    r.get("replay_us", ""), r.get("eager_us", "")])
    return "\n".join(lines) + "\n"


def _gbps(r: dict, key: str) -> str:
    if f"{key}_GBps" not in r:
        return ""
    pct = r.get(f"{key}_pct_peak")
    return f"{r[f'{key}_GBps']}" + (f" ({pct}%)" if pct is not None else "")


def _md_section(title: str, sec: dict, header: list[str], cells) -> list[str]:
    out = ["", f"## {title}", "",
           f"Budget {sec['budget_s']} s, took {sec['elapsed_s']} s; counts: {sec['counts'] or 'none'}."]
    out += [f"- {n}" for n in sec["notes"]]
    if sec["cases"]:
        out += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in sec["cases"]:
            out.append("| " + " | ".join(str(c) if c is not None else "" for c in cells(r)) + " |")
    return out


def write_outputs(out_dir: Path, stem: str, rep: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(rep, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(rep))


def print_summary(rep: dict, out_dir: Path, stem: str, wall_s: float) -> None:
    env, secs, summ = rep["environment"], rep["sections"], rep["summary"]
    print(f"gpu_check ({env['mode']}) on {env['device']}: torch {env['torch']}, triton {env['triton']}")
    for name, s in secs.items():
        notes = f"  [{'; '.join(s['notes'])}]" if s["notes"] else ""
        print(f"  {name:<12} {s['counts'] or 'nothing run'} in {s['elapsed_s']} s{notes}")
    for r in secs["speed"]["cases"]:
        if r["status"] == "ok" and "fused_us" in r:
            print(f"    {r['name']:<16} fused {r['fused_us']:>9.1f} us {_gbps(r, 'fused'):>16} GB/s | "
                  f"SDPA {r['sdpa_us']:>9.1f} us {_gbps(r, 'sdpa'):>16} GB/s")
    for r in secs["speed"]["cases"]:
        if r["status"] == "ok" and "window_us" in r:
            print(f"    {r['name']:<26} window_scores {r['window_us']:>9.1f} us | SDPA {r['sdpa_us']:>9.1f} us"
                  f" | x{r['window_vs_sdpa']}")
    print(f"overall: {summ['overall']}" + (f" {summ['problems']}" if summ["problems"] else "")
          + f" ({wall_s:.1f} s; {out_dir / stem}.json, .md)")


# ====================================================================== main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="See the module docstring for the sections and the output.")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny float32 run; on CPU under the Triton interpreter when there is no CUDA")
    ap.add_argument("--out-dir", type=Path, default=REPO / "docs" / "results" / "gpu_check")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="time budget of the three sections together (default 360; smoke 120)")
    return ap.parse_args(argv)


def pick_device(smoke: bool):
    """CUDA when present (unless TRITON_INTERPRET=1 is set); smoke falls back to CPU + interpreter."""
    global torch
    import torch as _torch

    torch = _torch
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if torch.cuda.is_available() and not interp:
        return torch.device("cuda", 0)
    if not smoke:
        why = "TRITON_INTERPRET=1 is set" if interp else "no CUDA device is visible to torch"
        print(f"gpu_check: CUDA is required ({why}); use --smoke for the CPU run under the Triton interpreter",
              file=sys.stderr)
        raise SystemExit(2)
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return torch.device("cpu")


def load_kernels() -> None:
    global tk, ops
    try:
        import vllm_kvcompress.ops as _ops
        import vllm_kvcompress.triton_kernels.kernels as _tk
    except ImportError as exc:
        print(f"gpu_check: cannot import the kernels ({_err_text(exc)}); this needs torch and triton only",
              file=sys.stderr)
        raise SystemExit(2) from exc
    tk, ops = _tk, _ops


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    dev = pick_device(args.smoke)
    load_kernels()
    if dev.type == "cuda":  # the references must be exact float32 (no TF32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    mode = "smoke" if args.smoke else "full"
    budget = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET_S[mode]
    sections = {k: Section(k, budget * share) for k, share in BUDGET_SHARE.items()}
    dtypes = ["float32"] if args.smoke else ["bfloat16", "float16", "float32"]
    env = environment(dev, args.smoke, dtypes)
    stem = "gpu_check_smoke" if args.smoke else "gpu_check"
    print(f"gpu_check ({mode}) on {env['device']}; budget {budget:.0f} s", flush=True)
    steps = [("correctness", lambda s: run_correctness(s, dev, args.smoke)),
             ("speed", lambda s: run_speed(s, dev, args.smoke, env)),
             ("cuda_graph", lambda s: run_graph(s, dev, args.smoke))]
    for name, fn in steps:
        sec = sections[name]
        sec.start()
        try:
            fn(sec)
        except Exception as exc:  # noqa: BLE001 - a section-level failure is reported, not raised
            sec.rows.append({"case": f"{name} section", "status": "error", "error": _err_text(exc)})
        sec.finish()
        print(f"  {name}: {sec.counts() or 'nothing run'} ({sec.elapsed_s} s)", flush=True)
        write_outputs(args.out_dir, stem, report(env, sections))
    rep = report(env, sections)
    rep["environment"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_outputs(args.out_dir, stem, rep)
    print_summary(rep, args.out_dir, stem, time.perf_counter() - t_start)
    return 0 if rep["summary"]["overall"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
