"""Business-email-compromise cases built from real correspondence, the way attackers build them (issue 17).

An attacker who has watched (or guessed) who writes to whom takes a real correspondent and changes one
thing. Each generator here takes a real message (bytes), rewrites exactly the parts listed below and
keeps every other byte, and returns it with its legitimate counterpart:

* `freemail_name`: a frequent correspondent's display name, from a new free-mail address made of that
  name ("Kitchen, Louise" <louise.kitchen@gmail.com>). Counterpart: the real message. Differs in: From.
* `lookalike_vendor`: an outside correspondent's thread continued from a lookalike of their domain, with
  their display name and local part. Counterpart: the real message. Differs in: From.
* `reply_to_bank`: the real sender's message, its body replaced by a request to update bank details with
  the original quoted below, replies going to a new free-mail or lookalike address. Counterpart: the
  same rewritten message without the Reply-To (the real correspondent saying the same thing). Differs
  in: Reply-To (both differ from the real message in the body).

Which provider, lookalike technique and pretext a case gets is chosen from the message's own hash
(`seed`), never by looking at whether the case is caught: the replay (`training/replay.py`) decides which
real messages become cases (eligibility and sampling, documented there) and only then asks the signals.
The lookalike techniques are the ones in documented BEC and phishing domains: a doubled, dropped or
swapped letter, a homoglyph (0 for o, 1 for l, rn for m), another top-level domain, and a word added
with a hyphen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formataddr

from milter.gateway.headers import field_name, header_fields, line_ending, split_header_block
from milter.policy.table import name_tokens

KINDS = ("freemail_name", "lookalike_vendor", "reply_to_bank")

#: The signal that should catch each kind (milter.history_signals names).
EXPECTED: Mapping[str, frozenset[str]] = {
    "freemail_name": frozenset({"display_name_new_address", "correspondent_elsewhere"}),
    "lookalike_vendor": frozenset({"correspondent_elsewhere"}),
    "reply_to_bank": frozenset({"reply_to_unseen"}),
}

#: Free-mail providers attackers register at (all in lexicon.FREEMAIL).
PROVIDERS = ("gmail.com", "outlook.com", "yahoo.com", "aol.com", "hotmail.com")
TECHNIQUES = ("double", "omit", "swap", "homoglyph", "tld", "hyphen")
_HOMOGLYPHS = (("o", "0"), ("l", "1"), ("i", "1"), ("e", "3"), ("m", "rn"))
_HYPHEN_WORDS = ("inc", "group", "corp", "us")
_ROLES = ("accounts", "billing", "payments", "finance")

#: Bank-change pretexts, in the words of documented vendor and payroll diversion (fixtures/bec/).
PRETEXTS = (
    "Please note that our bank details have changed due to an ongoing audit. Kindly update your records "
    "with the new account before the next payment; payments to the old account will be returned.\n"
    "Please reply to confirm once the change has been made.",
    "We have changed banks. Please update our bank details for all outstanding invoices today; the new "
    "account number and routing will follow in my next email. Reply here as my usual mailbox is down.",
    "Quick request: I changed my bank and need to update my direct deposit before the next payroll run. "
    "Can you confirm by reply where to send the new account details? It is urgent.",
)



@dataclass(frozen=True)
class Case:
    """One generated attack and its legitimate counterpart."""

    kind: str
    technique: str  # how the attacker's address was made ("gmail.com", "double", "reply_to:outlook.com")
    attack: bytes
    counterpart: bytes
    attacker: str  # the address the attacker controls (From or Reply-To)


# --- rewriting a message's bytes ---------------------------------------------------------------------


def _split(raw: bytes) -> tuple[list[bytes], bytes, bytes]:
    """(header fields, each with its folded continuation lines and no line ending; the newline used; the
    blank line + body), read as the gateway reads a header block (milter.gateway.headers)."""
    block, blank, body = split_header_block(raw)
    newline = blank or line_ending(raw)
    fields = [f.rstrip(b"\r\n") for f in header_fields(block)]
    if blank:
        return fields, newline, newline + blank + body
    return fields, newline, newline if block.endswith(newline) else b""


def set_header(raw: bytes, name: str, value: str) -> bytes:
    """`raw` with header `name` set to `value` (one field, in place of the first; added after From)."""
    fields, newline, rest = _split(raw)
    key = name.lower().encode()
    new = f"{name}: {value}".encode()
    at = next((i for i, f in enumerate(fields) if field_name(f) == key), None)
    if at is None:
        after = next((i for i, f in enumerate(fields) if field_name(f) == b"from"), len(fields) - 1)
        fields.insert(after + 1, new)
    else:
        fields[at] = new
        fields = [f for i, f in enumerate(fields) if i == at or field_name(f) != key]
    return newline.join(fields) + rest


def remove_header(raw: bytes, name: str) -> bytes:
    fields, newline, rest = _split(raw)
    key = name.lower().encode()
    return newline.join(f for f in fields if field_name(f) != key) + rest


def replace_body(raw: bytes, body: str) -> bytes:
    """`raw` with its body replaced (the caller makes sure the message is one text/plain part)."""
    fields, newline, _ = _split(raw)
    text = body.replace("\r\n", "\n").replace("\n", newline.decode())
    return newline.join(fields) + newline + newline + text.encode("utf-8")


def body_of(raw: bytes) -> bytes:
    return split_header_block(raw)[2]


# --- the attacker's addresses ------------------------------------------------------------------------


def _pick(options: tuple[str, ...], seed: int) -> str:
    return options[seed % len(options)]


def freemail_address(display: str, seed: int) -> str:
    """An address made of the name at a free-mail provider: "Kitchen, Louise" -> louise.kitchen@..."""
    words = [w for w in name_tokens(display) if len(w) > 1 and w.isascii() and w.isalpha()]
    if "," in display:  # "Last, First" reads First Last
        words = words[1:] + words[:1]
    local = ".".join(words[:3]) or "office"
    return f"{local}@{_pick(PROVIDERS, seed)}"


def lookalike_domain(domain: str, seed: int) -> tuple[str, str]:
    """(lookalike of `domain`, technique): the seed's technique, else the next one that applies."""
    label, _, suffix = domain.partition(".")
    start = seed % len(TECHNIQUES)
    for step in range(len(TECHNIQUES)):
        technique = TECHNIQUES[(start + step) % len(TECHNIQUES)]
        new = _apply(technique, label, suffix, seed)
        if new and new != label + "." + suffix:
            return new, technique
    return f"{label}-{_pick(_HYPHEN_WORDS, seed)}.{suffix}", "hyphen"


def _apply(technique: str, label: str, suffix: str, seed: int) -> str | None:
    n = len(label)
    # an interior position: attackers keep the first and last letters, which the eye reads first
    i = 1 + seed % max(n - 2, 1)
    if technique == "double" and n >= 2:
        return f"{label[:i]}{label[i - 1]}{label[i:]}.{suffix}"
    if technique == "omit" and n >= 4:
        return f"{label[:i]}{label[i + 1:]}.{suffix}"
    if technique == "swap" and n >= 4 and i + 1 < n and label[i] != label[i + 1]:
        return f"{label[:i]}{label[i + 1]}{label[i]}{label[i + 2:]}.{suffix}"
    if technique == "homoglyph":
        for a, b in _HOMOGLYPHS:
            if a in label:
                return f"{label.replace(a, b, 1)}.{suffix}"
        return None
    if technique == "tld":
        return f"{label}.{'net' if suffix == 'com' else 'com'}"
    if technique == "hyphen":
        return f"{label}-{_pick(_HYPHEN_WORDS, seed)}.{suffix}"
    return None


# --- the three kinds ---------------------------------------------------------------------------------


def freemail_name(raw: bytes, display: str, seed: int) -> Case:
    """A frequent correspondent's display name from a free-mail address made of it."""
    attacker = freemail_address(display, seed)
    attack = set_header(raw, "From", formataddr((display, attacker), charset="utf-8"))
    return Case("freemail_name", attacker.rpartition("@")[2], attack, raw, attacker)


def lookalike_vendor(raw: bytes, display: str, sender: str, seed: int, domain: str) -> Case:
    """The correspondent's thread continued from a lookalike of their registrable `domain`, keeping their
    display name and local part (a subdomain of theirs is dropped: attackers register the short name)."""
    fake, technique = lookalike_domain(domain, seed)
    attacker = f"{sender.rpartition('@')[0]}@{fake}"
    attack = set_header(raw, "From", formataddr((display, attacker), charset="utf-8"))
    return Case("lookalike_vendor", technique, attack, raw, attacker)


def reply_to_bank(raw: bytes, sender: str, seed: int, domain: str) -> Case:
    """The real sender asks to update bank details; replies go to the attacker's new address: at a
    free-mail provider (two seeds in three) or at a lookalike of the sender's domain."""
    label = domain.partition(".")[0] or "accounts"
    if seed % 3:
        attacker = f"{label}.{_pick(_ROLES, seed // 3)}@{_pick(PROVIDERS, seed // 7)}"
        technique = "reply_to:freemail"
    else:
        fake, how = lookalike_domain(domain, seed // 3)
        attacker = f"{sender.rpartition('@')[0]}@{fake}"
        technique = f"reply_to:lookalike:{how}"
    original = body_of(raw).decode("utf-8", "replace")
    body = f"{_pick(PRETEXTS, seed)}\n\n-----Original Message-----\n{original}"
    counterpart = remove_header(replace_body(raw, body), "Reply-To")
    attack = set_header(counterpart, "Reply-To", attacker)
    return Case("reply_to_bank", technique, attack, counterpart, attacker)
