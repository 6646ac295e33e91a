"""Helpers for the gateway tests: a real aiosmtpd sink, a running gateway, clients, accounting.

Everything is real sockets on loopback. The policy used by the tests makes the action depend only on
the envelope (deny list -> quarantine, recipient domain rules -> tag / reject), so the same tests hold
for any trained model.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SMTPEnvelope

from milter.config import ClassThresholds, Config, DomainRule, Lists, PolicyConfig, ServerConfig, StoreConfig
from milter.gateway.server import Gateway
from milter.gateway.session import XForwardSMTP
from milter.gateway.xforward import XForward

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "current.onnx"
CORPORA = ROOT / ".cache" / "corpora"

QUARANTINE_SENDER = "quarantine@sender.test"
TAG_DOMAIN = "tag.test"
REJECT_DOMAIN = "reject.test"
OFF = ClassThresholds()  # every model threshold disabled: only lists and domain rules act

TEST_POLICY = PolicyConfig(
    spam=OFF,
    bec=OFF,
    subject_prefix="[SPAM]",
    lists=Lists(deny_senders=(QUARANTINE_SENDER,)),
    domains=(
        DomainRule(domain=TAG_DOMAIN, spam=ClassThresholds(tag=0.0)),
        DomainRule(domain=REJECT_DOMAIN, spam=ClassThresholds(reject=0.0)),
    ),
)


def config_for(listen_port: int, sink_port: int, db_url: str, **server: Any) -> Config:
    values: dict[str, Any] = {
        "listen": f"127.0.0.1:{listen_port}",
        "downstream": f"127.0.0.1:{sink_port}",
        "workers": 1,
        "metrics_listen": None,
        "downstream_timeout": 5.0,
        "hostname": "gw.test",
    }
    srv = replace(ServerConfig(), **(values | server))
    return Config(policy=TEST_POLICY, server=srv, store=StoreConfig(url=db_url))


_MSGID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)


def message_id(raw: bytes) -> str | None:
    m = _MSGID.search(raw)
    return m.group(1).decode() if m else None


def make_message(
    mid: str, subject: str = "Lunch on Friday", body: str = "See you at noon.\r\n", extra: str = ""
) -> bytes:
    return (
        f"From: Alice <alice@sender.test>\r\nTo: bob@rcpt.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{mid}>\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n{extra}\r\n{body}"
    ).encode()


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    xforward: XForward


@dataclass
class SinkBehaviour:
    """How the sink answers; changed by tests while it runs."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address -> reply line
    data_reply: str | None = None  # e.g. "451 4.3.0 Try later"
    data_delay: float = 0.0


class _SinkHandler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: SMTPEnvelope, address: str, options: list[str]
    ) -> str:
        reply = self.sink.behaviour.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SMTPEnvelope) -> str:
        b = self.sink.behaviour
        if b.data_delay:
            await asyncio.sleep(b.data_delay)
        if b.data_reply is not None:
            return b.data_reply
        assert isinstance(server, XForwardSMTP)
        self.sink.messages.append(
            Received(
                envelope.mail_from or "",
                list(envelope.rcpt_tos),
                envelope.original_content or b"",
                server.xforward,
            )
        )
        return f"250 2.0.0 Ok: queued as S{len(self.sink.messages)}"


class Sink:
    """A downstream MTA stand-in: aiosmtpd with XFORWARD, keeping what it accepted."""

    #: The session class; a subclass may raise aiosmtpd's limits (e.g. `line_length_limit`).
    smtp_class: type[XForwardSMTP] = XForwardSMTP

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self.behaviour = SinkBehaviour()
        self._server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> int:
        handler = _SinkHandler(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: self.smtp_class(
                handler, hostname="sink.test", data_size_limit=None, enable_SMTPUTF8=True, loop=loop
            ),
            "127.0.0.1",
            port,
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def message_ids(self) -> list[str | None]:
        return [message_id(m.raw) for m in self.messages]


def load_scanner(policy: PolicyConfig, classifier_cls: Any = None) -> Any:
    """The real Scanner with the shipped model (classifier_cls lets a test inject a failing subclass)."""
    from milter.classifier import Classifier
    from milter.policy import Policy
    from milter.scan import Scanner, load_explainer

    cls = classifier_cls or Classifier
    clf = cls.load(MODEL)
    # the explainer is checked against the real graph: an injected classifier may fail on purpose
    return Scanner(clf, Policy(policy, clf.metadata.thresholds), load_explainer(Classifier.load(MODEL)))


def open_store(url: str) -> Any:
    from milter.store import Store

    return Store.open(url)


@contextlib.asynccontextmanager
async def running_gateway(
    config: Config, scanner: Any, store: Any, resolver: Any = None, real_dns: bool = False,
    prepare: Any = None,
) -> AsyncIterator[Gateway]:
    """A started Gateway. DNS answers come from `resolver`, by default one that knows no names (as
    the corpora's long-gone domains), so tests do not depend on this host's resolver; with
    `real_dns` the gateway builds its own resolver from config.auth, as in production. `prepare`
    replaces milter.scan.prepare in the prepare processes (a module-level function: they import it)."""
    from milter.auth import StaticResolver
    from milter.features import SCHEMA
    from milter.scan import prepare as real_prepare

    gw = Gateway(
        config, scanner, store, prepare=prepare or real_prepare, schema_digest=SCHEMA.digest,
        resolver=None if real_dns else StaticResolver({}) if resolver is None else resolver,
    )
    await gw.start()
    try:
        yield gw
    finally:
        await gw.close(grace=10)


@dataclass(frozen=True)
class Outcome:
    mid: str
    code: int  # reply to DATA (or the error that ended the transaction); 0: connection failed
    text: str


async def send(
    port: int,
    raw: bytes,
    mail_from: str = "alice@sender.test",
    rcpts: Sequence[str] = ("bob@rcpt.test",),
    smtp_timeout: float = 30,
) -> Outcome:
    mid = message_id(raw) or ""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=smtp_timeout, start_tls=False)
    try:
        await client.connect()
        _, text = await client.sendmail(mail_from, list(rcpts), raw)
        await client.quit()
        return Outcome(mid, 250, text)
    except aiosmtplib.SMTPRecipientsRefused as exc:
        first = exc.recipients[0]
        return Outcome(mid, first.code, first.message)
    except aiosmtplib.SMTPResponseException as exc:
        return Outcome(mid, exc.code, exc.message)
    except (aiosmtplib.SMTPException, OSError) as exc:
        return Outcome(mid, 0, repr(exc))
    finally:
        client.close()


def quarantined_ids(store: Any) -> list[str | None]:
    return [row.message_id for row in store.quarantine_list(limit=100_000)]


def account(outcomes: Sequence[Outcome], sink: Sink, store: Any) -> None:
    """The contract, by Message-ID: every 250 is at the sink or in quarantine exactly once; every
    other answer is a 4xx (a 0 means the connection died: no 250 either, so the sender retries)."""
    delivered = sink.message_ids()
    held = quarantined_ids(store)
    for o in outcomes:
        places = delivered.count(o.mid) + held.count(o.mid.strip("<>")) + held.count(o.mid)
        if o.code == 250:
            assert places == 1, f"{o.mid} got 250 but is in {places} places"
        else:
            assert 400 <= o.code < 500 or o.code == 0, f"{o.mid} got {o.code} {o.text}"


def corpus_messages(limit: int) -> list[bytes]:
    """Real messages from the unpacked corpora (ham and spam mixed), for load tests and the bench."""
    files = sorted(CORPORA.glob("*/*/*.eml"))
    if not files:
        raise FileNotFoundError(f"no corpus under {CORPORA}: unpack with ../shared/corpora/unpack")
    step = max(1, len(files) // limit)
    return [f.read_bytes() for f in files[::step][:limit]]


Scenario = Callable[[Gateway, Sink, Any], Awaitable[None]]


def run_gateway_scenario(
    tmp_path: Path,
    free_port: Callable[[], int],
    scenario: Scenario,
    *,
    scanner: Any = None,
    store: Any = None,
    sink_up: bool = True,
    policy: PolicyConfig | None = None,
    prepare: Any = None,
    **server: Any,
) -> Any:
    """Start a sink (unless sink_up is False: the downstream port is then closed) and a gateway, run
    the scenario, stop the gateway (draining background verdict records); return the store."""
    url = f"sqlite:///{tmp_path}/gw.db"
    store = store if store is not None else open_store(url)
    sink_port = free_port()

    async def main() -> None:
        sink = Sink()
        if sink_up:
            await sink.start(sink_port)
        cfg = config_for(free_port(), sink_port, url, **server)
        if policy is not None:
            cfg = replace(cfg, policy=policy)
        async with running_gateway(cfg, scanner or load_scanner(cfg.policy), store, prepare=prepare) as gw:
            await scenario(gw, sink, store)
        await sink.stop()

    asyncio.run(main())
    return store


def dribble(sock: socket.socket, every: float, limit: float) -> float:
    """Send one more byte every `every` seconds until the peer closes; the seconds that took. Fails the
    test if the peer keeps the connection past `limit` seconds (a dribbled packet must not hold it)."""
    started = time.monotonic()
    sock.settimeout(every)
    while True:
        try:
            if sock.recv(1) == b"":
                break
        except TimeoutError:
            pass
        try:
            sock.sendall(b"x")
        except (BrokenPipeError, ConnectionResetError):
            break
        assert time.monotonic() - started < limit, "a dribbled packet kept the connection open"
    return time.monotonic() - started
