"""Facts several feature groups need, computed once per message (addresses, URLs, visible text)."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from selectolax.lexbor import LexborHTMLParser

from milter.features.domains import registrable, split_host
from milter.features.links import browser_href, canonical_host
from milter.features.visible import visible_text
from milter.parse import ParsedMessage
from milter.types import Envelope

MAX_HTML = 300_000
MAX_LINKS = 500
MAX_OTHER_FROMS = 10  # From addresses after the first kept for the policy (a hostile header lists thousands)
URL_RE = re.compile(r"""(?i)\b(?:https?://|www\.)[^\s<>"'()\[\]{}|\\^`]+""")
# the userinfo ends at the authority's last "@", as browsers read it ("https://paypal.com@x@evil.example/"
# opens evil.example); one anchored greedy run, so still linear
_HOST_RE = re.compile(r"(?i)^(?:https?://)?(?:[^/?#]*@)?(\[[^\]]+\]|[^:/?#]+)(?::(\d+))?")


@dataclass(frozen=True)
class Protected:
    """Identities this deployment protects: its own domains and its people's names (for BEC rules)."""

    domains: tuple[str, ...] = ()
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Link:
    url: str
    host: str
    domain: str  # registrable
    text: str  # visible anchor text ('' for URLs found in plain text)
    port: str | None


@dataclass(frozen=True)
class Address:
    display: str
    addr: str
    domain: str  # registrable domain of the address ('' when none)
    host: str  # full host part


@dataclass(frozen=True)
class Context:
    parsed: ParsedMessage
    envelope: Envelope
    protected: Protected
    sender: Address | None  # first From
    from_count: int
    # (display, addr-spec) of the From addresses after the first, at most MAX_OTHER_FROMS (for the summary:
    # a From with several addresses is one DMARC cannot judge, milter.policy.dmarc)
    from_others: tuple[tuple[str, str], ...]
    reply_to: Address | None
    to_count: int
    cc_count: int
    links: tuple[Link, ...]
    html_text: str  # visible text of the HTML parts
    body_text: str  # text/plain if any, else the HTML's visible text
    html_tree: LexborHTMLParser | None


def address(display: str, addr: str) -> Address:
    host = addr.rpartition("@")[2] if "@" in addr else ""
    return Address(display=display, addr=addr, domain=registrable(host), host=host)


def parse_link(url: str, text: str = "") -> Link:
    m = _HOST_RE.match(url.strip())
    host = canonical_host((m.group(1) if m else "").lower().strip("[]"))
    port = m.group(2) if m else None
    return Link(url=url, host=host, domain=split_host(host)[1], text=text.strip(), port=port)


def build(parsed: ParsedMessage, envelope: Envelope, protected: Protected) -> Context:
    froms = parsed.addresses("from")
    reply = parsed.addresses("reply-to")
    tree = LexborHTMLParser(parsed.html[:MAX_HTML]) if parsed.html.strip() else None
    html_text = ""
    links: list[Link] = []
    if tree is not None:
        for node in tree.css("script, style, head"):
            node.decompose()
        for a in tree.css("a[href]"):
            href = browser_href(a.attributes.get("href") or "")  # as the browser reads it
            if href is not None:
                links.append(parse_link(href, a.text(deep=True)))
                if len(links) == MAX_LINKS:
                    break
        html_text = visible_text(tree)  # after the links: it unwraps the <a> elements
    # the features read the first MAX_LINKS links: none past them is parsed (a budget, like parse.Limits)
    for m in itertools.islice(URL_RE.finditer(parsed.text[:100_000]), max(MAX_LINKS - len(links), 0)):
        links.append(parse_link(m.group(0).rstrip(".,;:!?")))
    return Context(
        parsed=parsed,
        envelope=envelope,
        protected=protected,
        sender=address(*froms[0]) if froms else None,
        from_count=len(froms),
        from_others=tuple(froms[1 : 1 + MAX_OTHER_FROMS]),
        reply_to=address(*reply[0]) if reply else None,
        # counting '@' is enough for a count and avoids parsing thousand-address lists
        to_count=sum(v.count("@") for v in parsed.get_all("to")),
        cc_count=sum(v.count("@") for v in parsed.get_all("cc")),
        links=tuple(links),
        html_text=html_text,
        body_text=parsed.text if parsed.text.strip() else html_text,
        html_tree=tree,
    )
