"""Feature values in words (`milter.features.describe`) and the per-message word buckets behind them."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import in_ci

from milter.features import SCHEMA, Protected, extract
from milter.features.context import build
from milter.features.describe import DESCRIPTIONS, Amount, Count, Flag, Share, Size, describe
from milter.features.text import CORPUS_STOPWORDS, HASH_NAMES, MAX_TOKENS, bucket, bucket_grams, words
from milter.parse import parse
from milter.types import Envelope

ROOT = Path(__file__).resolve().parent.parent
CORPORA = ROOT / ".cache" / "corpora"
FIXTURES = ROOT / "fixtures"
from milter.stacking import STAGE_NAMES  # noqa: E402

# gram ids are read by the text stage only: the trees never split on them, so no explanation names one
NAMED = tuple(n for n in SCHEMA.names if not n.startswith(("tok_", "gram_")))
TOK0 = SCHEMA.names.index("tok_0000")
ODD_VALUES = (0.0, 1.0, 0.5, 3.7, math.log1p(12), 1e9, math.nan, -1.0, math.inf, -math.inf)


def corpus_sample(count: int) -> list[Path]:
    """Evenly spaced real messages across every corpus; CI unpacks the corpora, so there a missing
    corpus fails instead of skipping (as conftest does for services)."""
    files = sorted(CORPORA.glob("*/*/*.eml"))
    if not files:
        reason = f"no corpus under {CORPORA}: unpack with ../shared/corpora/unpack .cache/corpora"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    return files[:: max(1, len(files) // count)][:count]


def column(vector: np.ndarray, name: str) -> float:
    return float(vector[SCHEMA.names.index(name)])


# --- the table ------------------------------------------------------------------------------------


def test_every_named_feature_has_its_own_entry() -> None:
    assert set(DESCRIPTIONS) == set(NAMED) | set(STAGE_NAMES)  # the text stage's scores are explained too
    fallback = describe("no_such_feature", 1.0)
    assert "no_such_feature" in fallback
    for name in NAMED:
        assert name not in describe(name, 1.0)


@pytest.mark.parametrize("value", ODD_VALUES, ids=repr)
def test_phrases_are_short_ascii_for_any_value(value: float) -> None:
    for name in NAMED:
        text = describe(name, value)
        assert text, name
        assert text.isascii() and text.isprintable(), (name, text)
        assert len(text) <= 80, (name, text)
        assert not text.endswith("."), (name, text)
        assert text == text.strip(), (name, text)


def test_absence_reads_differently_from_presence() -> None:
    flags = [n for n, p in DESCRIPTIONS.items() if isinstance(p, Flag)]
    assert len(flags) > 50
    for name in NAMED:
        absent, present = describe(name, 0.0), describe(name, 1.0)
        assert absent != present, name
        # a column is absent to the trees exactly when it is not above zero (NaN reads as 0 in LightGBM)
        assert describe(name, math.nan) == describe(name, -1.0) == absent, name
        assert describe(name, 1e-6) != absent, name


def test_log_columns_render_the_count() -> None:
    assert describe("url_count_log", math.log1p(5)) == "5 links in the message"
    assert describe("url_count_log", math.log1p(1)) == "1 link in the message"
    assert describe("url_count_log", 0.0) == "no links in the message"
    assert describe("hdr_to_count_log", math.log1p(12)) == "12 addresses in To"
    assert describe("hdr_to_count_log", float(np.float32(math.log1p(4321)))) == "4,321 addresses in To"
    assert describe("msg_body_size_log", math.log1p(2048)) == "message body of 2.0 KiB"
    assert describe("msg_body_size_log", math.log1p(3 * 1024 * 1024)) == "message body of 3.0 MiB"
    assert describe("lang_payment", math.log1p(2)).startswith("2 payment phrases")
    assert describe("hdr_subject_upper_ratio", 0.25) == "25% of the subject's letters upper-case"
    assert describe("html_text_ratio", 0.001) == "under 1% of the HTML is visible text"
    assert describe("html_text_ratio", 0.999) == "over 99% of the HTML is visible text"
    assert describe("url_count_log", 1e9) == "1,000,000,000+ links in the message"


def test_unknown_names_and_values_never_raise() -> None:
    for name in ("", "tok_", "tok_99999", "tok_x", "lang_", "\udcff\u00e9", "a" * 500):
        for value in ODD_VALUES:
            text = describe(name, value)
            assert text and text.isascii(), (name, value, text)


# --- the table against the feature code ----------------------------------------------------------


def test_each_entry_kind_fits_the_values_its_column_takes() -> None:
    """Flags only ever hold 0/1, counts integers, log counts log1p(integer), shares 0..1: on the
    fixtures (attachments, defects, BEC) and real mail. A column described with the wrong kind (a
    ratio as a flag, a raw count as a log count) would render the wrong quantity."""
    paths = sorted(FIXTURES.rglob("*.eml")) + corpus_sample(150)
    vectors = np.stack([extract(p.read_bytes()).vector for p in paths])
    seen_nonzero = set()
    for name in NAMED:
        values = vectors[:, SCHEMA.names.index(name)].astype(np.float64)
        assert np.isfinite(values).all() and (values >= 0).all(), name
        if values.any():
            seen_nonzero.add(name)
        phrase = DESCRIPTIONS[name]
        if isinstance(phrase, Flag):
            assert set(np.unique(values)) <= {0.0, 1.0}, name
        elif isinstance(phrase, Count) and not phrase.log:
            assert (values == np.round(values)).all(), name
        elif isinstance(phrase, Count | Size):
            counts = np.expm1(values)
            assert (np.abs(counts - np.round(counts)) <= np.maximum(1e-3, counts * 1e-5)).all(), name
        elif isinstance(phrase, Share):
            assert (values <= 1.0).all(), name
        else:
            assert isinstance(phrase, Amount), name
    assert len(seen_nonzero) > 140  # the sample exercises most columns, or the checks above say little


def test_rendered_numbers_match_a_message_built_to_have_them() -> None:
    links = "".join(f'<a href="https://shop{i}.example.net/p">item {i}</a> ' for i in range(7))
    subject = "Your order of 23 things"
    raw = (
        f"From: Shop <news@example.net>\nTo: a@example.org, b@example.org, c@example.org\n"
        f"Subject: {subject}\nMIME-Version: 1.0\nContent-Type: text/html\n\n<p>{links}</p>\n"
    ).encode()
    v = extract(raw).vector
    assert describe("url_count_log", column(v, "url_count_log")) == "7 links in the message"
    assert describe("html_links", column(v, "html_links")) == "7 links in an HTML message"
    assert describe("url_domains", column(v, "url_domains")) == "links go to 1 domain"
    length = describe("hdr_subject_len", column(v, "hdr_subject_len"))
    assert length == f"subject {len(subject)} characters long"
    assert describe("hdr_subject_words", column(v, "hdr_subject_words")) == "5 words in the subject"
    assert describe("hdr_to_count_log", column(v, "hdr_to_count_log")) == "3 addresses in To"
    assert describe("mime_top_html_only", column(v, "mime_top_html_only")) == "HTML only, no plain-text part"
    assert describe("mime_has_text_plain", column(v, "mime_has_text_plain")) == "no plain-text part"
    assert describe("att_count", column(v, "att_count")) == "no attachments"


def test_rendered_numbers_match_real_messages() -> None:
    """On corpus mail with HTML and several links: the number in the words is the number of links
    and subject characters of the parsed message, not its log."""
    checked = 0
    for path in corpus_sample(400):
        raw = path.read_bytes()
        parsed = parse(raw)
        ctx = build(parsed, Envelope(), Protected())
        if ctx.html_tree is None or len(ctx.links) < 2 or len(parsed.subject) < 2:
            continue
        v = extract(raw).vector
        n = len(ctx.links)
        assert describe("url_count_log", column(v, "url_count_log")) == f"{n:,} links in the message", path
        assert describe("html_links", column(v, "html_links")) == f"{n:,} links in an HTML message", path
        expected = f"subject {len(parsed.subject):,} characters long"
        assert describe("hdr_subject_len", column(v, "hdr_subject_len")) == expected, path
        checked += 1
        if checked == 10:
            break
    assert checked == 10


# --- hashed word columns --------------------------------------------------------------------------


def test_word_columns_with_the_message_words() -> None:
    assert describe("tok_0123", 1.1, ["verify", "account now"]) == 'words "verify", "account now" in the text'
    assert describe("tok_0007", 0.7, ["click"]) == 'word "click" in the text'
    long = "x" * 40
    text = describe("tok_0001", 2.0, ["a", 'say "hi"', long, "fourth"], ["ignored"])
    assert text == f'words "a", "say \\"hi\\"", "{"x" * 30}" in the text'
    assert describe("tok_0002", 0.7, ["", "caf\u00e9"]) == 'word "caf\u00e9" in the text'


def test_word_columns_without_the_message_words() -> None:
    assert describe("tok_0123", 0.7) == "words of hashed group 123"
    assert describe("tok_0123", 0.7, (), ["click", "here", "now", "more"]) == (
        'words of hashed group 123 (such as "click", "here", "now")'
    )
    # absent: the message has none of the bucket's words, whatever the caller passed
    absent = describe("tok_1023", 0.0, ["stale"], ["click"])
    assert absent == 'none of the words of hashed group 1023 (such as "click")'
    assert describe("tok_0000", math.nan) == "none of the words of hashed group 0"


def test_bucket_grams_agree_with_the_hashed_vector() -> None:
    """The buckets `bucket_grams` names are exactly the nonzero hashed columns of `extract`, and their
    grams' occurrences add up to each column's count."""
    for path in corpus_sample(40):
        raw = path.read_bytes()
        parsed = parse(raw)
        ctx = build(parsed, Envelope(), Protected())
        text = parsed.subject + "\n" + ctx.body_text
        hashed = extract(raw).vector[TOK0 : TOK0 + len(HASH_NAMES)]
        assert len(hashed) == len(HASH_NAMES)
        everything = bucket_grams(text, limit=10**6)
        assert set(bucket_grams(text)) == set(everything) == {HASH_NAMES[i] for i in np.flatnonzero(hashed)}
        toks = [t for t in words(text)[:MAX_TOKENS] if t not in CORPUS_STOPWORDS]
        occurrences = Counter(toks) + Counter(map(" ".join, itertools.pairwise(toks)))
        for name, grams in everything.items():
            counts = [occurrences[g] for g in grams]
            assert counts == sorted(counts, reverse=True), (path, name)
            expected = math.expm1(float(hashed[HASH_NAMES.index(name)]))
            assert sum(counts) == pytest.approx(expected, rel=1e-4), (path, name)
            assert bucket_grams(text)[name] == grams[:3]


def colliding_words() -> tuple[str, str]:
    """Two two-letter words that share a bucket, while their bigrams land elsewhere."""
    pool = ["".join(p) for p in itertools.product("abcdefghijklmnopqrstuvwxyz", repeat=2)]
    for first, second in itertools.combinations(pool, 2):
        mine = bucket(first)
        pairs = (f"{first} {second}", f"{second} {first}", f"{first} {first}", f"{second} {second}")
        if bucket(second) == mine and all(bucket(p) != mine for p in pairs):
            return first, second
    raise AssertionError("no colliding pair")


def test_bucket_grams_order_and_limit() -> None:
    one, two = colliding_words()
    name = HASH_NAMES[bucket(one)]
    assert bucket_grams(f"{one} {two} {two}")[name] == (two, one)  # commonest first
    assert bucket_grams(f"{one} {two}")[name] == (one, two)  # a tie: first seen first
    assert bucket_grams(f"{two} {one}")[name] == (two, one)
    assert bucket_grams(f"{two} {one}", limit=1)[name] == (two,)
    # the same tokenisation as the hasher: case folded, digits as 0, corpus names and URLs dropped
    grams = bucket_grams("Verify 2024 Enron https://example.com/x verify", limit=50)
    every = {g for gs in grams.values() for g in gs}
    assert every == {"verify", "0", "verify 0", "0 verify"}
    # like the hasher, it reads the first MAX_TOKENS words only
    many = ["".join(p) for p in itertools.product("abcdefghij", repeat=4)][: MAX_TOKENS + 10]
    seen = {g for gs in bucket_grams(" ".join(many), limit=10**6).values() for g in gs}
    assert many[MAX_TOKENS - 1] in seen and many[MAX_TOKENS] not in seen
    assert bucket_grams("") == {}
