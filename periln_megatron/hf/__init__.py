"""Hugging Face export/import for megatron-core checkpoints (tools/convert_to_hf.py, tools/convert_from_hf.py)."""

import sys


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_tool(name: str, quiet: bool, convert, errors=(ValueError, RuntimeError, OSError)) -> int:
    """Shared body of the converter tools: `convert(log)` with per-tensor progress unless quiet;
    an expected failure prints `name: error: ...` and returns 2 (PERILN_DEBUG=1: the traceback);
    Ctrl-C or SIGTERM prints one line and returns 130 (the converters remove what they had written)."""
    import os
    import signal

    def log(msg: str) -> None:
        if not (quiet and msg.startswith("  [")):
            print(msg, flush=True)

    if os.environ.get("PERILN_DEBUG"):
        errors = ()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        convert(log)
    except errors as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted: nothing written (the temporary output was removed)", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


PAUSE_ENV = "PERILN_TEST_PAUSE_UNTIL"


def pause_for_tests(log) -> None:
    """Test-only: with PERILN_TEST_PAUSE_UNTIL=FILE set, wait (after the weights are in the hidden
    temporary directory, before the rest and the final rename) until FILE exists. Lets a test hold
    two conversions at the same point or interrupt one mid-write; unset, it does nothing."""
    import os
    import time

    gate = os.environ.get(PAUSE_ENV)
    if not gate:
        return
    log(f"{PAUSE_ENV}: waiting for {gate}")
    while not os.path.exists(gate):
        time.sleep(0.05)
