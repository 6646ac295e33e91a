"""Header structure and consistency, from sender-controlled headers only.

Not features either: a missing Message-ID or MIME-Version. In the corpora those say that a collector
stripped the headers (the shipping notices of modern-bulk-ham, 59% of Enron spam), not who sent the
message; relays add a Message-ID anyway.

Never read here: Received, Return-Path, Authentication-Results, X-MS-*, X-Gmail-*, List-*, X-Mailer and
other headers that receiving systems add or that date the software: in the training corpora those say
where a message was collected, not what it is (see ../shared/corpora/README.md, "Traps").
"""

from __future__ import annotations

import email.utils
import math
import re
from datetime import datetime

from milter.features.context import Context
from milter.features.domains import registrable

NAMES: tuple[str, ...] = (
    "hdr_from_missing",
    "hdr_from_multiple",
    "hdr_from_no_display",
    "hdr_to_missing",
    "hdr_to_count_log",
    "hdr_cc_count_log",
    "hdr_rcpt_many",
    "hdr_to_undisclosed",
    "hdr_msgid_malformed",
    "hdr_msgid_domain_mismatch",
    "hdr_date_missing",
    "hdr_date_unparseable",
    "hdr_date_no_tz",
    "hdr_date_bad_tz",
    "hdr_date_bad_weekday",
    "hdr_reply_to_present",
    "hdr_reply_to_domain_differs",
    "hdr_in_reply_to",
    "hdr_references",
    "hdr_subject_re",
    "hdr_subject_fwd",
    "hdr_fake_reply",
    "hdr_subject_missing",
    "hdr_subject_len",
    "hdr_subject_words",
    "hdr_subject_upper_ratio",
    "hdr_subject_excl",
    "hdr_subject_nonascii_ratio",
    "hdr_subject_encoded",
    "hdr_subject_money",
    "hdr_subject_emoji",
    "hdr_subject_digits_ratio",
    "hdr_8bit_raw",
    "mime_parts_log",
    "mime_depth",
    "mime_top_multipart",
    "mime_top_html_only",
    "mime_has_text_plain",
    "mime_has_html",
    "mime_alternative",
    "mime_related",
    "mime_defects",
    "mime_defect_boundary",
    "mime_defect_header",
    "mime_defect_charset",
    "mime_defect_payload",
    "msg_body_size_log",
)

_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RE_SUBJ = re.compile(r"^\s*(re|aw|sv|antw|rif|r)\s*(\[\d+\])?\s*:", re.I)
_FWD_SUBJ = re.compile(r"^\s*(fwd?|wg|tr|rv|enc)\s*:", re.I)
_SURROGATE = re.compile("[\udc80-\udcff]")  # 8-bit bytes the parser could not decode
_REDACTED_DATE = re.compile(r"\d{2}-\d{2}-\d{4}")
_MONEY = re.compile(r"[$€£¥₹]|\b(usd|eur|gbp)\b", re.I)


def compute(ctx: Context) -> tuple[list[float], list[str]]:
    p = ctx.parsed
    signals: list[str] = []
    subject = p.subject
    raw_subject = p.get("subject")
    msgid = p.get("message-id") or ""
    msgid_domain = registrable(msgid.strip().strip("<>").rpartition("@")[2]) if "@" in msgid else ""
    date_vals = _date_features(p.get("date"))
    reply_differs = bool(
        ctx.reply_to
        and ctx.sender
        and ctx.reply_to.domain
        and ctx.sender.domain
        and ctx.reply_to.domain != ctx.sender.domain
    )
    if reply_differs and ctx.reply_to and ctx.sender:
        signals.append(f"Reply-To domain {ctx.reply_to.domain} differs from From domain {ctx.sender.domain}")
    is_reply = bool(_RE_SUBJ.match(subject))
    fake_reply = is_reply and p.get("in-reply-to") is None and p.get("references") is None
    if fake_reply:
        signals.append("Subject says Re: but the message answers nothing (no In-Reply-To/References)")
    to_raw = (p.get("to") or "").lower()
    ctypes = p.content_types
    top = ctypes[0] if ctypes else "text/plain"
    defects = p.defects
    budgets = sorted(d.removeprefix("Budget").lower() for d in defects if d.startswith("Budget"))
    if budgets:  # crafted to be costly to read: real mail stays far below every limit
        signals.append(f"message exceeds the parser's limits ({', '.join(budgets)})")
    letters = [c for c in subject if c.isalpha()]
    n_rcpt = ctx.to_count + ctx.cc_count
    values = [
        float(ctx.sender is None),
        float(ctx.from_count > 1),
        float(ctx.sender is not None and not ctx.sender.display),
        float(p.get("to") is None),
        math.log1p(ctx.to_count),
        math.log1p(ctx.cc_count),
        float(n_rcpt > 10),
        float("undisclosed" in to_raw or (p.get("to") is not None and ctx.to_count == 0)),
        float(bool(msgid) and not re.fullmatch(r"\s*<[^<>@\s]+@[^<>@\s]+>\s*", msgid)),
        float(bool(msgid_domain) and ctx.sender is not None and msgid_domain != ctx.sender.domain),
        *date_vals,
        float(ctx.reply_to is not None),
        float(reply_differs),
        float(p.get("in-reply-to") is not None),
        float(p.get("references") is not None),
        float(is_reply),
        float(bool(_FWD_SUBJ.match(subject))),
        float(fake_reply),
        float(raw_subject is None),
        float(len(subject)),
        float(len(subject.split())),
        sum(c.isupper() for c in letters) / len(letters) if letters else 0.0,
        float(subject.count("!")),
        _nonascii(subject),
        float(bool(raw_subject and "=?" in raw_subject)),
        float(bool(_MONEY.search(subject))),
        float(any(ord(c) >= 0x2600 for c in subject)),
        sum(c.isdigit() for c in subject) / len(subject) if subject else 0.0,
        float(any(_SURROGATE.search(v) for _, v in p.headers)),
        math.log1p(len(ctypes)),
        float(p.max_depth),
        float(top.startswith("multipart/")),
        float(top == "text/html"),
        float("text/plain" in ctypes),
        float("text/html" in ctypes),
        float("multipart/alternative" in ctypes),
        float("multipart/related" in ctypes),
        float(len(defects)),
        float(any("Boundary" in d for d in defects)),
        float(any("Header" in d for d in defects)),
        float(any("Charset" in d for d in defects)),
        float(any("Payload" in d or "Encoding" in d or "Base64" in d for d in defects)),
        math.log1p(p.raw_size),
    ]
    return values, signals


def _nonascii(s: str) -> float:
    return sum(ord(c) > 127 for c in s) / len(s) if s else 0.0


def _date_features(value: str | None) -> list[float]:
    """missing, unparseable, no zone, impossible zone, weekday that does not match the date.

    The year itself is never a feature: in the corpora it says which collection a message is from.
    """
    if value is None:
        return [1.0, 0.0, 0.0, 0.0, 0.0]
    if _REDACTED_DATE.fullmatch(value.strip()):
        # MM-DD-YYYY is what the cw-l corpus's redaction tool wrote over its spam's dates, never seen
        # from a mail program: read as "a date", or the model learns the redaction as a spam trait.
        return [0.0, 0.0, 0.0, 0.0, 0.0]
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return [0.0, 1.0, 0.0, 0.0, 0.0]
    if not isinstance(dt, datetime):
        return [0.0, 1.0, 0.0, 0.0, 0.0]
    offset = dt.utcoffset()
    no_tz = offset is None
    bad_tz = offset is not None and abs(offset.total_seconds()) > 14 * 3600
    head = value.strip().lower()[:3]
    bad_weekday = head in _WEEKDAYS and _WEEKDAYS.index(head) != dt.weekday()
    return [0.0, 0.0, float(no_tz), float(bad_tz), float(bad_weekday)]
