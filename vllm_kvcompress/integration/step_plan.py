"""The device-neutral half of the compressed-attention backend (no vLLM symbol is
patched here). Both thin backends mix these two classes into vLLM's own:

* ``attention_backend`` — vLLM's CPU_ATTN + the C++ kernels (CPU);
* ``attention_triton`` — vLLM's TRITON_ATTN + our Triton kernels (CUDA, and the
  CPU engine under ``TRITON_INTERPRET=1`` for tests and debugging).

:class:`CompressedBuilderMixin` maps every request of a compressed group onto its
compacted window (``vllm_kvcompress.paging``): the block-table row is shifted to
the window's first live entry, ``seq_lens`` become retained + new tokens, and the
new keys/values go to window slots ``R .. R+n-1``. RoPE was applied before
caching, so keys keep their true positions. The per-step numbers ride on vLLM's
metadata object as ``md.kvc``, a :class:`StepPlan`.

:class:`CompressedImplMixin` runs one layer's step: write the new keys/values at
the compacted slots, attend (vLLM's attention, or our fused decode + scores for
pure decode steps), fold the step's weighted queries into the score cache
(``ops.window_scores``), and compact the requests whose retained count drops
(``compaction.compact_requests``). A backend supplies four small hooks:
``_views`` (its cache layout as ``ops.PagedLayer`` views), ``_write_kv``,
``_attend`` (vLLM's attention without the cache write) and ``_check_layout``.

Uncompressed layers, dummy runs and requests that never evicted take vLLM's path
unchanged. Nothing here calls a CPU-only op or reads a device tensor back to the
host on the decode path: index tensors are built on the host from the
scheduler's numbers and copied to the device once per group and step.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_kvcompress import ops, paging
from vllm_kvcompress.integration import compaction, prefill_drop, step_costs
from vllm_kvcompress.integration.kv_spec import CompressedAttentionSpec
from vllm_kvcompress.integration.model_runner import StepContext
from vllm_kvcompress.policies import BasePolicy, get_policy

# Pure decode steps of compressed layers run our fused attention+scores kernel
# instead of vLLM's attention followed by a scoring pass (set 0 to compare).
FUSED_DECODE = os.environ.get("VLLM_KVCOMPRESS_FUSED_DECODE", "1") == "1"
# Other steps (prefill chunks, mixed batches) of compressed layers on "vec" pages run our
# prefill attention kernel, which scores from the same logits
# (ops.prefill_attention_scores), instead of vLLM's attention + a second softmax pass in
# ops.window_scores, where it measures faster: when the queries are mostly scored (H2O:
# every prompt query votes), and on bf16 pages where the CPU has AVX512-BF16
# (ops.bf16_dot: vdpbf16ps QK / PV, 0.53x the time of vLLM's "vec" attention on a
# 1.9K-token prompt, docs/results/bf16_kernels.md). Float32 pages where only a window of queries votes
# (PyramidInfer, SnapKV) keep vLLM's attention + the window's scores (A/B:
# docs/results/fused_prefill_ab). Not on vLLM's "amx" pages, where vLLM's AMX attention
# is the fast one (unmeasured here: no AMX on our machines); "amx" also fuses there where
# most queries vote (H2O: one pass instead of vLLM's AMX attention + a second scoring
# pass), the other side of that A/B (benchmarks/bench_ab.py). Set 0 to compare.
_FUSED_PREFILL_ENV = os.environ.get("VLLM_KVCOMPRESS_FUSED_PREFILL", "1").strip() or "1"
if _FUSED_PREFILL_ENV not in ("0", "1", "amx"):
    raise ValueError(f"VLLM_KVCOMPRESS_FUSED_PREFILL={_FUSED_PREFILL_ENV!r}: expected 0, 1 or amx")
FUSED_PREFILL = _FUSED_PREFILL_ENV != "0"
FUSED_PREFILL_AMX = _FUSED_PREFILL_ENV == "amx"


def score_cache_share(head_size: int, dtype: torch.dtype) -> float:
    """Score-cache bytes per KV-cache byte of a compressed layer: one float32 per slot
    and KV head (``[num_blocks, H, block_size]``) beside its keys and values
    (``2 * head_size`` elements). 0.8% for bf16 at head size 128."""
    return 4 / (2 * head_size * torch.tensor([], dtype=dtype).element_size())


@dataclass
class StepPlan:
    """Per-request numbers of one compressed group for one step (host arrays)."""

    policy: BasePolicy
    block_table: torch.Tensor  # [R, cols] unshifted rows (device)
    query_start: np.ndarray  # [R+1]
    num_new: np.ndarray  # n
    prompt_lens: np.ndarray
    budget: np.ndarray  # B
    retained: np.ndarray  # R(C): slots held before the step (a kept prefix included)
    start: np.ndarray  # S(C): the window's first entry after a kept prefix's pages
    retained_after: np.ndarray  # R(C+n)
    start_after: np.ndarray  # S(C+n)
    weights: torch.Tensor | None  # [num_tokens] float32 query weights (None: policy ignores attention)
    block_size: int
    positions: torch.Tensor | None = None  # [num_tokens] true positions (TRACK_POSITIONS only)
    scored: bool = False  # this layer's fused kernel (decode or prefill) already folded the step's scores in
    # ---- prefill_drop (integration.prefill_drop)
    drop: prefill_drop.DropPlan | None = None  # the step's plan (set on the full-length metadata)
    reduced: object | None = None  # vLLM metadata for this group's layers that compute fewer tokens (prefill_drop)
    weights_full: torch.Tensor | None = None  # reduced metadata: query weights of the full-length step
    track_positions: bool = False
    frozen: np.ndarray | None = None  # prompt tokens each request keeps whole (prefix_hit: keep; paging)
    # ---- prefix caching (integration.block_copies)
    hit_pairs: np.ndarray | None = None  # [n, 2] vLLM's page copies of this step: zero their scores
    save_pairs: np.ndarray | None = None  # [n, 2] pages of this group to copy before compaction
    bound: int = -1  # the DropPlan.version that weights/positions were gathered for
    _device: dict = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        """The step's true token count (vLLM may pad ``num_actual_tokens`` for CUDA graphs)."""
        return int(self.query_start[-1])

    @property
    def mostly_scored(self) -> bool:
        """At least half of the step's queries carry a score weight (H2O's prefill)."""
        return self.weights is not None and 2 * int((self.weights[: self.num_tokens] > 0).sum()) >= self.num_tokens

    @property
    def compact_rows(self) -> np.ndarray:
        return np.nonzero(self.retained_after < self.retained + self.num_new)[0]

    def compacted(self, rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """``(block-table rows, kept prefix)`` of requests ``rows`` as compaction sees them: the
        rows past a kept prefix's pages (``start``/``retained`` minus the prefix index them),
        and the prefix's token counts."""
        r = torch.from_numpy(rows)
        bt = self.block_table[r.to(self.block_table.device)]
        f = self.frozen[rows] if self.frozen is not None else np.zeros(len(rows), dtype=np.int64)
        if f.any():
            cols = bt.shape[1]
            idx = (torch.from_numpy(f // self.block_size)[:, None] + torch.arange(cols)[None, :]).clamp_(max=cols - 1)
            bt = bt.gather(1, idx.to(bt.device))
        return bt, f

    def on(self, device: torch.device, name: str) -> torch.Tensor:
        """``query_start`` / ``retained`` / ``weights`` on ``device``, copied once per
        step and group (every layer of the group reuses it)."""
        key = (name, self.bound)
        t = self._device.get(key)
        if t is None:
            src = getattr(self, name)
            src = torch.from_numpy(src) if isinstance(src, np.ndarray) else src
            t = self._device[key] = src.to(device, non_blocking=True)
        return t


def fuse_prefill(plan: StepPlan, paged: ops.PagedLayer) -> bool:
    """Whether a non-decode step of a compressed layer (plain attention) runs
    ops.prefill_attention_scores instead of vLLM's attention + ops.window_scores
    (see FUSED_PREFILL): C++ kernels on "vec" pages, and most queries scored or the
    AVX512-BF16 dot path available for this cache; on "amx" pages only with
    ``VLLM_KVCOMPRESS_FUSED_PREFILL=amx`` and most queries scored."""
    if not FUSED_PREFILL or ops.impl_for(paged.v.device) != "cpp":
        return False
    if paged.amx:
        return FUSED_PREFILL_AMX and plan.mostly_scored
    return plan.mostly_scored or ops.bf16_dot(paged.v.dtype, paged.v.shape[-1])


class CompressedBuilderMixin:
    """Mixed in front of a vLLM ``AttentionMetadataBuilder`` (``super().build`` is
    vLLM's): compressed groups get their window mapping, other groups pass through."""

    def _init_compression(self, kv_cache_spec) -> None:
        self.compressed = isinstance(kv_cache_spec, CompressedAttentionSpec)
        if self.compressed:
            cfg = kv_cache_spec.compress_config
            self.policy = get_policy(cfg)
            self.interval = cfg.compress_interval
            self.paging_args = cfg.paging_args
            # debug/test aid: also track each slot's true token position (moved with compaction)
            self.track_positions = os.environ.get("VLLM_KVCOMPRESS_TRACK_POSITIONS", "0") == "1"
            self.prefill_drop = cfg.prefill_drop

    @step_costs.timed_build
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        prompt_lens = StepContext.prompt_lens
        cm = common_attn_metadata
        if self.compressed and not StepContext.hooked:
            raise RuntimeError("vllm-kvcompress: compressed attention metadata was built outside "
                               "GPUModelRunner._build_attention_metadata (Model Runner V2?); this release "
                               "needs vLLM's V1 model runner")
        if not self.compressed or prompt_lens is None:
            with step_costs.timed("vllm_build"):
                return super().build(common_prefix_len, cm, fast_build)
        if len(prompt_lens) != cm.num_reqs:
            # passing through would attend over freed (null) pages
            raise RuntimeError(f"vllm-kvcompress: {cm.num_reqs} requests in the attention metadata but "
                               f"{len(prompt_lens)} recorded by the model runner")
        spec = self.kv_cache_spec
        qsl = cm.query_start_loc_cpu.numpy().astype(np.int64)
        num_new = np.diff(qsl)
        seq = cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None else cm.seq_lens.cpu()
        computed = seq.numpy().astype(np.int64) - num_new
        rb = StepContext.request_budgets or [None] * len(prompt_lens)
        frozen = StepContext.frozen
        if frozen is None:
            frozen = np.zeros(len(prompt_lens), dtype=np.int64)
        # a kept prefix (prefix_hit: keep) is never compressed: the budget is that of the tokens after it
        budget = np.fromiter((spec.budget(p, b) for p, b in zip(prompt_lens - frozen, rb)), dtype=np.int64,
                             count=len(prompt_lens))
        drop = None
        if self.prefill_drop:  # one plan per step, shared by every group's builder
            if StepContext.drop_plan is None:
                StepContext.drop_plan = prefill_drop.plan_for_step(spec, num_new, computed, prompt_lens,
                                                                   StepContext.request_budgets)
                if StepContext.drop_plan is None:
                    StepContext.drop_plan = False
            drop = StepContext.drop_plan or None
        md = self._build_window(common_prefix_len, cm, fast_build, num_new, computed, budget, prompt_lens, drop,
                                frozen=frozen)
        if drop is not None:
            md.kvc.drop = drop
            first = drop.first_reduced(spec.kv_first_layer, spec.num_layers_in_stage)
            if first is not None:  # what this group's layers compute once tokens were dropped
                md.kvc.reduced = self._build_window(common_prefix_len, cm, fast_build, num_new, computed, budget,
                                                    prompt_lens, drop, drop.counts[first], md.kvc.weights)
        return md

    def _build_window(self, common_prefix_len, cm, fast_build, num_new, computed, budget, prompt_lens, drop,
                      kept=None, weights_full=None, frozen=None):
        """vLLM metadata for the step's tokens mapped onto each request's window, or
        (``kept`` given) for ``kept[i]`` query tokens of each request, the dropping
        ones written straight into their window after the step (their query
        weights: ``weights_full``, the full-length step's, gathered per layer).
        ``frozen[i]``: the prompt tokens request ``i`` keeps whole (``paging``)."""
        bs = self.block_size
        interval = self.interval
        if frozen is None:
            frozen = np.zeros(len(num_new), dtype=np.int64)
        rule = self.paging_args(np.asarray(prompt_lens, dtype=np.int64), frozen)
        held = paging.held_count(computed, budget, interval, **rule)
        start = paging.window_start(computed, budget, interval, bs, **rule)
        held_after = paging.held_count(computed + num_new, budget, interval, **rule)
        start_after = paging.window_start(computed + num_new, budget, interval, bs, **rule)
        n_eff = num_new if kept is None else kept
        if kept is not None:
            held = np.where(drop.rows, 0, held)
            start = np.where(drop.rows, start_after, start)
        qsl = np.concatenate([[0], np.cumsum(n_eff)]).astype(np.int64)
        bt = cm.block_table_tensor
        dev = bt.device
        if kept is not None or np.any(held < computed):
            num_reqs, cols = bt.shape[0], bt.shape[1]
            t = int(qsl[-1])
            # host-side index arithmetic, one copy each to the device
            start_t = torch.from_numpy(start)
            frozen_t = torch.from_numpy(frozen)
            # row entry of each window slot: a kept prefix's pages, then the window (paging.entry_of)
            idx = paging.entry_of(torch.arange(cols)[None, :] * bs, start_t[:, None], bs,
                                  frozen_t[:, None]).clamp_(max=cols - 1)
            bt_shift = bt.gather(1, idx.to(dev, non_blocking=True))
            req_of_tok = torch.repeat_interleave(torch.arange(num_reqs), torch.from_numpy(n_eff))
            k_in_req = torch.arange(t) - torch.from_numpy(qsl[:-1])[req_of_tok]
            p = torch.from_numpy(held)[req_of_tok] + k_in_req
            entry = paging.entry_of(p, start_t[req_of_tok], bs, frozen_t[req_of_tok])
            new_slots = (bt[req_of_tok.to(dev, non_blocking=True), entry.to(dev, non_blocking=True)].long() * bs
                         + (p % bs).to(dev, non_blocking=True))
            if kept is None:
                slots = cm.slot_mapping.clone()
                slots[:t] = new_slots
            else:
                slots = new_slots.to(cm.slot_mapping.dtype)
            lens = torch.from_numpy(held + n_eff)
            upper = cm.seq_lens_cpu_upper_bound
            cm = dataclasses.replace(cm, seq_lens=lens.to(device=cm.seq_lens.device, dtype=cm.seq_lens.dtype),
                                     seq_lens_cpu_upper_bound=None if upper is None else lens.to(upper.dtype),
                                     block_table_tensor=bt_shift, slot_mapping=slots,
                                     max_seq_len=int((held + n_eff).max()))
            if kept is not None:
                q = torch.from_numpy(qsl).to(cm.query_start_loc_cpu.dtype)
                cm = dataclasses.replace(cm, query_start_loc=q.to(cm.query_start_loc.device), query_start_loc_cpu=q,
                                         num_actual_tokens=t, max_query_len=int(n_eff.max()))
        with step_costs.timed("vllm_build"):
            md = super().build(common_prefix_len, cm, fast_build)
        plan = StepPlan(policy=self.policy, block_table=bt, query_start=qsl, num_new=n_eff, prompt_lens=prompt_lens,
                        budget=budget, retained=held, start=start, retained_after=held_after,
                        start_after=start_after, weights=None, block_size=bs, track_positions=self.track_positions,
                        frozen=frozen)
        md.kvc = plan
        plan.hit_pairs = StepContext.hit_pairs
        if StepContext.save_pairs is not None and len(plan.compact_rows):
            own = np.unique(bt[torch.from_numpy(plan.compact_rows).to(dev)].cpu().numpy())
            pairs = StepContext.save_pairs
            pairs = pairs[np.isin(pairs[:, 0], own)]
            plan.save_pairs = pairs if len(pairs) else None
        if kept is not None:
            plan.weights_full = weights_full
            return md
        max_lens = StepContext.max_lens
        # a request that can never hold more than its budget never evicts: it needs no scores
        needs = np.ones(len(num_new), dtype=bool) if max_lens is None else max_lens - frozen > budget
        grow = rule["grow_from"]
        if grow is not None:  # decode_evict false: nothing is evicted after the prompt
            needs &= computed < grow
        if drop is not None:
            needs = needs | drop.rows  # its scores pick the tokens deeper layers compute
        if self.policy.needs_attention and needs.any():
            plan.weights = torch.cat([
                self.policy.query_weights(int(computed[i]), int(num_new[i]), int(computed[i] + num_new[i]),
                                          bool(computed[i] < prompt_lens[i]), int(prompt_lens[i]))
                if needs[i] else torch.zeros(int(num_new[i]), dtype=torch.float32)
                for i in range(len(num_new))])
        if self.track_positions:
            plan.positions = cm.positions[: plan.num_tokens].clone()
        return md


class CompressedImplMixin:
    """Mixed in front of a vLLM ``AttentionImpl``. A backend implements:

    * ``_views(kv_cache, layer) -> ops.PagedLayer`` (``acc`` None): its cache as
      ``k_t [nb, H, D, bs]`` / ``v [nb, H, bs, D]`` views;
    * ``_write_kv(layer, key, value, kv_cache, slot_mapping)``: vLLM's cache write;
    * ``_attend(layer, query, key, value, kv_cache, md, output, ...)``: vLLM's
      attention over the (already written) cache;
    * ``_check_layout(kv_cache, paged)``: refuse a layout the views do not match.
    """

    _acc: torch.Tensor | None = None  # [nb, H, bs] float32 score cache (lazy, per layer)
    _layout_checked = False
    _index: int | None = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if attn_metadata is None:  # profiling run
            return self._attend(layer, query, key, value, kv_cache, None, output, output_scale, output_block_scale)
        plan: StepPlan | None = getattr(attn_metadata, "kvc", None)
        if plan is not None and plan.drop is not None and plan.drop.reduced(self._layer_index(layer)):
            drop = plan.drop
            attn_metadata = plan.reduced  # this layer computes only the tokens kept so far
            plan = attn_metadata.kvc
            plan.drop = drop
            drop.bind(plan)
        n_tok = plan.num_tokens if plan is not None else attn_metadata.num_actual_tokens
        if plan is not None:
            plan.scored = False  # each layer decides: the plan is shared by the group's layers
            if plan.hit_pairs is not None:
                self._took_copies(plan.hit_pairs)
        with step_costs.timed("cache_write", query.device):
            self._write_kv(layer, key[:n_tok], value[:n_tok], kv_cache, attn_metadata.slot_mapping[:n_tok])
        paged = self._views(kv_cache, layer)
        if plan is not None and self._can_fuse(plan, n_tok, query.device):
            # pure decode step: attention and the score update in one pass over the window
            if plan.weights is not None:
                self._ensure_acc(paged)
            r = n_tok
            weights = plan.on(query.device, "weights") if plan.weights is not None else None
            with step_costs.timed("fused_decode", query.device):
                ops.decode_attention_scores(query[:r].view(r, self.num_heads, self.head_size), paged.k_t, paged.v,
                                            attn_metadata.block_table, attn_metadata.seq_lens, self.scale,
                                            self._acc if weights is not None else None, weights,
                                            out=output[:r].view(r, self.num_heads, self.head_size),
                                            amx=paged.amx)
            plan.scored = True
        elif plan is not None and self._can_fuse_prefill(plan, n_tok, query.device, paged):
            # our causal attention over each window; the weighted queries' scores from the same logits
            if plan.weights is not None:
                self._ensure_acc(paged)
            with step_costs.timed("fused_prefill", query.device):
                ops.prefill_attention_scores(query[:n_tok].view(n_tok, self.num_heads, self.head_size),
                                             plan.on(query.device, "query_start"), paged.k_t, paged.v,
                                             attn_metadata.block_table, attn_metadata.seq_lens,
                                             plan.on(query.device, "retained"), self.scale,
                                             plan.weights, self._acc if plan.weights is not None else None,
                                             out=output[:n_tok].view(n_tok, self.num_heads, self.head_size),
                                             amx=paged.amx)
            plan.scored = plan.weights is not None
        else:
            with step_costs.timed("attention" if plan is not None else "attention_plain", query.device):
                self._attend(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                             output_block_scale)
        if plan is not None:
            self._compress(plan, attn_metadata, query, kv_cache, paged, layer)
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        return None  # forward writes the cache (it knows the compacted slots)

    def _layer_index(self, layer) -> int:
        if self._index is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self._index = extract_layer_index(layer.layer_name)
        return self._index

    def _plain_attention(self) -> bool:
        """What our kernels implement: no soft cap, ALiBi, sliding window, sinks or quantized cache."""
        return (not self.logits_soft_cap and self.alibi_slopes is None
                and self.sliding_window in (-1, None, (-1, -1)) and self.sinks is None
                and self.kv_cache_dtype == "auto")

    def _can_fuse(self, plan: StepPlan, n_tok: int, device: torch.device) -> bool:
        return (FUSED_DECODE and n_tok == len(plan.num_new)
                and bool((plan.num_new == 1).all()) and self._plain_attention() and ops.impl_for(device) != "reference")

    def _can_fuse_prefill(self, plan: StepPlan, n_tok: int, device: torch.device, paged: ops.PagedLayer) -> bool:
        return self._plain_attention() and fuse_prefill(plan, paged)

    def _ensure_acc(self, paged: ops.PagedLayer) -> None:
        if self._acc is None:
            nb, h, bs, _ = paged.v.shape
            self._acc = torch.zeros(nb, h, bs, dtype=torch.float32, device=paged.v.device)

    def _compress(self, plan: StepPlan, md, query, kv_cache, paged: ops.PagedLayer, attn_layer) -> None:
        if not self._layout_checked:
            self._check_layout(kv_cache, paged)
            type(self)._layout_checked = True
        if plan.policy.needs_attention:
            self._ensure_acc(paged)
        layer = ops.PagedLayer(k_t=paged.k_t, v=paged.v, acc=self._acc, amx=paged.amx)
        dev = query.device
        if plan.weights is not None and not plan.scored:
            t = plan.num_tokens
            # the per-request numbers stay on the host: the kernels build their index
            # lists there (no device-to-host synchronisation on CUDA)
            with step_costs.timed("scoring", dev):
                ops.window_scores(query[:t].view(t, self.num_heads, self.head_size),
                                  torch.from_numpy(plan.query_start), layer.k_t, md.block_table, md.seq_lens,
                                  torch.from_numpy(plan.retained), plan.weights, self.scale, self._acc,
                                  amx=layer.amx)
        if plan.drop is not None and plan.drop.shrinks_after(self._layer_index(attn_layer)):
            with step_costs.timed("selection", dev):
                plan.drop.select(self._layer_index(attn_layer), plan, layer)  # before compaction moves the scores
        if plan.positions is not None:
            self._track_new(plan, md, layer)
        if plan.save_pairs is not None:
            self._copy_pages(layer, plan.save_pairs)
        rows = plan.compact_rows
        if len(rows):
            bt, f = plan.compacted(rows)  # a kept prefix is never compacted
            old_pos = self._read_pos(plan, rows) if plan.positions is not None else None
            kept = compaction.compact_requests(layer, plan.policy, bt, torch.from_numpy(plan.start[rows]),
                                               torch.from_numpy(plan.retained[rows] + plan.num_new[rows] - f),
                                               torch.from_numpy(plan.start_after[rows]),
                                               torch.from_numpy(plan.retained_after[rows] - f),
                                               torch.from_numpy(plan.budget[rows]))
            if old_pos is not None:
                self._move_pos(plan, rows, old_pos, kept)

    # ---- prefix caching (integration.block_copies, kv_manager)
    def _took_copies(self, pairs: np.ndarray) -> None:
        """vLLM copied pages ``src -> dst`` (a prefix hit) before this step: the copies' scores
        start at 0 (the cached page carries its writer's votes); tracked positions follow."""
        if self._acc is not None:
            self._acc[torch.from_numpy(pairs[:, 1]).to(self._acc.device)] = 0
        if self._pos is not None:
            src, dst = (torch.from_numpy(pairs[:, i]).to(self._pos.device) for i in (0, 1))
            self._pos[dst] = self._pos[src]

    def _copy_pages(self, layer: ops.PagedLayer, pairs: np.ndarray) -> None:
        """Copy this layer's keys and values of pages ``pairs[:, 0]`` to ``pairs[:, 1]`` (a cached
        page the compaction below rewrites keeps its content in the prefix cache)."""
        src, dst = (torch.from_numpy(pairs[:, i]).to(layer.v.device) for i in (0, 1))
        layer.k_t[dst] = layer.k_t[src]
        layer.v[dst] = layer.v[src]
        if self._pos is not None:
            self._pos[dst.to(self._pos.device)] = self._pos[src.to(self._pos.device)]

    # ---- position tracking (VLLM_KVCOMPRESS_TRACK_POSITIONS=1; tests and debugging only)
    _pos: torch.Tensor | None = None

    def _track_new(self, plan: StepPlan, md, layer: ops.PagedLayer) -> None:
        if self._pos is None:
            nb, h, bs, _ = layer.v.shape
            self._pos = torch.full((nb, h, bs), -1, dtype=torch.int64, device=layer.v.device)
        slots = md.slot_mapping[: len(plan.positions)].long()
        bs = plan.block_size
        self._pos[slots // bs, :, slots % bs] = plan.positions.long().to(self._pos.device)[:, None]

    def _read_pos(self, plan: StepPlan, rows) -> list[torch.Tensor]:
        out = []
        bt, f = plan.compacted(rows)
        for j, i in enumerate(rows):
            count = int(plan.retained[i] + plan.num_new[i] - f[j])
            blk, off = ops.window_slots(bt[j], int(plan.start[i]), count, plan.block_size)
            out.append(self._pos[blk, :, off.to(blk.device)].T.clone())  # [H, count]
        return out

    def _move_pos(self, plan: StepPlan, rows, old_pos, kept) -> None:
        bt, f = plan.compacted(rows)
        for j, i in enumerate(rows):
            keep = int(plan.retained_after[i] - f[j])
            new = old_pos[j].gather(1, kept[j, :, :keep].to(old_pos[j].device))
            blk, off = ops.window_slots(bt[j], int(plan.start_after[i]), keep, plan.block_size)
            self._pos[blk, :, off.to(blk.device)] = new.T

    def retained_positions(self, live_blocks: list[int], count: int) -> torch.Tensor:
        """[H, count] true positions of window slots 0..count-1 (window = the request's live pages)."""
        row = torch.tensor(live_blocks, dtype=torch.long)
        blk, off = ops.window_slots(row, 0, count, self._pos.shape[2])
        return self._pos[blk.to(self._pos.device), :, off.to(self._pos.device)].T.cpu()
