"""vllm-kvcompress: KV-cache compression for stock vLLM 0.32.

The package is loaded by vLLM through the ``vllm.general_plugins`` entry point
(``register`` below), in every vLLM process: API server, engine core, workers.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logger = logging.getLogger("vllm.kvcompress")  # under vLLM's logger: same handlers and format

_registered = False


def register() -> None:
    """vLLM plugin entry point: apply every patch. Safe to call any number of times per process."""
    global _registered
    if _registered:
        return
    from vllm_kvcompress.integration import apply_all

    apply_all()
    _registered = True
    logger.info("vllm-kvcompress %s plugin loaded", __version__)
