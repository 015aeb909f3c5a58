"""Reproduce the HTTP keep-alive race behind the soak flake (issue #16).

vLLM's server closes a keep-alive connection after ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``
(5 s) idle; httpx (the ``openai`` SDK's transport) reuses a pooled connection until
its own ``keepalive_expiry``, also 5 s by default. A request sent on a connection
idle for just under 5 s can meet the server's close: it never reaches vLLM (nothing
in the server log) and the client gets ``APIConnectionError`` (an httpcore
``ReadError`` / ``RemoteProtocolError``).

    python scripts/keepalive_race.py [--port 8000] [--seconds 60]

Needs a running server (e.g. ``vllm serve <embedded model> --kv-policy pyramid``).
32 workers each send a tiny completion, wait a random 4.90-5.05 s (the server's
idle timeout) and send again on the pooled connection, first with httpx's default
expiry (5 s), then with 1 s (the tests' setting: below the server's timeout, so a
connection the server may be closing is never reused). It prints the failures of
each; the fix is right when the second line says 0.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time


async def _probe(base: str, model: str, expiry: float, seconds: float) -> tuple[int, int, set[str]]:
    import httpx
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    http = DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=64, max_keepalive_connections=64,
                                                       keepalive_expiry=expiry))
    client = AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=120, http_client=http)
    deadline = time.time() + seconds
    ok = failed = 0
    kinds: set[str] = set()
    rng = random.Random(0)

    async def worker() -> None:
        nonlocal ok, failed
        while time.time() < deadline:
            try:
                await client.completions.create(model=model, prompt="Hi", max_tokens=1)
                ok += 1
            except Exception as e:  # noqa: BLE001 - counting what the SDK raises
                failed += 1
                cause = e.__cause__ or e.__context__
                kinds.add(f"{type(e).__name__}({type(cause).__name__ if cause else ''})")
            await asyncio.sleep(rng.uniform(4.90, 5.05))

    await asyncio.gather(*(worker() for _ in range(32)))
    await client.close()
    return ok, failed, kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    base = f"http://127.0.0.1:{args.port}/v1"
    for expiry in (5.0, 1.0):
        ok, failed, kinds = asyncio.run(_probe(base, args.model, expiry, args.seconds))
        print(f"client keepalive_expiry {expiry:.0f} s (server 5 s): {ok} ok, {failed} failed "
              f"{sorted(kinds) if kinds else ''}")


if __name__ == "__main__":
    main()
