"""Scheduler-side fuzz test (hypothesis), no model: vLLM's real
``vllm.v1.core.sched.scheduler.Scheduler`` with the plugin's KV-cache managers
(``CompressedKVCacheManager``, one KV-cache group per pyramid stage) is driven
by a random stream of requests (prompt lengths, ``max_tokens``, server budgets
and per-request ``kv_budget``, shared prompt prefixes, aborts, a pool small
enough to preempt). The "model" samples a fixed token for every request whose
prompt is done.

After every step each running request must hold exactly the pages
``paging.live_blocks`` predicts in every compressed group (its row: the first
``window_start`` entries nulled, the rest real pages), waiting/preempted
requests hold none, and pool accounting adds up; at the end every page is back
in the pool and the plugin's per-request state is empty.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from vllm_kvcompress import paging
from vllm_kvcompress.config import ConfigError, KVCompressConfig, request_budget
from vllm_kvcompress.policies.schedule import max_slots

pytest.importorskip("vllm")

TOKEN = 7  # what the fake model samples (no EOS: the requests stop at max_tokens)
MAX_MODEL_LEN = 1024


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------- environment (module-scoped)


class _Env:
    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __repr__(self) -> str:  # keeps hypothesis' falsifying-example report short
        return "<env>"


@pytest.fixture(scope="module")
def env():
    """vLLM modules, the plugin's patches and the embedded model's config (no weights)."""
    try:
        from vllm_kvcompress.assets import model_path

        model = str(model_path())
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"embedded model unavailable: {exc}")
    from vllm.config import ModelConfig

    from vllm_kvcompress.integration import apply_all

    apply_all()  # what vLLM's plugin loader runs: registry, free order, prefix cache, kv_budget
    mc = ModelConfig(model=model, dtype="float32", seed=0, max_model_len=MAX_MODEL_LEN, skip_tokenizer_init=True)
    return _Env(model_config=mc)


def build_scheduler(env, kv: dict, bs: int, num_blocks: int, prefix_caching: bool, max_batched: int,
                    max_seqs: int):
    import torch
    from vllm.config import CacheConfig, SchedulerConfig, VllmConfig, set_current_vllm_config
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_kvcompress.integration.kv_spec import compressed_spec, stages_for

    mc = env.model_config
    sc = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_batched, max_model_len=MAX_MODEL_LEN,
                         enable_chunked_prefill=True, is_encoder_decoder=False, watermark=0.0)
    cc = CacheConfig(block_size=bs, gpu_memory_utilization=0.9, cache_dtype="auto",
                     enable_prefix_caching=prefix_caching)
    vc = VllmConfig(scheduler_config=sc, model_config=mc, cache_config=cc, additional_config={"kv_compress": kv})
    cfg = KVCompressConfig.from_dict(kv)
    L = mc.get_total_num_hidden_layers()
    base = FullAttentionSpec(block_size=bs, num_kv_heads=3, head_size=64, dtype=torch.float32)
    groups = [KVCacheGroupSpec([f"model.layers.{i}.self_attn.attn" for i in layers],
                               compressed_spec(base, cfg, layers[0], L))
              for layers in stages_for(cfg, L)]
    # what vLLM's get_kv_cache_config passes (the KVCacheConfig default None would switch the
    # coordinator to "dense retention" and drop prefill_end, i.e. the plugin's admission cap)
    kcc = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=groups,
                        prefix_cache_retention_interval=cc.prefix_cache_retention_interval)
    cc.num_gpu_blocks = num_blocks
    with set_current_vllm_config(vc):
        register_all_kvcache_specs(vc)
        sched = Scheduler(vllm_config=vc, kv_cache_config=kcc, structured_output_manager=StructuredOutputManager(vc),
                          block_size=bs, log_stats=False)
    return sched, [g.kv_cache_spec for g in groups]


# ---------------------------------------------------------------- scenarios


@st.composite
def scenarios(draw, sharing: bool = False):
    """A random request stream; ``sharing``: prefix caching on, prompts compacted once, several
    requests whose long prompts share a prefix (hits read in place and copied, issue #29)."""
    bs = draw(st.sampled_from([16, 32]))
    policy = draw(st.sampled_from(["h2o", "pyramid", "snapkv", "streaming"]))
    # small token budgets (everything evicts), fractions, large ones (short requests never evict:
    # vLLM's prefix cache stays on for them)
    budget = draw(st.one_of(st.integers(2 * bs, 200), st.sampled_from([0.25, 0.5, 0.75]), st.integers(300, 600)))
    kv = dict(policy=policy, budget=budget, compress_interval=draw(st.sampled_from([1, 4, 8, 32])),
              min_layer_budget=draw(st.sampled_from([16, 64])),
              prompt_compaction="once" if sharing else draw(st.sampled_from(["once", "per-chunk"])))
    if sharing:  # a hit compressed with the prompt (copies), or kept whole in the shared pages
        kv["prefix_hit"] = draw(st.sampled_from(["compress", "keep"]))
    if policy == "pyramid":
        kv["num_stages"] = draw(st.sampled_from([1, 3, 6]))
    try:
        cfg = KVCompressConfig.from_dict(kv)
    except ConfigError:
        cfg = None
    n_req = draw(st.integers(3, 7) if sharing else st.integers(1, 7))
    shared = draw(st.lists(st.integers(0, 999), min_size=300, max_size=300))  # a common prompt prefix
    reqs = []
    for i in range(n_req):
        P = draw(st.integers(100, 400) if sharing else st.one_of(
            st.integers(1, 40), st.integers(1, 400), st.sampled_from([bs, 2 * bs, 3 * bs + 1]), st.integers(100, 300)))
        T = draw(st.one_of(st.integers(1, 8), st.integers(1, 150)))
        # P - 40: a hit that leaves the voting window (32 queries) to the request
        prefix = draw(st.sampled_from([P // 2, P, max(P - 40, 0)] if sharing else
                                      [0, P // 2, P, min(P, 2 * bs), max(P - 40, 0)]))
        tail_seed = draw(st.integers(0, 999))
        prompt = shared[:prefix] + [(tail_seed + 31 * k) % 1000 for k in range(P - prefix)]
        kvb = None
        if cfg is not None and draw(st.integers(0, 2)) == 0:
            raw = draw(st.one_of(st.integers(bs, 256), st.sampled_from([0.1, 0.3, 0.6])))
            try:
                kvb = request_budget(cfg, raw, bs)
            except ConfigError:
                kvb = None
        arrive = draw(st.integers(0, 12) if sharing else st.one_of(st.just(0), st.integers(0, 30)))
        abort = arrive + draw(st.integers(0, 60)) if draw(st.integers(0, 4)) == 0 else None
        reqs.append(dict(id=f"r{i}", prompt=prompt, max_tokens=T, kv_budget=kvb, arrive=arrive, abort=abort))
    return dict(bs=bs, kv=kv, valid=cfg is not None, reqs=reqs, prefix_caching=sharing or draw(st.booleans()),
                max_batched=draw(st.sampled_from([64, 128, 512])), max_seqs=draw(st.sampled_from([2, 4, 8])),
                slack=draw(st.one_of(st.just(0), st.integers(0, 8), st.integers(0, 120))))


def pool_size(spec, specs, max_batched, interval):
    """Pages one request can hold at most (so it can always run alone) + the null page + slack."""
    bs, worst = spec["bs"], 0
    for r in spec["reqs"]:
        P, T = len(r["prompt"]), r["max_tokens"]
        need = 0
        for s in specs:
            B = s.budget(P, r["kv_budget"])
            hold = s.compress_config.hold_until(P)
            need += min(cdiv(P + T, bs), cdiv(max_slots(B, interval, max_batched, hold), bs) + 1)
        worst = max(worst, need)
    return worst + 1 + spec["slack"]


# ---------------------------------------------------------------- the test


def _held(blocks) -> int:
    return sum(1 for b in blocks if not b.is_null)


FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(spec=scenarios())
def test_scheduler_holds_exactly_the_predicted_pages(env, spec):
    _run(env, spec)


@FUZZ
@given(spec=scenarios(sharing=True))
def test_scheduler_holds_exactly_the_predicted_pages_with_shared_prefixes(env, spec):
    """The same invariants where prefix hits are the rule: pinned hit pages, pages read in place
    before a prompt's compacted window, copies inside it, one voter per page; with ``prefix_hit:
    keep`` a hit prefix stays whole in the request's row and the rule applies after it."""
    _run(env, spec)


def _fixed(bs: int, kv: dict, reqs: list[dict], max_batched: int, slack: int) -> dict:
    """A hand-written scenario (the shape ``scenarios`` draws), prefix caching on, 4 sequences."""
    return dict(bs=bs, kv=kv, valid=True, reqs=reqs, prefix_caching=True, max_batched=max_batched, max_seqs=4,
                slack=slack)


def _req(rid: str, prompt: list[int], max_tokens: int, arrive: int) -> dict:
    return dict(id=rid, prompt=prompt, max_tokens=max_tokens, kv_budget=None, arrive=arrive, abort=None)


def _text(n: int, seed: int = 0) -> list[int]:
    """``n`` token ids; the same ``seed`` gives the same ones (a shared prefix)."""
    return [(seed * 3 + (7 + 4 * seed) * k) % 1000 for k in range(n)]


_SHORT_THEN_LONG = _fixed(
    32, dict(policy="h2o", budget=300, compress_interval=32, prompt_compaction="once"),
    [_req("short", _text(200), 150, 0), _req("long", _text(192) + _text(408, seed=1), 8, 4)],
    max_batched=512, slack=40)


@settings(max_examples=1, deadline=None, database=None)
@given(spec=st.just(_SHORT_THEN_LONG))
def test_a_decoding_prompt_keeps_its_pages_votes(env, spec):
    """A prompt that fits its budget is not compacted, yet it may evict in decode: its pages stay
    in its row and get its decode votes. At its prompt step the cache entries of those pages
    moved to copies (its window may rewrite any of them), so a longer prompt that hits the prefix
    later reads the copies in place, never a page the first one votes into (checked by ``_run``)."""
    managers = _run(env, spec)
    assert sum(m.saved_pages for m in managers) >= 6  # the short prompt's 6 full pages (and the long one's)
    assert sum(m.inplace_pages for m in managers) == 6 and sum(m.cow_pages for m in managers) == 0


_KEEP_WHILE_PREFILLING = _fixed(
    16, dict(policy="snapkv", budget=0.25, compress_interval=8, prompt_compaction="once", prefix_hit="keep"),
    # second shares 6 pages, before every stage's compacted window (nothing of it is cached anew in first's
    # last step), and the 40 tokens after its hit fit beside first's last 16 (no second partial prefill)
    [_req("first", _text(400), 20, 0), _req("second", _text(100) + _text(36, seed=1), 20, 3)],
    max_batched=64, slack=400)


@settings(max_examples=1, deadline=None, database=None)
@given(spec=st.just(_KEEP_WHILE_PREFILLING))
def test_a_kept_prefix_stops_at_pages_another_prompt_votes_into(env, spec):
    """``prefix_hit: keep``: a request that arrives while another one prefills the prefix it shares
    (64-token steps) starts in the first one's last prompt step, while the first still votes into
    the cached pages they share: it keeps none of them (``_run`` checks that no kept page is
    another's voting page; without the lookup's cut at voters' pages it fails) and nothing is
    copied."""
    from vllm_kvcompress.integration.prefix_cache import LOOKUP_CUTS

    cuts = []
    managers = _run(env, spec, on_step=lambda: cuts.append(dict(LOOKUP_CUTS.get("second", {}))))
    assert any(c.get("voter") == 96 for c in cuts), cuts  # its 6 shared pages, cut at the first
    assert not any(m.cow_pages or m.inplace_pages for m in managers)  # nothing copied, no in-place voter


def _run(env, spec, on_step=None):
    from vllm import SamplingParams
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request, RequestStatus

    from vllm_kvcompress.integration.kv_manager import FROZEN, REQUEST_BUDGETS
    from vllm_kvcompress.integration.prefix_cache import DEFERRALS, DEFERRED

    deferred = DEFERRALS[0]
    event(f"config valid: {spec['valid']}")
    if not spec["valid"]:
        return  # config refused by validation (nothing to run)
    bs, kv = spec["bs"], spec["kv"]
    interval = KVCompressConfig.from_dict(kv).compress_interval
    probe, specs = build_scheduler(env, kv, bs, 16, False, spec["max_batched"], spec["max_seqs"])
    del probe
    num_blocks = pool_size(spec, specs, spec["max_batched"], interval)
    sched, specs = build_scheduler(env, kv, bs, num_blocks, spec["prefix_caching"], spec["max_batched"],
                                   spec["max_seqs"])
    kvm = sched.kv_cache_manager
    managers = kvm.coordinator.single_type_managers
    assert all(type(m).__name__ == "CompressedKVCacheManager" for m in managers)
    block_hasher = None
    if spec["prefix_caching"]:
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

        init_none_hash(sha256)
        block_hasher = get_request_block_hasher(bs, sha256)

    by_id = {r["id"]: r for r in spec["reqs"]}
    last: dict[str, tuple[int, int]] = {}  # request -> (computed before its last step, tokens of that step)
    done: set[str] = set()
    step = idle = hits = 0
    preempted: set[str] = set()
    while len(done) < len(by_id):
        for r in spec["reqs"]:
            if r["arrive"] == step:
                sp = SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True, temperature=0.0,
                                    extra_args={"kv_budget": r["kv_budget"]} if r["kv_budget"] is not None else None)
                sched.add_request(Request(r["id"], list(r["prompt"]), sp, None, block_hasher=block_hasher))
            if r["abort"] == step and r["id"] in sched.requests:
                sched.finish_requests(r["id"], RequestStatus.FINISHED_ABORTED)
                done.add(r["id"])
                last.pop(r["id"], None)
        so = sched.schedule()
        if on_step is not None:
            on_step()
        ids = list(so.num_scheduled_tokens)
        sampled = []
        for rid in ids:
            req = sched.requests[rid]
            n = so.num_scheduled_tokens[rid]
            c_before = req.num_computed_tokens - n
            if rid not in last and c_before > 0:
                hits += 1
            last[rid] = (c_before, n)
            sampled.append([TOKEN] if req.num_computed_tokens >= req.num_tokens else [])
        out = ModelRunnerOutput(req_ids=ids, req_id_to_index={rid: i for i, rid in enumerate(ids)},
                                sampled_token_ids=sampled)
        sched.update_from_output(so, out)
        for rid in by_id:
            if rid not in done and rid in by_id and step >= by_id[rid]["arrive"] and rid not in sched.requests:
                done.add(rid)  # finished (max_tokens)
                last.pop(rid, None)

        # ---- invariants after the step
        held_ids: set[int] = set()
        voters: dict[int, dict[int, str]] = {}  # group -> page -> the request whose votes fill its scores
        readers: dict[int, dict[int, str]] = {}  # group -> page -> a request that keeps it in its prefix
        for rid, req in sched.requests.items():
            r = by_id[rid]
            P = len(r["prompt"])
            running = req.status == RequestStatus.RUNNING
            if running and req.num_preemptions > 0 and rid not in preempted:
                preempted.add(rid)  # resumed after a preemption: its pages are checked like any other
            if not running:
                last.pop(rid, None)  # preempted / waiting: its next admission starts afresh
            for m, s in zip(managers, specs):
                blocks = m.req_to_blocks.get(rid, [])
                pins = m.pinned.get(rid, [])  # the cached pages it hit, held while it runs
                if not running:
                    assert _held(blocks) == 0 and not pins, f"step {step}: waiting request {rid} holds pages"
                    continue
                c, n = last[rid]
                F = FROZEN.get(rid, 0) if s.compress_config.keeps_prefix_hits else 0  # a hit prefix kept whole
                fb = F // bs
                if F:
                    assert F % bs == 0 and F <= c and F < P and rid not in m.cow_pending and not pins, (rid, F, c)
                B = s.budget(P - F, r["kv_budget"])
                assert m.budget(P - F, rid) == B, "REQUEST_BUDGETS does not carry the request's kv_budget"
                rule = s.compress_config.paging_args(P, F)
                # hit pages before the prompt's compacted window are read in place; the window's are copies
                first = fb + paging.window_start(P, B, interval, bs, **rule)
                assert all(p.ref_cnt >= 1 and p.block_hash is not None and p not in blocks[first:] for p in pins), (
                    f"step {step}: {rid}'s pinned hit pages must stay cached and apart from its own")
                held_ids.update(p.block_id for p in pins)
                evicts = P - F + r["max_tokens"] > B
                if evicts:  # its votes fill its row's score slots (after a kept prefix), one voter a page
                    mine = {b.block_id for b in blocks[fb:] if not b.is_null}
                    other = voters.setdefault(id(m), {})
                    shared = [(o, bid) for bid in mine if (o := other.get(bid)) is not None]
                    assert not shared, f"step {step}: {rid} votes into pages another request votes into {shared}"
                    other.update(dict.fromkeys(mine, rid))
                    # and it keeps no page in its prefix that another request votes into (the lookup's cut)
                    readers.setdefault(id(m), {}).update(dict.fromkeys((b.block_id for b in blocks[:fb]), rid))
                S = paging.window_start(c, B, interval, bs, **rule)
                want = paging.live_blocks(c, n, B, interval, bs, **rule)
                ctx = (f"step {step} {rid} stage {s.kv_stage}: C={c} n={n} B={B} F={F} I={interval} bs={bs} "
                       f"row={['-' if b.is_null else b.block_id for b in blocks]}")
                assert _held(blocks) == want, ctx
                assert len(blocks) == cdiv(c + n, bs), ctx
                assert not any(b.is_null for b in blocks[:fb]), ctx
                assert all(b.is_null for b in blocks[fb:fb + S]) and not any(b.is_null for b in blocks[fb + S:]), ctx
                held_ids.update(b.block_id for b in blocks[:fb] + blocks[fb + S:])
                if c + n >= P and evicts:
                    # its prompt is compacted: every page its window writes is its own and uncached
                    # (copy on hit; cached pages handed to a copy before the compaction)
                    S_after = paging.window_start(c + n, B, interval, bs, **rule)
                    mine = [b for b in blocks[fb + S_after:] if not b.is_null]
                    assert all(b.ref_cnt == 1 and b.block_hash is None for b in mine), (
                        ctx + f" refs={[b.ref_cnt for b in mine]} hashed={[b.block_hash is not None for b in mine]}")
        for g, pages in readers.items():
            both = [(bid, rid, voters[g][bid]) for bid, rid in pages.items() if bid in voters.get(g, {})]
            assert not both, f"step {step}: pages kept in a prefix while another request votes into them {both}"
        free = kvm.block_pool.get_num_free_blocks()
        assert free + len(held_ids) == num_blocks - 1, f"step {step}: {free} free + {len(held_ids)} held"

        idle = idle + 1 if not ids else 0
        assert idle < 80, f"no progress for 80 steps at step {step}: {list(sched.requests)}"
        step += 1
        assert step < 5000

    event(f"steps: {'<20' if step < 20 else '<100' if step < 100 else '>=100'}")
    event(f"preempted and resumed: {bool(preempted)}")
    target(float(len(preempted)), label="requests preempted and resumed")
    event(f"prefix hits: {hits > 0}")
    event(f"hit pages read in place: {sum(m.inplace_pages for m in managers) > 0}")
    event(f"hit pages copied: {sum(m.cow_pages for m in managers) > 0}")
    event(f"prefix_hit: {kv.get('prefix_hit', 'compress')}, hits: {hits > 0}")
    event(f"a request waited for a prefix cached in its step: {DEFERRALS[0] > deferred}")
    assert not sched.requests
    assert kvm.block_pool.get_num_free_blocks() == num_blocks - 1, "pages leaked"
    for m in managers:
        assert not any(m.req_to_blocks.get(rid) for rid in by_id), "a finished request still holds a row"
        assert not m.req_tokens
    assert not (set(REQUEST_BUDGETS) & set(by_id)), "REQUEST_BUDGETS leaked a finished request"
    assert not (DEFERRED & set(by_id)), "DEFERRED leaked a finished request"
    assert not (set(FROZEN) & set(by_id)), "FROZEN leaked a finished request"
    return managers


def _preemptions(sched, reqs: list[tuple[int, object]]) -> int:
    """Drive ``sched`` (fake model: one fixed token per step) with ``(arrival step,
    Request)`` pairs until every request finished; how many preemptions happened."""
    from vllm.v1.outputs import ModelRunnerOutput

    from vllm_kvcompress.integration.metrics import _tracker

    preemptions = 0
    for step in range(5000):
        for arrive, r in reqs:
            if arrive == step:
                sched.add_request(r)
        if step > max(a for a, _ in reqs) and not sched.requests:
            # the stats file's count (metrics: Scheduler._preempt_request) agrees
            assert _tracker(sched).preemptions == preemptions
            return preemptions
        so = sched.schedule()
        ids = list(so.num_scheduled_tokens)
        sampled = [[TOKEN] if sched.requests[rid].num_computed_tokens >= sched.requests[rid].num_tokens else []
                   for rid in ids]
        preemptions += len(so.preempted_req_ids or ())
        sched.update_from_output(so, ModelRunnerOutput(req_ids=ids, req_id_to_index={rid: i for i, rid in enumerate(ids)},
                                                       sampled_token_ids=sampled))
    raise AssertionError("requests did not finish")


def test_evicted_pages_are_freed_before_the_step_allocates(env, monkeypatch):
    """A prompt prefilled in the last step holds its uncompressed pages until they are
    freed; ``integration.schedule`` frees every running request's evicted pages before
    vLLM allocates the step's, so the older requests growing a page never find the pool
    empty and preempt the request that was just prefilled (vLLM frees inside each
    request's own allocation, in running order). Requests arrive staggered, windows grow
    a page per compaction cycle; no pool size preempts, and without the early free some do."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    from vllm_kvcompress.integration import schedule

    kv = {"policy": "h2o", "budget": 60, "compress_interval": 16, "min_layer_budget": 16}
    bs, prompt_len, out = 16, 160, 60
    sp = SamplingParams(max_tokens=out, ignore_eos=True, temperature=0.0)

    def run(num_blocks: int) -> int:
        sched, _ = build_scheduler(env, kv, bs, num_blocks, False, 512, 8)
        return _preemptions(sched, [(3 * i, Request(f"q{i}", [(11 * i + k) % 1000 for k in range(prompt_len)], sp,
                                                    None)) for i in range(8)])

    sizes = range(cdiv(prompt_len, bs) + 1, 45)
    assert [run(n) for n in sizes] == [0] * len(sizes)
    monkeypatch.setattr(schedule, "free_evicted", lambda scheduler: None)
    assert any(run(n) for n in sizes), "no pool size preempts without the early free: the test proves nothing"


def test_keeps_prompts_whole_only_while_every_waiting_prompt_fits():
    """prefill_drop's whole-prompt rule (``integration.schedule``): chunking is turned off
    for a step only while every waiting request fits vLLM's per-step token budget
    (``max_num_scheduled_tokens``, not ``max_num_batched_tokens``) beside one token per
    running request, so a long prompt, even behind a short or blocked head, is chunked
    as vLLM does and never waits forever."""
    from types import SimpleNamespace

    from vllm_kvcompress.config import KVCompressConfig
    from vllm_kvcompress.integration.schedule import keeps_prompts_whole

    def req(n, computed=0):
        return SimpleNamespace(num_tokens=n, num_computed_tokens=computed)

    def sched(waiting, running=0, drop=True, chunked=True, holding=()):
        kv = KVCompressConfig(policy="pyramid", budget=0.25, prefill_drop=drop)
        return SimpleNamespace(
            scheduler_config=SimpleNamespace(enable_chunked_prefill=chunked, max_num_batched_tokens=4096),
            max_num_scheduled_tokens=2048, running=[object()] * running, waiting=list(waiting),
            kv_holding_waiting=list(holding), vllm_config=SimpleNamespace(additional_config={"kv_compress": kv}))

    assert keeps_prompts_whole(sched([req(1900), req(2000)], running=48))
    assert not keeps_prompts_whole(sched([]))  # nothing waits
    assert not keeps_prompts_whole(sched([req(1900)], drop=False))
    assert not keeps_prompts_whole(sched([req(1900)], chunked=False))  # vLLM does not chunk anyway
    assert not keeps_prompts_whole(sched([req(2000)], running=49))  # 2000 > 2048 - 49
    assert not keeps_prompts_whole(sched([req(100), req(3000)]))  # the per-step budget is 2048, not 4096
    assert not keeps_prompts_whole(sched([req(3000)], holding=[req(5)]))  # a short (e.g. blocked) head, a long one behind
    assert keeps_prompts_whole(sched([req(3000, computed=2000)]))  # its remaining 1000 tokens fit

