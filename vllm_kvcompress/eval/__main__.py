"""``python -m vllm_kvcompress.eval <subcommand> [options]``."""

from __future__ import annotations

import sys

SUBCOMMANDS = {
    "quality": "passkey / multi-key retrieval and chunked-prefill perplexity, full cache vs policies",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m vllm_kvcompress.eval <subcommand> [options]\n\nsubcommands:")
        for name, help_ in SUBCOMMANDS.items():
            print(f"  {name:10s} {help_}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "quality":
        from vllm_kvcompress.eval import quality

        return quality.main(rest)
    print(f"error: unknown subcommand {cmd!r} (choose from: {', '.join(SUBCOMMANDS)})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
