"""Links written the way browsers follow them are read as browsers read them (milter.features.links).

Each evasion hid a link's real host from the URL features and the domain blocklists, or dropped the
link: the evasive form must give the features and link domains of the form a browser actually opens.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from milter.features import SCHEMA, extract
from milter.features.content import URL_NAMES
from milter.features.context import Link, Protected, build, parse_link
from milter.features.links import browser_href, canonical_host
from milter.parse import parse
from milter.types import Envelope

URL_COLUMNS = [SCHEMA.names.index(name) for name in URL_NAMES]
IP = SCHEMA.names.index("url_ip_literal")
PUNYCODE = SCHEMA.names.index("url_punycode")
AT_SIGN = SCHEMA.names.index("url_at_sign")
HTML_LINKS = SCHEMA.names.index("html_links")


def _message(html: str, text: str | None = None) -> bytes:
    head = (
        "From: Alice <alice@sender.example>\r\nTo: bob@rcpt.example\r\n"
        "Subject: your account\r\nMIME-Version: 1.0\r\n"
    )
    if text is not None:
        body = f"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{text}\r\n"
    else:
        body = (
            "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            f"<html><body><p>Please check your account now.</p>{html}</body></html>\r\n"
        )
    return (head + body).encode("utf-8")


def _link(href: str) -> bytes:
    return _message(f'<p><a href="{href}">open your account</a></p>')


def _url_columns(raw: bytes) -> list[float]:
    return [float(v) for v in extract(raw).vector[URL_COLUMNS]]


# (evasive href as written in the HTML, the URL a browser opens) -- all the URL features must agree
SAME_URL = [
    pytest.param("https:\\\\evil.example\\path", "https://evil.example/path", id="backslashes"),
    pytest.param("https:/\\evil.example/path", "https://evil.example/path", id="slash-backslash"),
    pytest.param("https:evil.example/path", "https://evil.example/path", id="no-slashes"),
    pytest.param("http:///evil.example/path", "http://evil.example/path", id="three-slashes"),
    pytest.param("//evil.example/x", "https://evil.example/x", id="scheme-relative"),
    pytest.param("\\\\evil.example/x", "https://evil.example/x", id="scheme-relative-backslashes"),
    pytest.param("ht&#x09;tp://evil.example/", "http://evil.example/", id="tab-entity"),
    pytest.param("https://evil.&#10;example/", "https://evil.example/", id="newline-entity"),
    pytest.param("htt\tps://evil.ex\r\nample/", "https://evil.example/", id="raw-tab-newline"),
    pytest.param("&#1;https://evil.example/&#x1f;", "https://evil.example/", id="c0-around"),
    pytest.param(
        "https://evil.example\\@paypal.com/", "https://evil.example/@paypal.com/", id="backslash-at"
    ),
]


@pytest.mark.parametrize(("evasive", "plain"), SAME_URL)
def test_evasive_href_reads_as_the_url_the_browser_opens(evasive: str, plain: str) -> None:
    got, want = extract(_link(evasive)), extract(_link(plain))
    assert got.summary.link_domains == want.summary.link_domains == ("evil.example",)
    assert _url_columns(_link(evasive)) == _url_columns(_link(plain))
    assert got.vector[HTML_LINKS] == want.vector[HTML_LINKS] == 1.0


def test_backslash_ends_the_authority_not_userinfo() -> None:
    ext = extract(_link("https://evil.example\\@paypal.com/"))
    assert ext.summary.link_domains == ("evil.example",)
    assert "paypal.com" not in ext.summary.link_domains
    assert ext.vector[AT_SIGN] == 1.0  # the '@' is in the path the browser requests


NUMERIC_IPV4 = ["3232235777", "0xC0A80001", "0300.0250.0.1", "192.168.1", "0xc0.0xa8.0.1", "192.168.0.1."]


@pytest.mark.parametrize("host", NUMERIC_IPV4)
def test_numeric_ipv4_hosts_are_ip_links(host: str) -> None:
    for raw in (_link(f"http://{host}/login"), _message("", text=f"Log in: http://{host}/login now")):
        ext = extract(raw)
        assert ext.vector[IP] == 1.0
        assert ext.summary.link_domains == ()
    assert (
        extract(_link(f"http://{host}/login")).vector[IP]
        == extract(_link("http://192.168.0.1/login")).vector[IP]
    )


UNICODE_HOSTS = [
    pytest.param("pаypal.com", "xn--pypal-4ve.com", id="cyrillic-a"),
    pytest.param("PАYPAL.COM", "xn--pypal-4ve.com", id="upper-case"),
    pytest.param("pаypal\u3002com", "xn--pypal-4ve.com", id="ideographic-dot"),
    pytest.param("pаypal\uff0ecom", "xn--pypal-4ve.com", id="fullwidth-dot"),
    pytest.param("pаypal\uff61com", "xn--pypal-4ve.com", id="halfwidth-dot"),
    pytest.param("p%D0%B0ypal.com", "xn--pypal-4ve.com", id="percent-utf8"),
]


@pytest.mark.parametrize(("host", "ascii_host"), UNICODE_HOSTS)
def test_unicode_hosts_read_as_punycode(host: str, ascii_host: str) -> None:
    for raw in (_link(f"https://{host}/signin"), _message("", text=f"Sign in: https://{host}/signin today")):
        ext = extract(raw)
        assert ext.vector[PUNYCODE] == 1.0
        assert ext.summary.link_domains == (ascii_host,)


def test_fullwidth_dots_separate_labels_of_an_ascii_name() -> None:
    ext = extract(_link("https://evil\uff0eexample/"))
    assert ext.summary.link_domains == ("evil.example",)
    assert _url_columns(_link("https://evil\uff0eexample/"))[URL_NAMES.index("url_domains")] == 1.0


def test_percent_encoded_host_is_decoded() -> None:
    assert extract(_link("http://%70aypal.com/")).summary.link_domains == ("paypal.com",)
    assert extract(_message("", text="see http://%65vil.example/x")).summary.link_domains == ("evil.example",)


def test_plain_text_urls_are_not_read_as_hrefs() -> None:
    """Mail clients linkify only http(s):// and www. in text: no scheme-relative or slashless form."""
    ext = extract(_message("", text="paths like //evil.example/x and https:evil.example stay text"))
    assert ext.summary.link_domains == ()


BROWSER_HREF = [
    ("https:\\\\evil.example\\path", "https://evil.example/path"),
    ("HTTPS:/\\Evil.example", "HTTPS://Evil.example"),
    ("https:evil.example", "https://evil.example"),
    ("http:////evil.example/a", "http://evil.example/a"),
    ("//evil.example/x", "https://evil.example/x"),
    ("/\\evil.example/x", "https://evil.example/x"),
    ("ht\ttp://evil.example/", "http://evil.example/"),
    (" \x00\x1fhttps://evil.example/\x7f", "https://evil.example/\x7f"),  # DEL is no C0 control
    ("https://evil.example\\@paypal.com/", "https://evil.example/@paypal.com/"),
    ("https://evil.example/a\\b?c\\d#e\\f", "https://evil.example/a/b?c\\d#e\\f"),  # query keeps '\'
    ("www.evil.example\\@paypal.com", "www.evil.example/@paypal.com"),
    ("https://", "https://"),  # as before: no host, no new meaning
    ("https:", None),
    ("//", None),
    ("/path/only", None),
    ("mailto:a@b.example", None),
    ("javascript:location='http://evil.example'", None),
    ("httpx://evil.example", None),
    ("ftp://evil.example", None),
]


@pytest.mark.parametrize(("href", "url"), BROWSER_HREF)
def test_browser_href(href: str, url: str | None) -> None:
    assert browser_href(href) == url


CANONICAL_HOST = [
    ("3232235777", "192.168.1.1"),
    ("0xC0A80001", "192.168.0.1"),
    ("0300.0250.0.1", "192.168.0.1"),
    ("192.168.1", "192.168.0.1"),
    ("10.1", "10.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("4294967295", "255.255.255.255"),
    ("192.168.0.1.", "192.168.0.1"),
    ("0x", "0.0.0.0"),
    ("4294967296", "4294967296"),  # out of range: the browser rejects it, left as written
    ("256.1.1.1", "256.1.1.1"),
    ("08.1.1.1", "08.1.1.1"),  # 8 is no octal digit
    ("1.2.3.4.5", "1.2.3.4.5"),
    ("example.123", "example.123"),
    ("9" * 5000, "9" * 5000),  # no int() of 5000 digits
    ("0x" + "0" * 5000 + "1", "0.0.0.1"),
    ("pаypal.com", "xn--pypal-4ve.com"),
    ("PАYPAL\u3002COM", "xn--pypal-4ve.com"),
    ("straße.de", "xn--strae-oqa.de"),  # UTS #46 non-transitional, as browsers: not strasse.de
    ("ｐａｙｐａｌ．ｃｏｍ", "paypal.com"),
    ("pay\u00adpal.com", "paypal.com"),  # soft hyphen is ignored
    ("１９２．１６８．０．１", "192.168.0.1"),
    ("%70aypal.com", "paypal.com"),
    ("PAYPAL%2ECOM", "paypal.com"),
    ("%2fevil.example", "%2fevil.example"),  # decodes to a forbidden code point: left as written
    ("%ff.example", "%ff.example"),  # not UTF-8
    ("x\ufffdy.example", "x\ufffdy.example"),  # disallowed by UTS #46
    ("ex\uff0fample.com", "ex\uff0fample.com"),  # fullwidth solidus maps to '/': no host
    ("xn--pypal-4ve.com", "xn--pypal-4ve.com"),
    ("Example.COM", "example.com"),
    ("::1", "::1"),
    ("", ""),
]


@pytest.mark.parametrize(("host", "expected"), CANONICAL_HOST)
def test_canonical_host(host: str, expected: str) -> None:
    assert canonical_host(host) == expected


ORDINARY = [
    (
        "https://www.example.com/path?a=1&b=2#frag",
        "open",
        Link("https://www.example.com/path?a=1&b=2#frag", "www.example.com", "example.com", "open", None),
    ),
    (
        "HTTP://Mail.Example.CO.UK:8080/x",
        " shop ",
        Link("HTTP://Mail.Example.CO.UK:8080/x", "mail.example.co.uk", "example.co.uk", "shop", "8080"),
    ),
    (
        "http://user:pw@host.example.org/a",
        "",
        Link("http://user:pw@host.example.org/a", "host.example.org", "example.org", "", None),
    ),
    ("www.example.net/a%20b", "", Link("www.example.net/a%20b", "www.example.net", "example.net", "", None)),
    ("http://192.168.0.1/x", "", Link("http://192.168.0.1/x", "192.168.0.1", "", "", None)),
    ("http://[2001:db8::1]:8443/", "", Link("http://[2001:db8::1]:8443/", "2001:db8::1", "", "", "8443")),
    (
        "https://xn--bcher-kva.de/",
        "",
        Link("https://xn--bcher-kva.de/", "xn--bcher-kva.de", "xn--bcher-kva.de", "", None),
    ),
    ("http://", "", Link("http://", "http", "", "", None)),
]


@pytest.mark.parametrize(("href", "text", "link"), ORDINARY)
def test_ordinary_links_are_unchanged(href: str, text: str, link: Link) -> None:
    url = browser_href(f"  {href}\n")
    assert url == href
    assert parse_link(url, text) == link


def test_ordinary_links_in_a_message_are_unchanged() -> None:
    hrefs = "".join(f'<a href=" {href} ">{text}</a>' for href, text, _ in ORDINARY)
    ext = extract(_message(hrefs))
    domains = ("example.com", "example.co.uk", "example.org", "example.net", "xn--bcher-kva.de")
    assert ext.summary.link_domains == domains
    assert ext.vector[HTML_LINKS] == len(ORDINARY)
    # the Links themselves, as extract builds them
    ctx = build(parse(_message(hrefs)), Envelope(), Protected())
    assert ctx.links == tuple(link for _, _, link in ORDINARY)


def test_hostile_links_stay_cheap() -> None:
    """500 long evasive links (backslashes, tabs, Unicode and numeric hosts) in well under a second."""
    forms = [
        "https:\\\\" + "a" * 2000 + "\\x",
        "ht\ttps://" + "б" * 250 + ".com/" + "\\" * 2000,
        "http://" + "1" * 3000 + "/",
        "//" + "%41" * 1000 + "/",
        "https://" + ("б" * 60 + ".") * 4 + "com/",
    ]
    start = time.perf_counter()
    for i in range(500):
        url = browser_href(forms[i % len(forms)])
        assert url is not None
        parse_link(url)
    assert time.perf_counter() - start < 1.0


def test_vectors_are_finite_for_every_form() -> None:
    for evasive, _ in (p.values for p in SAME_URL):
        assert np.isfinite(extract(_link(str(evasive))).vector).all()


def test_the_userinfo_ends_at_the_last_at_sign() -> None:
    # browsers take the host after the authority's last "@"; the first one named the decoy
    link = parse_link("https://paypal.com@x@evil.example/login")
    assert (link.host, link.domain) == ("evil.example", "evil.example")
    assert parse_link("https://user@example.com:8080/").host == "example.com"


@pytest.mark.parametrize(
    "action", ["https:\\\\evil.example\\post", "//evil.example/post", "ht\ttps://evil.example/post",
               "https://user@evil.example/post"]
)
def test_a_form_posting_elsewhere_is_seen_however_its_action_is_written(action: str) -> None:
    def form_message(act: str) -> bytes:
        html = f'<html><body><form action="{act}"><input type=password name=p></form></body></html>'
        return (
            "From: Bank <alerts@bank.example>\r\nTo: a@b.example\r\nSubject: verify\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n"
        ).encode()

    column = SCHEMA.names.index("html_external_form_action")
    assert extract(form_message("https://evil.example/post")).vector[column] == 1.0
    assert extract(form_message("/post")).vector[column] == 0.0
    assert extract(form_message(action)).vector[column] == 1.0
