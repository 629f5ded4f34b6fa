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


# pytest-xdist (make test: -n 2) hands out work in scopes, one at a time to whichever worker is
# nearly idle (xdist's `loadscope`), in collection order, which pytest_collection_modifyitems sets:
#   1. the Slurm tests, one scope on one worker, one after another (one cluster at a time: two
#      clusters' jobs would meet on the same rendezvous ports), the longest chain, so it starts first;
#   2. each module with module-scoped fixtures (a training run its tests share), one scope per module,
#      so that its fixtures are built once, not once per worker;
#   3. every other test, a scope of its own: small units last, to even out the two workers' ends.
# Done here because xdist's own xdist_group marks are ignored under pytest 9 (its loadgroup renames
# item._nodeid, which pytest 9 no longer reads).
SLURM_MODULES = ("test_slurm.py", "test_slurm_multinode.py", "test_ladder_slurm.py")
TESTS = Path(__file__).resolve().parent
_SHARED: dict[str, bool] = {}


def _scope(nodeid: str) -> tuple[int, str]:
    """(place in the queue, scope) of a test."""
    path = nodeid.split("::", 1)[0]
    name = path.rsplit("/", 1)[-1]
    if name in SLURM_MODULES:
        return 1, "slurm"
    if name not in _SHARED:
        _SHARED[name] = (TESTS / name).is_file() and 'scope="module"' in (TESTS / name).read_text()
    return (2, path) if _SHARED[name] else (3, nodeid)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: _scope(item.nodeid)[0])  # stable: a module's tests keep their order


@pytest.hookimpl(optionalhook=True)  # plain pytest, or -p no:xdist, does not know this hook
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # the collection order above, not xdist's count of tests

    class SlurmFirstThenModules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)[1]

    return SlurmFirstThenModules(config, log)
