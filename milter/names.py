"""Domain names and addresses as mail and DNS carry them, for every comparison the policy makes.

Mail carries a domain in A-labels (`xn--bcher-kva.de`), with or without the root's trailing dot, in
any case; an admin writes `Bücher.de` or `bücher.de.`. Compared as written, a protected domain held
every colleague's mail as a lookalike of itself and a deny entry matched nothing, and one trailing dot
walked past the deny list. Everything the policy compares goes through here first.

Why the `idna` package (UTS #46, IDNA 2008) and not Python's "idna" codec: the codec is IDNA 2003,
which maps ß to ss, so `straße.de` would become `strasse.de`, someone else's domain. (`idna` comes with
tldextract's requests and is a direct dependency.)
"""

from __future__ import annotations

import contextlib

import idna


def ascii_domain(name: str) -> str:
    """A-labels for a domain written in Unicode (bücher.de -> xn--bcher-kva.de); an ASCII name as it is.
    ValueError when it has no such form."""
    if name.isascii():
        return name
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise ValueError(f"{name!r} has no ASCII (IDNA) form: {exc}") from None


def as_carried(text: str) -> str:
    """An address or a domain with its domain part in A-labels and without the root's trailing dot,
    case kept; a domain with no A-label form stays as written (it then matches nothing written
    otherwise). Never raises."""
    local, at, domain = text.rstrip(".").rpartition("@")
    with contextlib.suppress(ValueError):
        domain = ascii_domain(domain)
    return f"{local}{at}{domain}"


def compared(text: str) -> str:
    """An address or a domain as the rules compare it: trimmed, lower case, `as_carried`."""
    return as_carried(text.strip().lower())
