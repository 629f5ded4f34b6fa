"""--split-sentences: nltk's punkt splitter as Megatron-LM builds and applies it (nltk is optional)."""

from __future__ import annotations

from periln_megatron.data.preprocess.inputs import InputError

# Megatron-LM splits a text into sentences this many characters at a time (then joins the lists)
SPLIT_CHARS = 1_000_000


class _CustomLanguageVars:
    """Megatron-LM's --keep-newlines punkt variables (built lazily: nltk is optional): the period
    context also takes the word before and the whitespace after a sentence end, so the whitespace
    (newlines) stays at the end of the sentence instead of being dropped between sentences."""

    _cls = None

    @classmethod
    def make(cls):
        if cls._cls is None:
            from nltk.tokenize.punkt import PunktLanguageVars

            class CustomLanguageVars(PunktLanguageVars):
                _period_context_fmt = r"""
        \S*                          # some word material
        %(SentEndChars)s             # a potential sentence ending
        \s*                          # the whitespace after it, kept with the sentence
        (?=(?P<after_tok>
            %(NonWord)s              # either other punctuation
            |
            (?P<next_tok>\S+)        # or the next token (right after that whitespace)
        ))"""

            cls._cls = CustomLanguageVars
        return cls._cls()


def build_splitter(lang: str, keep_newlines: bool):
    """nltk's punkt sentence splitter for `lang` as Megatron-LM builds it (``nltk.load`` of
    ``tokenizers/punkt/{lang}.pickle``, which nltk >= 3.9 serves from its ``punkt_tab`` data); with
    `keep_newlines` a PunktSentenceTokenizer of the same parameters with `_CustomLanguageVars`.
    Nothing is downloaded: InputError (one line) when nltk or the model is missing."""
    try:
        import nltk
        from nltk.tokenize.punkt import PunktSentenceTokenizer
    except ImportError:
        raise InputError("--split-sentences needs nltk (pip install nltk) and its punkt model for "
                         f"--lang {lang} (python -m nltk.downloader punkt_tab)") from None
    try:
        splitter = nltk.load(f"nltk:tokenizers/punkt/{lang}.pickle")
    except LookupError:
        raise InputError(f"--split-sentences: nltk's punkt model for --lang {lang} is not installed (searched "
                         f"{', '.join(nltk.data.path)}); nothing is downloaded here: install it once with "
                         f"`python -m nltk.downloader punkt_tab` (NLTK_DATA=DIR to choose where)") from None
    except (ValueError, OSError) as exc:
        raise InputError(f"--split-sentences: cannot load nltk's punkt model for --lang {lang}: "
                         f"{' '.join(str(exc).split())}") from None
    if keep_newlines:
        return PunktSentenceTokenizer(train_text=splitter._params, lang_vars=_CustomLanguageVars.make())
    return splitter


def split_sentences(splitter, text: str) -> list[str]:
    """Megatron-LM's sentence split: punkt on each SPLIT_CHARS characters in turn, lists joined."""
    return [s for i in range(0, len(text), SPLIT_CHARS) for s in splitter.tokenize(text[i:i + SPLIT_CHARS])]
