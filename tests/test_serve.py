"""`vllm serve <embedded model> --kv-policy pyramid --kv-budget 0.25` on localhost,
driven by the official `openai` SDK: chat and completions, streaming or not,
concurrent clients, per-request budgets, /metrics, and a bounded soak.
One server for the whole module (a start costs ~30-60 s)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from vllm_kvcompress import demo

PORT = int(os.environ.get("KVC_TEST_SERVE_PORT", "8799"))  # another port lets two suites run side by side
BASE = f"http://127.0.0.1:{PORT}/v1"
MODEL = "smollm2"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = demo.start_server(PORT, [], log)
    try:
        demo.wait_ready(proc, PORT, log)
        yield proc, log
    finally:
        demo.stop_server(proc)


# The clients drop a pooled connection after 1 s idle, well inside vLLM's keep-alive
# timeout (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s). httpx's default expiry is also 5 s, so a
# connection idle for just under 5 s can be reused as the server closes it: the request
# never reaches vLLM and the SDK raises APIConnectionError (the soak flake of issue #16;
# reproduced by scripts/keepalive_race.py). max_retries=0 keeps every real failure visible.
KEEPALIVE_S = 1.0


def _limits():
    import httpx

    return httpx.Limits(max_connections=1000, max_keepalive_connections=100, keepalive_expiry=KEEPALIVE_S)


def async_client(timeout: float):
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    return AsyncOpenAI(base_url=BASE, api_key="none", max_retries=0, timeout=timeout,
                       http_client=DefaultAsyncHttpxClient(limits=_limits()))


@pytest.fixture(scope="module")
def client(server):
    from openai import DefaultHttpxClient, OpenAI

    return OpenAI(base_url=BASE, api_key="none", max_retries=0, timeout=600,
                  http_client=DefaultHttpxClient(limits=_limits()))


@pytest.fixture(scope="module")
def long_prompt():
    from vllm_kvcompress.assets import essays_text

    return essays_text()[:8200] + "\n\nIn summary,"


def _chat(client, question="What is the capital of France?", **kw):
    return client.chat.completions.create(model=MODEL, temperature=0.0, max_tokens=32,
                                          messages=[{"role": "user", "content": question}], **kw)


def _settle(port=PORT, timeout=30.0) -> float:
    """Wait until no request runs; return vLLM's KV usage gauge then."""
    deadline = time.time() + timeout
    while True:
        s = demo.read_metrics(port)
        running = demo.metric(s, "vllm:num_requests_running") + demo.metric(s, "vllm:num_requests_waiting")
        if running == 0 or time.time() > deadline:
            return demo.metric(s, "vllm:kv_cache_usage_perc")
        time.sleep(0.5)


# ---------------------------------------------------------------- OpenAI SDK: chat / completions
def test_chat(server, client):
    _, log = server
    resp = _chat(client)
    assert "Paris" in resp.choices[0].message.content
    assert '"policy": "pyramid"' in log.read_text()


def test_chat_streaming_equals_non_streaming(client):
    whole = _chat(client).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in _chat(client, stream=True) if c.choices]
    assert "".join(parts) == whole


def test_completions_streaming_equals_non_streaming(client, long_prompt):
    kw = dict(model=MODEL, prompt=long_prompt, max_tokens=24, temperature=0.0)
    whole = client.completions.create(**kw).choices[0].text
    parts = [c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices]
    assert len(whole) > 0 and "".join(parts) == whole


def test_concurrent_clients(client, long_prompt):
    questions = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?",
                 "Say hello in Spanish."]

    def one(i):
        if i % 2:
            return _chat(client, questions[(i // 2) % len(questions)]).choices[0].message.content
        return client.completions.create(model=MODEL, prompt=long_prompt[i * 500:], max_tokens=16,
                                         temperature=0.0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert all(a for a in answers)
    assert "Paris" in answers[1]
    assert _settle() == 0.0


def test_long_request_uses_a_fraction_of_its_pages(client, long_prompt):
    """While a ~1.9K-token prompt decodes, vLLM's own KV usage gauge shows
    roughly the retained fraction, not the whole prompt. The prompt is new to the prefix
    cache: a request that hits keeps the cached pages it hit pinned (``pin_prefix_hits``), as a
    vanilla request holds a shared prefix, and the gauge then counts them too."""
    prompt = "A note nobody sent before.\n\n" + long_prompt
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=64, temperature=0.0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    usage, n, prompt_tokens = None, 0, None
    for chunk in stream:
        if chunk.choices:
            n += 1
        if n == 32 and usage is None:
            usage = demo.kv_usage(PORT)
        if chunk.usage is not None:
            prompt_tokens = chunk.usage.prompt_tokens
    bytes_per_token = 30 * 3 * 64 * 2 * 4
    pool_tokens = demo.KV_BYTES // bytes_per_token
    full_fraction = (prompt_tokens + 32) / pool_tokens
    assert prompt_tokens > 1500
    assert usage is not None and 0 < usage < 0.45 * full_fraction


# ---------------------------------------------------------------- per-request budgets
def _run_and_measure(client, prompt, extra_body=None):
    before = demo.read_metrics(PORT)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0.0,
                                    extra_body={"ignore_eos": True, **(extra_body or {})})
    after = demo.read_metrics(PORT)
    delta = {name: demo.metric(after, name) - demo.metric(before, name)
             for name in ("vllm:kv_compress_freed_blocks_total", "vllm:kv_compress_evicted_tokens_total")}
    return out, delta


def test_request_budget_lowers_that_requests_pages(client, long_prompt):
    out_server, d_server = _run_and_measure(client, long_prompt)
    out_low, d_low = _run_and_measure(client, long_prompt, {"vllm_xargs": {"kv_budget": 128}})
    assert out_server.usage.prompt_tokens == out_low.usage.prompt_tokens > 1500
    assert out_low.usage.completion_tokens == 40
    freed_server, freed_low = d_server["vllm:kv_compress_freed_blocks_total"], d_low["vllm:kv_compress_freed_blocks_total"]
    # 25% of ~1.9K tokens (pyramid: 6 stages) vs 128: several pages per stage fewer held
    assert freed_server > 0 and freed_low >= freed_server + 6 * 3, (freed_server, freed_low)
    ev_server, ev_low = d_server["vllm:kv_compress_evicted_tokens_total"], d_low["vllm:kv_compress_evicted_tokens_total"]
    assert ev_low > ev_server > 0


@pytest.mark.parametrize("bad", [0.5, 8, "lots", -1, 1])
def test_bad_request_budget_is_a_400(client, bad):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, extra_body={"vllm_xargs": {"kv_budget": bad}})
    assert e.value.status_code == 400
    msg = e.value.body["message"] if isinstance(e.value.body, dict) else str(e.value)
    assert "kv_budget" in msg and "\n" not in msg.strip(), msg
    assert "Paris" in _chat(client).choices[0].message.content  # and the server is fine


# ---------------------------------------------------------------- prefix caching (issue #29)
def _prefix_hits(port=PORT) -> tuple[float, float]:
    s = demo.read_metrics(port)
    total = lambda name: sum(v for k, v in s.items() if k.split("{")[0] in (name, name + "_total"))  # noqa: E731
    return total("vllm:prefix_cache_hits"), total("vllm:prefix_cache_queries")


def test_second_chat_turn_hits_the_prefix_cache(client, long_prompt):
    """Turn 2 of a conversation starts with turn 1's prompt: a compressed request reuses its
    cached pages (docs/serving.md, prefix caching), as vLLM's own metrics show."""
    system = {"role": "system", "content": "Answer from this document.\n\n" + long_prompt[:6000]}
    q1 = {"role": "user", "content": "Who wrote the document? Answer in one sentence."}
    _settle()
    h0, q0 = _prefix_hits()
    r1 = client.chat.completions.create(model=MODEL, temperature=0.0, max_tokens=24, messages=[system, q1])
    _settle()
    h1, qq1 = _prefix_hits()
    turn1 = r1.usage.prompt_tokens
    assert turn1 > 1200 and qq1 - q0 >= turn1
    answer = {"role": "assistant", "content": r1.choices[0].message.content}
    q2 = {"role": "user", "content": "And what is its main point?"}
    r2 = client.chat.completions.create(model=MODEL, temperature=0.0, max_tokens=24,
                                        messages=[system, q1, answer, q2])
    _settle()
    h2, _ = _prefix_hits()
    cached = getattr(r2.usage.prompt_tokens_details, "cached_tokens", None) if r2.usage.prompt_tokens_details else None
    assert h2 - h1 >= turn1 - 256, (h0, h1, h2, turn1, cached)  # turn 1's prompt, whole pages
    assert r2.choices[0].message.content


# ---------------------------------------------------------------- metrics
def test_metrics_show_compression(client, long_prompt):
    stream = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=48, temperature=0.0,
                                       stream=True, extra_body={"ignore_eos": True})
    mid = None
    for n, _ in enumerate(stream):
        if n == 24:
            mid = demo.read_metrics(PORT)
    after = demo.read_metrics(PORT)
    ratio = demo.metric(mid, "vllm:kv_compress_ratio")
    # 25% retention: computed / retained ~ 4 (pyramid floors and the compaction slack make it a bit less)
    assert 2.5 < ratio < 4.5, ratio
    stages = [k for k in mid if k.startswith("vllm:kv_compress_retained_tokens{")]
    assert len(stages) == 6  # pyramid: one KV-cache group per stage
    retained = [mid[k] for k in sorted(stages, key=lambda k: int(k.split('stage="')[1].split('"')[0]))]
    assert retained[0] >= retained[-1] > 0  # fewer tokens in deeper stages
    assert demo.metric(after, "vllm:kv_compress_evicted_tokens_total") > 1500 * 30 * 0.5
    assert demo.metric(after, "vllm:kv_compress_freed_blocks_total") > 0


# ---------------------------------------------------------------- soak (bounded, loopback only)
def test_soak_500_mixed_requests_with_aborts(client, long_prompt):
    from vllm_kvcompress.assets import essays_text

    text = essays_text()
    rng = random.Random(0)
    usage0 = _settle()
    jobs = []
    for i in range(500):
        n_chars = rng.choice([100, 300, 800, 2000, 4000])  # ~25 to ~1000 tokens
        start = rng.randrange(0, len(text) - n_chars)
        jobs.append((text[start:start + n_chars], rng.choice([4, 16, 32]), i % 10 == 3))  # 10% aborted

    async def main():
        aclient = async_client(timeout=600)
        sem = asyncio.Semaphore(32)
        done = aborted = 0

        async def one(prompt, max_tokens, abort):
            nonlocal done, aborted
            async with sem:
                stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                                          temperature=0.0, stream=True,
                                                          extra_body={"ignore_eos": True})
                n = 0
                async for _ in stream:
                    n += 1
                    if abort and n == 2:
                        await stream.close()  # client goes away mid-stream: vLLM aborts the request
                        aborted += 1
                        return
                assert n == max_tokens
                done += 1

        await asyncio.gather(*(one(*j) for j in jobs))
        await aclient.close()
        return done, aborted

    done, aborted = asyncio.run(main())
    assert done == 450 and aborted == 50
    assert _settle() == usage0 == 0.0  # every page is back in the pool
    assert "Paris" in _chat(client).choices[0].message.content


def test_soak_32_clients_60s_no_failures(client):
    async def main():
        aclient = async_client(timeout=120)
        deadline = time.time() + 60
        ok = failed = 0

        async def worker(w):
            nonlocal ok, failed
            i = 0
            while time.time() < deadline:
                i += 1
                try:
                    r = await aclient.chat.completions.create(
                        model=MODEL, temperature=0.0, max_tokens=8 + (w + i) % 16,
                        messages=[{"role": "user", "content": f"Count to {3 + (w * i) % 7}."}])
                    ok += bool(r.choices[0].message.content is not None)
                except Exception:
                    failed += 1

        await asyncio.gather(*(worker(w) for w in range(32)))
        await aclient.close()
        return ok, failed

    ok, failed = asyncio.run(main())
    assert failed == 0 and ok >= 32
    assert _settle() == 0.0
