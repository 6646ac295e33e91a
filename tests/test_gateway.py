"""`milter serve` in-process: real gateway, real aiosmtpd sink, real SQLite store, real clients."""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import logging
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from gateway_support import (
    QUARANTINE_SENDER,
    REJECT_DOMAIN,
    TAG_DOMAIN,
    TEST_POLICY,
    Scenario,
    Sink,
    account,
    make_message,
    run_gateway_scenario,
    send,
)

from milter.config import DomainRule
from milter.explain import Explanation
from milter.gateway.server import Gateway


def run_scenario(tmp_path: Path, free_port: Callable[[], int], scenario: Scenario, **server: Any) -> Any:
    return run_gateway_scenario(tmp_path, free_port, scenario, **server)


def test_accept_relays_bytes_with_forged_headers_stripped_and_xforward(
    tmp_path: Path, free_port: Any
) -> None:
    forged = (
        "X-Milter-Verdict: ham\r\nX-Milter-Scores: forged\r\n"
        "Authentication-Results: gw.test; dmarc=pass header.from=sender.test\r\n"
    )
    upstream = "Authentication-Results: mx.upstream.test; spf=pass smtp.mailfrom=sender.test\r\n"
    raw = make_message("acc1@test", extra=forged + upstream)

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.address[1], start_tls=False)
        await client.connect()
        ehlo = await client.ehlo(hostname="postfix.test")
        assert "XFORWARD" in ehlo.message and "SIZE" in ehlo.message
        resp = await client.execute_command(
            b"XFORWARD", b"NAME=mx.client.test ADDR=192.0.2.55 PROTO=ESMTP HELO=helo.client.test"
        )
        assert resp.code == 250
        assert (await client.execute_command(b"XFORWARD", b"IDENT=QID123 SOURCE=REMOTE")).code == 250
        _, text = await client.sendmail("alice@sender.test", ["bob@rcpt.test"], raw)
        assert text.startswith("2.0.0 Ok: queued as S1")  # the downstream's own reply is passed on
        await client.quit()
        assert len(sink.messages) == 1
        got = sink.messages[0]
        # Ours on top (no DNS answers here: no SPF record for the XFORWARD client to match, no DMARC)
        # with the category every scanned message gets, the forged one in our name and the X-Milter-*
        # ones gone, the upstream's kept, every other byte as it came.
        ours = (
            b"Authentication-Results: gw.test; dkim=none; spf=none\r\n"
            b" smtp.mailfrom=sender.test; dmarc=none header.from=sender.test; arc=none\r\n"
            b"X-Milter-Category: ham\r\n"
        )
        assert got.raw == ours + raw.replace(forged.encode(), b"")
        assert (got.xforward.addr, got.xforward.ident, got.xforward.helo) == (
            "192.0.2.55",
            "QID123",
            "helo.client.test",
        )

    store = run_scenario(tmp_path, free_port, scenario)
    rows = store.labelled_examples() or []
    assert rows == []  # nothing labelled; check the verdict row itself
    row = store.get(1)
    assert row is not None and row.action == "accept" and not row.quarantined
    assert (row.client_addr, row.client_name, row.queue_id, row.helo) == (
        "192.0.2.55",
        "mx.client.test",
        "QID123",
        "helo.client.test",
    )


def test_tag_adds_verdict_headers_and_subject_prefix(tmp_path: Path, free_port: Any) -> None:
    raw = make_message("tag1@test", subject="Cheap meds")

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        out = await send(gw.address[1], raw, rcpts=[f"carol@{TAG_DOMAIN}"])
        assert out.code == 250
        got = sink.messages[0].raw
        head, _, body = got.partition(b"\r\n\r\n")
        assert re.sub(rb"\r\n[ \t]+", b" ", head).startswith(
            b"Authentication-Results: gw.test; dkim=none; dmarc=none header.from=sender.test; arc=none\r\n"
        )
        assert b"\r\nX-Milter-Verdict: spam\r\nX-Milter-Category: spam\r\nX-Milter-Scores: ham=" in head
        assert b"\r\nX-Milter-Reasons: " in head
        assert b"\r\nSubject: [SPAM] Cheap meds\r\n" in head
        assert body == raw.partition(b"\r\n\r\n")[2]
        # the model's own reasons, short form: the same explanation the store keeps for the verdict
        unfolded = re.sub(r"\r\n[ \t]+", " ", head.decode())
        seen.extend(re.findall(r"\r\nX-Milter-Explanation: ([^\r]*)", unfolded))

    seen: list[str] = []
    store = run_scenario(tmp_path, free_port, scenario)
    (why,) = seen
    row = store.get(1)
    assert row is not None and row.action == "tag" and row.explanation is not None
    assert why == Explanation.from_json(row.explanation).short()
    assert why.startswith("spam vs ham: log-odds ") and "(+" in why


# What a newsletter carries since Gmail's and Yahoo's 2024 bulk-sender rules. The DKIM signature is
# only claimed: the test resolver has no key for it, so the gateway's check does not bear it out.
NEWSLETTER = (
    "List-Unsubscribe: <https://sender.test/unsubscribe/42>\r\n"
    "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    "Feedback-ID: 42:newsletter:sender\r\n"
    "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=sender.test; s=s1;\r\n"
    " h=from:to:subject:date; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=AAAA\r\n"
)
DIGEST_DOMAIN = "digest.test"  # its domain rule tags bulk mail


def test_bulk_mail_is_relayed_with_its_category(tmp_path: Path, free_port: Any) -> None:
    digest = DomainRule(DIGEST_DOMAIN, bulk_action="tag")
    policy = replace(TEST_POLICY, domains=(*TEST_POLICY.domains, digest))

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        port = gw.address[1]
        plain = await send(port, make_message("plain@test", subject="This week"))
        bulk = await send(port, make_message("bulk@test", subject="This week", extra=NEWSLETTER))
        tagged = await send(port, make_message("digest@test", subject="This week", extra=NEWSLETTER),
                            rcpts=[f"dan@{DIGEST_DOMAIN}"])
        assert [o.code for o in (plain, bulk, tagged)] == [250, 250, 250]
        heads = [re.sub(r"\r\n[ \t]+", " ", m.raw.split(b"\r\n\r\n", 1)[0].decode()) for m in sink.messages]
        assert "\r\nX-Milter-Category: ham\r\n" in heads[0] and "X-Milter-Verdict" not in heads[0]
        # accepted as bulk: the category only, the subject untouched
        assert "\r\nX-Milter-Category: bulk\r\n" in heads[1] and "X-Milter-Verdict" not in heads[1]
        assert "\r\nSubject: This week\r\n" in heads[1]
        # tagged as bulk for digest.test: the verdict fields, the evidence the check bore out, the prefix
        assert "\r\nX-Milter-Verdict: bulk\r\nX-Milter-Category: bulk\r\n" in heads[2]
        assert "\r\nX-Milter-Reasons: bulk sender: one-click unsubscribe (RFC 8058), Feedback-ID" in heads[2]
        assert "DKIM signature of" not in heads[2]
        assert "\r\nSubject: [SPAM] This week\r\n" in heads[2]
        assert sink.messages[1].raw.endswith(make_message("bulk@test", subject="This week", extra=NEWSLETTER))
        metrics = gw.metrics.render().decode()
        assert 'milter_messages_total{action="accept",verdict="bulk"} 1.0' in metrics
        assert 'milter_messages_total{action="tag",verdict="bulk"} 1.0' in metrics
        assert 'milter_messages_total{action="accept",verdict="ham"} 1.0' in metrics

    store = run_scenario(tmp_path, free_port, scenario, policy=policy)
    rows = [store.get(pk) for pk in (1, 2, 3)]
    assert sorted((r.message_id, r.verdict, r.action) for r in rows if r is not None) == [
        ("<bulk@test>", "bulk", "accept"), ("<digest@test>", "bulk", "tag"), ("<plain@test>", "ham", "accept")
    ]


def test_quarantine_commits_raw_and_does_not_relay(
    tmp_path: Path, free_port: Any, caplog: pytest.LogCaptureFixture
) -> None:
    raw = make_message("q1@test")

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        out = await send(gw.address[1], raw, mail_from=QUARANTINE_SENDER)
        assert out.code == 250 and "quarantined as" in out.text
        qid = int(out.text.rsplit(" ", 1)[1])
        assert sink.messages == []
        assert await asyncio.to_thread(store.get_raw, qid) == raw
        account([out], sink, store)
        # held by a deny rule, the model's view is explained and kept with the verdict, and logged
        row = await asyncio.to_thread(store.get, qid)
        assert row is not None and row.explanation is not None
        e = Explanation.from_json(row.explanation)
        assert e.model == row.model and e.target == (row.verdict if row.verdict in ("spam", "bec") else "ham")
        (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("message ")]
        assert f"quarantine_id={qid}" in line and "why=" in line and e.headline() in line

    with caplog.at_level(logging.INFO, logger="milter.gateway"):
        run_scenario(tmp_path, free_port, scenario)


def test_reject_is_550_before_queue_and_quarantine_after_queue(tmp_path: Path, free_port: Any) -> None:
    raw = make_message("rej1@test")

    async def before(gw: Gateway, sink: Sink, store: Any) -> None:
        out = await send(gw.address[1], raw, rcpts=[f"dave@{REJECT_DOMAIN}"])
        assert out.code == 550 and out.text.startswith("5.7.1 ")
        assert sink.messages == []

    async def after(gw: Gateway, sink: Sink, store: Any) -> None:
        out = await send(gw.address[1], raw, rcpts=[f"dave@{REJECT_DOMAIN}"])
        assert out.code == 250 and "quarantined" in out.text
        assert sink.messages == []

    (tmp_path / "before").mkdir()
    run_scenario(tmp_path / "before", free_port, before, mode="before-queue")
    run_scenario(tmp_path, free_port, after, mode="after-queue")


def _report(received: Any) -> email.message.EmailMessage:
    """A delivery report the sink received, parsed; checks that it is one (RFC 3464)."""
    report = email.message_from_bytes(received.raw, _class=email.message.EmailMessage,
                                      policy=email.policy.default)
    assert received.mail_from in ("", "<>")  # from the null sender: a report is never bounced
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    return report


def _report_fields(report: email.message.EmailMessage) -> list[dict[str, str]]:
    """The per-recipient field groups of the report's message/delivery-status part."""
    [status] = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    groups = [dict(g.items()) for g in status.get_payload()]  # type: ignore[union-attr]
    return groups[1:]  # the first group is the per-message one


def test_partial_recipient_refusals(tmp_path: Path, free_port: Any) -> None:
    """A recipient refused with 5xx among accepted ones: the message goes to the others, the client
    gets 250, and the sender gets a delivery report naming the refused recipient (its MTA takes the 250
    for every recipient; before the report it was never told)."""

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        sink.behaviour.rcpt_replies["gone@rcpt.test"] = "550 5.1.1 <gone@rcpt.test>: User unknown"
        raw = make_message("p1@test")
        ok = await send(gw.address[1], raw, rcpts=["bob@rcpt.test", "gone@rcpt.test"])
        assert ok.code == 250 and "gone@rcpt.test" in ok.text
        assert sink.messages[0].rcpt_tos == ["bob@rcpt.test"]
        assert len(sink.messages) == 2 and sink.messages[1].rcpt_tos == ["alice@sender.test"]
        report = _report(sink.messages[1])
        assert report["To"].addresses[0].addr_spec == "alice@sender.test"
        assert report["Auto-Submitted"] == "auto-replied"
        assert _report_fields(report) == [{
            "Final-Recipient": "rfc822; gone@rcpt.test", "Action": "failed", "Status": "5.1.1",
            "Remote-MTA": "dns; 127.0.0.1",
            "Diagnostic-Code": "smtp; 550 5.1.1 <gone@rcpt.test>: User unknown",
        }]
        [headers] = [p for p in report.walk() if p.get_content_type() == "text/rfc822-headers"]
        assert b"Message-ID: <p1@test>" in headers.get_payload(decode=True)  # which message it was
        sink.behaviour.rcpt_replies["busy@rcpt.test"] = "452 4.2.2 Mailbox full"
        later = await send(gw.address[1], make_message("p2@test"), rcpts=["bob@rcpt.test", "busy@rcpt.test"])
        assert later.code == 452 and later.text.startswith("4.2.2")
        only_bad = await send(gw.address[1], make_message("p3@test"), rcpts=["gone@rcpt.test"])
        assert only_bad.code == 550
        assert len(sink.messages) == 2  # nothing delivered for p2 (retried whole) or p3, no report
        # the pooled connection was reset after the refusals and still delivers
        assert (await send(gw.address[1], make_message("p4@test"))).code == 250
        assert len(sink.messages) == 3

    run_scenario(tmp_path, free_port, scenario)


def test_a_report_that_cannot_be_sent(tmp_path: Path, free_port: Any) -> None:
    """No report for a message from the null sender (a bounce is never bounced), nor where the
    downstream refuses the sender's own address for good: both answered 250, the others served. A
    report the downstream refuses for now: 4xx, so the sender retries; its other recipients may get the
    message twice, and nobody loses it."""

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        sink.behaviour.rcpt_replies["gone@rcpt.test"] = "550 5.1.1 User unknown"
        rcpts = ["bob@rcpt.test", "gone@rcpt.test"]
        bounce = await send(gw.address[1], make_message("n1@test"), mail_from="", rcpts=rcpts)
        assert bounce.code == 250 and [m.rcpt_tos for m in sink.messages] == [["bob@rcpt.test"]]
        sink.behaviour.rcpt_replies["nobody@sender.test"] = "550 5.1.1 No such sender"
        unknown = await send(gw.address[1], make_message("n2@test"), "nobody@sender.test", rcpts)
        assert unknown.code == 250 and len(sink.messages) == 2
        sink.behaviour.rcpt_replies["alice@sender.test"] = "451 4.3.0 Try again later"
        later = await send(gw.address[1], make_message("n3@test"), rcpts=rcpts)
        assert later.code == 451 and later.text.startswith("4.3.0")
        assert [m.rcpt_tos for m in sink.messages][2:] == [["bob@rcpt.test"]]  # delivered; retried whole
        del sink.behaviour.rcpt_replies["alice@sender.test"]
        again = await send(gw.address[1], make_message("n3@test"), rcpts=rcpts)
        assert again.code == 250
        assert [m.rcpt_tos for m in sink.messages][3:] == [["bob@rcpt.test"], ["alice@sender.test"]]
        _report(sink.messages[-1])

    run_scenario(tmp_path, free_port, scenario)


def test_size_limit_and_declared_size(tmp_path: Path, free_port: Any) -> None:
    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        big = make_message("big@test", body="x" * 900 + "\r\n" * 1 + ("y" * 70 + "\r\n") * 200)
        out = await send(gw.address[1], big)
        assert (out.code, out.text) == (552, "5.3.4 Message too big for system")
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.address[1], start_tls=False)
        await client.connect()
        await client.ehlo()
        resp = await client.execute_command(b"MAIL", b"FROM:<a@b.test>", b"SIZE=999999")
        assert resp.code == 552 and resp.message.startswith("5.3.4")
        await client.quit()
        assert (await send(gw.address[1], make_message("small@test"))).code == 250
        assert sink.message_ids() == ["<small@test>"]

    run_scenario(tmp_path, free_port, scenario, max_message_size=4096)


def test_max_sessions_answers_421(tmp_path: Path, free_port: Any) -> None:
    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        held = []
        for _ in range(2):
            c = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.address[1], start_tls=False)
            await c.connect()
            held.append(c)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.address[1])
        line = await reader.readline()
        assert line.startswith(b"421 4.7.0")
        assert await reader.read() == b""  # and closed
        writer.close()
        for c in held:
            await c.quit()
        await asyncio.sleep(0.05)  # let the gateway see the sessions end
        assert (await send(gw.address[1], make_message("after@test"))).code == 250

    run_scenario(tmp_path, free_port, scenario, max_sessions=2)


def test_command_timeout_closes_idle_session(tmp_path: Path, free_port: Any) -> None:
    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.address[1])
        assert (await reader.readline()).startswith(b"220 ")
        async with asyncio.timeout(10):  # generous bound; the point is that it closes at all
            rest = await reader.read()
        assert rest.startswith(b"421 4.4.2")
        writer.close()

    run_scenario(tmp_path, free_port, scenario, command_timeout=0.3)


def test_recipients_past_the_limit_get_452_and_arrive_in_the_next_transaction(
    tmp_path: Path, free_port: Any
) -> None:
    """server.max_recipients: the third RCPT of a transaction gets 452 4.5.3, as RFC 5321 has a client
    send the rest in another transaction; the two let in are delivered, then the third in its own."""

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        rcpts = ["a@rcpt.test", "b@rcpt.test", "c@rcpt.test"]
        raw = make_message("limited@test")
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.address[1], start_tls=False)
        await c.connect()
        await c.ehlo()
        await c.mail("alice@sender.test")
        replies = []
        for rcpt in rcpts:
            try:
                replies.append((await c.rcpt(rcpt)).code)
            except aiosmtplib.SMTPRecipientRefused as exc:
                replies.append(exc.code)
                assert exc.message.startswith("4.5.3")
        assert replies == [250, 250, 452]
        assert (await c.data(raw)).code == 250
        refused, _ = await c.sendmail("alice@sender.test", rcpts[2:], raw)  # the rest, as an MTA would
        assert refused == {}
        await c.quit()
        assert [m.rcpt_tos for m in sink.messages] == [rcpts[:2], rcpts[2:]]

    run_scenario(tmp_path, free_port, scenario, max_recipients=2)


def test_xforward_syntax_and_state_errors(tmp_path: Path, free_port: Any) -> None:
    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.address[1], start_tls=False)
        await c.connect()
        await c.ehlo()
        assert (await c.execute_command(b"XFORWARD", b"COLOUR=blue")).code == 501
        await c.mail("a@sender.test")
        assert (await c.execute_command(b"XFORWARD", b"ADDR=192.0.2.1")).code == 503
        assert (await c.execute_command(b"FOO")).code == 500
        await c.quit()

    run_scenario(tmp_path, free_port, scenario)


def test_xforward_only_from_authorized_hosts(tmp_path: Path, free_port: Any) -> None:
    """A client outside server.xforward_hosts is not offered XFORWARD and cannot claim another address."""

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.address[1], start_tls=False)
        await c.connect()
        ehlo = await c.ehlo()
        assert "XFORWARD" not in ehlo.message
        reply = await c.execute_command(b"XFORWARD", b"ADDR=192.0.2.1")
        assert (reply.code, reply.message) == (550, "5.7.0 Error: insufficient authorization")
        await c.quit()
        # mail from that client still flows, scanned as coming from where it really comes from
        out = await send(gw.address[1], make_message("noxf@test"))
        assert out.code == 250

    run_scenario(tmp_path, free_port, scenario, xforward_hosts=("192.0.2.0/24",))


def test_metrics_and_healthz(tmp_path: Path, free_port: Any) -> None:
    mport = free_port()

    async def get(path: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", mport)
        writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        return data

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        assert gw.metrics_port == mport
        assert (await get("/healthz")).endswith(b"\r\n\r\nok\n")
        await send(gw.address[1], make_message("m1@test"))
        await send(gw.address[1], make_message("m2@test"), mail_from=QUARANTINE_SENDER)
        body = (await get("/metrics")).decode()
        assert 'milter_messages_total{action="accept",verdict="ham"} 1.0' in body
        assert 'milter_messages_total{action="quarantine",verdict="spam"} 1.0' in body
        assert "milter_batch_size_count" in body and "milter_delivery_seconds_bucket" in body
        assert (await get("/nope")).startswith(b"HTTP/1.0 404")

    run_scenario(tmp_path, free_port, scenario, metrics_listen=f"127.0.0.1:{mport}")


def test_null_sender_and_many_concurrent_messages(tmp_path: Path, free_port: Any) -> None:
    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        bounce = await send(gw.address[1], make_message("bounce@test"), mail_from="")
        assert bounce.code == 250 and sink.messages[0].mail_from in ("", "<>")
        outs = await asyncio.gather(*(send(gw.address[1], make_message(f"c{i}@test")) for i in range(40)))
        assert all(o.code == 250 for o in outs)
        account(outs, sink, store)

    run_scenario(tmp_path, free_port, scenario)
