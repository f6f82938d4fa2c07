"""Concepts in captions (SimZSS, METHODS.md §2): the concept bank, the matchers, token spans.

*Concept bank*: the union of the class names of every shipped benchmark class file
(``featurestore/data/classnames``, both families, every synonym its own name) plus an optional
user file (one concept per line; ``", "`` / ``"; "`` separated names on a line are each a
concept). Names are lowercased and whitespace-collapsed; [ours] COCO-Stuff's ``-other`` and
``-stuff`` suffixes are dropped (``sky-other`` -> ``sky``: no caption says "sky-other") and the
literal ``background`` is left out (it names no visual thing). Each distinct name is one
concept; its id is its index in the sorted bank [ours: synonyms of one class are distinct
concepts, as the paper's concepts are phrases].

*Matchers* turn a caption into concept occurrences with their character spans:

- :class:`OfflineMatcher` [ours: the paper uses spaCy]: needs nothing. Text lowercased, words
  are letter/digit runs; a multi-word concept matches consecutive words separated only by
  spaces or hyphens (punctuation breaks it); the last word may be a plural (simple English
  rules: ``-s``, ``-es``, ``-ies`` -> ``-y``, ``-ves`` -> ``-f``/``-fe``; an exact bank word
  wins); longest match first at each position, scanning left to right, matches do not
  overlap; every occurrence of a repeated concept is kept.
- :class:`SpacyMatcher` (the paper's way; optional extra ``nlp``): spaCy noun chunks, each
  reduced to its root noun plus the root's first ``compound`` child, lemmatised, kept only when
  the reduced phrase is in the bank. ``--spacy-model`` names an installed package or a path;
  nothing is downloaded.

*Token spans*: :func:`annotate_caption` maps every occurrence to the indices of the open_clip
tokens it spans (position 0 is the start-of-text token), using the tokenizer's own cleaning and
pre-tokenisation, so the spans index the rows of the text tower's token embeddings. An
occurrence cut off by the context length is dropped (counted).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from featurestore.errors import OvssError

#: Words of the offline matcher: runs of letters or digits (lowercased text).
_WORD = re.compile(r"[^\W_]+")
#: What may separate the words of one multi-word concept [ours]: spaces and hyphens only.
_JOIN = re.compile(r"[\s-]+")
#: [ours] suffixes dropped from bank names (COCO-Stuff's ``wall-other``, ``desk-stuff``).
_DROP_SUFFIXES = ("-other", "-stuff")
#: [ours] names left out of the bank.
_EXCLUDED = frozenset({"background"})


class ConceptError(OvssError):
    """The concept bank or a concept file is unusable (empty, unreadable, bad spaCy model).

    Attributes:
        path: the file concerned ('' when none).
        reason: ``empty``, ``unreadable`` or ``spacy``.
    """

    def __init__(self, message: str, path: str = "", reason: str = "empty"):
        super().__init__(message)
        self.path = path
        self.reason = reason


def normalize_name(name: str) -> str:
    """A bank name as matched: lowercased, whitespace collapsed, [ours] ``-other``/``-stuff``
    suffixes dropped. Returns '' for names that cannot be concepts."""
    n = " ".join(name.lower().split())
    for suf in _DROP_SUFFIXES:
        if n.endswith(suf):
            n = n[: -len(suf)]
    return "" if n in _EXCLUDED else n


def name_words(name: str) -> tuple[str, ...]:
    """The words of a (normalised) name, as the offline matcher sees them."""
    return tuple(_WORD.findall(name.lower()))


def _classname_files() -> list[Path]:
    import importlib.resources

    from featurestore.datasets import CLASSNAMES_PACKAGE

    root = Path(str(importlib.resources.files(CLASSNAMES_PACKAGE) / "classnames"))
    return sorted(root.rglob("*.txt"))


@dataclass(frozen=True)
class ConceptBank:
    """The concepts SimZSS looks for in captions.

    Attributes:
        names: the distinct normalised concept names, sorted; a concept's id is its index.
        sources: the files the names came from (shipped class files, then the user's).
    """

    names: tuple[str, ...]
    sources: tuple[str, ...] = ()
    _index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.names:
            raise ConceptError(
                "the concept bank is empty: give a --concepts file with one concept per line"
            )
        self._index.update({n: i for i, n in enumerate(self.names)})

    @classmethod
    def from_names(cls, names: Iterable[str], sources: Sequence[str] = ()) -> ConceptBank:
        """A bank of these names (normalised, deduplicated, sorted)."""
        norm = {normalize_name(n) for n in names}
        return cls(tuple(sorted(n for n in norm if n and name_words(n))), tuple(sources))

    @classmethod
    def build(cls, extra: str | Path | None = None, shipped: bool = True) -> ConceptBank:
        """The default bank: every shipped class file (``shipped``) plus the file ``extra``.

        Raises:
            ConceptError: ``extra`` cannot be read, or the bank ends up empty.
        """
        from featurestore.datasets import read_class_file

        names: list[str] = []
        sources: list[str] = []
        if shipped:
            for p in _classname_files():
                names += [s for c in read_class_file(p) for s in c]
                sources.append(f"classnames/{p.parent.name}/{p.name}")
        if extra:
            p = Path(extra).expanduser()
            try:
                text = p.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as e:
                raise ConceptError(
                    f"cannot read the concept file {p}: {e.strerror or e}",
                    str(p),
                    "unreadable",
                ) from None
            sep = "; " if "; " in text else ", "
            mine = [s.strip() for line in text.splitlines() for s in line.split(sep)]
            if not any(normalize_name(s) for s in mine):
                raise ConceptError(f"the concept file {p} names no concept", str(p), "empty")
            names += mine
            sources.append(str(p))
        return cls.from_names(names, sources)

    def __len__(self) -> int:
        return len(self.names)

    def id(self, name: str) -> int | None:
        """The id of a normalised name, or None."""
        return self._index.get(name)

    def key(self) -> str:
        """16 hex digits of the sha256 of the sorted names (the bank's identity)."""
        return hashlib.sha256("\n".join(self.names).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ConceptMatch:
    """One occurrence of a concept in a caption.

    Attributes:
        concept: the concept id in the bank.
        name: the concept's bank name.
        start, end: character span in the text the matcher was given (``end`` exclusive); for
            spaCy, the span of the compound and the root; ``chars`` lists the covered ranges.
        chars: the character ranges of the words that make the concept (one per word).
    """

    concept: int
    name: str
    start: int
    end: int
    chars: tuple[tuple[int, int], ...] = ()


class Matcher(Protocol):
    name: str

    def find(self, text: str) -> list[ConceptMatch]: ...


def singular_forms(word: str) -> list[str]:
    """Candidate singulars of a (lowercase) word, most specific first [ours]: ``-ies`` -> ``-y``,
    ``-ves`` -> ``-f`` / ``-fe``, ``-es`` -> drop ``es``, ``-s`` -> drop ``s`` (not ``-ss``)."""
    out: list[str] = []
    if len(word) > 3 and word.endswith("ies"):
        out.append(word[:-3] + "y")
    if len(word) > 3 and word.endswith("ves"):
        out += [word[:-3] + "f", word[:-3] + "fe"]
    if len(word) > 2 and word.endswith("es"):
        out.append(word[:-2])
    if len(word) > 1 and word.endswith("s") and not word.endswith("ss"):
        out.append(word[:-1])
    return out


class OfflineMatcher:
    """Longest-match-first concept finder against a bank (see the module doc) [ours]."""

    name = "offline"

    def __init__(self, bank: ConceptBank):
        self.bank = bank
        self._by_words: dict[tuple[str, ...], int] = {}
        for i, n in enumerate(bank.names):
            self._by_words.setdefault(name_words(n), i)
        self.max_words = max(len(w) for w in self._by_words)

    def find(self, text: str) -> list[ConceptMatch]:
        low = text.lower()
        words = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(low)]
        out: list[ConceptMatch] = []
        i = 0
        while i < len(words):
            hit = self._longest(low, words, i)
            if hit is None:
                i += 1
                continue
            n, cid = hit
            chars = tuple((s, e) for _, s, e in words[i : i + n])
            out.append(ConceptMatch(cid, self.bank.names[cid], chars[0][0], chars[-1][1], chars))
            i += n
        return out

    def _longest(self, low: str, words, i: int) -> tuple[int, int] | None:
        for n in range(min(self.max_words, len(words) - i), 0, -1):
            seg = words[i : i + n]
            if any(
                not _JOIN.fullmatch(low[a[2] : b[1]]) for a, b in zip(seg, seg[1:], strict=False)
            ):
                continue  # punctuation between the words: not one phrase
            head = tuple(w for w, _, _ in seg[:-1])
            last = seg[-1][0]
            for form in (last, *singular_forms(last)):
                cid = self._by_words.get((*head, form))
                if cid is not None:
                    return n, cid
        return None


class SpacyMatcher:
    """spaCy noun chunks -> root noun + its first compound, lemmatised, kept when in the bank.

    Args:
        bank: the concept bank.
        model: an installed spaCy package name or a path to a pipeline folder (with a parser);
            or a loaded ``spacy.Language``.
    """

    name = "spacy"

    def __init__(self, bank: ConceptBank, model: Any):
        self.bank = bank
        if isinstance(model, str | Path):
            self.nlp = load_spacy(str(model))
            self.model_name = str(model)
        else:
            self.nlp = model
            self.model_name = str(getattr(model, "meta", {}).get("name", "custom"))

    def find(self, text: str) -> list[ConceptMatch]:
        return self.find_in_doc(self.nlp(text))

    def find_in_doc(self, doc: Any) -> list[ConceptMatch]:
        """Matches of a parsed ``spacy.tokens.Doc`` (its text is the matched text)."""
        out = []
        for chunk in doc.noun_chunks:
            root = chunk.root
            comp = next((t for t in root.children if t.dep_ == "compound"), None)
            toks = sorted([root] if comp is None else [comp, root], key=lambda t: t.i)
            name = normalize_name(" ".join(t.lemma_ or t.text for t in toks))
            cid = self.bank.id(name)
            if cid is None:
                continue
            chars = tuple((t.idx, t.idx + len(t.text)) for t in toks)
            out.append(ConceptMatch(cid, name, chars[0][0], chars[-1][1], chars))
        return out


def load_spacy(model: str) -> Any:
    """Load an installed spaCy pipeline (package name or folder); never downloads.

    Raises:
        ConceptError: spaCy is not installed, or the model cannot be loaded.
    """
    try:
        import spacy
    except ImportError:
        raise ConceptError(
            "spaCy is not installed: pip install 'ovss[nlp]' plus an English pipeline, or leave "
            "out --spacy-model to use the offline matcher",
            reason="spacy",
        ) from None
    try:
        return spacy.load(model)
    except (OSError, ValueError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConceptError(
            f"cannot load the spaCy model '{model}' (an installed package or a folder; nothing "
            f"is downloaded): {first}",
            model,
            "spacy",
        ) from None


def make_matcher(bank: ConceptBank, spacy_model: str | None = None) -> Matcher:
    """:class:`SpacyMatcher` when ``spacy_model`` is given, else :class:`OfflineMatcher`."""
    return SpacyMatcher(bank, spacy_model) if spacy_model else OfflineMatcher(bank)


# --------------------------------------------------------------------------------------------
# Token spans in open_clip's tokenizer
# --------------------------------------------------------------------------------------------


@dataclass
class ConceptOccurrence:
    """A concept of a caption with the text-tower token indices it spans.

    Attributes:
        concept: concept id in the bank; name: its name.
        tokens: indices into the caption's token sequence (0 = start-of-text).
        start, end: character span in the cleaned caption.
    """

    concept: int
    name: str
    tokens: list[int]
    start: int
    end: int


@dataclass
class AnnotatedCaption:
    """A caption as SimZSS trains on it.

    Attributes:
        text: the caption as given; cleaned: after the tokenizer's cleaning (spans refer to it).
        tokens: ``(context_length,)`` int64 token ids (open_clip layout: SOT ... EOT, zeros).
        concepts: the occurrences kept; truncated: occurrences dropped by the context length.
    """

    text: str
    cleaned: str
    tokens: Any
    concepts: list[ConceptOccurrence]
    truncated: int = 0


def _piece_token_counts(tokenizer: Any, cleaned: str) -> list[tuple[int, int, int]]:
    """``(start, end, n_bpe_tokens)`` of each pre-tokenisation piece of ``cleaned``, as
    open_clip's ``SimpleTokenizer.encode`` splits it."""
    import regex

    pieces = []
    for m in regex.finditer(tokenizer.pat, cleaned):
        piece = "".join(tokenizer.byte_encoder[b] for b in m.group().encode("utf-8"))
        pieces.append((m.start(), m.end(), len(tokenizer.bpe(piece).split(" "))))
    return pieces


def annotate_caption(
    text: str, matcher: Matcher, tokenizer: Any, context_length: int = 77
) -> AnnotatedCaption:
    """Tokenise ``text`` and find its concepts with their token indices.

    Args:
        text: the caption.
        matcher: an :class:`OfflineMatcher` or :class:`SpacyMatcher`.
        tokenizer: open_clip's ``SimpleTokenizer`` (``open_clip.get_tokenizer``).
        context_length: the text tower's context (77).

    Returns:
        An :class:`AnnotatedCaption`; ``tokens`` equals ``tokenizer([text], context_length)[0]``.
    """
    cleaned = tokenizer.clean_fn(text)
    tokens = tokenizer([text], context_length=context_length)[0]
    starts, ends, first = [], [], []
    pos = 1  # after the start-of-text token
    for s, e, n in _piece_token_counts(tokenizer, cleaned):
        starts.append(s)
        ends.append(e)
        first.append((pos, n))
        pos += n
    occ: list[ConceptOccurrence] = []
    dropped = 0
    for m in matcher.find(cleaned):
        idx: list[int] = []
        for a, b in m.chars or ((m.start, m.end),):
            for s, e, (p0, n) in zip(starts, ends, first, strict=True):
                if s < b and e > a:  # the piece overlaps the word
                    idx.extend(range(p0, p0 + n))
        idx = sorted(set(idx))
        if not idx:
            continue
        if idx[-1] >= context_length - 1:  # the last position holds the end-of-text token
            dropped += 1
            continue
        occ.append(ConceptOccurrence(m.concept, m.name, idx, m.start, m.end))
    return AnnotatedCaption(text, cleaned, tokens, occ, dropped)


@dataclass
class CaptionsReport:
    """What ``ovss captions inspect`` shows.

    Attributes:
        rows: per caption shown: ``image``, ``caption`` (cleaned), ``concepts`` (``name``,
            ``tokens``: token indices, ``text``: the spanned characters).
        summary: counts (captions, images, unknown images, empty captions, captions without a
            concept, occurrences, occurrences cut by the context), the bank and the matcher.
        frequencies: ``{concept: occurrences}``, most frequent first.
        unknown: ``(image key, caption, line)`` of captions whose image is not in the store.
    """

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    frequencies: dict[str, int]
    unknown: list[tuple[str, str, int]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "frequencies": self.frequencies,
            "captions": self.rows,
            "unknown": [{"image": i, "caption": c, "line": n} for i, c, n in self.unknown],
        }


def inspect_captions(
    captions: str | Path,
    store: Any = None,
    concepts: str | Path | None = None,
    spacy_model: str | None = None,
    limit: int | None = 20,
    context_length: int = 77,
    progress: Any = None,
) -> CaptionsReport:
    """Find the concepts of every caption of a file, as SimZSS training would.

    Args:
        captions: the caption file (``featurestore.captions`` formats).
        store: a store (or path) to join the captions to; None: every caption is shown
            under its image key, none counts as unknown.
        concepts: extra concept file for the bank; spacy_model: see :func:`make_matcher`.
        limit: captions listed in ``rows`` (None: all); the summary counts all of them.
        progress: ``(label, done, total)`` callback.
    """
    from featurestore.captions import join_captions, read_caption_rows
    from methods.simzss import get_tokenizer

    if store is not None and not hasattr(store, "image_table"):
        from featurestore.store import FeatureStore

        store = FeatureStore.open(store)
    if store is not None:
        join = join_captions(captions, store)
        ids = store.image_ids
        items = [(ids[i], c) for i, c in join.pairs]
        summary = join.summary()
        unknown = join.unknown
    else:
        from featurestore.captions import file_sha256

        fmt, rows = read_caption_rows(captions)
        items = [(r.keys[0], r.caption) for r in rows if r.caption]
        summary = {
            "captions_file": str(captions),
            "format": fmt,
            "sha256": file_sha256(Path(captions).expanduser()),
            "rows": len(rows),
            "captions": len(items),
            "images": len({i for i, _ in items}),
            "empty_captions": len(rows) - len(items),
        }
        unknown = []
    bank = ConceptBank.build(concepts)
    matcher = make_matcher(bank, spacy_model)
    tok = get_tokenizer(context_length)
    freq: dict[str, int] = {}
    shown: list[dict[str, Any]] = []
    none = cut = occ = 0
    for n, (image, cap) in enumerate(items):
        a = annotate_caption(cap, matcher, tok, context_length)
        none += not a.concepts
        cut += a.truncated
        occ += len(a.concepts)
        for o in a.concepts:
            freq[o.name] = freq.get(o.name, 0) + 1
        if limit is None or len(shown) < limit:
            shown.append(
                {
                    "image": image,
                    "caption": a.cleaned,
                    "concepts": [
                        {"name": o.name, "tokens": o.tokens, "text": a.cleaned[o.start : o.end]}
                        for o in a.concepts
                    ],
                }
            )
        if progress and (n + 1 == len(items) or (n + 1) % 1000 == 0):
            progress("concepts", n + 1, len(items))
    summary.update(
        {
            "captions_without_concept": none,
            "concept_occurrences": occ,
            "occurrences_cut_by_context": cut,
            "distinct_concepts": len(freq),
            "concept_bank": f"{len(bank)} concepts ({bank.key()})",
            "matcher": matcher.name if not spacy_model else f"spacy ({spacy_model})",
        }
    )
    ordered = dict(sorted(freq.items(), key=lambda kv: (-kv[1], kv[0])))
    return CaptionsReport(shown, summary, ordered, list(unknown))


__all__ = [
    "AnnotatedCaption",
    "CaptionsReport",
    "ConceptBank",
    "ConceptError",
    "ConceptMatch",
    "ConceptOccurrence",
    "OfflineMatcher",
    "SpacyMatcher",
    "annotate_caption",
    "inspect_captions",
    "load_spacy",
    "make_matcher",
    "normalize_name",
    "singular_forms",
]
