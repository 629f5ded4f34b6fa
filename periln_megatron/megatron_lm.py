"""Ready layer specs for Megatron-LM's own `pretrain_gpt.py`: `--spec periln_megatron.megatron_lm peri_te`.

Megatron-LM (core_v0.16.1) `gpt_builders.gpt_builder` fetches `--spec MODULE NAME` with
`megatron.core.transformer.spec_utils.import_module((MODULE, NAME))` and hands the object to
`GPTModel(transformer_layer_spec=...)` as it is, before any config exists; so these are module-level
`ModuleSpec`s of one `TransformerLayer`, built with `specs.get_layer_spec(None, ...)`. Every norm in
them reads `--normalization` / `--norm-epsilon` (the TransformerConfig) when the model is built.

    peri_te, peri_local       Peri-LN   h = x + Norm(F(Norm(x)))
    pre_te, pre_local         Pre-LN    h = x + F(Norm(x))
    output_te, output_local   Output-LN h = x + Norm(F(x))

`te`: Transformer Engine modules (input norm fused into QKV/FC1), as `--transformer-impl
transformer_engine`; `local`: megatron-core's local modules, as `--transformer-impl local`.

The final norm before the LM head is not in a layer spec: megatron's TransformerBlock adds its own
(`LayerNormImpl`: TENorm where TE is installed, else apex FusedLayerNorm, else WrappedTorchNorm),
under the same name, `decoder.final_layernorm`, as periln_megatron's builder.

Not here, by design:
* post (Post-LN): it has no final norm, and TransformerBlock gives a *layer* spec one in any case;
  only a block spec (`TransformerBlockSubmodules(layer_norm=None)`) can leave it out, and a block
  spec lists one layer spec per layer of the pipeline stage, a number only the config knows. Its
  `NormAfterAdd` also needs the config (TransformerLayer builds the bias-dropout-add slot without
  one). Train Post-LN with `periln-train`.
* the embedding norm (`model.embedding_norm`): `--spec` only specifies the decoder layers, and
  Megatron-LM's GPTModel has no embedding-output norm.

Command line and caveats: docs/megatron_lm.md.
"""

from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec

from periln_megatron.config import choices
from periln_megatron.model.specs import get_layer_spec

PLACEMENTS = tuple(p for p in choices.PLACEMENTS if p != "post")  # not post: see above
BACKENDS = choices.BACKENDS[::-1]  # te first: Megatron-LM's default --transformer-impl

peri_te: ModuleSpec = get_layer_spec(None, "peri", "te")
peri_local: ModuleSpec = get_layer_spec(None, "peri", "local")
pre_te: ModuleSpec = get_layer_spec(None, "pre", "te")
pre_local: ModuleSpec = get_layer_spec(None, "pre", "local")
output_te: ModuleSpec = get_layer_spec(None, "output", "te")
output_local: ModuleSpec = get_layer_spec(None, "output", "local")

SPEC_NAMES = tuple(f"{p}_{b}" for p in PLACEMENTS for b in BACKENDS)
__all__ = list(SPEC_NAMES)
