"""Interleaved A/B throughput against vanilla vLLM in one sitting (issue #28): every
variant's requests/s as a ratio to the vanilla runs right next to it, over >= 2 rounds.

Single runs on a shared machine drift by ~30% (other jobs, frequency, page cache), so a
ratio of two runs minutes apart says little. Here vanilla runs between every pair of
variant runs, and each variant run is compared with the vanilla runs just before and
just after it (the mean of their requests/s): linear drift cancels, and a round costs
n + 1 vanilla runs for n variants instead of 2n. Round 1 runs the variants in the given
order, round 2 in reverse, and so on (the order is fixed: no randomness), so no variant
always runs first; the closing vanilla run of a round opens the next::

    V a V b V c V | c V b V a V | ...

Then the same for prefill-only runs (1 output token, ``--prefill-prompts`` prompts of the
same file) of vanilla and the variants with a budget (default: every variant except the
``@none`` ones): each one's seconds per prompt / the adjacent vanilla runs' is its
prefill cost.

Per variant, printed and written (``ab.json``, ``ab.md`` under ``--out-dir``; ``--quick``
writes to ``<out-dir>/quick``): each round's ratio, the median over rounds and the
min-max, preemptions (the variant's runs and their vanilla neighbours'), the KV page
layout its compressed layers use, and pass/fail against issue #28's targets:

* nothing evicted (``pyramid@none``, ``h2o@none``): >= 0.95x vanilla's requests/s;
* 25% retention (``pyramid@0.25``, ``h2o@0.25``): >= 1.4x;
* ``pyramid+drop@0.25`` (``--kv-prefill-drop``): >= 3x;
* prefill-only cost (seconds per prompt vs vanilla's): pyramid <= 1.10x, h2o <= 1.25x.

The verdicts hold for the issue's settings only (1.9K-token prompts, >= 2 rounds, not
``--quick``); the report says when a run differs. Also written: the machine record
(CPU model, ISA flags incl. amx_tile / amx_bf16 / avx512_bf16, vLLM's CPU attention ISA
and the pages compressed layers use), the exact command and every run's command.
``ab.json`` (and ``ab.md``) are rewritten after every run, marked partial until the end.

A variant is ``POLICY@BUDGET[:NAME=VALUE...][:--kv-FLAG...]``: POLICY a policy name of the bench
commands (``pyramid``, ``h2o``, ``snapkv``, ``streaming``, ``pyramid+drop`` =
``--kv-prefill-drop``, ``pyramid+drop@L``), BUDGET ``--kv-budget`` (``0.25`` = 25% of
the prompt, a whole number of tokens) or ``none`` (the smallest budget under which no
layer evicts anything: ``bench_throughput.nothing_evicted_budget``), then environment
variables of that variant's engines only, e.g.

* ``pyramid@0.25:VLLM_KVCOMPRESS_CPU_AMX=0``: compressed layers on "vec" pages and our
  AVX512-BF16 dot-path kernels instead of vLLM's "amx" pages and AMX prefill attention;
* ``h2o@0.25:VLLM_KVCOMPRESS_FUSED_PREFILL=amx``: H2O's prefill attention + scores fused
  on "amx" pages instead of vLLM's AMX attention + a scoring pass;
* ``pyramid@0.25:--no-kv-pin-prefix-hits``: an engine flag of the plugin for that variant
  (``--kv-x``, ``--no-kv-x`` or ``--kv-x=VALUE``).

Those switches change nothing on a CPU without AMX (vLLM never picks "amx" pages there;
the report's *pages* column says "vec" for both sides). The default list is
``pyramid@none,h2o@none,pyramid@0.25,h2o@0.25,pyramid+drop@0.25``, plus, only where
vLLM's attention ISA on this machine is "amx", ``pyramid@0.25:VLLM_KVCOMPRESS_CPU_AMX=0``,
``h2o@0.25:VLLM_KVCOMPRESS_CPU_AMX=0`` and ``h2o@0.25:VLLM_KVCOMPRESS_FUSED_PREFILL=amx``
(and each env variant is also compared with its default-env sibling: ratio of medians).

Engine flags and the runs themselves are ``bench_throughput.py``'s (``Runner``: one
``vllm bench throughput`` subprocess per run, essay prompts of ``--input-len`` tokens with
the chat template, exactly ``--output-len`` tokens out, same KV memory for every run).

    python benchmarks/bench_ab.py                   # the issue's targets; 8 variants on an AMX CPU
    python benchmarks/bench_ab.py --dry-run         # the machine, the variants and the run order only
    python benchmarks/bench_ab.py --variants h2o@0.25,h2o@0.25:VLLM_KVCOMPRESS_FUSED_PREFILL=amx --rounds 3
    python benchmarks/bench_ab.py --quick           # smoke test: 2 variants, 4 x 512 tokens, 1 round

Run count: 2 x rounds x variants + 1 full runs, plus the same for the prefill-only
variants; the default list with 2 rounds is 21 full runs of 24 prompts + 13 prefill-only
runs (roughly 2 h on the shared 2-core machine, an estimate; the plan is printed first).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import machine  # noqa: E402
from bench_throughput import (MIB, Runner, fmt_bytes, machine_info, nothing_evicted_budget,  # noqa: E402
                              parse_bytes, policy_flags)

REPO = HERE.parent
PROG = "bench_ab.py"
AMX_ENV = "VLLM_KVCOMPRESS_CPU_AMX"
FUSED_PREFILL_ENV = "VLLM_KVCOMPRESS_FUSED_PREFILL"
#: the plugin's switches a variant may set (None: any value); other VLLM_KVCOMPRESS_* names are refused
#: (a typo would silently change nothing), names outside the plugin pass through unchecked
SWITCHES: dict[str, tuple[str, ...] | None] = {
    AMX_ENV: ("0", "1"),
    FUSED_PREFILL_ENV: ("0", "1", "amx"),
    "VLLM_KVCOMPRESS_FUSED_DECODE": ("0", "1"),
    "VLLM_KVCOMPRESS_CPU_BF16DOT": ("0", "1"),
    "VLLM_KVCOMPRESS_OPS": None,
    "VLLM_KVCOMPRESS_BACKEND": None,
}
RESERVED_ENV = ("VLLM_KVCOMPRESS_STATS_FILE",)  # set by Runner for every run
BASE_VARIANTS = ("pyramid@none", "h2o@none", "pyramid@0.25", "h2o@0.25", "pyramid+drop@0.25")
AMX_VARIANTS = (f"pyramid@0.25:{AMX_ENV}=0", f"h2o@0.25:{AMX_ENV}=0", f"h2o@0.25:{FUSED_PREFILL_ENV}=amx")
QUICK_VARIANTS = ("pyramid@none", "h2o@0.25")
QUICK_AMX_VARIANTS = ("h2o@0.25", f"h2o@0.25:{AMX_ENV}=0")
#: the issue's prompt length ("1.9K-token prompts")
ISSUE_INPUT_LEN = 1920
#: issue #28's targets, each a same-sitting interleaved ratio (the median over rounds): phase "full" =
#: requests/s / vanilla's (higher is better), "prefill" = seconds per prompt / vanilla's (lower is better);
#: policies: exact policy names (``pyramid+drop@L`` has no target); retention None = any budget of that kind
TARGETS = (
    {"phase": "full", "kind": "nothing-evicted", "policies": ("pyramid", "h2o"), "retention": None,
     "op": ">=", "goal": 0.95},
    {"phase": "full", "kind": "retention", "policies": ("pyramid", "h2o"), "retention": 0.25, "op": ">=", "goal": 1.4},
    {"phase": "full", "kind": "retention", "policies": ("pyramid+drop",), "retention": 0.25, "op": ">=", "goal": 3.0},
    {"phase": "prefill", "kind": "retention", "policies": ("pyramid",), "retention": None, "op": "<=", "goal": 1.10},
    {"phase": "prefill", "kind": "retention", "policies": ("h2o",), "retention": None, "op": "<=", "goal": 1.25},
)
#: issue #29's target on vLLM's shared-prefix data (``--dataset prefix_repetition``): compressed
#: requests with vLLM's prefix cache on, against vanilla with its prefix cache on
PREFIX_TARGETS = (
    {"phase": "full", "kind": "retention", "policies": ("pyramid", "h2o"), "retention": 0.25, "op": ">=", "goal": 1.0},
)
PREFIX_VARIANTS = ("pyramid@0.25", "h2o@0.25")
#: ``--dataset prefix_repetition``: vLLM's own shared-prefix data, the issue's shape (4 prefixes of
#: 4/5 of the prompt, the rest unique per prompt)
PREFIX_SHARE, PREFIX_COUNT = 0.8, 4
PHASES = {
    "full": {"title": "Full runs: requests/s / the adjacent vanilla runs'", "metric": "requests/s vs vanilla",
             "higher_better": True},
    "prefill": {"title": "Prefill only (1 output token): seconds per prompt / the adjacent vanilla runs'",
                "metric": "prefill cost vs vanilla", "higher_better": False},
}


class VariantError(ValueError):
    """A bad variant spec; the message is one line."""


# --------------------------------------------------------------------------- variants

@dataclass(frozen=True)
class Variant:
    policy: str  # a policy name of vllm_kvcompress.config.variant_settings
    budget: str  # "none" (nothing evicted) or the --kv-budget value as given
    env: tuple[tuple[str, str], ...] = ()
    #: extra ``--kv-*`` engine flags of this variant's engines (e.g. ``--no-kv-pin-prefix-hits``)
    extra: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        return (f"{self.policy}@{self.budget}" + "".join(f":{k}={v}" for k, v in self.env)
                + "".join(f":{f}" for f in self.extra))

    @property
    def base(self) -> str:
        """The policy without its prefill variant (``pyramid+drop@8`` -> ``pyramid``)."""
        return self.policy.partition("+")[0]

    @property
    def drop(self) -> bool:
        return "+drop" in self.policy

    @property
    def kind(self) -> str:
        return "nothing-evicted" if self.budget == "none" else "retention"

    @property
    def retention(self) -> float | None:
        """The budget as a fraction of the prompt (None: nothing evicted, or a token budget)."""
        if self.budget == "none":
            return None
        b = float(self.budget)
        return b if 0 < b < 1 else None

    @property
    def default_env(self) -> "Variant":
        return Variant(self.policy, self.budget)

    def flags(self, input_len: int, output_len: int) -> list[str]:
        budget = nothing_evicted_budget(self.policy, input_len, output_len) if self.budget == "none" else self.budget
        return policy_flags(self.policy, budget) + [a for f in self.extra for a in f.split("=", 1)]


def parse_variant(text: str) -> Variant:
    """``POLICY@BUDGET[:NAME=VALUE...]`` -> :class:`Variant`; :class:`VariantError` (one line) if malformed."""
    from vllm_kvcompress.config import BUDGET_UNITS, ConfigError, KVCompressConfig, variant_settings

    s = text.strip()
    form = "expected POLICY@BUDGET[:NAME=VALUE...], e.g. pyramid@0.25, h2o@none, pyramid@0.25:VLLM_KVCOMPRESS_CPU_AMX=0"
    if not s:
        raise VariantError(f"empty variant; {form}")
    head, *envs = s.split(":")
    policy, at, budget = head.strip().rpartition("@")
    policy, budget = policy.strip(), budget.strip()
    if not at or not policy or not budget:
        raise VariantError(f"{text!r}: {form}")
    if policy.lower() in ("vanilla", "none"):
        raise VariantError(f"{text!r}: vanilla is the baseline every variant runs next to; name a policy")
    try:
        settings = variant_settings(policy)
    except ValueError as e:
        raise VariantError(f"{text!r}: {e}") from None
    if budget.lower() == "none":
        budget = "none"
    else:
        try:
            b = float(budget)
        except ValueError:
            raise VariantError(f"{text!r}: budget {budget!r} is neither 'none' (nothing evicted) nor a number; "
                               f"the budget is {BUDGET_UNITS}") from None
        try:
            KVCompressConfig.from_dict({**settings, "budget": b})
        except ConfigError as e:
            raise VariantError(f"{text!r}: {e}") from None
    env: list[tuple[str, str]] = []
    extra: list[str] = []
    for item in envs:
        if item.strip().startswith("--"):
            extra.append(_kv_flag(text, item.strip()))
            continue
        name, eq, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise VariantError(f"{text!r}: {item!r} is not NAME=VALUE (an environment variable of this variant)")
        if name in RESERVED_ENV:
            raise VariantError(f"{text!r}: {name} is set by the benchmark for every run")
        if name.startswith("VLLM_KVCOMPRESS_") and name not in SWITCHES:
            raise VariantError(f"{text!r}: unknown plugin switch {name}; known: {', '.join(SWITCHES)}")
        allowed = SWITCHES.get(name)
        if allowed is not None and value not in allowed:
            raise VariantError(f"{text!r}: {name}={value!r}: expected {' or '.join(allowed)}")
        if any(k == name for k, _ in env):
            raise VariantError(f"{text!r}: {name} set twice")
        env.append((name, value))
    return Variant(policy, budget, tuple(env), tuple(extra))


def _kv_flag(text: str, item: str) -> str:
    """A variant's ``--kv-*`` engine flag (``--kv-x``, ``--no-kv-x`` or ``--kv-x=VALUE``), checked
    against the plugin's flags; :class:`VariantError` (one line) if unknown."""
    from vllm_kvcompress.integration.cli_args import FLAGS

    name = item.partition("=")[0]
    known = {"--" + f.replace("_", "-") for f in FLAGS}
    base = "--" + name[len("--no-"):] if name.startswith("--no-") else name
    if base not in known or base in ("--kv-policy", "--kv-budget"):
        raise VariantError(f"{text!r}: {item!r} is not a --kv-* flag of the plugin (policy and budget are "
                           f"POLICY@BUDGET); known: {', '.join(sorted(known - {'--kv-policy', '--kv-budget'}))}")
    return item


def parse_variants(texts) -> list[Variant]:
    """A list of specs (or one comma-separated string) -> variants, refusing duplicates."""
    if isinstance(texts, str):
        texts = [t for t in texts.split(",") if t.strip()]
    out: list[Variant] = []
    for t in texts:
        v = parse_variant(t)
        if v in out:
            raise VariantError(f"{t!r}: listed twice")
        out.append(v)
    if not out:
        raise VariantError("no variants")
    return out


def default_variants(vllm_isa: str | None, quick: bool = False) -> list[str]:
    """The issue's targets, plus the AMX switches' A/B where vLLM's attention runs on "amx" pages."""
    amx = vllm_isa == "amx"
    if quick:
        return list(QUICK_AMX_VARIANTS if amx else QUICK_VARIANTS)
    return list(BASE_VARIANTS) + (list(AMX_VARIANTS) if amx else [])


def compressed_pages(vllm_isa: str | None, env: dict[str, str]) -> str | None:
    """The page layout (and attention ISA) of compressed layers under ``env``: vLLM's pick,
    except that ``VLLM_KVCOMPRESS_CPU_AMX=0`` moves "amx" to "vec" (``attention_backend``)."""
    if vllm_isa is None:
        return None
    keep_amx = (env.get(AMX_ENV, "1").strip() or "1") != "0"
    return "vec" if vllm_isa == "amx" and not keep_amx else vllm_isa


def policy_isa(info: dict, block_size: int | None) -> str | None:
    """vLLM's CPU attention ISA at the policies' page size (``--block-size``, the plugin's default 32)."""
    entries = info.get("vllm_attn_isa") or []
    bs = block_size or 32
    for e in entries:
        if e.get("block_size") == bs:
            return e.get("vllm")
    return entries[0].get("vllm") if entries else None


# --------------------------------------------------------------------------- run order and ratios

def schedule(n_variants: int, rounds: int) -> list[tuple[int | None, int]]:
    """The run order: ``(variant index or None for vanilla, round)``. Vanilla first, last and
    between every two variant runs; round r runs the variants forward when r is even,
    backward when odd; a round's closing vanilla run opens the next."""
    if n_variants < 1 or rounds < 1:
        return []
    order: list[tuple[int | None, int]] = [(None, 0)]
    for r in range(rounds):
        idx = range(n_variants) if r % 2 == 0 else range(n_variants - 1, -1, -1)
        for i in idx:
            order += [(i, r), (None, r)]
    return order


def adjacent_ratios(entries: list[dict], value) -> list[dict]:
    """For each variant entry (``entries[k]["variant"]`` not None), ``value(run)`` / the mean
    of the adjacent vanilla runs' (the one before and the one after; one of them where the
    other failed). ``entries[k]["run"]`` is None for a failed run."""
    out = []
    for k, e in enumerate(entries):
        if e["variant"] is None:
            continue
        x = value(e["run"]) if e.get("run") else None
        nbrs = [entries[j] for j in (k - 1, k + 1) if 0 <= j < len(entries) and entries[j]["variant"] is None]
        vals = [value(n["run"]) for n in nbrs if n.get("run")]
        vals = [v for v in vals if v is not None]
        base = sum(vals) / len(vals) if vals else None
        out.append({"variant": e["variant"], "round": e["round"], "value": x, "vanilla": vals, "vanilla_mean": base,
                    "ratio": x / base if x is not None and base else None,
                    "vanilla_preemptions": [n["run"].get("preemptions") for n in nbrs if n.get("run")],
                    "preemptions": e["run"].get("preemptions") if e.get("run") else None})
    return out


def summarize(ratios: list[dict], n_variants: int, rounds: int) -> list[dict]:
    """Per variant: its ratio in each round (None where a run failed), the median over rounds, min and max."""
    out = []
    for i in range(n_variants):
        per_round: list[float | None] = [None] * rounds
        pre: list = [None] * rounds
        van_pre: list = []
        for r in ratios:
            if r["variant"] == i:
                per_round[r["round"]] = r["ratio"]
                pre[r["round"]] = r["preemptions"]
                van_pre += r["vanilla_preemptions"]
        ok = [x for x in per_round if x is not None]
        out.append({"ratios": per_round, "median": statistics.median(ok) if ok else None,
                    "min": min(ok) if ok else None, "max": max(ok) if ok else None,
                    "preemptions": pre, "vanilla_preemptions": van_pre})
    return out


def target_for(v: Variant, phase: str, targets=TARGETS) -> dict | None:
    for t in targets:
        if (t["phase"] == phase and t["kind"] == v.kind and v.policy in t["policies"]
                and (t["retention"] is None or (v.retention is not None and abs(v.retention - t["retention"]) < 1e-9))):
            return t
    return None


def verdict(v: Variant, phase: str, median: float | None, targets=TARGETS) -> dict | None:
    """Pass/fail of a variant's median against its issue #28 (or #29) target (None: no target)."""
    t = target_for(v, phase, targets)
    if t is None:
        return None
    ok = median is not None and (median >= t["goal"] if t["op"] == ">=" else median <= t["goal"])
    return {"target": f"{t['op']} {t['goal']:.2f}x", "value": median, "pass": ok}


def issue_settings(input_len: int, rounds: int, quick: bool) -> list[str]:
    """Why this run's verdicts are not the issue's (empty: they are)."""
    why = []
    if quick:
        why.append("--quick")
    if abs(input_len - ISSUE_INPUT_LEN) > 0.05 * ISSUE_INPUT_LEN:
        why.append(f"{input_len}-token prompts, not ~{ISSUE_INPUT_LEN}")
    if rounds < 2:
        why.append(f"{rounds} round(s), not >= 2")
    return why


def env_vs_default(variants: list[Variant], summary: list[dict]) -> list[dict]:
    """Each env (or flag) variant's median / its default sibling's (both against their own adjacent
    vanilla runs)."""
    out = []
    for i, v in enumerate(variants):
        if not (v.env or v.extra) or v.default_env not in variants:
            continue
        j = variants.index(v.default_env)
        a, b = summary[i]["median"], summary[j]["median"]
        out.append({"variant": v.spec, "vs": v.default_env.spec, "ratio": a / b if a is not None and b else None})
    return out


# --------------------------------------------------------------------------- rendering

def fx(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _preempt(xs) -> str:
    return ",".join("n/a" if x is None else str(x) for x in xs) or "-"


def phase_rows(result: dict, phase: str) -> tuple[list[str], list[list[str]]]:
    ph = result["phases"][phase]
    rounds = ph["rounds"]
    cols = ["variant", "pages", *(f"r{r + 1}" for r in range(rounds)), "median", "min-max",
            "preempted (variant / vanilla)", "peak running (variant / vanilla)",
            "prefix-cache hits (variant / vanilla)", "target", "result"]

    def stat(k, key, fmt_):
        xs = [e["run"].get("stats", {}).get(key) for e in ph["runs"] if e["variant"] == k and e.get("run")]
        if all(x is None for x in xs):
            return "-"
        return ",".join("n/a" if x is None else format(x, fmt_) for x in xs)

    rows = []
    for k, s in enumerate(ph["summary"]):
        v = result["variants"][s["index"]]
        ver = s.get("verdict")
        rows.append([v["spec"] + (f" (budget {v['budget_flag']})" if v.get("budget_flag") and v["budget"] == "none" else ""),
                     v.get("compressed_pages") or "n/a", *(fx(x) for x in s["ratios"]), fx(s["median"]),
                     f"{fx(s['min'])}-{fx(s['max'])}" if s["min"] is not None else "n/a",
                     f"{_preempt(s['preemptions'])} / {_preempt(s['vanilla_preemptions'])}",
                     f"{stat(k, 'peak_running_reqs', 'd')} / {stat(None, 'peak_running_reqs', 'd')}",
                     f"{stat(k, 'prefix_cache_hit_rate', '.0%')} / {stat(None, 'prefix_cache_hit_rate', '.0%')}",
                     ver["target"] if ver else "-", ("PASS" if ver["pass"] else "FAIL") if ver else "-"])
    return cols, rows


def render_text(cols, rows) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]

    def line(xs):
        return "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(xs, widths)))

    return "\n".join([line(cols)] + [line(r) for r in rows])


def render_md_table(cols, rows) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(cols) - 4) + ["---", "---"]) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def machine_lines(info: dict, result: dict) -> list[str]:
    flags = info.get("isa_flags") or {}
    isa = result.get("vllm_attn_isa")
    return [f"CPU: {info.get('cpu') or '?'}, {info.get('cpu_count')} cores; ISA flags: "
            + ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in flags.items()),
            f"vLLM's CPU attention ISA at page size {result['config'].get('block_size') or 32}: {isa or 'unknown'}; "
            f"compressed layers by default: {compressed_pages(isa, result.get('base_env', {})) or 'unknown'}"
            + ("" if isa == "amx" else " (no AMX attention here: the VLLM_KVCOMPRESS_CPU_AMX / FUSED_PREFILL=amx "
                                       "switches change nothing on this machine)"),
            f"dtype {info.get('dtype')} ({info.get('dtype_reason')})"]


def phase_text(result: dict, phase: str, md: bool = False) -> list[str]:
    ph = result["phases"][phase]
    cols, rows = phase_rows(result, phase)
    s = ph["settings"]
    head = (f"{PHASES[phase]['title']}; {s['num_prompts']} prompts x {s['input_len']} tokens in / "
            f"{s['output_len']} out, {ph['rounds']} round(s)")
    van = [e["run"][ph["value_key"]] for e in ph["runs"] if e["variant"] is None and e.get("run")]
    drift = (f"vanilla: {len(van)} runs, {ph['value_key']} {min(van):.4g}-{max(van):.4g} "
             f"(max/min {max(van) / min(van):.2f})" if van and min(van) > 0 else "vanilla: no run")
    failed = [e["label"] for e in ph["runs"] if not e.get("run")]
    lines = [("### " if md else "") + head, ""]
    lines += render_md_table(cols, rows) if md else [render_text(cols, rows)]
    lines += ["", drift + "."]
    if failed:
        lines += [f"failed runs: {', '.join(failed)} (see ab.json)."]
    for c in ph.get("env_vs_default", []):
        lines += [f"{c['variant']} / {c['vs']}: {fx(c['ratio'])} (ratio of medians)."]
    return lines


def render_md(result: dict) -> str:
    info = result["machine"]
    why = result["not_issue_settings"]
    title = ("# Interleaved A/B vs vanilla vLLM, shared prefixes, prefix cache on (issue #29)"
             if result["config"].get("dataset") == "prefix_repetition" else "# Interleaved A/B vs vanilla vLLM (issue #28)")
    if result.get("partial"):
        title += " — PARTIAL (run in progress or interrupted)"
    if result.get("quick"):
        title += " — QUICK SMOKE RUN, not a result"
    cfg = result["config"]
    L = [title, "",
         f"`vllm bench throughput` runs (benchmarks/bench_ab.py), {result['dtype']}, `--kv-cache-memory-bytes "
         f"{fmt_bytes(cfg['kv_bytes'])}`, page size {cfg.get('block_size') or 'each run its default'}, `--enforce-eager`, "
         f"SmolLM2-135M; vanilla runs between every two variant runs and each variant run is divided by the mean "
         f"of its two vanilla neighbours; rounds alternate the variant order.", "",
         f"Machine: {machine.describe(info)}.", ""]
    L += [f"- {x}" for x in machine_lines(info, result)]
    L += [""]
    if why:
        L += [f"**Verdicts are not the issue's**: {'; '.join(why)}.", ""]
    for phase in ("full", "prefill"):
        if result["phases"].get(phase):
            L += phase_text(result, phase, md=True) + [""]
    L += ["Columns: *pages* = the KV page layout of compressed layers (vLLM's \"amx\" or \"vec\"); *rN* = round N's "
          "ratio (prefill: cost, lower is better); *preempted* = preemptions of the variant's runs / of their vanilla "
          "neighbours (from the plugin's stats file); *peak running* = most requests running at once; "
          "*prefix-cache hits* = prompt tokens taken from vLLM's prefix cache / all prompt tokens.", "",
          f"## Targets (issue {'#29' if result['config'].get('dataset') == 'prefix_repetition' else '#28'})", "", "| variant | metric | target | median | result |", "|---|---|---|---:|---|"]
    for t in result["targets"]:
        L.append(f"| {t['variant']} | {t['metric']} | {t['target']} | {fx(t['value'])} | "
                 f"{'PASS' if t['pass'] else 'FAIL'} |")
    L += ["", "## Command", "", "```bash", result["command"], "```", "", "Run order and each run's command:", "", "```bash"]
    for phase in ("full", "prefill"):
        for e in (result["phases"].get(phase) or {}).get("runs", []):
            L.append(f"# {e['label']}" + ("" if e.get("run") else f": FAILED ({e.get('error', '?')})"))
            if e.get("run"):
                L.append(e["run"]["command"])
    L += ["```", "", "Paths: `<cache>` is the plugin's cache, `<work-dir>` the run's `--work-dir` (logs, prompts, "
          "raw results); others are relative to the repository.", ""]
    return "\n".join(L)


def targets_of(result: dict) -> list[dict]:
    out = []
    for phase in ("full", "prefill"):
        ph = result["phases"].get(phase)
        if not ph:
            continue
        for s in ph["summary"]:
            if s.get("verdict"):
                out.append({"variant": result["variants"][s["index"]]["spec"], "phase": phase,
                            "metric": PHASES[phase]["metric"], **s["verdict"]})
    return out


# --------------------------------------------------------------------------- running

def phase_result(variants: list[Variant], entries: list[dict], rounds: int, phase: str, idx_map: list[int],
                 settings: dict, targets=TARGETS) -> dict:
    """Ratios, per-variant summary and verdicts of one phase (``idx_map``: phase index -> variant index)."""
    key = "requests_per_s" if phase == "full" else "seconds_per_prompt"
    ratios = adjacent_ratios(entries, lambda r: r.get(key))
    summ = summarize(ratios, len(idx_map), rounds)
    for k, s in enumerate(summ):
        s["index"] = idx_map[k]
        s["verdict"] = verdict(variants[idx_map[k]], phase, s["median"], targets)
    sub = [variants[i] for i in idx_map]
    return {"settings": settings, "rounds": rounds, "value_key": key, "runs": entries, "ratios": ratios,
            "summary": summ, "env_vs_default": env_vs_default(sub, summ)}


def run_phase(runner: Runner, variants: list[Variant], idx_map: list[int], rounds: int, phase: str, args,
              flags_of: dict, on_run) -> list[dict]:
    n = args.num_prompts if phase == "full" else min(args.prefill_prompts, args.num_prompts)
    out_len = args.output_len if phase == "full" else 1
    order = schedule(len(idx_map), rounds)
    entries: list[dict] = []
    for k, (i, r) in enumerate(order):
        v = None if i is None else variants[idx_map[i]]
        label = f"{'prefill ' if phase == 'prefill' else ''}r{r + 1} {'vanilla' if v is None else v.spec}"
        print(f"\n== {phase} run {k + 1}/{len(order)}: {label}", flush=True)
        e = {"variant": i, "round": r, "label": label, "run": None}
        try:
            res = runner.throughput(label, [] if v is None else flags_of[v], n=n, input_len=args.input_len,
                                    output_len=out_len, dataset_n=args.num_prompts, env=dict(v.env) if v else None,
                                    dataset_flags=dataset_flags(args, out_len))
            res["seconds_per_prompt"] = res["elapsed_s"] / res["num_prompts"]
            e["run"] = res
        except RuntimeError as ex:  # one failed run: its ratios are n/a, the sitting goes on
            e["error"] = str(ex).splitlines()[0]
            print(f"[{label}] FAILED: {ex}", flush=True)
        entries.append(e)
        on_run(phase, entries)
    return entries


def dataset_flags(args, output_len: int) -> list[str] | None:
    """``vllm bench throughput`` flags of ``--dataset`` (None: the essay prompts of bench_throughput)."""
    if args.dataset != "prefix_repetition":
        return None
    prefix = int(args.input_len * PREFIX_SHARE)
    return ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(prefix),
            "--prefix-repetition-suffix-len", str(args.input_len - prefix),
            "--prefix-repetition-num-prefixes", str(PREFIX_COUNT), "--prefix-repetition-output-len", str(output_len)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=None,
                    help="comma-separated POLICY@BUDGET[:NAME=VALUE...] (default: the issue's targets, plus the AMX "
                         "switches where vLLM's attention is 'amx')")
    ap.add_argument("--prefill-variants", default=None,
                    help="variants of the prefill-only runs (default: every variant with a budget, i.e. not @none; "
                         "'none' = no prefill-only runs)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 2; --quick 1)")
    ap.add_argument("--num-prompts", type=int, default=None, help="prompts per full run (default 24; --quick 4)")
    ap.add_argument("--input-len", type=int, default=None, help="prompt tokens incl. chat template (1920; --quick 512)")
    ap.add_argument("--output-len", type=int, default=None, help="output tokens per request (128; --quick 16)")
    ap.add_argument("--prefill-prompts", type=int, default=4, help="prompts per prefill-only run (default 4; 0 = none)")
    ap.add_argument("--dtype", default="auto", choices=machine.DTYPES,
                    help="model dtype (auto: bfloat16 where the CPU has avx512_bf16/amx_bf16, else float32)")
    ap.add_argument("--kv-bytes", type=parse_bytes, default=None, help="--kv-cache-memory-bytes (256MiB; --quick 48MiB)")
    ap.add_argument("--block-size", type=int, default=32, help="page size of every run (32; 0 = each its default)")
    ap.add_argument("--max-model-len", type=int, default=None, help="default 4096 (--quick 1024)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2 variants, 4 prompts x 512 in / 16 out, 1 round, KV 48MiB; "
                         "writes to <out-dir>/quick")
    ap.add_argument("--dry-run", action="store_true", help="print the machine, variants and run order; run nothing")
    ap.add_argument("--out-dir", type=Path, default=REPO / "docs" / "results" / "ab")
    ap.add_argument("--work-dir", type=Path, default=None, help="logs, prompts, raw JSON (default: a new temp dir)")
    ap.add_argument("--cpu-bind", default=None, metavar="CORES", help="VLLM_CPU_OMP_THREADS_BIND of every engine")
    ap.add_argument("--run-timeout", type=float, default=3600.0, help="seconds per subprocess")
    ap.add_argument("--dataset", default="essays", choices=("essays", "prefix_repetition"),
                    help="essays: bench_throughput's essay prompts (issue #28); prefix_repetition: vLLM's "
                         f"shared-prefix data, {PREFIX_COUNT} prefixes of {PREFIX_SHARE * 100:.0f}%% of --input-len, "
                         "vanilla and every variant with vLLM's prefix cache on (issue #29; no prefill-only runs)")
    args = ap.parse_args(argv)
    q = args.quick
    for k, v in {"rounds": 1 if q else 2, "num_prompts": 4 if q else 24, "input_len": 512 if q else 1920,
                 "output_len": 16 if q else 128, "kv_bytes": 48 * MIB if q else 256 * MIB,
                 "max_model_len": 1024 if q else 4096}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.rounds < 1 or args.num_prompts < 1 or args.prefill_prompts < 0:
        ap.error("--rounds and --num-prompts must be >= 1, --prefill-prompts >= 0")
    if args.input_len + args.output_len > args.max_model_len:
        ap.error(f"--input-len + --output-len must fit --max-model-len {args.max_model_len}")

    from vllm_kvcompress.assets import model_path
    from vllm_kvcompress.portable_paths import portable

    # explicit lists fail here, in one line, before the machine probe
    variants = pre_variants = None
    for opt, text in (("--variants", args.variants), ("--prefill-variants", args.prefill_variants)):
        if text is None:
            continue
        try:
            parsed = [] if opt == "--prefill-variants" and text.strip().lower() == "none" else parse_variants(text)
        except VariantError as e:
            raise SystemExit(f"{PROG}: {opt}: {e}") from None
        if opt == "--variants":
            variants = parsed
        else:
            pre_variants = parsed
    args.dtype, args.dtype_reason = machine.choose_dtype(args.dtype, model_path())
    info = machine_info(args)
    isa = policy_isa(info, args.block_size)
    prefix_data = args.dataset == "prefix_repetition"
    targets = PREFIX_TARGETS if prefix_data else TARGETS
    if variants is None:
        variants = parse_variants(PREFIX_VARIANTS if prefix_data else default_variants(isa, q))
    if pre_variants is None:
        pre_variants = [v for v in variants if v.kind == "retention"]
    if args.prefill_prompts == 0 or prefix_data:
        pre_variants = []
    # the prefill-only variants are indexed into one list with the full runs' (one record per variant)
    all_variants = variants + [v for v in pre_variants if v not in variants]
    full_idx = list(range(len(variants)))
    pre_idx = [all_variants.index(v) for v in pre_variants]

    out_dir = args.out_dir / "quick" if q else args.out_dir
    workdir = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_ab-"))
    # --out-dir itself is <out-dir> in the result files (its quick/ subfolder <out-dir>/quick)
    dirs = {"work_dir": workdir.absolute(), "out_dir": args.out_dir.absolute()}
    command = "python benchmarks/bench_ab.py" + "".join(" " + shlex.quote(a) for a in argv)
    base_env = {k: os.environ[k] for k in SWITCHES if k in os.environ}
    flags_of = {v: v.flags(args.input_len, args.output_len) for v in all_variants}
    why = issue_settings(args.input_len, args.rounds, q)
    n_full = len(schedule(len(full_idx), args.rounds))
    n_pre = len(schedule(len(pre_idx), args.rounds))

    print(f"$ {command}\nmachine: {machine.describe(info)}", flush=True)
    for line in machine_lines(info, {"vllm_attn_isa": isa, "config": vars(args), "base_env": base_env}):
        print(f"  {line}")
    if base_env:
        print(f"  switches inherited from this shell (every run): {base_env}")
    print("variants:")
    for v in all_variants:
        pages = compressed_pages(isa, {**base_env, **dict(v.env)})
        t_full, t_pre = target_for(v, "full", targets), target_for(v, "prefill", targets)
        print(f"  {v.spec}: {' '.join(flags_of[v])}; compressed layers on {pages} pages"
              + (f"; target {t_full['op']} {t_full['goal']:.2f}x req/s" if t_full and v in variants else "")
              + (f"; prefill cost {t_pre['op']} {t_pre['goal']:.2f}x" if t_pre and v in pre_variants else ""))
    labels = lambda idx, order: " ".join("V" if i is None else f"[{all_variants[idx[i]].spec}]" for i, _ in order)  # noqa: E731
    print(f"order, {n_full} full runs ({args.num_prompts} x {args.input_len} in / {args.output_len} out): "
          f"{labels(full_idx, schedule(len(full_idx), args.rounds))}")
    if pre_idx:
        print(f"order, {n_pre} prefill-only runs ({min(args.prefill_prompts, args.num_prompts)} prompts, 1 out): "
              f"{labels(pre_idx, schedule(len(pre_idx), args.rounds))}")
    if why:
        print(f"verdicts are not the issue's: {'; '.join(why)}")
    if args.dry_run:
        return 0

    out_dir.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"logs, prompts and raw results: {workdir}\nresults: {out_dir}", flush=True)
    runner = Runner(args, workdir)
    t0 = time.time()
    result = {
        "command": command, "machine": info, "quick": q, "dtype": args.dtype, "vllm_attn_isa": isa,
        "base_env": base_env, "not_issue_settings": why, "work_dir": str(workdir), "engine_flags": runner.engine_flags(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "variants": [{"spec": v.spec, "policy": v.policy, "budget": v.budget, "env": dict(v.env), "kind": v.kind,
                      "retention": v.retention, "drop": v.drop, "flags": flags_of[v],
                      "budget_flag": flags_of[v][flags_of[v].index("--kv-budget") + 1],
                      "compressed_pages": compressed_pages(isa, {**base_env, **dict(v.env)})} for v in all_variants],
        "phases": {}, "targets": [], "partial": True,
    }
    settings = {"full": {"num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len},
                "prefill": {"num_prompts": min(args.prefill_prompts, args.num_prompts), "input_len": args.input_len,
                            "output_len": 1}}
    idx_of = {"full": full_idx, "prefill": pre_idx}

    def write(partial: bool) -> None:
        result["partial"] = partial
        result["targets"] = targets_of(result)
        result["seconds"] = time.time() - t0
        (out_dir / "ab.json").write_text(json.dumps(portable(result, **dirs), indent=2, default=str))
        (out_dir / "ab.md").write_text(portable(render_md(result), **dirs))

    def on_run(phase: str, entries: list[dict]) -> None:
        result["phases"][phase] = phase_result(all_variants, entries, args.rounds, phase, idx_of[phase],
                                               settings[phase], targets)
        write(partial=True)

    try:
        for phase in ("full", "prefill"):
            if idx_of[phase]:
                run_phase(runner, all_variants, idx_of[phase], args.rounds, phase, args, flags_of, on_run)
    except KeyboardInterrupt:
        write(partial=True)
        print(f"\ninterrupted; partial results in {out_dir / 'ab.json'}")
        raise
    write(partial=False)

    print()
    for phase in ("full", "prefill"):
        if result["phases"].get(phase):
            print("\n".join(phase_text(result, phase)) + "\n")
    print(f"Targets (issue {'#29' if prefix_data else '#28'})" + (f" — not the issue's settings: {'; '.join(why)}" if why else "") + ":")
    for t in result["targets"]:
        print(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['variant']}: {t['metric']} {fx(t['value'])} "
              f"(target {t['target']})")
    print(f"\n{(time.time() - t0) / 60:.1f} min; wrote {out_dir / 'ab.json'}, {out_dir / 'ab.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
