"""Megatron torch_dist checkpoint -> Hugging Face model directory (see tools/convert_to_hf.py)."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch

from periln_megatron.hf import mapping, pause_for_tests
from periln_megatron.hf.mapping import Shape, UnsupportedModelError
from periln_megatron.checkpoint.reader import CheckpointReadError, TorchDistReader
from periln_megatron.hf.safetensors_io import Entry, write_sharded


def resolve_iteration_dir(path: Path, iteration: int | None) -> Path:
    """CHECKPOINT_DIR may be a run's checkpoint root (marker file) or one iter_XXXXXXX directory."""
    from periln_megatron import checkpoint

    path = Path(path)
    if (path / ".metadata").is_file():
        if iteration is not None:
            raise CheckpointReadError(f"{path} is already one iteration's directory; drop --iteration")
        return path
    if iteration is None:
        iteration = checkpoint.latest_iteration(path)
        if iteration is None:
            raise CheckpointReadError(f"{path}: neither a torch_dist iteration directory (.metadata) nor a "
                                      f"checkpoint root with {checkpoint.MARKER}")
    target = checkpoint.iteration_dir(path, iteration)
    if not (target / ".metadata").is_file():
        raise CheckpointReadError(f"{target}: no such checkpoint (missing or incomplete)")
    return target


def _iteration_of(iter_dir: Path) -> int | None:
    """The iteration of an iter_XXXXXXX directory (megatron's name for it); None for another name."""
    name = Path(iter_dir).resolve().name
    return int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else None


def load_checkpoint_recipe(iter_dir: Path):
    from periln_megatron.config import load_recipe

    path = iter_dir / "recipe.yaml"
    if not path.is_file():
        raise CheckpointReadError(f"{path} not found: the converter needs the recipe that wrote the checkpoint")
    # the data section is irrelevant here (an imported model's recipe has none yet)
    return load_recipe(path, ["data.synthetic=true", "data.prefixes=[]"], check_environment=False)


def true_vocab_size(recipe) -> int:
    """The unpadded vocabulary: model.vocab_size if the recipe fixes it, else the tokenizer's size
    (data.synthetic_vocab_size for synthetic data without one)."""
    if recipe.model.vocab_size:
        return recipe.model.vocab_size
    if recipe.tokenizer.vocab_size:
        return recipe.tokenizer.vocab_size
    if not recipe.tokenizer.model:  # synthetic data without a tokenizer
        return recipe.data_vocab_size()
    from periln_megatron.data.tokenizers import load_tokenizer

    return load_tokenizer(recipe.tokenizer.type, recipe.tokenizer.model).vocab_size


class _OneTensorCache:
    """Fused tensors feed several HF tensors in a row (q, k, v; gate, up): read them once."""

    def __init__(self, reader: TorchDistReader):
        self.reader, self.key, self.value = reader, None, None

    def get(self, key: str, index: tuple) -> torch.Tensor:
        if self.key != (key, index):
            self.value = None
            self.value = self.reader.read(key, index)
            self.key = (key, index)
        return self.value


def _megatron_layer_key(reader: TorchDistReader, suffix: str) -> str:
    key = f"decoder.layers.{suffix}"
    if key not in reader and suffix in mapping.TE_NORM_NAMES:
        te_key = f"decoder.layers.{mapping.TE_NORM_NAMES[suffix]}"
        if te_key in reader:
            return te_key
    return key


def plan_entries(reader: TorchDistReader, s: Shape, dtype: torch.dtype) -> list[Entry]:
    cache = _OneTensorCache(reader)
    H, hd = s.hidden, s.head_dim
    expected = {
        "embedding.word_embeddings.weight": (None, H),
        "decoder.final_layernorm.weight": (H,),
        _megatron_layer_key(reader, "self_attention.linear_qkv.weight"): (s.num_layers, (s.heads + 2 * s.groups) * hd, H),
        _megatron_layer_key(reader, "mlp.linear_fc1.weight"): (s.num_layers, 2 * s.ffn, H),
    }
    if not s.tied:
        expected["output_layer.weight"] = (None, H)
    for key, shape in expected.items():
        got = reader.shape(key)  # raises, naming the key, when absent
        if len(got) != len(shape) or any(w is not None and w != g for w, g in zip(shape, got)):
            raise CheckpointReadError(f"{reader.directory}: {key} has shape {got}, the recipe implies "
                                      f"{tuple('*' if w is None else w for w in shape)}")
    padded = reader.shape("embedding.word_embeddings.weight")[0]
    if padded < s.vocab:
        raise CheckpointReadError(f"{reader.directory}: embedding has {padded} rows, fewer than the vocabulary ({s.vocab})")

    def whole(key, rows=None):
        def produce():
            t = reader.read(key)
            return (t[:rows] if rows else t).to(dtype).clone()
        return produce

    def part(key, i, pick=None):
        def produce():
            t = cache.get(key, (i,)) if pick is not None else reader.read(key, (i,))
            return (pick(t) if pick is not None else t).to(dtype).contiguous()
        return produce

    entries = [Entry("model.embed_tokens.weight", (s.vocab, H), dtype, whole("embedding.word_embeddings.weight", s.vocab))]
    qkv = _megatron_layer_key(reader, "self_attention.linear_qkv.weight")
    fc1 = _megatron_layer_key(reader, "mlp.linear_fc1.weight")
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        entries += [
            Entry(p + "self_attn.q_proj.weight", (s.heads * hd, H), dtype, part(qkv, i, lambda t: mapping.split_qkv(t, s)[0])),
            Entry(p + "self_attn.k_proj.weight", (s.groups * hd, H), dtype, part(qkv, i, lambda t: mapping.split_qkv(t, s)[1])),
            Entry(p + "self_attn.v_proj.weight", (s.groups * hd, H), dtype, part(qkv, i, lambda t: mapping.split_qkv(t, s)[2])),
            Entry(p + "mlp.gate_proj.weight", (s.ffn, H), dtype, part(fc1, i, lambda t: t[:s.ffn])),
            Entry(p + "mlp.up_proj.weight", (s.ffn, H), dtype, part(fc1, i, lambda t: t[s.ffn:])),
        ]
        for meg, hf in mapping.layer_names(s.placement):
            key = _megatron_layer_key(reader, meg)
            shape = reader.shape(key)[1:]
            entries.append(Entry(p + hf, shape, dtype, part(key, i)))
    entries.append(Entry("model.norm.weight", (H,), dtype, whole("decoder.final_layernorm.weight")))
    if not s.tied:
        entries.append(Entry("lm_head.weight", (s.vocab, H), dtype, whole("output_layer.weight", s.vocab)))
    return entries


def generation_config(special: dict) -> dict:
    """generation_config.json: the tokenizer's bos/eos (and pad, where it has one) ids, greedy."""
    return {**{k: special[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in special},
            "do_sample": False}


def _tokenizer_card(recipe, tok_type: str | None, skip_tokenizer: bool, special: dict) -> dict:
    model = recipe.tokenizer.model
    if not recipe.tokenizer.type:
        text = "none in the recipe (token ids only; no tokenizer files exported)"
    elif skip_tokenizer:
        text = f"`{recipe.tokenizer.type}` `{model}` (not exported: --skip-tokenizer)"
    else:
        text = f"`{tok_type}` `{Path(model).name}`, exported as `tokenizer.json`"
    return {"description": text, "special": special}


EXPORT_MARKER = ".periln-export.json"  # written last into every export: what --overwrite may replace


def _listing(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def run_directories(iter_dir: Path, recipe, metrics_path: Path | None) -> list[tuple[Path, str]]:
    """What an export must never replace, contain or enter, with a name for the message: the
    iteration, its checkpoint root, the run dir that holds metrics.jsonl (found or --metrics), and
    the run's checkpoint.dir, logging.run_dir and data.cache_dir as its recipe recorded them."""
    from periln_megatron import checkpoint
    from periln_megatron.hf.model_card import METRICS_FILE

    out = [(iter_dir, "checkpoint iteration")]
    root = iter_dir.parent
    if (root / checkpoint.MARKER).is_file() or (root / METRICS_FILE).is_file():
        out.append((root, "checkpoint directory"))
    if metrics_path is not None:
        out.append((metrics_path.parent, f"run directory (its {METRICS_FILE})"))
    for key, value in (("checkpoint.dir", recipe.checkpoint.dir), ("logging.run_dir", recipe.logging.run_dir),
                       ("data.cache_dir", recipe.data.cache_dir)):
        if value and Path(value).is_dir():
            out.append((Path(value), f"{key} as its recipe records it"))
    return out


def check_outside_run(output_dir: Path, protected: list[tuple[Path, str]]) -> None:
    o = Path(os.path.realpath(output_dir))
    for path, what in protected:
        p = Path(os.path.realpath(path))
        relation = "is" if o == p else "contains" if o in p.parents else "lies inside" if p in o.parents else None
        if relation:
            raise FileExistsError(f"{output_dir} {relation} the exported run's {what} {path}; an export never "
                                  "replaces, holds or goes into a training run's directories (not even with "
                                  "--overwrite): choose a directory outside it")


def _export_files(output_dir: Path) -> list[str] | None:
    """The files an earlier export wrote (its marker's list), or None if the marker is absent or not ours."""
    try:
        record = json.loads((output_dir / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    files = record.get("files") if isinstance(record, dict) and record.get("written_by") == "convert_to_hf" else None
    return files if isinstance(files, list) else None


def check_target(output_dir: Path, overwrite: bool, finished_meanwhile: bool = False) -> bool:
    """Refuse (FileExistsError, one line) an output that is not ours to write: a file or link, a
    non-empty directory without our marker, an earlier export holding files it did not write, or
    (without `overwrite`) an earlier export. True if an earlier export is to be replaced."""
    from periln_megatron.hf import outdir

    if output_dir.is_symlink() or (output_dir.exists() and not output_dir.is_dir()):
        raise FileExistsError(f"{output_dir}: exists and is not a directory; export into a new or empty directory")
    if not output_dir.exists():
        return False
    entries = sorted(e for e in os.listdir(output_dir))
    if not entries:
        return False
    files = _export_files(output_dir)
    if files is None:
        raise FileExistsError(f"{output_dir}: not empty ({_listing(entries)}) and not written by convert_to_hf.py "
                              f"(no {EXPORT_MARKER}); even --overwrite replaces only an earlier export: export into a "
                              "new or empty directory")
    foreign = [e for e in entries if e not in files and e != EXPORT_MARKER and not outdir.is_partial(e)]
    if foreign:
        raise FileExistsError(f"{output_dir}: an earlier export, but it also holds files the export did not write "
                              f"({_listing(foreign)}); even --overwrite does not replace them: move them out or "
                              "export elsewhere")
    if not overwrite:
        what = "another export finished into it while this one ran" if finished_meanwhile else "holds an earlier export"
        raise FileExistsError(f"{output_dir}: {what}; pass --overwrite to replace it")
    return True


def convert_to_hf(checkpoint_dir: Path, output_dir: Path, *, iteration: int | None = None, dtype: str | None = None,
                  max_shard_size: int = 2 * 10**9, tokenizer: str | None = None, skip_tokenizer: bool = False,
                  overwrite: bool = False, metrics: Path | None = None, command: list[str] | None = None,
                  log=print) -> Path:
    """Write OUTPUT_DIR: safetensors, config.json, generation_config.json, the tokenizer, README.md
    (model card, periln_megatron/hf/model_card.py) and megatron_source.json. `metrics`: the run's
    metrics.jsonl (or its dir) when not found beside the checkpoint; `command`: the argv recorded
    in the card (default sys.argv)."""
    from periln_megatron.hf import model_card, outdir

    output_dir = Path(output_dir)
    iter_dir = resolve_iteration_dir(Path(checkpoint_dir), iteration)
    recipe = load_checkpoint_recipe(iter_dir)
    metrics_path, metrics_tried = model_card.find_metrics(iter_dir, recipe, metrics)
    check_outside_run(output_dir, run_directories(iter_dir, recipe, metrics_path))  # before anything is read
    check_target(output_dir, overwrite)
    arch = mapping.arch_for(recipe.model)
    if recipe.model.backend == "te" and recipe.precision.preset == "fp8":
        log("note: fp8 training keeps bf16 master weights in the checkpoint; exporting those")
    dtype_name = dtype or mapping.PRESET_DTYPE[recipe.precision.preset]
    torch_dtype = mapping.DTYPES[dtype_name]
    if tokenizer:
        recipe.tokenizer.model = tokenizer
    tok_type = None if skip_tokenizer else recipe.tokenizer.type
    s = mapping.shape_from_recipe(recipe, true_vocab_size(recipe))
    reader = TorchDistReader(iter_dir)
    entries = plan_entries(reader, s, torch_dtype)
    padded_vocab = reader.shape("embedding.word_embeddings.weight")[0]
    log(f"{iter_dir}: {recipe.model.placement}-LN, {s.num_layers} layers, hidden {s.hidden}, heads {s.heads}/"
        f"{s.groups} groups, vocab {s.vocab} (padded {padded_vocab}) -> {arch} in {dtype_name}")
    exported_iteration = _iteration_of(iter_dir)
    summary = model_card.summarize_metrics(metrics_path, exported_iteration) if metrics_path else None
    if summary and summary.error:
        log(f"model card metrics: unavailable ({summary.error})")
    elif summary:
        up_to = "?" if exported_iteration is None else exported_iteration
        log(f"model card metrics: {metrics_path} ({summary.records} logged steps up to iteration {up_to})")
    else:
        log("model card metrics: unavailable (no metrics.jsonl in " + ", ".join(str(p.parent) for p in metrics_tried) + ")")

    created = [p for p in reversed(output_dir.parents) if not p.exists()]  # removed again on failure
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    outdir.remove_stale_partials(output_dir.parent, output_dir.name, log)
    tmp = outdir.partial_path(output_dir.parent, output_dir.name)
    outdir.remove(tmp)  # a dead process's with our pid
    written = False
    try:
        tmp.mkdir()
        from periln_megatron.hf.tokenizer import export_tokenizer

        special = export_tokenizer(tok_type, recipe.tokenizer.model, tmp, s.seq_length,
                                   "--tokenizer" if tokenizer else "tokenizer.model in the checkpoint's recipe")
        outside = {k: v for k, v in special.items() if not 0 <= v < s.vocab}
        if outside:  # e.g. a recipe whose vocab_size is smaller than its tokenizer's special ids
            from periln_megatron.hf.tokenizer import TokenizerExportError

            raise TokenizerExportError(f"{recipe.tokenizer.model}: special token ids {outside} lie outside the model's "
                                       f"vocabulary of {s.vocab} (model/tokenizer vocab_size in the recipe)")
        if not tok_type:
            log("no tokenizer in the recipe (or --skip-tokenizer): writing weights and config only")
        write_sharded(tmp, entries, max_shard_size, log)
        pause_for_tests(log)
        config = mapping.hf_config(arch, s, torch_dtype, special)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(special), indent=2) + "\n")
        params = sum(math.prod(e.shape) for e in entries)
        embedding_params = sum(math.prod(e.shape) for e in entries
                               if e.name in ("model.embed_tokens.weight", "lm_head.weight"))
        card_command = model_card.command_line(command)
        (tmp / "README.md").write_text(model_card.render_card(
            recipe=recipe, recipe_yaml=(iter_dir / "recipe.yaml").read_text(), arch=arch, hf_config=config, shape=s,
            params=params, embedding_params=embedding_params, padded_vocab=padded_vocab,
            iter_dir=iter_dir, iteration=exported_iteration,
            tokenizer=_tokenizer_card(recipe, tok_type, skip_tokenizer, special),
            metrics=summary, metrics_tried=metrics_tried, command=card_command))
        (tmp / "megatron_source.json").write_text(json.dumps(
            {"checkpoint": str(iter_dir.resolve()), "iteration": exported_iteration, "recipe": recipe.to_dict(),
             "parameters": params, "metrics": summary.to_dict() if summary else None,
             "periln_megatron_version": model_card.project_version(), "command": card_command},
            indent=2, default=str) + "\n")
        (tmp / EXPORT_MARKER).write_text(json.dumps(
            {"written_by": "convert_to_hf", "files": sorted(os.listdir(tmp)), "checkpoint": str(iter_dir.resolve()),
             "iteration": exported_iteration}, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        with outdir.lock(output_dir.parent):
            replace = check_target(output_dir, overwrite, finished_meanwhile=True)
            aside = outdir.swap_in(tmp, output_dir, replace)
        written = True
        if aside is not None:
            outdir.remove(aside)
    except BaseException:
        if not written:
            outdir.remove(tmp)
            for p in reversed(created):
                with contextlib.suppress(OSError):
                    p.rmdir()
        raise
    log(f"wrote {output_dir}")
    return output_dir
