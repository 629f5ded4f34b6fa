"""report.md and summary.json: the ladder's report of the demo's runs (demo/ladder.py) with the demo's
sections around it: the setting, warnings, the findings, per-layer tables, where the massive
activations sit, losses and stability per run, the parallelism check, plots and the export check."""

from __future__ import annotations

import json
from pathlib import Path

from periln_megatron.demo.console import fmt_time
from periln_megatron.demo.corpus import PROMPT_WORDS, CorpusStats
from periln_megatron.demo.findings import Finding, peak, run_figures
from periln_megatron.demo.machine import GEMM_SIZE
from periln_megatron.demo.sample import SAMPLE_TOKENS
from periln_megatron.demo.summary import PLACEMENTS, RunSummary
from periln_megatron.ladder.grid import Grid
from periln_megatron.ladder.report import RunResult
from periln_megatron.ladder.report import write_report as write_ladder_report

OVERFIT_RISE = 0.02      # nats: a validation loss this far above its minimum has risen
MAX_EPOCHS = 2.0
NEAR_COPY = 0.5          # a training document holding half of the prompt document's 8-grams is a near-copy of it

# --preset long: 3000 steps of 8 x 128 tokens, measured on the default corpus (docs/demo_search.md)
LONG_PRESET_TOKENS = 3000 * 8 * 128
LONG_PRESET_CORPUS_TOKENS = 366_086
HOW_JUDGED = ("Each verdict is computed by periln_megatron/verdicts/ from the numbers printed after it: **shown** "
              "when they favour the paper's claim beyond the stated margin or significance level, **contradicted** "
              "when they point the other way beyond it, **not shown** otherwise (within the noise, or the noise is "
              "unknown). Depth figures need a factor of 2 either way; losses a gap beyond 2 standard deviations of "
              "the difference, from the measured seed-to-seed spread; the seed variance and stability tests "
              "p <= 0.05.")


def long_preset_hint(stats: CorpusStats, default_corpus: bool) -> str:
    """The `--preset long` hint, saying which corpus it was measured on and, for another, how many epochs
    it would be there."""
    hint = ("`make demo DEMO_ARGS=\"--preset long\"` (12 x 96, 3000 steps of 8 x 128) gave a non-degenerate sample "
            f"on the default corpus (the standard library's docstrings, {LONG_PRESET_CORPUS_TOKENS:,} training "
            f"tokens at vocabulary 2000: {LONG_PRESET_TOKENS / LONG_PRESET_CORPUS_TOKENS:.1f} epochs; about 17 "
            "minutes on 2 idle cores)")
    if default_corpus:
        return hint + "."
    epochs = LONG_PRESET_TOKENS / max(stats.train_tokens, 1)
    return hint + (f"; it was not measured on this corpus, where its {LONG_PRESET_TOKENS:,} tokens would be "
                   f"{epochs:.1f} epochs of the {stats.train_tokens:,} training tokens.")


def _g(x, spec=".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def warnings(runs: list[RunSummary], stats: CorpusStats, tokens_per_step: int, eval_iters: int | None = None
             ) -> list[str]:
    out = []
    if eval_iters is not None and stats.valid_tokens < tokens_per_step * eval_iters:
        out.append(f"The validation split ({stats.valid_tokens:,} tokens) is smaller than one evaluation pass "
                   f"({eval_iters} x {tokens_per_step:,} = {eval_iters * tokens_per_step:,} tokens): its sequences "
                   "are resampled to fill the pass, so some tokens count more than once and which ones depends on "
                   "the seed. Give more text for a validation loss over distinct tokens.")
    for steps in sorted({r.steps for r in runs}):
        epochs = steps * tokens_per_step / max(stats.train_tokens, 1)
        if epochs > MAX_EPOCHS:
            out.append(f"{steps} steps x {tokens_per_step} tokens = {steps * tokens_per_step:,} tokens is {epochs:.1f} "
                       f"epochs over the training split ({stats.train_tokens:,} tokens): the corpus is too small for "
                       f"the steps (more than {MAX_EPOCHS:g} epochs); the models see the same text repeatedly and "
                       "the validation loss measures memorisation as much as learning. Give more text or fewer --steps.")
    for r in runs:
        if len(r.valid_curve) < 2:
            continue
        best_step, best = min(r.valid_curve, key=lambda sv: sv[1])
        last_step, last = r.valid_curve[-1]
        train_then = [l for s, l in r.train_curve if s <= best_step][-1:]
        train_now = [l for s, l in r.train_curve if s <= last_step][-1:]
        if last > best + OVERFIT_RISE and train_then and train_now and train_now[0] < train_then[0]:
            out.append(f"{r.label} (lr {r.lr:g}, seed {r.seed}): validation loss rose from {best:.4f} (step {best_step}) "
                       f"to {last:.4f} (step {last_step}) while training loss fell from {train_then[0]:.4f} to "
                       f"{train_now[0]:.4f}: it is overfitting.")
    return out


def layer_table(peri: RunSummary, pre: RunSummary) -> list[str]:
    lines = ["| layer | variance Peri-LN | variance Pre-LN | max\\|act\\| Peri-LN | max\\|act\\| Pre-LN | "
             "attn / MLP out RMS Peri-LN | attn / MLP out RMS Pre-LN | out-norm gain attn / MLP (Peri-LN) |",
             "|---|---|---|---|---|---|---|---|"]
    n = max(len(peri.layer("layer_variance")), len(pre.layer("layer_variance")))

    def at(run, key, i):
        values = run.layer(key)
        return values[i] if i < len(values) else None

    for i in range(n):
        name = "0 (embedding)" if i == 0 else str(i)
        sub = lambda r: "-" if i == 0 else f"{_g(at(r, 'attn_out_rms', i))} / {_g(at(r, 'mlp_out_rms', i))}"  # noqa: E731
        gain = "-" if i == 0 else f"{_g(at(peri, 'attn_out_gain', i))} / {_g(at(peri, 'mlp_out_gain', i))}"
        lines.append(f"| {name} | {_g(at(peri, 'layer_variance', i))} | {_g(at(pre, 'layer_variance', i))} | "
                     f"{_g(at(peri, 'layer_max_abs', i), '.4g')} | {_g(at(pre, 'layer_max_abs', i), '.4g')} | "
                     f"{sub(peri)} | {sub(pre)} | {gain} |")
    return lines


def activation_lines(run: RunSummary) -> list[str]:
    k = peak(run)
    if k is None:
        return [f"- {run.label}: no per-layer measurement."]
    top = ", ".join(f"{d} ({s:.1%})" for d, s in (k["top_dims"] or []))
    line = (f"- {run.label}: the largest |activation| is {k['value']:.4g} at layer {k['layer']}, hidden dimension "
            f"{k['dim']}. The dimensions with the largest share of that layer's sum of squares: {top}"
            + (f", together {sum(s for _, s in k['top_dims']):.1%} (an even spread over {run.hidden} dimensions "
               f"gives each {1 / run.hidden:.1%})." if k["top_dims"] else "."))
    line += f" The residual stream's max|act| reaches half of that at layer {k['half_layer']}."
    if k["write"]:
        line += (f" The largest single write is layer {k['write']['layer']}'s {k['write']['sublayer']} output, "
                 f"max|act| {k['write']['value']:.4g} before the residual add.")
    sumsq = run.layer("layer_max_token_sumsq")
    maxes = run.layer("layer_max_abs")
    over = [i for i, v in enumerate(sumsq) if v is not None and v > 65504]
    line += (f" fp16 headroom: max|act| is {max(m for m in maxes if m is not None) / 65504:.2%} of 65504; "
             + (f"a token's sum of squares exceeds 65504 (an fp16 norm that sums squares in fp16 overflows) "
                f"from layer {over[0]} on (largest {max(sumsq):.4g})." if over else
                f"no token's sum of squares exceeds it (largest {max(v for v in sumsq if v is not None):.4g})."))
    return [line]


def stability_table(runs: list[RunSummary]) -> list[str]:
    """Per run: the stability figures the stability verdict ranks and prints, and the trainer's spikes."""
    lines = ["| run | lr | seed | steps | status | final train loss | final validation loss | steps above the "
             "initial loss after warm-up | peak loss (step) | back below by step | largest grad norm / running "
             "median (step) | max\\|act\\| over training | trainer's spikes (loss / grad norm) | rollbacks "
             "(batches skipped) | wall / CPU time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        f = run_figures(r)
        status = r.status + (f" ({r.message})" if r.message else "")
        fp16 = " (above fp16's 65504)" if f["fp16"] else ""
        above = "diverged" if r.status == "diverged" else f"{f['above']} of {f['after']}"
        recovered = "-" if not f.get("excursion") else (f["recovered"] if f["recovered"] is not None else "never")
        spikes = (f"{sum('loss' in m for _, m in r.spikes)} / {sum('grad_norm' in m for _, m in r.spikes)}")
        lines.append(f"| {r.label} | {r.lr:g} | {r.seed} | {r.steps} | {status} | {_g(r.train_loss, '.4f')} | "
                     f"{_g(r.valid_loss, '.4f')} | {above} | {_g(f['peak'], '.4g')} "
                     f"({f.get('peak_step') or '-'}) | {recovered} | {_g(f['spike'])} ({f['spike_step'] or '-'}) | "
                     f"{_g(r.peak_act, '.4g')}{fp16} | {spikes} | {r.rollbacks} ({r.skipped_batches}) | "
                     f"{fmt_time(r.wall_s) if r.wall_s else 'n/a'} / {fmt_time(r.cpu_s) if r.cpu_s else 'n/a'} |")
    return lines


def rollback_lines(runs: list[RunSummary]) -> list[str]:
    """Rollbacks per model over its runs (what `--on-spike rollback` counts); nothing when none happened."""
    if not any(r.rollbacks for r in runs):
        return []
    parts = []
    for placement, label in PLACEMENTS:
        mine = [r for r in runs if r.placement == placement]
        if mine:
            parts.append(f"{label} {sum(r.rollbacks for r in mine)} rollbacks, "
                         f"{sum(r.skipped_batches for r in mine)} batches skipped over {len(mine)} runs")
    return ["Rollbacks (stability.on_spike: rollback): " + "; ".join(parts) + ".", ""]


def export_check(sample: dict, stats: CorpusStats, default_corpus: bool) -> list[str]:
    """The export check: the Hugging Face export generates, whether the sample is degenerate, the prompt
    and how much of its document the training text already holds."""
    lines = ["## Export check", "",
             f"{sample['model']} from `{sample['dir']}/`, loaded with stock transformers. Prompt: the first "
             f"{PROMPT_WORDS} words of document {sample['doc']} (counted from 0) of `heldout.jsonl`, the held-back "
             f"documents (the first to start with {PROMPT_WORDS} plain words, or to be long enough if none does): "
             f"{sample['prompt']!r}; the document goes on {sample['truth']!r}.", ""]
    dup = sample.get("near_duplicate")
    if dup and dup["share"] is not None:
        found = (f"{dup['share']:.0%} of its {dup['ngrams']} word {dup['n']}-grams occur in training document "
                 f"{dup['doc']} (counted from 0 in `corpus.jsonl`), {dup['anywhere']:.0%} somewhere in the training "
                 "text" if dup["doc"] is not None else f"none of its {dup['ngrams']} word {dup['n']}-grams occurs in "
                 "the training text")
        verdict = (": a near-copy of the prompt's document was trained on, so the continuation can be recall"
                   if dup["share"] >= NEAR_COPY else f" (under {NEAR_COPY:.0%} in any one document: no near-copy)"
                   if dup["doc"] is not None else "")
        lines += [f"Near-duplicate check of the prompt's document: {found}{verdict}.", ""]
    elif dup:
        lines += [f"Near-duplicate check: the prompt's document has fewer than {dup['n']} words, nothing to compare.",
                  ""]
    lines += [f"Greedy, {SAMPLE_TOKENS} new tokens (`</s>` ends a document; generation goes on past it): "
              f"{sample['text']!r}", "",
              "Non-degenerate: " + (f"no ({sample['degenerate']}). {long_preset_hint(stats, default_corpus)}"
                                    if sample["degenerate"] else
                                    f"yes: no token a third of the {sample['new_tokens']} new tokens, fewer than a "
                                    "quarter of their 3-grams repeated, no loop of up to 4 tokens at the end."), ""]
    return lines


def write_report(out: Path, args, runs: list[RunSummary], findings: list[Finding], stats: CorpusStats,
                 sample: dict | None, check: dict | None, plots: list[Path], timing: dict, grid: Grid,
                 results: list[RunResult]) -> Path:
    """report.md: the ladder's report of the demo's grid (the loss table, best learning rates, per-run
    numbers, plots across runs, summary.csv), headed by the demo's setting and warnings and followed by
    its findings and checks; and summary.json."""
    tokens_per_step = args.batch * args.seq_length
    main = {p: next((r for r in runs if r.placement == p and r.run_dir.name == p), None) for p, _ in PLACEMENTS}
    peri, pre = main["peri"], main["pre"]
    seen = args.steps * tokens_per_step
    gemm = timing.get("gemm_gflops")
    lines = [f"Corpus: {args.corpus_note}; {stats.documents} documents, {stats.tokens:,} tokens "
             f"(SentencePiece BPE, vocabulary {args.vocab_size}); training split {stats.train_tokens:,} tokens "
             f"in {stats.train_documents} documents, validation split {stats.valid_tokens:,} tokens.",
             f"Models: {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, {args.heads} heads "
             f"({args.groups} KV groups), sequence length {args.seq_length}; lr {args.lr:g} (cosine to lr/10, "
             f"warm-up {max(args.steps // 10, 1)} steps), "
             + (f"gradient clipping {args.clip_grad:g}" if args.clip_grad else "no gradient clipping")
             + ", same data order and initialisation seed for both.",
             f"Training: {args.steps} steps of {args.batch} x {args.seq_length} = {tokens_per_step:,} tokens: "
             f"{seen:,} tokens seen, {seen / max(stats.train_tokens, 1):.2f} epochs over the training split.",
             f"Reference: a context-free model (the training split's unigram frequencies) scores "
             f"{stats.unigram_valid_loss:.4f} nats on the validation split.",
             f"Wall time {fmt_time(timing['wall_s'])}, CPU time {fmt_time(timing['cpu_s'])} (user + system, all "
             f"processes) on {timing['cores']} cores, {args.jobs} training processes at a time; stages: "
             + ", ".join(f"{k} {fmt_time(v)}" for k, v in timing["stages_s"].items()) + ". "
             + (f"The load average over the last 5 minutes was {timing['load_average']:g}, above the {timing['cores']} "
                "cores: other processes competed for them, so the wall time is longer than on an idle machine."
                if timing["load_average"] > timing["cores"] else
                f"The load average over the last 5 minutes was {timing['load_average']:g}.")
             + (f" Matmul throughput of this machine: {gemm:.1f} GFLOP/s (fp32 {GEMM_SIZE} x {GEMM_SIZE} GEMM, one "
                "thread), to compare timings across machines." if gemm else ""), ""]
    warn = warnings(runs, stats, tokens_per_step, getattr(args, "eval_iters", None))
    if warn:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warn] + [""]
    intro, lines = lines, ["## What this run shows", "", HOW_JUDGED, ""]
    lines += [f.line() for f in findings] + [""]
    if peri and pre:
        lines += [f"## Per layer, step {peri.measured_step} (Peri-LN) and {pre.measured_step} (Pre-LN)", "",
                  "Layer 0 is the embedding output; layer n the residual stream after layer n. Sublayer RMS: the "
                  "attention / MLP output as it enters the residual add.", ""]
        lines += layer_table(peri, pre) + [""]
        lines += ["## Where the massive activations sit", ""]
        lines += activation_lines(pre) + activation_lines(peri) + [""]
    lines += ["## Loss and stability per run", "",
              "The loss after warm-up against the run's initial loss (the first logged step): how many steps were "
              "above it, the peak and when the loss was back below it; the largest grad norm over the median of the "
              "previous 50; the largest max|act| at any measured step. The trainer's spikes: the loss or grad norm "
              "above 3x that running median.", ""]
    lines += stability_table(runs) + [""] + rollback_lines(runs)
    if check is not None and peri is not None and peri.valid_loss is not None:
        diff = abs(check["valid_loss"] - peri.valid_loss)
        agree = "agree" if diff <= 1e-4 * max(1.0, abs(peri.valid_loss)) else "DISAGREE"
        lines += ["## Parallelism check", "",
                  f"Peri-LN's step-{check['step']} checkpoint, resharded to {check['layout']} and evaluated by 2 "
                  f"processes with megatron-core's pipeline schedule: validation loss {check['valid_loss']:.6f}, against "
                  f"{peri.valid_loss:.6f} from the single training process ({agree}: difference {diff:.2g}).", ""]
    lines += ["## Diagnostics plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    if sample is not None:
        lines += export_check(sample, stats, not getattr(args, "input", None))
    elif peri is not None:
        lines += ["## Export check", "", f"Not exported: Peri-LN {peri.status} ({peri.message}).", ""]
    report = write_ladder_report(grid, results, extra_sections=lines, title="Peri-LN vs Pre-LN, in miniature",
                                 intro=intro)
    summary = {"findings": [f.__dict__ for f in findings], "sample": sample, "parallel_check": check,
               "timing": timing, "corpus": stats.__dict__,
               "runs": {r.run_dir.name: {k: (str(v) if isinstance(v, Path) else v) for k, v in r.__dict__.items()}
                        for r in runs}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return report
