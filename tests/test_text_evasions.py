"""Words hidden from the text features by what a reader never sees.

A gift-card BEC (fixtures/bec/bec-gift-card-ceo.eml) is rewritten the ways a review found to move it
from quarantine to accept: zero-width characters and soft hyphens inside its words, empty inline tags,
comments and <wbr> inside the words of an HTML body, and trailing blank lines. (A harmless text/plain
beside an HTML part that carries the request still hides it: docs/DETECTION.md, "Reading mail as its
reader sees it", says why it is not fixed here.) Each variant must give the text features the plain
message gives.
"""

from __future__ import annotations

from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import numpy as np
import pytest
from selectolax.lexbor import LexborHTMLParser

from milter.classifier import Classifier
from milter.config import DEFAULT_MODEL, PolicyConfig
from milter.features import SCHEMA, Extracted, extract
from milter.features import text as text_features
from milter.features.visible import visible_text
from milter.policy import Policy
from milter.types import Action, Envelope, Scores, Verdict

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "bec" / "bec-gift-card-ceo.eml"
META = {"spam": {"tag": 0.5, "quarantine": 0.9}, "bec": {"tag": 0.3, "quarantine": 0.6}}
HAM = Scores(ham=0.98, spam=0.01, bec=0.01)

WORD_COLUMNS = [
    i for i, name in enumerate(SCHEMA.names) if name.startswith(("lang_", "tok_", "gram_"))
]
LANG_COLUMNS = [i for i, name in enumerate(SCHEMA.names) if name.startswith("lang_")]
STAT_COLUMNS = [SCHEMA.names.index(name) for name in text_features.STAT_NAMES]


def _original() -> tuple[dict[str, str], str]:
    head, _, body = FIXTURE.read_text().partition("\n\n")
    headers = dict(line.split(": ", 1) for line in head.splitlines())
    return headers, body


def _message(body: str, html: str | None = None, html_only: bool = False) -> bytes:
    headers, _ = _original()
    msg = EmailMessage()
    for name in ("From", "To", "Subject", "Date", "Message-ID"):
        msg[name] = headers[name]
    if html_only:
        msg.set_content(html, subtype="html")
    else:
        msg.set_content(body)
        if html is not None:
            msg.add_alternative(html, subtype="html")
    return msg.as_bytes(policy=SMTP)


def _as_html(body: str) -> str:
    paragraphs = "".join(f"<p>{p}</p>" for p in body.split("\n\n"))
    return f"<html><body>{paragraphs}</body></html>"


def _decide(ext: Extracted) -> tuple[Verdict, Action]:
    policy = Policy(PolicyConfig(), META)
    d = policy.decide(HAM, ext, Envelope(rcpt_tos=ext.summary.to_addrs))
    return d.verdict, d.action


BODY = _original()[1]
PLAIN = extract(_message(BODY))


def test_the_plain_request_is_counted_and_quarantined() -> None:
    # the baseline the variants are held to: without it every comparison below could pass vacuously
    assert PLAIN.vector[SCHEMA.names.index("lang_giftcard")] > 0
    assert _decide(PLAIN) == (Verdict.BEC, Action.QUARANTINE)


@pytest.mark.parametrize(
    "hide",
    [
        pytest.param(lambda w: w[:2] + "\u200b" + w[2:], id="zero-width-space"),
        pytest.param(lambda w: w[:1] + "\u00ad" + w[1:], id="soft-hyphen"),
        pytest.param(lambda w: "\u200d".join(w), id="zero-width-joiner-between-letters"),
        pytest.param(lambda w: w[:3] + "\u2060" + w[3:], id="word-joiner"),
        pytest.param(lambda w: "\ufeff" + w[:2] + "\u034f" + w[2:], id="bom-and-grapheme-joiner"),
    ],
)
def test_invisible_characters_inside_words_hide_nothing(hide: object) -> None:
    assert callable(hide)
    body = BODY
    for word in ("gift", "cards", "between", "available", "today"):
        body = body.replace(word, hide(word))
    assert body != BODY
    ext = extract(_message(body))
    np.testing.assert_array_equal(ext.vector[WORD_COLUMNS], PLAIN.vector[WORD_COLUMNS])
    assert _decide(ext) == (Verdict.BEC, Action.QUARANTINE)


HTML_PLAIN = extract(_message("", _as_html(BODY), html_only=True))


@pytest.mark.parametrize(
    "split",
    [
        pytest.param(lambda w: f"{w[:1]}<span>{w[1:]}</span>", id="span"),
        pytest.param(lambda w: f"<b>{w[:2]}</b><i>{w[2:]}</i>", id="bold-italic"),
        pytest.param(lambda w: f"{w[:2]}<!-- x -->{w[2:]}", id="comment"),
        pytest.param(lambda w: f"{w[:2]}<wbr>{w[2:]}", id="wbr"),
        pytest.param(lambda w: f"{w[:2]}<font color=black></font>{w[2:]}", id="empty-font"),
        pytest.param(lambda w: f'<a href="https://example.com/">{w[:2]}</a>{w[2:]}', id="anchor"),
    ],
)
def test_inline_tags_inside_words_of_html_hide_nothing(split: object) -> None:
    assert callable(split)
    body = BODY
    for word in ("gift", "cards", "between", "available", "today"):
        body = body.replace(word, split(word))
    ext = extract(_message("", _as_html(body), html_only=True))
    assert HTML_PLAIN.vector[SCHEMA.names.index("lang_giftcard")] > 0
    np.testing.assert_array_equal(ext.vector[LANG_COLUMNS], HTML_PLAIN.vector[LANG_COLUMNS])
    if "href" not in body:  # the link adds its own words nowhere, but is a link: compare the words only
        np.testing.assert_array_equal(ext.vector[WORD_COLUMNS], HTML_PLAIN.vector[WORD_COLUMNS])
    assert _decide(ext) == (Verdict.BEC, Action.QUARANTINE)


@pytest.mark.parametrize(
    ("html", "shown"),
    [
        ("<table><tr><td>Price</td><td>$5</td></tr></table>", ["Price", "$5"]),
        ("<p>one</p><p>two</p><div>three</div>", ["one", "two", "three"]),
        ("<li>first</li><li>second</li>", ["first", "second"]),
        ("line<br>break", ["line", "break"]),
        ("<span>Hello</span> <b>World</b>", ["Hello", "World"]),
        ("g<span>if</span>t c<!---->ar<wbr>d", ["gift", "card"]),
        ("<img src=a.png>between<img src=b.png>", ["between"]),
    ],
)
def test_visible_text_joins_inline_words_and_keeps_block_breaks(html: str, shown: list[str]) -> None:
    tree = LexborHTMLParser(f"<html><body>{html}</body></html>")
    assert visible_text(tree).split() == shown


def test_an_html_copy_of_the_text_counts_once() -> None:
    # the usual multipart/alternative: both parts say the same; the counts are not doubled
    ext = extract(_message(BODY, _as_html(BODY)))
    np.testing.assert_array_equal(ext.vector[LANG_COLUMNS], PLAIN.vector[LANG_COLUMNS])


@pytest.mark.parametrize("tail", ["\n" * 2000, " \n" * 500 + "\t" * 100, "\r\n" * 300])
def test_trailing_blank_lines_move_no_text_statistic(tail: str) -> None:
    ext = extract(_message(BODY + tail))
    np.testing.assert_array_equal(ext.vector[STAT_COLUMNS], PLAIN.vector[STAT_COLUMNS])
    np.testing.assert_array_equal(ext.vector[WORD_COLUMNS], PLAIN.vector[WORD_COLUMNS])


def test_the_shipped_model_reads_the_hidden_request_as_the_plain_one() -> None:
    model = Classifier.load(DEFAULT_MODEL)
    hidden = BODY
    for word in ("gift", "cards"):
        hidden = hidden.replace(word, word[:2] + "\u200b" + word[2:])
    html = _as_html(BODY.replace("gift", "g<span>ift</span>"))
    rows = np.stack(
        [PLAIN.vector, extract(_message(hidden)).vector, HTML_PLAIN.vector,
         extract(_message("", html, html_only=True)).vector]
    )
    scores = model.predict(rows)
    np.testing.assert_allclose(scores[1], scores[0], atol=0.02)
    np.testing.assert_allclose(scores[3], scores[2], atol=0.02)
