"""Preemption is invisible in the output (issue #16): greedy tokens with compression
are identical with and without preemption, for H2O and PyramidInfer.

The preemption is forced through vLLM's own ``Scheduler._preempt_request`` (the
call its scheduler makes when the pool runs out: pages freed, computed tokens reset,
the request back at the head of the waiting queue, recomputed on re-admission).
A pool too small for the batch rarely preempts here: vLLM 0.32 admits a request
only when the pages of its whole current sequence fit (and reserves them for
in-flight prefills), and with compression that bound is the most pages a request
ever holds (``CompressedKVCacheManager.get_num_blocks_to_allocate``); 6 prompts of
~600 tokens at H2O 128 into a 25-page pool ran one at a time with no preemption.
"""

from __future__ import annotations

import time

import pytest
from conftest import close_llm, make_llm, scheduler_of

N_OUT = 48
PREEMPT_AT = (12, 30)  # engine steps at which request 1 is preempted (mid-decode, twice)


def _run(llm, prompts, tag: str, force: bool) -> tuple[dict[str, list[int]], int]:
    from vllm import SamplingParams

    eng, sched = llm.llm_engine, scheduler_of(llm)
    for i, p in enumerate(prompts):
        eng.add_request(f"{tag}-r{i}", p, SamplingParams(temperature=0.0, max_tokens=N_OUT, ignore_eos=True))
    out, step, preempted = {}, 0, 0
    while eng.has_unfinished_requests():
        step += 1
        if force and step in PREEMPT_AT:
            req = next(r for r in sched.running if r.request_id.startswith(f"{tag}-r1"))
            assert req.num_computed_tokens > req.num_prompt_tokens  # decoding, its prompt already evicted from
            sched.running.remove(req)
            sched._preempt_request(req, time.monotonic())
            preempted += 1
        for o in eng.step():
            if o.finished:
                out[o.request_id.split("-")[1]] = list(o.outputs[0].token_ids)
    return out, preempted


@pytest.mark.parametrize("kv", [{"policy": "h2o", "budget": 128}, {"policy": "pyramid", "budget": 0.25}],
                         ids=["h2o", "pyramid"])
def test_preemption_is_invisible_in_the_tokens(kv, model_dir, essay_prompts):
    # PyramidInfer with vLLM's prefix cache on (the default): the second run and every resumed
    # request hit the pages cached before, exactly as a cold cache would give. H2O on a hit
    # ranks the cached prefix by the request's own queries only (docs/serving.md): its
    # invisibility holds with the prefix cache off
    llm = make_llm(model_dir, kv, enable_prefix_caching=kv["policy"] != "h2o")
    try:
        sched = scheduler_of(llm)
        kvm = sched.kv_cache_manager
        free0 = kvm.block_pool.get_num_free_blocks()
        prompts = essay_prompts["short"]
        plain, _ = _run(llm, prompts, "plain", force=False)
        evicted = sum(m.evicted_tokens for m in kvm.coordinator.single_type_managers)
        forced, preempted = _run(llm, prompts, "forced", force=True)
        assert preempted == len(PREEMPT_AT)
        assert evicted > 3 * 300 * 30  # ~600-token prompts: most of each was evicted in every layer
        assert sorted(plain) == ["r0", "r1", "r2"] and all(len(t) == N_OUT for t in plain.values())
        assert forced == plain
        assert kvm.block_pool.get_num_free_blocks() == free0  # every page back
    finally:
        close_llm(llm)
