"""Two evasions of the HTML features a review reproduced: NUL padding that made a text/html part
"binary" (so its words, links and forms vanished), and hidden-text styles written with CSS comments,
character references or CSS escapes, which a browser applies but the raw-text patterns missed."""

from __future__ import annotations

import base64
import time

import numpy as np
import pytest

from milter.features import SCHEMA, extract
from milter.parse import parse

HIDDEN = SCHEMA.names.index("html_hidden_text")
FONT_ZERO = SCHEMA.names.index("html_font_zero")
# what NUL padding may change: the sizes of the body and the HTML, and the text's share of the HTML
SIZE_COLUMNS = {SCHEMA.names.index(n) for n in ("msg_body_size_log", "html_len_log", "html_text_ratio")}

PHISH = (
    "<html><body><p>Your account has been suspended. Verify your password now or lose access.</p>"
    '<p><a href="https://login.example-verify.top/acct?id=1">https://paypal.com/signin</a></p>'
    '<form action="https://collect.example.net/post"><input type="password" name="p"></form>'
    "</body></html>"
)


def html_message(body: bytes, ctype: str = "text/html", cte: str = "8bit") -> bytes:
    if cte == "base64":
        body = base64.encodebytes(body).replace(b"\n", b"\r\n")
    return (
        b"From: Support <support@example.com>\r\nTo: b@example.org\r\nSubject: Account notice\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: " + ctype.encode() + b"; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n\r\n" + body
    )


def col(vector: np.ndarray, name: str) -> float:
    return float(vector[SCHEMA.names.index(name)])


@pytest.mark.parametrize("cte", ["8bit", "base64"])
@pytest.mark.parametrize(
    "pad",
    [b"<!--" + b"\x00" * 600 + b"-->", b"\x00" * 600, b"<!-- x -->" + b"\x00" * 5000],
    ids=["comment", "bare", "past-the-head"],
)
def test_nul_padding_does_not_hide_an_html_part(pad: bytes, cte: str) -> None:
    """Mail clients drop or replace NULs and show the HTML; the features must see it too, with every
    value as without the NULs but the sizes."""
    plain = extract(html_message(PHISH.encode(), cte=cte)).vector
    padded_raw = html_message(pad + PHISH.encode(), cte=cte)
    padded = extract(padded_raw).vector
    parsed = parse(padded_raw)
    assert "Verify your password" in parsed.html and "BinaryText" not in parsed.defects
    for name in ("mime_has_html", "url_count_log", "html_links", "html_forms", "html_password_input",
                 "lang_credentials", "html_link_text_mismatch"):
        assert col(padded, name) == col(plain, name) > 0, name
    differ = {SCHEMA.names[i] for i in np.flatnonzero(plain != padded) if i not in SIZE_COLUMNS}
    assert not differ


def test_a_file_in_a_text_part_stays_an_attachment() -> None:
    """The sisimai bounce whose text/plain is a PNG, a NUL-heavy text/plain part, and a text/html part
    that starts with a file signature are still files, not words."""
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8
    for raw in (html_message(png, "text/plain", "base64"), html_message(png, "text/html", "base64"),
                html_message(b"ok so far" + b"\x00\x01\x02\x00" * 200, "text/plain", "base64")):
        parsed = parse(raw)
        assert "BinaryText" in parsed.defects and parsed.text == "" and parsed.html == ""
    # the NUL-padded HTML is kept (the old code dropped it with the files above)
    assert parse(html_message(b"\x00" * 600 + PHISH.encode())).html


EVASIONS = [
    ("display:none", "display:/**/none"),
    ("display:none", "display/*x*/:none"),
    ("display:none", "display /* a */ : /* b */ none"),
    ("display:none", "/* a stylesheet note */ display:/* b */none"),
    ("display:none", "display&#X3A;/**/none"),
    ("display:none", "display&#58;none"),
    ("display:none", "display&#x3A;none"),
    ("display:none", "display&#0058none"),
    ("display:none", "d&#105;splay:none"),
    ("display:none", "d&#73;splay:none"),
    ("display:none", "display&colon;none"),
    ("display:none", "display:\\6e one"),
    ("display:none", "display:\\4E one"),
    ("display:none", "\\64isplay:none"),
    ("display:none", "dis\\play:none"),
    ("display:none", "display&colon;/**/\\6e one"),
    ("visibility:hidden", "visibility&#58;hidde&#110;"),
    ("opacity:0", "opacity:\\30 "),
    ("max-height:0", "max-height:/**/0"),
    ("font-size:0px;", "font-size&#58;0px;"),
    ("font-size:0px;", "font-size:/**/0px;"),
]


@pytest.mark.parametrize(("plain", "evasive"), EVASIONS)
def test_obfuscated_hidden_styles_count_like_the_plain_form(plain: str, evasive: str) -> None:
    def vector(style: str) -> np.ndarray:
        body = f'<p>Hello</p><div style="{style}">buy cheap pills</div><p>Bye</p>'
        return extract(html_message(body.encode())).vector

    want, got = vector(plain), vector(evasive)
    assert want[HIDDEN] >= 1
    assert got[HIDDEN] == want[HIDDEN]
    assert got[FONT_ZERO] == want[FONT_ZERO]


def test_ordinary_html_counts_are_unchanged() -> None:
    """Plain styles count as before, also beside what starts the decoding (&nbsp;, &#8217;, a CSS
    comment, a backslash): a style only commented out still counts, opacity:0.5 does not; an
    obfuscated style on top adds one."""
    body = (
        "<style>/* .old { display:none } */ .a { visibility: hidden } p { opacity:0.5 }</style>"
        '<p style="display:none">a</p><p style="font-size:0px;">b</p><p style="font-size:12px">c&nbsp;d</p>'
        "<p>it&#8217;s a C:\\temp path &amp; more</p>"
    )
    plain = extract(html_message(body.encode())).vector
    assert (plain[HIDDEN], plain[FONT_ZERO]) == (4, 1)
    evasive = extract(html_message((body + '<p style="display&#58;none">x</p>').encode())).vector
    assert (evasive[HIDDEN], evasive[FONT_ZERO]) == (5, 1)


@pytest.mark.parametrize(
    "junk",
    ["/*" * 60_000, "\\" * 120_000, "&#" * 60_000, "&#000" * 30_000, "*/ /*" * 30_000, "\\a" * 60_000],
    ids=["open-comments", "backslashes", "ref-starts", "zero-refs", "comment-pairs", "escapes"],
)
def test_hostile_input_stays_linear(junk: str) -> None:
    """120,000 characters of what starts the decoding, then one obfuscated style: a rescanning pattern
    would take minutes; every step is one pass."""
    body = f'<div style="display:/**/none">x</div><p>{junk}</p>'.encode()
    start = time.perf_counter()
    vector = extract(html_message(body)).vector
    assert time.perf_counter() - start < 1.5
    assert vector[HIDDEN] >= 1
