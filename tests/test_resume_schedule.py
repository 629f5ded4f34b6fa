"""A resume whose schedule differs from the checkpoint's (issue #22): refused by default, naming each
key with both values; `checkpoint.on_schedule_change` chooses the checkpoint's schedule or the
recipe's, and either way the lr every step trains with (metrics.jsonl) is the one the recorded
recipe.yaml (run dir, checkpoint, model card) gives.

Real runs of the tiny recipe: one 3-step run, resumed to 5 steps with lr 1.0 -> 0.5.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from launch import REPO, run
from periln_megatron.training.metrics import read_metrics, series

PY = sys.executable
TRAIN_ARGV = ["--recipe", str(REPO / "recipes/tiny/peri_ln.yaml"), "--set", "logging.tensorboard=false",
              "checkpoint.interval=0"]
TRAIN = [PY, "-m", "periln_megatron.train", *TRAIN_ARGV]
CHANGED = ["train.steps=5", "optim.lr=1.0", "optim.min_lr=0.5"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """3 steps of recipes/tiny/peri_ln.yaml (lr 3e-3 -> 3e-4, cosine, 2 warmup steps), saved at 3."""
    ckpt = tmp_path_factory.mktemp("base") / "ckpt"
    run([*TRAIN, f"checkpoint.dir={ckpt}", "train.steps=3"], timeout=240)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    return ckpt


def _refused(capfd, argv: list[str]) -> str:
    """periln-train in this process refuses `argv` before training: exit 2, one error line, returned."""
    from periln_megatron.cli import train_main

    capfd.readouterr()
    assert train_main([*TRAIN_ARGV, *argv]) == 2
    captured = capfd.readouterr()
    output = captured.out + captured.err
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.startswith("periln-train: error:")]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


def _copy(base: Path, tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base, ckpt)
    return ckpt


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def expected_lr(recipe: dict, step: int) -> float:
    """The lr after `step` steps of the schedule `recipe` (a recipe.yaml) describes, written out from
    Megatron-LM's definition (samples: steps x global batch; linear warmup from 0; decay over
    optim.decay_steps, else train.steps; min_lr after it)."""
    o, gbs = recipe["optim"], recipe["train"]["global_batch_size"]
    n, warmup = step * gbs, o["warmup_steps"] * gbs
    decay = (o.get("decay_steps") or recipe["train"]["steps"]) * gbs
    lr, min_lr = o["lr"], o["min_lr"]
    if warmup and n <= warmup:
        return lr * n / warmup
    if o["decay_style"] == "constant":
        return lr
    if n > decay:
        return min_lr
    ratio = (n - warmup) / (decay - warmup)
    coeff = {"cosine": 0.5 * (math.cos(math.pi * ratio) + 1.0), "linear": 1.0 - ratio}[o["decay_style"]]
    return min_lr + coeff * (lr - min_lr)


def _lr_by_step(run_dir: Path) -> dict[int, float]:
    return series(read_metrics(run_dir), "lr")  # a resumed run's records replace the earlier run's


@pytest.mark.parametrize("sets,named", [
    (CHANGED, ["optim.lr: 0.003 -> 1.0", "optim.min_lr: 0.0003 -> 0.5", "train.steps: 3 -> 5"]),
    (["train.steps=5"], ["train.steps: 3 -> 5"]),  # extending a finished run is a choice too
    (["train.steps=3", "optim.adam_beta1=0.5", "train.global_batch_size=16", "train.micro_batch_size=4"],
     ["optim.adam_beta1: 0.9 -> 0.5", "train.global_batch_size: 8 -> 16"]),
], ids=["lr-and-steps", "steps-only", "betas-and-batch"])
def test_a_changed_schedule_is_refused_naming_each_key_untouched(base, tmp_path, capfd, sets, named):
    """By default a resume with another schedule exits 2 before anything is written: one line naming
    every differing key with the checkpoint's and the recipe's value, and the two choices."""
    ckpt = _copy(base, tmp_path)
    before = _snapshot(ckpt)
    line = _refused(capfd, [f"checkpoint.dir={ckpt}", *sets])
    assert str(ckpt / "iter_0000003") in line, line
    for text in named:
        assert text in line, line
    assert "checkpoint.on_schedule_change=checkpoint" in line and "=recipe" in line, line
    assert len(line.split(" -> ")) == len(named) + 2, line  # nothing else named (and "checkpoint -> recipe")
    assert _snapshot(ckpt) == before


@pytest.mark.parametrize("choice", ["checkpoint", "recipe"])
def test_each_choice_trains_with_the_lr_its_recorded_recipe_gives(base, tmp_path, choice):
    """With either choice the run goes on to step 5, and every step's lr in metrics.jsonl is the
    schedule of the recipe.yaml recorded in the run dir (the same as the new checkpoint's): the
    checkpoint's lr 3e-3 -> 3e-4 decaying over its 3 steps (min_lr after them), or the recipe's
    1.0 -> 0.5 over 5 steps, re-planned from step 3."""
    ckpt = _copy(base, tmp_path)
    result = run([*TRAIN, f"checkpoint.dir={ckpt}", *CHANGED, f"checkpoint.on_schedule_change={choice}"], timeout=240)
    assert "resumed from iteration 3" in result.stdout
    assert f"checkpoint.on_schedule_change={choice}" in result.stdout
    recorded = yaml.safe_load((ckpt / "recipe.yaml").read_text())
    assert (ckpt / "iter_0000005/recipe.yaml").read_text() == (ckpt / "recipe.yaml").read_text()
    assert recorded["train"]["steps"] == 5
    if choice == "checkpoint":
        assert (recorded["optim"]["lr"], recorded["optim"]["min_lr"], recorded["optim"]["decay_steps"]) == (3e-3, 3e-4, 3)
    else:
        assert (recorded["optim"]["lr"], recorded["optim"]["min_lr"], recorded["optim"]["decay_steps"]) == (1.0, 0.5, None)
    lrs = _lr_by_step(ckpt)
    assert sorted(lrs) == [1, 2, 3, 4, 5]
    for step in (4, 5):
        assert lrs[step] == pytest.approx(expected_lr(recorded, step), rel=1e-12), (step, lrs, recorded["optim"])
    if choice == "recipe":
        assert lrs[4] == pytest.approx(0.625) and lrs[5] == pytest.approx(0.5)  # cosine 1.0 -> 0.5 at 2/3 and 1
    else:
        assert lrs[4] == lrs[5] == pytest.approx(3e-4)

    if choice == "checkpoint":  # the model card shows the values used too
        out = tmp_path / "hf"
        run([PY, "tools/convert_to_hf.py", str(ckpt), str(out), "--quiet"], timeout=180)
        card = (out / "README.md").read_text()
        assert "lr 0.003 -> 0.0003 (cosine, 2 warmup steps, decay over 3 steps)" in card, card
        assert "lr: 1.0" not in card


def test_the_checkpoints_schedule_that_does_not_fit_this_run_is_one_line(base, tmp_path, capfd):
    """Continuing the checkpoint's schedule brings back its global batch (8), which this run's micro
    batch (16) does not divide: one line naming the checkpoint and the key, nothing written."""
    ckpt = _copy(base, tmp_path)
    before = _snapshot(ckpt)
    line = _refused(capfd, [f"checkpoint.dir={ckpt}", "train.steps=3", "train.global_batch_size=16",
                            "train.micro_batch_size=16", "checkpoint.on_schedule_change=checkpoint"])
    assert str(ckpt / "iter_0000003") in line, line
    assert "`train.global_batch_size` = 8 is not divisible by train.micro_batch_size" in line, line
    assert _snapshot(ckpt) == before


def test_an_unchanged_schedule_resumes_without_a_choice(base, tmp_path):
    """A resume with the checkpoint's own schedule (a requeue) needs no choice; an explicit
    optim.decay_steps equal to the old length lets a finished run go on without changing its schedule."""
    ckpt = _copy(base, tmp_path)
    result = run([*TRAIN, f"checkpoint.dir={ckpt}", "train.steps=4", "optim.decay_steps=3"], check=False,
                 timeout=240)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "checkpoint.on_schedule_change=" not in result.stdout
    recorded = yaml.safe_load((ckpt / "recipe.yaml").read_text())
    assert _lr_by_step(ckpt)[4] == pytest.approx(expected_lr(recorded, 4), rel=1e-12) == pytest.approx(3e-4)


@pytest.mark.parametrize("sets,message", [
    (["checkpoint.on_schedule_change=keep"], "`checkpoint.on_schedule_change` must be one of refuse, checkpoint, recipe"),
    (["optim.decay_steps=0"], "`optim.decay_steps` must be >= 1"),
    (["optim.decay_steps=2", "optim.warmup_steps=2"], "`optim.warmup_steps` = 2 must be >= 0 and below optim.decay_steps = 2"),
])
def test_schedule_keys_are_validated(sets, message):
    from periln_megatron.config import RecipeError, load_recipe

    with pytest.raises(RecipeError) as error:
        load_recipe(REPO / "recipes/tiny/peri_ln.yaml", sets, check_environment=False)
    assert str(error.value).startswith(f"{REPO / 'recipes/tiny/peri_ln.yaml'} (with --set ") and message in str(error.value)
