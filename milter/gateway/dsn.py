"""Delivery status notifications (RFC 3464) for recipients the downstream refused after we took the message.

SMTP's DATA has one reply for all recipients. When the downstream refuses some recipients with a 5xx
and takes the others (milter.gateway.relay), the gateway answers 250 for the message: tempfailing would
only bounce the good recipients days later. But a 250 tells the sending MTA that every recipient is
served, so it bounces none: without a notification of our own the refused recipients' copies would
be lost and the sender never told (RFC 5321 section 6.1: after a 250 the receiver-SMTP must report a
delivery failure itself). This builds that report, to the envelope sender, from the null sender:

* the human-readable part: which recipients, and the downstream's reply for each;
* `message/delivery-status` (`message/global-delivery-status` where a recipient is not ASCII, RFC
  6533): Reporting-MTA (our hostname), Arrival-Date, and per recipient
  Final-Recipient, Action: failed, Status (the reply's enhanced status code, else 5.0.0),
  Remote-MTA (the downstream) and Diagnostic-Code (its reply, one line);
* `text/rfc822-headers`: the refused message's header block (cut at MAX_HEADERS bytes), so that the
  sender can tell which message it was.

Never for a message from the null sender (a bounce is never bounced, RFC 5321 section 4.5.5).

Why our own code: the standard library builds MIME but has no DSN, and the DSN packages on PyPI parse
bounces (flufl.bounce) rather than write them. The report is assembled as bytes, not through
`email.message`, so that the original headers are copied as they came (8-bit bytes included) and
nothing is re-folded.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import datetime
from email.utils import format_datetime

from milter.gateway.relay import Refusal

#: Bytes of the refused message's header block copied into the report at most.
MAX_HEADERS = 64 * 1024
_STATUS = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")
_LINE_BREAKS = re.compile(r"[\r\n]+")


def status_of(refusal: Refusal) -> str:
    """The enhanced status code of the refusal's reply (RFC 3463), else the class's generic one."""
    m = _STATUS.match(refusal.text.strip())
    if m and m.group(1)[0] == str(refusal.code)[0]:
        return m.group(1)
    return f"{str(refusal.code)[0]}.0.0"


def header_block(raw: bytes) -> bytes:
    """The message's header block as received (up to the blank line), cut at MAX_HEADERS bytes."""
    ends = [i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0]
    head = raw[: min(ends)] if ends else raw
    if len(head) > MAX_HEADERS:
        head = head[: head.rfind(b"\n", 0, MAX_HEADERS) + 1 or MAX_HEADERS]
    return head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n").rstrip(b"\r\n") + b"\r\n"


def _address_type(address: str) -> str:
    # RFC 6533: a non-ASCII address is reported with the utf-8 address type
    return "rfc822" if address.isascii() else "utf-8"


def _one_line(text: str) -> str:
    return _LINE_BREAKS.sub(" ", text).strip()


def build_dsn(
    raw: bytes,
    mail_from: str,
    refused: Sequence[Refusal],
    *,
    hostname: str,
    remote_mta: str,
    arrival: datetime,
    now: datetime,
) -> bytes:
    """The failure report for `refused` (see the module docstring), as the bytes to send from <>."""
    boundary = f"dsn-{uuid.uuid4().hex}"
    lines = [f"{r.recipient}: {_one_line(f'{r.code} {r.text}')}" for r in refused]
    human = (
        f"This is the mail gateway at {hostname}.\r\n\r\n"
        "Your message was delivered to its other recipients, but the next mail server refused it for\r\n"
        "the recipients below, so it could not be delivered to them:\r\n\r\n"
        + "".join(f"    {line}\r\n" for line in lines)
        + "\r\nThe headers of your message are attached.\r\n"
    )
    per_message = f"Reporting-MTA: dns; {hostname}\r\nArrival-Date: {format_datetime(arrival)}\r\n"
    per_recipient = "".join(
        f"\r\nFinal-Recipient: {_address_type(r.recipient)}; {r.recipient}\r\n"
        "Action: failed\r\n"
        f"Status: {status_of(r)}\r\n"
        f"Remote-MTA: dns; {remote_mta}\r\n"
        f"Diagnostic-Code: smtp; {_one_line(f'{r.code} {r.text}')}\r\n"
        for r in refused
    )
    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
        f"To: <{mail_from}>\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {format_datetime(now)}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@{hostname}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
        "\r\n"
    )
    # RFC 6533: a report that names a non-ASCII address is a message/global-delivery-status
    ascii_only = all(r.recipient.isascii() for r in refused)
    status_type = "delivery-status" if ascii_only else "global-delivery-status"
    parts = [
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + human,
        f"Content-Type: message/{status_type}\r\n\r\n" + per_message + per_recipient,
    ]
    body = "".join(f"--{boundary}\r\n{part}\r\n" for part in parts).encode("utf-8", "surrogateescape")
    headers_part = (f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n").encode() + header_block(raw)
    return head.encode("utf-8", "surrogateescape") + body + headers_part + f"\r\n--{boundary}--\r\n".encode()
