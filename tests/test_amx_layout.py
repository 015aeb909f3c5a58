"""vLLM's CPU "amx" page layout (issue #18), checked on any x86 CPU: vLLM's own cache-write
op for ISA "amx" uses no AMX instruction, so it runs here too, and our torch reference of the
packing (``ops.unpack_amx`` / ``ops.pack_amx``) must read back exactly what it wrote. vLLM's
AMX attention op itself is never called (SIGILL without AMX tiles).

The compressed layers still run the "vec" layout on every CPU (``attention_backend`` keeps
them off "amx"); this test pins the packing an AMX path of the kernels has to read."""

from __future__ import annotations

import platform

import pytest
import torch
from conftest import run_parity_workers

from vllm_kvcompress import ops

vllm_ops = pytest.importorskip("vllm._custom_ops")
pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                reason="vLLM's amx cache-write op exists in x86 builds only")


def _write(isa: str, key, val, slots, nb, h, bs, d):
    kv = torch.full((nb, h, bs, 2 * d), -7.0, dtype=torch.bfloat16)  # never written: stays -7
    k_half, v_half = kv.view(nb, h, 2 * bs, d).chunk(2, dim=2)
    vllm_ops.cpu_attn_reshape_and_cache(key, val, k_half, v_half, slots, isa, k_scale=1.0, v_scale=1.0,
                                        kv_cache_dtype="auto")
    return kv, k_half, v_half


@pytest.mark.parametrize("nb,h,bs,d", [(3, 2, 32, 64), (2, 1, 64, 128), (2, 2, 32, 96), (2, 1, 128, 256),
                                       (4, 3, 32, 32)])
def test_amx_pages_read_back_what_vllm_wrote(nb, h, bs, d):
    gen = torch.Generator().manual_seed(nb * 1000 + bs + d)
    n = nb * bs - 3
    slots = torch.randperm(nb * bs, generator=gen)[:n].long()
    slots[5] = -1  # vLLM skips negative slots (padding)
    key = torch.randn(n, h, d, generator=gen).to(torch.bfloat16)
    val = torch.randn(n, h, d, generator=gen).to(torch.bfloat16)
    _, k_amx, v_amx = _write("amx", key, val, slots, nb, h, bs, d)
    _, k_vec, v_vec = _write("vec", key, val, slots, nb, h, bs, d)
    assert not torch.equal(k_amx, k_vec), "the amx and vec key pages should differ"
    amx = ops.unpack_amx(k_amx, v_amx)
    vec = ops.paged_view(k_vec, v_vec, None)
    # every slot, written or not (unwritten ones hold the -7 fill in both layouts)
    assert torch.equal(amx.k_t, vec.k_t), "amx key packing != ops.amx_key_index"
    assert torch.equal(amx.v, vec.v), "amx value packing != ops.amx_value_index"
    ok = slots >= 0
    blk, off = slots[ok] // bs, slots[ok] % bs
    assert torch.equal(amx.keys(blk, off), key[ok]) and torch.equal(amx.values(blk, off), val[ok])
    # the inverse: packing the vec pages gives vLLM's amx pages bit for bit
    k2, v2 = torch.empty_like(k_amx), torch.empty_like(v_amx)
    ops.pack_amx(vec, k2, v2)
    assert torch.equal(k2, k_amx) and torch.equal(v2, v_amx)


def test_amx_reference_decode_matches_vec_pages():
    """The torch reference of the fused decode gives the same result on unpacked amx pages
    as on vLLM's vec pages of the same tokens (what an AMX kernel path must reproduce)."""
    nb, h, bs, d, g = 4, 2, 32, 64, 3
    gen = torch.Generator().manual_seed(3)
    n = nb * bs
    slots = torch.arange(n)
    key = torch.randn(n, h, d, generator=gen).to(torch.bfloat16)
    val = torch.randn(n, h, d, generator=gen).to(torch.bfloat16)
    _, k_amx, v_amx = _write("amx", key, val, slots, nb, h, bs, d)
    _, k_vec, v_vec = _write("vec", key, val, slots, nb, h, bs, d)
    bt = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    lens = torch.tensor([40, 64], dtype=torch.int32)
    q = torch.randn(2, h * g, d, generator=gen).to(torch.bfloat16)
    w = torch.tensor([1.0, 0.5])
    outs = []
    for layer in (ops.unpack_amx(k_amx, v_amx), ops.paged_view(k_vec, v_vec, None)):
        acc = torch.zeros(nb, h, bs)
        out = ops.decode_attention_scores_reference(q, layer.k_t, layer.v, bt, lens, d ** -0.5, acc, w)
        outs.append((out, acc))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# ---------------------------------------------------------------- the C++ kernels on "amx" pages

ext = pytest.importorskip("vllm_kvcompress._ext")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def _amx_and_vec_pages(nb, h, bs, d, lens, gen):
    """The same random tokens written by vLLM into "amx" and "vec" pages: windows of
    ``lens`` slots on distinct random blocks 1..; every other slot of those blocks stays
    NaN (a kernel that reads past a window fails)."""
    kv_amx = torch.full((nb, h, bs, 2 * d), float("nan"), dtype=torch.bfloat16)
    kv_amx[0] = 0.0  # block 0 (vLLM's null block): the references gather padding from it
    kv_vec = kv_amx.clone()
    perm = (torch.randperm(nb - 1, generator=gen) + 1).tolist()
    rows, slots = [], []
    cols = max(-(-n // bs) for n in lens) + 1
    for n in lens:
        row = [perm.pop() for _ in range(-(-n // bs))]
        rows.append(row + [0] * (cols - len(row)))
        slots += [row[p // bs] * bs + p % bs for p in range(n)]
    slots_t = torch.tensor(slots, dtype=torch.long)
    key = torch.randn(len(slots), h, d, generator=gen).to(torch.bfloat16)
    val = torch.randn(len(slots), h, d, generator=gen).to(torch.bfloat16)
    for isa, kv in (("amx", kv_amx), ("vec", kv_vec)):
        kh, vh = kv.view(nb, h, 2 * bs, d).chunk(2, dim=2)
        vllm_ops.cpu_attn_reshape_and_cache(key, val, kh, vh, slots_t, isa, k_scale=1.0, v_scale=1.0,
                                            kv_cache_dtype="auto")
    halves = [kv.view(nb, h, 2 * bs, d).chunk(2, dim=2) for kv in (kv_amx, kv_vec)]
    return (ops.paged_view(*halves[0], None, amx=True), ops.paged_view(*halves[1], None),
            torch.tensor(rows, dtype=torch.int32), halves)


CASES = [(1, 2, 32, 64), (3, 3, 32, 64), (4, 2, 64, 128), (2, 1, 32, 96)]  # (G, H, bs, D)


@pytest.mark.skipif(not ext.available(), reason="C++ extension not built")
@pytest.mark.parametrize("G,H,bs,D", CASES)
def test_cpp_decode_and_window_on_amx_pages(G, H, bs, D):
    gen = torch.Generator().manual_seed(G * 100 + bs + D)
    lens = [1, 2, 15, 16, 17, bs - 1, bs, bs + 1, 2 * bs + 3, 3 * bs]
    nb = sum(-(-n // bs) for n in lens) + 3
    amx, vec, bt, _ = _amx_and_vec_pages(nb, H, bs, D, lens, gen)
    sl = torch.tensor(lens, dtype=torch.int32)
    R = len(lens)
    q = torch.randn(R, G * H, D, generator=gen).to(torch.bfloat16)
    w = torch.rand(R, generator=gen)
    acc0 = torch.rand(nb, H, bs, generator=gen)
    acc_a, acc_v = acc0.clone(), acc0.clone()
    out_a = ops.decode_attention_scores(q, amx.k_t, amx.v, bt, sl, D ** -0.5, acc_a, w, amx=True)
    out_v = ops.decode_attention_scores_reference(q, vec.k_t, vec.v, bt, sl, D ** -0.5, acc_v, w)
    torch.testing.assert_close(out_a.float(), out_v.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(acc_a, acc_v, rtol=1e-4, atol=1e-6)
    # prefill-chunk scores: every request's last n_new slots are new, all queries weighted
    n_new = [min(n, 5) for n in lens]
    qs = torch.tensor([0] + list(torch.tensor(n_new).cumsum(0)), dtype=torch.int32)
    nr = torch.tensor([n - k for n, k in zip(lens, n_new)], dtype=torch.int32)
    qw = torch.randn(int(qs[-1]), G * H, D, generator=gen).to(torch.bfloat16)
    wts = torch.rand(int(qs[-1]), generator=gen)
    wts[::4] = 0.0  # unweighted queries are skipped
    acc_a, acc_v = acc0.clone(), acc0.clone()
    ops.window_scores(qw, qs, amx.k_t, bt, sl, nr, wts, D ** -0.5, acc_a, amx=True)
    ops.window_scores_reference(qw, qs, vec.k_t, bt, sl, nr, wts, D ** -0.5, acc_v)
    torch.testing.assert_close(acc_a, acc_v, rtol=1e-4, atol=1e-6)
    # the same chunks' causal attention + scores (the AVX512-BF16 dot path where the CPU has it)
    acc_a, acc_v = acc0.clone(), acc0.clone()
    out_a = ops.prefill_attention_scores(qw, qs, amx.k_t, amx.v, bt, sl, nr, D ** -0.5, wts, acc_a, amx=True)
    out_v = ops.prefill_attention_scores_reference(qw, qs, vec.k_t, vec.v, bt, sl, nr, D ** -0.5, wts, acc_v)
    torch.testing.assert_close(out_a.float(), out_v.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(acc_a, acc_v, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not ext.available(), reason="C++ extension not built")
@pytest.mark.parametrize("G,H,bs,D", CASES[:3])
def test_cpp_compaction_on_amx_pages(G, H, bs, D):
    """Keys, values and scores moved on "amx" pages land where the reference moves them on
    "vec" pages, bit for bit (the windows overlap: new window = old start + 1 page)."""
    gen = torch.Generator().manual_seed(7 + bs + D)
    lens = [3 * bs + 5, 2 * bs, bs + 1]
    nb = sum(-(-n // bs) for n in lens) + 3
    amx, vec, bt, halves = _amx_and_vec_pages(nb, H, bs, D, lens, gen)
    R = len(lens)
    keep = torch.tensor([bs + 7, bs - 3, bs + 1], dtype=torch.long)
    kept = torch.full((R, H, int(keep.max())), -1, dtype=torch.long)
    for i, (n, k) in enumerate(zip(lens, keep.tolist())):
        for h in range(H):
            kept[i, h, :k] = torch.randperm(n, generator=gen)[:k].sort().values
    old = torch.zeros(R, dtype=torch.long)
    new = torch.tensor([1, 0, 0], dtype=torch.long)  # request 0 compacts into an overlapping window
    acc0 = torch.rand(nb, H, bs, generator=gen)
    acc_a, acc_v = acc0.clone(), acc0.clone()
    ops.compact_windows(amx.k_t, amx.v, acc_a, bt, old, new, kept, keep, amx=True)
    ops.compact_windows_reference(vec.k_t, vec.v, acc_v, bt, old, new, kept, keep)
    got = ops.unpack_amx(*halves[0])
    assert torch.equal(_bits(got.k_t), _bits(vec.k_t)) and torch.equal(_bits(got.v), _bits(vec.v))
    assert torch.equal(acc_a, acc_v)
    # the torch route of the same op on amx pages (unpack, compact, pack) agrees too
    amx2, _, _, halves2 = _amx_and_vec_pages(nb, H, bs, D, lens, torch.Generator().manual_seed(7 + bs + D))
    acc_r = acc0.clone()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "IMPL", "reference")
        ops.compact_windows(amx2.k_t, amx2.v, acc_r, bt, old, new, kept, keep, amx=True)
    assert torch.equal(_bits(halves2[0][0]), _bits(halves[0][0]))
    assert torch.equal(_bits(halves2[0][1]), _bits(halves[0][1])) and torch.equal(acc_r, acc_a)


def test_amx_switch_and_layout_check(monkeypatch):
    """``VLLM_KVCOMPRESS_CPU_AMX`` takes 0/1 (one-line error otherwise), and the start-up
    layout check accepts vLLM's amx pages through ``ops.unpack_amx``."""
    from vllm_kvcompress.integration import attention_backend as ab

    monkeypatch.delenv(ab.AMX_ENV, raising=False)
    assert ab.amx_pages_enabled() is True  # the default: vLLM's fastest path on AMX CPUs (issue #28)
    monkeypatch.setenv(ab.AMX_ENV, "0")
    assert ab.amx_pages_enabled() is False
    monkeypatch.setenv(ab.AMX_ENV, "1")
    assert ab.amx_pages_enabled() is True
    monkeypatch.setenv(ab.AMX_ENV, "yes")
    with pytest.raises(ValueError, match="VLLM_KVCOMPRESS_CPU_AMX='yes': expected 0 or 1"):
        ab.amx_pages_enabled()
    kv = torch.zeros(2, 2, 32, 2 * 64, dtype=torch.bfloat16)
    k_half, v_half = kv.view(2, 2, 64, 64).chunk(2, dim=2)
    ab.check_layout(k_half, v_half, isa="amx")
    ab.check_layout(k_half, v_half, isa="vec")


# ---------------------------------------------------------------- inside vLLM's engine

ENGINE_POLICIES = "h2o,pyramid"


@pytest.fixture(scope="module")
def page_parity(cut_model_dir, tmp_path_factory):
    """``backend_parity_worker.py`` twice, bf16: vLLM's "vec" pages and its "amx" pages
    (vLLM's builder made to pick "amx"; ``VLLM_KVCOMPRESS_CPU_AMX=1``)."""
    runs = {pages: {"KVC_PARITY_PAGES": pages, "VLLM_KVCOMPRESS_OPS": "cpp"} for pages in ("vec", "amx")}
    return run_parity_workers(cut_model_dir, tmp_path_factory.mktemp("pages"), ENGINE_POLICIES, runs, timeout=1200)


@pytest.mark.skipif(not ext.available(), reason="C++ extension not built")
@pytest.mark.parametrize("policy", ENGINE_POLICIES.split(","))
def test_engine_on_amx_pages_matches_vec_pages(page_parity, policy):
    """The whole compressed path on "amx" pages inside vLLM's engine (vLLM's amx cache
    write, our fused decode, window scores and compaction on amx pages) generates the
    same tokens and retains the same positions after every step as on "vec" pages:
    the kernels' arithmetic is the same on both layouts, in the same order."""
    vec, amx = page_parity["vec"][policy], page_parity["amx"][policy]
    assert vec["isa"] == ["vec"] and amx["isa"] == ["amx"], (vec["isa"], amx["isa"])
    assert sorted(vec["tokens"]) == ["a", "again", "late", "long", "own"]  # "again": a prefix hit
    assert amx["tokens"] == vec["tokens"]
    assert len(amx["positions"]) == len(vec["positions"])
    evicting = 0
    for step, (a, b) in enumerate(zip(vec["positions"], amx["positions"])):
        assert b == a, f"step {step}"
        evicting += sum(len(p[0]) < max(p[0], default=-1) + 1 for p in a.values())
    assert evicting > 0
