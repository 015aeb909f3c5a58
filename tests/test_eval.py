"""The quality harness (``python -m vllm_kvcompress.eval quality``) without an engine:
prompt builders, scoring, summaries, targets and the JSON / Markdown / PNG writers."""

from __future__ import annotations

import json
import math

import pytest

from vllm_kvcompress.eval import prompts as pr
from vllm_kvcompress.eval import quality as q
from vllm_kvcompress.eval import report as rep
from vllm_kvcompress.eval import scoring as sc


@pytest.fixture(scope="module")
def hay():
    from transformers import AutoTokenizer

    from vllm_kvcompress.assets import essays_text, model_path

    tok = AutoTokenizer.from_pretrained(str(model_path()))
    return pr.Haystack(tok, essays_text()[:150_000])  # ~35K tokens: enough, and fast to tokenize


def _depth(item) -> float:
    return (item["needle_pos"] - item["hay_start"]) / item["hay_tokens"]


def test_depth_grid():
    assert pr.depth_grid(10)[0] == 0.0 and pr.depth_grid(10)[-1] == 1.0 and len(pr.depth_grid(10)) == 10
    assert pr.depth_grid(3) == [0.0, 0.5, 1.0]
    assert pr.depth_grid(1) == [0.5]


@pytest.mark.parametrize("length", [1024, 2048, 4096])
def test_passkey_prompts_length_and_depth(hay, length):
    depths = pr.depth_grid(5)
    items = pr.passkey_prompts(hay, [length], depths)
    assert [it["depth"] for it in items] == depths
    keys = set()
    for it in items:
        assert abs(len(it["ids"]) - length) <= 0.02 * length, (len(it["ids"]), length)
        assert abs(_depth(it) - it["depth"]) <= 0.07, (_depth(it), it["depth"])
        # the needle starts exactly at needle_pos and carries the key
        needle = hay.decode(it["ids"][it["needle_pos"]:it["needle_pos"] + 24])
        assert needle.lstrip().startswith(f"The pass key is {it['answer']}."), needle
        assert len(it["answer"]) == 5 and it["answer"].isdigit()
        text = hay.decode(it["ids"])
        assert text.startswith(pr.PASSKEY_PREFIX) and text.endswith(pr.PASSKEY_QUESTION)
        assert text.count(it["answer"]) == 3  # only in the needle, which states it three times
        keys.add(it["answer"])
    assert len(keys) == len(items)
    assert items[0]["needle_pos"] == items[0]["hay_start"]  # depth 0: right after the instruction
    last = hay.decode(items[-1]["ids"])  # depth 1: right before the question
    assert last.endswith(pr.PASSKEY_NEEDLE.format(key=items[-1]["answer"]) + pr.PASSKEY_QUESTION)


def test_prompts_are_deterministic(hay):
    a = pr.passkey_prompts(hay, [1024], [0.3])
    b = pr.passkey_prompts(hay, [1024], [0.3])
    assert a[0]["ids"] == b[0]["ids"] and a[0]["answer"] == b[0]["answer"]


def test_multikey_prompts(hay):
    items = pr.multikey_prompts(hay, [1024, 2048], pr.depth_grid(3))
    assert len(items) == 6
    for it in items:
        assert abs(len(it["ids"]) - it["length"]) <= 0.02 * it["length"]
        assert abs(_depth(it) - it["depth"]) <= 0.07
        text = hay.decode(it["ids"])
        assert text.endswith(pr.MULTIKEY_QUESTION.format(word=it["word"]))
        values = [it["answer"], *it["distractors"].values()]
        assert len(set(values)) == pr.MULTIKEY_NUM_KEYS and it["word"] not in it["distractors"]
        for w, v in [(it["word"], it["answer"]), *it["distractors"].items()]:
            assert text.count(pr.MULTIKEY_NEEDLE.format(word=w, value=v).strip()) == 1
        needle = hay.decode(it["ids"][it["needle_pos"]:it["needle_pos"] + 20]).lstrip()
        assert needle.startswith(pr.MULTIKEY_NEEDLE.format(word=it["word"], value=it["answer"]).strip())


def test_ppl_windows(hay):
    wins = pr.ppl_windows(hay, 4, 4096)
    assert len(wins) == 4 and all(len(w["ids"]) == 4096 for w in wins)
    offs = [w["offset"] for w in wins]
    assert all(b - a >= 4096 for a, b in zip(offs, offs[1:]))  # distinct, non-overlapping
    assert wins[1]["ids"] == hay.ids[offs[1]:offs[1] + 4096]
    with pytest.raises(ValueError):
        pr.ppl_windows(hay, 100, 4096)


def test_scoring():
    assert sc.score_passkey(" 12345. Remember", "12345")
    assert not sc.score_passkey(" 1234 5", "12345")
    assert not sc.score_passkey(" a password that", "12345")
    assert sc.score_multikey(" 123456.\n", "123456")
    assert not sc.score_multikey(" 1234567", "123456")
    assert not sc.score_multikey(" 654321, not 123456", "123456")  # a distractor first is wrong
    assert not sc.score_multikey(" unknown", "123456")
    assert sc.perplexity(0.0, 10) == 1.0
    assert sc.perplexity(10 * math.log(2.0), 10) == pytest.approx(2.0)


def test_passkey_once_states_the_key_once_in_the_same_prompts(hay):
    three = pr.passkey_prompts(hay, [1024], [0.0, 0.5])
    once = pr.passkey_prompts(hay, [1024], [0.0, 0.5], needle=pr.PASSKEY_ONCE_NEEDLE, task="passkey_once")
    for a, b in zip(three, once):
        assert a["answer"] == b["answer"] and b["task"] == "passkey_once"
        text_a, text_b = hay.decode(a["ids"]), hay.decode(b["ids"])
        assert text_a.count(a["answer"]) == 3 and text_b.count(b["answer"]) == 1
        assert abs(len(a["ids"]) - len(b["ids"])) <= 8  # both sized to the target length


def test_summaries():
    items = [dict(length=1024, depth=0.0, correct=True), dict(length=1024, depth=1.0, correct=False),
             dict(length=2048, depth=0.0, correct=True), dict(length=2048, depth=1.0, correct=True)]
    s = sc.summarize(items)
    assert s["acc"] == 0.75 and s["by_length"] == {"1024": 0.5, "2048": 1.0}
    assert s["by_depth"] == {"0.0": 1.0, "1.0": 0.5} and s["n"] == 4
    wins = [dict(nll_sum=4.0, count=4, tail_nll_sum=2.0, tail_count=2),
            dict(nll_sum=0.0, count=4, tail_nll_sum=0.0, tail_count=2)]
    p = sc.summarize_ppl(wins, 2)
    assert p["ppl"] == pytest.approx(math.exp(0.5)) and p["ppl_tail"] == pytest.approx(math.exp(0.5))
    assert p["per_window"] == pytest.approx([math.e, 1.0])


def _fake_run(policy, retention, acc, ppl):
    lengths = ("1024", "2048", "4096")
    task = dict(acc=acc, by_length={n: acc for n in lengths}, by_depth={"0.0": acc, "1.0": acc}, n=6, items=[])
    return dict(policy=policy, retention=retention, passkey=task, passkey_once=dict(task), multikey=dict(task),
                ppl=dict(ppl=ppl, ppl_tail=ppl * 1.1, tail_from=2048, tokens=4095, per_window=[ppl]),
                seconds=dict(total=1.0))


def _fake_result():
    runs = [_fake_run("full", 1.0, 1.0, 20.0)]
    for p, vals in {"h2o": [(0.5, 1.0, 20.1), (0.25, 1.0, 20.5), (0.125, 0.9, 21.0)],
                    "streaming": [(0.5, 0.6, 20.2), (0.25, 0.4, 21.0), (0.125, 0.2, 23.0)]}.items():
        runs += [_fake_run(p, r, a, x) for r, a, x in vals]
    meta = dict(command="python -m vllm_kvcompress.eval quality --policies h2o,streaming", date="2026-01-01 00:00",
                machine="2 CPU cores", model="SmolLM2-135M-Instruct", seed=0, runtime_s=60.0,
                policies=["h2o", "streaming"], retentions=[0.5, 0.25, 0.125], lengths=[1024, 2048, 4096],
                passkey_depths=[0.0, 1.0], multikey_depths=[0.5], setup=["fake"], notes=["a note"])
    return dict(meta=meta, runs=runs)


def test_targets():
    t = {x["target"]: x for x in rep.check_targets(_fake_result())}
    assert t["full cache passkey (key stated 3x) >= 95%"]["ok"] and t["full cache passkey (key stated once) >= 95%"]["ok"]
    assert t["h2o 0.25: passkey (key stated once) >= 90%"]["ok"]
    assert t["h2o 0.125: passkey (key stated 3x) >= 80%"]["ok"]  # 90% >= 80%
    assert not any(k.startswith("streaming 0.") for k in t)  # no retrieval target for StreamingLLM
    ppl = [x for x in rep.check_targets(_fake_result()) if "perplexity" in x["target"]]
    assert [x["ok"] for x in ppl] == [True, False]  # +2.5% passes, +5% fails
    best = t["best policy at 25%: multi-key >= 60%"]
    assert best["ok"] and best["value"] == "100% (h2o 0.25)"


def test_writers(tmp_path):
    paths = rep.write_outputs(_fake_result(), tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["quality.json", "quality.md", "quality_multikey.png", "quality_passkey.png",
                     "quality_passkey_once.png", "quality_ppl.png"]
    for p in paths:
        assert p.stat().st_size > 0
    assert (tmp_path / "quality_passkey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "quality.md").read_text()
    assert "python -m vllm_kvcompress.eval quality --policies h2o,streaming" in md
    assert "| h2o 0.25 | 100% | 100% | 100% | 20.500 (+2.5%)" in md
    assert "Passkey (key stated once) accuracy by needle depth" in md
    assert "## Targets" in md and "**no**" in md and "1024 tok" in md and "a note" in md
    assert "![quality_ppl](quality_ppl.png)" in md
    assert json.loads((tmp_path / "quality.json").read_text())["runs"][0]["policy"] == "full"


def test_cli_parsing(capsys):
    a = q.parse_args([])
    assert a.policies == q.POLICIES and a.retentions == q.RETENTIONS and a.lengths == q.LENGTHS
    assert a.depths == 10 and a.ppl_windows == 4 and str(a.out_dir) == "docs/results"
    a = q.parse_args(["--quick", "--policies", "h2o"])
    assert a.policies == ("h2o",) and a.retentions == (0.25,) and a.lengths == (1024,) and a.out_dir == q.QUICK_OUT_DIR
    with pytest.raises(SystemExit):
        q.parse_args(["--policies", "nope"])
    with pytest.raises(SystemExit):
        q.parse_args(["--retentions", "1.5"])
    assert q.engine_kwargs("full", 1.0, "ppl")["max_num_batched_tokens"] == q.PAGE
    assert "additional_config" not in q.engine_kwargs("full", 1.0, "retrieval")
    assert q.engine_kwargs("h2o", 0.25, "retrieval")["enable_prefix_caching"] is False  # prompts share haystacks
    kw = q.engine_kwargs("h2o", 0.25, "retrieval")
    assert kw["additional_config"] == {"kv_compress": {"policy": "h2o", "budget": 0.25}}
    # retrieval and summaries are prefilled as `vllm serve` does: chunked, q.CHUNK tokens per step
    assert kw["block_size"] == q.PAGE and kw["max_num_batched_tokens"] == q.CHUNK and kw["enable_chunked_prefill"]
    one_step = q.engine_kwargs("h2o", 0.25, "retrieval", chunk=0)
    assert not one_step["enable_chunked_prefill"] and one_step["max_num_batched_tokens"] >= 8000 + q.MULTIKEY_MAX_TOKENS
    # perplexity measures per-chunk compaction (a prompt compacted once would hold every token)
    assert q.engine_kwargs("h2o", 0.25, "ppl")["additional_config"]["kv_compress"]["prompt_compaction"] == "per-chunk"
    assert q.parse_args(["--chunk", "512"]).chunk == 512
    with pytest.raises(SystemExit):
        q.parse_args(["--chunk", "-1"])

    from vllm_kvcompress.eval.__main__ import main

    assert main(["--help"]) == 0 and "quality" in capsys.readouterr().out
    assert main(["nope"]) == 2


def test_mid_depth_grid():
    assert pr.mid_depth_grid(2) == [0.25, 0.75] and pr.mid_depth_grid(1) == [0.5]


def test_orchestration_with_a_fake_worker(tmp_path, monkeypatch):
    """main() end to end, the engine subprocess replaced by a fake; --resume skips finished configurations."""
    calls = []

    def fake_worker(job, verbose=False, timeout=0.0):
        calls.append((job["tag"], job["engine"].get("additional_config"), job["engine"]["max_num_batched_tokens"]))
        out = {"seconds": {"start": 0.1}}
        for task in rep.RETRIEVAL_TASKS:
            if job.get(task):
                out[task] = [" 0."] * len(job[task])
        if job.get("ppl"):
            n = len(job["ppl"][0]["ids"]) - 1
            out["ppl"] = [dict(nll_sum=2.0 * n, count=n, tail_nll_sum=1.0, tail_count=1) for _ in job["ppl"]]
        return out

    monkeypatch.setattr(q, "run_in_subprocess", fake_worker)
    argv = ["--policies", "streaming", "--retentions", "0.25", "--lengths", "1024", "--depths", "2",
            "--multikey-depths", "1", "--ppl-windows", "1", "--ppl-len", "512", "--out-dir", str(tmp_path)]
    assert q.main(argv) == 0
    assert [c[0] for c in calls] == ["full cache", "full cache", "streaming 0.25", "streaming 0.25"]
    assert calls[2][1] == {"kv_compress": {"policy": "streaming", "budget": 0.25}} and calls[3][2] == q.PAGE
    res = json.loads((tmp_path / "quality.json").read_text())
    # the temporary --out-dir is recorded as <out-dir>, never as this machine's path
    assert res["meta"]["complete"] and res["meta"]["command"].endswith(" ".join(argv[:-1]) + " <out-dir>")
    assert [(r["policy"], r["passkey"]["acc"], r["ppl"]["ppl"]) for r in res["runs"]] == \
        [("full", 0.0, pytest.approx(math.e ** 2)), ("streaming", 0.0, pytest.approx(math.e ** 2))]
    assert (tmp_path / "quality.md").exists() and (tmp_path / "quality_ppl.png").exists()
    calls.clear()
    assert q.main(argv + ["--resume", "--retentions", "0.25,0.5"]) == 0
    assert [c[0] for c in calls] == ["streaming 0.5", "streaming 0.5"]  # the rest was reused
    res = json.loads((tmp_path / "quality.json").read_text())
    assert [(r["policy"], r["retention"]) for r in res["runs"]] == [("full", 1.0), ("streaming", 0.25),
                                                                     ("streaming", 0.5)]
    assert "--resume" not in res["meta"]["command"] and res["meta"]["command"].endswith("--retentions 0.25,0.5")


def test_kv_option_overrides_every_policy_run():
    a = q.parse_args(["--policies", "h2o,pyramid", "--kv", "h2o_kernel=1", "--kv", "reset_scores=true"])
    assert a.kv == {"h2o_kernel": 1, "reset_scores": True}
    kw = q.engine_kwargs("h2o", 0.25, "retrieval", a.kv)
    assert kw["additional_config"] == {"kv_compress": {"policy": "h2o", "budget": 0.25, "h2o_kernel": 1,
                                                       "reset_scores": True}}
    for bad in (["--kv", "nope=1"], ["--kv", "policy=h2o"], ["--kv", "h2o_kernel"], ["--kv", "h2o_kernel=2"]):
        with pytest.raises(SystemExit):
            q.parse_args(bad)


def _retrieval_worker(seen: list, what):
    """A fake engine subprocess for retrieval jobs: records ``what(job)``, answers " 0." to every prompt."""
    def fake_worker(job, verbose=False, timeout=0.0):
        seen.append(what(job))
        return {"seconds": {"start": 0.1}, **{t: [" 0."] * len(job[t]) for t in rep.RETRIEVAL_TASKS if job.get(t)}}

    return fake_worker


def test_ablation_run_without_full_cache(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(q, "run_in_subprocess", _retrieval_worker(calls, lambda job: job["tag"]))
    argv = ["--policies", "h2o", "--retentions", "0.25", "--lengths", "1024", "--depths", "2", "--tasks",
            "passkey_once", "--no-full", "--kv", "h2o_kernel=1", "--out-dir", str(tmp_path)]
    assert q.main(argv) == 0 and calls == ["h2o 0.25"]
    res = json.loads((tmp_path / "quality.json").read_text())
    assert res["meta"]["kv_options"] == {"h2o_kernel": 1} and res["runs"][0]["kv_compress"]["h2o_kernel"] == 1
    assert "| h2o 0.25 | 0% |" in (tmp_path / "quality.md").read_text()  # columns of the tasks run only


def test_dtype_reaches_every_engine_and_the_report(tmp_path, monkeypatch):
    """--dtype bfloat16: every worker engine runs bf16 (the bf16 kernels), the report says so,
    and --resume does not mix it with a float32 grid (it starts afresh)."""
    engines = []
    monkeypatch.setattr(q, "run_in_subprocess", _retrieval_worker(engines, lambda job: job["engine"]))
    argv = ["--policies", "h2o", "--retentions", "0.25", "--lengths", "1024", "--depths", "2", "--tasks",
            "passkey_once", "--out-dir", str(tmp_path)]
    assert q.main(argv + ["--dtype", "bfloat16"]) == 0
    assert len(engines) == 2 and {e["dtype"] for e in engines} == {"bfloat16"}
    assert "(bfloat16, greedy;" in (tmp_path / "quality.md").read_text()
    assert q.main(argv + ["--resume"]) == 0  # float32 now: the stored bf16 grid is not reused
    assert [e["dtype"] for e in engines[2:]] == ["float32", "float32"]
    assert "(float32, greedy;" in (tmp_path / "quality.md").read_text()


def test_long_answer_agreement():
    """identical prefix and ROUGE-L F1 (token LCS) of an answer against the full cache's."""
    assert sc.identical_prefix([1, 2, 3, 4], [1, 2, 5, 4]) == 2 and sc.identical_prefix([1, 2], [1, 2]) == 2
    assert sc.rouge_l([1, 2, 3], [1, 2, 3]) == 1.0 and sc.rouge_l([1, 2], [3, 4]) == 0.0
    # LCS [1, 3, 4] of 4 and 5 tokens: p = 3/4, r = 3/5
    assert sc.rouge_l([1, 3, 4, 9], [1, 2, 3, 4, 8]) == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    full = {"policy": "full", "summary": {"items": [dict(length=2048, ids=[1, 2, 3, 4])]}}
    run = {"policy": "h2o", "summary": {"items": [dict(length=2048, ids=[1, 2, 9, 4])]}}
    q.agree_with_full(run, full)
    sm = run["summary"]
    assert sm["prefix"] == 2 and sm["rouge_l"] == pytest.approx(0.75) and sm["identical"] == 0.0
    assert sm["by_length"]["2048"]["prefix"] == 2


def test_distractor_and_summary_prompts(hay):
    items = pr.multikey_prompts(hay, [1024], pr.depth_grid(3), num_keys=2, task="distractor")
    assert len(items) == 3 and all(it["task"] == "distractor" and len(it["distractors"]) == 1 for it in items)
    text = hay.decode(items[0]["ids"])
    word, value = next(iter(items[0]["distractors"].items()))
    assert text.count(pr.MULTIKEY_NEEDLE.format(word=word, value=value).strip()) == 1
    assert text.count(pr.MULTIKEY_NEEDLE.format(word=items[0]["word"], value=items[0]["answer"]).strip()) == 1
    summ = pr.summary_prompts(hay, [2048], 2)
    assert len(summ) == 2 and all(abs(len(it["ids"]) - 2048) <= 64 for it in summ), [len(it["ids"]) for it in summ]
    assert "Summarize the following essay" in hay.tok.decode(summ[0]["ids"])
