"""Hugging Face tokenizers: a local directory or tokenizer.json, or a Hub id (from the local Hub
cache, else downloaded by transformers; offline: a one-line error)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from periln_megatron.data.tokenizers.base import EOD_PIECES, Tokenizer


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face tokenizer, as Megatron-LM 0.16's preprocessing uses it: the text's own tokens
    only, no BOS or other template tokens, unless ``include_special_tokens`` (Megatron-LM's
    ``--tokenizer-hf-include-special-tokens``) asks for ``tokenizer(text).input_ids``.
    EOD = ``eos_token_id``, vocab size = ``len(tokenizer)``.

    ``path``: a local directory (or tokenizer.json), or a Hub id (``name`` or ``org/name``) that is
    not a local path: loaded from the local Hub cache if there, else downloaded by transformers
    (``HF_HUB_OFFLINE=1`` forbids that). Failure is a ValueError of one line naming the id."""

    def __init__(self, path: str, include_special_tokens: bool = False):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        self.name = str(path)
        p = Path(path)
        if p.is_file() and p.suffix == ".json":
            self.tok = PreTrainedTokenizerFast(tokenizer_file=str(p))
        elif p.exists():
            self.tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        else:
            self.tok = _hub_tokenizer(str(path))
        self.vocab_size = len(self.tok)
        eod = self.tok.eos_token_id
        if eod is None:
            for piece in EOD_PIECES:
                tid = self.tok.convert_tokens_to_ids(piece)
                if tid is not None and tid != self.tok.unk_token_id:
                    eod = tid
                    break
        if eod is None:
            raise ValueError(f"{path}: the tokenizer has no eos token to use as end-of-document")
        self.eod_id = int(eod)
        self.include_special_tokens = include_special_tokens

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tok(list(texts), add_special_tokens=self.include_special_tokens)["input_ids"]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


# --------------------------------------------------------------------------- Hugging Face Hub
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def is_hub_id(name: str) -> bool:
    """Whether `name` can be a Hugging Face Hub repository id (``name`` or ``org/name``) rather than
    a path: no leading ``/``, ``.`` or ``~``, at most one ``/``, no ``..``."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split("\n")[:1]).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _hub_tokenizer(name: str):
    """AutoTokenizer for a Hub id: the local Hub cache first (no network), then a download unless
    offline. Any failure is a one-line ValueError (transformers' retry warnings are silenced)."""
    import logging
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    from transformers import AutoTokenizer

    where = f"{name}: not a local file or directory"
    if not is_hub_id(name):
        raise ValueError(f"{where} (nor a Hugging Face Hub id such as org/name)")
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache (or a broken entry): try the Hub below
        pass
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"{where}, and Hugging Face Hub tokenizer {name!r} is not in the local cache "
                         f"({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set: download it where there is "
                         f"a network, or give a local directory")
    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    if not any(os.environ.get(v) for v in _PROXY_VARS):  # no proxy: a host that does not resolve is offline
        try:
            socket.getaddrinfo(host, 443)
        except OSError as exc:
            raise ValueError(f"{where}, and Hugging Face Hub tokenizer {name!r} is not in the local cache "
                             f"({constants.HF_HUB_CACHE}) and {host} cannot be reached (offline? {exc}): "
                             f"give a local directory") from None
    quiet = [logging.getLogger(n) for n in ("huggingface_hub", "transformers")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - one line whatever the Hub or transformers raised
        raise ValueError(f"{where}, and Hugging Face Hub tokenizer {name!r} could not be loaded: "
                         f"{_first_line(exc)}") from None
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
