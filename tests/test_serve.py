"""`vllm serve <embedded model> --kv-policy pyramid` answers OpenAI clients."""

from __future__ import annotations

import pytest

from vllm_kvcompress import demo

PORT = 8799


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = demo.start_server(PORT, [], log)
    try:
        demo.wait_ready(proc, PORT, log)
        yield proc, log
    finally:
        demo.stop_server(proc)


def test_serve_with_pyramid_answers_chat(server):
    from openai import OpenAI

    _, log = server
    client = OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="none")
    resp = client.chat.completions.create(model="smollm2", temperature=0.0, max_tokens=32,
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in resp.choices[0].message.content
    assert '"policy": "pyramid"' in log.read_text()


def test_long_request_uses_a_fraction_of_its_pages(server):
    """While a ~1.9K-token prompt decodes, vLLM's own KV usage gauge shows
    roughly the retained fraction, not the whole prompt."""
    from openai import OpenAI

    from vllm_kvcompress.assets import essays_text

    client = OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="none")
    stream = client.completions.create(model="smollm2", prompt=essays_text()[:8200] + "\n\nIn summary,",
                                       max_tokens=64, temperature=0.0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
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
