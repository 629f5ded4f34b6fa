"""Hugging Face HyperCLOVAX (use_post_norm) / Llama directory -> torch_dist checkpoint + recipe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from periln_megatron.hf import mapping
from periln_megatron.hf.mapping import UnsupportedModelError

HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class HFWeights:
    """Lazy access to a (possibly sharded) safetensors checkpoint; remembers what was taken."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (hf_dir / "model.safetensors").is_file():
            with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json "
                                    "(only safetensors checkpoints are read)")
        self.dir, self.weight_map, self.taken = hf_dir, weight_map, set()
        self._open = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: tensor {name!r} not found in the safetensors files")
        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = safe_open(str(self.dir / file), framework="pt")
        self.taken.add(name)
        return self._open[file].get_tensor(name)

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


def convert_from_hf(hf_dir: Path, checkpoint_dir: Path, recipe_out: Path | None = None, overwrite: bool = False,
                    log=print) -> Path:
    from megatron.core import dist_checkpointing

    from periln_megatron import checkpoint
    from periln_megatron.hf import megatron_side

    hf_dir, checkpoint_dir = Path(hf_dir), Path(checkpoint_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found")
    config = json.loads(config_path.read_text())
    iter_dir = checkpoint.iteration_dir(checkpoint_dir, 0)
    recipe, s = recipe_from_hf(hf_dir, config, iter_dir)
    weights = HFWeights(hf_dir)
    if iter_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{iter_dir} exists; pass --overwrite to replace it")
        shutil.rmtree(iter_dir)
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
    iter_dir.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 0}, str(iter_dir))
    text = ("# Converted from Hugging Face by tools/convert_from_hf.py. Set data.prefixes (and the parallel\n"
            "# layout / train section) before training; checkpoint.load gives the initial weights.\n" + recipe.to_yaml())
    (iter_dir / "recipe.yaml").write_text(text)
    (checkpoint_dir / checkpoint.MARKER).write_text("0\n")
    if recipe_out:
        Path(recipe_out).write_text(text)
        log(f"recipe written to {recipe_out}")
    log(f"wrote {iter_dir}")
    return iter_dir
