"""The policy contract shared by the vLLM worker and the dense oracle (pure torch).

Every (request, layer, KV head) slot carries a float32 accumulated score
``acc``. One step (a prefill chunk or a decode token) of one layer does:

1. ``w = policy.query_weights(chunk_start, chunk_len, num_computed_after, is_prefill, prompt_len)``
2. ``acc = policy.accumulate(acc, probs, w)``  -- probs: this step's attention
   probabilities over the layer's current keys (retained + this step's)
3. if the layer holds more than ``keep = retained_count(C, budget, interval)``
   tokens: ``kept, acc = compress_step(policy, acc, keep, budget)``

Positions handled here are *slot indices* into a layer's retained keys, which
are always stored in ascending order of true token position (new tokens are
appended, and compaction keeps ascending order). So "the first ``sinks``
slots" are the oldest retained tokens and "the last ``recent`` slots" the
newest.

GQA: query head ``h`` belongs to KV head ``h // (H_q // H_kv)`` (the HF
``repeat_kv`` layout); a KV head's score is the MEAN of its query heads'
probabilities (rank-equivalent to the sum; kvpress / AdaKV convention).

Ties in ``select``: among equal scores the more recent token (larger slot
index) wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Union

import torch

__all__ = [
    "BasePolicy",
    "NoPolicy",
    "IntOrTensor",
    "select",
    "selectable_scores",
    "compress_step",
    "select_tokens",
    "ceil_ratio",
    "group_mean",
    "pool_scores",
    "narrow_kernel",
    "PooledPolicy",
    "question_window_weights",
    "option_default",
]

IntOrTensor = Union[int, torch.Tensor]


def option_default(name: str):
    """The default of ``KVCompressConfig.<name>``: a policy's option defaults live there only
    (the config is what flags, YAML and ``additional_config`` fill), and the policy
    classes take them from it."""
    from ..config import KVCompressConfig

    return KVCompressConfig.__dataclass_fields__[name].default


def ceil_ratio(x: IntOrTensor, ratio: float) -> IntOrTensor:
    """``ceil(ratio * x)`` computed identically for Python ints and integer tensors."""
    if isinstance(x, torch.Tensor):
        return torch.ceil(x.to(torch.float64) * ratio - 1e-9).to(torch.long)
    return int(math.ceil(float(x) * ratio - 1e-9))


def group_mean(probs: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[..., H_q, Q, K] -> [..., H_kv, Q, K]: mean over the query heads of each KV head."""
    hq = probs.shape[-3]
    if hq % num_kv_heads:
        raise ValueError(f"{hq} query heads are not a multiple of {num_kv_heads} KV heads")
    g = hq // num_kv_heads
    if g == 1:
        return probs
    shp = probs.shape
    return probs.reshape(*shp[:-3], num_kv_heads, g, shp[-2], shp[-1]).mean(dim=-3)


def narrow_kernel(kernel: int, room: IntOrTensor | None, min_spans: int) -> IntOrTensor:
    """The pooling kernel a layer uses when ``room`` of its slots are selectable (its keep
    count less the sinks and the recent window): ``kernel``, or where fewer than
    ``min_spans`` kernel-wide spans fit ``room``, the largest odd width at which they do
    (at least 1). ``min_spans`` 0 or ``room`` None: ``kernel``. Same type as ``room``."""
    if min_spans <= 0 or kernel <= 1 or room is None:
        return kernel
    if isinstance(room, torch.Tensor):
        k = room.to(torch.long).clamp_min(0) // min_spans
        return (k - 1 + k % 2).clamp(1, kernel)
    k = max(int(room), 0) // min_spans
    return min(max(k - 1 + k % 2, 1), kernel)


def _pool(x: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    K = x.shape[-1]
    if kernel == 1 or K == 0:
        return x
    flat = x.reshape(-1, 1, K)
    pool = torch.nn.functional.max_pool1d if pooling == "max" else torch.nn.functional.avg_pool1d
    return pool(flat, kernel_size=kernel, stride=1, padding=kernel // 2).reshape(x.shape)


def pool_scores(acc: torch.Tensor, kernel: IntOrTensor, pooling: str = "max",
                valid_len: IntOrTensor | None = None) -> torch.Tensor:
    """``[..., K]`` scores pooled along keys (stride 1, padding ``kernel // 2``: same length).

    Slots at or beyond ``valid_len`` are zeroed first. ``avg`` counts the zero padding
    at the edges (``avg_pool1d``'s ``count_include_pad``, as in the SnapKV reference).
    ``kernel``: an odd int, or a LongTensor of the batch shape (``acc.shape[:-2]``, one
    kernel per row, :func:`narrow_kernel`).
    """
    x = acc.to(torch.float32)
    K = x.shape[-1]
    if valid_len is not None:
        vl = torch.as_tensor(valid_len, device=x.device)
        vl = vl[..., None, None] if vl.dim() else vl
        x = x.masked_fill(torch.arange(K, device=x.device) >= vl, 0.0)
    if not isinstance(kernel, torch.Tensor):
        return _pool(x, int(kernel), pooling)
    widths = [int(k) for k in torch.unique(kernel).tolist()]
    if len(widths) == 1:
        return _pool(x, widths[0], pooling)
    per_row = kernel.to(x.device).reshape(*x.shape[:-2], 1, 1)
    out = x
    for k in widths:
        out = torch.where(per_row == k, _pool(x, k, pooling), out)
    return out


def question_window_weights(chunk_start: int, chunk_len: int, prompt_len: int, window: int,
                            weight: float) -> torch.Tensor:
    """[chunk_len] float32 extra vote of the queries in the last ``W = min(window, P)``
    prompt positions: ``weight * max(P - W, 1) / W`` each (so the window's extra vote is
    ``weight`` times the vote of the rest of the prompt), 0 elsewhere."""
    P = int(prompt_len)
    W = max(min(int(window), P), 1)
    boost = float(weight) * max(P - W, 1) / W
    pos = torch.arange(chunk_start, chunk_start + chunk_len)
    inside = (pos >= P - W) & (pos < P)
    return inside.to(torch.float32) * boost


def _as_batch_tensor(x: IntOrTensor | None, batch_shape: torch.Size, device, default: int) -> torch.Tensor:
    if x is None:
        x = default
    t = torch.as_tensor(x, dtype=torch.long, device=device)
    return t.expand(batch_shape) if t.dim() == 0 else t.reshape(batch_shape)


def _protected(scores: torch.Tensor, keep: IntOrTensor, sinks: IntOrTensor, recent: IntOrTensor,
               valid_len: IntOrTensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(valid, forced, n_keep)`` of :func:`select`: bool ``[..., 1, K]`` masks of the valid
    slots and of the protected ones (the first ``sinks`` and last ``recent`` valid slots,
    clipped to fit ``keep``), and the per-row keep count (batch shape)."""
    K = scores.shape[-1]
    dev = scores.device
    bshape = scores.shape[:-2]
    vl = _as_batch_tensor(valid_len, bshape, dev, K).clamp(0, K)
    n_keep = torch.minimum(_as_batch_tensor(keep, bshape, dev, K).clamp_min(0), vl)
    n_sink = torch.minimum(_as_batch_tensor(sinks, bshape, dev, 0).clamp_min(0), n_keep)
    n_recent = torch.minimum(_as_batch_tensor(recent, bshape, dev, 0).clamp_min(0), n_keep - n_sink)
    pos = torch.arange(K, device=dev)
    # broadcast per-row quantities over [H_kv, K]
    vl_ = vl[..., None, None]
    valid = pos < vl_
    forced = valid & ((pos < n_sink[..., None, None]) | (pos >= vl_ - n_recent[..., None, None]))
    return valid, forced, n_keep


def selectable_scores(acc: torch.Tensor, keep: IntOrTensor, sinks: IntOrTensor, recent: IntOrTensor,
                      valid_len: IntOrTensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, room). ``scores``: ``acc`` with the protected slots (sinks, recent window: kept
    whatever their score) set to 0, so a policy's pooling along keys ranks the selectable slots
    by their own scores: the window's strongly local votes and a sink's huge score would
    otherwise spill onto the slots beside them. The SnapKV, KVCache-Factory and kvpress
    references pool the selectable prefix only; zeros are what ``avg`` pooling's padding counts
    there too. ``room``: LongTensor of the batch shape (``acc.shape[:-2]``), the slots
    :func:`select` fills by score per row, its keep count less the protected slots it holds."""
    _, forced, n_keep = _protected(acc, keep, sinks, recent, valid_len)
    room = (n_keep - forced[..., 0, :].sum(-1)).clamp_min(0)
    return acc.to(torch.float32).masked_fill(forced, 0.0), room


def select(
    scores: torch.Tensor,
    keep: IntOrTensor,
    sinks: IntOrTensor,
    recent: IntOrTensor,
    valid_len: IntOrTensor | None = None,
    tiebreak: torch.Tensor | None = None,
) -> torch.LongTensor:
    """Slots to keep, ascending, per KV head.

    ``scores``: ``[H_kv, K]`` or ``[B, H_kv, K]`` (any leading batch dims).
    ``keep``, ``sinks``, ``recent``, ``valid_len``: ints or LongTensors of the
    batch shape (one value per row); ``valid_len`` None means ``K``. Slots at
    or beyond ``valid_len`` are never selected.

    Always keeps the first ``sinks`` and the last ``recent`` valid slots (clipped
    so they fit in ``keep``), then the highest scores; equal scores: the higher
    ``tiebreak`` (same shape as ``scores``, e.g. the scores before pooling) if given,
    then the more recent slot. Returns ``[..., H_kv, max(min(keep, valid_len))]`` ascending;
    in rows that keep fewer, the trailing entries are ``-1``.
    """
    if scores.dim() < 2:
        raise ValueError(f"scores must be [..., H_kv, K], got shape {tuple(scores.shape)}")
    K = scores.shape[-1]
    dev = scores.device
    valid, forced, n_keep = _protected(scores, keep, sinks, recent, valid_len)
    out_k = int(n_keep.max().item()) if n_keep.numel() else 0
    key = scores.to(torch.float32).masked_fill(forced, math.inf).masked_fill(~valid, -math.inf)

    # stable descending sort on the reversed slot order => on ties the larger slot comes first
    rev = key.flip(-1)
    if tiebreak is None:
        order = torch.sort(rev, dim=-1, descending=True, stable=True).indices
    else:  # lexicographic: key, then tiebreak, then the larger slot (two stable sorts)
        first = torch.sort(tiebreak.to(torch.float32).flip(-1), dim=-1, descending=True, stable=True).indices
        order = first.gather(-1, torch.sort(rev.gather(-1, first), dim=-1, descending=True, stable=True).indices)
    top = (K - 1) - order[..., :out_k]
    rank = torch.arange(out_k, device=dev)
    drop = rank >= n_keep[..., None, None]
    top = top.masked_fill(drop, K)  # sorts after every real slot
    top = torch.sort(top, dim=-1).values
    return top.masked_fill(top == K, -1)


@dataclass(frozen=True)
class BasePolicy:
    """One eviction policy; subclasses override the hooks below.

    ``sinks`` / ``recent_window`` are the configured values (None = policy default);
    use :meth:`sinks_recent` for the per-layer resolved pair.
    """

    name: ClassVar[str] = "base"
    #: reset the accumulated scores of kept tokens to 0 after each compaction (see :attr:`resets_scores`)
    reset_after_compaction: ClassVar[bool] = False
    #: False for policies whose scores ignore attention (skip computing probs)
    needs_attention: ClassVar[bool] = True

    sinks: int | None = None
    recent_window: int | None = None
    #: ``prompt_compaction: once``: a chunked prompt is compacted once, at its last chunk, so
    #: the prefill queries that vote are the PROMPT's last ones (:meth:`vote_end` is the prompt
    #: length), not each chunk's; False ("per-chunk"): each chunk's last queries vote
    whole_prompt: bool = True

    # ---------------------------------------------------------------- construction
    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "accumulate" in cls.__dict__:
            # the C++ / Triton kernels fuse this rule into attention; an override would pass the
            # dense oracle and be silently ignored while serving
            raise TypeError(f"{cls.__name__} overrides accumulate(): the kernels run one fixed rule "
                            "(acc += w * group-mean(probs)); express a policy through query_weights() and score()")

    @classmethod
    def from_config(cls, cfg) -> "BasePolicy":
        return cls(sinks=cfg.sinks, recent_window=cfg.recent_window)

    # ---------------------------------------------------------------- windows
    default_sinks: ClassVar[int] = 0

    def default_recent(self, budget: IntOrTensor, count: IntOrTensor | None = None) -> IntOrTensor:
        return 0

    def sinks_recent(self, budget: IntOrTensor, count: IntOrTensor | None = None) -> tuple[IntOrTensor, IntOrTensor]:
        """(sinks, recent) protected in a layer whose budget is ``budget`` when it compacts
        ``count`` held tokens (ints or LongTensors; ``count`` None: not known)."""
        s = self.sinks if self.sinks is not None else self.default_sinks
        r = self.recent_window if self.recent_window is not None else self.default_recent(budget, count)
        return s, r

    @property
    def resets_scores(self) -> bool:
        """Whether kept tokens restart from score 0 after a compaction."""
        return self.reset_after_compaction

    def vote_end(self, num_computed_after: int, is_prefill: bool, prompt_len: int | None) -> int:
        """The position a prefill step's observation window ends at: the prompt's end when the
        prompt is compacted once (``whole_prompt``), else the end of this step's chunk."""
        if is_prefill and self.whole_prompt and prompt_len is not None:
            return int(prompt_len)
        return int(num_computed_after)

    def hit_limit(self, prompt_len: int) -> int:
        """The most prompt tokens a request may take from vLLM's prefix cache (``prompt_compaction:
        once``): the queries from here on vote, so they must run in the request. A policy whose
        scores ignore attention may take the whole prompt (vLLM still recomputes its last token)."""
        return int(prompt_len) - self.voting_window(int(prompt_len)) if self.needs_attention else int(prompt_len)

    def voting_window(self, prompt_len: int) -> int:
        """How many of a prompt's last queries vote when the prompt is compacted once."""
        return 0

    # ---------------------------------------------------------------- hooks
    def query_weights(self, chunk_start: int, chunk_len: int, num_computed_after: int, is_prefill: bool,
                      prompt_len: int | None = None) -> torch.Tensor:
        """[chunk_len] float32: how much each query of this step adds to key scores.

        The queries are positions ``chunk_start .. chunk_start + chunk_len - 1``;
        ``num_computed_after`` = ``chunk_start + chunk_len``; ``prompt_len`` is the
        request's prompt length (None: unknown, e.g. in unit tests)."""
        return torch.ones(chunk_len, dtype=torch.float32)

    def accumulate(
        self,
        acc: torch.Tensor,
        probs: torch.Tensor,
        weights: torch.Tensor,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``acc + sum_q w_q * mean_{h in group}(probs[h, q, :])`` -- the one rule the kernels
        run (fused into attention), so subclasses may not override it.

        ``acc``: ``[..., H_kv, K0]`` with ``K0 <= K`` (zero-padded to ``K`` on the
        right: the step's new keys start at score 0). ``probs``: ``[..., H_q, Q, K]``.
        ``weights``: ``[Q]`` or ``[..., Q]``. ``key_mask``: optional bool ``[..., K]``,
        False for padding keys (their probs are ignored). Returns float32 ``[..., H_kv, K]``.
        """
        K = probs.shape[-1]
        h_kv = acc.shape[-2]
        acc = acc.to(torch.float32)
        if acc.shape[-1] < K:
            acc = torch.nn.functional.pad(acc, (0, K - acc.shape[-1]))
        if not self.needs_attention:
            return acc
        p = group_mean(probs.to(torch.float32), h_kv)  # [..., H_kv, Q, K]
        w = weights.to(device=p.device, dtype=torch.float32)
        contrib = torch.einsum("...hqk,...q->...hk", p, w) if w.dim() > 1 else torch.einsum("...hqk,q->...hk", p, w)
        if key_mask is not None:
            contrib = contrib * key_mask[..., None, :].to(contrib.dtype)
        return acc + contrib

    @property
    def pool_tiebreak(self) -> bool:
        """Whether slots tied on :meth:`score` are ranked by their own (unpooled) scores
        before recency (pooling policies with ``pool_tiebreak: score``)."""
        return False

    def score(self, acc: torch.Tensor, valid_len: IntOrTensor | None = None,
              room: IntOrTensor | None = None) -> torch.Tensor:
        """[..., H_kv, K] ranking scores from the accumulated ones (identity by default).
        ``room``: selectable slots per row (batch shape), for :func:`narrow_kernel`."""
        return acc



@dataclass(frozen=True)
class PooledPolicy(BasePolicy):
    """A policy whose scores are pooled along keys before the top-k (PyramidInfer, SnapKV,
    H2O here): a subclass sets ``kernel`` (its own option) and calls :meth:`pool`."""

    #: pooling narrows to fit this many spans in the selectable slots (0: never; ``narrow_kernel``)
    min_spans: int = option_default("pool_min_spans")
    #: pooled-score ties: "newest" or "score" (the unpooled score first; ``pool_tiebreak``)
    tiebreak: str = option_default("pool_tiebreak")
    #: the prompt's last query's extra vote, times its window's whole vote (0: the references)
    last_query_weight: float = option_default("last_query_weight")

    def vote_weights(self, chunk_start: int, chunk_len: int, num_computed_after: int, is_prefill: bool,
                     prompt_len: int | None = None) -> torch.Tensor:
        """The policy's own rule for :meth:`query_weights` (the reference's votes)."""
        raise NotImplementedError

    def query_weights(self, chunk_start, chunk_len, num_computed_after, is_prefill, prompt_len=None):
        """:meth:`vote_weights`, plus ``last_query_weight`` times the observation window's whole
        vote (:meth:`voting_window`'s queries, by :meth:`vote_weights`) on the prompt's last query."""
        w = self.vote_weights(chunk_start, chunk_len, num_computed_after, is_prefill, prompt_len)
        if not is_prefill or prompt_len is None or self.last_query_weight <= 0:
            return w
        P = int(prompt_len)
        if not chunk_start <= P - 1 < chunk_start + chunk_len:
            return w
        W = max(1, self.voting_window(P))
        window = float(self.vote_weights(P - W, W, P, True, P).sum())
        w = w.clone()
        w[P - 1 - chunk_start] += self.last_query_weight * window
        return w

    @property
    def pool_tiebreak(self) -> bool:
        return self.tiebreak == "score" and self.kernel > 1

    def pool(self, acc: torch.Tensor, valid_len: IntOrTensor | None, room: IntOrTensor | None,
             pooling: str = "max") -> torch.Tensor:
        """``acc`` pooled with ``kernel``, narrowed to the row's ``room`` (:func:`narrow_kernel`)."""
        return pool_scores(acc, narrow_kernel(self.kernel, room, self.min_spans), pooling, valid_len)


def compress_step(
    policy: BasePolicy,
    acc: torch.Tensor,
    keep: IntOrTensor,
    budget: IntOrTensor,
    valid_len: IntOrTensor | None = None,
) -> tuple[torch.LongTensor, torch.Tensor]:
    """score -> select -> gather of ``acc`` (zeroed if the policy resets).

    ``keep`` is how many slots survive (``retained_count``), ``budget`` the
    layer's budget (it resolves the policy's sinks / recent window). Returns
    ``(kept_slots [..., H_kv, n] ascending, -1 padded; new_acc [..., H_kv, n])``;
    padded entries of ``new_acc`` are 0.
    """
    sinks, recent = policy.sinks_recent(budget, acc.shape[-1] if valid_len is None else valid_len)
    own, room = selectable_scores(acc, keep, sinks, recent, valid_len)
    scores = policy.score(own, valid_len, room)
    kept = select(scores, keep, sinks, recent, valid_len, tiebreak=own if policy.pool_tiebreak else None)
    if policy.resets_scores:
        new_acc = torch.zeros(kept.shape, dtype=torch.float32, device=acc.device)
    else:
        new_acc = acc.to(torch.float32).gather(-1, kept.clamp_min(0))
        new_acc = new_acc.masked_fill(kept < 0, 0.0)
    return kept, new_acc


def select_tokens(
    policy: BasePolicy,
    acc: torch.Tensor,
    keep: IntOrTensor,
    budget: IntOrTensor,
    valid_len: IntOrTensor | None = None,
) -> torch.LongTensor:
    """Tokens (not per-head slots) a deeper layer goes on computing in prefill.

    PyramidInfer drops the hidden states of the tokens a layer does not keep, so
    the choice is one set for all heads: the policy's scores (``[..., H_kv, K]``)
    averaged over KV heads, then :func:`select` with the sinks / recent window of
    ``budget``. The last valid slot (the token whose logits are sampled) is always
    kept. Returns ``[..., max(min(keep, valid_len))]`` ascending, ``-1`` padded.
    """
    sinks, recent = policy.sinks_recent(budget, acc.shape[-1] if valid_len is None else valid_len)
    if isinstance(recent, torch.Tensor):
        recent = recent.clamp_min(1)
    else:
        recent = max(int(recent), 1)
    acc, room = selectable_scores(acc, keep, sinks, recent, valid_len)
    scores = policy.score(acc, valid_len, room).to(torch.float32).mean(dim=-2, keepdim=True)
    own = acc.mean(dim=-2, keepdim=True) if policy.pool_tiebreak else None
    return select(scores, keep, sinks, recent, valid_len, tiebreak=own)[..., 0, :]


@dataclass(frozen=True)
class NoPolicy(BasePolicy):
    """policy 'none': never evicts (kept for a uniform interface)."""

    name: ClassVar[str] = "none"
    needs_attention: ClassVar[bool] = False

    def query_weights(self, chunk_start, chunk_len, num_computed_after, is_prefill, prompt_len=None):
        return torch.zeros(chunk_len, dtype=torch.float32)
