"""Hostile mail for `prepare()`: the named attacks of issue 13, random MIME trees and mutations of
real messages, all from a seeded `random.Random`, so any failing message can be made again from its
seed (`bench/fuzz.py --only N`).

Shared by tests/test_prepare_fuzz.py (a fast subset, in CI) and bench/fuzz.py (the 200,000-message
run). Generators return bytes as a client would send them (any line endings, any bytes).
"""

from __future__ import annotations

import base64
import encodings.aliases
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

#: Every codec name Python knows, and names no codec has (a sender can write any name).
PY_CHARSETS: tuple[str, ...] = tuple(sorted(set(encodings.aliases.aliases.values())))
BOGUS_CHARSETS = ("x-unknown", "utf-8*en", "bogus-cs", "", "unicode-1-1-utf-7", "utf-9", "\x00", "cp65001")
HEADER_NAMES = ("From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID", "Sender", "Return-Path",
                "In-Reply-To", "References", "List-Unsubscribe", "Received", "DKIM-Signature", "X-Mailer")


def _header(name: str, value: bytes) -> bytes:
    return name.encode() + b": " + value + b"\r\n"


def _base(extra: bytes = b"", body: bytes = b"hello\r\n") -> bytes:
    head = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: x\r\nMessage-ID: <x@example.com>\r\n"
    return head + extra + b"\r\n" + body


def _multipart(boundary: bytes, parts: list[bytes], close: bool = True) -> bytes:
    out = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
    return out + (b"--" + boundary + b"--\r\n" if close else b"")


def _ctype(value: bytes) -> bytes:
    return b"MIME-Version: 1.0\r\nContent-Type: " + value + b"\r\n"


def nested_multipart(depth: int) -> bytes:
    head = _ctype(b"multipart/mixed; boundary=b0")
    body = b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i - 1, i)
                    for i in range(1, depth))
    body += b"--b%d\r\nContent-Type: text/plain\r\n\r\nhello\r\n" % (depth - 1)
    body += b"".join(b"--b%d--\r\n" % i for i in reversed(range(depth)))
    return _base(head, body)


def many_parts(count: int) -> bytes:
    parts = [b"Content-Type: text/plain\r\n\r\npart %d" % i for i in range(count)]
    return _base(_ctype(b"multipart/mixed; boundary=B"), _multipart(b"B", parts))


def repeated_boundary(depth: int) -> bytes:
    """Every level declares the same boundary: the parser cannot tell which one a line closes."""
    part = b"Content-Type: multipart/mixed; boundary=R\r\n\r\n"
    return _base(_ctype(b"multipart/mixed; boundary=R"), (b"--R\r\n" + part) * depth + b"--R--\r\n")


def nested_rfc822(depth: int) -> bytes:
    msg = _base()
    for _ in range(depth):
        msg = _base(_ctype(b"message/rfc822"), msg)
    return msg


def encoded_words(charsets: tuple[str, ...], repeat: int) -> bytes:
    words = b" ".join(
        b"=?" + cs.encode("latin-1", "replace") + enc + payload + b"?="
        for cs in charsets
        for enc, payload in ((b"?q?", b"caf=E9_=FF=00"), (b"?b?", base64.b64encode("café €".encode())))
    )
    return (b"From: " + words[:2000] + b" <a@example.com>\r\nTo: b@example.org\r\n"
            + b"Subject: " + words * repeat + b"\r\n\r\nbody\r\n")


def lying_base64(size: int) -> bytes:
    """A body that is not base64 in places, padding in the middle, and a declared size it lacks."""
    junk = (b"QUJD" * 19 + b"\r\n") * (size // 78) + b"!!==QQ==\x00\xff" + b"QUJD=" * 1000
    head = _ctype(b'application/pdf; name="a.pdf"; size=999999999') + b"Content-Transfer-Encoding: base64\r\n"
    return _base(head, junk)


def lying_qp(size: int) -> bytes:
    head = b"Content-Transfer-Encoding: quoted-printable\r\nContent-Type: text/html\r\n"
    link = b'=ZZ=4=\r\n<a href=3D"http://x=\r\n.example/">x</a>'
    return _base(head, b"=\r\n" * (size // 6) + link * (size // 60))


def html(body: bytes) -> bytes:
    return _base(b"Content-Type: text/html; charset=utf-8\r\n", body)


def mismatched_attachments(count: int) -> bytes:
    parts = [
        b'Content-Type: image/png; name="invoice%d.pdf.exe"\r\n'
        b"Content-Disposition: attachment; filename*=utf-8''%%E2%%80%%AEfdp.exe\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA" % i
        for i in range(count)
    ]
    return _base(_ctype(b"multipart/mixed; boundary=B"), _multipart(b"B", parts))


def idn_garbage(count: int) -> bytes:
    hosts = [b"http://xn--" + b"a" * 60 + b"-%d.xn--zz--/" % i for i in range(count)]
    hosts += [b"http://\xe2\x80\xae\xd0\xb0pple.com\xef\xbc\x8eevil/", b"http://xn--/", b"http://xn--80ak6aa92e.com./"]
    return _base(b"Content-Type: text/plain; charset=utf-8\r\n", b" ".join(hosts))


def _subject(subject: bytes, body: bytes = b"hello\r\n") -> bytes:
    return _base(body=body).replace(b"Subject: x\r\n", b"Subject: " + subject + b"\r\n", 1)


def part_header(line: bytes) -> bytes:
    """One part whose header holds `line` (part headers are in no budget of their own)."""
    return _base(_ctype(b"multipart/mixed; boundary=B"), _multipart(b"B", [line + b"\r\n\r\nhello"]))


def list_unsubscribe(uris: int, headers: int = 4) -> bytes:
    """RFC 8058 one-click headers whose List-Unsubscribe values open `uris` "<" and never close one."""
    value = b"<http://a" * uris
    return _base(b"".join(_header("List-Unsubscribe", value) for _ in range(headers))
                 + b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")


def boundary_names(count: int, delimiters: int = 1001) -> bytes:
    """`count` distinct boundary declarations in the body text, after enough "--" lines to count them."""
    lines = b"".join(b"boundary=%098d\r\n" % i for i in range(count))
    return _base(b"Content-Type: text/plain\r\n", b"--x\r\n" * delimiters + lines)


@dataclass(frozen=True)
class Attack:
    """A named hostile message and the budgets (`parse.Limits`) that must cut in on it."""

    build: Callable[[], bytes]
    budgets: frozenset[str] = frozenset()


def _budgets(*names: str) -> frozenset[str]:
    return frozenset(f"Budget{n}" for n in names)


#: Full size, as the issue lists them.
ATTACKS: dict[str, Attack] = {
    "nested-multipart-1000": Attack(lambda: nested_multipart(1000), _budgets("Multiparts")),
    "parts-10000": Attack(lambda: many_parts(10_000), _budgets("Delimiters")),
    "boundary-never-closes": Attack(lambda: _base(_ctype(b"multipart/mixed; boundary=B"),
                                                  b"--B\r\n\r\n" + b"x" * 1_000_000)),
    "boundary-repeats-1000": Attack(lambda: repeated_boundary(1000), _budgets("Delimiters", "Multiparts")),
    "header-1mb": Attack(lambda: _base(_header("X-Big", b"a" * 1_000_000)), _budgets("HeaderBlock")),
    "header-1mb-folded": Attack(lambda: _base(_header("X-Big", b"a b\r\n " * 300_000)),
                                _budgets("HeaderBlock")),
    "headers-100000": Attack(lambda: _base(b"".join(b"X-H%d: v\r\n" % i for i in range(100_000))),
                             _budgets("HeaderBlock")),
    "part-headers-100000": Attack(
        lambda: _base(_ctype(b"multipart/mixed; boundary=B"),
                      _multipart(b"B", [b"".join(b"X-P%d: v\r\n" % i for i in range(100_000)) + b"\r\nx"])),
        _budgets("Lines")),
    "to-100000": Attack(
        lambda: _base(_header("Cc", b", ".join(b"u%d@example.com" % i for i in range(100_000)))),
        _budgets("HeaderBlock")),
    "display-name-60k": Attack(lambda: b'From: "' + b"a" * 60_000 + b'" <a@example.com>\r\n\r\nx\r\n'),
    "comments-100000": Attack(lambda: b"From: " + b"(" * 100_000 + b"a@example.com\r\n\r\nx\r\n",
                              _budgets("HeaderValue")),
    "encoded-words-every-charset": Attack(lambda: encoded_words(PY_CHARSETS + BOGUS_CHARSETS, 1)),
    "encoded-words-200kb": Attack(lambda: encoded_words(("utf-8", "bogus-cs"), 2000),
                                  _budgets("HeaderValue")),
    "base64-lies": Attack(lambda: lying_base64(3_000_000)),
    "qp-lies": Attack(lambda: lying_qp(3_000_000)),
    "nul-bytes": Attack(lambda: _base(b"X-N: \x00\x00\r\n", b"\x00" * 5_000_000), _budgets("Bytes")),
    "bare-cr": Attack(lambda: _base(b"X-A: b\rc\r", b"a\rb\r" * 1_000_000), _budgets("Lines")),
    "8bit-headers": Attack(lambda: b"From: \xff\xfe\xc3 <a@b.c>\r\nSubject: \x80\x81\xff\xc3(\r\n" * 1000
                           + b"\r\nbody\r\n"),
    "html-million-tags": Attack(lambda: html(b"<b>" * 1_000_000), _budgets("HtmlDepth")),
    "html-unclosed-comment": Attack(lambda: html(b"<p>hi<!--" + b"a" * 3_000_000)),
    "html-deep-nesting": Attack(lambda: html(b"<div>" * 200_000 + b"x"), _budgets("HtmlDepth")),
    "html-deep-then-wide": Attack(lambda: html(b"<span>" * 2048 + b"<p>x" * 60_000)),
    "html-deep-tables": Attack(lambda: html(b"<table><tr><td>" * 20_000), _budgets("HtmlDepth")),
    "html-100000-links": Attack(lambda: html(b"<a href='http://x.example/a'>paypal.com</a>" * 100_000)),
    "url-100kb": Attack(lambda: _base(b"", b"http://a.example/" + b"a%2F" * 25_000 + b"\r\n")),
    "url-100kb-html": Attack(lambda: html(b"<a href='http://a.example/" + b"a" * 100_000 + b"'>http://b.example/</a>")),
    "urls-100000": Attack(lambda: _base(b"", b" ".join(b"http://a%d.example/x?url=http://y" % i
                                                        for i in range(100_000)))),
    "idn-punycode-garbage": Attack(lambda: idn_garbage(20_000)),
    "attachments-names-disagree": Attack(lambda: mismatched_attachments(900)),
    "rfc822-nested-1000": Attack(lambda: nested_rfc822(1000)),
    "line-20mb": Attack(lambda: _base(b"", b"a" * 20_000_000), _budgets("Bytes")),
    "one-byte-lines": Attack(lambda: _base(b"", b"a\n" * 3_000_000), _budgets("Lines")),
    "empty": Attack(lambda: b""),
    "no-header-end": Attack(lambda: b"From: a@example.com\r\nX: " + b"y" * 3_000_000,
                            _budgets("HeaderBlock")),
    # Slow paths the budgets above did not cover (seconds to minutes before; see each fix's comment):
    # ';' in an open quote of a part's parameter (the stdlib splitter: 400 kB took 97 s)
    "param-semicolons-400kb": Attack(
        lambda: part_header(b'Content-Type: text/plain; name="' + b";" * 400_000)),
    "filename-semicolons-400kb": Attack(
        lambda: part_header(b'Content-Disposition: attachment; filename="' + b";" * 400_000 + b'"')),
    "top-level-param-semicolons": Attack(lambda: _base(_ctype(b'text/plain; x="' + b";" * 250_000 + b'"')),
                                         _budgets("HeaderValue")),
    # encoded words that never end, in a part's filename (256 kB: 33 s) and in the Subject (64 kB: 2 s);
    # and ended only after a line break that decode_header splits at and its regex does not (\x1c)
    "filename-encoded-words-256kb": Attack(
        lambda: part_header(b'Content-Disposition: attachment; filename="' + b"=?x?q?a " * 32_000 + b'"')),
    "subject-encoded-words-64kb": Attack(lambda: _subject(b"=?x?q?a " * 8_000)),
    "subject-encoded-words-odd-line": Attack(lambda: _subject(b"=?x?q?a " * 8_000 + b"\x1c?="),
                                             _budgets("EncodedWords")),
    # "<img" and never a '>' (100 kB: 15 s), in the HTML read for image domains (300 kB)
    "html-img-unclosed": Attack(lambda: html(b"<img " * 60_000)),
    # four List-Unsubscribe headers of "<http://a" and never a '>' (252 kB: 32 s)
    "list-unsubscribe-unclosed": Attack(lambda: list_unsubscribe(7_000)),
    # one dotted word as long as the text read (a host name pattern backtracked: 1.5 s)
    "dotted-word-12k": Attack(lambda: _subject(b"verify your password login",
                                               b"http://x.example/ " + b"a." * 6_000 + b"\r\n")),
    # every "boundary=" of the body became one alternative of a regex compiled per message (4 s)
    "boundary-names-20000": Attack(lambda: boundary_names(20_000), _budgets("Multiparts")),
}


# -- random MIME trees -------------------------------------------------------------------------------

_LEAF_TYPES = ("text/plain", "text/html", "application/pdf", "application/octet-stream", "image/png",
               "message/rfc822", "text/calendar", "application/zip", "x-bogus/x", "text")
_MULTI_TYPES = ("mixed", "alternative", "related", "digest", "report", "signed", "x-unknown")
_ENCODINGS = ("7bit", "8bit", "base64", "quoted-printable", "binary", "x-uuencode", "bogus")
_HTML_BITS = (b"<a href='http://%s/login'>paypal.com</a>", b"<img src=cid:x width=1 height=1>",
              b"<form action='http://%s/p'><input type=password></form>", b"<!-- ", b"<script>",
              b"<div style='display:none'>", b"<meta http-equiv=refresh content='0;url=http://%s/'>",
              b"&#x202e;&amp;&#0;&#99999999;", b"</", b"<p>", b"<table><tr><td>")


def _text(rng: random.Random, limit: int = 400) -> bytes:
    kind = rng.random()
    size = rng.randint(0, limit)
    if kind < 0.4:
        return " ".join(rng.choice(("invoice", "urgent", "password", "http://x.example/a", "wire",
                                    "hello", "€", "Привет", "\u202e", "=?utf-8?q?x?=", "--B"))
                        for _ in range(size // 6)).encode("utf-8", "surrogateescape")
    if kind < 0.7:
        return bytes(rng.getrandbits(8) for _ in range(size))
    return "".join(rng.choice(string.printable) for _ in range(size)).encode()


def _host(rng: random.Random) -> bytes:
    return rng.choice((b"evil.example", b"185.1.2.3", b"xn--pple-43d.com", b"bit.ly", b"a" * 300 + b".tk",
                       b"[::1]", b"paypal.com.evil.example", b"", b"%41.example", b"\xff.example"))


def _html(rng: random.Random) -> bytes:
    count = rng.randint(0, 30)
    return b"".join(rng.choice(_HTML_BITS).replace(b"%s", _host(rng)) + _text(rng, 80) for _ in range(count))


def _encode(rng: random.Random, payload: bytes, cte: str) -> bytes:
    if cte == "base64":
        data = base64.encodebytes(payload)
        return data[: rng.randint(0, len(data))] + rng.choice((b"", b"===", b"!!", b"\x00"))
    if cte == "quoted-printable":
        return payload.replace(b"=", b"=3D") + rng.choice((b"=", b"=Z", b"=\r\n", b""))
    return payload


def _value(rng: random.Random, name: str) -> bytes:
    r = rng.random()
    if r < 0.2:
        cs = rng.choice(PY_CHARSETS + BOGUS_CHARSETS).encode("latin-1", "replace")
        return b"=?" + cs + rng.choice((b"?q?", b"?b?", b"?x?")) + _text(rng, 40) + b"?= <u@x.example>"
    if r < 0.35 and name in ("From", "To", "Cc", "Reply-To", "Sender"):
        return b", ".join(b'"%s" <%s@%s>' % (_text(rng, 20), _text(rng, 10), _host(rng))
                          for _ in range(rng.randint(0, 5)))
    if r < 0.45:
        return _text(rng, 200) + b"\r\n " + _text(rng, 100)  # folded
    return _text(rng, 120)


def _headers(rng: random.Random, count: int) -> bytes:
    return b"".join(_header(rng.choice(HEADER_NAMES), _value(rng, "")) for _ in range(count))


def _part(rng: random.Random, depth: int) -> bytes:
    if depth > 0 and rng.random() < 0.35:
        boundary = rng.choice((b"B%d" % depth, b"B", b"", b"=_x y", b'"q"', b"-" * 70))
        sub = rng.choice(_MULTI_TYPES).encode()
        head = b"Content-Type: multipart/" + sub + b"; boundary=\"" + boundary + b"\"\r\n"
        parts = [_part(rng, depth - 1) for _ in range(rng.randint(0, 6))]
        return head + b"\r\n" + _multipart(boundary, parts, close=rng.random() < 0.8)
    ctype = rng.choice(_LEAF_TYPES)
    if ctype == "message/rfc822" and depth > 0:
        return b"Content-Type: message/rfc822\r\n\r\n" + random_message(rng, depth - 1)
    cte = rng.choice(_ENCODINGS)
    cs = rng.choice(PY_CHARSETS + BOGUS_CHARSETS).encode("latin-1", "replace")
    name = rng.choice((b"", b'; name="%s"' % _text(rng, 30), b"; name*=utf-8''%E2%80%AE.exe"))
    disp = rng.choice((b"", b"Content-Disposition: attachment; filename=\"a.pdf.exe\"\r\n",
                       b"Content-Disposition: inline\r\n", b"Content-Disposition: \xff\r\n"))
    payload = _html(rng) if ctype == "text/html" else _text(rng, rng.choice((100, 2000)))
    if rng.random() < 0.2:
        payload = rng.choice((b"MZ", b"%PDF", b"PK\x03\x04", b"\x89PNG")) + payload
    head = (b"Content-Type: " + ctype.encode() + b"; charset=" + cs + name + b"\r\n" + disp
            + b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n")
    return head + b"\r\n" + _encode(rng, payload, cte)


def random_message(rng: random.Random, depth: int = 5) -> bytes:
    """A random MIME tree under random headers, with random line endings."""
    msg = _headers(rng, rng.randint(0, 25)) + b"MIME-Version: 1.0\r\n" + _part(rng, depth)
    ending = rng.choice((b"\r\n", b"\n", b"\r", None))
    return msg if ending is None else msg.replace(b"\r\n", ending)


# -- mutations of real messages ----------------------------------------------------------------------


def _span(rng: random.Random, data: bytes) -> tuple[int, int]:
    start = rng.randrange(len(data) + 1)
    return start, min(len(data), start + rng.choice((1, 8, 64, 1024, 65536)))


def _flip(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 64)):
        if buf:
            buf[rng.randrange(len(buf))] = rng.getrandbits(8)
    return bytes(buf)


def _delete(rng: random.Random, data: bytes) -> bytes:
    a, b = _span(rng, data)
    return data[:a] + data[b:]


def _repeat(rng: random.Random, data: bytes) -> bytes:
    a, b = _span(rng, data)
    return data[:b] + data[a:b] * rng.choice((2, 50, 1000)) + data[b:]


def _insert(rng: random.Random, data: bytes) -> bytes:
    at = rng.randrange(len(data) + 1)
    bits = (b"\x00", b"\r", b"\n--B\n", b"\n\n", b"=?utf-8?b?",
            b"Content-Type: multipart/mixed; boundary=B\n", b"<!--", b"http://" + b"a" * 5000,
            b"\xff\xfe", b"\n\t", b"Content-Transfer-Encoding: base64\n")
    return data[:at] + rng.choice(bits) * rng.choice((1, 3, 100)) + data[at:]


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data) + 1)]


def _line_endings(rng: random.Random, data: bytes) -> bytes:
    return data.replace(b"\n", rng.choice((b"\r", b"\r\r\n", b"\n\n", b"")))


def _splice(rng: random.Random, data: bytes) -> bytes:
    a, b = _span(rng, data)
    c, d = _span(rng, data)
    return data[:a] + data[c:d] + data[b:]


MUTATORS: tuple[Callable[[random.Random, bytes], bytes], ...] = (
    _flip, _delete, _repeat, _insert, _truncate, _line_endings, _splice,
)


def mutate(rng: random.Random, data: bytes) -> bytes:
    for _ in range(rng.randint(1, 4)):
        data = rng.choice(MUTATORS)(rng, data)
    return data
