"""Patch point: ``vllm.v1.worker.cpu_model_runner.CPUModelRunner.load_model``
(and ``GPUModelRunner.load_model``): with ``prefill_drop`` on, forward pre-hooks
go on the loaded model's decoder layers (``model.model.layers``) and a wrapper
on ``model.model.forward``.

PyramidInfer's prefill (``--kv-prefill-drop``): a prompt prefilled whole in one
step is computed by layer 0 (the layers before ``prefill_drop_from``) at full
length; every deeper layer computes only the tokens it will keep
(``policies.drop_counts``), chosen among the previous layer's by
:func:`~vllm_kvcompress.policies.select_tokens` on that layer's scores.
So prefill compute shrinks with the pyramid, not only the KV it leaves behind.

How the pieces meet in one forward pass:

* the attention-metadata builders (``attention_backend``) build, for each
  compressed group with a layer at or past ``prefill_drop_from``, a second
  ("reduced") metadata in which every dropping request has the group's kept
  count of query tokens, written straight into the window
  the scheduler keeps (``paging``): nothing to compact afterwards. They share one
  :class:`DropPlan` per step;
* the attention impl of a layer at which the kept count shrinks ranks the tokens
  (:meth:`DropPlan.select`) right after scoring them;
* a forward pre-hook on the next decoder layer gathers ``hidden_states`` /
  ``residual`` and feeds the kept tokens' true positions (RoPE); a wrapper of
  ``model.model.forward`` scatters the last hidden states back to the step's token rows (the rows vLLM
  samples from, each request's last token, are always kept).

Requests with a prefix-cache hit, a chunked prompt or a resumed (preempted)
request take the normal path: every layer computes every token, then evicts.

So that prompts are not split needlessly, the scheduler keeps prompts whole
while every waiting prompt fits one step's token budget (``integration.schedule``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_kvcompress.integration.common import ConfigError, kv_config_of, patch_method
from vllm_kvcompress.policies import drop_counts, select_tokens


@dataclass
class DropPlan:
    """Per step: how many tokens each layer computes per request, and the running
    token selection of the forward pass (shared by every layer's metadata)."""

    rows: np.ndarray  # [R] bool: requests that drop in this step
    counts: np.ndarray  # [L, R] tokens layer l computes (layers < prefill_drop_from and non-dropping requests: all)
    budgets: np.ndarray  # [L, R] layer budgets (the selection's sinks / recent window)
    # ---- forward-pass state
    cur: torch.Tensor | None = None  # step token row of each row the current layer computes (None: all rows)
    pending: torch.Tensor | None = None  # gather the next layer's pre-hook applies
    positions: torch.Tensor | None = None  # the step's positions (model input)
    cur_positions: torch.Tensor | None = None
    num_rows: int = 0  # rows of the model input
    version: int = 0  # selections made so far in this forward pass
    _qsl: dict = field(default_factory=dict)

    def qsl(self, layer: int) -> np.ndarray:
        q = self._qsl.get(layer)
        if q is None:
            q = self._qsl[layer] = np.concatenate([[0], np.cumsum(self.counts[layer])]).astype(np.int64)
        return q

    def reduced(self, layer: int) -> bool:
        """Whether ``layer`` computes fewer tokens than the step has for some request (it then
        runs on the reduced metadata; the layers before ``prefill_drop_from`` compute all)."""
        return bool((self.counts[layer] < self.counts[0]).any())

    def first_reduced(self, first: int, num: int) -> int | None:
        """The first of layers ``first .. first + num - 1`` (one KV-cache group) that is
        :meth:`reduced` (later layers of the group compute as many), or None."""
        return next((lay for lay in range(first, first + num) if self.reduced(lay)), None)

    def shrinks_after(self, layer: int) -> bool:
        return layer + 1 < len(self.counts) and bool((self.counts[layer + 1] < self.counts[layer]).any())

    def select(self, layer: int, plan, paged) -> None:
        """After ``layer`` scored this step: choose the tokens layer ``layer + 1`` computes."""
        from vllm_kvcompress import ops

        a, b = self.counts[layer], self.counts[layer + 1]
        shrink = np.nonzero(b < a)[0]
        scores = ops.read_scores(paged, plan.block_table[torch.from_numpy(shrink)], torch.from_numpy(plan.start[shrink]),
                                 torch.from_numpy(a[shrink]))
        kept = select_tokens(plan.policy, scores, torch.from_numpy(b[shrink]),
                             torch.from_numpy(self.budgets[layer + 1][shrink]), valid_len=torch.from_numpy(a[shrink]))
        q = self.qsl(layer)
        pieces = [torch.arange(q[i], q[i] + b[i]) for i in range(len(a))]
        for j, i in enumerate(shrink):
            pieces[i] = kept[j, : b[i]] + int(q[i])
        gather = torch.cat(pieces)
        self.pending = gather
        self.cur = gather if self.cur is None else self.cur[gather]
        self.version += 1

    def bind(self, plan) -> None:
        """Give a reduced layer's StepPlan the query weights (and positions) of the current rows."""
        if plan.bound == self.version:
            return
        rows = self.cur if self.cur is not None else slice(0, int(plan.query_start[-1]))
        if plan.weights_full is not None:
            plan.weights = plan.weights_full[rows]
        if plan.track_positions and self.positions is not None:
            plan.positions = (self.cur_positions if self.cur is not None else self.positions[rows]).clone()
        plan.bound = self.version


def plan_for_step(spec, n: np.ndarray, c: np.ndarray, prompt_lens: np.ndarray,
                  request_budgets: list | None) -> DropPlan | None:
    """The step's :class:`DropPlan` (None when no request drops): a request drops when its
    whole prompt is this step (nothing computed before, no output token yet) and its
    kept counts shrink with depth."""
    cfg = spec.compress_config
    L = spec.kv_num_layers
    R = len(n)
    counts = np.repeat(n[None, :], L, axis=0).astype(np.int64)
    budgets = np.zeros((L, R), dtype=np.int64)
    rows = np.zeros(R, dtype=bool)
    rb = request_budgets or [None] * R
    for i in range(R):
        if c[i] != 0 or n[i] != prompt_lens[i] or n[i] < 2:
            continue
        b = [spec.budget_of_layer(layer, int(n[i]), rb[i]) for layer in range(L)]
        k = drop_counts(b, int(n[i]), cfg.compress_interval, cfg.prefill_drop_from)
        if k is None:
            continue
        rows[i] = True
        counts[1:, i] = k[1:]
        budgets[:, i] = b
    return DropPlan(rows=rows, counts=counts, budgets=budgets) if rows.any() else None


# ---------------------------------------------------------------------------- hooks
_ACTIVE: DropPlan | None = None


def _find_plan() -> DropPlan | None:
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    md = get_forward_context().attn_metadata
    if not isinstance(md, dict):
        return None
    for m in md.values():
        kvc = getattr(m, "kvc", None)
        if kvc is not None:
            return kvc.drop
    return None


def _wrap_model_forward(inner) -> None:
    """Around ``model.model.forward`` (an instance attribute: vLLM's ``support_torch_compile``
    calls ``self.forward`` directly, so module hooks on ``model.model`` never run)."""
    original = inner.forward

    def forward(*args, **kwargs):
        global _ACTIVE
        _ACTIVE = _find_plan()
        try:
            out = original(*args, **kwargs)
        finally:
            plan, _ACTIVE = _ACTIVE, None
        if plan is None or plan.cur is None or not isinstance(out, torch.Tensor):
            return out
        full = out.new_zeros(plan.num_rows, out.shape[-1])
        full[plan.cur] = out  # the rows vLLM samples from are always kept
        return full

    inner.forward = forward


def _layer_pre_hook(index: int):
    def hook(module, args, kwargs):
        plan = _ACTIVE
        if plan is None:
            return None
        positions, hidden, residual = args[0], args[1], args[2]
        if index == 0:
            plan.positions, plan.num_rows = positions, hidden.shape[0]
            return None
        if plan.pending is not None:
            g = plan.pending
            hidden = hidden[g]
            residual = residual[g] if residual is not None else None
            plan.cur_positions = plan.positions[plan.cur]
            plan.pending = None
        if plan.cur is None:
            return None
        return (plan.cur_positions, hidden, residual, *args[3:]), kwargs
    return hook


def install(model) -> None:
    """Hook ``model.model`` and its decoder layers (idempotent)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None:
        raise ConfigError(f"kv_compress.prefill_drop: {type(model).__name__} has no model.layers to drop tokens "
                          "between; drop --kv-prefill-drop")
    if getattr(inner, "_kvcompress_drop_hooks", False):
        return
    _wrap_model_forward(inner)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(_layer_pre_hook(i), with_kwargs=True)
    inner._kvcompress_drop_hooks = True


def apply() -> None:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def wrap(original):
        def load_model(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if kv_config_of(self.vllm_config).prefill_drop:
                install(self.get_model())
            return out
        return load_model

    for owner in (CPUModelRunner, GPUModelRunner):
        patch_method(owner, "load_model", wrap)
