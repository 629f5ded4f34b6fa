"""checkpoint.format: fully_parallel (default) writes without gathering and resumes under any layout;
gathered (megatron-core's fully_reshardable path) writes the same tensors.

The trainer runs under torchrun through this file (see the bottom): with NO_GATHER=1 the distributed
optimizer's gathering methods raise, so a fully_parallel save or load that gathered would fail.
"""

import random
import sys
from pathlib import Path

import pytest
import torch

from launch import assert_resumed, requeue, run_torchrun, step_losses

TINY = "recipes/tiny/peri_ln.yaml"
HERE = str(Path(__file__).resolve())


def train(nproc: int, ckpt: Path, *overrides: str, no_gather: bool = False) -> str:
    env = {"NO_GATHER": "1"} if no_gather else None
    return run_torchrun(nproc, [HERE, "--recipe", TINY, "--set", f"checkpoint.dir={ckpt}", *overrides],
                        timeout=400, env=env).stdout


# ------------------------------------------------------------------------------ units (no processes)

def test_row_major_boxes_tile_the_range():
    from periln_megatron.checkpoint.optimizer_state import _row_major_boxes

    rng = random.Random(0)
    for shape in [(7,), (5, 3), (1, 9), (4, 3, 5), (2, 1, 3, 4)]:
        full = torch.arange(torch.Size(shape).numel()).view(shape)
        for _ in range(200):
            lo = rng.randrange(full.numel() + 1)
            hi = rng.randrange(lo, full.numel() + 1)
            got = []
            for offset, size in _row_major_boxes(lo, hi, shape):
                box = full
                for dim, (o, n) in enumerate(zip(offset, size)):
                    box = box.narrow(dim, o, n)
                got.append(box.reshape(-1))
            flat = torch.cat(got) if got else torch.empty(0, dtype=full.dtype)
            assert torch.equal(flat, torch.arange(lo, hi)), (shape, lo, hi)
            assert len(_row_major_boxes(lo, hi, shape)) <= 2 * len(shape) - 1


def _global_from(shards, key):
    """Assemble global tensor `key` from ShardedTensors (offsets and shapes over all dimensions)."""
    parts = [s for s in shards if s.key == key]
    out = torch.full(parts[0].global_shape, -1, dtype=torch.int64)
    for s in parts:
        data = s.data.reshape((1,) * s.prepend_axis_num + tuple(s.data.shape))
        view = out
        for dim, (o, n) in enumerate(zip(s.global_offset, data.shape)):
            view = view.narrow(dim, o, n)
        assert (view == -1).all(), "overlapping boxes"
        view.copy_(data)
    return out


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_slices_of_a_swiglu_factory_land_where_the_model_tensor_does(tp_rank):
    """The fc1 weight (SwiGLU: a factory writing gate and up halves as one global tensor, layer axis
    prepended): the optimizer slices of every DP rank's flat range, put together, equal what
    megatron-core writes for the whole local parameter."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    from periln_megatron.checkpoint.optimizer_state import _slice_tensors

    ffn, hidden, tp, layer, layers = 6, 5, 2, 2, 4
    local = torch.arange(2 * ffn // tp * hidden).view(2 * ffn // tp, hidden)
    sharded = ShardedTensor.from_rank_offsets("fc1", local, (0, layer, layers), (1, tp_rank, tp),
                                              replica_id=(0, 0, 0), prepend_axis_num=1)
    factory = apply_swiglu_sharded_factory(sharded, ((0, layer, layers),))
    expected = _global_from(factory.build_fn("fc1", local, (0, 0, 0), None), "fc1")

    flat = local.reshape(-1)
    cuts = [0, 7, 13, 14, 29, flat.numel()]  # uneven DP ranges, some inside one row, one crossing the halves
    slices = []
    for lo, hi in zip(cuts, cuts[1:]):
        slices += [t for t, _ in _slice_tensors(factory, "optimizer.state.param", flat[lo:hi], lo, (0, 0, 0))]
    assert {s.key for s in slices} == {"optimizer.state.param.fc1"}
    assert all(s.global_shape == (layers, 2 * ffn, hidden) and s.prepend_axis_num == 0 for s in slices)
    got = _global_from(slices, "optimizer.state.param.fc1")
    mine = expected[layer] != -1
    assert torch.equal(got[layer][mine], expected[layer][mine])
    assert (got[layer][~mine] == -1).all() and (got[torch.arange(layers) != layer] == -1).all()


# ------------------------------------------------------------------------------ the trainer, DP=2

STEPS = ["train.steps=12", "checkpoint.interval=10", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    """12 steps at DP=2 (distributed optimizer), once per format, checkpoints at 10 and 12."""
    runs = {}
    for fmt in ("fully_parallel", "gathered"):
        ckpt = tmp_path_factory.mktemp(fmt)
        train(2, ckpt, *STEPS, f"checkpoint.format={fmt}", no_gather=fmt == "fully_parallel")
        runs[fmt] = (ckpt, step_losses(ckpt))
    return runs


def _bytes_by_rank(iteration: Path) -> dict[tuple[str, int], int]:
    from torch.distributed.checkpoint import FileSystemReader

    out: dict[tuple[str, int], int] = {}
    for index, info in FileSystemReader(str(iteration)).read_metadata().storage_data.items():
        kind = "optimizer" if index.fqn.startswith("optimizer.") else "model"
        rank = int(info.relative_path.split("_")[2])  # __<rank>_<n>.distcp
        out[kind, rank] = out.get((kind, rank), 0) + info.length
    return out


def test_both_formats_write_the_same_tensors_spread_differently(dp2):
    from periln_megatron.checkpoint.reader import TorchDistReader

    (new, new_losses), (old, old_losses) = dp2["fully_parallel"], dp2["gathered"]
    assert new_losses == old_losses
    a, b = TorchDistReader(new / "iter_0000010"), TorchDistReader(old / "iter_0000010")
    assert set(a.tensors) == set(b.tensors)
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in a.tensors)
    for key in a.tensors:
        assert torch.equal(a.read(key), b.read(key)), key

    spread = _bytes_by_rank(new / "iter_0000010")
    for kind in ("model", "optimizer"):  # each rank writes about half of each
        assert 0.35 < spread[kind, 0] / (spread[kind, 0] + spread[kind, 1]) < 0.65, spread
    gathered = _bytes_by_rank(old / "iter_0000010")
    assert gathered.get(("optimizer", 1), 0) == 0 and gathered["optimizer", 0] > 0, gathered  # rank 0 wrote it all


def _resume_from(src: Path, dst: Path, expected: dict[int, float], *overrides: str, no_gather=False) -> None:
    requeue(src, 10, dst)
    out = train(2, dst, "train.steps=11", "checkpoint.save_at_end=false", "logging.tensorboard=false",
                "checkpoint.interval=0", "checkpoint.on_schedule_change=checkpoint", *overrides, no_gather=no_gather)
    assert_resumed(out, dst, 10, expected, [11], exact=False, abs_tol=1e-5)


@pytest.mark.parametrize("source,layout", [
    ("fully_parallel", ["parallel.tp=2"]),  # DP 2 -> 1 and TP 1 -> 2
    ("fully_parallel", ["parallel.pp=2"]),  # DP 2 -> 1 and PP 1 -> 2
    ("gathered", ["parallel.tp=2"]),  # an old-style checkpoint, read slice by slice
    ("fully_parallel", ["parallel.tp=2", "checkpoint.format=gathered"]),  # read whole by the old path
], ids=["tp2", "pp2", "gathered-ckpt-tp2", "gathered-reader-tp2"])
def test_resharding(dp2, tmp_path, source, layout):
    """As test_trainer.py's resharding test: the next step's loss under the new layout."""
    ckpt, expected = dp2[source]
    _resume_from(ckpt, tmp_path, expected, *layout, no_gather="checkpoint.format=gathered" not in layout)


def test_bad_format_is_one_line():
    from periln_megatron.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="checkpoint.format.*fully_parallel, gathered"):
        load_recipe(TINY, ["checkpoint.format=sharded"], world_size=1, check_environment=False)


if __name__ == "__main__":  # a trainer rank (see the module docstring)
    import os

    if os.environ.get("NO_GATHER"):
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        def refuse(self, *args, **kwargs):
            raise AssertionError("the distributed optimizer's state was gathered")

        DistributedOptimizer.get_parameter_state_dp_zero = refuse
    from periln_megatron.cli import train_main

    sys.exit(train_main(sys.argv[1:]))
