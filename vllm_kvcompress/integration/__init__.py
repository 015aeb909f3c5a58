"""All coupling to vLLM lives here: one module per patch point.

=====================  ==========================================================
module                 vLLM symbol it patches / registers
=====================  ==========================================================
``version``            (none) refuses any vLLM other than 0.32.x
``cli_args``           ``EngineArgs.add_cli_args``, ``EngineArgs.from_cli_args``
``platform_config``    ``<current platform>.check_and_update_config``
``kv_spec``            ``Attention.get_kv_cache_spec``, ``KVCacheSpecRegistry``
``kv_manager``         (class registered by ``kv_spec``) the scheduler-side
                       ``SingleTypeKVCacheManager`` of compressed layers
``free_order``         ``KVCacheCoordinator.free``,
                       ``KVCacheCoordinator.pop_blocks_for_free``
``model_runner``       ``GPUModelRunner._build_attention_metadata``,
                       ``GPUModelRunner._update_states``
``attention_backend``  ``AttentionBackendEnum.CPU_ATTN`` and ``CUSTOM`` via
                       ``register_backend`` (the CPU backend lives here; CUSTOM
                       is ``attention_triton``'s, selected on CUDA)
``prefill_drop``       ``CPUModelRunner.load_model``, ``GPUModelRunner.load_model``
                       (hooks on the decoder layers for ``--kv-prefill-drop``)
``schedule``           ``Scheduler.schedule`` (evicted pages freed before the
                       step allocates; prompts kept whole under prefill_drop)
``prefix_cache``       ``KVCacheManager.prefix_cache_lookup_enabled``,
                       ``KVCacheManager.get_computed_blocks``,
                       ``Scheduler._handle_blocked_waiting_request``
``block_copies``       ``KVCacheManager.take_kv_cache_block_copies``,
                       ``gpu_model_runner.copy_kv_cache_blocks_inplace``
``request_budget``     ``InputProcessor._validate_params``,
                       ``Scheduler.add_request``, ``Scheduler._free_blocks``
``metrics``            ``Scheduler.make_stats``, ``Scheduler.shutdown``,
                       ``Scheduler._preempt_request``; its
                       ``KVCompressStatLogger`` is the ``vllm.stat_logger_plugins``
                       entry point (Prometheus series on ``/metrics``)
=====================  ==========================================================

Modules that patch nothing (called by the ones above):

=====================  ==========================================================
``step_plan``          the device-neutral half of both attention backends: window
                       mapping (builder mixin), ``StepPlan``, the compression flow
                       of one layer and step (impl mixin)
``attention_triton``   the Triton backend (vLLM's TRITON_ATTN + our Triton kernels)
``triton_compat``      seams that run vLLM's Triton ops on CPU under
                       ``TRITON_INTERPRET=1`` (tests, debugging the GPU path)
``compaction``         selection (the policy's) + the batched move (``ops``)
``common``             ``patch_method``, the config carried by vLLM, the logger
=====================  ==========================================================

``apply_all()`` is what the ``vllm.general_plugins`` entry point runs, in every
vLLM process. Every ``apply()`` is idempotent.
"""

from __future__ import annotations

from vllm_kvcompress.integration import version


def apply_all() -> None:
    version.check()  # before importing anything that touches vLLM internals
    from vllm_kvcompress.integration import (
        attention_backend,
        block_copies,
        cli_args,
        free_order,
        kv_spec,
        metrics,
        model_runner,
        platform_config,
        prefill_drop,
        prefix_cache,
        request_budget,
        schedule,
    )

    for mod in (cli_args, platform_config, kv_spec, model_runner, attention_backend, prefill_drop, prefix_cache,
                block_copies, free_order, request_budget, schedule, metrics):
        mod.apply()
