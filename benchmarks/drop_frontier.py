"""The ``--kv-prefill-drop`` frontier: retention vs pass-key accuracy vs requests/s (issue #17).

Joins two result files that other commands wrote, one row per (policy, retention):

* pass-key accuracy (key stated once and three times) from
  ``python -m vllm_kvcompress.eval quality ... --tasks passkey,passkey_once`` (``quality.json``);
* requests/s relative to vanilla vLLM from ``python benchmarks/bench_throughput.py``
  (``throughput.json``, same-run ratios).

Writes ``frontier.md`` (the table and both commands) and ``frontier.png`` (pass-key
once vs requests/s x vanilla, one line per policy, points labelled by retention)::

    python -m vllm_kvcompress.eval quality --policies pyramid+drop --retentions 0.125,0.25,0.5,0.75 \\
        --depths 5 --tasks passkey,passkey_once --out-dir docs/results/drop_frontier/quality
    python benchmarks/bench_throughput.py --policies pyramid+drop --retentions 0.125,0.25,0.5,0.75 \\
        --num-prompts 24 --no-prefill-bound --out-dir docs/results/drop_frontier/throughput
    python benchmarks/drop_frontier.py --quality docs/results/drop_frontier/quality/quality.json \\
        --throughput docs/results/drop_frontier/throughput/throughput.json --out-dir docs/results/drop_frontier
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402


def _key(policy: str, retention: float) -> tuple[str, float]:
    return policy, round(float(retention), 6)


def join(quality: dict, throughput: dict) -> list[dict]:
    """Rows present in both files (plus the full cache / vanilla row), sorted by policy, retention."""
    acc = {}
    for r in quality["runs"]:
        pk = {t: (r.get(t) or {}).get("acc") for t in ("passkey_once", "passkey")}
        acc[_key(r["policy"], r["retention"])] = pk
    main = throughput["main"]["runs"]
    rows = []
    van = next(r for r in main if r.get("kind") == "vanilla")
    full = acc.get(_key("full", 1.0))
    if full:
        rows.append({"policy": "full cache / vanilla", "retention": 1.0, "req_s": van["requests_per_s"], "x_vanilla": 1.0,
                     "peak_running": van.get("peak_running"), **full})
    for r in main:
        if r.get("kind") != "retention":
            continue
        k = _key(r["policy"], r["retention"])
        if k not in acc:
            continue
        rows.append({"policy": r["policy"], "retention": r["retention"], "req_s": r["requests_per_s"],
                     "x_vanilla": r["vs_vanilla"]["requests_per_s"], "peak_running": r.get("peak_running"), **acc[k]})
    rows[1 if full else 0:] = sorted(rows[1 if full else 0:], key=lambda x: (x["policy"], x["retention"]))
    return rows


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def render(rows: list[dict], quality: dict, throughput: dict, notes: str | None) -> str:
    qm, tm = quality.get("meta", {}), throughput
    L = ["# `--kv-prefill-drop` frontier: retention vs pass-key vs requests/s", "",
         "Pass-key accuracy: " + f"`{qm.get('command', '?')}` ({qm.get('date', '?')}; "
         f"{', '.join(str(x) for x in qm.get('lengths', []))} tokens x {len(qm.get('passkey_depths', []))} depths, "
         f"SmolLM2-135M {qm.get('engine', {}).get('retrieval', {}).get('dtype', '?')}).", "",
         f"Requests/s: `{tm.get('command', '?')}`; {machine.describe(tm['machine']) if tm.get('machine') else '?'}; same-run ratios to vanilla vLLM at the same KV memory.", "",
         "| policy | retention | passkey (once) | passkey (3x) | req/s | x vanilla | peak running |",
         "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        L.append(f"| {r['policy']} | {r['retention']:g} | {_pct(r['passkey_once'])} | {_pct(r['passkey'])} | "
                 f"{r['req_s']:.3f} | {r['x_vanilla']:.2f} | {r['peak_running'] if r['peak_running'] is not None else 'n/a'} |")
    if notes:
        L += ["", notes.strip()]
    return "\n".join(L) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for pol in sorted({r["policy"] for r in rows}):
        rs = sorted((r for r in rows if r["policy"] == pol), key=lambda r: r["x_vanilla"])
        xs, ys = [r["x_vanilla"] for r in rs], [100 * (r["passkey_once"] or 0) for r in rs]
        ax.plot(xs, ys, "o-" if len(rs) > 1 else "s", label=pol)
        for r, x, y in zip(rs, xs, ys):
            ax.annotate(f"{r['retention']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("requests/s x vanilla vLLM (same KV memory)")
    ax.set_ylabel("pass-key accuracy, key stated once (%)")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("retention (labels) vs pass-key vs throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quality", type=Path, required=True, help="quality.json of vllm_kvcompress.eval quality")
    ap.add_argument("--throughput", type=Path, required=True, help="throughput.json of benchmarks/bench_throughput.py")
    ap.add_argument("--notes", type=Path, default=None, help="markdown appended to the report")
    ap.add_argument("--out-dir", type=Path, required=True)
    a = ap.parse_args(argv)
    q, t = json.loads(a.quality.read_text()), json.loads(a.throughput.read_text())
    rows = join(q, t)
    if not rows:
        raise SystemExit("drop_frontier: no (policy, retention) is in both files")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "frontier.md").write_text(render(rows, q, t, a.notes.read_text() if a.notes else None))
    (a.out_dir / "frontier.json").write_text(json.dumps(rows, indent=1))
    plot(rows, a.out_dir / "frontier.png")
    print(render(rows, q, t, None))
    print(f"wrote {a.out_dir}/frontier.md, frontier.json, frontier.png")


if __name__ == "__main__":
    main()
