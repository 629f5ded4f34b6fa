"""The README.md model card tools/convert_to_hf.py writes next to the weights.

Everything in it is read from the export itself: the architecture and parameter count from the
tensors written, the recipe from the checkpoint's recipe.yaml (embedded verbatim), and the
losses and diagnostics from the run's metrics.jsonl, up to the exported iteration. The metrics
file is looked for in the checkpoint root (usually the run dir), then in the recipe's
`logging.run_dir` and `checkpoint.dir` as the training run recorded them, or where `--metrics`
says; without one the card says the metrics are unavailable and where it looked.
"""

from __future__ import annotations

import math
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from periln_megatron.config.choices import PLACEMENT_NAMES

METRICS_FILE = "metrics.jsonl"

PLACEMENT_FORMULA = {
    "peri": "`h = x + Norm(F(Norm(x)))` around attention and around the MLP (input and output norm), "
            "final norm before the LM head",
    "pre": "`h = x + F(Norm(x))` (input norm only), final norm before the LM head",
    "post": "`h = Norm(x + F(x))`, no final norm",
    "output": "`h = x + Norm(F(x))` (output norm only), final norm before the LM head",
}
HF_CLASS = {"hyperclovax": "HyperCLOVAXForCausalLM", "llama": "LlamaForCausalLM"}


# ------------------------------------------------------------------------------ metrics.jsonl

def metrics_candidates(iter_dir: Path, recipe) -> list[Path]:
    """Where a run's metrics.jsonl may be, in the order tried: the checkpoint root (iter_dir's
    parent, the run dir unless logging.run_dir moved it), then logging.run_dir and checkpoint.dir as
    recorded in the recipe (relative ones as given, i.e. from the current directory)."""
    dirs = [Path(iter_dir).parent]
    for recorded in (recipe.logging.run_dir, recipe.checkpoint.dir):
        if recorded:
            dirs.append(Path(recorded))
    out, seen = [], set()
    for d in dirs:
        key = d.resolve()
        if key not in seen:
            seen.add(key)
            out.append(d / METRICS_FILE)
    return out


def find_metrics(iter_dir: Path, recipe, explicit: Path | None = None) -> tuple[Path | None, list[Path]]:
    """(the metrics.jsonl to read or None, the paths tried). `explicit` (a file or a run dir) must exist."""
    if explicit is not None:
        path = Path(explicit)
        if path.is_dir():
            path = path / METRICS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such metrics file (--metrics)")
        return path, [path]
    tried = metrics_candidates(iter_dir, recipe)
    return next((p for p in tried if p.is_file()), None), tried


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class MetricsSummary:
    """What the card reports from metrics.jsonl, for records at or before the exported iteration."""

    source: str
    iteration: int | None  # None: unknown (records of every step count)
    records: int = 0  # steps with a record, up to the iteration
    skipped_lines: int = 0  # cut off by a killed run
    error: str | None = None  # metrics.jsonl refused (damage a kill cannot explain): no numbers
    last_step: int | None = None
    loss: list | None = None  # [step, value]
    valid_loss: list | None = None
    final_valid_loss: list | None = None
    diagnostics: dict | None = None
    spikes: list = field(default_factory=list)  # [step, message]
    # stability rollbacks the exported weights went through: [spiked step, step rolled back to, [first, last] batches skipped]
    rollbacks: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _last(records: dict[int, dict], key: str) -> list | None:
    for step in reversed(records):
        if _number(records[step].get(key)):
            return [step, records[step][key]]
    return None


def summarize_metrics(path: Path, iteration: int | None) -> MetricsSummary:
    """The card's numbers from metrics.jsonl read by the one reader (periln_megatron/training/metrics.py:
    a resumed run's records replace the killed run's, cut-off lines are skipped and counted). A file it
    refuses gives no numbers but `error`: the export goes on, the card says why."""
    from periln_megatron.training.metrics import MetricsError, read_events, read_metrics

    cut: list[str] = []
    source = str(Path(path).resolve())
    try:
        everything = read_metrics(path, warn=cut.append)
        events = read_events(path)
    except MetricsError as e:
        return MetricsSummary(source=source, iteration=iteration, error=str(e))
    records = {s: r for s, r in everything.items() if iteration is None or s <= iteration}
    summary = MetricsSummary(source=source, iteration=iteration, records=len(records),
                             skipped_lines=len(cut), last_step=max(records) if records else None)
    summary.loss = _last(records, "loss")
    summary.valid_loss = _last(records, "valid_loss")
    summary.final_valid_loss = _last(records, "final_valid_loss")
    summary.spikes = [[s, r["spike"]] for s, r in records.items() if isinstance(r.get("spike"), str)]
    # a rollback to the exported iteration or later happened after these weights were saved
    summary.rollbacks = [[e["step"], e.get("to_step"), e.get("skip")] for e in events
                         if iteration is None or (isinstance(e.get("to_step"), int) and e["to_step"] < iteration)]
    for step in reversed(records):
        variance, max_abs = records[step].get("layer_variance"), records[step].get("layer_max_abs")
        if isinstance(variance, list) and isinstance(max_abs, list) and variance and _number(variance[-1]):
            peak = max((i for i, v in enumerate(max_abs) if _number(v)), key=lambda i: max_abs[i], default=None)
            summary.diagnostics = {
                "step": step,
                "num_layers": len(variance) - 1,  # index 0 is the embedding output
                "last_layer_variance": variance[-1],
                "last_layer_max_abs": max_abs[-1] if _number(max_abs[-1]) else None,
                "embedding_variance": variance[0] if _number(variance[0]) else None,
                "peak_max_abs": max_abs[peak] if peak is not None else None,
                "peak_max_abs_layer": peak,
            }
            break
    return summary


# ------------------------------------------------------------------------------ provenance

def project_version() -> str:
    try:
        from periln_megatron import __version__

        return __version__
    except ImportError:
        from importlib.metadata import version

        return version("periln-megatron")


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_revision() -> str | None:
    """The commit of the periln-megatron checkout this runs from ("+ local changes" when dirty), or None."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + (" + local changes" if dirty else "")


def command_line(argv: list[str] | None = None) -> str:
    """As it was typed: `python tools/convert_to_hf.py ...`, or `periln-convert-to-hf ...` (a console script)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and not argv[0].endswith(".py"):
        return shlex.join([Path(argv[0]).name, *argv[1:]])
    return shlex.join(["python", *argv])


# ------------------------------------------------------------------------------ card

def _fmt(x, digits: int = 6) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    return f"{x:.{digits}g}"


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def _fence(text: str, lang: str) -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


def render_card(*, recipe, recipe_yaml: str, arch: str, hf_config: dict, shape, params: int, embedding_params: int,
                padded_vocab: int, iter_dir: Path, iteration: int | None, tokenizer: dict,
                metrics: MetricsSummary | None, metrics_tried: list[Path], command: str) -> str:
    import yaml

    m, t, o = recipe.model, recipe.train, recipe.optim
    name, formula = PLACEMENT_NAMES[shape.placement], PLACEMENT_FORMULA[shape.placement]
    recorded = yaml.safe_load(recipe_yaml) or {}
    data = recorded.get("data") or {}
    hf_class = HF_CLASS.get(arch, arch)
    arch_note = f"`{hf_class}` (`model_type: {hf_config['model_type']}`" + (
        ", `use_post_norm: true`)" if hf_config.get("use_post_norm") else ")")
    at_iteration = "(iteration unknown)" if iteration is None else f"of iteration {iteration:,}"
    up_to = "" if iteration is None else f" at or before iteration {iteration:,}"

    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        f"- {name.lower()}",
        "- megatron-core",
        "- periln-megatron",
        "---",
        "",
        f"# {recipe.name}",
        "",
        f"A {name} causal language model trained with periln-megatron {project_version()} on megatron-core"
        f"{' ' + core if (core := _package_version('megatron-core')) else ''} and converted to {arch_note} from the torch_dist checkpoint {at_iteration}.",
        "",
        "## Architecture",
        "",
        _table([
            ("architecture", arch_note),
            ("norm placement", f"{name}: {formula}"
             + ("; embedding output normalised" if m.embedding_norm else "; no embedding norm")),
            ("normalization", f"{m.normalization}, eps {shape.eps:g}"),
            ("parameters", f"{params:,} (the exported tensors; {params - embedding_params:,} without the "
                           f"embedding{' and LM head' if not shape.tied else ''})"),
            ("layers / hidden / FFN", f"{shape.num_layers} / {shape.hidden} / {shape.ffn} (SwiGLU)"),
            ("attention heads / KV heads / head dim", f"{shape.heads} / {shape.groups} / {shape.head_dim}"),
            ("vocabulary", f"{shape.vocab:,} (padded to {padded_vocab:,} rows in training, trimmed here)"),
            ("context", f"{shape.seq_length:,} tokens, RoPE base {shape.rotary_base:g}"),
            ("embeddings", "tied to the LM head" if shape.tied else "untied from the LM head"),
            ("dtype", f"{hf_config['dtype']} (trained with precision preset {recipe.precision.preset})"),
        ]),
        "",
        "## Training",
        "",
    ]
    tok_rows = [("tokenizer", tokenizer["description"])]
    if tokenizer.get("special"):
        tok_rows.append(("special tokens", ", ".join(f"{k} {v}" for k, v in sorted(tokenizer["special"].items()))))
    if data.get("synthetic"):
        data_text = "synthetic random tokens"
    else:
        data_text = ", ".join(f"`{p}`" for p in data.get("prefixes") or []) or "n/a"
        if data.get("split"):
            data_text += f" (split {data['split']})"
    load = recorded.get("checkpoint", {}).get("load")
    if iteration is None:
        tokens_text = f"unknown: the checkpoint directory is not named iter_NNNNNNN ({t.global_batch_size:,} " \
                      f"sequences x {m.seq_length:,} tokens per step)"
    else:
        tokens_text = (f"{iteration * t.global_batch_size * m.seq_length:,} = {iteration:,} steps x "
                       f"{t.global_batch_size:,} sequences x {m.seq_length:,} tokens")
    tokens_text += f" (recipe: {t.steps:,} steps)" + (f"; started from `{load}`, whose tokens are not counted"
                                                      if load else "")
    tok_rows += [
        ("training tokens", tokens_text),
        ("data", data_text),
        ("optimizer", f"AdamW (betas {o.adam_beta1:g}, {o.adam_beta2:g}), lr {o.lr:g} -> {o.min_lr:g} "
                      f"({o.decay_style}, {o.warmup_steps:,} warmup steps"
                      + (f", decay over {o.decay_steps:,} steps" if o.decay_steps else "")
                      + f"), weight decay {o.weight_decay:g}, "
                      f"gradient clipping {o.clip_grad:g}"),
        ("parallel layout", f"TP {recipe.parallel.tp}, PP {recipe.parallel.pp} (any layout exports the same)"),
    ]
    lines += [_table(tok_rows), "", "### Losses and diagnostics", ""]
    if metrics is None:
        lines += ["Metrics unavailable: no metrics.jsonl was found (looked for "
                  + ", ".join(f"`{p}`" for p in metrics_tried) + ").", ""]
    elif metrics.error:
        lines += [f"Metrics unavailable: {metrics.error}.", ""]
    elif metrics.records == 0:
        lines += [f"Metrics unavailable: `{metrics.source}` has no record{up_to}.", ""]
    else:
        def at(value, what):
            return (what, "n/a" if value is None else f"{_fmt(value[1])} (step {value[0]:,})")

        rows = [at(metrics.loss, "training loss"), at(metrics.valid_loss, "validation loss"),
                at(metrics.final_valid_loss, "final validation loss (end of run)")]
        d = metrics.diagnostics
        if d:
            last = d["num_layers"]
            rows += [
                (f"residual variance after layer {last} (last)", f"{_fmt(d['last_layer_variance'])} (step {d['step']:,})"),
                (f"max abs activation after layer {last} (last)", f"{_fmt(d['last_layer_max_abs'])} (step {d['step']:,})"),
                ("residual variance of the embedding output", _fmt(d["embedding_variance"])),
                ("largest max abs activation over depth",
                 "n/a" if d["peak_max_abs"] is None else
                 f"{_fmt(d['peak_max_abs'])} at {'the embedding output' if d['peak_max_abs_layer'] == 0 else 'layer ' + str(d['peak_max_abs_layer'])}"),
            ]
        else:
            rows.append(("diagnostics", "none recorded (diagnostics.interval was 0, or no measured step yet)"))
        rows.append(("loss / grad-norm spikes flagged", f"{len(metrics.spikes)}"
                     + (f" (last: step {metrics.spikes[-1][0]:,}, {metrics.spikes[-1][1]})" if metrics.spikes else "")))
        if metrics.rollbacks:
            skipped = sum(w[1] - w[0] + 1 for _, _, w in metrics.rollbacks
                          if isinstance(w, list) and len(w) == 2 and all(_number(x) for x in w))
            rows.append(("stability rollbacks", f"{len(metrics.rollbacks)} ({skipped:,} global batches skipped; last: "
                         f"step {metrics.rollbacks[-1][0]:,} back to {metrics.rollbacks[-1][1]:,})"))
        else:
            rows.append(("stability rollbacks", "0"))
        lines += [_table(rows), "",
                  f"From `{metrics.source}`: the last value of each{up_to} "
                  f"({metrics.records:,} logged steps"
                  + (f"; {metrics.skipped_lines} unreadable line(s) skipped" if metrics.skipped_lines else "")
                  + "). Diagnostics are those of the last measured step (`diagnostics.interval`): layer 0 is "
                  "the embedding output, layer n the residual stream after layer n.", ""]
    lines += ["## Recipe", "", "The recipe that wrote the checkpoint (`recipe.yaml` beside its weights):", "",
              _fence(recipe_yaml, "yaml"), "", "## Provenance", ""]
    prov = [("periln-megatron", project_version())]
    rev = git_revision()
    if rev:
        prov.append(("periln-megatron commit", f"`{rev}`"))
    for pkg in ("megatron-core", "torch", "transformers"):
        v = _package_version(pkg)
        if v:
            prov.append((pkg, v))
    prov += [("source checkpoint", f"`{Path(iter_dir).resolve()}` ("
              + ("iteration unknown" if iteration is None else f"iteration {iteration:,}") + ")"),
             ("metrics", f"`{metrics.source}`" if metrics else "unavailable")]
    lines += [_table(prov), "", "Converted with:", "", _fence(command, "bash"), ""]
    return "\n".join(lines)
