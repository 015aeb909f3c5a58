"""``vllm`` (vLLM's own CLI entry point, ``vllm.entrypoints.cli.main:main``) with two
changes: ``vllm bench throughput`` also accepts ``--dataset-name custom``, and the
custom dataset (``vllm bench throughput`` and ``vllm bench serve``) reads its JSONL
file without pandas.

vLLM 0.32's throughput benchmark already has ``--custom-output-len`` and its
``get_samples`` already handles ``custom`` (a JSONL file of ``{"prompt": ...}``
rows, chat template applied, same as ``vllm bench serve --dataset-name custom``),
but ``custom`` is missing from its ``--dataset-name`` choices. The only
text-file dataset it does accept, ``sharegpt``, drops every prompt over 1024
tokens, so long realistic prompts need ``custom``.

    python benchmarks/vllm_cli_custom_dataset.py bench throughput --dataset-name custom \
        --dataset-path prompts.jsonl --custom-output-len 128 ...

vLLM reads that JSONL with ``pandas.read_json(lines=True)``, and pandas is not a
dependency of vLLM's CPU build (nor installed here); the replacement loader reads
the same rows with :mod:`json` and shuffles them exactly as vLLM does
(``random.seed(seed); random.shuffle(rows)`` unless ``--disable-shuffle``).

Everything else (engine, flags, plugin loading, output) is unchanged ``vllm``.
"""

from __future__ import annotations

import sys


def _load_jsonl(self) -> None:
    """``CustomDataset.load_data`` without pandas (same rows, same shuffle)."""
    import json
    import random

    if self.dataset_path is None:
        raise ValueError("dataset_path must be provided for loading data.")
    if not self.dataset_path.endswith(".jsonl"):
        raise NotImplementedError("Only JSONL format is supported for CustomDataset.")
    with open(self.dataset_path, encoding="utf-8") as f:
        self.data = [json.loads(line) for line in f if line.strip()]
    if any("prompt" not in row for row in self.data):
        raise ValueError("JSONL file must contain a 'prompt' column.")
    random.seed(self.random_seed)
    if not getattr(self, "disable_shuffle", False):
        random.shuffle(self.data)


def _patch() -> None:
    from vllm.benchmarks.datasets import datasets as vds

    try:
        import pandas  # noqa: F401
    except ImportError:
        vds.CustomDataset.load_data = _load_jsonl

    import vllm.entrypoints.cli.benchmark.throughput as cli_tp

    original = cli_tp.add_cli_args
    if getattr(original, "_kvcompress_custom", False):
        return

    def add_cli_args(parser) -> None:
        original(parser)
        for action in parser._actions:
            if action.dest == "dataset_name" and action.choices is not None and "custom" not in action.choices:
                action.choices = [*action.choices, "custom"]

    add_cli_args._kvcompress_custom = True
    cli_tp.add_cli_args = add_cli_args


def main() -> int:
    _patch()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    return vllm_main() or 0


if __name__ == "__main__":
    sys.exit(main())
