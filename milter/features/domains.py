"""Domain helpers: registrable domain (tldextract, offline), lookalike tests (homoglyphs, edit distance).

tldextract is built with `suffix_list_urls=()` and no cache dir: it uses the public suffix snapshot it
ships and never fetches. The lookalike code is our own: no maintained library computes "is this domain a
confusable of that one" for mail; the skeleton map below follows Unicode TR39's idea on the characters
attackers use in practice (Latin/Cyrillic/Greek homoglyphs and digit-for-letter swaps).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import tldextract

from milter.features.lexicon import FREEMAIL

_EXTRACT = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

_SKELETON = str.maketrans(
    {
        "0": "o",
        "1": "l",
        "3": "e",
        "5": "s",
        "@": "a",
        "$": "s",
        "|": "l",
        "!": "i",
        "а": "a",
        "е": "e",
        "о": "o",
        "р": "p",
        "с": "c",
        "у": "y",
        "х": "x",
        "і": "i",
        "ј": "j",
        "ѕ": "s",
        "ԁ": "d",
        "ɡ": "g",
        "һ": "h",
        "ӏ": "l",
        "α": "a",
        "ο": "o",
        "ν": "v",
        "τ": "t",
        "ι": "i",
        "κ": "k",
    }
)


@lru_cache(maxsize=8192)  # fills within the warm-up: a bigger one grew RSS for hours (bench/rss.py)
def split_host(host: str) -> tuple[str, str, str]:
    """(subdomain, registrable domain, suffix) of a host name; registrable is '' for IPs and junk."""
    host = host.strip().strip(".").lower()
    if not host or is_ip(host):
        return "", "", ""
    r = _EXTRACT(host)
    if r.domain and r.suffix:
        return r.subdomain, f"{r.domain}.{r.suffix}", r.suffix
    labels = host.split(".")
    if len(labels) >= 2 and not r.suffix:  # unknown suffix (.test, .local, .lan): last two labels
        return ".".join(labels[:-2]), ".".join(labels[-2:]), labels[-1]
    return r.subdomain, "", r.suffix


def registrable(host: str) -> str:
    return split_host(host)[1]


def is_ip(host: str) -> bool:
    """`host` (brackets allowed) is an IPv4 or IPv6 address. Most hosts are names, and a failed
    `ip_address` costs an exception; a string with no colon (IPv6 has one) and something besides
    digits and dots (all IPv4 has) is no address, so names are answered without it."""
    host = host.strip("[]")
    if ":" not in host and not host.replace(".", "").isdigit():
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def to_unicode(host: str) -> str:
    """Decode punycode labels (xn--) so homoglyph checks see the characters a reader sees."""
    if "xn--" not in host:
        return host
    try:
        return host.encode("ascii").decode("idna")
    except (UnicodeError, ValueError):
        return host


def skeleton(label: str) -> str:
    """The label as it looks: homoglyphs folded to ASCII, "rn" read as "m" and so on."""
    s = to_unicode(label).lower().translate(_SKELETON)
    return s.replace("rn", "m").replace("vv", "w").replace("cl", "d")


# Small on purpose: a pair comes back only when two domains share their first label. At 65,536 entries
# it held 13 MiB in every prepare process after ~10,000 messages (bench/rss.py, docs/soak.md "Memory
# over 20 minutes"). lookalike_of no longer calls it (`_within`, below); the history signals do.
@lru_cache(maxsize=4096)
def edit_distance(a: str, b: str, limit: int = 3) -> int:
    """Levenshtein distance, stopping early once it exceeds `limit` (returns limit + 1)."""
    # each edit changes the character sets by at most two: a cheap bound that skips most pairs
    if abs(len(a) - len(b)) > limit or len(set(a) ^ set(b)) > 2 * limit:
        return limit + 1
    return _distance(a, b, limit)


def _distance(a: str, b: str, limit: int) -> int:
    """Levenshtein distance, or limit + 1 as soon as a row's best exceeds `limit`."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        if min(cur) > limit:
            return limit + 1
        prev = cur
    return prev[-1]


# Per sender domain, so it keeps filling as long as new domains write in: sized to fill within a
# few thousand messages (bench/rss.py's warm-up), after which it is flat.
LOOKALIKE_CACHE = 2048


@dataclass(frozen=True, slots=True)
class _Target:
    """A protected domain as lookalike_of compares with it, worked out once per protected tuple."""

    domain: str
    name: str  # its first label ("paypal" of paypal.com)
    skeleton: str
    limit: int  # the edits that still make a lookalike: 1 under nine letters, 2 from nine
    chars: frozenset[str]


# Keyed by the protected tuple, which is one object per configuration (features.identity builds it
# once): a handful of entries, each as big as the protected list, however many senders write in.
@lru_cache(maxsize=64)
def _targets(protected: tuple[str, ...]) -> tuple[_Target, ...]:
    """The protected domains worth comparing with, in order; names under four letters give too many
    accidental near-matches and are left out."""
    targets = []
    for target in protected:
        # compared as a reader sees it: a protected domain in A-labels (xn--bcher-kva.de) has the name
        # "bücher", which bucher.de imitates; its own A-label is no name anyone reads
        name = to_unicode(target).split(".", 1)[0]
        if len(name) >= 4:
            targets.append(_Target(target, name, skeleton(name), 1 if len(name) < 9 else 2, frozenset(name)))
    return tuple(targets)


@lru_cache(maxsize=LOOKALIKE_CACHE)
def lookalike_of(domain: str, protected: tuple[str, ...]) -> str | None:
    """The protected registrable domain that `domain` imitates without being it, or None: the first, in
    `protected`'s order, whose name looks the same (skeleton), is within its edit limit, or is a word
    of the sender's name (paypal-secure).

    A miss compares the sender's name with every protected name (about a hundred built-in brands), so
    the cheap tests come first and the edit distance runs only where the lengths and the character sets
    leave it possible: 24 against 131 us a miss on 2,331 corpus sender domains when it called
    `edit_distance` for every name of a similar length (the same answers on those and on 6,400
    mutations of the brand names)."""
    if not domain or domain in protected:
        return None
    name = domain.split(".", 1)[0]
    skel = skeleton(name)
    chars = frozenset(name)
    for target in _targets(protected):
        if skel == target.skeleton:
            return target.domain
        if target.name in name:
            if _contains_word(name, target.name) or _within(name, target.name, target.limit):
                return target.domain
            continue
        # Each edit changes the length by at most one and the character sets' difference by at most two.
        if abs(len(name) - len(target.name)) > target.limit or len(chars ^ target.chars) > 2 * target.limit:
            continue
        if _within(name, target.name, target.limit):
            return target.domain
    return None


def _within(a: str, b: str, limit: int) -> bool:
    """Levenshtein distance of `a` and `b` at most `limit` (uncached: lookalike_of is cached per domain)."""
    return _distance(a, b, limit) <= limit


def _contains_word(name: str, word: str) -> bool:
    """`word` starting `name` or hyphen-delimited in it (paypalsecure, secure-paypal; not pineapple)."""
    if name == word or word not in name:
        return False
    return name.startswith(word) or f"-{word}" in name or f"{word}-" in name


def in_domain(domain: str | None, listed: Iterable[str]) -> str | None:
    """The listed domain that `domain` is, or is a subdomain of (mail.example.com is in example.com)."""
    if not domain:
        return None
    for entry in listed:
        if domain == entry or domain.endswith("." + entry):
            return entry
    return None


def sender_key(addr: str | None) -> str:
    """Whom a From address's labels speak for: its registrable domain, or for a free-mail provider the
    address itself (DMARC pass for gmail.com proves Gmail sent it, not that one of its users is known).
    '' when there is no usable address."""
    if not addr or "@" not in addr:
        return ""
    addr = addr.strip(" <>").lower()
    domain = registrable(addr.rpartition("@")[2])
    if not domain:
        return ""
    return addr if domain in FREEMAIL else domain
