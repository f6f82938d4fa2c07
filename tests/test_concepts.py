"""Concept bank, offline matcher cases, spaCy reduction, token spans in open_clip's tokenizer,
``ovss captions inspect``."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from featurestore.errors import OvssError
from methods.concepts import (
    ConceptBank,
    OfflineMatcher,
    SpacyMatcher,
    annotate_caption,
    inspect_captions,
    load_spacy,
    normalize_name,
    singular_forms,
)
from methods.simzss import get_tokenizer


def _names(matches):
    return [m.name for m in matches]


@pytest.fixture(scope="module")
def bank():
    return ConceptBank.build()


def test_bank_is_the_union_of_both_families_with_synonyms(bank, tmp_path):
    for name in ("person in shirt", "traffic light", "aeroplane", "tvmonitor", "wall", "sky"):
        assert bank.id(name) is not None, name
    assert bank.id("background") is None and bank.id("sky-other") is None  # [ours] rules
    assert normalize_name(" Wall-Other ") == "wall" and list(bank.names) == sorted(bank.names)
    extra = tmp_path / "mine.txt"
    extra.write_text("Zebra crossing\nunicorn; pegasus\n")
    b2 = ConceptBank.build(extra)
    assert {"zebra crossing", "unicorn", "pegasus"} <= set(b2.names)
    assert len(b2) == len(bank) + 3 and b2.key() != bank.key()
    with pytest.raises(OvssError, match="cannot read the concept file"):
        ConceptBank.build(tmp_path / "missing.txt")
    with pytest.raises(OvssError, match="empty"):
        ConceptBank.from_names(["background", "  "])


def test_singular_rules():
    assert singular_forms("buses") == ["bus", "buse"]
    assert singular_forms("berries")[0] == "berry" and "leaf" in singular_forms("leaves")
    assert singular_forms("glass") == [] and singular_forms("dogs") == ["dog"]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Two dogs and three buses", ["dog", "bus"]),  # plurals
        ("leaves on the sands", ["leaves", "sands"]),  # exact bank words win over singulars
        ("a traffic light near a light", ["traffic light", "light"]),  # multi-word, longest first
        ("a person in shirt", ["person in shirt"]),  # overlapping: person / shirt inside
        ("a dog, a dog and a DOG!", ["dog", "dog", "dog"]),  # repeated, case, punctuation
        ("traffic, light", ["traffic light"][:0] + ["light"]),  # punctuation breaks a phrase
        ("a traffic-light", ["traffic light"]),  # hyphen joins words
        ("dogsleds and a catalogue", []),  # word boundaries: no substring matches
        ("nothing to see here", []),  # no concept
    ],
)
def test_offline_matcher_cases(bank, text, expected):
    assert _names(OfflineMatcher(bank).find(text)) == expected


def test_custom_bank_plural_rules():
    b = ConceptBank.from_names(["berry", "knife", "box", "glass"])
    found = OfflineMatcher(b).find("berries, knives, boxes and glasses")
    assert _names(found) == ["berry", "knife", "box", "glass"]


def test_token_spans_index_the_tokenizer(bank):
    tok = get_tokenizer(77)
    m = OfflineMatcher(bank)
    a = annotate_caption("A dog's T-shirt next to two traffic lights.", m, tok)
    assert a.tokens.tolist() == tok(["A dog's T-shirt next to two traffic lights."])[0].tolist()
    got = {o.name: tok.decode(a.tokens[o.tokens].tolist()).strip() for o in a.concepts}
    assert got["dog"] == "dog" and got["traffic light"] == "traffic lights"
    assert all(0 < i < 76 for o in a.concepts for i in o.tokens)
    # an occurrence beyond the context is dropped and counted
    long = "word " * 20 + "a dog"
    short = annotate_caption(long, m, get_tokenizer(16), 16)
    assert short.concepts == [] and short.truncated == 1


def test_spacy_reduction_root_plus_first_compound_lemmatised(bank):
    spacy = pytest.importorskip("spacy")
    from spacy.tokens import Doc

    nlp = spacy.blank("en")
    # "the red traffic lights near two tall trees ." parsed by hand (a real parser gives this)
    words = ["the", "red", "traffic", "lights", "near", "two", "tall", "trees", "."]
    doc = Doc(
        nlp.vocab,
        words=words,
        heads=[3, 3, 3, 3, 3, 7, 7, 4, 3],
        deps=["det", "amod", "compound", "ROOT", "prep", "nummod", "amod", "pobj", "punct"],
        pos=["DET", "ADJ", "NOUN", "NOUN", "ADP", "NUM", "ADJ", "NOUN", "PUNCT"],
        lemmas=["the", "red", "traffic", "light", "near", "two", "tall", "tree", "."],
    )
    found = SpacyMatcher(bank, nlp).find_in_doc(doc)
    assert _names(found) == ["traffic light", "tree"]
    tl = found[0]
    assert doc.text[tl.start : tl.end] == "traffic lights" and len(tl.chars) == 2


def test_spacy_model_errors_are_one_line(bank):
    pytest.importorskip("spacy")
    with pytest.raises(OvssError, match="cannot load the spaCy model 'no_such_pipeline'") as e:
        load_spacy("no_such_pipeline")
    assert "\n" not in str(e.value)


def test_inspect_report_and_cli(tmp_path):
    from ovss_cli.main import cli

    p = tmp_path / "caps.jsonl"
    p.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"image": "a", "caption": "Two dogs on the grass."},
                {"image": "b", "caption": "nothing here"},
                {"image": "b", "caption": "a dog"},
            ]
        )
    )
    rep = inspect_captions(p, limit=2)
    assert len(rep.rows) == 2 and rep.summary["captions"] == 3
    assert rep.summary["captions_without_concept"] == 1
    assert rep.frequencies == {"dog": 2, "grass": 1}
    assert rep.rows[0]["concepts"][0] == {"name": "dog", "tokens": [2], "text": "dogs"}
    r = CliRunner().invoke(cli, ["captions", "inspect", "--captions", str(p), "--json", "-q"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["frequencies"]["dog"] == 2 and d["summary"]["matcher"] == "offline"
    r = CliRunner().invoke(cli, ["captions", "inspect", "--captions", str(tmp_path / "x.csv")])
    assert r.exit_code == 1 and "no caption file" in r.output and "Traceback" not in r.output
