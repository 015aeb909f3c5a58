"""README command 1: serve the embedded model with compression on
(``vllm serve ... --kv-policy pyramid --kv-budget 0.25``) on localhost, send it
one chat request with the official ``openai`` client and print the answer; then
stream a summary of a ~1.9K-token essay and print what compression saved: the
KV pages the request holds while it decodes, as vLLM's own ``/metrics``
reports them, against the pages the same request holds without compression.

    python -m vllm_kvcompress.demo [--port 8765] [--question "..."] [-- extra vllm serve flags]

Everything after ``--`` goes to ``vllm serve`` unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from vllm_kvcompress.assets import model_path

# Flags every run on a CPU machine needs: an explicit KV size (vLLM's CPU
# default reserves 92% of a memory node), eager mode (torch.compile costs
# minutes of start-up on 2 cores) and float32 (bf16 matmuls are ~4x slower on
# CPUs without AVX-512 BF16).
KV_BYTES = 512 << 20
BASE_FLAGS = ["--kv-cache-memory-bytes", str(KV_BYTES), "--max-model-len", "4096", "--enforce-eager",
              "--dtype", "float32"]
POLICY_FLAGS = ["--kv-policy", "pyramid", "--kv-budget", "0.25"]


def start_server(port: int, extra: list[str], log_path: Path) -> subprocess.Popen:
    vllm = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm), "serve", str(model_path()), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "smollm2", *BASE_FLAGS, *POLICY_FLAGS, *extra]
    log = open(log_path, "w")
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, port: int, log_path: Path, timeout: float = 600.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise SystemExit("vllm serve exited early:\n" + "\n".join(tail))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"vllm serve not ready after {timeout:.0f}s; log: {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def read_metrics(port: int) -> dict[str, float]:
    """The server's Prometheus samples: ``{'name{labels}': value}``."""
    out = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
    return out


def metric(samples: dict[str, float], name: str) -> float:
    """Sum of every sample of ``name`` (over its label sets)."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def kv_usage(port: int) -> float:
    """vLLM's own KV-cache usage gauge (fraction of the page pool in use)."""
    samples = read_metrics(port)
    if not any(k.startswith("vllm:kv_cache_usage_perc") for k in samples):
        raise RuntimeError("vllm:kv_cache_usage_perc not found in /metrics")
    return metric(samples, "vllm:kv_cache_usage_perc")


def show_savings(client, port: int) -> None:
    """Stream a long request; read the pool usage while it decodes."""
    from vllm_kvcompress.assets import essays_text

    essay = essays_text()[:8200]
    stream = client.completions.create(model="smollm2", prompt=essay + "\n\nIn summary,", max_tokens=96,
                                       temperature=0.0, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    usage, n, prompt_tokens = None, 0, None
    for chunk in stream:
        if chunk.choices:
            n += 1
        if n == 48 and usage is None:
            usage = kv_usage(port)
        if chunk.usage is not None:
            prompt_tokens = chunk.usage.prompt_tokens
    model_cfg = json.loads((model_path() / "config.json").read_text())
    layers, kv_heads = model_cfg["num_hidden_layers"], model_cfg["num_key_value_heads"]
    head_dim = model_cfg.get("head_dim") or model_cfg["hidden_size"] // model_cfg["num_attention_heads"]
    bytes_per_token = layers * kv_heads * head_dim * 2 * 4  # K and V, float32
    pool_tokens = KV_BYTES // bytes_per_token
    held = usage * pool_tokens
    full = prompt_tokens + 48  # token slots the same request holds uncompressed at that point
    print(f"KV cache while decoding a {prompt_tokens}-token essay prompt (vLLM /metrics, after 48 tokens):")
    print(f"  compressed (pyramid, 25%): {usage:.2%} of the pool = ~{held:.0f} token slots x 30 layers")
    print(f"  uncompressed, the same request would hold {full} token slots x 30 layers "
          f"({full / pool_tokens:.2%} of the pool): compression saved {1 - held / full:.0%} of its KV memory")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="python -m vllm_kvcompress.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--question", default="What is the capital of France?")
    ap.add_argument("--log", default="vllm-serve-demo.log", help="where the server's output goes")
    args = ap.parse_args(argv)

    from openai import OpenAI

    log_path = Path(args.log).resolve()
    t0 = time.time()
    proc = start_server(args.port, extra, log_path)
    try:
        wait_ready(proc, args.port, log_path)
        print(f"server ready in {time.time() - t0:.0f}s (log: {log_path})")
        client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="none")
        resp = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": args.question}],
            temperature=0.0, max_tokens=64)
        print(f"Q: {args.question}\nA: {resp.choices[0].message.content}")
        print(f"usage: {resp.usage.prompt_tokens} prompt + {resp.usage.completion_tokens} completion tokens")
        show_savings(client, args.port)
    finally:
        stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
