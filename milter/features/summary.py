"""What feature extraction returns besides the vector: a small, picklable summary of the message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # milter.auth imports milter.features.domains: a runtime import here would be circular
    from milter.auth import AuthResults
    from milter.auth.dnsbl import Reputation


@dataclass(frozen=True)
class MessageSummary:
    """Header facts the policy, the store and the CLI need (decoded, never raw bytes)."""

    message_id: str | None
    subject: str | None
    from_addr: str | None  # addr-spec of the (first) From address, lower-cased
    from_display: str | None  # display name of From, decoded
    from_domain: str | None
    reply_to_addr: str | None
    to_addrs: tuple[str, ...]
    date: str | None
    defects: tuple[str, ...]  # parser defect class names, de-duplicated
    # Facts the policy's BEC rules combine (see milter/policy/bec.py); defaults say "nothing found".
    from_org_domain: str | None = None  # registrable domain of From (mail.example.co.uk -> example.co.uk)
    reply_to_domain: str | None = None  # registrable domain of Reply-To
    freemail_sender: bool = False  # From is a free-mail provider (gmail.com, outlook.com, ...)
    disguised_sender: bool = False  # free-mail From with an organisation or title name, or a display
    #                                 name that shows another address than the real sender
    language: frozenset[str] = frozenset()  # lexicon.LANGUAGE groups found in subject + body
    list_mail: bool = False  # carries List-Id or List-Post: a mailing list's copy
    # What marks the sender as a self-declared bulk sender (features.sender.bulk_evidence), in words:
    # one-click unsubscribe, Feedback-ID, Precedence: bulk, a DKIM signature aligned with From. Empty: none.
    bulk_evidence: tuple[str, ...] = ()
    # DKIM / DMARC (milter/auth) when the caller looked them up (the gateway; `scan --dns`); never a
    # model input: the corpora's keys are long gone, so no model could learn from it.
    auth: AuthResults | None = None
    # Registrable domains of the message's links, distinct, in order, at most MAX_LINK_DOMAINS (for the
    # domain blocklists; never a model input).
    link_domains: tuple[str, ...] = ()
    # Registrable d= domains of its DKIM-Signature headers (not verified here; `auth` says what verified):
    # empty for unsigned mail (milter.policy.unsigned).
    dkim_signers: tuple[str, ...] = ()
    html: bool = False  # it has an HTML part
    fake_reply: bool = False  # Subject says "Re:" with no In-Reply-To and no References (milter.policy.form)
    # The From addresses after the first, (display name, addr-spec), at most context.MAX_OTHER_FROMS;
    # empty for a From of one address. from_addr is only the first ("Smith, John <j@x>" unquoted reads as
    # two), a From with several is one DMARC cannot judge (milter.policy.dmarc), and the name shown may be
    # here.
    from_others: tuple[tuple[str, str], ...] = ()
    auto_report: bool = False  # a machine-generated report: a DSN, an auto-reply (Auto-Submitted)
    odd_digest: bool = False  # a multipart/digest holds a part that is no message (milter.parse)
    # Its HTML shows images and under 100 characters of text (the model's `html_image_only`), for the
    # policy (milter.policy.unsigned).
    image_only: bool = False
    # A brand the From display name names whose own domains exclude the From domain (lexicon.BRANDS;
    # "Norton Security <jokes@funnysnails.com>" -> "norton"), for the policy; None: no such brand.
    display_brand: str | None = None
    # What the DNS blocklists said (milter/auth/dnsbl.py) when the gateway asked them; never a model
    # input, for the same reason as `auth`.
    reputation: Reputation | None = None

    @property
    def replies_elsewhere(self) -> bool:
        """Replies go to another registrable domain than the one the message claims to come from.

        Not for list mail: a list that rewrites From to its own address (DMARC mitigation) sets Reply-To
        to the author, which is the list working, not a sender hiding where answers go."""
        if self.list_mail or not self.reply_to_domain:
            return False
        return self.reply_to_domain != self.from_org_domain


@dataclass(frozen=True)
class Extracted:
    """Result of feature extraction for one message: vector in schema order, summary, fired signals.

    `signals` are short human-readable reasons for the suspicious indicators that fired
    (for example "Reply-To domain differs from From domain"); they feed the verdict's reasons.
    """

    vector: npt.NDArray[np.float32]
    summary: MessageSummary
    signals: tuple[str, ...]
