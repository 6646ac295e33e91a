"""The milter listener driven by an independent MTA side: the `miltertest` package (pure Python, the
one OpenARC's tests use), over real loopback sockets, against an in-process Gateway with SMTP off.

miltertest's `MilterConnection` is blocking, so each MTA conversation runs in a thread
(`asyncio.to_thread`) while the gateway serves on the test's event loop. Every socket has a short
timeout: a filter that stays silent where it should answer fails the test in seconds, not minutes.

`Mta` plays the MTA by the negotiated result, as Postfix and sendmail do: steps the filter asked to
skip are not sent, events the filter asked not to answer are not waited for (and a stray answer
would then show up in front of the end-of-message replies, which are checked exactly), header values
carry their leading space only under SMFIP_HDR_LEADSPC, and every end-of-message edit must be one
the negotiation allowed. `apply` applies the edits as an MTA does, so the message the recipient
would get can be compared with the one the SMTP path relays (tests/test_gateway.py).
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import miltertest
import pytest
from gateway_support import (
    QUARANTINE_SENDER,
    REJECT_DOMAIN,
    TAG_DOMAIN,
    Sink,
    make_message,
    run_gateway_scenario,
)
from miltertest import codec as mcodec
from miltertest import constants as mc

from milter.gateway.server import Gateway
from milter.store.rows import MessageRow

pytestmark = pytest.mark.timeout(90)

IO_TIMEOUT = 10.0  # seconds a blocking read from the filter may take (a scan is well under one)

Ports = Callable[[], int]
Reply = tuple[str, dict[str, Any]]
Field = tuple[str, str]  # name, value as the MTA passes it (after the colon; folds as "\n")

# What the filter asks of a full offer (milter.protocol.session): the steps it needs, no reply to any
# event before end of message, header values with their leading space.
SKIPS = mc.SMFIP_NODATA | mc.SMFIP_NOEOH | mc.SMFIP_NOUNKNOWN
NO_REPLIES = (
    mc.SMFIP_NR_CONN | mc.SMFIP_NR_HELO | mc.SMFIP_NR_MAIL | mc.SMFIP_NR_RCPT | mc.SMFIP_NR_DATA
    | mc.SMFIP_NR_UNKN | mc.SMFIP_NR_EOH | mc.SMFIP_NR_HDR | mc.SMFIP_NR_BODY
)
WANTED_ACTIONS = mc.SMFIF_ADDHDRS | mc.SMFIF_CHGHDRS | mc.SMFIF_QUARANTINE

NO_REPLY_FLAG = {
    mc.SMFIC_CONNECT: mc.SMFIP_NR_CONN,
    mc.SMFIC_HELO: mc.SMFIP_NR_HELO,
    mc.SMFIC_MAIL: mc.SMFIP_NR_MAIL,
    mc.SMFIC_RCPT: mc.SMFIP_NR_RCPT,
    mc.SMFIC_DATA: mc.SMFIP_NR_DATA,
    mc.SMFIC_HEADER: mc.SMFIP_NR_HDR,
    mc.SMFIC_EOH: mc.SMFIP_NR_EOH,
    mc.SMFIC_BODY: mc.SMFIP_NR_BODY,
}
# The end-of-message replies that end the exchange. SMFIR_QUARANTINE is not one of them, whatever
# miltertest's DISPOSITION_REPLIES says: Postfix and sendmail read on after it, as after a header edit.
FINAL = frozenset(
    {mc.SMFIR_ACCEPT, mc.SMFIR_CONTINUE, mc.SMFIR_DISCARD, mc.SMFIR_REJECT, mc.SMFIR_TEMPFAIL,
     mc.SMFIR_REPLYCODE}
)
EDIT_NEEDS = {
    mc.SMFIR_ADDHEADER: mc.SMFIF_ADDHDRS,
    mc.SMFIR_INSHEADER: mc.SMFIF_ADDHDRS,
    mc.SMFIR_CHGHEADER: mc.SMFIF_CHGHDRS,
    mc.SMFIR_QUARANTINE: mc.SMFIF_QUARANTINE,
}

CLIENT = {"hostname": "mx.client.test", "family": mc.SMFIA_INET, "port": 41234, "address": "192.0.2.55"}
HELO = "helo.client.test"
# Our Authentication-Results for make_message's From from CLIENT, with no DNS answers (as on the SMTP
# path, tests/test_gateway.py): SPF is checked for an outside client, not for an authenticated one.
AR_OUTSIDE = (
    "gw.test; dkim=none; spf=none smtp.mailfrom=sender.test; dmarc=none header.from=sender.test; arc=none"
)
AR_INTERNAL = "gw.test; dkim=none; dmarc=none header.from=sender.test; arc=none"


# -- the MTA side ------------------------------------------------------------------------------------


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            raise miltertest.MilterError("EOF inside a packet")
        data += more
    return data


def negotiate(conn: Any, actions: int, protocol: int) -> tuple[int, int, dict[int, str]]:
    """Option negotiation as the MTA: (actions, steps, macro lists) the filter asked for.

    miltertest decodes SMFIR_OPTNEG as exactly three numbers and refuses the macro lists a filter may
    append when SMFIF_SETSYMLIST is offered (libmilter's smfi_setsymlist, which Postfix reads), so
    with that offer the reply is read here, with miltertest's field decoders. Without it miltertest's
    own `optneg_mta` does the work, strictly: it raises if the filter takes anything not offered."""
    if not actions & mc.SMFIF_SETSYMLIST:
        got_actions, got_steps = conn.optneg_mta(actions=actions, protocol=protocol, strict=True)
        return int(got_actions), int(got_steps), {}
    conn.sock.sendall(mcodec.encode_optneg(actions, protocol))
    (size,) = struct.unpack("!I", _recv_exactly(conn.sock, 4))
    packet = _recv_exactly(conn.sock, size)
    assert packet[:1].decode() == mc.SMFIC_OPTNEG
    version, rest = mcodec.decode_u32(packet[1:])
    got_actions, rest = mcodec.decode_u32(rest)
    got_steps, rest = mcodec.decode_u32(rest)
    lists: dict[int, str] = {}
    while rest:
        stage, rest = mcodec.decode_u32(rest)
        names, rest = mcodec.decode_str(rest)
        assert stage not in lists
        lists[int(stage)] = str(names)
    assert version == mc.MILTER_VERSION
    # What the filter takes must be part of the offer, as miltertest's strict mode checks.
    assert got_actions & actions == got_actions, hex(got_actions)
    assert got_steps & protocol == got_steps, hex(got_steps)
    conn.action_flags, conn.protocol_flags = got_actions, got_steps
    return int(got_actions), int(got_steps), lists


class Mta:
    """One milter connection, MTA side, following what the filter negotiated."""

    def __init__(self, port: int, actions: int = mc.SMFI_V6_ACTS, protocol: int = mc.SMFI_V6_PROT) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        sock.settimeout(IO_TIMEOUT)
        self.conn = miltertest.MilterConnection(sock)
        self.actions, self.steps, self.macro_lists = negotiate(self.conn, actions, protocol)

    def wants(self, flag: int) -> bool:
        return bool(self.steps & flag)

    def event(self, cmd: str, **args: Any) -> None:
        """An event command: answered with SMFIR_CONTINUE (miltertest checks), or not at all."""
        if self.wants(NO_REPLY_FLAG[cmd]):
            self.conn._send(cmd, **args)
        else:
            self.conn.send(cmd, **args)

    def macros(self, cmd: str, values: Mapping[str, str] | None) -> None:
        if values:
            self.conn.send_macro(cmd, **values)

    def connect(self, client: Mapping[str, Any] = CLIENT, helo: str = HELO) -> None:
        self.macros(mc.SMFIC_CONNECT, {"j": "gw.test", "{daemon_name}": "smtpd"})
        self.event(mc.SMFIC_CONNECT, **client)
        self.event(mc.SMFIC_HELO, helo=helo)

    def envelope(
        self, mail_from: str, rcpts: Sequence[str], mail_macros: Mapping[str, str] | None = None,
        rcpt_macros: Mapping[str, str] | None = None,
    ) -> None:
        self.macros(mc.SMFIC_MAIL, mail_macros)
        self.event(mc.SMFIC_MAIL, args=[f"<{mail_from}>"])
        for rcpt in rcpts:
            self.macros(mc.SMFIC_RCPT, rcpt_macros)
            self.event(mc.SMFIC_RCPT, args=[f"<{rcpt}>"])
        if not self.wants(mc.SMFIP_NODATA):
            self.event(mc.SMFIC_DATA)

    def headers(self, fields: Sequence[Field]) -> None:
        lead = self.wants(mc.SMFIP_HDR_LEADSPC)
        wire = [(name, value if lead else value.lstrip(" \t")) for name, value in fields]
        if self.wants(mc.SMFIP_NR_HDR):
            for name, value in wire:
                self.conn._send(mc.SMFIC_HEADER, name=name, value=value)
        else:
            self.conn.send_headers(wire)  # miltertest's: each header must be answered with continue
        if not self.wants(mc.SMFIP_NOEOH):
            self.event(mc.SMFIC_EOH)

    def body(self, body: str) -> int:
        """The body in SMFIC_BODY packets of at most MILTER_CHUNK_SIZE bytes; returns how many."""
        size = mc.MILTER_CHUNK_SIZE
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
        if not self.wants(mc.SMFIP_NR_BODY):
            self.conn.send_body(body)  # miltertest's own chunking; each chunk must get continue
        else:
            for chunk in chunks:
                self.conn._send(mc.SMFIC_BODY, buf=chunk)
        return len(chunks)

    def end(self, macros: Mapping[str, str] | None = None) -> list[Reply]:
        """SMFIC_BODYEOB; the replies up to the final one (progress packets skipped by miltertest)."""
        self.macros(mc.SMFIC_BODYEOB, macros)
        self.conn._send(mc.SMFIC_BODYEOB)
        replies: list[Reply] = []
        while True:
            cmd, args = self.conn.recv()
            needs = EDIT_NEEDS.get(cmd)
            assert needs is not None or cmd in FINAL, f"not an end-of-message reply: {cmd!r} {args}"
            assert needs is None or self.actions & needs, f"{cmd!r} was not negotiated: {args}"
            replies.append((cmd, args))
            if cmd in FINAL:
                return replies

    def message(
        self, raw: bytes, mail_from: str, rcpts: Sequence[str], *,
        mail_macros: Mapping[str, str] | None = None, rcpt_macros: Mapping[str, str] | None = None,
        eom_macros: Mapping[str, str] | None = None,
    ) -> list[Reply]:
        fields, body = split(raw)
        self.envelope(mail_from, rcpts, mail_macros, rcpt_macros)
        self.headers(fields)
        self.body(body)
        return self.end(eom_macros)

    def abort(self) -> None:
        self.conn._send(mc.SMFIC_ABORT)  # never answered

    def quit(self) -> None:
        """SMFIC_QUIT: the filter closes its end, with nothing more to say."""
        self.conn._send(mc.SMFIC_QUIT)
        assert self.conn.recv(eof_ok=True) is None
        self.conn.sock.close()

    def quit_nc(self) -> None:
        self.conn._send(mc.SMFIC_QUIT_NC)  # never answered: the next SMTP session follows


# -- messages and edits ------------------------------------------------------------------------------


def split(raw: bytes) -> tuple[list[Field], str]:
    """Header fields as an MTA passes them (value after the colon, folds as bare LF, like Postfix)."""
    head, _, body = raw.decode("ascii").partition("\r\n\r\n")
    fields: list[Field] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t"):
            name, value = fields[-1]
            fields[-1] = (name, value + "\n" + line)
        else:
            name, _, value = line.partition(":")
            fields.append((name, value))
    return fields, body


def render(fields: Sequence[Field]) -> bytes:
    return b"".join(f"{name}:{value}".replace("\n", "\r\n").encode() + b"\r\n" for name, value in fields)


def apply(fields: Sequence[Field], replies: Sequence[Reply], lead: bool) -> list[Field]:
    """The header edits applied as an MTA applies them. Values the filter sends carry their leading
    space only under SMFIP_HDR_LEADSPC; here they are stored with one, as the message would carry."""
    out = list(fields)

    def value(v: str) -> str:
        return v if lead else " " + v

    for cmd, args in replies:
        if cmd == mc.SMFIR_INSHEADER:
            out.insert(args["index"], (args["name"], value(args["value"])))
        elif cmd == mc.SMFIR_ADDHEADER:
            out.append((args["name"], value(args["value"])))
        elif cmd == mc.SMFIR_CHGHEADER:
            same = [i for i, (name, _) in enumerate(out) if name.lower() == args["name"].lower()]
            assert 1 <= args["index"] <= len(same), f"no field {args['name']} #{args['index']} to change"
            at = same[args["index"] - 1]
            if args["value"]:
                out[at] = (out[at][0], value(args["value"]))
            else:
                del out[at]
    return out


def codes(replies: Sequence[Reply]) -> list[str]:
    return [cmd for cmd, _ in replies]


def inserted(replies: Sequence[Reply]) -> dict[str, str]:
    """Inserted fields by name, whitespace (folding, leading space) collapsed."""
    return {a["name"]: " ".join(a["value"].split()) for c, a in replies if c == mc.SMFIR_INSHEADER}


def verdict_rows(store: Any) -> dict[str | None, MessageRow]:
    """Every verdict row in the store, by queue id."""
    rows: dict[str | None, MessageRow] = {}
    for i in range(1, 1000):
        row = store.get(i)
        if row is None:
            break
        assert row.queue_id not in rows, f"two rows for queue id {row.queue_id}"
        rows[row.queue_id] = row
    return rows


def big_body(lines: int) -> str:
    """An ASCII body of 80-byte CRLF lines, with lines SMTP would dot-stuff and a bare "From "."""
    out = [f"line {i:06d} " + "the quick brown fox jumps over the lazy dog ".ljust(66, ".") + "\r\n"
           for i in range(lines)]
    out[7] = "." + out[7][1:]
    out[8] = "From the desk of nobody".ljust(78) + "\r\n"
    return "".join(out)


def milter_port(gw: Gateway) -> int:
    address = gw.milter_address
    assert address.startswith("inet:127.0.0.1:")
    return int(address.rsplit(":", 1)[1])


def run_milter(tmp_path: Path, free_port: Ports, mta: Callable[[int], Any], **server: Any) -> tuple[Any, Any]:
    """A gateway with SMTP off and the milter on a free loopback port (server.milter_listen takes no
    port 0); `mta(port)` runs in a thread. Returns what it returned and the store, read after the
    gateway stopped (which writes the queued verdict records)."""
    result: list[Any] = []

    async def scenario(gw: Gateway, sink: Sink, store: Any) -> None:
        result.append(await asyncio.to_thread(mta, milter_port(gw)))
        assert sink.messages == []  # the milter path never relays: the MTA keeps the message

    settings = {"listen": "", "milter_listen": f"inet:127.0.0.1:{free_port()}"} | server
    store = run_gateway_scenario(tmp_path, free_port, scenario, **settings)
    return result[0], store


FORGED = [
    ("X-Milter-Verdict", " ham"),
    ("X-Milter-Scores", " forged"),
    ("Authentication-Results", " gw.test; dmarc=pass header.from=sender.test"),
]
UPSTREAM = ("Authentication-Results", " mx.upstream.test; spf=pass smtp.mailfrom=sender.test")


def with_fields(raw: bytes, extra: Sequence[Field]) -> bytes:
    """`raw` with `extra` fields added at the end of its header block."""
    head, _, body = raw.partition(b"\r\n\r\n")
    return head + b"\r\n" + render(extra) + b"\r\n" + body


# -- negotiation -------------------------------------------------------------------------------------


def test_full_v6_offer_negotiates_no_replies_macros_and_accepts_with_the_smtp_paths_headers(
    tmp_path: Path, free_port: Ports
) -> None:
    raw = with_fields(make_message("acc1@test"), [*FORGED, UPSTREAM])

    def mta(port: int) -> tuple[Mta, list[Reply]]:
        m = Mta(port)
        m.connect()
        replies = m.message(raw, "alice@sender.test", ["bob@rcpt.test"], eom_macros={"i": "QACC1"})
        m.quit()
        return m, replies

    (m, replies), store = run_milter(tmp_path, free_port, mta)
    assert m.actions == WANTED_ACTIONS | mc.SMFIF_SETSYMLIST
    assert m.steps == SKIPS | NO_REPLIES | mc.SMFIP_HDR_LEADSPC
    assert m.macro_lists == {
        mc.SMFIM_CONNECT: "j {daemon_name}",
        mc.SMFIM_ENVFROM: "i {auth_type} {auth_authen}",
        mc.SMFIM_ENVRCPT: "i",
        mc.SMFIM_EOM: "i",
    }
    # Forged fields deleted last first (indexes stay valid), ours inserted on top, then continue.
    assert replies == [
        (mc.SMFIR_CHGHEADER, {"index": 1, "name": "Authentication-Results", "value": ""}),
        (mc.SMFIR_CHGHEADER, {"index": 1, "name": "X-Milter-Scores", "value": ""}),
        (mc.SMFIR_CHGHEADER, {"index": 1, "name": "X-Milter-Verdict", "value": ""}),
        (mc.SMFIR_INSHEADER, {"index": 0, "name": "X-Milter-Category", "value": " ham"}),
        (mc.SMFIR_INSHEADER, {"index": 0, "name": "Authentication-Results", "value": replies[4][1]["value"]}),
        (mc.SMFIR_CONTINUE, {}),
    ]
    # The message the MTA delivers is byte for byte the one the SMTP path relays for the same input.
    fields, body = split(raw)
    ours = (
        b"Authentication-Results: gw.test; dkim=none; spf=none\r\n"
        b" smtp.mailfrom=sender.test; dmarc=none header.from=sender.test; arc=none\r\n"
        b"X-Milter-Category: ham\r\n"
    )
    delivered = render(apply(fields, replies, lead=True)) + b"\r\n" + body.encode()
    assert delivered == ours + raw.replace(render(FORGED), b"")
    row = verdict_rows(store)["QACC1"]
    assert row.action == "accept" and not row.quarantined
    assert (row.client_addr, row.client_name, row.helo, row.mail_from, row.rcpt_tos) == (
        "192.0.2.55", "mx.client.test", HELO, "alice@sender.test", ("bob@rcpt.test",),
    )


def test_offer_without_skips_or_no_reply_flags_gets_continue_for_every_event(
    tmp_path: Path, free_port: Ports
) -> None:
    """A version-2-style MTA: no SMFIF_SETSYMLIST, no steps the filter may skip or leave unanswered,
    no leading space. miltertest's strict optneg_mta, send, send_headers and send_body check it all:
    DATA and EOH are sent and every event, every header and every body chunk is answered."""
    raw = with_fields(make_message("v2tag@test", subject="Cheap meds"), [FORGED[0]])

    def mta(port: int) -> tuple[Mta, list[Reply]]:
        m = Mta(port, actions=mc.SMFI_V2_ACTS, protocol=0)
        m.connect()
        replies = m.message(raw, "alice@sender.test", [f"carol@{TAG_DOMAIN}"], eom_macros={"i": "QV2"})
        m.quit()
        return m, replies

    (m, replies), store = run_milter(tmp_path, free_port, mta)
    assert (m.actions, m.steps, m.macro_lists) == (WANTED_ACTIONS, 0, {})
    assert codes(replies) == [mc.SMFIR_CHGHEADER] * 2 + [mc.SMFIR_INSHEADER] * 6 + [mc.SMFIR_CONTINUE]
    # Without SMFIP_HDR_LEADSPC the values come without their leading space.
    assert replies[:2] == [
        (mc.SMFIR_CHGHEADER, {"index": 1, "name": "X-Milter-Verdict", "value": ""}),
        (mc.SMFIR_CHGHEADER, {"index": 1, "name": "Subject", "value": "[SPAM] Cheap meds"}),
    ]
    assert all(not a["value"].startswith(" ") for c, a in replies if c == mc.SMFIR_INSHEADER)
    fields, _ = split(raw)
    names = [name for name, _ in apply(fields, replies, lead=False)]
    assert names == [
        "Authentication-Results", "X-Milter-Verdict", "X-Milter-Category", "X-Milter-Scores",
        "X-Milter-Reasons", "X-Milter-Explanation", "From", "To", "Subject", "Message-ID", "Date",
    ]
    assert dict(apply(fields, replies, lead=False))["Subject"] == " [SPAM] Cheap meds"
    assert inserted(replies)["X-Milter-Verdict"] == "spam"
    assert verdict_rows(store)["QV2"].action == "tag"


def test_only_addhdrs_offered_tags_without_header_changes(tmp_path: Path, free_port: Ports) -> None:
    """No SMFIF_CHGHDRS: the verdict fields are still inserted, but neither the Subject prefix nor the
    deletion of a forged field is sent (the MTA would break the connection on an action it did not
    allow)."""
    raw = with_fields(make_message("addonly@test", subject="Cheap meds"), [FORGED[0]])

    def mta(port: int) -> tuple[Mta, list[Reply]]:
        m = Mta(port, actions=mc.SMFIF_ADDHDRS)
        m.connect()
        replies = m.message(raw, "alice@sender.test", [f"carol@{TAG_DOMAIN}"], eom_macros={"i": "QADD"})
        m.quit()
        return m, replies

    (m, replies), store = run_milter(tmp_path, free_port, mta)
    assert m.actions == mc.SMFIF_ADDHDRS
    assert m.steps == SKIPS | NO_REPLIES | mc.SMFIP_HDR_LEADSPC
    assert codes(replies) == [mc.SMFIR_INSHEADER] * 6 + [mc.SMFIR_CONTINUE]
    assert inserted(replies)["X-Milter-Verdict"] == "spam"
    assert verdict_rows(store)["QADD"].action == "tag"


def test_no_header_actions_offered_leaves_only_the_final_reply(tmp_path: Path, free_port: Ports) -> None:
    def mta(port: int) -> tuple[Mta, list[Reply], list[Reply]]:
        m = Mta(port, actions=mc.SMFIF_CHGBODY | mc.SMFIF_ADDRCPT)
        m.connect()
        tag = m.message(make_message("none1@test"), "alice@sender.test", [f"carol@{TAG_DOMAIN}"])
        reject = m.message(make_message("none2@test"), "alice@sender.test", [f"dave@{REJECT_DOMAIN}"])
        m.quit()
        return m, tag, reject

    (m, tag, reject), _ = run_milter(tmp_path, free_port, mta)
    assert m.actions == 0
    assert tag == [(mc.SMFIR_CONTINUE, {})]
    assert codes(reject) == [mc.SMFIR_REPLYCODE]
    assert reject[0][1]["smtpcode"] == "550"


# -- macros ------------------------------------------------------------------------------------------


def test_macros_give_queue_id_and_authenticated_client_is_internal(tmp_path: Path, free_port: Ports) -> None:
    """{auth_authen} makes the client one of ours (Envelope.source = "LOCAL"): no SPF check for it,
    so our Authentication-Results has no spf clause; the next message on the connection, from nobody
    authenticated, is checked again (message macros do not outlive their message). The queue id comes
    from `i` at whichever stage the MTA knows it."""
    auth = {"{auth_type}": "PLAIN", "{auth_authen}": "alice"}

    def mta(port: int) -> list[list[Reply]]:
        m = Mta(port)
        m.connect()
        out = [
            m.message(make_message("mac1@test"), "alice@sender.test", ["bob@rcpt.test"],
                      mail_macros=auth, eom_macros={"i": "QMAC1"}),
            m.message(make_message("mac2@test"), "alice@sender.test", ["bob@rcpt.test"],
                      rcpt_macros={"i": "QMAC2"}),
            m.message(make_message("mac3@test"), "alice@sender.test", ["bob@rcpt.test"],
                      mail_macros={"i": "QMAC3", **auth}),
        ]
        m.quit()
        return out

    (first, second, third), store = run_milter(tmp_path, free_port, mta)
    assert inserted(first)["Authentication-Results"] == AR_INTERNAL
    assert inserted(second)["Authentication-Results"] == AR_OUTSIDE
    assert inserted(third)["Authentication-Results"] == AR_INTERNAL
    rows = verdict_rows(store)
    assert sorted(rows, key=str) == ["QMAC1", "QMAC2", "QMAC3"]
    assert all(r.action == "accept" and r.client_addr == "192.0.2.55" for r in rows.values())


# -- bodies, quarantine ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("actions", "protocol"),
    [(mc.SMFI_V6_ACTS, mc.SMFI_V6_PROT), (mc.SMFI_V2_ACTS, 0)],
    ids=["no-replies-leadspc", "every-chunk-answered"],
)
def test_multi_chunk_body_is_quarantined_byte_for_byte(
    tmp_path: Path, free_port: Ports, actions: int, protocol: int
) -> None:
    body = big_body(3000)  # 240,000 bytes: four SMFIC_BODY packets
    folded = [("X-Long", " first part of a folded field\n\tsecond part\n  third part")]
    # One space after each colon: without SMFIP_HDR_LEADSPC the MTA strips it and the filter puts one back.
    raw = with_fields(make_message("big1@test", body=body), folded)

    def mta(port: int) -> tuple[int, list[Reply]]:
        m = Mta(port, actions=actions, protocol=protocol)
        m.connect()
        fields, text = split(raw)
        m.envelope(QUARANTINE_SENDER, ["bob@rcpt.test"], rcpt_macros={"i": "QBIG"})
        m.headers(fields)
        packets = m.body(text)
        replies = m.end()
        m.quit()
        return packets, replies

    (packets, replies), store = run_milter(tmp_path, free_port, mta)
    assert packets == 4 and len(body) > 3 * mc.MILTER_CHUNK_SIZE
    assert replies == [(mc.SMFIR_DISCARD, {})]  # stored by us, dropped by the MTA
    held = store.quarantine_list()
    assert [(r.queue_id, r.action) for r in held] == [("QBIG", "quarantine")]
    assert store.get_raw(held[0].id) == raw


def test_hold_mode_quarantines_in_the_mta_with_the_store_row_id(tmp_path: Path, free_port: Ports) -> None:
    raw = make_message("hold1@test", subject="Invoice")

    def mta(port: int) -> list[Reply]:
        m = Mta(port)
        m.connect()
        replies = m.message(raw, QUARANTINE_SENDER, ["bob@rcpt.test"], eom_macros={"i": "QHOLD"})
        m.quit()
        return replies

    replies, store = run_milter(tmp_path, free_port, mta, milter_quarantine="hold")
    # The held copy says why, and where our copy is: the verdict fields plus our quarantine id.
    assert codes(replies) == [mc.SMFIR_INSHEADER] * 7 + [mc.SMFIR_QUARANTINE, mc.SMFIR_CONTINUE]
    reason = replies[7][1]["reason"]
    found = re.fullmatch(r"mailsift quarantine id (\d+): (\w+) \(.+\)", reason)
    assert found is not None, reason
    row = store.get(int(found.group(1)))
    assert row is not None and row.quarantined and row.queue_id == "QHOLD"
    fields = inserted(replies)
    assert fields["X-Milter-Quarantine-Id"] == str(row.id)
    assert row.verdict == found.group(2) == fields["X-Milter-Verdict"]
    assert store.get_raw(row.id) == raw


def test_hold_mode_without_quarantine_action_still_keeps_the_message_from_the_recipient(
    tmp_path: Path, free_port: Ports
) -> None:
    """An MTA that does not allow SMFIF_QUARANTINE cannot hold the message; it is in our quarantine
    already, so the MTA's copy must be dropped as in discard mode, not delivered (a release from our
    quarantine would then deliver it a second time)."""
    raw = make_message("hold2@test")

    def mta(port: int) -> list[Reply]:
        m = Mta(port, actions=mc.SMFIF_ADDHDRS | mc.SMFIF_CHGHDRS)
        m.connect()
        replies = m.message(raw, QUARANTINE_SENDER, ["bob@rcpt.test"], eom_macros={"i": "QHOLD2"})
        m.quit()
        return replies

    replies, store = run_milter(tmp_path, free_port, mta, milter_quarantine="hold")
    held = store.quarantine_list()
    assert [r.queue_id for r in held] == ["QHOLD2"]
    assert replies[-1] == (mc.SMFIR_DISCARD, {}), replies


# -- several messages, abort -------------------------------------------------------------------------


def test_abort_mid_message_then_next_message_is_judged_alone(tmp_path: Path, free_port: Ports) -> None:
    aborted = make_message("gone@test", body=big_body(1000), extra="X-Aborted: yes\r\n")
    raw = make_message("after@test", subject="Second try")

    def mta(port: int) -> list[Reply]:
        m = Mta(port)
        m.connect()
        fields, body = split(aborted)
        m.envelope("alice@sender.test", ["early@rcpt.test"], mail_macros={"i": "QGONE"})
        m.headers(fields)
        m.conn._send(mc.SMFIC_BODY, buf=body[: mc.MILTER_CHUNK_SIZE])
        m.abort()
        # No queue id this time: one left over from the aborted message would show in the row.
        replies = m.message(raw, QUARANTINE_SENDER, ["late@rcpt.test"])
        m.quit()
        return replies

    replies, store = run_milter(tmp_path, free_port, mta)
    assert replies == [(mc.SMFIR_DISCARD, {})]
    rows = verdict_rows(store)
    assert list(rows) == [None]  # nothing recorded for the aborted message
    row = rows[None]
    assert row.quarantined and row.rcpt_tos == ("late@rcpt.test",) and row.mail_from == QUARANTINE_SENDER
    assert store.get_raw(row.id) == raw


def test_several_messages_on_one_connection_each_get_their_own_actions(
    tmp_path: Path, free_port: Ports
) -> None:
    """accept, tag, quarantine, reject, an abort between messages, then SMFIC_QUIT_NC and a second SMTP
    session (another client) on the same milter connection."""
    other = {"hostname": "[198.51.100.7]", "family": mc.SMFIA_INET, "port": 5000, "address": "198.51.100.7"}

    def mta(port: int) -> list[list[Reply]]:
        m = Mta(port)
        m.connect()
        out = [
            m.message(make_message("s1@test"), "alice@sender.test", ["bob@rcpt.test"],
                      eom_macros={"i": "QS1"}),
            m.message(make_message("s2@test", subject="Cheap meds"), "alice@sender.test",
                      [f"carol@{TAG_DOMAIN}"], eom_macros={"i": "QS2"}),
            m.message(make_message("s3@test"), QUARANTINE_SENDER, ["bob@rcpt.test"], eom_macros={"i": "QS3"}),
            m.message(make_message("s4@test"), "alice@sender.test", [f"dave@{REJECT_DOMAIN}"],
                      eom_macros={"i": "QS4"}),
        ]
        m.abort()  # an MTA may abort between transactions (RSET); outside a message it changes nothing
        m.quit_nc()
        m.connect(other, helo="other.test")
        out.append(m.message(make_message("s5@test"), "eve@sender.test", ["bob@rcpt.test"],
                             eom_macros={"i": "QS5"}))
        m.quit()
        return out

    (accept, tag, quarantine, reject, second), store = run_milter(tmp_path, free_port, mta)
    assert codes(accept) == [mc.SMFIR_INSHEADER] * 2 + [mc.SMFIR_CONTINUE]
    assert accept[0][1] == {"index": 0, "name": "X-Milter-Category", "value": " ham"}
    assert codes(tag) == [mc.SMFIR_CHGHEADER] + [mc.SMFIR_INSHEADER] * 6 + [mc.SMFIR_CONTINUE]
    assert tag[0][1] == {"index": 1, "name": "Subject", "value": " [SPAM] Cheap meds"}
    assert quarantine == [(mc.SMFIR_DISCARD, {})]
    assert codes(reject) == [mc.SMFIR_REPLYCODE]
    assert (reject[0][1]["smtpcode"], reject[0][1]["space"]) == ("550", " ")
    assert reject[0][1]["text"].startswith("5.7.1 Message rejected as spam")
    assert codes(second) == [mc.SMFIR_INSHEADER] * 2 + [mc.SMFIR_CONTINUE]
    rows = verdict_rows(store)
    assert {q: (r.action, r.quarantined) for q, r in rows.items()} == {
        "QS1": ("accept", False), "QS2": ("tag", False), "QS3": ("quarantine", True),
        "QS5": ("accept", False),
    }
    assert (rows["QS1"].client_addr, rows["QS1"].client_name, rows["QS1"].helo) == (
        "192.0.2.55", "mx.client.test", HELO,
    )
    # The second session's client, not the first's; "[addr]" is Postfix's "no reverse name".
    assert (rows["QS5"].client_addr, rows["QS5"].client_name, rows["QS5"].helo) == (
        "198.51.100.7", None, "other.test",
    )
