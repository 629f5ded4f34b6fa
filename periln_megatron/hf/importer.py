"""Hugging Face HyperCLOVAX (use_post_norm) / Llama directory -> torch_dist checkpoint + recipe."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from periln_megatron.hf import mapping, pause_for_tests
from periln_megatron.hf.mapping import UnsupportedModelError

HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
HEADER = "# Converted from Hugging Face by tools/convert_from_hf.py."


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e


def _safe_open(path: Path):
    """safetensors' safe_open, with a truncated or malformed file reported as one line naming it."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (named by the safetensors index)")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


class HFWeights:
    """Lazy access to a (possibly sharded) safetensors checkpoint; remembers what was taken."""

    def __init__(self, hf_dir: Path):
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index)
            if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
                raise ValueError(f"{index}: no `weight_map` object")
            weight_map = weight_map["weight_map"]
        elif (hf_dir / "model.safetensors").is_file():
            with _safe_open(hf_dir / "model.safetensors") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json "
                                    "(only safetensors checkpoints are read)")
        self.dir, self.weight_map, self.taken = hf_dir, weight_map, set()
        self._open = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError

        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: tensor {name!r} not found in the safetensors files")
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = _safe_open(self.dir / file)
        self.taken.add(name)
        try:
            return self._open[file].get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{self.dir / file}: cannot read tensor {name!r}: {e}") from e

    def untaken(self) -> list[str]:
        return sorted(set(self.weight_map) - self.taken)


def recipe_from_hf(hf_dir: Path, config: dict, checkpoint_iter_dir: Path):
    from periln_megatron.config import Recipe

    s = mapping.shape_from_hf_config(config, str(hf_dir / "config.json"))
    theta = float(s.rotary_base)
    if not theta.is_integer():
        raise UnsupportedModelError(f"{hf_dir}/config.json: rope_theta={theta} is not an integer (model.rotary_base is)")
    dtype_name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if dtype_name not in HF_DTYPES:
        raise UnsupportedModelError(f"{hf_dir}/config.json: dtype {dtype_name!r} (expected float32, bfloat16 or float16)")
    r = Recipe()
    r.name = f"hf-{hf_dir.resolve().name}"
    m = r.model
    m.num_layers, m.hidden_size, m.num_attention_heads = s.num_layers, s.hidden, s.heads
    m.num_query_groups, m.ffn_hidden_size, m.placement = s.groups, s.ffn, s.placement
    m.normalization, m.norm_epsilon, m.embedding_norm = "RMSNorm", s.eps, False
    m.seq_length, m.rotary_base, m.untie_embeddings, m.vocab_size = s.seq_length, int(theta), not s.tied, s.vocab
    m.init_method_std = float(config.get("initializer_range", 0.02))
    r.precision.preset = HF_DTYPES[dtype_name]
    if any((hf_dir / f).is_file() for f in TOKENIZER_FILES):
        r.tokenizer.type, r.tokenizer.model = "HuggingFaceTokenizer", str(hf_dir.resolve())
    r.checkpoint.load = str(checkpoint_iter_dir.resolve())
    r.data.synthetic, r.data.prefixes = False, []
    return r, s


def megatron_tensor(name: str, w: HFWeights, s, padded_vocab: int) -> torch.Tensor:
    """The value of megatron parameter `name` (TP=1 naming, per-layer numbering) from HF tensors."""
    def padded(t):
        out = torch.zeros(padded_vocab, t.shape[1], dtype=t.dtype)
        out[: t.shape[0]] = t
        return out

    if name == "embedding.word_embeddings.weight":
        return padded(w.get("model.embed_tokens.weight"))
    if name == "output_layer.weight":
        return padded(w.get("lm_head.weight"))
    if name == "decoder.final_layernorm.weight":
        return w.get("model.norm.weight")
    parts = name.split(".")
    if parts[:2] != ["decoder", "layers"]:
        raise KeyError(f"megatron parameter {name} has no HF counterpart")
    i, suffix = parts[2], ".".join(parts[3:])
    p = f"model.layers.{i}."
    if suffix == "self_attention.linear_qkv.weight":
        return mapping.fuse_qkv(*(w.get(p + f"self_attn.{x}_proj.weight") for x in "qkv"), s)
    if suffix == "mlp.linear_fc1.weight":
        return torch.cat([w.get(p + "mlp.gate_proj.weight"), w.get(p + "mlp.up_proj.weight")])
    for meg, hf in mapping.layer_names(s.placement):
        if suffix == meg:
            return w.get(p + hf)
    raise KeyError(f"megatron parameter {name} has no HF counterpart")


def _listing(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _converted(path: Path) -> bool:
    """Whether `path` (an iteration dir or a recipe file) is what an earlier convert_from_hf wrote."""
    recipe = path / "recipe.yaml" if path.is_dir() else path
    try:
        with open(recipe, encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(HEADER)
    except OSError:
        return False


def check_target(checkpoint_dir: Path, recipe_out: Path | None, overwrite: bool,
                 finished_meanwhile: bool = False) -> None:
    """Refuse (FileExistsError, one line) a target where writing could lose anything.

    CHECKPOINT_DIR must be absent or empty; with `overwrite` it may hold other files, but never
    another run's checkpoints: no iter_* but iter_0000000, an iter_0000000 and a --recipe-out only if
    an earlier convert_from_hf wrote them, no marker naming another iteration. Partials (hidden,
    being written by this or another conversion) do not count: the final rename decides between them.
    """
    from periln_megatron import checkpoint
    from periln_megatron.hf import outdir

    d, iter_dir = Path(checkpoint_dir), checkpoint.iteration_dir(checkpoint_dir, 0)
    if d.exists() and not d.is_dir():
        raise FileExistsError(f"{d}: exists and is not a directory")
    entries = sorted(p.name for p in d.iterdir() if not outdir.is_partial(p.name)) if d.is_dir() else []
    if entries:
        others = [e for e in entries if e.startswith("iter_") and e != iter_dir.name]
        if others:
            raise FileExistsError(
                f"{d}: holds another run's checkpoints ({_listing(entries)}); convert into a new or empty "
                "directory (even --overwrite never replaces another run's iterations)")
        marker = d / checkpoint.MARKER
        if marker.is_file() and marker.read_text(errors="replace").strip() != "0":
            raise FileExistsError(
                f"{marker} names iteration {marker.read_text(errors='replace').strip()!r} of another run "
                f"({d} holds {_listing(entries)}); convert into a new or empty directory")
        if iter_dir.exists() and not _converted(iter_dir):
            raise FileExistsError(
                f"{iter_dir}: not written by convert_from_hf.py (its recipe.yaml lacks the header); --overwrite "
                "only replaces an earlier conversion, convert into a new or empty directory")
        if not overwrite and finished_meanwhile:
            raise FileExistsError(f"{d}: another conversion finished into it while this one ran; pass --overwrite "
                                  "to replace it")
        if not overwrite:
            raise FileExistsError(
                f"{d}: not empty ({_listing(entries)}); pass --overwrite to write into it (it replaces an "
                "earlier conversion's iter_0000000 and leaves other files alone)")
    if recipe_out is not None and Path(recipe_out).exists():
        if not overwrite:
            raise FileExistsError(f"{recipe_out}: exists; pass --overwrite to replace a recipe convert_from_hf wrote")
        if Path(recipe_out).is_dir() or not _converted(Path(recipe_out)):
            raise FileExistsError(f"{recipe_out}: exists and was not written by convert_from_hf.py; "
                                  "--overwrite only replaces an earlier conversion's recipe")


def convert_from_hf(hf_dir: Path, checkpoint_dir: Path, recipe_out: Path | None = None, overwrite: bool = False,
                    log=print) -> Path:
    hf_dir, checkpoint_dir = Path(hf_dir), Path(checkpoint_dir)
    check_target(checkpoint_dir, recipe_out, overwrite)  # before anything is read or written

    from megatron.core import dist_checkpointing

    from periln_megatron import checkpoint
    from periln_megatron.hf import megatron_side, outdir

    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    iter_dir = checkpoint.iteration_dir(checkpoint_dir, 0)
    recipe, s = recipe_from_hf(hf_dir, config, iter_dir)
    weights = HFWeights(hf_dir)
    dtype = mapping.DTYPES[recipe.precision.preset]
    log(f"{hf_dir}: {config['model_type']} -> {s.placement}-LN, {s.num_layers} layers, hidden {s.hidden}, "
        f"heads {s.heads}/{s.groups} groups, vocab {s.vocab}, {recipe.precision.preset}")

    megatron_side.init_single_process()
    padded = megatron_side.single_process_recipe(recipe).padded_vocab_size()
    model = megatron_side.build_model(recipe, padded, dtype, initialize=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, (name, param) in enumerate(params.items()):
            value = megatron_tensor(name, weights, s, padded)
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{hf_dir}: {name} built from HF tensors has shape {tuple(value.shape)}, "
                                 f"megatron expects {tuple(param.shape)}")
            param.copy_(value)
            log(f"  [{n + 1}/{len(params)}] {name} {list(param.shape)}")
    leftover = [k for k in weights.untaken() if not (s.tied and k == "lm_head.weight")
                and not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise UnsupportedModelError(f"{hf_dir}: tensors with no megatron counterpart (unsupported features?): "
                                    + ", ".join(leftover[:10]) + (" ..." if len(leftover) > 10 else ""))
    text = (f"{HEADER} Set data.prefixes (and the parallel\n"
            "# layout / train section) before training; checkpoint.load gives the initial weights.\n" + recipe.to_yaml())

    # Written under a hidden partial name, renamed into place under a lock (periln_megatron/hf/outdir.py):
    # a failure leaves the target as it was, and of two conversions into one directory the second to
    # finish sees the first's and refuses (or, with --overwrite, replaces it).
    created = not checkpoint_dir.exists()
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    outdir.remove_stale_partials(checkpoint_dir, iter_dir.name, log)
    partial = outdir.partial_path(checkpoint_dir, iter_dir.name)
    outdir.remove(partial)  # a dead process's with our pid
    written = False
    try:
        partial.mkdir()
        dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 0}, str(partial))
        pause_for_tests(log)
        (partial / "recipe.yaml").write_text(text)
        with outdir.lock(checkpoint_dir.parent):
            check_target(checkpoint_dir, recipe_out, overwrite, finished_meanwhile=True)
            aside = outdir.swap_in(partial, iter_dir, replace=True)  # an earlier conversion (check_target made sure)
            written = True
            with outdir.signals_deferred():
                tmp = checkpoint_dir / (checkpoint.MARKER + ".tmp")
                tmp.write_text("0\n")
                os.replace(tmp, checkpoint_dir / checkpoint.MARKER)
                if recipe_out:
                    tmp = Path(f"{recipe_out}.tmp")
                    tmp.write_text(text)
                    os.replace(tmp, recipe_out)
        if aside is not None:
            outdir.remove(aside)
    except BaseException:
        if not written:
            outdir.remove(partial)
            if created:
                with contextlib.suppress(OSError):
                    checkpoint_dir.rmdir()  # only if nothing else is in it
        raise
    if recipe_out:
        log(f"recipe written to {recipe_out}")
    log(f"wrote {iter_dir}")
    return iter_dir
