"""Sender identity: display-name tricks, free-mail senders posing as organisations, lookalike domains.

Protected domains are the impersonated brands of `lexicon.BRANDS` plus the deployment's own
(`Protected.domains`), so the model learns "imitates a protected domain" from public phishing and applies
it to the admin's domains at serving time.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from milter.features import lexicon
from milter.features.context import Address, Context, Protected
from milter.features.domains import lookalike_of, split_host, to_unicode

NAMES: tuple[str, ...] = (
    "id_display_has_address",
    "id_display_address_differs",
    "id_display_domain_differs",
    "id_freemail",
    "id_freemail_org_display",
    "id_reply_to_freemail",
    "id_brand_in_display_not_domain",
    "id_brand_in_domain_not_own",
    "id_lookalike_protected",
    "id_punycode",
    "id_mixed_script",
    "id_local_len",
    "id_local_digits_ratio",
    "id_local_random",
    "id_domain_len",
    "id_domain_hyphens",
    "id_domain_digits",
    "id_subdomain_depth",
    "id_suspicious_tld",
    "id_display_len",
    "id_display_all_caps",
    "id_display_has_title",
    "id_protected_domain_sender",
)

_ADDR_IN_DISPLAY = re.compile(r"[\w.+-]+@([\w-]+\.)+[\w-]+")
_ORG_WORDS = re.compile(
    r"\b(inc|llc|ltd|gmbh|corp|bank|support|team|service|services|department|security|billing|"
    r"account|accounts|admin|administrator|helpdesk|it desk|payroll|finance|hr|customer care)\b",
    re.I,
)
_TITLES = re.compile(r"\b(ceo|cfo|coo|president|director|chairman|manager|vp|head of|founder)\b", re.I)
_VOWELS = set("aeiou")


def compute(ctx: Context) -> tuple[list[float], list[str]]:
    s = ctx.sender
    if s is None:
        return [0.0] * len(NAMES), []
    signals: list[str] = []
    protected_domains = _protected_domains(ctx.protected.domains)
    m = _ADDR_IN_DISPLAY.search(s.display)
    shown = m.group(0).lower() if m else ""
    shown_domain = split_host(shown.rpartition("@")[2])[1] if shown else ""
    display_differs = bool(shown) and shown != s.addr
    if display_differs:
        signals.append(f"display name shows {shown} but the sender is {s.addr}")
    freemail = s.domain in lexicon.FREEMAIL
    org_display = freemail and bool(_ORG_WORDS.search(s.display) or _TITLES.search(s.display))
    if org_display:
        signals.append(f"free-mail sender ({s.domain}) uses an organisation or title display name")
    brand_display = brand_in_display(s.display, s.domain)
    if brand_display:
        signals.append(f"display name mentions {brand_display} but the sender domain is {s.domain}")
    brand_domain = _brand_mismatch(s.host.replace("-", "").replace(".", ""), s.domain)
    lookalike = lookalike_of(s.domain, protected_domains)
    if lookalike:
        signals.append(f"sender domain {s.domain} looks like {lookalike}")
    local = s.addr.partition("@")[0]
    sub, _, suffix = split_host(s.host)
    values = [
        float(bool(shown)),
        float(display_differs),
        float(bool(shown_domain) and shown_domain != s.domain),
        float(freemail),
        float(org_display),
        float(ctx.reply_to is not None and ctx.reply_to.domain in lexicon.FREEMAIL and not freemail),
        float(bool(brand_display)),
        float(bool(brand_domain)),
        float(bool(lookalike)),
        float("xn--" in s.host),
        float(_mixed_script(to_unicode(s.host))),
        float(len(local)),
        sum(c.isdigit() for c in local) / len(local) if local else 0.0,
        float(_random_looking(local)),
        float(len(s.domain)),
        float(s.domain.count("-")),
        float(sum(c.isdigit() for c in s.domain)),
        float(sub.count(".") + 1 if sub else 0),
        float(suffix.rpartition(".")[2] in lexicon.SUSPICIOUS_TLDS),
        float(len(s.display)),
        float(len(s.display) > 3 and s.display.isupper()),
        float(bool(_TITLES.search(s.display))),
        float(s.domain in ctx.protected.domains),
    ]
    return values, signals


_BRAND_DOMAINS = tuple(d for domains in lexicon.BRANDS.values() for d in domains)


@lru_cache(maxsize=64)
def _protected_domains(configured: tuple[str, ...]) -> tuple[str, ...]:
    """The deployment's domains, then the built-in brands: built once per configuration, not per message
    (and one tuple object, so lookalike_of's cache keys on it cheaply)."""
    return tuple(dict.fromkeys(configured + _BRAND_DOMAINS))


# A capital I after a lower-case letter reads as an l in most sans-serif fonts: "WaImart", "PayPaI".
_CAPITAL_I_AS_L = re.compile(r"(?<=[a-z])I")
_NOT_ALNUM = re.compile(r"[^0-9a-z]+")


def display_letters(display: str) -> str:
    """A display name as a reader takes it in, for brand names: the capital-I-for-l trick undone,
    compatibility forms folded (fullwidth, ligatures), lower case, letters and digits only ("Sam's Club"
    -> "samsclub")."""
    text = unicodedata.normalize("NFKC", _CAPITAL_I_AS_L.sub("l", display)).lower()
    return _NOT_ALNUM.sub("", text)


def brand_in_display(display: str, domain: str) -> str | None:
    """A brand the display name names (as a reader takes it in) whose own domains do not include the
    sender's registrable `domain`: "Norton Security <jokes@funnysnails.com>" -> "norton"."""
    return _brand_mismatch(display_letters(display), domain)


def _brand_mismatch(text: str, domain: str) -> str | None:
    """A brand named in `text` whose own domains do not include the sender's registrable domain."""
    for brand, owned in lexicon.BRANDS.items():
        if len(brand) >= 4 and brand in text and domain not in owned:
            return brand
    return None


def _mixed_script(host: str) -> bool:
    """Latin letters mixed with Cyrillic or Greek in one label: the classic homoglyph attack."""
    for label in host.split("."):
        latin = any("a" <= c <= "z" for c in label)
        other = any("\u0370" <= c <= "\u04ff" for c in label)
        if latin and other:
            return True
    return False


def _random_looking(local: str) -> bool:
    letters = [c for c in local.lower() if c.isalpha()]
    if len(letters) < 8:
        return False
    vowels = sum(c in _VOWELS for c in letters)
    return vowels / len(letters) < 0.2 or any(c.isdigit() for c in local[:1])


def impersonated_name(display: str, protected_names: tuple[str, ...]) -> str | None:
    """The protected person whose name the display name carries (case and spacing ignored)."""
    norm = " ".join(re.sub(r"[^\w\s]", " ", display.lower()).split())
    for name in protected_names:
        target = " ".join(name.lower().split())
        if target and target in norm:
            return name
    return None


__all__ = ["NAMES", "Address", "Protected", "compute", "impersonated_name"]


_NON_WORD = re.compile(r"[^\w]+", re.UNICODE)


def name_tokens(text: str) -> tuple[str, ...]:
    """Case-, punctuation- and whitespace-insensitive words: "Jane  SMITH, CEO" -> (jane, smith, ceo)."""
    return tuple(t for t in _NON_WORD.split(text.casefold()) if t)


def contains_name(display: str, name: str) -> bool:
    """The protected name's words appear together in the display name, in order or reversed
    ("Smith, Jane"): titles and decorations around them ("Jane Smith, CEO") do not hide a match."""
    words, wanted = name_tokens(display), name_tokens(name)
    if not wanted:
        return False
    n = len(wanted)
    windows = {words[i:i + n] for i in range(len(words) - n + 1)}
    return wanted in windows or tuple(reversed(wanted)) in windows
