"""README command 1: serve the embedded model with vLLM's OpenAI server on
localhost, send it one chat request with the official ``openai`` client, print
the answer, and stop the server.

    python -m vllm_kvcompress.demo [--port 8765] [--question "..."] [-- extra vllm serve flags]

Everything after ``--`` goes to ``vllm serve`` unchanged.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from vllm_kvcompress.assets import model_path

# Flags every run on a CPU machine needs: an explicit KV size (vLLM's CPU
# default reserves 92% of a memory node) and eager mode (torch.compile costs
# minutes of start-up on 2 cores).
BASE_FLAGS = ["--kv-cache-memory-bytes", str(512 << 20), "--max-model-len", "4096", "--enforce-eager"]


def start_server(port: int, extra: list[str], log_path: Path) -> subprocess.Popen:
    vllm = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm), "serve", str(model_path()), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "smollm2", *BASE_FLAGS, *extra]
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
    finally:
        stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
