"""Trainer options on CPU: interleaved pipeline, activation recompute, mixed precision, NaN stop."""

import json
import math

import pytest

from launch import run_torchrun

TRAIN = ["-m", "periln_megatron.train", "--recipe", "recipes/tiny/peri_ln.yaml", "--set"]


def records(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(tmp_path, nproc, *overrides, check=True):
    return run_torchrun(nproc, [*TRAIN, f"checkpoint.dir={tmp_path}", "train.steps=4", *overrides],
                        timeout=240, check=check)


def losses(tmp_path):
    return [r["loss"] for r in records(tmp_path) if "loss" in r]


def test_interleaved_pipeline(tmp_path):
    out = train(tmp_path, 2, "parallel.pp=2", "parallel.vpp=2").stdout
    assert "vpp=2" in out
    assert len(losses(tmp_path)) == 4 and all(math.isfinite(l) for l in losses(tmp_path))


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_recompute_gives_the_same_losses(tmp_path, mode):
    train(tmp_path / "plain", 1)
    train(tmp_path / mode, 1, f"model.recompute={mode}")
    assert losses(tmp_path / mode) == pytest.approx(losses(tmp_path / "plain"), abs=1e-6)


@pytest.mark.parametrize("preset", ["bf16", "fp16"])
def test_mixed_precision_presets(tmp_path, preset):
    train(tmp_path, 2, "parallel.tp=2", f"precision.preset={preset}")
    got = losses(tmp_path)
    assert len(got) == 4 and all(math.isfinite(l) for l in got)
    assert (tmp_path / "iter_0000004").is_dir()


def test_validation_loss_is_logged(tmp_path):
    train(tmp_path, 1, "train.eval_interval=2", "train.eval_iters=1")
    recs = records(tmp_path)
    assert [r["step"] for r in recs if "valid_loss" in r] == [2, 4]
    assert "final_valid_loss" in recs[-1]


def test_nonfinite_loss_stops_without_checkpoint(tmp_path):
    result = train(tmp_path, 1, "optim.lr=1.0e+30", "optim.min_lr=0", "optim.warmup_steps=0",
                   "optim.clip_grad=0.0", "train.steps=50", "checkpoint.interval=1", check=False)
    assert result.returncode != 0
    assert "loss=nan" in result.stdout or "loss=inf" in result.stdout or "grad_norm=nan" in result.stdout, \
        result.stdout[-3000:]
    bad_step = int(result.stdout.split("error: step ")[1].split(":")[0])
    saved = sorted(int(p.name[5:]) for p in tmp_path.glob("iter_*"))
    assert all(s < bad_step for s in saved)
