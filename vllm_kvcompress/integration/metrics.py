"""Patch points: ``vllm.v1.core.sched.scheduler.Scheduler.make_stats``,
``Scheduler.shutdown`` and ``Scheduler._preempt_request`` (engine core), plus :class:`KVCompressStatLogger`, a
``vllm.stat_logger_plugins`` entry point (front end).

Compression metrics on the server's ``/metrics`` (vLLM naming):

=====================================  =======  ================================================
series                                 type     meaning
=====================================  =======  ================================================
``vllm:kv_compress_evicted_tokens``    counter  tokens evicted, summed over layers
``vllm:kv_compress_freed_blocks``      counter  KV pages freed from running requests
``vllm:kv_compress_retained_tokens``   gauge    tokens retained per layer of each ``stage``
                                                (KV-cache group), summed over running requests
``vllm:kv_compress_ratio``             gauge    computed / retained tokens of the running
                                                requests (1 = nothing evicted)
=====================================  =======  ================================================

The engine core computes them from its KV-cache managers' counters and sends
them to the front end inside vLLM's own ``SchedulerStats``, in its
``num_kv_fetch_reqs_by_stage`` mapping (``str -> int``, the only open slot that
crosses the process boundary) under ``kvcompress:`` keys; the stat logger pops
them before vLLM's loggers read the mapping (plugin loggers run first).

For benchmarks that run without stats logging (``vllm bench throughput``), set
``VLLM_KVCOMPRESS_STATS_FILE=/path.json``: the engine core then rewrites that
file every 50 steps, whenever the engine drains and at shutdown with peak/mean running requests, KV pages
per running request, the eviction totals and the number of preemptions.
"""

from __future__ import annotations

import json
import os
import time

from vllm.v1.metrics.loggers import AggregateStatLoggerBase

from vllm_kvcompress.integration.prefix_cache import DEFERRALS, LOOKUP_CUTS, LOOKUP_HITS

PREFIX = "kvcompress:"
STATS_FILE_ENV = "VLLM_KVCOMPRESS_STATS_FILE"
_WRITE_EVERY = 50


def compressed_managers(scheduler) -> list:
    from vllm_kvcompress.integration.kv_manager import compressed_groups

    return [m for _, m in compressed_groups(scheduler.kv_cache_manager)]


class _Tracker:
    """Per-scheduler running figures (engine-core process)."""

    def __init__(self) -> None:
        self.steps = 0
        self.sum_running = 0
        self.peak_running = 0
        self.sum_pages = 0
        self.peak_pages = 0
        self.sent_evicted = 0
        self.sent_freed = 0
        self.written_at = -1
        self.started = time.time()
        self.preemptions = 0  # counted by the Scheduler._preempt_request wrapper
        # prefix cache: prompt tokens of the requests that started running, and how many of
        # them came from vLLM's prefix cache (``prefix_cache.LOOKUP_HITS``; a resumed request
        # counts again, as in vLLM's own hit rate)
        self.running_ids: set[str] = set()
        self.prompt_tokens = 0
        self.cached_tokens = 0
        # what the lookups of those requests found and what the plugin's cuts took off it
        self.lookup_cuts: dict[str, int] = {"found": 0, "voting_window": 0, "same_step": 0, "voter": 0, "pool": 0}
        self.deferrals0 = DEFERRALS[0]  # requests that waited a step for a prefix cached in that step

    def step(self, scheduler) -> None:
        ids = set()
        for req in scheduler.running:
            ids.add(req.request_id)
            if req.request_id not in self.running_ids:
                self.prompt_tokens += req.num_prompt_tokens
                self.cached_tokens += LOOKUP_HITS.pop(req.request_id, 0)
                for k, v in LOOKUP_CUTS.pop(req.request_id, {}).items():
                    self.lookup_cuts[k] += v
        self.running_ids = ids
        running = len(scheduler.running)
        if running == 0:
            return
        pool = scheduler.kv_cache_manager.block_pool
        pages = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()  # minus the null block
        self.steps += 1
        self.sum_running += running
        self.peak_running = max(self.peak_running, running)
        self.sum_pages += pages
        self.peak_pages = max(self.peak_pages, pages)

    def summary(self, scheduler) -> dict:
        mgrs = compressed_managers(scheduler)
        pool = scheduler.kv_cache_manager.block_pool
        return {
            "steps": self.steps,
            "peak_running_reqs": self.peak_running,
            "mean_running_reqs": self.sum_running / self.steps if self.steps else 0.0,
            "mean_pages_per_running_req": self.sum_pages / self.sum_running if self.sum_running else 0.0,
            "peak_pages_used": self.peak_pages,
            "num_blocks": pool.num_gpu_blocks - 1,
            "block_size": scheduler.cache_config.block_size,
            "evicted_tokens": sum(m.evicted_tokens for m in mgrs),
            "freed_pages": sum(m.freed_blocks for m in mgrs),
            "preemptions": self.preemptions,
            "prompt_tokens": self.prompt_tokens,
            "prefix_cache_hit_tokens": self.cached_tokens,
            "prefix_cache_hit_rate": self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            "prefix_cache_found_tokens": self.lookup_cuts["found"],
            "prefix_cache_cut_tokens": {k: v for k, v in self.lookup_cuts.items() if k != "found"},
            "prefix_cache_deferred_requests": DEFERRALS[0] - self.deferrals0,
            "copied_pages": sum(m.cow_pages for m in mgrs),
            "inplace_hit_pages": sum(m.inplace_pages for m in mgrs),
            "saved_pages": sum(m.saved_pages for m in mgrs),
            "seconds": time.time() - self.started,
        }

    def write(self, scheduler) -> None:
        path = os.environ.get(STATS_FILE_ENV)
        if path:
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self.summary(scheduler), f)
            os.replace(tmp, path)

    def payload(self, scheduler) -> dict[str, int]:
        """The ``kvcompress:`` entries for this step's SchedulerStats."""
        mgrs = compressed_managers(scheduler)
        if not mgrs:
            return {}
        evicted = sum(m.evicted_tokens for m in mgrs)
        freed = sum(m.freed_blocks for m in mgrs)
        out = {f"{PREFIX}evicted_tokens": evicted - self.sent_evicted, f"{PREFIX}freed_blocks": freed - self.sent_freed}
        self.sent_evicted, self.sent_freed = evicted, freed
        computed = retained = 0
        for m in mgrs:
            stage_retained = 0
            for c, kept in m.req_tokens.values():
                stage_retained += kept
                computed += c * m.num_layers
                retained += kept * m.num_layers
            out[f"{PREFIX}retained:{m.kv_cache_spec.kv_stage}"] = stage_retained
        out[f"{PREFIX}computed_layer_tokens"] = computed
        out[f"{PREFIX}retained_layer_tokens"] = retained
        return out


def _tracker(scheduler) -> _Tracker:
    t = scheduler.__dict__.get("_kvcompress_tracker")
    if t is None:
        t = scheduler.__dict__["_kvcompress_tracker"] = _Tracker()
    return t


def apply() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_kvcompress.integration.common import patch_method

    def wrap_stats(original):
        def make_stats(self, *args, **kwargs):
            stats = original(self, *args, **kwargs)
            t = _tracker(self)
            t.step(self)
            idle = not self.running and not self.waiting
            if t.steps and (t.steps % _WRITE_EVERY == 0 or (idle and t.steps != t.written_at)):
                t.write(self)  # also whenever the engine drains: shutdown may never reach Scheduler.shutdown
                t.written_at = t.steps
            if stats is not None:
                stats.num_kv_fetch_reqs_by_stage.update(t.payload(self))
            return stats
        return make_stats

    def wrap_shutdown(original):
        def shutdown(self):
            try:
                _tracker(self).write(self)
            finally:
                original(self)
        return shutdown

    def wrap_preempt(original):
        def _preempt_request(self, *args, **kwargs):
            _tracker(self).preemptions += 1
            return original(self, *args, **kwargs)
        return _preempt_request

    patch_method(Scheduler, "make_stats", wrap_stats)
    patch_method(Scheduler, "shutdown", wrap_shutdown)
    patch_method(Scheduler, "_preempt_request", wrap_preempt)


class KVCompressStatLogger(AggregateStatLoggerBase):
    """Front-end stat logger (entry point ``vllm.stat_logger_plugins``): exports the
    ``kvcompress:`` entries of ``SchedulerStats`` as Prometheus series."""

    def __init__(self, vllm_config, engine_indexes: list[int] | None = None) -> None:
        self.engine_indexes = engine_indexes or [0]
        self.model_name = vllm_config.model_config.served_model_name
        self._metrics = None  # created on first use: vLLM's Prometheus logger unregisters "vllm:*" at init

    def _create(self) -> dict:
        import prometheus_client as prom

        names = {"evicted": "vllm:kv_compress_evicted_tokens", "freed": "vllm:kv_compress_freed_blocks",
                 "retained": "vllm:kv_compress_retained_tokens", "ratio": "vllm:kv_compress_ratio"}
        reg = prom.REGISTRY
        for collector in list(reg._collector_to_names):  # a previous engine in this process
            if getattr(collector, "_name", None) in names.values():
                reg.unregister(collector)
        labels = ["model_name", "engine"]
        return {
            "evicted": prom.Counter(names["evicted"], "KV tokens evicted by compression, summed over layers.",
                                    labelnames=labels),
            "freed": prom.Counter(names["freed"], "KV-cache pages freed from running requests by compression.",
                                  labelnames=labels),
            "retained": prom.Gauge(names["retained"], "KV tokens retained per layer of each stage (KV-cache "
                                   "group), summed over running requests.", labelnames=labels + ["stage"],
                                   multiprocess_mode="sum"),
            "ratio": prom.Gauge(names["ratio"], "Computed / retained KV tokens of the running requests "
                                "(1 = nothing evicted).", labelnames=labels, multiprocess_mode="mostrecent"),
        }

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        if scheduler_stats is None:
            return
        mapping = scheduler_stats.num_kv_fetch_reqs_by_stage
        ours = {k: mapping.pop(k) for k in [k for k in mapping if k.startswith(PREFIX)]}
        if not ours:
            return
        if self._metrics is None:
            self._metrics = self._create()
        m = self._metrics
        lv = [self.model_name, str(engine_idx)]
        m["evicted"].labels(*lv).inc(max(ours.get(f"{PREFIX}evicted_tokens", 0), 0))
        m["freed"].labels(*lv).inc(max(ours.get(f"{PREFIX}freed_blocks", 0), 0))
        for k, v in ours.items():
            if k.startswith(f"{PREFIX}retained:"):
                m["retained"].labels(*lv, k.rsplit(":", 1)[1]).set(v)
        computed = ours.get(f"{PREFIX}computed_layer_tokens", 0)
        retained = ours.get(f"{PREFIX}retained_layer_tokens", 0)
        m["ratio"].labels(*lv).set(computed / retained if retained else 1.0)

    def log_engine_initialized(self) -> None:
        pass
