"""Patch points: ``vllm.v1.core.kv_cache_manager.KVCacheManager.take_kv_cache_block_copies``
(scheduler) and ``vllm.v1.worker.gpu_model_runner.copy_kv_cache_blocks_inplace`` (workers;
the CPU model runner inherits the caller, ``GPUModelRunner._update_states``).

vLLM 0.32 carries page copies from the scheduler to the workers in
``SchedulerOutput.kv_cache_block_copies``, holds both ends of each copy until the
step ran, and copies every layer's page at the start of the step. Compressed
groups use it twice (``kv_manager``, prefix caching):

* **Copies on a hit** are vLLM's own copy-on-write (``_apply_cow``): they run as
  vLLM runs them. The workers also zero the copies' scores in every compressed
  layer (a cached page carries the votes of the request that wrote it; the new
  owner's scores start from what it would have computed itself: nothing, for
  PyramidInfer and SnapKV; see docs/serving.md for H2O).
* **Hit pages read in place** (``kv_manager.zero_pages``) get their scores zeroed
  the same way. The scheduler sends them as save copies of a page onto itself;
  the worker wrapper turns them into ``(page, page)`` hit pairs.
* **Copies that keep a cached page intact** (``kv_manager.save_copies``) must run
  later: inside each layer of the page's group, after the step's keys are written
  and before the compaction rewrites the page. The scheduler sends them in the
  same list with negated block ids (``-1 - id``); the worker wrapper takes them out
  before vLLM's copy runs, and each compressed group's builder hands the ones of
  its compacting requests to its layers (``StepPlan.save_pairs``).
"""

from __future__ import annotations

import numpy as np

from vllm_kvcompress.integration.common import patch_method


class Pending:
    """This worker's copies of the current step (filled by the copy wrapper, read by the
    builders through ``model_runner.StepContext``)."""

    hit_pairs: np.ndarray | None = None  # [n, 2] (src, dst) of vLLM's copies
    save_pairs: np.ndarray | None = None  # [n, 2] (cached page, its new cache copy)

    @classmethod
    def take(cls) -> tuple[np.ndarray | None, np.ndarray | None]:
        out = (cls.hit_pairs, cls.save_pairs)
        cls.hit_pairs = cls.save_pairs = None
        return out


def encode_save(src_id: int, dst_id: int):
    from vllm.v1.core.kv_cache_utils import KVCacheBlockCopy

    return KVCacheBlockCopy(src_block_id=-1 - src_id, dst_block_id=-1 - dst_id)


def split(copies) -> tuple[list, np.ndarray | None, np.ndarray | None]:
    """vLLM's copies, their (src, dst) pairs and the decoded save copies."""
    plain = [c for c in copies if c[0] >= 0]
    saves = [(-1 - c[0], -1 - c[1]) for c in copies if c[0] < 0 and c[0] != c[1]]
    zeroed = [(-1 - c[0], -1 - c[0]) for c in copies if c[0] < 0 and c[0] == c[1]]
    pairs = [tuple(c) for c in plain] + zeroed
    hit = np.array(pairs, dtype=np.int64).reshape(-1, 2) if pairs else None
    save = np.array(saves, dtype=np.int64).reshape(-1, 2) if saves else None
    return plain, hit, save


def apply() -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.worker import gpu_model_runner

    def wrap_take(original):
        def take_kv_cache_block_copies(self):
            from vllm_kvcompress.integration.kv_manager import compressed_groups

            copies, retained = original(self)
            for _, m in compressed_groups(self):
                if m.save_copies:
                    for src, dst in m.save_copies:
                        copies.append(encode_save(src.block_id, dst.block_id))
                        retained.extend((src, dst))
                    m.save_copies = []
                if m.zero_pages:
                    for b in m.zero_pages:
                        copies.append(encode_save(b.block_id, b.block_id))
                        retained.append(b)
                    m.zero_pages = []
            return copies, retained
        return take_kv_cache_block_copies

    def wrap_copy(original):
        def copy_kv_cache_blocks_inplace(kv_caches, num_blocks, kv_cache_block_copies):
            plain, Pending.hit_pairs, Pending.save_pairs = split(kv_cache_block_copies)
            return original(kv_caches, num_blocks, plain)
        return copy_kv_cache_blocks_inplace

    patch_method(KVCacheManager, "take_kv_cache_block_copies", wrap_take)
    patch_method(gpu_model_runner, "copy_kv_cache_blocks_inplace", wrap_copy)
