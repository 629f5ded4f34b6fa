"""`periln-ladder report GRID --eval`: each finished run exported to Hugging Face (<ladder dir>/hf/<run>:
an export never goes inside a run's directory) and scored by tools/evaluate.py (its `main`, in this
process), the result kept in <run dir>/eval.json.

What is scored: the paper's task group (`--eval-tasks`, default periln_paper: ARC, HellaSwag, PIQA,
SIQA, Winogrande, zero-shot; metric: the group's mean accuracy, higher is better) when its datasets
can be loaded. When they cannot (no network and no cache: the tool exits 2 naming the dataset) and
`--eval-text FILE` is given, every run is scored on that file's documents instead (metric: token-level
NLL in nats, lower is better), so that all runs of one report share one metric. A run evaluated
earlier with the same settings is not evaluated again; a later `report` shows what eval.json holds.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from periln_megatron.ladder.grid import Run

EVAL_FILE = "eval.json"
PAPER_GROUP = "periln_paper"


class LadderEvalError(Exception):
    """One line for the user: periln-ladder exits 2."""


@dataclass(frozen=True)
class Score:
    metric: str       # "<group> acc" or "<file> token NLL"
    value: float
    higher_is_better: bool


def _read_eval(run_dir: Path) -> tuple[dict | None, Score | None]:
    """(the settings, the score) of <run dir>/eval.json; (None, None) when it is missing or damaged."""
    path = Path(run_dir) / EVAL_FILE
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
        s = data["score"]
        return data.get("settings"), Score(s["metric"], float(s["value"]), bool(s["higher_is_better"]))
    except (ValueError, KeyError, TypeError):
        return None, None


def read_score(run_dir: Path) -> Score | None:
    return _read_eval(run_dir)[1]


def export_dir(run: Run) -> Path:
    """<ladder dir>/hf/<run name> (runs are <ladder dir>/<run name>)."""
    return run.dir.parent / "hf" / run.name


def _export(run: Run, say) -> Path:
    from periln_megatron.hf import run_tool
    from periln_megatron.hf.export import convert_to_hf

    hf = export_dir(run)
    if (hf / "config.json").is_file():
        return hf
    say(f"{run.name}: exporting to {hf}")
    code = run_tool("convert_to_hf", True, lambda log: convert_to_hf(run.dir, hf, overwrite=True, log=log))
    if code:
        raise LadderEvalError(f"{run.name}: exporting {run.dir} to {hf} failed (exit {code})")
    return hf


def _evaluate(hf: Path, argv: list[str]) -> tuple[int, dict | None, str]:
    """tools/evaluate.py HF ARGV --output <tmp>: (exit status, its JSON, its output)."""
    from periln_megatron.commands.evaluate import main as evaluate_main

    result = hf.parent / f".{hf.name}.{EVAL_FILE}.partial"
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        try:
            code = evaluate_main([str(hf), *argv, "--output", str(result)])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
    data = json.loads(result.read_text()) if code == 0 and result.is_file() else None
    result.unlink(missing_ok=True)
    return code, data, captured.getvalue()


def _task_score(data: dict, tasks: str) -> Score:
    group = data.get("groups", {}).get(tasks, {})
    if "acc,none" in group:
        return Score(f"{tasks} acc", float(group["acc,none"]), True)
    accs = [r["acc,none"] for name, r in data.get("results", {}).items() if "acc,none" in r and name != tasks]
    if not accs:
        raise LadderEvalError(f"--eval-tasks {tasks}: the results hold no accuracy to average")
    return Score(f"{tasks} mean acc", sum(accs) / len(accs), True)


def _text_score(data: dict, text: Path) -> Score:
    (stats,) = data["token_level"].values()
    return Score(f"{text.name} token NLL", float(stats["token_nll"]), False)


def evaluate_runs(runs: list[Run], tasks: str = PAPER_GROUP, text: Path | None = None, say=print) -> dict[str, Score]:
    """Export and score each of `runs` (the finished ones); run name -> its score, also in <run dir>/eval.json."""
    settings = {"tasks": tasks, "text": str(text) if text else None}
    use_text = not tasks
    if use_text and text is None:
        raise LadderEvalError("--eval needs --eval-tasks or --eval-text")
    scores: dict[str, Score] = {}
    for run in runs:
        kept_settings, kept = _read_eval(run.dir)
        if kept is not None and kept_settings == settings:
            scores[run.name] = kept
            continue
        hf = _export(run, say)
        score = None
        if not use_text:
            say(f"{run.name}: evaluating {tasks}")
            code, data, output = _evaluate(hf, ["--tasks", tasks])
            if code == 0:
                score = _task_score(data, tasks)
            elif text is None:
                raise LadderEvalError(f"{run.name}: tools/evaluate.py --tasks {tasks} failed (exit {code}): "
                                      f"{_last_line(output)}; give --eval-text FILE to score local documents instead")
            else:
                say(f"--eval-tasks {tasks} cannot be evaluated here ({_last_line(output)}): every run is scored "
                    f"on {text} instead")
                use_text = True
        if score is None:
            say(f"{run.name}: scoring {text}")
            code, data, output = _evaluate(hf, ["--text-file", str(text)])
            if code != 0:
                raise LadderEvalError(f"{run.name}: tools/evaluate.py --text-file {text} failed (exit {code}): "
                                      f"{_last_line(output)}")
            score = _text_score(data, text)
        (run.dir / EVAL_FILE).write_text(json.dumps({"settings": settings, "score": score.__dict__}, indent=1) + "\n")
        scores[run.name] = score
    return scores


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"
