"""The gateway's actions in milter terms: a scanned message becomes header edits and a final reply.

The scan itself is the SMTP path's (`MessageProcessor.scan`: prepare pool, DNS, micro-batcher,
policy); what differs is the ending. Nothing is relayed: the MTA keeps the message and applies our
edits, so

* accept    -> our Authentication-Results and X-Milter-Category inserted on top, forged copies of
               our fields deleted (SMFIR_CHGHEADER with an empty value), then continue;
* tag       -> the same with the verdict fields and the Subject prefix;
* quarantine-> committed to our store first, then discard (the MTA drops its copy) or, with
               `server.milter_quarantine = "hold"`, SMFIR_QUARANTINE (the MTA's hold queue);
* reject    -> `550 5.7.1 <reason>` in the sender's session;
* a failed scan or a store that cannot commit -> `451 4.3.0` (tempfail), or with
               `policy.on_error = "accept"` continue with an "unscanned" tag: the MTA keeps the mail.

`milter_decision` (pure) builds the edits; `MilterActor` runs the scan and the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from milter.errors import MessageTooBig, StoreError, smtp_reply
from milter.gateway.headers import fold, forged
from milter.gateway.logfmt import kv, new_message_id
from milter.gateway.process import (
    REJECT_CODE,
    TEMPFAIL_REPLY,
    Inbound,
    MessageProcessor,
    category_header,
    scan_failed_reply,
    verdict_headers,
)
from milter.gateway.xforward import XForward
from milter.protocol import codec, constants
from milter.protocol.session import Decision, Edit, Message
from milter.types import Action, Envelope

if TYPE_CHECKING:
    from milter.scan import ScanResult

log = logging.getLogger("milter.gateway.milter")

def _addr(path: str) -> str:
    """`<a@b>` -> `a@b`; the null sender `<>` -> ``."""
    path = path.strip()
    return path[1:-1] if path.startswith("<") and path.endswith(">") else path


def envelope_of(message: Message) -> Envelope:
    """The envelope from the MTA's callbacks and macros (no XFORWARD needed: the MTA tells us)."""
    conn = message.connect
    addr = conn.address if conn is not None and conn.family in ("4", "6") else None
    if addr is not None and addr.lower().startswith("ipv6:"):
        addr = addr[5:]
    name = conn.hostname if conn is not None else None
    if name is not None and (name.startswith("[") or name in ("", "unknown")):
        name = None  # Postfix's and libmilter's spelling of "no reverse DNS name"
    # A client that authenticated is one of our users, as XFORWARD's SOURCE=LOCAL says on the SMTP path.
    macros = message.macros
    source = "LOCAL" if macros.get("{auth_authen}") else None
    return Envelope(
        mail_from=_addr(message.mail_from.address),
        rcpt_tos=tuple(_addr(r.address) for r in message.rcpts),
        client_addr=addr,
        client_name=name,
        helo=message.helo,
        queue_id=macros.get("i") or macros.get("{i}") or None,  # libmilter treats both names alike
        source=source,
    )


def to_inbound(message: Message) -> Inbound:
    return Inbound(
        id=new_message_id(),
        raw=message.raw(),
        envelope=envelope_of(message),
        mail_options=tuple(p.upper() for p in message.mail_from.params),
        xforward=XForward(),
    )


def _value(name: str, value: str, leading_space: bool) -> str:
    """A header value as the MTA wants it: folded like our SMTP path's, LF between lines."""
    folded = fold(name, value, b"\n").decode("ascii")[len(name) + 1 :].rstrip("\n")
    return folded if leading_space else folded.lstrip(" ")


def header_edits(
    message: Message,
    add: Sequence[tuple[str, str]],
    subject_prefix: str | None,
    authserv_id: str | None,
) -> tuple[Edit, ...]:
    """Deletions of forged fields (last occurrence first, so indexes stay valid), the Subject prefix,
    then `add` inserted at the top in order."""
    own_id = authserv_id.lower().encode("ascii", "replace") if authserv_id else None
    seen: dict[bytes, int] = {}
    deletions: list[codec.ChangeHeader] = []
    subject: codec.ChangeHeader | None = None
    for name, value in message.headers:
        key = name.lower()
        seen[key] = seen.get(key, 0) + 1
        text = name.decode("utf-8", "surrogateescape")
        if forged(name + b":" + value, own_id):
            deletions.append(codec.ChangeHeader(seen[key], text, ""))
        elif key == b"subject" and subject is None and subject_prefix:
            subject = codec.ChangeHeader(seen[key], text, _prefixed(value, subject_prefix, message))
    edits: list[Edit] = list(reversed(deletions))
    if subject_prefix and subject is None and not any(n.lower() == b"subject" for n, _ in message.headers):
        edits.append(codec.AddHeader("Subject", _value("Subject", subject_prefix, message.leading_space)))
    if subject is not None:
        edits.append(subject)
    # Each insert at index 0 goes above the one before: insert in reverse to keep `add`'s order.
    lead = message.leading_space
    edits += [codec.InsertHeader(0, name, _value(name, value, lead)) for name, value in reversed(add)]
    return tuple(edits)


def _prefixed(value: bytes, prefix: str, message: Message) -> str:
    text = value.decode("utf-8", "surrogateescape").lstrip(" \t")
    clean = " ".join(prefix.split())
    if not text.startswith(clean):
        text = f"{clean} {text}"
    return " " + text if message.leading_space else text


class MilterActor:
    """Scans a milter message with the gateway's processor and says what the MTA should do."""

    def __init__(self, processor: MessageProcessor, quarantine_mode: str) -> None:
        self._p = processor
        self._hold = quarantine_mode == "hold"

    @property
    def authserv_id(self) -> str | None:
        return self._p.auth.authserv_id if self._p.auth is not None else None

    async def decide(self, message: Message) -> Decision:
        """Never raises: a bug still ends in a tempfail, never a lost message."""
        p = self._p
        p.metrics.pending.inc()
        msg = to_inbound(message)
        try:
            decision = await self._decide(message, msg)
        except Exception as exc:
            log.exception(kv("internal_error", id=msg.id, queue_id=msg.envelope.queue_id))
            p.metrics.errors.labels("internal").inc()
            decision = Decision(codec.ReplyCode(smtp_reply(exc)))
        finally:
            p.metrics.pending.dec()
        final = decision.final
        code = final.text[:1] + "xx" if isinstance(final, codec.ReplyCode) else "2xx"
        p.metrics.replies.labels(code).inc()
        return decision

    async def _decide(self, message: Message, msg: Inbound) -> Decision:
        p = self._p
        if message.too_big:
            p.metrics.errors.labels("message_too_big").inc()
            reply = smtp_reply(MessageTooBig())
            log.info(kv("message_too_big", id=msg.id, queue_id=msg.envelope.queue_id, size=message.size,
                        reply=reply))
            return Decision(codec.ReplyCode(reply))
        started = time.perf_counter()
        try:
            result = await p.scan(msg)
        except Exception as exc:
            return self._scan_failed(message, msg, exc)
        p.metrics.scan_seconds.observe(time.perf_counter() - started)
        return await self._act(message, msg, result)

    def _scan_failed(self, message: Message, msg: Inbound, exc: Exception) -> Decision:
        unscanned = self._p.scan_failed(msg, exc)
        if unscanned is None:
            return Decision(codec.ReplyCode(scan_failed_reply(exc)))
        self._p.count(msg, None, "unscanned", reply="250")
        return Decision(codec.CONTINUE, header_edits(message, unscanned, None, self.authserv_id))

    def _headers(self, result: ScanResult, fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return self._p.with_auth_header(result, fields)

    async def _act(self, message: Message, msg: Inbound, result: ScanResult) -> Decision:
        p = self._p
        match result.action:
            case Action.REJECT:  # in the sender's session: a milter can always refuse in-session
                reason = (result.reasons[0] if result.reasons else "policy")[:120]
                text = f"{REJECT_CODE} Message rejected as {result.verdict.value}: {reason}"
                p.count(msg, result, "reject", reply=REJECT_CODE[:3])
                return Decision(codec.ReplyCode(" ".join(text.split())))
            case Action.QUARANTINE:
                return await self._quarantine(message, msg, result)
            case Action.TEMPFAIL:
                p.count(msg, result, "tempfail", reply=TEMPFAIL_REPLY[:3])
                return Decision(codec.ReplyCode(TEMPFAIL_REPLY))
            case Action.TAG:
                edits = header_edits(message, self._headers(result, verdict_headers(result)),
                                     result.subject_prefix, self.authserv_id)
                return await self._continue(msg, result, edits, "tag")
        fields = self._headers(result, [category_header(result)])
        edits = header_edits(message, fields, None, self.authserv_id)
        return await self._continue(msg, result, edits, "accept")

    async def _continue(
        self, msg: Inbound, result: ScanResult, edits: tuple[Edit, ...], action: str
    ) -> Decision:
        self._p.count(msg, result, action, reply="250")
        await self._p.record_later(msg, result)
        return Decision(codec.CONTINUE, edits)

    async def _quarantine(self, message: Message, msg: Inbound, result: ScanResult) -> Decision:
        p = self._p
        try:
            row = await p.quarantine.commit(result, msg.envelope, msg.raw)
        except Exception as exc:
            p.metrics.errors.labels("store_quarantine").inc()
            log.error(kv("quarantine_failed", id=msg.id, queue_id=msg.envelope.queue_id,
                         error=type(exc).__name__, detail=str(exc)[:200], on_error=p.settings.on_error))
            if p.settings.on_error == "accept":
                # Scanned but not stored: the recipient gets it, tagged, rather than nobody.
                fields = [*verdict_headers(result), ("X-Milter-Unstored", "quarantine store unavailable")]
                edits = header_edits(message, self._headers(result, fields), result.subject_prefix,
                                     self.authserv_id)
                p.count(msg, result, "tag", reply="250")
                return Decision(codec.CONTINUE, edits)
            err = exc if isinstance(exc, StoreError) else StoreError(str(exc))
            return Decision(codec.ReplyCode(smtp_reply(err)))
        p.count(msg, result, "quarantine", reply="250", row=row)
        # An MTA that does not allow SMFIR_QUARANTINE cannot hold it: drop its copy (ours is stored).
        if self._hold and constants.Action.QUARANTINE in message.actions:
            reason = f"mailsift quarantine id {row}: {result.verdict.value}"
            if result.reasons:
                reason += f" ({result.reasons[0][:200]})"
            # Postfix logs no reason for a hold; the held copy says why and where our copy is.
            fields = self._headers(result, [*verdict_headers(result), ("X-Milter-Quarantine-Id", str(row))])
            edits = header_edits(message, fields, None, self.authserv_id)
            return Decision(codec.CONTINUE, (*edits, codec.Quarantine(" ".join(reason.split()))))
        return Decision(codec.DISCARD)
