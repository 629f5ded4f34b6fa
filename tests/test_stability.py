"""Spike score, rollback with batch skipping, its bound, and resume after a rollback (the recipe's
`stability:` section, docs/stability.md): the pieces in-process, then end to end on CPU with injected
spikes, including a paper recipe's flags (bf16, distributed optimizer, overlapped grad reduce and
param gather) at DP=2 and at TP=2."""

import json
import math
import sys

import pytest

from launch import assert_resumed, kill_all, run, run_torchrun, spawn_ranks, wait_all
from launch import step_losses as losses
from periln_megatron.config import RecipeError, load_recipe
from periln_megatron.exit_codes import EXIT_ROLLBACKS, EXIT_SPIKE
from periln_megatron.training import stability
from periln_megatron.demo.report import rollback_lines, stability_table
from periln_megatron.demo.summary import summarise_run
from periln_megatron.training.metrics import read_events, read_metrics, rollback_counts

TINY = "recipes/tiny/peri_ln.yaml"
TRAIN = ["-m", "periln_megatron.train", "--recipe", TINY]
SCORE = ["stability.window=8", "stability.min_history=3"]


# ----------------------------------------------------------------------------- in-process


def test_spike_score_needs_both_zscore_and_ratio_and_keeps_spikes_out_of_the_window():
    score = stability.SpikeScore(window=4, min_history=3, zscore=6.0, ratio=2.0)
    for v in (5.0, 5.1, 4.9):
        fields, spiked, _ = score.observe(loss=v, grad_norm=None)
        assert not spiked and "loss_zscore" not in fields
    fields, spiked, msgs = score.observe(loss=5.3, grad_norm=None)  # z ~ 3.7, 1.06x: no
    assert not spiked and fields["loss_zscore"] == pytest.approx(0.3 / math.sqrt(0.02 / 3))
    fields, spiked, msgs = score.observe(loss=50.0, grad_norm=float("nan"))
    assert spiked == ["loss"] and "loss 50" in msgs[0]
    assert list(score.history["loss"]) == [5.0, 5.1, 4.9, 5.3]  # the spike is not part of the window
    assert (fields["spike_total"], fields["spike_rate"]) == (1, 0.25)
    state = json.loads(json.dumps(score.state_dict()))  # what the checkpoint keeps
    again = stability.SpikeScore(window=4, min_history=3, zscore=6.0, ratio=2.0)
    again.load_state_dict(state)
    assert again.observe(loss=5.2, grad_norm=None) == score.observe(loss=5.2, grad_norm=None)


def test_batch_ids_skip_every_window_and_keep_the_steps_before_it():
    windows = [[8, 10], [20, 21], [11, 12]]
    assert stability.merged(windows) == [[8, 12], [20, 21]]
    ids = [stability.batch_id(i, windows) for i in range(20)]
    assert ids[:8] == list(range(8)) and ids[8:] == [*range(13, 20), 22, 23, 24, 25, 26]


def test_rollback_timeline_and_its_file(tmp_path):
    recipe = load_recipe(TINY, ["checkpoint.dir=x", "stability.on_spike=rollback", "stability.skip_margin=2",
                                "stability.lr_factor=0.5", "stability.lr_factor_steps=3", "stability.inject_spike_steps=[7]",
                                "stability.inject_nonfinite_steps=[9]"], check_environment=False)
    st = stability.Stability(recipe.stability)
    assert st.loss_scale(6) == stability.INJECT_SCALE and math.isnan(st.loss_scale(8)) and st.loss_scale(7) == 1.0
    event = st.plan_rollback(step=7, to_step=4, reason="loss")
    assert event == {"step": 7, "event": "rollback", "to_step": 4, "skip": [4, 8], "skipped_batches": 5,
                     "rollbacks": 1, "reason": "loss", "lr_factor": 0.5, "lr_factor_until": 7}
    assert [st.batch_id(i) for i in (3, 4, 5)] == [3, 9, 10]
    assert (st.lr_multiplier(7), st.lr_multiplier(8)) == (0.5, 1.0)
    # a run killed after the rollback resumes from step 4's checkpoint (saved before it) plus the file
    saved = stability.Stability(recipe.stability).state_dict()
    stability.persist_rollback(tmp_path, st.timeline(), rank0=True)
    resumed = stability.Stability(recipe.stability)
    resumed.load(saved, tmp_path)
    assert resumed.timeline() == st.timeline() == {"skips": [[4, 8]], "rollbacks": 1, "lr_until": 7}


def test_recipe_keys_are_checked_and_rare_checkpoints_warned_about():
    with pytest.raises(RecipeError, match="stability.on_spike.*checkpoint.dir"):
        load_recipe(TINY, ["stability.on_spike=rollback"], check_environment=False)
    with pytest.raises(RecipeError, match="stability.inject_spike_steps"):
        load_recipe(TINY, ["stability.inject_spike_steps=[0]"], check_environment=False)
    with pytest.raises(RecipeError, match="stability.on_nonfinite"):
        load_recipe(TINY, ["stability.on_nonfinite=retry"], check_environment=False)
    recipe = load_recipe(TINY, ["checkpoint.dir=x", "stability.on_spike=rollback", "train.steps=1000",
                                "checkpoint.interval=100", "stability.max_rollbacks=2"], check_environment=False)
    assert "10% of train.steps=1000" in stability.warnings(recipe)[0]
    assert stability.reserve_batches(recipe) == 200
    recipe.checkpoint.interval = 20
    assert stability.warnings(recipe) == []
    assert stability.warnings(load_recipe(TINY, check_environment=False)) == []


def test_events_are_not_steps_and_a_repeated_rollback_counts_once(tmp_path):
    from periln_megatron.hf.model_card import summarize_metrics

    lines = [{"step": s, "loss": 5.0 - s / 10} for s in range(1, 7)]
    event = {"step": 6, "event": "rollback", "to_step": 4, "skip": [4, 5], "rollbacks": 1}
    lines += [event, event]  # a run killed between the event and the rollback writes it again
    lines += [{"step": s, "loss": 4.0 - s / 10} for s in range(5, 9)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert sorted(read_metrics(tmp_path)) == list(range(1, 9)) and read_metrics(tmp_path)[6]["loss"] == 3.4
    assert read_events(tmp_path) == [event]
    assert summarize_metrics(tmp_path / "metrics.jsonl", 8).rollbacks == [[6, 4, [4, 5]]]
    assert summarize_metrics(tmp_path / "metrics.jsonl", 4).rollbacks == []  # these weights predate it


# ----------------------------------------------------------------------------- end to end

# 16 steps, checkpoints every 4. Step 10's batch (id 9) is a 1000x spike: rolled back to 8, batches
# 8..10 skipped (margin 1), lr halved for steps 9-10. Step 14's batch (id 13) is NaN, met at step 11:
# rolled back to 8 again, batches 11..14 skipped. Steps 9..16 then train on batches 15..22.
ROLLBACK = [*SCORE, "train.steps=16", "checkpoint.interval=4", "checkpoint.keep=5", "stability.on_spike=rollback",
            "stability.on_nonfinite=rollback", "stability.inject_spike_steps=[10]",
            "stability.inject_nonfinite_steps=[14]", "stability.skip_margin=1", "stability.lr_factor=0.5",
            "stability.lr_factor_steps=2"]


@pytest.fixture(scope="module")
def rolled_back(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("rollback")
    out = run_torchrun(2, [*TRAIN, "--set", *ROLLBACK, f"checkpoint.dir={ckpt}"], timeout=300).stdout
    return ckpt, out


def test_injected_spike_and_nan_are_rolled_back_and_their_batches_skipped(rolled_back, tmp_path):
    from periln_megatron.checkpoint.reader import TorchDistReader

    ckpt, out = rolled_back
    events = read_events(ckpt)
    assert [(e["step"], e["to_step"], e["skip"], e["rollbacks"]) for e in events] == [
        (10, 8, [8, 10], 1), (11, 8, [11, 14], 2)], out[-3000:]
    assert "loss" in events[0]["reason"] and "nan" in events[1]["reason"]
    records = read_metrics(ckpt)
    assert sorted(records) == list(range(1, 17))
    assert [records[s]["batch"] for s in range(1, 17)] == [*range(8), *range(15, 23)]  # batches 8..14 never kept
    assert all(math.isfinite(r["loss"]) and r["loss"] < 6 for r in records.values())
    assert [records[s].get("lr_factor") for s in (9, 10, 11)] == [0.5, 0.5, None]
    assert records[16]["rollbacks"] == 2 and all("spike_total" in r and "spike_rate" in r for r in records.values())
    assert "loss_zscore" in records[16] and "grad_norm_zscore" in records[16]
    assert json.loads((ckpt / "iter_0000008/rollbacks.json").read_text())["rollbacks"] == 2
    # what the demo's and the ladder's reports count: 2 rollbacks, batches 8..10 and 11..14 skipped
    assert rollback_counts(ckpt) == (2, 7)
    summary = summarise_run(ckpt)
    assert (summary.rollbacks, summary.skipped_batches) == (2, 7)
    assert stability_table([summary])[2].count("| 2 (7) |") == 1
    assert rollback_lines([summary]) == ["Rollbacks (stability.on_spike: rollback): Peri-LN 2 rollbacks, 7 batches "
                                         "skipped over 1 runs.", ""]
    reader = TorchDistReader(ckpt / "iter_0000016")
    weights = [k for k in reader.tensors if not k.startswith("optimizer")]
    assert len(weights) > 10 and all(bool(reader.read(k).float().isfinite().all()) for k in weights)
    # the model card of the export counts them (read_events, beside read_metrics)
    run([sys.executable, "tools/convert_to_hf.py", str(ckpt), str(tmp_path / "hf"), "--quiet"], timeout=180)
    card = (tmp_path / "hf/README.md").read_text()
    assert "| stability rollbacks | 2 (7 global batches skipped; last: step 11 back to 8) |" in card


def test_kill_after_a_rollback_then_resume_gives_the_same_run(rolled_back, tmp_path):
    """Killed right after rollback 1 (before any later save): the resume from step 8's checkpoint and its
    rollbacks.json meets the NaN batch and rolls back again, as the uninterrupted run did. The spike
    score resumes from the checkpoint's windows: its numbers match the uninterrupted run's too."""
    ckpt, _ = rolled_back
    straight = read_metrics(ckpt)
    args = ["--recipe", TINY, "--set", *ROLLBACK, f"checkpoint.dir={tmp_path}"]
    procs = spawn_ranks(2, ["tests/workers/kill_after_rollback.py", *args], tmp_path / "logs1",
                        env={"KILL_AFTER_ROLLBACK": "1"})
    assert wait_all(procs) == [137, 137], (tmp_path / "logs1/rank0.log").read_text()[-3000:]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    procs = spawn_ranks(2, ["-m", "periln_megatron.train", *args], tmp_path / "logs2")
    try:
        assert wait_all(procs) == [0, 0], (tmp_path / "logs2/rank0.log").read_text()[-3000:]
    finally:
        kill_all(procs)
    log = (tmp_path / "logs2/rank0.log").read_text()
    assert "1 rollbacks so far, skipping batches [[8, 10]]" in log
    assert_resumed(log, tmp_path, 8, losses(ckpt), range(9, 17), exact=False, abs_tol=1e-6)
    resumed = read_metrics(tmp_path)
    for step in range(9, 17):
        for key in ("batch", "spike_total", "spike_rate", "rollbacks"):
            assert resumed[step][key] == straight[step][key], (step, key)
        for key in ("loss_zscore", "grad_norm_zscore"):
            assert resumed[step][key] == pytest.approx(straight[step][key], rel=1e-4, abs=1e-4), (step, key)
    assert [(e["step"], e["skip"]) for e in read_events(tmp_path)] == [(10, [8, 10]), (11, [11, 14])]


def test_spike_stop_exits_4_without_saving_the_spiked_step(tmp_path):
    """The spike is the last step: the save at the end would write it if it were not caught."""
    result = run([sys.executable, *TRAIN, "--set", *SCORE, "train.steps=6", "checkpoint.interval=5",
                  f"checkpoint.dir={tmp_path}", "stability.on_spike=stop", "stability.inject_spike_steps=[6]"],
                 check=False, timeout=300)
    assert result.returncode == EXIT_SPIKE, result.stdout[-3000:]
    assert "step 6: spike: loss" in result.stdout and "stability.on_spike=stop" in result.stdout
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000005"]


# The 400M Peri-LN recipe's own flags (bf16, distributed optimizer, overlapped grad reduce and param
# gather), with test_paper_recipes.py's shrunk shapes, steps and data (synthetic, no tokenizer file).
PAPER = ["-m", "periln_megatron.train", "--recipe", "recipes/peri_ln/400m.yaml", "--set", "model.num_layers=4",
         "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128", "model.seq_length=64",
         "model.backend=local", "train.global_batch_size=4", "train.micro_batch_size=1", "train.eval_interval=2",
         "train.eval_iters=1", "optim.warmup_steps=1", "diagnostics.interval=2", "logging.interval=1",
         "logging.tensorboard=false", "data.synthetic=true", "data.prefixes=[]", "tokenizer.type=null",
         "tokenizer.model=null", "tokenizer.vocab_size=null", *SCORE, "stability.on_spike=rollback"]


def test_paper_flags_at_dp2_roll_back_and_finish(tmp_path):
    out = run_torchrun(2, [*PAPER, "train.steps=6", "checkpoint.interval=4", "stability.inject_spike_steps=[6]",
                           "stability.skip_margin=1", f"checkpoint.dir={tmp_path}"], timeout=300).stdout
    assert "tp=1 pp=1 vpp=None cp=1 dp=2" in out
    assert [(e["step"], e["to_step"], e["skip"]) for e in read_events(tmp_path)] == [(6, 4, [4, 6])]
    records = read_metrics(tmp_path)
    assert sorted(records) == list(range(1, 7)) and all(math.isfinite(r["loss"]) for r in records.values())
    assert [records[s]["batch"] for s in range(1, 7)] == [0, 1, 2, 3, 7, 8]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "6"


def test_paper_flags_at_tp2_stop_past_max_rollbacks_without_saving(tmp_path):
    """Step 5 is rolled back to 4 (batch 4 skipped); steps 5, 6 train on batches 5, 6; step 7 meets
    batch 7, the second spike: one rollback too many. It is the last step: the save at the end would
    write it if it were not caught."""
    args = [*PAPER, "parallel.tp=2", "train.steps=7", "checkpoint.interval=4", "stability.max_rollbacks=1",
            "stability.inject_spike_steps=[5,8]", f"checkpoint.dir={tmp_path}"]
    procs = spawn_ranks(2, args, tmp_path / "logs")
    codes = wait_all(procs)
    log = (tmp_path / "logs/rank0.log").read_text()
    assert codes == [EXIT_ROLLBACKS, EXIT_ROLLBACKS], log[-3000:]
    assert "tp=2 pp=1 vpp=None cp=1 dp=1" in log and "past stability.max_rollbacks=1" in log
    assert [(e["step"], e["to_step"], e["skip"]) for e in read_events(tmp_path)] == [(5, 4, [4, 4])]
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000004"]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert max(read_metrics(tmp_path)) == 6
