"""megatron-core's parallel state for one process (TP=PP=1) around a test module.

    from mcore_single import single_process  # noqa: F401 - autouse: initialises the module's tests
"""

import pytest

from periln_megatron.distributed import runtime


@pytest.fixture(scope="module", autouse=True)
def single_process():
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        assert parallel_state.get_tensor_model_parallel_world_size() == 1
        yield
        return
    runtime.initialize(runtime.ParallelLayout(), seed=0, dist_env=runtime.SINGLE_PROCESS)
    yield
    runtime.shutdown()
