"""Patch points: ``vllm.v1.engine.input_processor.InputProcessor._validate_params``
(front end), ``vllm.v1.core.sched.scheduler.Scheduler.add_request`` and
``Scheduler._free_blocks`` (engine core).

Per-request budgets. A client may LOWER its own retained-token budget with
``SamplingParams(extra_args={"kv_budget": 256})`` (OpenAI clients:
``extra_body={"vllm_xargs": {"kv_budget": 256}}``); same units as
``--kv-budget``. The front end validates it (``config.request_budget``) and a
bad value is refused there: a ``ValueError`` for offline users, HTTP 400 with
a one-line reason for the server. The scheduler records it per request id in
``kv_manager.REQUEST_BUDGETS`` so its KV-cache managers count that request's
pages with the lower budget; the workers read the same value from the
request's sampling params (``model_runner``), so both sides compute the same
per-layer budget: ``min(server stage budget, stage budget at kv_budget)``.
"""

from __future__ import annotations

from vllm_kvcompress.config import ConfigError, request_budget
from vllm_kvcompress.integration.common import kv_config_of, patch_method

KEY = "kv_budget"


def requested(params) -> float | int | None:
    """The raw ``kv_budget`` a request carries, if any."""
    extra = getattr(params, "extra_args", None)
    if not extra or KEY not in extra:
        return None
    return extra[KEY]


def apply() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_kvcompress.integration.kv_manager import REQUEST_BUDGETS

    def wrap_validate(original):
        def _validate_params(self, params, supported_tasks):
            out = original(self, params, supported_tasks)
            value = requested(params)
            if value is not None:
                try:
                    params.extra_args[KEY] = request_budget(kv_config_of(self.vllm_config), value,
                                                            self.vllm_config.cache_config.block_size)
                except ConfigError as e:
                    raise VLLMValidationError(str(e), parameter=KEY) from None
            return out
        return _validate_params

    def wrap_add(original):
        def add_request(self, request):
            value = requested(request.sampling_params)
            if value is not None:
                REQUEST_BUDGETS[request.request_id] = value
            return original(self, request)
        return add_request

    def wrap_free(original):
        def _free_blocks(self, request):
            try:
                return original(self, request)
            finally:
                REQUEST_BUDGETS.pop(request.request_id, None)
        return _free_blocks

    patch_method(InputProcessor, "_validate_params", wrap_validate)
    patch_method(Scheduler, "add_request", wrap_add)
    patch_method(Scheduler, "_free_blocks", wrap_free)
