"""`make demo`: the Peri-LN finding in miniature, on CPU, end to end with the project's own tools.

1. a corpus from text already on this machine (the Python standard library's docstrings), or --input;
2. a SentencePiece tokenizer and a megatron indexed dataset (tools/train_tokenizer.py, preprocess_data.py);
3. a deep, narrow Peri-LN model and the same Pre-LN model: same data, same seed, torchrun with PP=2;
4. validation losses, diagnostic plots and report.md with the per-layer variance growth of both;
5. the Peri-LN checkpoint exported to Hugging Face, loaded with stock transformers, and sampled.

Everything lands in --out. Re-running resumes: finished stages are skipped, training continues from
its checkpoints. --fresh starts over.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
CORPUS_BYTES = 3_000_000
RUNS = (("peri", "Peri-LN"), ("pre", "Pre-LN"))


def log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def stdlib_docstrings(limit: int = CORPUS_BYTES):
    """Module, class and function docstrings of the installed standard library, in path order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(stdlib.rglob("*.py")):
        parts = set(path.relative_to(stdlib).parts)
        if parts & {"test", "tests", "site-packages", "idle_test", "lib2to3"}:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    yield doc
                    total += len(doc.encode())
                    if total >= limit:
                        return


def user_documents(paths: list[str]):
    """JSONL (a "text" field) or plain text, split into documents at blank lines."""
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise SystemExit(f"demo: --input {path}: file not found")
        if path.suffix in (".jsonl", ".json"):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise SystemExit(f"demo: {path}:{n}: expected a JSON object with a text field ({e})")
        else:
            for block in path.read_text(encoding="utf-8").split("\n\n"):
                if block.strip():
                    yield block.strip()


def build_corpus(out: Path, inputs: list[str] | None) -> Path:
    corpus = out / "corpus.jsonl"
    if corpus.exists():
        log(f"corpus: {corpus} exists, kept")
        return corpus
    docs = list(user_documents(inputs) if inputs else stdlib_docstrings())
    if len(docs) < 50:
        raise SystemExit(f"demo: only {len(docs)} documents found; give more text with --input")
    tmp = corpus.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    tmp.rename(corpus)
    source = ", ".join(inputs) if inputs else f"docstrings of Python {sys.version.split()[0]}'s standard library"
    log(f"corpus: {len(docs)} documents, {corpus.stat().st_size / 1e6:.1f} MB from {source}")
    return corpus


def run_tool(args: list, what: str) -> None:
    log(what)
    subprocess.run([sys.executable, *map(str, args)], check=True, cwd=REPO)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(out: Path, placement: str, label: str, prefix: Path, tokenizer: Path, steps: int, layers: int) -> Path:
    run_dir = out / "runs" / placement
    overrides = [
        f"name=demo-{placement}", f"model.placement={placement}", f"model.num_layers={layers}",
        "model.hidden_size=96", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=256", "model.seq_length=128", "model.vocab_size=null",
        "parallel.pp=2", "train.global_batch_size=16", "train.micro_batch_size=4", f"train.steps={steps}",
        f"train.eval_interval={max(steps // 4, 1)}", "train.eval_iters=4",
        "optim.lr=1.0e-2", "optim.min_lr=1.0e-3", f"optim.warmup_steps={max(steps // 10, 1)}",
        "data.synthetic=false", f"data.prefixes=[{prefix}]", "data.split=95,5,0",
        "tokenizer.type=SentencePieceTokenizer", f"tokenizer.model={tokenizer}",
        f"checkpoint.dir={run_dir}", f"checkpoint.interval={max(steps // 2, 1)}", "checkpoint.keep=1",
        f"diagnostics.interval={max(steps // 5, 1)}", "logging.interval=10", "logging.tensorboard=false",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "periln_megatron.train",
           "--recipe", str(REPO / "recipes/tiny/peri_ln.yaml"), "--set", *overrides]
    log(f"training {label}: {layers} layers, {steps} steps, PP=2 on 2 CPU processes")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        tail = []
        for line in p.stdout:
            tail = (tail + [line])[-40:]
            if line.startswith(("step ", "resumed", "saved checkpoint", "stopping")):
                print(f"  {label}: {line.rstrip()}", flush=True)
    if p.returncode != 0:
        raise SystemExit(f"demo: training {label} failed (exit {p.returncode}):\n{''.join(tail)}")
    return run_dir


def summarise(run_dir: Path) -> dict:
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in records if r.get("layer_variance")]
    last = measured[-1]
    variance = [v for v in last["layer_variance"] if v is not None]
    layers = range(1, len(variance) + 1)
    # least-squares slope of log-variance against depth: the per-layer growth factor is exp(slope)
    xs, ys = list(layers), [math.log(max(v, 1e-30)) for v in variance]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    valid = [r for r in records if "valid_loss" in r or "final_valid_loss" in r]
    return {
        "step": last["step"],
        "train_loss": [r["loss"] for r in records if "loss" in r][-1],
        "valid_loss": valid[-1].get("final_valid_loss", valid[-1].get("valid_loss")) if valid else None,
        "variance_first": variance[0], "variance_last": variance[-1],
        "variance_ratio": variance[-1] / variance[0],
        "growth_per_layer": math.exp(slope),
        "max_abs_activation": max(v for v in last["layer_max_abs"] if v is not None),
        "layer_variance": variance,
    }


def export_and_sample(out: Path, ckpt: Path) -> str:
    hf_dir = out / "hf_peri_ln"
    if not (hf_dir / "config.json").exists():
        run_tool([TOOLS / "convert_to_hf.py", ckpt, hf_dir, "--overwrite"], f"exporting Peri-LN to {hf_dir}")
    log("loading the export with stock transformers and generating")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompt = "Return the"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=40, do_sample=False)
    text = tokenizer.decode(generated[0], skip_special_tokens=True)
    log(f"{type(model).__name__} sample: {text!r}")
    return f"{type(model).__name__} ({model.config.model_type}) from `{hf_dir.name}/`, greedy: {text!r}"


def write_report(out: Path, summaries: dict, sample: str, plots: list[Path], corpus_note: str) -> Path:
    lines = ["# Peri-LN vs Pre-LN, in miniature", "", corpus_note, "",
             "| | Peri-LN | Pre-LN |", "|---|---|---|"]
    rows = [("final validation loss", "valid_loss", "{:.4f}"), ("final train loss", "train_loss", "{:.4f}"),
            ("variance, first layer", "variance_first", "{:.3g}"), ("variance, last layer", "variance_last", "{:.3g}"),
            ("variance growth, last / first layer", "variance_ratio", "{:.2f}x"),
            ("fitted growth per layer", "growth_per_layer", "{:.3f}x"),
            ("max \\|activation\\| (residual stream)", "max_abs_activation", "{:.1f}")]
    for title, key, fmt in rows:
        cells = [fmt.format(summaries[p][key]) if summaries[p][key] is not None else "n/a" for p, _ in RUNS]
        lines.append(f"| {title} | {' | '.join(cells)} |")
    peri, pre = summaries["peri"], summaries["pre"]
    lines += ["", f"Measured at step {peri['step']}: across depth the residual-stream variance grows "
              f"{pre['variance_ratio']:.2f}x under Pre-LN and {peri['variance_ratio']:.2f}x under Peri-LN "
              f"(per layer {pre['growth_per_layer']:.3f}x vs {peri['growth_per_layer']:.3f}x). "
              "These are measured numbers from one short run, not a claim about their direction.", "",
              "Per-layer variance (Pre-LN): " + ", ".join(f"{v:.3g}" for v in pre["layer_variance"]),
              "", "Per-layer variance (Peri-LN): " + ", ".join(f"{v:.3g}" for v in peri["layer_variance"]),
              "", "## Plots", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    lines += ["", "## Hugging Face export", "", sample, ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps(summaries, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    parser.add_argument("--input", nargs="+", help="your own .jsonl (text field) or .txt files instead")
    parser.add_argument("--steps", type=int, default=150, help="training steps per model (default: 150)")
    parser.add_argument("--layers", type=int, default=12, help="model depth, even (default: 12)")
    parser.add_argument("--vocab-size", type=int, default=2000)
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    args = parser.parse_args(argv)
    out = (REPO / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    corpus = build_corpus(out, args.input)
    tok = out / "tokenizer" / "spm"
    if not tok.with_suffix(".model").exists():
        run_tool([TOOLS / "train_tokenizer.py", "--input", corpus, "--model-prefix", tok,
                  "--vocab-size", args.vocab_size, "--model-type", "bpe", "--normalization", "nmt_nfkc"],
                 "training a SentencePiece BPE tokenizer")  # nmt_nfkc: what HF's fast tokenizer reproduces
    prefix = out / "data" / "corpus_text_document"
    if not prefix.with_suffix(".idx").exists():
        run_tool([TOOLS / "preprocess_data.py", "--input", corpus, "--output-prefix", out / "data" / "corpus",
                  "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok.with_suffix(".model"),
                  "--append-eod", "--workers", "2"], "tokenising the corpus into a megatron indexed dataset")

    run_dirs = {p: train(out, p, label, prefix, tok.with_suffix(".model"), args.steps, args.layers) for p, label in RUNS}
    summaries = {p: summarise(d) for p, d in run_dirs.items()}
    for p, label in RUNS:
        log(f"{label}: validation loss {summaries[p]['valid_loss']:.4f}, variance last/first layer "
            f"{summaries[p]['variance_ratio']:.2f}x")

    run_tool([TOOLS / "plot_diagnostics.py", run_dirs["peri"], run_dirs["pre"], "--out", out / "plots"],
             "plotting diagnostics")
    plots = sorted((out / "plots").glob("*.png"))
    sample = export_and_sample(out, run_dirs["peri"])
    note = (f"Corpus: {corpus.name} ({corpus.stat().st_size / 1e6:.1f} MB); {args.layers} layers, hidden 96, "
            f"{args.steps} steps of 16 x 128 tokens, same data and seed for both models.")
    report = write_report(out, summaries, sample, plots, note)
    log(f"done in {time.monotonic() - started:.0f}s: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
