"""The one metrics.jsonl reader (periln_megatron/training/metrics.py read_metrics), on files written
as the trainer writes them (JsonlSink), killed and resumed; and that the model card and the plots
read through it (they get the same steps)."""

import json
from pathlib import Path

import pytest

from periln_megatron.training.metrics import JsonlSink, MetricsError, read_metrics


def _log(run_dir: Path, *records: dict) -> None:
    sink = JsonlSink(run_dir)
    for r in records:
        sink.write(r)
    sink.close()


def _kill_mid_write(run_dir: Path, text: str) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(text)


def test_a_resumed_run_owns_every_step_it_trains_again(tmp_path):
    """Killed after logging step 3 (checkpoint at 2), resumed: step 3 on is the resumed run's alone,
    the killed run's spike at step 3 included."""
    _log(tmp_path, {"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0},
         {"step": 3, "loss": 3.9, "spike": "loss 3.9 > 3x median"}, {"step": 4, "loss": 3.8})
    _log(tmp_path, {"step": 3, "loss": 3.5}, {"step": 4, "loss": 3.4})
    assert read_metrics(tmp_path) == {1: {"step": 1, "loss": 5.0}, 2: {"step": 2, "loss": 4.0},
                                      3: {"step": 3, "loss": 3.5}, 4: {"step": 4, "loss": 3.4}}


def test_a_resumed_run_restarting_at_the_killed_runs_last_step_replaces_it(tmp_path):
    """Killed after logging step 3 with its checkpoint at 2: the resumed run's first step is 3 again,
    not lower than the last one logged; its record replaces the killed run's (no stale keys merge)."""
    _log(tmp_path, {"step": 2, "loss": 4.0}, {"step": 3, "loss": 3.9, "spike": "stale"})
    _log(tmp_path, {"step": 3, "loss": 3.5})
    assert read_metrics(tmp_path)[3] == {"step": 3, "loss": 3.5}


def test_records_of_one_run_at_one_step_merge(tmp_path):
    _log(tmp_path, {"step": 4, "loss": 3.0, "valid_loss": 3.2}, {"step": 4, "final_valid_loss": 3.1})
    assert read_metrics(tmp_path / "metrics.jsonl") == {4: {"step": 4, "loss": 3.0, "valid_loss": 3.2,
                                                            "final_valid_loss": 3.1}}


@pytest.mark.parametrize("cut", ['{"step": 5, "lo', '{"st', "{"])
def test_a_line_cut_by_a_kill_is_skipped_with_a_warning(tmp_path, cut):
    """Wherever the kill cut the line (also inside `{"step": `), and also when the resumed run then
    wrote on (JsonlSink starts a new line after the cut one)."""
    _log(tmp_path, {"step": 4, "loss": 3.0})
    _kill_mid_write(tmp_path, cut)
    warnings = []
    assert read_metrics(tmp_path, warn=warnings.append) == {4: {"step": 4, "loss": 3.0}}
    assert len(warnings) == 1 and f"metrics.jsonl:2:" in warnings[0] and "cut off" in warnings[0]
    _log(tmp_path, {"step": 5, "loss": 2.9})
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[1] == cut
    warnings.clear()
    assert list(read_metrics(tmp_path, warn=warnings.append)) == [4, 5] and len(warnings) == 1


def test_a_record_glued_onto_a_cut_line_is_kept(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 4, "loss": 3.0}\n{"step": 5, "lo{"step": 5, "loss": 2.5}\n')
    warnings = []
    assert read_metrics(tmp_path, warn=warnings.append)[5] == {"step": 5, "loss": 2.5}
    assert len(warnings) == 1 and ":2:" in warnings[0]


@pytest.mark.parametrize("line, why", [("garbage", "invalid JSON"), ('{"step": 2, "lo\x00ss": 1}', "invalid JSON"),
                                       ('{"loss": 1.0}', "integer `step`"), ("[1, 2]", "integer `step`"),
                                       ('{"step": true}', "integer `step`")])
def test_other_damage_is_refused_naming_file_and_line(tmp_path, line, why):
    (tmp_path / "metrics.jsonl").write_text(f'{{"step": 1, "loss": 6.0}}\n{line}\n{{"step": 3, "loss": 5.8}}\n')
    with pytest.raises(MetricsError, match=f"metrics.jsonl:2: .*{why}"):
        read_metrics(tmp_path)


def test_the_model_card_and_the_plots_read_the_same_steps(tmp_path):
    """Both go through read_metrics: a resumed run's records win in both, a cut line is skipped in
    both; damage the card cannot explain leaves the card without numbers (saying why) rather than
    failing the export."""
    from periln_megatron.hf.model_card import summarize_metrics
    from periln_megatron.training.plots import Run

    (tmp_path / "recipe.yaml").write_text("name: r\nmodel: {placement: peri, num_layers: 2}\n")
    _log(tmp_path, {"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0, "spike": "stale"}, {"step": 3, "loss": 3.0})
    _log(tmp_path, {"step": 2, "loss": 4.5})
    _kill_mid_write(tmp_path, '{"step": 3, "lo')
    run = Run(tmp_path)
    card = summarize_metrics(tmp_path / "metrics.jsonl", None)
    assert run.series("loss") == ([1, 2], [5.0, 4.5])
    assert (card.loss, card.records, card.skipped_lines, card.spikes, card.error) == ([2, 4.5], 2, 1, [], None)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\nnot json\n{"step": 2, "loss": 4.0}\n')
    card = summarize_metrics(tmp_path / "metrics.jsonl", None)
    assert card.records == 0 and "metrics.jsonl:2: invalid JSON" in card.error
