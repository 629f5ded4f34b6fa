"""Every closed list of names a recipe, a spec or a tool accepts, in one place and without torch:
config/recipe.py's CHOICES (validation and docs/recipes.md), model/specs.py, checkpoint/io.py,
the tokenizer loaders and the tools' --choices all import them from here. Order matters: it is the
order the docs and error messages list them in."""

PLACEMENTS = ("peri", "pre", "post", "output")
PLACEMENT_NAMES = {"peri": "Peri-LN", "pre": "Pre-LN", "post": "Post-LN", "output": "Output-LN"}
BACKENDS = ("local", "te")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
RECOMPUTE = ("none", "selective", "full")
CROSS_ENTROPY_FUSION_IMPLS = ("native", "te")

PRECISION_PRESETS = ("fp32", "bf16", "fp16", "fp8")
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
HF_DTYPES = ("fp32", "bf16", "fp16")  # tools/convert_to_hf.py --dtype

DECAY_STYLES = ("cosine", "linear", "constant", "WSD")

CHECKPOINT_FORMATS = ("fully_parallel", "gathered")
DEFAULT_CHECKPOINT_FORMAT = "fully_parallel"
ON_CORRUPT = ("fail", "previous")
ON_SCHEDULE_CHANGE = ("refuse", "checkpoint", "recipe")

STABILITY_ACTIONS = ("log", "rollback", "stop")
SPIKE_ACT_ON = ("loss", "any")

WANDB_MODES = ("online", "offline", "disabled")

# Megatron's names for a SentencePiece model (all load the same way here).
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
# What training and the tools can load (the container build checks their libraries:
# data/tokenizers TOKENIZER_LIBRARIES); a recipe's tokenizer.type names one of RECIPE_TOKENIZER_TYPES.
TOKENIZER_TYPES = SENTENCEPIECE_TYPES + ("HuggingFaceTokenizer", "TikTokenizer")
RECIPE_TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "TikTokenizer")
# tools/preprocess_data.py only (GPT-2's vocab.json + merges.txt, as Megatron-LM's preprocessing).
PREPROCESS_ONLY_TYPES = ("GPT2BPETokenizer",)
LOADABLE_TYPES = TOKENIZER_TYPES + PREPROCESS_ONLY_TYPES
