"""periln-train, except that every rank dies (exit 137, as SIGKILL: no clean stop, nothing saved) right
after rollback number KILL_AFTER_ROLLBACK is complete: the checkpoint reloaded, its rollbacks.json written."""

import os
import sys

from periln_megatron.training import stability

KILL_AFTER = int(os.environ["KILL_AFTER_ROLLBACK"])
real_persist = stability.persist_rollback


def persist_then_die(iter_dir, timeline, rank0):
    real_persist(iter_dir, timeline, rank0)
    if timeline["rollbacks"] == KILL_AFTER:
        print(f"simulated kill after rollback {KILL_AFTER}", flush=True)
        os._exit(137)


stability.persist_rollback = persist_then_die

if __name__ == "__main__":
    from periln_megatron.cli import train_main

    sys.exit(train_main())
