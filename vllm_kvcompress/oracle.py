"""Dense reference ("oracle") of KV compression on the embedded Llama model.

Plain torch + transformers (no vLLM): the HF checkpoint is loaded as a
``LlamaForCausalLM`` and only its modules are used (embedding, norms, q/k/v/o
projections, rotary embedding, MLP, lm_head); the layer loop and the eager
attention are ours, softmax in float32.

Each layer keeps, per KV head, the retained keys (after RoPE at their TRUE
positions), values, positions and the accumulated score ``acc``; all heads of
a layer hold the same number of tokens (possibly different ones).

One step = a prefill chunk or one decode token. For every layer: the step's
queries attend to the retained keys plus the step's own keys (causal inside
the chunk); the probabilities feed ``policy.accumulate`` with
``policy.query_weights``; then the layer compacts to
``retained_count(C, budget_layer, cfg.compress_interval)`` with
``compress_step`` when it holds more than that. Compacting each layer right
after its own attention is equivalent to compacting all layers after the
forward pass (a layer's cache is not read again within the step).

``frozen`` (``prefix_hit: keep``, a request whose first ``F`` prompt tokens came from
vLLM's prefix cache): those tokens are kept whole in every layer and the rule above
applies to the tokens after them, with the budgets of the ``P - F`` own prompt tokens
(``paging``'s ``frozen``).

``prefill_drop`` (a whole prompt in one step): after layer ``l``, when layer
``l+1`` holds fewer tokens than are being computed, the hidden states shrink to
``select_tokens`` of layer ``l``'s scores (before its compaction), so layer
``l+1`` computes (and stores) only those tokens, at their true positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from . import paging
from .config import KVCompressConfig
from .policies import compress_step, drop_counts, get_policy, layer_budgets, select_tokens

__all__ = ["DenseOracle", "LayerStore", "load_model"]


def load_model(model_path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """The embedded (or given) HF Llama checkpoint as an eval-mode ``LlamaForCausalLM``."""
    from transformers import LlamaForCausalLM

    if model_path is None:
        from .assets import model_path as _embedded

        model_path = _embedded()
    model = LlamaForCausalLM.from_pretrained(str(model_path), dtype=dtype, attn_implementation="eager")
    model.eval()
    return model


@dataclass
class LayerStore:
    """Retained KV of one layer: keys/values [H_kv, n, D], positions/acc [H_kv, n]."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    acc: torch.Tensor

    @property
    def size(self) -> int:
        return self.keys.shape[1]


class DenseOracle:
    """Greedy generation with KV compression, computed densely in plain torch.

    ``model`` may be passed to share one loaded ``LlamaForCausalLM`` between
    oracles (it must use the same dtype); otherwise it is loaded from
    ``model_path`` (default: the embedded model).
    """

    def __init__(
        self,
        cfg: KVCompressConfig | None = None,
        model_path: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        model=None,
    ) -> None:
        self.cfg = cfg if cfg is not None else KVCompressConfig()
        self.policy = get_policy(self.cfg)
        self.model = model if model is not None else load_model(model_path, dtype)
        self.dtype = next(self.model.parameters()).dtype
        c = self.model.config
        self.num_layers = c.num_hidden_layers
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.group = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.stores: list[LayerStore] = []
        self.budgets: list[int] = []
        self.num_computed = 0
        self.prompt_len = 0
        self.frozen = 0

    # ------------------------------------------------------------------ state
    def reset(self, prompt_len: int, frozen: int = 0) -> None:
        dev = self.model.device
        H, D = self.num_kv_heads, self.head_dim
        self.stores = [
            LayerStore(
                keys=torch.empty(H, 0, D, dtype=self.dtype, device=dev),
                values=torch.empty(H, 0, D, dtype=self.dtype, device=dev),
                positions=torch.empty(H, 0, dtype=torch.long, device=dev),
                acc=torch.empty(H, 0, dtype=torch.float32, device=dev),
            )
            for _ in range(self.num_layers)
        ]
        self.prompt_len = prompt_len
        self.frozen = frozen
        self.budgets = layer_budgets(self.cfg, self.num_layers, prompt_len - frozen)
        self.num_computed = 0

    def kept_positions(self) -> list[torch.Tensor]:
        """Per layer: LongTensor[H_kv, n] of the retained token positions (ascending)."""
        return [s.positions.clone() for s in self.stores]

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self, token_ids: Sequence[int] | torch.Tensor, is_prefill: bool) -> torch.Tensor:
        """Run one step (chunk) and return the logits of its last position ([vocab], float32)."""
        m = self.model.model
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.model.device).reshape(1, -1)
        Q = ids.shape[1]
        start = self.num_computed
        C = start + Q
        pos = torch.arange(start, C, device=ids.device)
        h = m.embed_tokens(ids)  # [1, Q, hidden]
        cos, sin = m.rotary_emb(h, pos[None])  # [1, Q, D]
        weights = self.policy.query_weights(start, Q, C, is_prefill, self.prompt_len) if self.policy.needs_attention else None
        compress = not self.cfg.keeps_all
        drop = None
        if compress and self.cfg.prefill_drop and is_prefill and start == 0 and C == self.prompt_len:
            drop = drop_counts(self.budgets, C, self.cfg.compress_interval, self.cfg.prefill_drop_from)

        for li, layer in enumerate(m.layers):
            x = layer.input_layernorm(h)
            out = self._attention(li, layer.self_attn, x, cos, sin, pos, weights)
            h = h + out
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if drop is not None and li + 1 < self.num_layers and drop[li + 1] < h.shape[1]:
                kept = select_tokens(self.policy, self.stores[li].acc, drop[li + 1], self.budgets[li + 1])
                h, pos, cos, sin = h[:, kept], pos[kept], cos[:, kept], sin[:, kept]
                weights = weights[kept]
            if compress:
                self._compact(li, C)

        self.num_computed = C
        h = m.norm(h[:, -1:])
        return self.model.lm_head(h)[0, -1].float()

    def _attention(self, li, attn, x, cos, sin, pos, weights) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        Q = x.shape[1]
        Hq, Hkv, D, G = self.num_heads, self.num_kv_heads, self.head_dim, self.group
        q = attn.q_proj(x).view(1, Q, Hq, D).transpose(1, 2)  # [1, Hq, Q, D]
        k = attn.k_proj(x).view(1, Q, Hkv, D).transpose(1, 2)
        v = attn.v_proj(x).view(1, Q, Hkv, D).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q, k, v = q[0], k[0], v[0]

        st = self.stores[li]
        n = st.size
        keys = torch.cat([st.keys, k], dim=1)  # [Hkv, n+Q, D]
        vals = torch.cat([st.values, v], dim=1)
        st.keys, st.values = keys, vals
        st.positions = torch.cat([st.positions, pos.expand(Hkv, Q)], dim=1)

        qg = q.reshape(Hkv, G, Q, D)
        scores = torch.matmul(qg, keys[:, None].transpose(-1, -2)) * self.scaling  # [Hkv, G, Q, n+Q]
        causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
        visible = torch.cat([torch.ones(Q, n, dtype=torch.bool, device=x.device), causal], dim=1)
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(probs, vals[:, None])  # [Hkv, G, Q, D]
        o = o.reshape(Hq, Q, D).transpose(0, 1).reshape(1, Q, Hq * D)

        if weights is not None:
            st.acc = self.policy.accumulate(st.acc, probs.reshape(Hq, Q, n + Q), weights)
        else:
            st.acc = torch.nn.functional.pad(st.acc, (0, Q))
        return attn.o_proj(o)

    def _compact(self, li: int, C: int) -> None:
        st = self.stores[li]
        F = self.frozen
        keep = paging.held_count(C, self.budgets[li], self.cfg.compress_interval,
                                 **self.cfg.paging_args(self.prompt_len, F))
        if st.size <= keep:
            return
        kept, acc = compress_step(self.policy, st.acc[:, F:], keep - F, self.budgets[li])
        if F:  # a kept prefix stays whole, in front
            prefix = torch.arange(F, device=kept.device).expand(kept.shape[0], F)
            kept, acc = torch.cat([prefix, kept + F], dim=1), torch.cat([st.acc[:, :F], acc], dim=1)
        st.acc = acc
        st.keys = st.keys.gather(1, kept[..., None].expand(-1, -1, self.head_dim))
        st.values = st.values.gather(1, kept[..., None].expand(-1, -1, self.head_dim))
        st.positions = st.positions.gather(1, kept)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int,
        chunk_size: int | None = None,
        eos_token_id: int | Sequence[int] | None = -1,
        frozen: int = 0,
    ) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy decoding.

        Returns ``(new_token_ids, kept_positions_after_prefill)``: the generated
        tokens (without the prompt; stops after an EOS token) and, per layer, the
        retained positions ``LongTensor[H_kv, n]`` right after the last prefill
        chunk. ``eos_token_id=-1`` means the model's configured EOS; None never stops.
        The state after generation is available via :meth:`kept_positions`.
        ``frozen``: the first ``frozen`` prompt tokens are a kept prefix (computed in one
        step, as the request that cached them did, then the rest in chunks).
        """
        prompt = [int(t) for t in torch.as_tensor(prompt_ids).reshape(-1).tolist()]
        if not prompt:
            raise ValueError("prompt_ids is empty")
        if eos_token_id == -1:
            eos_token_id = self.model.generation_config.eos_token_id
        eos = set() if eos_token_id is None else set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)

        self.reset(len(prompt), frozen)
        if frozen:
            self.step(prompt[:frozen], is_prefill=True)
        chunk = chunk_size or len(prompt)
        for s in range(frozen, len(prompt), chunk):
            logits = self.step(prompt[s : s + chunk], is_prefill=True)
        after_prefill = self.kept_positions()

        out: list[int] = []
        for i in range(max_new_tokens):
            tok = int(torch.argmax(logits).item())
            out.append(tok)
            if tok in eos or i == max_new_tokens - 1:
                break
            logits = self.step([tok], is_prefill=False)
        return out, after_prefill
