"""End to end through a real Postfix with the gateway as its milter (`smtpd_milters`).

client -> Postfix smtpd (smtpd_milters=inet:127.0.0.1:PORT, milter_default_action=tempfail) -> queue ->
virtual(8) Maildir. The gateway (`milter serve --listen off --milter-listen ...`, a subprocess as in
production) sees the message during the client's SMTP session: it adds headers, holds spam in its own
quarantine (Postfix discards its copy), and rejects in-session. A release goes to Postfix's
reinjection smtpd (no milters), as docs/postfix.md describes.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from auth_support import FakeDns, dns_in_thread
from postfix import DOMAIN, Postfix, free_port, running_postfix, skip_reason
from serve_support import REPO, ServeProcess, milter_command

from milter.store import Store

pytestmark = pytest.mark.postfix

CLIENT_ADDR = "127.0.0.2"
HELD_SENDER = "held@spam.test"  # deny_senders: quarantined
REJECTED_DOMAIN = "reject.test"  # the recipient domain whose rule rejects


@pytest.fixture(autouse=True)
def _need_postfix() -> None:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)


# Model thresholds off: only the lists and domain rules act, so outcomes do not depend on the model.
POLICY = f"""
[policy]
subject_prefix = "[SPAM]"
spam = {{ tag = false, quarantine = false, reject = false }}
bec = {{ tag = false, quarantine = false, reject = false }}

[policy.lists]
deny_senders = ["{HELD_SENDER}"]

[[policy.domain]]
domain = "{REJECTED_DOMAIN}"
spam = {{ reject = 0.0 }}

[auth]
enabled = false
"""


@dataclass
class MilterGateway(ServeProcess):
    port: int = 0
    db_url: str = ""
    workers: int = 1
    extra_config: str = ""
    socket_path: Path | None = None  # listen on this unix socket instead of the port
    policy: str = POLICY  # the [policy] and [auth] tables (a test may replace them)

    @property
    def address(self) -> str:
        return f"unix:{self.socket_path}" if self.socket_path else f"inet:127.0.0.1:{self.port}"

    def start(self, downstream_port: int, timeout: float = 90.0) -> None:
        args = ["--listen", "off", "--milter-listen", self.address,
                "--downstream", f"127.0.0.1:{downstream_port}", "--db", self.db_url,
                "--workers", str(self.workers), "--metrics-listen", "off"]
        self.launch(self.extra_config + self.policy, args,
                    lambda: "listening" in self.output and _accepts(self.port, self.socket_path), timeout)


def _accepts(port: int, path: Path | None = None) -> bool:
    try:
        if path is not None:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(1.0)
                sock.connect(str(path))
            return True
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[MilterGateway]:
    gw = MilterGateway(workdir=tmp_path, port=free_port(), db_url=f"sqlite:///{tmp_path / 'milter.db'}")
    try:
        yield gw
    finally:
        gw.stop()


def _postfix(milter: int | str, non_smtpd: bool = False) -> AbstractContextManager[Postfix]:
    """A private Postfix whose inbound smtpd uses the gateway (a port, or a milter address) as its
    milter, and with `non_smtpd` its local submission (sendmail(1), pickup) too; REJECTED_DOMAIN is a
    mailbox domain too, so that Postfix accepts its recipients and the verdict is the gateway's."""
    address = milter if isinstance(milter, str) else f"inet:127.0.0.1:{milter}"
    main = {"virtual_mailbox_domains": f"{DOMAIN}, {REJECTED_DOMAIN}"}
    if non_smtpd:
        main |= {"non_smtpd_milters": address, "milter_default_action": "tempfail"}
    overrides = {
        "smtpd_milters": address,
        "milter_protocol": "6",
        "milter_default_action": "tempfail",
        "milter_connect_timeout": "5s",
        "milter_content_timeout": "60s",
    }
    return running_postfix(None, inbound_overrides=overrides, main_overrides=main)


def _message(subject: str, sender: str = "alice@example.org", to: str = f"bob@{DOMAIN}") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Sender <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<milter-{time.monotonic_ns()}@example.org>"
    msg["Date"] = "Thu, 03 Dec 2026 10:00:00 +0000"
    msg["X-Milter-Verdict"] = "ham (forged by the sender)"
    msg.set_content("Hi Bob,\n\nthe figures for the quarter, as discussed.\n\nAlice\n")
    return msg


def _quarantined(db_url: str, count: int, timeout: float = 30.0) -> list[tuple[int, str | None]]:
    deadline = time.monotonic() + timeout
    while True:
        with Store.open(db_url) as store:
            rows = [(r.id, r.message_id) for r in store.quarantine_list(limit=10_000)]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def _maildir_ids(pf: Postfix) -> list[str]:
    ids = []
    for path in pf.delivered():
        m = re.search(rb"^Message-ID:\s*(<[^>\r\n]+>)", path.read_bytes(), re.IGNORECASE | re.MULTILINE)
        ids.append(m.group(1).decode() if m else "")
    return ids


def test_ham_reaches_the_mailbox_with_our_headers_and_forged_ones_removed(gateway: MilterGateway) -> None:
    with _postfix(gateway.port) as pf:
        gateway.start(pf.reinject_port)
        msg = _message("Quarterly figures")
        pf.send(msg, source_addr=CLIENT_ADDR)
        (raw,) = pf.wait_for_mail(1)
        queue_id = pf.wait_for_log(r"smtpd\[\d+\]: (\w+): client=\S*\[127\.0\.0\.2\]")[1]
    delivered = message_from_bytes(raw, policy=policy.default)
    assert delivered["Message-ID"] == msg["Message-ID"]
    assert delivered.get_all("X-Milter-Category") == ["ham"]
    assert delivered["X-Milter-Verdict"] is None  # the sender's forged field is gone
    assert delivered["Subject"] == "Quarterly figures"
    # One line per message in the gateway's log, with Postfix's queue id from the {i} macro.
    assert re.search(rf"message id=\w+ queue_id={queue_id} mail_from=alice@example.org .*action=accept",
                     gateway.output)
    with Store.open(gateway.db_url) as store:
        row = store.get(1)
    assert row is not None and row.client_addr == CLIENT_ADDR and row.queue_id == queue_id


def test_locally_submitted_mail_passes_the_milter_too(gateway: MilterGateway) -> None:
    """`non_smtpd_milters`: mail from sendmail(1) goes through pickup and cleanup, not smtpd."""
    with _postfix(gateway.port, non_smtpd=True) as pf:
        gateway.start(pf.reinject_port)
        msg = _message("Submitted on the relay itself")
        sendmail = shutil.which("sendmail", path="/usr/sbin:/usr/bin") or "/usr/sbin/sendmail"
        subprocess.run([sendmail, "-C", str(pf.config_dir), "-f", "alice@example.org", f"bob@{DOMAIN}"],
                       input=msg.as_bytes(), check=True, timeout=60, capture_output=True)
        (raw,) = pf.wait_for_mail(1)
        queue_id = pf.wait_for_log(r"pickup\[\d+\]: (\w+): uid=0 from=<alice@example.org>")[1]
    delivered = message_from_bytes(raw, policy=policy.default)
    assert delivered["Message-ID"] == msg["Message-ID"]
    assert delivered.get_all("X-Milter-Category") == ["ham"]
    assert re.search(rf"message id=\w+ queue_id={queue_id} mail_from=alice@example.org .*action=accept",
                     gateway.output)


def test_unix_socket_shared_by_two_workers(tmp_path: Path) -> None:
    # Not under pytest's tmp_path: Postfix's smtpd (user postfix) must reach the socket.
    sockdir = Path(tempfile.mkdtemp(prefix="milter-sock-"))
    sockdir.chmod(0o755)
    gw = MilterGateway(workdir=tmp_path, db_url=f"sqlite:///{tmp_path / 'milter.db'}", workers=2,
                       socket_path=sockdir / "mailsift.sock")
    try:
        with _postfix(gw.address) as pf:
            gw.start(pf.reinject_port)
            for i in range(6):
                pf.send(_message(f"over a unix socket {i}"), source_addr=CLIENT_ADDR)
            delivered = pf.wait_for_mail(6)
            maillog = pf.log()
    finally:
        gw.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
    # One clean-clone CI run (7d717f6) saw a message here without the header, and 12 runs alone did
    # not: should it come back, the failure shows what was delivered and what both sides logged.
    unmarked = [raw.split(b"\n\n", 1)[0].decode(errors="replace") for raw in delivered
                if b"X-Milter-Category: ham" not in raw]
    assert not unmarked, (
        f"delivered without our header: {unmarked}\ngateway:\n{gw.output}\nPostfix:\n{maillog}")
    assert gw.output.count("action=accept") == 6
    assert len(set(re.findall(r"worker=(\d)", gw.output))) == 2  # both workers started on the socket


def test_spam_is_held_in_our_quarantine_and_a_release_delivers_the_same_bytes(
    gateway: MilterGateway,
) -> None:
    with _postfix(gateway.port) as pf:
        gateway.start(pf.reinject_port)
        msg = _message("Cheap watches", sender=HELD_SENDER)
        # Header shapes a rebuild could get wrong: no space after the colon, a folded value, a tab.
        sent = (b"X-Tight:no-space\r\nX-Folded: first line\r\n\tsecond line\r\n  third line\r\n"
                b"X-Tab:\tvalue\r\n" + msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))
        pf.send(sent, mail_from=HELD_SENDER, source_addr=CLIENT_ADDR)
        pf.wait_for_log(r"milter-discard: END-OF-MESSAGE from \S+: milter triggers DISCARD action")
        ((row_id, message_id),) = _quarantined(gateway.db_url, 1)
        assert message_id == msg["Message-ID"]
        with Store.open(gateway.db_url) as store:
            # Postfix does not show milters its own Received line: what is stored is what the client sent.
            assert store.get_raw(row_id) == sent
        assert pf.delivered() == [] and pf.queue() == []

        release = subprocess.run(
            [milter_command(), "quarantine", "release", str(row_id),
             "--db", gateway.db_url, "--downstream", f"127.0.0.1:{pf.reinject_port}"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=REPO, check=False,
        )
        assert release.returncode == 0, release.stdout + release.stderr
        (raw,) = pf.wait_for_mail(1)
    # The mailbox copy is Postfix's delivery headers and the reinjection's Received line, then exactly
    # what the client sent (Maildir stores LF line endings).
    assert raw.endswith(b"\n" + sent.replace(b"\r\n", b"\n"))
    assert b"X-Milter-Verdict: ham (forged by the sender)" in raw  # untouched: the stored bytes


def test_a_client_address_the_blocklist_lists_is_held_by_its_milter_macros(tmp_path: Path) -> None:
    """[reputation]: the address asked is the client's as Postfix's milter macros give it ({client_addr}),
    not the gateway's peer; the listed client's mail is held, the same mail from a clean one delivered."""
    dns = FakeDns(typed={("2.0.0.127.zen.test", "A"): ["127.0.0.2"]})
    with dns_in_thread(dns) as dns_port:
        lists = (f'[auth]\nnameservers = ["127.0.0.1:{dns_port}"]\n'
                 '[[reputation.zone]]\nname = "zen.test"\nkind = "ip"\naction = "quarantine"\n'
                 'codes = { "127.0.0.2" = "SBL" }\n')
        policy_text = POLICY.replace("[policy]\n", "[policy]\ninternal_networks = []\n", 1)
        gw = MilterGateway(workdir=tmp_path, port=free_port(), db_url=f"sqlite:///{tmp_path / 'milter.db'}",
                           policy=policy_text.replace("[auth]\nenabled = false\n", lists))
        try:
            with _postfix(gw.port) as pf:
                gw.start(pf.reinject_port)
                held = _message("From a listed client")
                pf.send(held, source_addr=CLIENT_ADDR)
                pf.wait_for_log(r"milter-discard: END-OF-MESSAGE from \S+: milter triggers DISCARD action")
                ((row_id, message_id),) = _quarantined(gw.db_url, 1)
                clean = _message("From a clean client")
                pf.send(clean, source_addr="127.0.0.3")
                (raw,) = pf.wait_for_mail(1)
        finally:
            gw.stop()
    assert message_id == held["Message-ID"]
    assert message_from_bytes(raw, policy=policy.default)["Message-ID"] == clean["Message-ID"]
    with Store.open(gw.db_url) as store:
        row = store.get(row_id)
    assert row is not None and row.verdict == "spam"
    assert row.reasons[0] == "client address 127.0.0.2 listed in zen.test (127.0.0.2: SBL)"
    assert dns.count("2.0.0.127.zen.test", "A") == 1 and dns.count("3.0.0.127.zen.test", "A") == 1


def test_hold_mode_leaves_the_message_in_postfix_hold_queue_with_our_reason(gateway: MilterGateway) -> None:
    gateway.extra_config = '[server]\nmilter_quarantine = "hold"\n'
    with _postfix(gateway.port) as pf:
        gateway.start(pf.reinject_port)
        msg = _message("Held by Postfix", sender=HELD_SENDER)
        pf.send(msg, mail_from=HELD_SENDER, source_addr=CLIENT_ADDR)
        ((row_id, message_id),) = _quarantined(gateway.db_url, 1)
        pf.wait_for_log(r"milter-hold: END-OF-MESSAGE from \S+: milter triggers HOLD action")
        queue = pf.queue()
        assert [q["queue_name"] for q in queue] == ["hold"]
        held = pf.postcat(queue[0]["queue_id"])
    assert message_id == msg["Message-ID"]
    # Postfix logs no reason for a hold: the held copy carries the verdict and our quarantine id.
    assert f"X-Milter-Quarantine-Id: {row_id}" in held
    assert "X-Milter-Verdict: spam" in held


def test_reject_reaches_the_smtp_client_in_session(gateway: MilterGateway) -> None:
    with _postfix(gateway.port) as pf:
        gateway.start(pf.reinject_port)
        with pytest.raises(smtplib.SMTPDataError) as err:
            pf.send(_message("Refused"), rcpt_tos=[f"ceo@{REJECTED_DOMAIN}"], source_addr=CLIENT_ADDR)
        assert err.value.smtp_code == 550
        assert b"5.7.1 Message rejected as spam" in err.value.smtp_error
        assert pf.delivered() == []


def test_gateway_down_means_tempfail_and_the_client_retries(gateway: MilterGateway) -> None:
    with _postfix(gateway.port) as pf:
        with pytest.raises(smtplib.SMTPResponseException) as err:
            pf.send(_message("While the gateway is down"), source_addr=CLIENT_ADDR)
        assert 400 <= err.value.smtp_code < 500
        gateway.start(pf.reinject_port)
        msg = _message("Retried")
        pf.send(msg, source_addr=CLIENT_ADDR)
        (raw,) = pf.wait_for_mail(1)
    assert message_from_bytes(raw, policy=policy.default)["Message-ID"] == msg["Message-ID"]


# -- SIGKILL under load: every message accounted for by Message-ID --------------------------------


@dataclass
class Ledger:
    sent: dict[str, str]  # Message-ID -> final outcome: "queued" (250) or "rejected" (5xx)
    tempfails: int = 0


def _client(pf: Postfix, messages: list[tuple[EmailMessage, str, str]], ledger: Ledger,
            lock: threading.Lock, deadline: float) -> None:
    """An MTA-like client: sends each message until Postfix gives a final answer, retrying 4xx."""
    for msg, sender, rcpt in messages:
        while True:
            try:
                pf.send(msg, mail_from=sender, rcpt_tos=[rcpt], source_addr=CLIENT_ADDR)
                outcome = "queued"
            except smtplib.SMTPRecipientsRefused as exc:
                code = next(iter(exc.recipients.values()))[0]
                outcome = "rejected" if code >= 500 else ""
            except smtplib.SMTPResponseException as exc:
                outcome = "rejected" if exc.smtp_code >= 500 else ""
            except (smtplib.SMTPException, OSError):
                outcome = ""  # connection dropped: the sender does not know, so it retries
            if outcome:
                with lock:
                    ledger.sent[str(msg["Message-ID"])] = outcome
                break
            with lock:
                ledger.tempfails += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"{msg['Message-ID']} still tempfailed at the deadline")
            time.sleep(0.3)


def test_sigkill_under_load_loses_nothing(tmp_path: Path) -> None:
    gw = MilterGateway(workdir=tmp_path, port=free_port(), db_url=f"sqlite:///{tmp_path / 'milter.db'}",
                       workers=2)
    kinds = [("alice@example.org", f"bob@{DOMAIN}"), (HELD_SENDER, f"bob@{DOMAIN}"),
             ("alice@example.org", f"ceo@{REJECTED_DOMAIN}")]
    batches: list[list[tuple[EmailMessage, str, str]]] = [[] for _ in range(8)]
    for i in range(120):
        sender, rcpt = kinds[0] if i % 6 else kinds[1 + (i // 6) % 2]
        msg = _message(f"load {i}", sender=sender, to=rcpt)
        batches[i % len(batches)].append((msg, sender, rcpt))
    ledger = Ledger(sent={})
    lock = threading.Lock()
    try:
        with _postfix(gw.port) as pf:
            gw.start(pf.reinject_port)
            deadline = time.monotonic() + 240
            threads = [threading.Thread(target=_client, args=(pf, b, ledger, lock, deadline))
                       for b in batches]
            for t in threads:
                t.start()
            while len(ledger.sent) < 30:
                time.sleep(0.02)
            gw.kill()  # mid-load: sessions in flight lose their milter
            killed_at = len(ledger.sent)
            time.sleep(1.5)
            gw.start(pf.reinject_port)
            for t in threads:
                t.join(timeout=300)
            assert not any(t.is_alive() for t in threads)
            sent_ids = set(ledger.sent)
            queued = {m for m, o in ledger.sent.items() if o == "queued"}
            rejected = {m for m, o in ledger.sent.items() if o == "rejected"}
            held = {m for _, m in _quarantined(gw.db_url, 0, timeout=0)}
            expected_delivered = queued - held
            deadline = time.monotonic() + 60
            while len(pf.delivered()) < len(expected_delivered) and time.monotonic() < deadline:
                time.sleep(0.2)
            mailbox = _maildir_ids(pf)
    finally:
        gw.stop()
    assert len(sent_ids) == 120, f"{120 - len(sent_ids)} messages never got a final answer"
    assert killed_at < 120 and ledger.tempfails > 0  # the kill really hit traffic
    assert len(mailbox) == len(set(mailbox)), "a message was delivered twice"
    # Every message is in exactly one place: the mailbox, our quarantine, or refused to its sender.
    assert set(mailbox) | held | rejected == sent_ids
    assert not set(mailbox) & held and not set(mailbox) & rejected and not held & rejected
    assert len(held) == 10 and len(rejected) == 10 and len(mailbox) == 100
