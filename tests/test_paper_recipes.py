"""The paper recipes' own flags on CPU: overlapped parameter gather, backend-independent checkpoints."""

import json

import pytest
import torch

from launch import run_torchrun

TINY = ["-m", "periln_megatron.train", "--recipe", "recipes/tiny/peri_ln.yaml", "--set"]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_tensors(iter_dir) -> dict[str, torch.Tensor]:
    from periln_megatron.hf.reader import TorchDistReader

    reader = TorchDistReader(iter_dir)
    return {key: reader.read(key) for key in reader.tensors}


def test_overlapped_param_gather_saves_and_evaluates_gathered_weights(tmp_path):
    """With overlap_param_gather (all paper recipes) the DP all-gather after a step is deferred to
    the next forward; every save and evaluation must still see the updated weights of all shards."""
    common = ["parallel.distributed_optimizer=true", "parallel.overlap_grad_reduce=true", "precision.preset=bf16",
              "train.steps=5", "checkpoint.interval=2", "checkpoint.keep=5", "train.eval_interval=2",
              "train.eval_iters=1", "optim.warmup_steps=0"]
    for gather in ("false", "true"):
        run_torchrun(2, [*TINY, f"checkpoint.dir={tmp_path / gather}", *common,
                         f"parallel.overlap_param_gather={gather}"], timeout=300)
    plain, overlapped = records(tmp_path / "false"), records(tmp_path / "true")
    assert [r.get("valid_loss") for r in overlapped] == [r.get("valid_loss") for r in plain]
    assert sum("valid_loss" in r for r in plain) == 2
    for iteration in (2, 4, 5):
        name = f"iter_{iteration:07d}"
        expected, got = checkpoint_tensors(tmp_path / "false" / name), checkpoint_tensors(tmp_path / "true" / name)
        assert sorted(got) == sorted(expected)
        model_keys = [k for k in expected if not k.startswith("optimizer")]
        assert len(model_keys) > 10
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"{name}: {key} differs"
