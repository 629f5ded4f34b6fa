"""Real English text carried in the repository (tests/data/) for tests and benchmarks.

Sources, sizes and licences: tests/data/README.md. Nothing here reads outside the repository,
and a missing or altered file raises ``CorpusError`` (no test may skip for lack of data).

    from corpus import shakespeare_speeches, wikitext_paragraphs, data_file

    data_file(TINYSHAKESPEARE)        # Path, e.g. for a tokenizer trainer's --input
    read_text(WIKITEXT2_VALID)        # the whole file as str
    shakespeare_speeches()            # ~7,200 short documents (blank-line separated speeches)
    wikitext_paragraphs("test")       # ~2,200 longer documents (one paragraph each)

Which text is "held out": the tests train their tokenizers on tinyshakespeare.txt and
wikitext2-valid.txt (TRAINING_FILES). wikitext2-test.txt is only ever encoded, never trained on:
use ``wikitext_paragraphs("test")`` for held-out English text.

Tokenizer settings differ between the files: tinyshakespeare.txt is plain ASCII with newlines;
the WikiText files are UTF-8, pre-tokenised (" , " " @-@ "), with a literal ``<unk>`` for rare
words and ``= Title =`` heading lines between articles.

(Imported by tests as ``corpus``: tests/conftest.py puts tests/ on sys.path. Scripts outside
tests/, such as benchmarks/, insert ``REPO / "tests"`` themselves.)
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"

TINYSHAKESPEARE = "tinyshakespeare.txt"
WIKITEXT2_VALID = "wikitext2-valid.txt"
WIKITEXT2_TEST = "wikitext2-test.txt"
TRAINING_FILES = (TINYSHAKESPEARE, WIKITEXT2_VALID)  # what the tests train tokenizers on
HELD_OUT_FILES = (WIKITEXT2_TEST,)

# name -> (bytes, sha256) of the files as committed; tests/data/README.md lists the same
FILES = {
    TINYSHAKESPEARE: (1_115_394, "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    WIKITEXT2_VALID: (1_121_681, "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
    WIKITEXT2_TEST: (1_256_449, "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
}
_HEADING = re.compile(r"=.*=")  # " = Title = ", " = = Section = = ", ... once stripped


class CorpusError(RuntimeError):
    """A carried text file is missing or is not the committed one."""


def data_file(name: str) -> Path:
    """Absolute path of one of FILES; raises CorpusError if it is missing or has the wrong size."""
    if name not in FILES:
        raise CorpusError(f"{name!r} is not carried in {DATA_DIR}; known: {', '.join(FILES)}")
    path = DATA_DIR / name
    if not path.is_file():
        raise CorpusError(f"{path} is missing: test text is committed in tests/data/ (see its README.md); "
                          "restore it from git")
    size = path.stat().st_size
    if size != FILES[name][0]:
        raise CorpusError(f"{path} holds {size:,} bytes, not the committed {FILES[name][0]:,} "
                          "(a Git LFS pointer, or line endings converted on checkout?)")
    return path


def verify(name: str) -> Path:
    """data_file(name), additionally checking the file's sha256 against FILES."""
    path = data_file(name)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != FILES[name][1]:
        raise CorpusError(f"{path}: sha256 {digest} is not the committed {FILES[name][1]}")
    return path


@lru_cache(maxsize=None)
def read_text(name: str) -> str:
    """The whole file, decoded as UTF-8."""
    return data_file(name).read_text(encoding="utf-8")


def tinyshakespeare_text() -> str:
    """The 1.1 MB of Shakespeare as one string (ASCII)."""
    return read_text(TINYSHAKESPEARE)


def shakespeare_speeches() -> list[str]:
    """tinyshakespeare.txt's speeches, in file order: the non-blank blocks between blank lines,
    each starting with the speaker's line ("First Citizen:"). Many short documents."""
    return [p for p in tinyshakespeare_text().split("\n\n") if p.strip()]


def wikitext_paragraphs(split: str = "valid") -> list[str]:
    """WikiText-2 paragraphs of the 'valid' or 'test' split, in file order, stripped, without the
    blank lines and the ``= Title =`` / ``= = Section = =`` heading lines. Each is one document
    (a paragraph holds no newline). 'test' is the held-out split."""
    names = {"valid": WIKITEXT2_VALID, "test": WIKITEXT2_TEST}
    if split not in names:
        raise ValueError(f"split must be 'valid' or 'test', not {split!r}")
    lines = (line.strip() for line in read_text(names[split]).splitlines())
    return [s for s in lines if s and not _HEADING.fullmatch(s)]
