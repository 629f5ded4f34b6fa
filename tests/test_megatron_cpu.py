"""megatron-core's own DDP, distributed optimizer and pipeline schedules on CPU through our runtime."""

import json
import math

import pytest

from launch import run_torchrun

WORKER = "tests/workers/mcore_train_worker.py"


def train(nproc, *args, steps=10):
    out = run_torchrun(nproc, [WORKER, "--steps", str(steps), *args], timeout=300).stdout
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert len(lines) == 1, out[-3000:]
    return json.loads(lines[0][len("RESULT "):])["losses"]


@pytest.mark.parametrize(
    "nproc,layout",
    [(2, ["--tp", "2"]), (2, ["--pp", "2"]), (2, []), (4, ["--tp", "2", "--pp", "2"])],
    ids=["tp2", "pp2", "dp2", "tp2xpp2"],
)
def test_loss_finite_and_falling(nproc, layout):
    losses = train(nproc, *layout)
    assert len(losses) == 10
    assert all(math.isfinite(l) for l in losses)
    assert losses[-1] < losses[0] - 0.1, losses


def test_same_weights_same_loss_tp1_tp2(tmp_path):
    init = tmp_path / "init"
    run_torchrun(1, [WORKER, "--save-init", str(init)], timeout=120)
    tp1 = train(1, "--load-init", str(init), steps=3)
    tp2 = train(2, "--tp", "2", "--load-init", str(init), steps=3)
    assert tp1 == pytest.approx(tp2, abs=1e-5)
