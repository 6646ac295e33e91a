"""Delivery reports (milter.gateway.dsn): what the fields say, and that the report parses as one."""

from __future__ import annotations

import email
import email.message
import email.policy
from datetime import UTC, datetime

from milter.gateway.dsn import MAX_HEADERS, build_dsn, header_block, status_of
from milter.gateway.relay import Refusal

WHEN = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def test_status_comes_from_the_reply_or_its_class() -> None:
    assert status_of(Refusal("a@x.test", 550, "5.1.1 <a@x.test>: User unknown")) == "5.1.1"
    assert status_of(Refusal("a@x.test", 553, "5.6.7 Non-ASCII recipient")) == "5.6.7"
    assert status_of(Refusal("a@x.test", 550, "User unknown")) == "5.0.0"  # no enhanced code given
    assert status_of(Refusal("a@x.test", 550, "4.2.2 odd")) == "5.0.0"  # a code of another class


def test_header_block_as_received_and_bounded() -> None:
    assert header_block(b"Subject: a\nFrom: b@x.test\n\nbody\n") == b"Subject: a\r\nFrom: b@x.test\r\n"
    assert header_block(b"Subject: a\r\n\r\nbody") == b"Subject: a\r\n"
    huge = b"".join(b"X-Pad-%06d: %s\r\n" % (i, b"y" * 60) for i in range(2000)) + b"\r\nbody"
    cut = header_block(huge)
    assert len(cut) <= MAX_HEADERS and cut.endswith(b"\r\n") and cut.startswith(b"X-Pad-000000")
    assert cut.count(b"\r\n") == cut.count(b"X-Pad-")  # whole lines only


def test_report_parses_and_names_each_refused_recipient() -> None:
    raw = "From: Jörg <j@sender.test>\r\nSubject: Grüße\r\nMessage-ID: <m@x>\r\n\r\nHallo\r\n".encode()
    refused = [Refusal("gone@rcpt.test", 550, "5.1.1 User unknown\r\nsecond line"),
               Refusal("zoë@rcpt.test", 553, "5.6.7 Non-ASCII recipient address not accepted downstream")]
    out = build_dsn(raw, "j@sender.test", refused, hostname="gw.test", remote_mta="mx.test",
                    arrival=WHEN, now=WHEN)
    report = email.message_from_bytes(out, _class=email.message.EmailMessage, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report" and report["Subject"]
    # RFC 6533: a non-ASCII recipient makes it a message/global-delivery-status, read as text here
    assert "message/global-delivery-status" in {p.get_content_type() for p in report.walk()}
    start = out.index(b"Content-Type: message/global-delivery-status\r\n\r\n")
    text = out[start:].split(b"\r\n--dsn-", 1)[0].decode()
    assert "\r\n\r\nReporting-MTA: dns; gw.test\r\n" in text
    assert "Final-Recipient: rfc822; gone@rcpt.test\r\nAction: failed\r\nStatus: 5.1.1\r\n" in text
    assert "Final-Recipient: utf-8; zoë@rcpt.test\r\nAction: failed\r\nStatus: 5.6.7\r\n" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 User unknown second line\r\n" in text  # one line
    ascii_only = build_dsn(raw, "j@sender.test", refused[:1], hostname="gw.test", remote_mta="mx.test",
                           arrival=WHEN, now=WHEN)
    assert b"Content-Type: message/delivery-status\r\n" in ascii_only
    [headers] = [p for p in report.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert "Grüße".encode() in headers.get_payload(decode=True)  # copied as received, 8-bit included
