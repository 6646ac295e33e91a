"""End to end through a real Postfix: inbound smtpd -> content_filter -> filter -> reinjection -> Maildir.

The filter is either `milter serve` (a subprocess, as Postfix would meet it in production) or, to test
the harness on its own, a trivial aiosmtpd relay defined here that only passes mail on with XFORWARD.
Every socket is on loopback; the original client connects from 127.0.0.2 so its address is told apart
from the filter's own 127.0.0.1 connections.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from postfix import DOMAIN, Postfix, free_port, running_postfix, skip_reason
from serve_support import ServeProcess

from milter.store import Store
from milter.store.rows import MessageRow

pytestmark = pytest.mark.postfix

CLIENT_ADDR = "127.0.0.2"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _need_postfix() -> None:
    # In a fixture, not at import: the conftest hook turns this skip into a failure under CI=true.
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)


def _message(subject: str = "Quarterly report") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Alice Example <alice@example.org>"
    msg["To"] = f"bob@{DOMAIN}"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<e2e-{time.monotonic_ns()}@example.org>"
    msg["Date"] = "Tue, 03 Nov 2026 10:00:00 +0000"
    msg.set_content("Hi Bob,\n\nthe figures for the quarter are attached as discussed.\n\nAlice\n")
    return msg


# -- a trivial after-queue filter: what Postfix expects of one, nothing more -------------------------


@dataclass
class Seen:
    xforward: dict[str, str]
    mail_from: str
    rcpt_tos: list[str]


@dataclass
class StubRelay:
    """Accepts from Postfix's `scan` client, records XFORWARD, relays to the reinjection port with the
    same XFORWARD and an `X-Stub-Client` header."""

    downstream_port: int
    seen: list[Seen] = field(default_factory=list)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        # Offer XFORWARD, or Postfix's smtp client will not send it.
        return [*responses[:-1], "250-XFORWARD NAME ADDR PROTO HELO SOURCE", responses[-1]]

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        xf: dict[str, str] = getattr(session, "xforward", {})
        self.seen.append(Seen(dict(xf), str(envelope.mail_from), list(envelope.rcpt_tos)))
        content = envelope.original_content or b""  # bytes as received (decode_data is off)
        raw = f"X-Stub-Client: {xf.get('ADDR', '?')}\r\n".encode() + content
        try:
            await asyncio.to_thread(self._relay, xf, str(envelope.mail_from), list(envelope.rcpt_tos), raw)
        except (OSError, smtplib.SMTPException) as exc:
            return f"451 4.4.0 relay failed: {exc}"
        return "250 2.0.0 relayed"

    def _relay(self, xf: dict[str, str], mail_from: str, rcpt_tos: list[str], raw: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", self.downstream_port, timeout=30) as smtp:
            smtp.ehlo("stub.localdomain")
            attrs = " ".join(f"{k}={v}" for k, v in xf.items() if k in ("NAME", "ADDR", "HELO", "PROTO"))
            if attrs and smtp.has_extn("xforward"):
                code, reply = smtp.docmd("XFORWARD", attrs)
                if code != 250:
                    raise smtplib.SMTPResponseException(code, reply)
            smtp.sendmail(mail_from, rcpt_tos, raw)


class _XForwardSMTP(SMTP):
    async def smtp_XFORWARD(self, arg: str) -> None:  # aiosmtpd dispatches on the name
        assert self.session is not None
        xf: dict[str, str] = getattr(self.session, "xforward", {})
        for item in (arg or "").split():
            key, _, value = item.partition("=")
            xf[key.upper()] = value
        self.session.xforward = xf  # type: ignore[attr-defined]
        await self.push("250 2.0.0 Ok")


class _StubController(Controller):
    def factory(self) -> SMTP:
        return _XForwardSMTP(self.handler, hostname="stub.localdomain")



@contextmanager
def stub_filter(port: int, downstream_port: int) -> Iterator[StubRelay]:
    relay = StubRelay(downstream_port)
    controller = _StubController(relay, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield relay
    finally:
        controller.stop()


def _assert_reinjected_with_client(pf: Postfix, client_addr: str) -> re.Match[str]:
    """The filter passed the original client on with XFORWARD: the reinjection smtpd logs it as
    `orig_client` (Postfix keeps XFORWARD for logging and policy; its Received line names the filter).
    Group 1 is the `orig_queue_id` (XFORWARD IDENT) when the filter passed that on too."""
    return pf.wait_for_log(
        r"/reinject/smtpd\[\d+\]: \w+: client=\S+\[127\.0\.0\.1\],"
        rf"(?: orig_queue_id=(\w+),)? orig_client=\S*\[{re.escape(client_addr)}\]"
    )


def _assert_deferred_then_flushed(pf: Postfix) -> None:
    """With the filter down, Postfix keeps the message queued (4.x), not bounced."""
    pf.wait_for_log(
        rf"relay=none, .*status=deferred \(connect to 127\.0\.0\.1\[127\.0\.0\.1\]:{pf.filter_port}: "
    )
    queued = pf.queue()
    assert len(queued) == 1, queued
    assert queued[0]["queue_name"] == "deferred", queued
    assert not pf.delivered()
    assert "status=bounced" not in pf.log()


# -- the harness alone, with the stub as filter -------------------------------------------------------


def test_stub_filter_loop_delivers_with_xforward() -> None:
    filter_port = free_port()
    with running_postfix(filter_port) as pf, stub_filter(filter_port, pf.reinject_port) as relay:
        msg = _message()
        pf.send(msg, source_addr=CLIENT_ADDR)
        (raw,) = pf.wait_for_mail(1)

        delivered = message_from_bytes(raw, policy=policy.default)
        assert delivered["Message-ID"] == msg["Message-ID"]
        assert delivered["X-Stub-Client"] == CLIENT_ADDR
        # Postfix's scan client told the filter who the real client was...
        assert [s.xforward.get("ADDR") for s in relay.seen] == [CLIENT_ADDR]
        assert relay.seen[0].rcpt_tos == [f"bob@{DOMAIN}"]
        # ...and the filter passed it on to the reinjection smtpd.
        _assert_reinjected_with_client(pf, CLIENT_ADDR)


def test_stub_filter_down_defers_then_flush_delivers() -> None:
    filter_port = free_port()
    with running_postfix(filter_port) as pf:
        pf.send(_message(), source_addr=CLIENT_ADDR)
        _assert_deferred_then_flushed(pf)
        with stub_filter(filter_port, pf.reinject_port):
            pf.flush()
            pf.wait_for_mail(1)
            pf.wait_for_log(r"status=sent \(delivered to maildir\)")
        assert pf.queue() == []


def test_swaks_through_stub_filter() -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks not installed (apt-get install swaks)")
    filter_port = free_port()
    with running_postfix(filter_port) as pf, stub_filter(filter_port, pf.reinject_port) as relay:
        out = subprocess.run(
            [swaks, "--server", "127.0.0.1", "--port", str(pf.inbound_port), "--local-interface", CLIENT_ADDR,
             "--from", "carol@example.net", "--to", f"bob@{DOMAIN}", "--header", "Subject: swaks e2e"],
            capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "250 2.0.0 Ok: queued" in out.stdout
        (raw,) = pf.wait_for_mail(1)
    assert message_from_bytes(raw, policy=policy.default)["Subject"] == "swaks e2e"
    assert relay.seen[0].mail_from == "carol@example.net"


# -- the real gateway: `milter serve` as Postfix's content filter ------------------------------------

# Mail from this client address is quarantined by the gateway's deny_ips: the gateway only sees
# 127.0.0.1 (Postfix) on its socket, so this works only if XFORWARD carried the address through.
DENIED_CLIENT = "127.0.0.3"

# Model thresholds off; every message to DOMAIN is tagged by a domain rule, so the outcome is the same
# for any trained model: the test is about the plumbing, not the scores.
GATEWAY_POLICY = f"""
[policy]
subject_prefix = "[SPAM]"
spam = {{ tag = false, quarantine = false, reject = false }}
bec = {{ tag = false, quarantine = false, reject = false }}

[policy.lists]
deny_ips = ["{DENIED_CLIENT}/32"]

[[policy.domain]]
domain = "{DOMAIN}"
spam = {{ tag = 0.0 }}
"""


@dataclass
class Gateway(ServeProcess):
    port: int = 0
    db_url: str = ""

    def start(self, downstream_port: int, timeout: float = 90.0) -> None:
        # The shipped model unless MILTER_E2E_MODEL names another (to try the plumbing with any model).
        model = os.environ.get("MILTER_E2E_MODEL")
        model_table = f"[model]\npath = {json.dumps(model)}\n" if model else ""
        args = ["--listen", f"127.0.0.1:{self.port}", "--downstream", f"127.0.0.1:{downstream_port}",
                "--db", self.db_url, "--workers", "1", "--metrics-listen", "off"]
        self.launch(model_table + GATEWAY_POLICY, args, self._greets, timeout)

    def _greets(self) -> bool:
        # Ready means greeting: the socket may accept (kernel backlog) before the server answers.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as sock:
                if sock.makefile("rb").readline().startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return True
        except OSError:
            pass
        return False


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(workdir=tmp_path, port=free_port(), db_url=f"sqlite:///{tmp_path / 'milter.db'}")
    try:
        yield gw
    finally:
        gw.stop()


def _rows(db_url: str, count: int, timeout: float = 30.0) -> list[MessageRow]:
    """The first `count` verdicts in the store; the gateway records after relaying, so poll."""
    deadline = time.monotonic() + timeout
    with Store.open(db_url) as store:
        while True:
            rows = [r for i in range(1, count + 1) if (r := store.get(i)) is not None]
            if len(rows) == count:
                return rows
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(rows)} of {count} verdicts recorded after {timeout}s")
            time.sleep(0.1)


def _inbound_queue_id(pf: Postfix, client_addr: str) -> str:
    """The queue id the inbound smtpd gave the message: Postfix forwards it as XFORWARD IDENT."""
    pattern = rf"postfix-test-\d+/smtpd\[\d+\]: (\w+): client=\S*\[{re.escape(client_addr)}\]"
    return pf.wait_for_log(pattern)[1]


def test_gateway_tags_relays_and_records_xforward_client(gateway: Gateway) -> None:
    with running_postfix(gateway.port) as pf:
        gateway.start(pf.reinject_port)
        msg = _message("Invoice 4471")
        pf.send(msg, source_addr=CLIENT_ADDR)
        (raw,) = pf.wait_for_mail(1)

        delivered = message_from_bytes(raw, policy=policy.default)
        assert delivered["Message-ID"] == msg["Message-ID"]
        assert delivered["X-Milter-Verdict"] == "spam"
        assert re.fullmatch(r"ham=[\d.]+ spam=[\d.]+ bec=[\d.]+", str(delivered["X-Milter-Scores"]))
        assert delivered["X-Milter-Reasons"]
        assert delivered["Subject"] == "[SPAM] Invoice 4471"
        assert "Hi Bob" in delivered.get_body().get_content()  # type: ignore[union-attr]
        inbound_id = _inbound_queue_id(pf, CLIENT_ADDR)
        # Downstream, Postfix knows the original client and queue id (XFORWARD ADDR, IDENT)...
        assert _assert_reinjected_with_client(pf, CLIENT_ADDR)[1] == inbound_id

        (row,) = _rows(gateway.db_url, 1)
        assert (row.verdict, row.action) == ("spam", "tag")
        assert row.client_addr == CLIENT_ADDR
        # ...and so does the store.
        assert row.queue_id == inbound_id
        assert row.mail_from == "alice@example.org"
        assert row.rcpt_tos == (f"bob@{DOMAIN}",)
        assert row.message_id == msg["Message-ID"]
        assert not row.quarantined


def test_gateway_quarantines_by_xforward_client_address(gateway: Gateway) -> None:
    with running_postfix(gateway.port) as pf:
        gateway.start(pf.reinject_port)
        msg = _message("From a denied client")
        pf.send(msg, source_addr=DENIED_CLIENT)
        # Postfix hands the message over and is done with it: held by the gateway, not delivered.
        pf.wait_for_log(
            r"/scan/smtp\[\d+\]: \w+: to=<bob@test\.localdomain>, .*status=sent \(250 2\.0\.0 .*quarantined"
        )
        (row,) = _rows(gateway.db_url, 1)
        assert row.quarantined and row.action == "quarantine"
        assert row.client_addr == DENIED_CLIENT
        assert row.message_id == msg["Message-ID"]
        assert pf.queue() == []
        assert pf.delivered() == []


def test_gateway_down_postfix_defers_then_delivers_after_flush(gateway: Gateway) -> None:
    with running_postfix(gateway.port) as pf:
        msg = _message("Sent while the gateway was down")
        pf.send(msg, source_addr=CLIENT_ADDR)
        _assert_deferred_then_flushed(pf)

        gateway.start(pf.reinject_port)
        pf.flush()
        (raw,) = pf.wait_for_mail(1)
        delivered = message_from_bytes(raw, policy=policy.default)
        assert delivered["Message-ID"] == msg["Message-ID"]
        assert delivered["X-Milter-Verdict"] == "spam"
        assert pf.queue() == []
        (row,) = _rows(gateway.db_url, 1)
        assert row.client_addr == CLIENT_ADDR


def test_swaks_through_gateway(gateway: Gateway) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks not installed (apt-get install swaks)")
    with running_postfix(gateway.port) as pf:
        gateway.start(pf.reinject_port)
        out = subprocess.run(
            [swaks, "--server", "127.0.0.1", "--port", str(pf.inbound_port), "--local-interface", CLIENT_ADDR,
             "--from", "carol@example.net", "--to", f"bob@{DOMAIN}", "--header", "Subject: swaks e2e"],
            capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        (raw,) = pf.wait_for_mail(1)
        delivered = message_from_bytes(raw, policy=policy.default)
        assert delivered["Subject"] == "[SPAM] swaks e2e"
        assert delivered["X-Milter-Verdict"] == "spam"
