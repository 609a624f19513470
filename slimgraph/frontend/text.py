"""English sentences that install with Python itself (no download), for text calibration and for
distilling sentence encoders: the documentation topics behind ``help()`` and the docstrings of the
standard library's own source files (read with ``ast``, never imported)."""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

_CODE = re.compile(r"[{}\[\]=<>|`\\#$@^~]|::|\.\w+\(|\w_\w")
_SKIPPED_PACKAGES = ("test", "idlelib", "lib2to3", "site-packages", "tkinter", "turtledemo")


@functools.cache
def documentation_sentences() -> tuple[str, ...]:
    """Prose sentences of the Python documentation topics (``pydoc_data.topics``) and of the
    standard library's docstrings, deduplicated, in a fixed order (topics first)."""
    seen: dict[str, None] = {}  # insertion-ordered set
    for text in (*_topics(), *_stdlib_docstrings()):
        for sentence in _prose(text):
            seen.setdefault(sentence)
    return tuple(seen)


def _topics() -> Iterator[str]:
    import pydoc_data.topics as topics

    for key in sorted(topics.topics):
        yield topics.topics[key]


def _stdlib_docstrings() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in _SKIPPED_PACKAGES or path.name.startswith("_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def _prose(text: str) -> Iterator[str]:
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in paragraph.splitlines()]
        if any(line.startswith((">>>", "...", "$ ")) for line in lines):
            continue
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", " ".join(lines)):
            words = sentence.split()
            letters = sum(c.isalpha() or c == " " for c in sentence)
            if 6 <= len(words) <= 48 and sentence[-1] in ".!?" and not _CODE.search(sentence) \
                    and letters >= 0.85 * len(sentence):
                yield sentence


def split_sentences(sentences: Sequence[str], held_out_every: int = 6) -> tuple[list[str], list[str]]:
    """A disjoint train / held-out split by a stable hash of each sentence."""
    train, held = [], []
    for s in sentences:
        digest = int(hashlib.sha256(s.encode()).hexdigest()[:8], 16)
        (held if digest % held_out_every == 0 else train).append(s)
    return train, held
