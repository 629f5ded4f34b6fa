"""Shared by every test module: tests/ on sys.path (launch.py, fixtures.py, reference models), the
session-wide artefacts of tests/fixtures.py (spm1k, spm_run, tiny_run, stock_llama), and the check
that no test leaves launcher variables behind. `make test` prints the 25 slowest tests."""

import sys
from pathlib import Path

# tests import their helpers (launch.py, reference models) as top-level modules
sys.path.insert(0, str(Path(__file__).resolve().parent))

import os  # noqa: E402

import pytest  # noqa: E402

from fixtures import spm1k, spm_run, stock_llama, tiny_run  # noqa: E402,F401  (session-wide, tests/fixtures.py)

# What a test process leaves here, every later subprocess inherits: a MASTER_PORT that an in-process
# store still holds made the next tests' trainers and Slurm jobs fail with EADDRINUSE.
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


_AT_START = {k: os.environ.get(k) for k in LAUNCHER_VARIABLES}


@pytest.fixture(autouse=True)
def launcher_variables_unchanged():
    yield
    now = {k: os.environ.get(k) for k in LAUNCHER_VARIABLES}
    assert now == _AT_START, f"a test or fixture changed the pytest process's launcher variables: {_AT_START} -> {now}"


# pytest-xdist (make test: -n 2): the Slurm tests run on one worker, one after another, as one scope;
# every other test is a scope of its own (xdist's `load`). Done here because xdist's own xdist_group
# marks are ignored under pytest 9 (its loadgroup renames item._nodeid, which pytest 9 no longer reads).
SLURM_MODULES = ("test_slurm.py", "test_slurm_multinode.py", "test_ladder_slurm.py")


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class SlurmOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "slurm" if nodeid.split("::", 1)[0].rsplit("/", 1)[-1] in SLURM_MODULES else nodeid

    return SlurmOnOneWorker(config, log)
