"""Patch point: ``vllm.v1.attention.backends.registry.AttentionBackendEnum.CPU_ATTN``
(overridden with ``register_backend``; on CPU vLLM always picks CPU_ATTN).

:class:`KVCompressCPUBackend` is vLLM's CPU attention with three additions for
layers whose group spec is a ``CompressedAttentionSpec``:

1. the metadata builder maps every request onto its compacted window
   (``vllm_kvcompress.paging``): the block table row is shifted to the window's
   first live entry, ``seq_lens`` become retained + new tokens, and the new
   keys/values are written to window slots ``R .. R+n-1``. RoPE was applied
   before caching, so keys keep their true positions;
2. after vLLM's own attention kernel, the step's weighted queries are scored
   against the window (``ops.accumulate_scores``);
3. requests whose retained count drops this step are compacted
   (``ops.compact``) into the window the scheduler will keep.

Uncompressed layers, dummy runs and requests that never evicted take vLLM's
path unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch
from vllm import _custom_ops as vllm_ops
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from vllm_kvcompress import ops
from vllm_kvcompress.integration import prefill_drop
from vllm_kvcompress.integration.kv_spec import CompressedAttentionSpec
from vllm_kvcompress.integration.model_runner import StepContext
from vllm_kvcompress.policies import get_policy

# Pure decode steps of compressed layers run our fused attention+scores kernel
# instead of vLLM's attention followed by a scoring pass (set 0 to compare).
FUSED_DECODE = os.environ.get("VLLM_KVCOMPRESS_FUSED_DECODE", "1") == "1"


def _retained(c: np.ndarray, budget: np.ndarray, interval: int) -> np.ndarray:
    """Vectorised ``policies.schedule.retained_count``."""
    return np.where(c <= budget, c, budget + (c - budget) % interval)


@dataclass
class StepPlan:
    """Per-request numbers of one compressed group for one step (CPU arrays)."""

    policy: object
    block_table: torch.Tensor  # [R, cols] unshifted rows
    query_start: np.ndarray  # [R+1]
    num_new: np.ndarray  # n
    prompt_lens: np.ndarray
    budget: np.ndarray  # B
    retained: np.ndarray  # R(C): slots held before the step
    start: np.ndarray  # S(C)
    retained_after: np.ndarray  # R(C+n)
    start_after: np.ndarray  # S(C+n)
    weights: torch.Tensor | None  # [num_tokens] float32 query weights (None: policy ignores attention)
    block_size: int
    positions: torch.Tensor | None = None  # [num_tokens] true positions (TRACK_POSITIONS only)
    scored: bool = False  # the fused decode kernel already folded this step's scores in
    # ---- prefill_drop (integration.prefill_drop)
    drop: object | None = None  # the step's DropPlan (set on the full-length metadata)
    reduced: object | None = None  # metadata for the layers after layer 0 (fewer query tokens)
    weights_full: torch.Tensor | None = None  # reduced metadata: query weights of the full-length step
    track_positions: bool = False
    bound: int = -1  # the DropPlan.version that weights/positions were gathered for

    @property
    def compact_rows(self) -> np.ndarray:
        return np.nonzero(self.retained_after < self.retained + self.num_new)[0]


class KVCompressMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.compressed = isinstance(kv_cache_spec, CompressedAttentionSpec)
        if self.compressed:
            if self.isa == "amx":  # keep the key-page layout ops.py is written (and checked) for
                self.isa = "vec"
                self._set_isa_to_layers(layer_names)
            cfg = kv_cache_spec.compress_config
            self.policy = get_policy(cfg)
            self.interval = cfg.compress_interval
            # debug/test aid: also track each slot's true token position (moved with compaction)
            self.track_positions = os.environ.get("VLLM_KVCOMPRESS_TRACK_POSITIONS", "0") == "1"
            self.prefill_drop = cfg.prefill_drop

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        prompt_lens = StepContext.prompt_lens
        cm = common_attn_metadata
        if not self.compressed or prompt_lens is None or len(prompt_lens) != cm.num_reqs:
            return super().build(common_prefix_len, cm, fast_build)
        spec = self.kv_cache_spec
        qsl = cm.query_start_loc_cpu.numpy().astype(np.int64)
        n = np.diff(qsl)
        seq = cm.seq_lens.cpu().numpy().astype(np.int64)
        c = seq - n
        rb = StepContext.request_budgets or [None] * len(prompt_lens)
        budget = np.fromiter((spec.budget(p, b) for p, b in zip(prompt_lens, rb)), dtype=np.int64,
                             count=len(prompt_lens))
        drop = None
        if self.prefill_drop:  # one plan per step, shared by every group's builder
            if StepContext.drop_plan is None:
                StepContext.drop_plan = prefill_drop.plan_for_step(spec, n, c, prompt_lens, StepContext.request_budgets)
                if StepContext.drop_plan is None:
                    StepContext.drop_plan = False
            drop = StepContext.drop_plan or None
        md = self._build(common_prefix_len, cm, fast_build, n, c, budget, prompt_lens, drop, None)
        if drop is not None:  # what this group's layers compute after layer 0 dropped tokens
            md.kvc.drop = drop
            md.kvc.reduced = self._build(common_prefix_len, cm, fast_build, n, c, budget, prompt_lens, drop,
                                         drop.counts[max(spec.kv_first_layer, 1)], md.kvc.weights)
        return md

    def _build(self, common_prefix_len, cm, fast_build, n, c, budget, prompt_lens, drop, kept, weights_full=None):
        """Metadata for the step's tokens, or (``kept`` given) for ``kept[i]`` query tokens of
        each request, the dropping ones written straight into their window after the step
        (their query weights: ``weights_full``, the full-length step's, gathered per layer)."""
        bs = self.block_size
        r = _retained(c, budget, self.interval)
        s = (c - r) // bs
        c2 = c + n
        r2 = _retained(c2, budget, self.interval)
        s2 = (c2 - r2) // bs
        n_eff = n if kept is None else kept
        if kept is not None:
            r = np.where(drop.rows, 0, r)
            s = np.where(drop.rows, s2, s)
        qsl = np.concatenate([[0], np.cumsum(n_eff)]).astype(np.int64)
        bt = cm.block_table_tensor
        if kept is not None or np.any(r < c):
            num_reqs, cols = bt.shape[0], bt.shape[1]
            s_t = torch.from_numpy(s)
            idx = (s_t[:, None] + torch.arange(cols)[None, :]).clamp_(max=cols - 1)
            bt_shift = bt.gather(1, idx.to(bt.device))
            t = int(qsl[-1])
            req_of_tok = torch.repeat_interleave(torch.arange(num_reqs), torch.from_numpy(n_eff))
            k_in_req = torch.arange(t) - torch.from_numpy(qsl[:-1])[req_of_tok]
            p = torch.from_numpy(r)[req_of_tok] + k_in_req
            entry = s_t[req_of_tok] + p // bs
            new_slots = bt[req_of_tok, entry].long() * bs + p % bs
            if kept is None:
                slots = cm.slot_mapping.clone()
                slots[:t] = new_slots
            else:
                slots = new_slots.to(cm.slot_mapping.dtype)
            new_seq = torch.from_numpy(r + n_eff).to(cm.seq_lens.dtype)
            cm = dataclasses.replace(cm, seq_lens=new_seq, block_table_tensor=bt_shift, slot_mapping=slots,
                                     max_seq_len=int((r + n_eff).max()))
            if kept is not None:
                q = torch.from_numpy(qsl).to(cm.query_start_loc_cpu.dtype)
                cm = dataclasses.replace(cm, query_start_loc=q.to(cm.query_start_loc.device), query_start_loc_cpu=q,
                                         num_actual_tokens=t, max_query_len=int(n_eff.max()))
        md = super().build(common_prefix_len, cm, fast_build)
        if kept is not None:
            md.kvc = StepPlan(policy=self.policy, block_table=bt, query_start=qsl, num_new=n_eff,
                              prompt_lens=prompt_lens, budget=budget, retained=r, start=s, retained_after=r2,
                              start_after=s2, weights=None, block_size=bs, weights_full=weights_full,
                              track_positions=self.track_positions)
            return md
        weights = None
        max_lens = StepContext.max_lens
        # a request that can never hold more than its budget never evicts: it needs no scores
        needs = np.ones(len(n), dtype=bool) if max_lens is None else max_lens > budget
        if drop is not None:
            needs = needs | drop.rows  # its scores pick the tokens deeper layers compute
        if self.policy.needs_attention and needs.any():
            weights = torch.cat([self.policy.query_weights(int(c[i]), int(n[i]), int(c2[i]),
                                                           bool(c[i] < prompt_lens[i]), int(prompt_lens[i]))
                                 if needs[i]
                                 else torch.zeros(int(n[i]), dtype=torch.float32) for i in range(len(n))])
        md.kvc = StepPlan(policy=self.policy, block_table=bt, query_start=qsl, num_new=n, prompt_lens=prompt_lens,
                          budget=budget, retained=r, start=s, retained_after=r2, start_after=s2, weights=weights,
                          block_size=bs,
                          positions=cm.positions[: int(qsl[-1])].clone() if self.track_positions else None)
        return md


class KVCompressCPUImpl(CPUAttentionBackendImpl):
    _acc: torch.Tensor | None = None
    _layout_checked = False

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if attn_metadata is None:
            return output
        plan = getattr(attn_metadata, "kvc", None)
        if plan is not None and plan.drop is not None and self._layer_index(layer) > 0:
            drop = plan.drop
            attn_metadata = plan.reduced  # this layer computes only the tokens kept so far
            plan = attn_metadata.kvc
            plan.drop = drop
            drop.bind(plan)
        n_tok = attn_metadata.num_actual_tokens
        nb, h, bs, _ = kv_cache.size()
        key_cache, value_cache = kv_cache.view(nb, h, bs * 2, -1).chunk(2, dim=2)
        vllm_ops.cpu_attn_reshape_and_cache(key[:n_tok], value[:n_tok], key_cache, value_cache,
                                            attn_metadata.slot_mapping[:n_tok], layer.isa,
                                            k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
                                            kv_cache_dtype=self.kv_cache_dtype)
        if plan is not None and self._can_fuse(plan, n_tok):
            # pure decode step: attention and the score update in one pass over the window
            if plan.weights is not None:
                self._ensure_acc(value_cache)
            r = n_tok
            ops.decode_attention_scores(query[:r].view(r, self.num_heads, self.head_size),
                                        key_cache.view(*value_cache.shape[:2], self.head_size, -1), value_cache,
                                        attn_metadata.block_table, attn_metadata.seq_lens, self.scale,
                                        self._acc if plan.weights is not None else None, plan.weights,
                                        out=output[:r].view(r, self.num_heads, self.head_size))
            plan.scored = True
        else:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                            output_block_scale)
        if plan is not None:
            self._compress(plan, attn_metadata, query, key_cache, value_cache, layer)
        return output

    _index: int | None = None

    def _layer_index(self, layer) -> int:
        if self._index is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self._index = extract_layer_index(layer.layer_name)
        return self._index

    def _can_fuse(self, plan: StepPlan, n_tok: int) -> bool:
        return (FUSED_DECODE and n_tok == len(plan.num_new)
                and bool((plan.num_new == 1).all()) and self.logits_soft_cap == 0 and self.alibi_slopes is None
                and self.sliding_window == -1 and self.sinks is None and self.kv_cache_dtype == "auto"
                and ops.impl_for("cpu") == "cpp")

    def _ensure_acc(self, value_cache) -> None:
        if self._acc is None:
            nb, h, bs, _ = value_cache.shape
            self._acc = torch.zeros(nb, h, bs, dtype=torch.float32)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        return None  # forward writes the cache (it knows the compacted slots)

    def _compress(self, plan: StepPlan, md, query, key_cache, value_cache, attn_layer) -> None:
        if not self._layout_checked:
            ops.check_layout(key_cache, value_cache)
            type(self)._layout_checked = True
        if plan.policy.needs_attention:
            self._ensure_acc(value_cache)
        layer = ops.paged_view(key_cache, value_cache, self._acc)
        if plan.weights is not None and not plan.scored:
            t = int(plan.query_start[-1])
            ops.window_scores(query[:t].view(t, self.num_heads, self.head_size), torch.from_numpy(plan.query_start),
                              layer.k_t, md.block_table, md.seq_lens, torch.from_numpy(plan.retained),
                              plan.weights, self.scale, self._acc)
        if plan.drop is not None and plan.drop.shrinks_after(self._layer_index(attn_layer)):
            plan.drop.select(self._layer_index(attn_layer), plan, layer)  # before compaction moves the scores
        if plan.positions is not None:
            self._track_new(plan, md, value_cache)
        rows = plan.compact_rows
        if len(rows):
            r = torch.from_numpy(rows)
            old_pos = self._read_pos(plan, rows) if plan.positions is not None else None
            kept = ops.compact_requests(layer, plan.policy, plan.block_table[r], torch.from_numpy(plan.start[rows]),
                                 torch.from_numpy(plan.retained[rows] + plan.num_new[rows]),
                                 torch.from_numpy(plan.start_after[rows]), torch.from_numpy(plan.retained_after[rows]),
                                 torch.from_numpy(plan.budget[rows]))
            if old_pos is not None:
                self._move_pos(plan, rows, old_pos, kept)

    # ---- position tracking (VLLM_KVCOMPRESS_TRACK_POSITIONS=1; tests and debugging only)
    _pos: torch.Tensor | None = None

    def _track_new(self, plan: StepPlan, md, value_cache) -> None:
        if self._pos is None:
            nb, h, bs, _ = value_cache.shape
            self._pos = torch.full((nb, h, bs), -1, dtype=torch.int64)
        slots = md.slot_mapping[: len(plan.positions)].long()
        bs = plan.block_size
        self._pos[slots // bs, :, slots % bs] = plan.positions.long()[:, None]

    def _read_pos(self, plan: StepPlan, rows) -> list[torch.Tensor]:
        out = []
        for i in rows:
            count = int(plan.retained[i] + plan.num_new[i])
            blk, off = ops.window_slots(plan.block_table[i], int(plan.start[i]), count, plan.block_size)
            out.append(self._pos[blk, :, off].T.clone())  # [H, count]
        return out

    def _move_pos(self, plan: StepPlan, rows, old_pos, kept) -> None:
        for j, i in enumerate(rows):
            keep = int(plan.retained_after[i])
            new = old_pos[j].gather(1, kept[j, :, :keep])
            blk, off = ops.window_slots(plan.block_table[i], int(plan.start_after[i]), keep, plan.block_size)
            self._pos[blk, :, off] = new.T

    def retained_positions(self, live_blocks: list[int], count: int) -> torch.Tensor:
        """[H, count] true positions of window slots 0..count-1 (window = the request's live pages)."""
        row = torch.tensor(live_blocks, dtype=torch.long)
        blk, off = ops.window_slots(row, 0, count, self._pos.shape[2])
        return self._pos[blk, :, off].T


class KVCompressCPUBackend(CPUAttentionBackend):
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls():
        return KVCompressCPUImpl

    @staticmethod
    def get_builder_cls():
        return KVCompressMetadataBuilder


def apply() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    path = f"{__name__}.KVCompressCPUBackend"
    register_backend(AttentionBackendEnum.CPU_ATTN, path)
