"""English sentences that install with Python itself (no download), for text calibration and
for distilling sentence encoders: the documentation topics behind ``help()``."""

from __future__ import annotations

import hashlib
import re

_CODE = re.compile(r"[{}\[\]=<>|`\\#$@^~]|::|\.\w+\(|\w_\w")


def documentation_sentences() -> list[str]:
    """Prose sentences of the Python documentation topics that ship with CPython
    (``pydoc_data.topics``, the text behind ``help()``), deduplicated, in a fixed order."""
    import pydoc_data.topics as topics

    seen: dict[str, None] = {}
    for key in sorted(topics.topics):
        for paragraph in re.split(r"\n\s*\n", topics.topics[key]):
            lines = [line.strip() for line in paragraph.splitlines()]
            if any(line.startswith((">>>", "...", "$ ")) for line in lines):
                continue
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", " ".join(lines)):
                words = sentence.split()
                letters = sum(c.isalpha() or c == " " for c in sentence)
                if 6 <= len(words) <= 48 and sentence[-1] in ".!?" and not _CODE.search(sentence) \
                        and letters >= 0.85 * len(sentence):
                    seen.setdefault(sentence)
    return list(seen)


def split_sentences(sentences: list[str], held_out_every: int = 6) -> tuple[list[str], list[str]]:
    """A disjoint train / held-out split by a stable hash of each sentence."""
    train, held = [], []
    for s in sentences:
        digest = int(hashlib.sha256(s.encode()).hexdigest()[:8], 16)
        (held if digest % held_out_every == 0 else train).append(s)
    return train, held
