"""Hugging Face export/import for megatron-core checkpoints (tools/convert_to_hf.py, tools/convert_from_hf.py)."""

import sys


def run_tool(name: str, quiet: bool, convert, errors=(ValueError, RuntimeError, OSError)) -> int:
    """Shared body of the converter tools: `convert(log)` with per-tensor progress unless quiet;
    an expected failure prints `name: error: ...` and returns 2."""
    def log(msg: str) -> None:
        if not (quiet and msg.startswith("  [")):
            print(msg, flush=True)

    try:
        convert(log)
    except errors as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    return 0
