"""Checkpoints: Megatron-LM's layout and resume choice (layout.py), resumability (compat.py), the
save and load through megatron-core's dist_checkpointing (io.py), the distributed optimizer's state
(optimizer_state.py), and a reader of torch_dist files without megatron (reader.py, for hf/)."""

from periln_megatron.checkpoint.compat import SHAPE_KEYS, check_resumable, shape_differences  # noqa: F401 - API
from periln_megatron.checkpoint.io import load, load_weights_only, read_common, save  # noqa: F401
from periln_megatron.checkpoint.layout import (  # noqa: F401
    MARKER, CheckpointError, has_optimizer_state, iteration_dir, latest_iteration, prune, resume_iteration,
    saved_iterations, verify_iteration)
