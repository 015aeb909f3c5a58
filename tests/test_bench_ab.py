"""The pure parts of ``benchmarks/bench_ab.py`` (issue #28): variant specs and their
one-line errors, the interleaved run order, ratios to the adjacent vanilla runs, medians,
target verdicts, the Markdown report, and ``Runner.throughput``'s ``env`` (through a fake
``vllm`` entry point). No vLLM engine runs here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
try:
    import bench_ab as ab
    import bench_throughput as bt
finally:
    sys.path.remove(str(REPO / "benchmarks"))

AMX = "VLLM_KVCOMPRESS_CPU_AMX"
FUSED = "VLLM_KVCOMPRESS_FUSED_PREFILL"


# --------------------------------------------------------------------------- variant specs

def test_parse_variant_forms():
    v = ab.parse_variant("pyramid@0.25")
    assert (v.policy, v.budget, v.env, v.kind, v.retention, v.drop, v.base) == (
        "pyramid", "0.25", (), "retention", 0.25, False, "pyramid")
    assert v.spec == "pyramid@0.25" and v.flags(1920, 128) == ["--kv-policy", "pyramid", "--kv-budget", "0.25"]

    v = ab.parse_variant(" h2o@NONE ")
    assert (v.budget, v.kind, v.retention, v.spec) == ("none", "nothing-evicted", None, "h2o@none")

    v = ab.parse_variant("pyramid+drop@0.25")
    assert v.drop and v.base == "pyramid" and "--kv-prefill-drop" in v.flags(1920, 128)

    v = ab.parse_variant("pyramid+drop@8@0.25")  # the budget follows the last '@'
    assert (v.policy, v.budget) == ("pyramid+drop@8", "0.25")
    assert v.flags(1920, 128)[-2:] == ["--kv-prefill-drop-from", "8"]

    v = ab.parse_variant(f"h2o@512:{AMX}=0:{FUSED}=amx")
    assert v.env == ((AMX, "0"), (FUSED, "amx")) and v.retention is None and v.kind == "retention"
    assert v.spec == f"h2o@512:{AMX}=0:{FUSED}=amx" and v.default_env == ab.parse_variant("h2o@512")
    assert ab.parse_variant("h2o@0.25:OMP_NUM_THREADS=1").env == (("OMP_NUM_THREADS", "1"),)  # not the plugin's
    v = ab.parse_variant("pyramid@0.25:--no-kv-pin-prefix-hits:--kv-compress-interval=16")
    assert v.extra == ("--no-kv-pin-prefix-hits", "--kv-compress-interval=16") and not v.env
    assert v.flags(1920, 128)[-3:] == ["--no-kv-pin-prefix-hits", "--kv-compress-interval", "16"]
    assert v.spec == "pyramid@0.25:--no-kv-pin-prefix-hits:--kv-compress-interval=16"
    assert v.default_env == ab.parse_variant("pyramid@0.25")


@pytest.mark.parametrize("spec, msg", [
    ("", "empty variant"),
    ("pyramid", "expected POLICY@BUDGET"),
    ("@0.25", "expected POLICY@BUDGET"),
    ("pyramid@", "expected POLICY@BUDGET"),
    ("vanilla@none", "vanilla is the baseline"),
    ("foo@0.25", "unknown policy 'foo'"),
    ("h2o+drop@0.25", "unknown policy variant"),
    ("pyramid@0.3x", "budget '0.3x' is neither 'none'"),
    ("h2o@1.5", "neither a fraction below 1 nor a whole number"),
    ("h2o@8", "below min_layer_budget"),
    ("h2o@-0.25", "must be > 0"),
    (f"pyramid@0.25:{AMX}=2", f"{AMX}='2': expected 0 or 1"),
    (f"pyramid@0.25:{FUSED}=yes", f"{FUSED}='yes': expected 0 or 1 or amx"),
    ("pyramid@0.25:VLLM_KVCOMPRESS_CPUAMX=0", "unknown plugin switch VLLM_KVCOMPRESS_CPUAMX"),
    ("pyramid@0.25:VLLM_KVCOMPRESS_STATS_FILE=x", "set by the benchmark"),
    ("pyramid@0.25:AMX", "is not NAME=VALUE"),
    ("pyramid@0.25:1X=0", "is not NAME=VALUE"),
    (f"pyramid@0.25:{AMX}=0:{AMX}=1", "set twice"),
    ("pyramid@0.25:--kv-pin-prefix", "not a --kv-* flag of the plugin"),
    ("pyramid@0.25:--kv-budget=0.5", "policy and budget are POLICY@BUDGET"),
])
def test_parse_variant_errors_are_one_line(spec, msg):
    with pytest.raises(ab.VariantError) as e:
        ab.parse_variant(spec)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_parse_variants_list():
    vs = ab.parse_variants(f"pyramid@0.25, h2o@0.25:{AMX}=0,,")
    assert [v.spec for v in vs] == ["pyramid@0.25", f"h2o@0.25:{AMX}=0"]
    with pytest.raises(ab.VariantError, match="listed twice"):
        ab.parse_variants("pyramid@0.25,pyramid@0.25 ")
    with pytest.raises(ab.VariantError, match="no variants"):
        ab.parse_variants(",")


def test_main_rejects_bad_variants_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        ab.main(["--dry-run", "--variants", "pyramid@0.25,bogus@1"])
    assert str(e.value).startswith("bench_ab.py: --variants: 'bogus@1': unknown policy") and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        ab.main(["--dry-run", "--prefill-variants", f"h2o@0.25:{AMX}=on"])
    assert str(e.value).startswith("bench_ab.py: --prefill-variants: ")


def test_default_variants_add_the_amx_ab_only_on_amx():
    base = ab.default_variants("vec")
    assert base == ["pyramid@none", "h2o@none", "pyramid@0.25", "h2o@0.25", "pyramid+drop@0.25"]
    assert ab.default_variants(None) == base
    amx = ab.default_variants("amx")
    assert amx[:5] == base and amx[5:] == [f"pyramid@0.25:{AMX}=0", f"h2o@0.25:{AMX}=0", f"h2o@0.25:{FUSED}=amx"]
    assert len(ab.default_variants("vec", quick=True)) == 2 == len(ab.default_variants("amx", quick=True))
    assert any(AMX in s for s in ab.default_variants("amx", quick=True))
    for isa in ("vec", "amx"):
        ab.parse_variants(ab.default_variants(isa)) and ab.parse_variants(ab.default_variants(isa, quick=True))


def test_compressed_pages_and_policy_isa():
    assert ab.compressed_pages("amx", {}) == "amx"
    assert ab.compressed_pages("amx", {AMX: "1"}) == "amx"
    assert ab.compressed_pages("amx", {AMX: "0"}) == "vec"
    assert ab.compressed_pages("vec", {AMX: "1"}) == "vec" == ab.compressed_pages("vec", {AMX: "0"})
    assert ab.compressed_pages(None, {}) is None
    info = {"vllm_attn_isa": [{"block_size": 128, "vllm": "vec"}, {"block_size": 32, "vllm": "amx"}]}
    assert ab.policy_isa(info, 32) == "amx" and ab.policy_isa(info, 0) == "amx" and ab.policy_isa(info, 128) == "vec"
    assert ab.policy_isa({}, 32) is None


# --------------------------------------------------------------------------- order and ratios

def test_schedule_interleaves_vanilla_between_every_variant_run():
    order = ab.schedule(3, 2)
    kinds = ["V" if i is None else i for i, _ in order]
    assert kinds == ["V", 0, "V", 1, "V", 2, "V", 2, "V", 1, "V", 0, "V"]
    assert [r for i, r in order if i is not None] == [0, 0, 0, 1, 1, 1]
    for k, (i, _) in enumerate(order):  # every variant run sits between two vanilla runs
        if i is not None:
            assert order[k - 1][0] is None and order[k + 1][0] is None
    assert ab.schedule(3, 2) == order  # deterministic
    for n, rounds in ((1, 1), (2, 3), (5, 2), (8, 4)):
        o = ab.schedule(n, rounds)
        assert len(o) == 2 * n * rounds + 1
        assert sum(i is None for i, _ in o) == n * rounds + 1
        assert all(sum(i == v for i, _ in o) == rounds for v in range(n))
    assert ab.schedule(0, 2) == [] == ab.schedule(2, 0)


def _entries(order, values, key="requests_per_s", preempt=None):
    """Fake runner entries in ``order``; values[k] None = that run failed."""
    out = []
    for k, ((i, r), x) in enumerate(zip(order, values)):
        run = None if x is None else {key: x, "preemptions": (preempt or {}).get(k, 0), "command": f"cmd {k}"}
        out.append({"variant": i, "round": r, "label": f"r{r + 1} {'vanilla' if i is None else f'v{i}'}", "run": run,
                    **({} if run else {"error": "run failed (exit 1)"})})
    return out


def test_adjacent_ratios_and_summary():
    order = ab.schedule(2, 2)  # V a V b V b V a V
    vals = [1.0, 1.5, 2.0, 3.0, 1.0, 1.2, 1.0, 0.6, 0.5]
    ents = _entries(order, vals, preempt={1: 2, 2: 1})
    rat = ab.adjacent_ratios(ents, lambda r: r["requests_per_s"])
    assert [(r["variant"], r["round"]) for r in rat] == [(0, 0), (1, 0), (1, 1), (0, 1)]
    assert [r["ratio"] for r in rat] == pytest.approx([1.5 / 1.5, 3.0 / 1.5, 1.2 / 1.0, 0.6 / 0.75])
    assert rat[0]["vanilla"] == [1.0, 2.0] and rat[0]["preemptions"] == 2 and rat[0]["vanilla_preemptions"] == [0, 1]
    summ = ab.summarize(rat, 2, 2)
    assert summ[0]["ratios"] == pytest.approx([1.0, 0.8]) and summ[0]["median"] == pytest.approx(0.9)
    assert (summ[0]["min"], summ[0]["max"]) == pytest.approx((0.8, 1.0))
    assert summ[1]["ratios"] == pytest.approx([2.0, 1.2]) and summ[1]["median"] == pytest.approx(1.6)
    assert summ[0]["preemptions"] == [2, 0] and summ[0]["vanilla_preemptions"] == [0, 1, 0, 0]
    assert ab.summarize(ab.adjacent_ratios(_entries(ab.schedule(1, 3), [1, 2, 1, 4, 1, 3, 1]),
                                           lambda r: r["requests_per_s"]), 1, 3)[0]["median"] == 3.0


def test_failed_runs_fall_back_or_go_n_a():
    order = ab.schedule(2, 1)  # V a V b V
    rat = ab.adjacent_ratios(_entries(order, [None, 2.0, 1.0, None, 2.0]), lambda r: r["requests_per_s"])
    assert rat[0]["ratio"] == 2.0 and rat[0]["vanilla"] == [1.0]  # one neighbour failed: the other
    assert rat[1]["ratio"] is None  # the variant run failed
    summ = ab.summarize(rat, 2, 1)
    assert summ[1] == {"ratios": [None], "median": None, "min": None, "max": None, "preemptions": [None],
                       "vanilla_preemptions": [0, 0]}
    rat = ab.adjacent_ratios(_entries(order, [None, 2.0, None, 1.0, None]), lambda r: r["requests_per_s"])
    assert [r["ratio"] for r in rat] == [None, None]  # no vanilla neighbour


# --------------------------------------------------------------------------- targets

@pytest.mark.parametrize("spec, phase, median, want", [
    ("pyramid@none", "full", 0.95, (">= 0.95x", True)),
    ("h2o@none", "full", 0.949, (">= 0.95x", False)),
    ("pyramid@0.25", "full", 1.4, (">= 1.40x", True)),
    ("h2o@0.25", "full", 1.39, (">= 1.40x", False)),
    (f"h2o@0.25:{AMX}=0", "full", 1.5, (">= 1.40x", True)),  # env variants are held to the same bar
    ("pyramid+drop@0.25", "full", 3.0, (">= 3.00x", True)),
    ("pyramid+drop@0.25", "full", 2.9, (">= 3.00x", False)),
    ("pyramid@0.25", "prefill", 1.10, ("<= 1.10x", True)),
    ("pyramid@0.25", "prefill", 1.11, ("<= 1.10x", False)),
    ("h2o@0.25", "prefill", 1.25, ("<= 1.25x", True)),
    ("h2o@0.125", "prefill", 1.3, ("<= 1.25x", False)),  # the prefill cost bar holds at any retention
    ("h2o@0.25", "full", None, (">= 1.40x", False)),  # no measurement: not a pass
])
def test_verdicts(spec, phase, median, want):
    v = ab.verdict(ab.parse_variant(spec), phase, median)
    assert (v["target"], v["pass"]) == want and v["value"] == median


@pytest.mark.parametrize("spec, phase", [
    ("pyramid@0.125", "full"), ("snapkv@0.25", "full"), ("streaming@none", "full"), ("pyramid+drop@8@0.25", "full"),
    ("pyramid+drop@none", "full"), ("pyramid+drop@0.25", "prefill"), ("pyramid@none", "prefill"), ("h2o@512", "full"),
])
def test_no_target(spec, phase):
    assert ab.verdict(ab.parse_variant(spec), phase, 2.0) is None


def test_issue_settings():
    assert ab.issue_settings(1920, 2, False) == []
    assert ab.issue_settings(1900, 3, False) == []
    why = ab.issue_settings(512, 1, True)
    assert len(why) == 3 and "--quick" in why[0] and "512" in why[1] and "1 round" in why[2]


def test_env_vs_default():
    vs = ab.parse_variants(f"h2o@0.25,h2o@0.25:{AMX}=0,pyramid@0.25:{AMX}=0")
    summ = [{"median": 1.5}, {"median": 1.2}, {"median": 1.0}]
    out = ab.env_vs_default(vs, summ)
    assert out == [{"variant": f"h2o@0.25:{AMX}=0", "vs": "h2o@0.25", "ratio": pytest.approx(0.8)}]


# --------------------------------------------------------------------------- report

def fake_result(tmp_work: str = "/tmp/bench_ab-x1") -> dict:
    variants = ab.parse_variants(f"pyramid@none,h2o@0.25,h2o@0.25:{AMX}=0")
    pre_idx = [1, 2]
    info = {"cpu": "Fake Xeon", "cpu_count": 2, "isa_flags": {f: f != "avx2" for f in ("avx2", "avx512f", "avx512_bf16",
                                                                                          "avx512_vnni", "amx_tile",
                                                                                          "amx_bf16")},
            "torch_isa": {"avx512": True, "amx_tile": True}, "dtype": "bfloat16", "dtype_reason": "auto: test",
            "vllm_attn_isa": [{"block_size": 32, "vllm": "amx", "compressed_layers": "amx"}],
            "kvcompress_bf16_dot": True, "git_commit": "abc1234", "git_dirty": False}
    flags = {v: v.flags(1920, 128) if v.budget != "none" else ["--kv-policy", "pyramid", "--kv-budget", "4998"]
             for v in variants}
    result = {"command": "python benchmarks/bench_ab.py --rounds 2", "machine": info, "quick": False,
              "dtype": "bfloat16", "vllm_attn_isa": "amx", "base_env": {}, "not_issue_settings": [],
              "config": {"kv_bytes": 256 << 20, "block_size": 32},
              "variants": [{"spec": v.spec, "budget": v.budget, "budget_flag": flags[v][3],
                            "compressed_pages": ab.compressed_pages("amx", dict(v.env))} for v in variants],
              "phases": {}, "partial": False}
    full = _entries(ab.schedule(3, 2), [1.0, 0.96, 1.0, 1.5, 1.0, 1.45, 1.0, 1.4, 1.0, 1.6, 1.0, 1.0, 1.0])
    for e in full:
        if e["run"]:
            e["run"]["command"] = f"{AMX}=0 VLLM_KVCOMPRESS_STATS_FILE=... .venv/bin/python x --output-json {tmp_work}/o.json"
    pre = _entries(ab.schedule(2, 2), [2.0, 2.4, 2.0, 2.1, 2.0, 2.2, 2.0, 2.6, 2.0], key="seconds_per_prompt")
    result["phases"]["full"] = ab.phase_result(variants, full, 2, "full", [0, 1, 2],
                                               {"num_prompts": 24, "input_len": 1920, "output_len": 128})
    result["phases"]["prefill"] = ab.phase_result(variants, pre, 2, "prefill", pre_idx,
                                                  {"num_prompts": 4, "input_len": 1920, "output_len": 1})
    result["targets"] = ab.targets_of(result)
    return result


def test_phase_result_and_targets():
    r = fake_result()
    full = r["phases"]["full"]["summary"]
    assert [s["median"] for s in full] == pytest.approx([0.98, 1.55, 1.425])  # round 2 runs c, b, a
    assert [s["verdict"]["pass"] for s in full] == [True, True, True]
    pre = r["phases"]["prefill"]["summary"]
    assert [s["index"] for s in pre] == [1, 2]
    assert pre[0]["ratios"] == pytest.approx([1.2, 1.3]) and pre[0]["verdict"]["pass"] is True  # 1.25 <= 1.25
    assert pre[1]["median"] == pytest.approx(1.075)
    assert [t["variant"] for t in r["targets"]] == ["pyramid@none", "h2o@0.25", f"h2o@0.25:{AMX}=0", "h2o@0.25",
                                                    f"h2o@0.25:{AMX}=0"]
    assert r["phases"]["full"]["env_vs_default"][0]["ratio"] == pytest.approx(1.425 / 1.55)
    assert r["phases"]["prefill"]["env_vs_default"][0]["ratio"] == pytest.approx(1.075 / 1.25)


def test_render_md(tmp_path):
    from vllm_kvcompress.portable_paths import machine_paths, portable

    r = fake_result(str(tmp_path / "work"))
    md = ab.render_md(r)
    assert md.startswith("# Interleaved A/B vs vanilla vLLM (issue #28)\n")
    assert "amx_tile yes" in md and "avx2 no" in md and "vLLM's CPU attention ISA at page size 32: amx" in md
    assert "| variant | pages | r1 | r2 | median | min-max |" in md
    assert ("| pyramid@none (budget 4998) | amx | 0.96x | 1.00x | 0.98x | 0.96x-1.00x | 0,0 / 0,0,0,0 | - / - | - / - "
            "| >= 0.95x | PASS |") in md
    assert f"| h2o@0.25:{AMX}=0 | vec | 1.45x | 1.40x |" in md and "| h2o@0.25 | amx | 1.50x | 1.60x | 1.55x |" in md
    assert "| h2o@0.25 | prefill cost vs vanilla | <= 1.25x | 1.25x | PASS |" in md
    assert f"h2o@0.25:{AMX}=0 / h2o@0.25: 0.92x (ratio of medians)" in md  # full runs
    assert f"h2o@0.25:{AMX}=0 / h2o@0.25: 0.86x (ratio of medians)" in md  # prefill cost
    assert "vanilla: 7 runs, requests_per_s 1-1 (max/min 1.00)" in md
    assert "```bash\npython benchmarks/bench_ab.py --rounds 2\n```" in md and "# r1 vanilla" in md
    assert "PARTIAL" not in md and "QUICK" not in md and "not the issue's" not in md
    assert machine_paths(md) and not machine_paths(portable(md, work_dir=tmp_path / "work"))

    r.update(partial=True, quick=True, not_issue_settings=["--quick", "1 round(s), not >= 2"])
    r["phases"]["full"]["runs"][3]["run"] = None
    r["phases"]["full"]["runs"][3]["error"] = "run 'r1 v1' failed (exit 1); log x"
    md = ab.render_md(r)
    assert "PARTIAL" in md and "QUICK SMOKE RUN" in md
    assert "**Verdicts are not the issue's**: --quick; 1 round(s), not >= 2." in md
    assert "# r1 v1: FAILED (run 'r1 v1' failed (exit 1); log x)" in md and "failed runs: r1 v1" in md
    text = "\n".join(ab.phase_text(r, "full"))  # console table: aligned columns
    assert text.splitlines()[2].startswith("variant ") and "median" in text.splitlines()[2]
    json.dumps(r)  # the result is plain JSON


# --------------------------------------------------------------------------- Runner.throughput env

FAKE_VLLM = r'''
import json, os, sys
a = sys.argv[1:]
out = a[a.index("--output-json") + 1]
n = int(a[a.index("--num-prompts") + 1])
json.dump({"elapsed_time": 2.0, "num_requests": n, "requests_per_second": n / 2.0, "tokens_per_second": 100.0},
          open(out, "w"))
json.dump({"preemptions": 3}, open(os.environ["VLLM_KVCOMPRESS_STATS_FILE"], "w"))
print("Total num prompt tokens: %d" % (n * 10))
print("Total num output tokens: %d" % (n * 2))
print("AMX=" + os.environ.get("VLLM_KVCOMPRESS_CPU_AMX", "unset"))
'''


def test_runner_throughput_env(tmp_path, monkeypatch):
    shim = tmp_path / "fake_vllm.py"
    shim.write_text(FAKE_VLLM)
    monkeypatch.setattr(bt, "VLLM_SHIM", shim)
    monkeypatch.delenv(AMX, raising=False)
    args = argparse.Namespace(dtype="float32", max_model_len=1024, kv_bytes=48 << 20, block_size=32, cpu_bind=None,
                              run_timeout=60)
    runner = bt.Runner(args, tmp_path)
    runner.datasets[(4, 64)] = {"path": str(tmp_path / "p.jsonl")}  # no prompt building
    r = runner.throughput("h2o amx off", ["--kv-policy", "h2o"], n=4, input_len=64, output_len=2,
                          env={AMX: "0"})
    assert r["env"] == {AMX: "0"} and r["command"].startswith(f"{AMX}=0 VLLM_KVCOMPRESS_STATS_FILE=... ")
    assert "AMX=0" in Path(r["log"]).read_text() and r["requests_per_s"] == 2.0 and r["preemptions"] == 3
    r = runner.throughput("vanilla", [], n=4, input_len=64, output_len=2)  # no env: as before
    assert "env" not in r and r["command"].startswith("VLLM_KVCOMPRESS_STATS_FILE=... ")
    assert "AMX=unset" in Path(r["log"]).read_text()


# --------------------------------------------------------------------------- bench_step_costs --amx-ab

@pytest.fixture
def step_costs_bench():
    """``benchmarks/bench_step_costs.py`` as a module, with the environment it sets at import restored."""
    import importlib.util
    import os

    saved = dict(os.environ)
    try:
        spec = importlib.util.spec_from_file_location("bench_step_costs_t", REPO / "benchmarks" / "bench_step_costs.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return mod


def _sc_run(label, pages, env=None):
    parts = ("attention_plain", "attention", "fused_decode", "fused_prefill", "scoring", "selection", "compaction",
             "cache_write", "metadata_plugin", "rest")
    kind = {"steps": 2, "step": 0.02, **{key: 0.001 for key in parts}}
    return {"label": label, "pages": pages, "env": env or {},
            "workloads": {"prefill": {"per_kind": {"prefill": kind}}, "decode": {"per_kind": {"decode": kind}}}}


def test_step_costs_amx_ab_pages(step_costs_bench):
    sc = step_costs_bench
    runs = [_sc_run("vanilla", "vec"), _sc_run(f"pyramid @0.25 {AMX}=1", "vec", {AMX: "1"}),
            _sc_run(f"pyramid @0.25 {AMX}=0", "vec", {AMX: "0"}),
            _sc_run(f"h2o @0.25 {AMX}=1", "amx", {AMX: "1"}), _sc_run(f"h2o @0.25 {AMX}=0", "vec", {AMX: "0"})]
    cols, rows = sc.table(runs, "prefill")
    assert cols[:4] == ["run", "pages", "steps", "step ms"] and [r[1] for r in rows] == ["vec", "vec", "vec", "amx", "vec"]
    assert rows[1][3] == "10.00 (1.00)"
    lines = sc.amx_ab_lines(runs)
    assert lines[0] == (f"{AMX} A/B of pyramid @0.25: =1 on vec pages, =0 on vec pages (the same layout: vLLM picks "
                        "no 'amx' pages on this CPU, so the switch changes nothing here)")
    assert lines[1] == f"{AMX} A/B of h2o @0.25: =1 on amx pages, =0 on vec pages"
    assert sc.amx_ab_lines(runs[:1]) == []
    old = {k: v for k, v in runs[1].items() if k != "pages"}  # a result file from before the pages column
    assert sc.table([runs[0], old], "decode")[1][1][1] == "n/a"


def test_prefix_repetition_dataset_flags_and_target():
    """--dataset prefix_repetition (issue #29): vLLM's shared-prefix data in the issue's shape
    (4 prefixes of 4/5 of the prompt), and the >= 1.0x target for pyramid / h2o at 25%."""
    import argparse

    args = argparse.Namespace(dataset="prefix_repetition", input_len=1920)
    flags = ab.dataset_flags(args, 128)
    assert flags == ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "1536",
                     "--prefix-repetition-suffix-len", "384", "--prefix-repetition-num-prefixes", "4",
                     "--prefix-repetition-output-len", "128"]
    assert ab.dataset_flags(argparse.Namespace(dataset="essays", input_len=1920), 128) is None
    v = ab.parse_variant("h2o@0.25")
    assert ab.verdict(v, "full", 1.01, ab.PREFIX_TARGETS)["pass"] is True
    assert ab.verdict(v, "full", 0.99, ab.PREFIX_TARGETS)["pass"] is False
    assert ab.verdict(v, "full", 1.2)["pass"] is False  # issue #28's target: 1.4x


def test_help_renders(capsys):
    """``--help`` prints every option (a bare ``%`` in a help string made argparse crash)."""
    with pytest.raises(SystemExit) as e:
        ab.main(["--help"])
    assert e.value.code == 0
    assert "--dataset" in capsys.readouterr().out


def test_prefix_keep_quality_prompts_share_their_prefixes():
    """benchmarks/prefix_keep_quality.py: every scored prompt starts with a prefix its set's
    warm-up prompts cache (hits of 1,536 tokens), and each in_own prompt has a key of its own."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import prefix_keep_quality as pkq

    sets = pkq.build_sets(0)
    assert [len(s["items"]) for s in sets.values()] == [10, 10]
    for name, s in sets.items():
        warm = s["warm"]
        for it in s["items"]:
            assert any(it["ids"][:pkq.PREFIX_LEN] == w[:pkq.PREFIX_LEN] for w in warm), name
            assert pkq.PREFIX_LEN + pkq.OWN_LEN - 16 <= len(it["ids"]) <= pkq.PREFIX_LEN + pkq.OWN_LEN + 32
    assert len({it["answer"] for it in sets["in_own"]["items"]}) == 10
    assert len(sets["in_own"]["warm"]) == 1 and len(sets["in_prefix"]["warm"]) == 5
