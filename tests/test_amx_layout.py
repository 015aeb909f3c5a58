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
