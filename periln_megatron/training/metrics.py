"""Where a step's numbers go: one stdout line, and from rank 0 one sink per backend:

    metrics.jsonl   always: one JSON object per logged step in the run dir (the record as it is)
    TensorBoard     logging.tensorboard (default on): <run dir>/tensorboard
    W&B             logging.wandb_project set: a Weights & Biases run with the recipe as its config

TensorBoard and W&B are optional and imported only when enabled; an enabled one that is not
installed is one line (TensorBoard: a warning, training goes on; W&B: the recipe check refuses it
before training, config.py).

Both get the same scalars, named alike: every number of the record under its own key (`loss`,
`lr`, `grad_norm`, `valid_loss`, ...), and the per-layer diagnostics (lists indexed by layer) as
one key per layer, `layer_variance/layer_00`, `layer_variance/layer_01`, ... W&B groups keys by the
part before the `/`, so each diagnostic gets a section holding one ordinary line per layer over
training steps: overlaid across runs (Peri-LN vs Pre-LN) like any metric, filtered by regex, and
the same tags TensorBoard shows. At the end W&B also gets, per diagnostic, one chart over depth
(`depth/<name>`: x = layer, one line per measured step, up to DEPTH_PROFILE_STEPS of them evenly
spread, the last included): the paper's "variance over layers" picture; wandb.plot.line_series
holds a snapshot table, so it is drawn once rather than re-logged every measured step.

Reading metrics.jsonl back (read_metrics, the one reader: the model card, tools/plot_diagnostics.py
via periln_megatron/training/plots.py, tools/gpu_smoke.py's checks):

- a killed and resumed run appends to the same file, starting again at its checkpoint's step + 1.
  A record at a lower step than the last one read, or a training record (one with `loss`) at the
  step of the last training record read, starts the resumed run: from its step on, the earlier
  run's records are dropped (a step trained again is the later run's alone);
- records of one run at one step merge (the last step's training record, then its
  `final_valid_loss` record);
- a line cut off by a kill (printable text that begins like a record, `{"step": `, or is a piece of
  that beginning) is skipped with a warning naming file:line; when the resumed run's record was
  glued onto it (`{"step": 4, "lo{"step": 5, ...}`, written by older versions) that record is kept;
- any other damage is a MetricsError naming file:line: a reader that skipped it could hide or
  misplace steps;
- event records (`"event": "rollback"`, written by a stability rollback at the spiked step S; the
  run then trains again from the checkpoint's step C + 1, whose records replace the spiked run's
  from there) are not step records: read_metrics leaves them out and read_events returns them.
  They go to metrics.jsonl and stdout only; TensorBoard and W&B see the `rollbacks` count of each
  step record. W&B keeps the first value logged at a step, so steps trained again after a rollback
  (or a resume) keep the discarded run's values there; metrics.jsonl and TensorBoard have the kept run's.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import sys
from pathlib import Path

STDOUT_KEYS = (("loss", "loss {:.4f}"), ("lr", "lr {:.3e}"), ("grad_norm", "grad_norm {:.3f}"),
               ("tokens_per_s", "tok/s {:.0f}"), ("ms_per_step", "ms/step {:.0f}"), ("mfu", "mfu {:.1%}"),
               ("valid_loss", "valid_loss {:.4f}"), ("final_valid_loss", "final valid_loss {:.4f}"))

DEPTH_PROFILE_STEPS = 8  # lines per W&B depth chart
WANDB_RUN_ID_FILE = "periln_run_id"  # in <wandb dir>/wandb/: a resumed run continues the same W&B run


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def layer_series(record: dict) -> dict[str, list]:
    """The per-layer lists of a record (the diagnostics' layer_variance, layer_max_abs, ...): lists of
    numbers, None where a layer has no value (e.g. no sublayer at index 0, the embedding output).
    Lists of lists (layer_top_dims) are not series and stay in metrics.jsonl only."""
    return {k: v for k, v in record.items() if isinstance(v, list) and any(_number(x) for x in v)
            and all(_number(x) or x is None for x in v)}


def scalars(record: dict) -> dict[str, float]:
    """A record's numbers as flat scalar names: `key`, and `key/layer_NN` for per-layer lists (the
    list index: diagnostics' layer 0 is the embedding output)."""
    out = {k: v for k, v in record.items() if _number(v) and k != "step"}
    for key, values in layer_series(record).items():
        out.update({f"{key}/layer_{i:02d}": v for i, v in enumerate(values) if v is not None})
    return out


def _warn(message: str) -> None:
    print(f"periln-train: warning: {message}", file=sys.stderr, flush=True)


RECORD_START = '{"step": '  # how JsonlSink's json.dumps(record) begins


class MetricsError(ValueError):
    pass


def _lines(path: Path, warn=None):
    """(path, lineno, record) of every readable record line, by the damage rules of the module docstring."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise MetricsError(f"{path}: not found")
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            record = _appended_after_cut(line)
            if record is None and _cut_record(line):
                if warn:
                    warn(f"{path}:{lineno}: a record cut off by a killed run, skipped")
                continue
            if record is None:
                raise MetricsError(f"{path}:{lineno}: invalid JSON: {e}") from None
            if warn:
                warn(f"{path}:{lineno}: a cut-off record followed by step {record['step']}'s (appended when the run "
                     "resumed): kept that record")
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
            raise MetricsError(f"{path}:{lineno}: expected an object with an integer `step`")
        yield record


def read_metrics(path: Path, warn=None) -> dict[int, dict]:
    """step -> record of a run's metrics.jsonl (a file or a run directory), by the rule in this
    module's docstring. `warn` gets one line per skipped cut-off line. Event records (read_events)
    are left out."""
    out: dict[int, dict] = {}
    last_step = None
    for record in _lines(path, warn):
        if "event" in record:
            continue
        step = record["step"]
        if last_step is not None and (step < last_step or (step == last_step and "loss" in record
                                                             and "loss" in out.get(step, {}))):
            out = {s: r for s, r in out.items() if s < step}  # a resumed run: it owns every step from here on
        last_step = step
        out.setdefault(step, {}).update(record)
    return dict(sorted(out.items()))


def read_events(path: Path, kind: str = "rollback", warn=None) -> list[dict]:
    """The event records of one kind (`{"event": "rollback", "step": S, "to_step": C, ...}`), in order.
    A rollback is numbered by its `rollbacks` count: a run killed after writing the event but before
    the rollback was kept re-detects the spike and writes it again; the later copy is kept."""
    out: dict = {}
    for record in _lines(path, warn):
        if record.get("event") == kind:
            key = record.get("rollbacks", len(out))
            out.pop(key, None)
            out[key] = record
    return list(out.values())


def rollback_counts(run_dir: Path) -> tuple[int, int]:
    """(rollbacks, global batches they skipped) of a run; (0, 0) without a metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0, 0
    events = read_events(path)
    return len(events), sum(int(e.get("skipped_batches") or 0) for e in events)


def _cut_record(line: str) -> bool:
    """A line a kill cut short: what json.dumps(record) writes (printable), up to some point."""
    return line.isprintable() and (line.startswith(RECORD_START) or RECORD_START.startswith(line))


def _appended_after_cut(line: str) -> dict | None:
    """The record a resumed run appended to a line cut off by a kill (`{"step": 4, "lo{"step": 5, ...}`)."""
    start = line.rfind(RECORD_START)
    if start <= 0 or not line.startswith(RECORD_START):
        return None
    try:
        record = json.loads(line[start:])
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def series(records: dict[int, dict], key: str) -> dict[int, float]:
    """step -> the number logged under `key` (steps without it left out)."""
    return {s: r[key] for s, r in records.items() if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)}


class JsonlSink:
    def __init__(self, run_dir: Path):
        path = Path(run_dir) / "metrics.jsonl"
        self.file = open(path, "a+b")
        if self.file.tell():  # a killed run may have cut its last line: start a new one, never glue onto it
            self.file.seek(-1, 2)
            if self.file.read(1) != b"\n":
                self.file.write(b"\n")
        self.file.close()
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per run dir: its id is kept in <dir>/wandb/periln_run_id, and a run that resumes
    from a checkpoint (start_step > 0) continues that W&B run (resume="allow"); a fresh start gets a
    new one. `step` is the training iteration (W&B's x axis), as Megatron-LM logs it."""

    def __init__(self, recipe, run_dir: Path, start_step: int = 0):
        try:
            import wandb
        except ImportError:
            raise RuntimeError("logging.wandb_project is set but wandb is not installed: pip install wandb") from None
        self.wandb = wandb
        log = recipe.logging
        root = Path(log.wandb_dir or run_dir)
        (root / "wandb").mkdir(parents=True, exist_ok=True)
        id_file = root / "wandb" / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if start_step > 0 and id_file.is_file() else ""
        if not run_id:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as wandb's
            id_file.write_text(run_id + "\n")
        kwargs = dict(project=log.wandb_project, entity=log.wandb_entity, name=log.wandb_name or recipe.name,
                      dir=str(root), config=recipe.to_dict(), id=run_id, resume="allow")
        if log.wandb_mode:  # else wandb's own default: $WANDB_MODE, then online
            kwargs["mode"] = log.wandb_mode
        try:
            self.run = wandb.init(**kwargs)
        except Exception as e:  # noqa: BLE001 - e.g. online without an API key
            mode = log.wandb_mode or os.environ.get("WANDB_MODE", "online")
            raise RuntimeError(f"logging.wandb_project={log.wandb_project}: wandb.init ({mode}) failed: "
                               f"{' '.join(str(e).split())} (to log without a connection: logging.wandb_mode: "
                               "offline, then `wandb sync`)") from e
        self.profiles: dict[str, list[tuple[int, list[float]]]] = {}
        self.last_step = start_step

    def write(self, record: dict) -> None:
        step = record["step"]
        self.last_step = max(self.last_step, step)
        for key, values in layer_series(record).items():
            self.profiles.setdefault(key, []).append((step, list(values)))
        values = scalars(record)
        if values:
            self.run.log(values, step=step)

    def depth_charts(self) -> dict:
        charts = {}
        for key, measured in self.profiles.items():
            n = len(measured)
            picks = sorted({round(i * (n - 1) / (DEPTH_PROFILE_STEPS - 1)) for i in range(DEPTH_PROFILE_STEPS)}) \
                if n > DEPTH_PROFILE_STEPS else range(n)
            chosen = [measured[i] for i in picks]
            points = [[(i, x) for i, x in enumerate(v) if x is not None] for _, v in chosen]
            charts[f"depth/{key}"] = self.wandb.plot.line_series(
                xs=[[i for i, _ in p] for p in points], ys=[[x for _, x in p] for p in points],
                keys=[f"step {s}" for s, _ in chosen], title=f"{key} over depth", xname="layer")
        return charts

    def close(self) -> None:
        try:
            charts = self.depth_charts()
            if charts:
                self.run.log(charts, step=self.last_step)
        finally:
            self.run.finish()


class MetricsLog:
    """`enabled` only on rank 0: other ranks construct it and log nothing. `recipe` (optional) turns on
    W&B when recipe.logging.wandb_project is set; `start_step`: the iteration the run starts from (> 0
    when resumed from a checkpoint)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, total_steps: int | None = None,
                 recipe=None, start_step: int = 0):
        self.enabled = enabled
        self.total_steps = total_steps
        self.sinks: list = []
        if not enabled:
            return
        self.sinks.append(JsonlSink(run_dir))
        if tensorboard:
            try:
                self.sinks.append(TensorBoardSink(run_dir))
            except ImportError:
                _warn("logging.tensorboard is true but tensorboard is not installed (pip install tensorboard); "
                      "metrics go to metrics.jsonl only")
        if recipe is not None and recipe.logging.wandb_project:
            try:
                self.sinks.append(WandbSink(recipe, run_dir, start_step))
            except BaseException:
                self.close()
                raise

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        step = record["step"]
        parts = [f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}"]
        parts += [fmt.format(record[k]) for k, fmt in STDOUT_KEYS if k in record]
        if record.get("skipped"):
            parts.append("skipped (fp16 overflow)")
        if record.get("spike"):
            parts.append(f"SPIKE: {record['spike']}")
        print(" | ".join(parts), flush=True)
        for sink in self.sinks:
            sink.write(record)

    def event(self, record: dict) -> None:
        """An event record (a rollback): one stdout line and metrics.jsonl."""
        if not self.enabled:
            return
        print(f"step {record['step']}: {record['event']}: " + ", ".join(
            f"{k} {v}" for k, v in record.items() if k not in ("event", "step")), flush=True)
        for sink in self.sinks:
            if isinstance(sink, JsonlSink):
                sink.write(record)

    def close(self) -> None:
        """Close every sink; one that fails is a warning (close runs in the trainer's `finally`, where
        raising would hide the error that ended training)."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001
                _warn(f"closing {type(sink).__name__} failed: {' '.join(str(e).split())}")
