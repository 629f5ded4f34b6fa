"""Peri-LN's checkpoint exported to Hugging Face (the package's exporter, in process), loaded with
stock transformers and sampled greedily; whether the sample is degenerate."""

from __future__ import annotations

import sys
from pathlib import Path

from periln_megatron.demo.console import log

SAMPLE_TOKENS = 32


LOOP_TAIL = 12  # a continuation whose last 12 tokens repeat a pattern of at most 4 tokens ends in a loop


def degeneracy(ids: list[int]) -> str | None:
    """Why a generated continuation is degenerate, or None if it is not: empty, one token making up a
    third of it, a quarter or more of its tokens completing a 3-gram it already generated (it repeats
    itself), or ending in a loop (its last LOOP_TAIL tokens repeat a pattern of at most 4 tokens)."""
    if not ids:
        return "empty continuation"
    top = max(set(ids), key=ids.count)
    if ids.count(top) * 3 >= len(ids) and len(ids) >= 3:
        return f"one token makes up {ids.count(top)} of {len(ids)} generated tokens"
    seen, repeats = set(), 0
    for i in range(2, len(ids)):
        gram = tuple(ids[i - 2:i + 1])
        repeats += gram in seen
        seen.add(gram)
    if len(ids) > 2 and repeats * 4 >= len(ids) - 2:
        return f"{repeats} of its {len(ids) - 2} 3-grams repeat an earlier one (it repeats itself)"
    tail = ids[-LOOP_TAIL:]
    if len(tail) == LOOP_TAIL:
        for period in range(1, 5):
            if all(tail[i] == tail[i - period] for i in range(period, LOOP_TAIL)):
                return f"its last {LOOP_TAIL} tokens repeat a pattern of {period} (it ends in a loop)"
    return None



def export(ckpt: Path, hf_dir: Path) -> None:
    """tools/convert_to_hf.py CKPT HF_DIR --overwrite --quiet, through the package."""
    from periln_megatron.hf import run_tool
    from periln_megatron.hf.export import convert_to_hf

    log(f"exporting Peri-LN to {hf_dir}")
    command = ["-m", "periln_megatron.demo", *sys.argv[1:]]  # the model card's "converted with"
    code = run_tool("convert_to_hf", True, lambda progress: convert_to_hf(ckpt, hf_dir, overwrite=True,
                                                                           command=command, log=progress))
    if code:
        raise SystemExit(f"demo: exporting {ckpt} to {hf_dir} failed (exit {code})")


def export_and_sample(out: Path, ckpt: Path, prompt: str) -> dict:
    hf_dir = out / "hf_peri_ln"
    if not (hf_dir / "config.json").exists():
        export(ckpt, hf_dir)
    log("loading the export with stock transformers and generating")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    # All SAMPLE_TOKENS tokens: the end-of-document token does not stop generation (the model was trained on
    # documents joined by it, so it goes on with the next one), and a short answer cannot pass for a good one.
    generated = model.generate(ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=SAMPLE_TOKENS,
                               min_new_tokens=SAMPLE_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=None)
    new = generated[0, ids.shape[1]:].tolist()
    text = tokenizer.decode(generated[0], skip_special_tokens=False)
    verdict = degeneracy(new)
    log(f"{type(model).__name__} greedy sample: {text!r} ({'degenerate: ' + verdict if verdict else 'not degenerate'})")
    return {"model": f"{type(model).__name__} ({model.config.model_type})", "dir": hf_dir.name, "prompt": prompt,
            "text": text, "ids": new, "new_tokens": len(new), "degenerate": verdict}

