"""Core: per-layer compressed KV inside vLLM 0.32 that frees real paged blocks.

Engines run in-process (see conftest) so the tests read vLLM's own scheduler and
KV-cache manager: block counts are measured, not inferred from outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import close_llm, make_llm, scheduler_of

from vllm_kvcompress import paging

MAX_TOKENS = 48


def greedy(n=MAX_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def tokens(outs):
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def vanilla_tokens(vanilla_llm, essay_prompts):
    return tokens(vanilla_llm.generate(essay_prompts["short"], greedy()))


# ---------------------------------------------------------------- 1. plugin with --kv-policy none
def test_policy_none_is_token_identical_to_plain_vllm(vanilla_tokens, essay_prompts, model_dir, tmp_path):
    """Plain vLLM (plugin not loaded, VLLM_PLUGINS allow-list empty) vs the plugin with policy none."""
    script = tmp_path / "plain.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        from vllm import LLM, SamplingParams
        if __name__ == "__main__":
            prompts = json.loads(sys.stdin.read())
            llm = LLM({model_dir!r}, kv_cache_memory_bytes={256 << 20}, max_model_len=4096,
                      enforce_eager=True, dtype="float32", seed=0)
            outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens={MAX_TOKENS}, ignore_eos=True))
            print("KVC_LOADED", "vllm_kvcompress" in sys.modules)
            print("TOKENS", json.dumps([list(o.outputs[0].token_ids) for o in outs]))
    """))
    env = dict(os.environ, VLLM_PLUGINS="")
    out = subprocess.run([sys.executable, str(script)], input=json.dumps(essay_prompts["short"]),
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in out.stdout.splitlines() if " " in ln}
    assert lines["KVC_LOADED"] == "False"
    assert json.loads(lines["TOKENS"]) == vanilla_tokens


# ---------------------------------------------------------------- 2. budget covers prompt + output
@pytest.mark.parametrize("kv", [{"policy": "h2o", "budget": 4000}, {"policy": "pyramid", "budget": 3000}],
                         ids=["h2o", "pyramid"])
def test_budget_covering_everything_is_token_identical(kv, vanilla_tokens, essay_prompts, model_dir):
    llm = make_llm(model_dir, kv, block_size=128)
    try:
        groups = scheduler_of(llm).kv_cache_manager.kv_cache_config.kv_cache_groups
        assert all(type(g.kv_cache_spec).__name__ == "CompressedAttentionSpec" for g in groups)
        assert tokens(llm.generate(essay_prompts["short"], greedy())) == vanilla_tokens
        # nothing evicts, so vLLM's prefix cache works as without the plugin: the same
        # prompts again reuse the cached pages (and still give the same tokens)
        pool = scheduler_of(llm).kv_cache_manager.block_pool
        assert len(pool.cached_block_hash_to_block) > 0
        again = llm.generate(essay_prompts["short"], greedy())
        assert all(o.num_cached_tokens >= 128 for o in again), [o.num_cached_tokens for o in again]
        assert tokens(again) == vanilla_tokens
    finally:
        close_llm(llm)


def test_preempted_request_resumes_from_the_prefix_cache(model_dir, essay_prompts):
    """Nothing evicted, 6 KV-cache groups (pyramid stages), the pool just holds the 3
    prompts: decoding preempts one. Its pages stay cached while it waits, and the
    pages the others allocate meanwhile must come off the tail of every group alike
    (``free_order``): vLLM's own group-after-group order emptied group 0 first, and a
    hit covers only what every group kept."""
    # 187 pages of 32 tokens x 30 layers (3 KV heads x 64 dims, float32): the three
    # ~1.95K-token prompts (184 pages) are admitted together, their 160 output tokens don't fit
    page = 32 * 30 * 3 * 64 * 2 * 4
    llm = make_llm(model_dir, {"policy": "pyramid", "budget": 6000}, block_size=32,
                   kv_cache_memory_bytes=187 * page)
    try:
        eng = llm.llm_engine
        sched = scheduler_of(llm)
        kvm = sched.kv_cache_manager
        assert len(kvm.coordinator.single_type_managers) == 6
        free0 = kvm.block_pool.get_num_free_blocks()
        for i, p in enumerate(essay_prompts["long"]):
            eng.add_request(f"pre-{i}", p, greedy(160))
        hit: dict[str, tuple[int, int]] = {}  # preempted request -> (cache hit before resuming, prompt)
        while eng.has_unfinished_requests():
            for req in sched.waiting:
                if req.num_preemptions > 0:
                    hit[req.request_id] = (kvm.get_computed_blocks(req)[1], req.num_prompt_tokens)
            eng.step()
        assert hit, "no request was preempted: the pool is larger than this test assumes"
        for got, prompt in hit.values():  # vLLM's order left ~0 here
            assert got >= 0.6 * prompt, hit
        assert sum(m.evicted_tokens for m in kvm.coordinator.single_type_managers) == 0  # nothing evicted
        assert kvm.block_pool.get_num_free_blocks() == free0
    finally:
        close_llm(llm)


# ---------------------------------------------------------------- 5/7. block accounting with H2O at 25%
H2O_25 = {"policy": "h2o", "budget": 0.25}


@pytest.fixture(scope="module")
def h2o_llm(model_dir):
    llm = make_llm(model_dir, H2O_25)
    yield llm
    close_llm(llm)


def _held(manager, req_id) -> int:
    return sum(1 for b in manager.req_to_blocks.get(req_id, []) if not b.is_null)


def test_decoding_requests_hold_exactly_the_predicted_pages(h2o_llm, essay_prompts):
    eng = h2o_llm.llm_engine
    sched = scheduler_of(h2o_llm)
    kvm = sched.kv_cache_manager
    managers = kvm.coordinator.single_type_managers
    for i, p in enumerate(essay_prompts["long"]):
        eng.add_request(f"acct-{i}", p, greedy(64))
    checks = 0
    usage_prefill = usage_decode = None
    while eng.has_unfinished_requests():
        eng.step()
        for req in sched.running:
            c = req.num_computed_tokens
            if req.num_output_tokens < 2:  # the step just run was (part of) prefill
                usage_prefill = max(usage_prefill or 0.0, kvm.usage)
                continue
            for m in managers:
                budget = m.budget(req.num_prompt_tokens)
                # pages after a decode step, before the next step frees the front ones
                assert _held(m, req.request_id) == paging.live_blocks(c - 1, 1, budget, m.interval, m.block_size)
                # and never more than budget + slack (the compaction interval, one partial page, the new token)
                assert _held(m, req.request_id) * m.block_size <= budget + m.interval + 2 * m.block_size
                checks += 1
            usage_decode = kvm.usage
    assert checks > 100
    # vLLM's own reported KV usage falls once prefill is compacted
    assert usage_decode is not None and usage_prefill is not None
    assert usage_decode < 0.5 * usage_prefill


def test_evicting_requests_copy_cached_pages(h2o_llm, essay_prompts):
    """Compaction rewrites a request's pages in place, so a request that may evict never
    writes a page the prefix cache holds: the same prompt again hits the cache, and the hit
    pages are copied into its own (``kv_manager``: copy on hit); every page comes back.
    Token equality with and without hits: tests/test_prefix_cache.py."""
    sched = scheduler_of(h2o_llm)
    kvm = sched.kv_cache_manager
    assert kvm.enable_caching
    free0 = kvm.block_pool.get_num_free_blocks()
    managers = kvm.coordinator.single_type_managers
    cow0 = sum(m.cow_pages for m in managers)
    inplace0 = sum(m.inplace_pages for m in managers)
    prompt = essay_prompts["long"][:1]
    assert h2o_llm.reset_prefix_cache()
    first = h2o_llm.generate(prompt, greedy())
    second = h2o_llm.generate(prompt, greedy())
    assert first[0].num_cached_tokens == 0
    assert second[0].num_cached_tokens >= 1024  # the prompt minus H2O's question window
    assert len(kvm.block_pool.cached_block_hash_to_block) > 0
    hit_pages = second[0].num_cached_tokens // managers[0].block_size
    copied = sum(m.cow_pages for m in managers) - cow0
    inplace = sum(m.inplace_pages for m in managers) - inplace0
    assert copied + inplace == hit_pages * len(managers)
    # only the entries its compacted window rewrites are copied; the pages before them are read in place
    P = len(second[0].prompt_token_ids)
    want = sum(max(0, hit_pages - paging.window_start(P, m.budget(P), m.interval, m.block_size,
                                                       **m.retention_args(P))) for m in managers)
    assert copied == want and inplace > 0, (copied, want, inplace)
    assert kvm.block_pool.get_num_free_blocks() == free0


def test_pages_return_after_finish_abort_and_preemption(h2o_llm, essay_prompts):
    eng = h2o_llm.llm_engine
    sched = scheduler_of(h2o_llm)
    pool = sched.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    prompts = essay_prompts["long"] + essay_prompts["short"]
    for i, p in enumerate(prompts):
        eng.add_request(f"free-{i}", p, greedy(40))
    finished = {}
    step = 0
    preempted = 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                finished[o.request_id] = o
        step += 1
        if step == 3:
            eng.abort_request(["free-0", "free-4"])
        if step == 6:
            preempted = len(sched.running)
            assert sched.reset_prefix_cache(reset_running_requests=True)
    assert preempted >= 1
    assert not sched.requests  # every request (finished, aborted, preempted-then-resumed) released
    assert set(finished) >= {f"free-{i}" for i in (1, 2, 3, 5)}
    assert all(len(finished[f"free-{i}"].outputs[0].token_ids) == 40 for i in (1, 2, 3, 5))
    assert pool.get_num_free_blocks() == free0


# ---------------------------------------------------------------- 6. admission at the same KV memory
def _peak_running(llm, prompts, max_steps=250) -> int:
    """Most requests running at once while the queue is not empty (long outputs,
    so the count is bounded by KV memory, not by prefill throughput)."""
    eng = llm.llm_engine
    sched = scheduler_of(llm)
    for i, p in enumerate(prompts):
        eng.add_request(f"adm-{i}", p, greedy(256))
    peak = 0
    steps = 0
    while eng.has_unfinished_requests() and steps < max_steps:
        eng.step()
        peak = max(peak, len(sched.running))
        steps += 1
        if not sched.waiting:
            break
    eng.abort_request([f"adm-{i}" for i in range(len(prompts))])
    while eng.has_unfinished_requests():
        eng.step()
    return peak


def test_admits_3_5x_more_requests_at_25_percent(model_dir):
    from vllm_kvcompress.assets import essays_text

    text = essays_text()
    # ~1K-token prompts, 256 output tokens; 256 MiB of float32 KV holds ~5.8K tokens:
    # vanilla fits ~4 such requests
    prompts = [text[20000 + i * 4400: 20000 + i * 4400 + 4200] + "\n\nIn summary," for i in range(26)]
    common = dict(max_model_len=2048, max_num_batched_tokens=256, max_num_seqs=64)
    llm = make_llm(model_dir, **common)
    try:
        vanilla_peak = _peak_running(llm, prompts)
    finally:
        close_llm(llm)
    llm = make_llm(model_dir, {"policy": "h2o", "budget": 0.25, "compress_interval": 8}, **common)
    try:
        ours_peak = _peak_running(llm, prompts)
    finally:
        close_llm(llm)
    print(f"peak running requests: vanilla {vanilla_peak}, h2o@25% {ours_peak} ({ours_peak / vanilla_peak:.2f}x)")
    assert ours_peak >= 3.5 * vanilla_peak


# ---------------------------------------------------------------- 3. StreamingLLM == vLLM's sliding window
STORY_PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain, step by step and in great detail, how a steam engine works.",
    "List and describe twenty famous inventions and the people who made them.",
]


def test_streaming_matches_vllm_sliding_window(model_dir):
    """StreamingLLM with no sinks and a recent window of N keeps exactly N tokens
    before each decode step, so the new token attends N+1 keys: vLLM's own
    sliding window of N+1. Prompts are shorter than the window (inside one
    prefill chunk the two differ: see docs/policies.md)."""
    n = 64
    gen = greedy(160)
    llm = make_llm(model_dir, {"policy": "streaming", "budget": n, "sinks": 0, "recent_window": n,
                               "compress_interval": 1})
    try:
        ours = tokens(llm.chat([[{"role": "user", "content": p}] for p in STORY_PROMPTS], gen))
    finally:
        close_llm(llm)
    llm = make_llm(model_dir, hf_overrides={"layer_types": ["sliding_attention"] * 30, "sliding_window": n + 1})
    try:
        groups = scheduler_of(llm).kv_cache_manager.kv_cache_config.kv_cache_groups
        assert type(groups[0].kv_cache_spec).__name__ == "SlidingWindowSpec"
        theirs = tokens(llm.chat([[{"role": "user", "content": p}] for p in STORY_PROMPTS], gen))
    finally:
        close_llm(llm)
    assert all(len(t) == 160 for t in ours)
    assert ours == theirs


# ---------------------------------------------------------------- 8. tensor parallel
def _even_heads_model(src, dst):
    """The embedded SmolLM2 (9 query / 3 KV heads, which TP=2 cannot split) cut to
    6 query / 2 KV heads: KV heads 0-1 and the query heads that read them (GQA
    groups of 3). Real weights, so the text stays text-like; written locally."""
    import shutil

    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    hd = cfg["head_dim"]
    q_per_kv = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    nkv = 2
    nq = nkv * q_per_kv
    w = load_file(str(src / "model.safetensors"))
    for k in list(w):
        if k.endswith("q_proj.weight"):
            w[k] = w[k][: nq * hd].contiguous()
        elif k.endswith(("k_proj.weight", "v_proj.weight")):
            w[k] = w[k][: nkv * hd].contiguous()
        elif k.endswith("o_proj.weight"):
            w[k] = w[k][:, : nq * hd].contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg.update(num_attention_heads=nq, num_key_value_heads=nkv)
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors") and f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def test_tensor_parallel_2_matches_single_rank(model_dir, essay_prompts, monkeypatch, tmp_path):
    """TP=2 (mp executor, one rank per core) gives the same tokens as TP=1 under
    eviction. Each rank scores and evicts its own KV head; the retained counts
    (hence the freed pages) are the same on every rank by construction."""
    from pathlib import Path

    model = str(_even_heads_model(Path(model_dir), tmp_path / "smollm2-6q2kv"))
    kv = {"policy": "h2o", "budget": 128}
    gen = greedy(32)
    llm = make_llm(model, kv)
    try:
        tp1 = tokens(llm.generate(essay_prompts["short"], gen))
        evicted = sum(m.evicted_tokens for m in scheduler_of(llm).kv_cache_manager.coordinator.single_type_managers)
    finally:
        close_llm(llm)
    assert evicted > 3 * 400 * 30  # ~600-token prompts, budget 128: most of each prompt was evicted
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    llm = make_llm(model, kv, tensor_parallel_size=2, distributed_executor_backend="mp")
    try:
        tp2 = tokens(llm.generate(essay_prompts["short"], gen))
    finally:
        close_llm(llm)
    assert tp2 == tp1

