"""Decode-step timing: vLLM's CPU attention vs the fused attention+scores kernel.

One decode step of a batch (default: 16 requests x ~500-slot windows x 30
layers, H_kv=3, Hq=9, D=64, bf16, block size 32; every layer has its own
paged cache, so the step streams ~all KV memory like a real model step).
Timed per step over all layers (min and median of --reps steps):

* ``vllm attention``   vllm._custom_ops.cpu_attention_with_kv_cache (what the
  CPU_ATTN backend runs; scheduler metadata built once, as the builder does)
* ``kvc fused (C++)``  ops.decode_attention_scores: attention + score update
* ``kvc attn only``    the same kernel without scores (acc=None)
* ``torch reference``  ops.decode_attention_scores_reference (fewer reps)
* a whole prompt's prefill (``--prompt``, default 1920 tokens, one layer): vLLM's
  attention vs ``prefill_attention_scores`` unscored / last 20% scored / every query
  scored, on the AVX512-BF16 dot path where it runs and on the float32 path
* for scale: vLLM's attention over a 32-token chunk per request vs
  ``window_scores`` (scoring those 32 queries against the window), and
  ``compact_windows`` moving 3/4 of every request's window (every layer)

With ``--amx`` the same steps also run on vLLM's CPU "amx" pages (the same values
packed by ``ops.pack_amx``; ``VLLM_KVCOMPRESS_CPU_AMX=1`` in the engine), as extra
rows beside the "vec" ones; vLLM's own attention runs its "amx" ISA too where the CPU
has AMX tiles (without them it would die of SIGILL, so it stays on "vec").

Usage::

    python benchmarks/bench_kernels.py [--threads 1] [--reqs 16] [--len 500] [--layers 30] [--amx] [--prompt 1920]

Not a test: prints a table. Timings on a shared machine are noisy: use
--threads 1 when other jobs run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _timeit(fn, reps: int, warmup: int = 2) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts) * 1e3, statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reqs", type=int, default=16)
    ap.add_argument("--len", type=int, default=500, help="mean window length (slots); +-10%% per request")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--q-heads", type=int, default=9)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", type=int, default=1920,
                    help="also time a whole prompt's prefill attention at this length (0: skip)")
    ap.add_argument("--amx", action="store_true", help='also time our kernels on "amx" pages (bf16, bs % 32 == 0)')
    args = ap.parse_args()
    if args.amx and (args.dtype != "bfloat16" or args.block_size % 32 or args.head_size % 32):
        ap.error("--amx needs --dtype bfloat16, --block-size a multiple of 32 and --head-size a multiple of 32")

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from vllm_kvcompress import _ext, ops

    t0 = time.perf_counter()
    _ext.build()
    t_build = time.perf_counter() - t0

    R, H, Hq, D, bs, NL = args.reqs, args.kv_heads, args.q_heads, args.head_size, args.block_size, args.layers
    dt = getattr(torch, args.dtype)
    lens = (args.len * (0.9 + 0.2 * torch.rand(R))).round().clamp_min(1).to(torch.int32)
    pages = (lens + bs - 1) // bs
    cols = int(pages.max())
    nb = int(pages.sum()) + 1
    # scattered page ids (block 0 unused, like vLLM's null block)
    perm = torch.randperm(nb - 1) + 1
    bt = torch.zeros(R, cols, dtype=torch.int32)
    o = 0
    for i in range(R):
        bt[i, : pages[i]] = perm[o : o + pages[i]].to(torch.int32)
        o += int(pages[i])
    caches = [torch.randn(nb, H, 2 * bs, D, dtype=torch.float32).to(dt) for _ in range(NL)]
    accs = [torch.rand(nb, H, bs) for _ in range(NL)]
    views = [c.chunk(2, dim=2) for c in caches]
    layers = [ops.paged_view(k, v, a) for (k, v), a in zip(views, accs)]
    amx_layers = []
    if args.amx:  # the same values in "amx" pages (own copies of the caches)
        for lay, a in zip(layers, accs):
            k_amx = torch.empty(nb, H, bs, D, dtype=dt)
            v_amx = torch.empty(nb, H, bs, D, dtype=dt)
            ops.pack_amx(lay, k_amx, v_amx)
            amx_layers.append(ops.paged_view(k_amx, v_amx, a.clone(), amx=True))
    vllm_amx = bool(args.amx and torch.cpu._is_amx_tile_supported())
    q = torch.randn(R, Hq, D).to(dt)
    w = torch.ones(R)
    out = torch.empty(R, Hq, D, dtype=dt)
    scale = D ** -0.5
    qsl = torch.arange(R + 1, dtype=torch.int32)
    rows = []

    try:
        from vllm import _custom_ops as vops

        md = vops.cpu_attn_get_scheduler_metadata(
            num_reqs=R, num_heads=Hq, num_kv_heads=H, head_dim=D, seq_lens=lens, dtype=dt, query_start_loc=qsl,
            causal=True, sliding_window_size=-1, isa="amx" if vllm_amx else "vec", enable_kv_split=False)
        vllm_views = [(lay.k_t.view(nb, H, bs, D), lay.v) for lay in amx_layers] if vllm_amx else views

        def vllm_step():
            for k, v in vllm_views:
                vops.cpu_attention_with_kv_cache(
                    query=q, key_cache=k, value_cache=v, output=out, query_start_loc=qsl, seq_lens=lens, scale=scale,
                    causal=True, alibi_slopes=None, sliding_window=-1, block_table=bt, softcap=0.0,
                    scheduler_metadata=md, s_aux=None)

        vllm_step()
        ref_out = out.clone()
        rows.append(("vllm attention", *_timeit(vllm_step, args.reps)))
    except Exception as exc:  # noqa: BLE001
        ref_out = None
        print(f"(vLLM attention unavailable: {type(exc).__name__}: {exc})")

    def fused_step():
        for lay in layers:
            ops.decode_attention_scores(q, lay.k_t, lay.v, bt, lens, scale, lay.acc, w, out)

    def attn_step():
        for lay in layers:
            ops.decode_attention_scores(q, lay.k_t, lay.v, bt, lens, scale, None, None, out)

    attn_step()
    if ref_out is not None:
        err = (out.float() - ref_out.float()).abs().max().item()
        print(f"max |ours - vLLM| on the last layer's output: {err:.2e}")
    rows.append(("kvc fused (C++)", *_timeit(fused_step, args.reps)))
    rows.append(("kvc attn only (C++)", *_timeit(attn_step, args.reps)))
    if amx_layers:
        def fused_amx():
            for lay in amx_layers:
                ops.decode_attention_scores(q, lay.k_t, lay.v, bt, lens, scale, lay.acc, w, out, amx=True)

        def attn_amx():
            for lay in amx_layers:
                ops.decode_attention_scores(q, lay.k_t, lay.v, bt, lens, scale, None, None, out, amx=True)

        rows.append(("kvc fused (C++, amx pages)", *_timeit(fused_amx, args.reps)))
        rows.append(("kvc attn only (C++, amx pages)", *_timeit(attn_amx, args.reps)))

    def ref_step():
        for lay in layers:
            ops.decode_attention_scores_reference(q, lay.k_t, lay.v, bt, lens, scale, lay.acc, w, out)

    rows.append(("torch reference", *_timeit(ref_step, max(3, args.reps // 5), warmup=1)))

    # prefill-chunk scoring and compaction, for scale (same caches)
    n_new = 32
    nr = (lens - n_new).clamp_min(0)
    qs = torch.zeros(R + 1, dtype=torch.int32)
    qs[1:] = torch.cumsum(lens - nr, 0)
    T = int(qs[-1])
    qq = torch.randn(T, Hq, D).to(dt)
    ww = torch.ones(T)

    def window_step():
        for lay in layers:
            ops.window_scores(qq, qs, lay.k_t, bt, lens, nr, ww, scale, lay.acc)

    try:
        from vllm import _custom_ops as vops

        md_p = vops.cpu_attn_get_scheduler_metadata(
            num_reqs=R, num_heads=Hq, num_kv_heads=H, head_dim=D, seq_lens=lens, dtype=dt, query_start_loc=qs,
            causal=True, sliding_window_size=-1, isa="vec", enable_kv_split=False)
        out_p = torch.empty(T, Hq, D, dtype=dt)

        def vllm_prefill_step():
            for k, v in views:
                vops.cpu_attention_with_kv_cache(
                    query=qq, key_cache=k, value_cache=v, output=out_p, query_start_loc=qs, seq_lens=lens,
                    scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=bt, softcap=0.0,
                    scheduler_metadata=md_p, s_aux=None)

        rows.append((f"vllm attention ({n_new} q/req)", *_timeit(vllm_prefill_step, max(3, args.reps // 2))))
    except Exception as exc:  # noqa: BLE001
        print(f"(vLLM prefill attention unavailable: {type(exc).__name__}: {exc})")
    rows.append((f"window_scores ({n_new} q/req)", *_timeit(window_step, max(3, args.reps // 2))))
    if amx_layers:
        def window_amx():
            for lay in amx_layers:
                ops.window_scores(qq, qs, lay.k_t, bt, lens, nr, ww, scale, lay.acc, amx=True)

        rows.append((f"window_scores ({n_new} q, amx pages)", *_timeit(window_amx, max(3, args.reps // 2))))

    keep = (lens.long() * 3) // 4
    kmax = int(keep.max())
    kept = torch.full((R, H, kmax), -1, dtype=torch.long)
    for i in range(R):
        for h in range(H):
            kept[i, h, : keep[i]] = torch.randperm(int(lens[i]))[: keep[i]].sort().values
    zeros = torch.zeros(R, dtype=torch.long)

    def compact_step():
        for lay in layers:
            ops.compact_windows(lay.k_t, lay.v, lay.acc, bt, zeros, zeros, kept, keep)

    rows.append(("compact_windows (3/4 kept)", *_timeit(compact_step, max(3, args.reps // 2))))
    if amx_layers:
        def compact_amx():
            for lay in amx_layers:
                ops.compact_windows(lay.k_t, lay.v, lay.acc, bt, zeros, zeros, kept, keep, amx=True)

        rows.append(("compact_windows (amx pages)", *_timeit(compact_amx, max(3, args.reps // 2))))

    prefill_rows = prefill_table(args, dt, scale) if args.prompt else []

    print(f"\ndecode step: {R} requests x ~{args.len} slots (mean {lens.float().mean():.0f}) x {NL} layers, "
          f"H_kv={H} Hq={Hq} D={D} {args.dtype} bs={bs}, torch threads={torch.get_num_threads()}, "
          f"ops impl={ops.impl_for('cpu')}, extension load/build {t_build:.1f} s, "
          f"vLLM attention ISA {'amx' if vllm_amx else 'vec'}")
    base = rows[0][1] if rows and rows[0][0] == "vllm attention" else None
    print(f"{'':34s} {'min ms':>9s} {'median ms':>10s} {'min/vllm':>9s}")
    for name, mn, med in rows:
        rel = f"{mn / base:8.2f}x" if base else ""
        print(f"{name:34s} {mn:9.2f} {med:10.2f} {rel:>9s}")
    if prefill_rows:
        print(f"\nprefill of one {args.prompt}-token prompt (one layer, causal, H_kv={H} Hq={Hq} D={D} {args.dtype} "
              f"bs={bs}; ops.bf16_dot here: {ops.bf16_dot(dt, D)})")
        base = prefill_rows[0][1] if prefill_rows[0][0] == "vllm attention" else None
        print(f"{'':54s} {'min ms':>9s} {'median ms':>10s} {'min/vllm':>9s}")
        for name, mn, med in prefill_rows:
            rel = f"{mn / base:8.2f}x" if base else ""
            print(f"{name:54s} {mn:9.2f} {med:10.2f} {rel:>9s}")


def prefill_table(args, dt, scale) -> list:
    """vLLM's "vec" attention over a whole prompt vs ops.prefill_attention_scores (no scores,
    the last 20% of queries scored as PyramidInfer/SnapKV do, every query as H2O), on the
    AVX512-BF16 dot path where it runs and on the float32 path (VLLM_KVCOMPRESS_CPU_BF16DOT=0)."""
    import os

    from vllm import _custom_ops as vops

    from vllm_kvcompress import ops

    L, H, Hq, D, bs = args.prompt, args.kv_heads, args.q_heads, args.head_size, args.block_size
    nb = -(-L // bs) + 1
    cache = torch.randn(nb, H, 2 * bs, D).to(dt)
    k, v = cache.chunk(2, dim=2)
    lay = ops.paged_view(k, v, torch.zeros(nb, H, bs))
    bt = (torch.randperm(nb - 1) + 1).to(torch.int32)[None]
    q = torch.randn(L, Hq, D).to(dt)
    qs = torch.tensor([0, L], dtype=torch.int32)
    lens, nr = torch.tensor([L], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    out = torch.empty_like(q)
    reps = max(3, args.reps // 2)
    rows = []
    try:
        md = vops.cpu_attn_get_scheduler_metadata(
            num_reqs=1, num_heads=Hq, num_kv_heads=H, head_dim=D, seq_lens=lens, dtype=dt, query_start_loc=qs,
            causal=True, sliding_window_size=-1, isa="vec", enable_kv_split=False)

        def vllm_prefill():
            vops.cpu_attention_with_kv_cache(
                query=q, key_cache=k, value_cache=v, output=out, query_start_loc=qs, seq_lens=lens, scale=scale,
                causal=True, alibi_slopes=None, sliding_window=-1, block_table=bt, softcap=0.0, scheduler_metadata=md,
                s_aux=None)

        rows.append(("vllm attention", *_timeit(vllm_prefill, reps)))
    except Exception as exc:  # noqa: BLE001  (e.g. its bf16 "vec" path needs a page size % 32 == 0)
        print(f"(vLLM prefill attention unavailable: {type(exc).__name__}: {str(exc).strip()[:120]})")
    tail = torch.zeros(L)
    tail[-max(1, L // 5):] = 1.0
    ones = torch.ones(L)
    paths = [("bf16 dot", None), ("float32", "0")] if ops.bf16_dot(dt, D) else [("float32", None)]
    for path, env in paths:
        old = os.environ.get("VLLM_KVCOMPRESS_CPU_BF16DOT")
        if env is not None:
            os.environ["VLLM_KVCOMPRESS_CPU_BF16DOT"] = env
        try:
            for what, w in [("no scores", None), ("last 20% scored", tail), ("every query scored", ones)]:
                acc = None if w is None else lay.acc
                rows.append((f"kvc prefill attention, {what} ({path})", *_timeit(
                    lambda w=w, acc=acc: ops.prefill_attention_scores(q, qs, lay.k_t, lay.v, bt, lens, nr, scale, w,
                                                                      acc, out), reps)))
        finally:
            if env is not None:
                if old is None:
                    os.environ.pop("VLLM_KVCOMPRESS_CPU_BF16DOT")
                else:
                    os.environ["VLLM_KVCOMPRESS_CPU_BF16DOT"] = old
    return rows


if __name__ == "__main__":
    main()
