"""Feature extraction: raw bytes -> one float32 vector in a named, versioned schema.

The same `extract` runs in the gateway, in `milter scan` and in training: one code path, no skew.
It never raises for a message's content: parser defects are features, and an unexpected error in a
group leaves that group at zero with a `feature_error` signal (and the `feat_group_failed` feature set),
so one odd message cannot stop a relay.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from milter.features import content, headers, identity, lexicon, sender, text
from milter.features.context import Context, Protected, build
from milter.features.summary import Extracted, MessageSummary
from milter.names import as_carried
from milter.parse import ParsedMessage, parse
from milter.types import Envelope

log = logging.getLogger(__name__)

# 4: the same columns, read as a reader sees the message (words across inline tags, comments and
# invisible characters, links as browsers follow them, obfuscated hiding styles, NUL-padded HTML,
# trailing blank lines ignored): values moved for most messages (55,876 of the corpora's 65,653), and a
# model fitted on version 3 changes 436 of its flags on them, so it is refused, not fed them.
SCHEMA_VERSION = "4"
#: Link domains the summary keeps for the domain blocklists (milter.auth.dnsbl.MAX_LINK_DOMAINS; not
#: imported: milter.auth imports this package).
LINK_DOMAINS = 10


@dataclass(frozen=True)
class FeatureSchema:
    version: str
    names: tuple[str, ...]

    @property
    def digest(self) -> str:
        """Changes whenever a feature is added, removed, reordered or the hashing changes."""
        blob = "\n".join((self.version, str(text.HASH_BUCKETS), str(text.GRAM_SPACE), *self.names)).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.names)


Group = Callable[[Context], tuple[list[float] | npt.NDArray[np.float32], list[str]]]


def _no_signals(fn: Callable[[Context], list[float]]) -> Group:
    def group(ctx: Context) -> tuple[list[float] | npt.NDArray[np.float32], list[str]]:
        return fn(ctx), []

    return group


# (names, function) in vector order; the schema is their concatenation.
GROUPS: tuple[tuple[tuple[str, ...], Group], ...] = (
    (headers.NAMES, headers.compute),
    (identity.NAMES, identity.compute),
    (content.HTML_NAMES, content.html_features),
    (content.URL_NAMES, content.url_features),
    (content.ATTACH_NAMES, content.attachment_features),
    (sender.NAMES, sender.compute),
    (text.STAT_NAMES, _no_signals(text.stat_features)),
    ((*text.LANG_NAMES, *text.HASH_NAMES, *text.GRAM_NAMES), text.text_features),
)

SCHEMA = FeatureSchema(
    version=SCHEMA_VERSION,
    names=("feat_group_failed", *(name for names, _ in GROUPS for name in names)),
)


# Vector columns the summary reads back: the policy's BEC rules use the same facts the model sees.
_LANGUAGE_COLUMNS = tuple((group, SCHEMA.names.index(f"lang_{group}")) for group in lexicon.LANGUAGE)
_DISGUISE_COLUMNS = tuple(
    SCHEMA.names.index(name) for name in ("id_freemail_org_display", "id_display_address_differs")
)
_FREEMAIL_COLUMN = SCHEMA.names.index("id_freemail")
_HTML_COLUMN = SCHEMA.names.index("mime_has_html")
_FAKE_REPLY_COLUMN = SCHEMA.names.index("hdr_fake_reply")
_REPORT_COLUMN = SCHEMA.names.index("snd_auto_report")
_IMAGE_ONLY_COLUMN = SCHEMA.names.index("html_image_only")


def extract(raw: bytes, envelope: Envelope | None = None, protected: Protected | None = None) -> Extracted:
    parsed = parse(raw)
    ctx = build(parsed, envelope or Envelope(), protected or Protected())
    vector = np.zeros(len(SCHEMA), dtype=np.float32)
    signals: list[str] = []
    pos = 1
    for names, fn in GROUPS:
        try:
            values, sig = fn(ctx)
        except Exception:  # a bug or an input we did not foresee: keep scanning, say so
            log.exception("feature group %s failed", names[0])
            vector[0] = 1.0
            values = [0.0] * len(names)
            sig = [f"feature_error in {names[0].split('_')[0]} group"]
        vector[pos : pos + len(names)] = values
        signals.extend(sig)
        pos += len(names)
    return Extracted(vector=vector, summary=summarise(parsed, ctx, vector), signals=tuple(signals))


def summarise(parsed: ParsedMessage, ctx: Context, vector: npt.NDArray[np.float32]) -> MessageSummary:
    s = ctx.sender
    msgid = parsed.get("message-id")
    signers = sender.dkim_domains(parsed)
    return MessageSummary(
        message_id=msgid.strip() if msgid else None,
        subject=parsed.subject or None,
        # as mail carries them (`as_carried`): without the root's trailing dot ("example.com."), as the
        # policy's lists and protected domains are written (with it, a spoof of a protected domain or a
        # denied sender matched nothing), and an SMTPUTF8 sender's bücher.de as xn--bcher-kva.de
        from_addr=as_carried(s.addr) if s else None,
        from_display=s.display if s else None,
        from_domain=(as_carried(s.host) or None) if s else None,
        reply_to_addr=as_carried(ctx.reply_to.addr) if ctx.reply_to else None,
        to_addrs=tuple(addr for _, addr in parsed.addresses("to")[:50]),
        date=parsed.get("date"),
        defects=parsed.defects,
        from_org_domain=(s.domain or None) if s else None,
        reply_to_domain=(ctx.reply_to.domain or None) if ctx.reply_to else None,
        freemail_sender=bool(vector[_FREEMAIL_COLUMN] > 0),
        disguised_sender=any(vector[i] > 0 for i in _DISGUISE_COLUMNS),
        language=frozenset(group for group, i in _LANGUAGE_COLUMNS if vector[i] > 0),
        # for the policy only: list headers are no feature (the corpora's lists made them a ham marker)
        list_mail=sender.is_list_copy(parsed),
        bulk_evidence=sender.bulk_evidence(parsed, (s.domain if s else ""), signers),
        link_domains=tuple(dict.fromkeys(link.domain for link in ctx.links if link.domain))[:LINK_DOMAINS],
        dkim_signers=signers,
        html=bool(vector[_HTML_COLUMN] > 0),
        fake_reply=bool(vector[_FAKE_REPLY_COLUMN] > 0),
        from_others=ctx.from_others,
        auto_report=bool(vector[_REPORT_COLUMN] > 0),
        odd_digest=parsed.odd_digest,
        image_only=bool(vector[_IMAGE_ONLY_COLUMN] > 0),
        display_brand=identity.brand_in_display(s.display, s.domain) if s and s.display else None,
    )


def bucket_words(raw: bytes, limit: int = 3) -> dict[str, tuple[str, ...]]:
    """For explanations: each hashed word bucket (tok_0123) -> the message's own n-grams in it, commonest
    first, tokenised exactly as `extract` does. Parses the message again: call it only for messages
    being explained."""
    parsed = parse(raw)
    ctx = build(parsed, Envelope(), Protected())
    return text.bucket_grams(parsed.subject + "\n" + ctx.body_text, limit)


__all__ = ["SCHEMA", "Extracted", "FeatureSchema", "MessageSummary", "Protected", "bucket_words", "extract"]
