"""Type name -> tokenizer: :func:`load_tokenizer`, and the libraries each type imports
(:data:`TOKENIZER_LIBRARIES`, :func:`check_tokenizer_libraries`, run by the container build)."""

from __future__ import annotations

from pathlib import Path

from periln_megatron.data.tokenizers.base import LOADABLE_TYPES, SENTENCEPIECE_TYPES, TOKENIZER_TYPES, Tokenizer
from periln_megatron.data.tokenizers.gpt2bpe import GPT2BPETokenizer
from periln_megatron.data.tokenizers.huggingface import HuggingFaceTokenizer, is_hub_id
from periln_megatron.data.tokenizers.sentencepiece import SentencePieceTokenizer
from periln_megatron.data.tokenizers.tiktoken import TikTokenizer

# --------------------------------------------------------------------------- installation check
# What each type imports when a tokenizer is loaded (module, or module:attribute), so that an
# installation (the container's build, a fresh venv) can prove every type a recipe may name works.
TOKENIZER_LIBRARIES = {
    **{t: ("sentencepiece:SentencePieceProcessor",) for t in SENTENCEPIECE_TYPES},
    "HuggingFaceTokenizer": ("tokenizers:Tokenizer", "transformers:AutoTokenizer", "transformers:PreTrainedTokenizerFast"),
    "TikTokenizer": ("tiktoken:Encoding", "tiktoken_ext.openai_public:ENCODING_CONSTRUCTORS",
                     "megatron.core.tokenizers.text.libraries.tiktoken_tokenizer:TikTokenTokenizer"),
}
_PACKAGE_OF = {"tiktoken_ext": "tiktoken", "megatron": "megatron-core"}


def check_tokenizer_libraries(types=None) -> dict[str, list[str]]:
    """Import the libraries behind each tokenizer type (default: all of ``TOKENIZER_TYPES``).

    Returns ``{type: ["module version", ...]}``; raises ImportError naming the tokenizer type and
    the package to install when one is missing. The container build runs this for every type."""
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for tokenizer_type in TOKENIZER_TYPES if types is None else types:
        if tokenizer_type not in TOKENIZER_LIBRARIES:
            raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
        found = []
        for spec in TOKENIZER_LIBRARIES[tokenizer_type]:
            module, _, attr = spec.partition(":")
            top = module.split(".")[0]
            package = _PACKAGE_OF.get(top, top)
            try:
                mod = importlib.import_module(module)
                if attr:
                    getattr(mod, attr)
            except (ImportError, AttributeError) as exc:
                raise ImportError(f"tokenizer type {tokenizer_type} needs {spec} (pip package {package!r}): "
                                  f"{type(exc).__name__}: {exc}") from exc
            try:
                found.append(f"{module} {version(package)}")
            except PackageNotFoundError:
                found.append(module)
        out[tokenizer_type] = list(dict.fromkeys(found))
    return out


# --------------------------------------------------------------------------- entry point
def load_tokenizer(tokenizer_type: str, model_path: str, **kwargs) -> Tokenizer:
    """Load a tokenizer by Megatron-LM type name from a local file or directory.

    ``SentencePieceTokenizer`` (also ``GPTSentencePieceTokenizer``, ``Llama2Tokenizer``): a .model file;
    ``HuggingFaceTokenizer``: a directory (or tokenizer.json), or a Hub id (see the class);
    ``TikTokenizer``: a .tiktoken file (or Megatron's .json vocabulary); ``GPT2BPETokenizer``: the
    vocab.json with ``merge_file=`` merges.txt (or a directory holding both). Raises ValueError
    naming the path on any problem.
    """
    if tokenizer_type not in LOADABLE_TYPES:
        raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; choose one of {', '.join(LOADABLE_TYPES)}")
    hub = tokenizer_type == "HuggingFaceTokenizer" and model_path is not None and is_hub_id(str(model_path))
    if model_path is None or not (Path(model_path).exists() or hub):
        raise ValueError(f"{tokenizer_type}: tokenizer model not found: {model_path}")
    try:
        if tokenizer_type in SENTENCEPIECE_TYPES:
            return SentencePieceTokenizer(model_path, **kwargs)
        if tokenizer_type == "HuggingFaceTokenizer":
            return HuggingFaceTokenizer(model_path, **kwargs)
        if tokenizer_type == "GPT2BPETokenizer":
            return GPT2BPETokenizer(model_path, **kwargs)
        return TikTokenizer(model_path, **kwargs)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - name the file whatever the library raised
        raise ValueError(f"{model_path}: cannot load as {tokenizer_type}: {type(exc).__name__}: {exc}") from exc
