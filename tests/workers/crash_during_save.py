"""periln-train, except that the save of iteration CRASH_AT dies half-way: after the tensors are
written, one shard file is truncated and the process is killed before the marker is updated."""

import os
import sys
from pathlib import Path

from megatron.core import dist_checkpointing

CRASH_AT = int(os.environ["CRASH_AT"])
real_save = dist_checkpointing.save


def save_then_crash(state, directory, *args, **kwargs):
    result = real_save(state, directory, *args, **kwargs)
    if state.get("iteration") == CRASH_AT:
        shards = sorted(Path(directory).glob("*.distcp"))
        if shards:
            data = shards[0].read_bytes()
            shards[0].write_bytes(data[: len(data) // 2])
        print(f"simulated crash while saving iteration {CRASH_AT}", flush=True)
        os._exit(137)
    return result


dist_checkpointing.save = save_then_crash

if __name__ == "__main__":
    from periln_megatron.cli import train_main

    sys.exit(train_main())
