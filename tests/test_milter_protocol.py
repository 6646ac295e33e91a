"""The sans-I/O milter layer with plain values: packet framing and parsing, reply encoding, and
`FilterSession` (negotiation, macros per stage, message assembly, size limit, order of commands).

Expected bytes and flag values are written out by hand from the protocol's definition (libmilter's
mfdef.h, Postfix's milter8.c), not taken from `milter.protocol.constants`, so that a wrong constant
fails here too.
"""

from __future__ import annotations

import random
import struct

import pytest

from milter.protocol import codec
from milter.protocol import constants as c
from milter.protocol.codec import Decoder, ProtocolError, encode
from milter.protocol.session import (
    MAX_MACROS,
    MAX_RECIPIENTS,
    Close,
    Decide,
    Decision,
    FilterSession,
    Message,
    Send,
)

FULL_ACTIONS = 0x1FF  # everything SMFIF_* defines, SETSYMLIST included (Postfix 2.6+ offers this)
FULL_STEPS = 0x1FFFFF  # every SMFIP_* step and no-reply flag up to HDR_LEADSPC
# What the filter asks of a full offer: ADDHDRS 0x01 | CHGHDRS 0x10 | QUARANTINE 0x20 | SETSYMLIST 0x100.
WANT_ACTIONS = 0x131
# NODATA 0x200 | NOEOH 0x40 | NOUNKNOWN 0x100, every NR_* (0x80, 0x1000 .. 0x80000), HDR_LEADSPC 0x100000.
WANT_STEPS = 0x200 | 0x40 | 0x100 | 0x80 | 0xF000 | 0xF0000 | 0x100000


def pkt(code: bytes, data: bytes = b"") -> bytes:
    """A packet as the MTA writes it: length (command byte included), command byte, data."""
    return struct.pack("!I", len(data) + 1) + code + data


def z(*parts: bytes) -> bytes:
    return b"".join(p + b"\0" for p in parts)


def decode_one(data: bytes) -> codec.Command:
    commands = Decoder().feed(data)
    assert len(commands) == 1
    return commands[0]


def negotiated(
    actions: int = FULL_ACTIONS, steps: int = FULL_STEPS, version: int = 6, max_size: int = 0
) -> tuple[FilterSession, codec.Negotiated]:
    session = FilterSession(max_size=max_size)
    out = session.handle(codec.OptNeg(version, actions, steps))
    assert isinstance(out, Send) and len(out.replies) == 1
    reply = out.replies[0]
    assert isinstance(reply, codec.Negotiated)
    return session, reply


def decide(session: FilterSession, command: codec.Command) -> Message:
    out = session.handle(command)
    assert isinstance(out, Decide), out
    return out.message


def silent(session: FilterSession, *commands: codec.Command) -> None:
    """Commands the negotiated session must take without a reply."""
    for command in commands:
        assert session.handle(command) == Send(), command


MAIL = codec.MailFrom("<alice@sender.test>", ("BODY=8BITMIME",))
RCPT = codec.RcptTo("<bob@rcpt.test>", ())
CONNECT = codec.Connect("mx.client.test", "4", 40000, "192.0.2.1")
ACCEPT = Decision(codec.CONTINUE)


def start_message(session: FilterSession, mail: codec.MailFrom = MAIL) -> None:
    silent(session, mail, RCPT)


# -- negotiation ------------------------------------------------------------------------------------


def test_full_offer_gets_exactly_the_wanted_actions_steps_and_macros() -> None:
    _, reply = negotiated()
    assert reply == codec.Negotiated(
        6,
        WANT_ACTIONS,
        WANT_STEPS,
        ((0, "j {daemon_name}"), (2, "i {auth_type} {auth_authen}"), (3, "i"), (5, "i")),
    )
    # And on the wire: version, actions, steps, then per stage a 4-byte index and a NUL-ended list.
    lists = (
        b"\0\0\0\0j {daemon_name}\0" + b"\0\0\0\x02i {auth_type} {auth_authen}\0"
        + b"\0\0\0\x03i\0" + b"\0\0\0\x05i\0"
    )
    assert encode(reply) == pkt(b"O", struct.pack("!III", 6, WANT_ACTIONS, WANT_STEPS) + lists)


def test_requested_actions_and_steps_are_always_a_subset_of_the_offer() -> None:
    rng = random.Random(1)
    for _ in range(2000):
        actions, steps = rng.getrandbits(32), rng.getrandbits(32)
        _, reply = negotiated(actions, steps, version=rng.randrange(2, 10))
        assert reply.actions & ~actions == 0, hex(actions)
        assert reply.steps & ~steps == 0, hex(steps)
        assert reply.actions == WANT_ACTIONS & actions
        assert reply.steps == WANT_STEPS & steps
        assert 2 <= reply.version <= 6
        assert bool(reply.macros) == bool(actions & 0x100)  # symbol lists only if SETSYMLIST is offered


def test_reduced_offer_continue_after_every_event_and_no_macro_lists() -> None:
    session, reply = negotiated(actions=0x01 | 0x20, steps=0, version=2)  # ADDHDRS, QUARANTINE; no steps
    assert reply == codec.Negotiated(2, 0x21, 0, ())
    assert encode(reply) == pkt(b"O", struct.pack("!III", 2, 0x21, 0))
    cont = Send((codec.CONTINUE,))
    assert session.handle(codec.Macros(b"C", (("j", "mx"),))) == Send()  # macros are never answered
    for command in (
        CONNECT,
        codec.Helo("helo.test"),
        MAIL,
        RCPT,
        codec.Data(),
        codec.Header(b"Subject", b"hi"),
        codec.EndOfHeaders(),
        codec.Body(b"text\r\n"),
        codec.Unknown(b"XYZZY"),
    ):
        assert session.handle(command) == cont, command
    message = decide(session, codec.EndOfMessage(b""))
    assert not message.leading_space
    assert message.raw() == b"Subject: hi\r\n\r\ntext\r\n"


def test_each_no_reply_flag_silences_only_its_own_event() -> None:
    # NR_HDR (0x80) and NR_BODY (0x80000) only: headers and body chunks silent, the rest answered.
    session, reply = negotiated(steps=0x80 | 0x80000)
    assert reply.steps == 0x80 | 0x80000
    cont = Send((codec.CONTINUE,))
    assert session.handle(CONNECT) == cont
    assert session.handle(codec.Helo("h")) == cont
    assert session.handle(MAIL) == cont
    assert session.handle(RCPT) == cont
    assert session.handle(codec.Data()) == cont
    assert session.handle(codec.Header(b"A", b"b")) == Send()
    assert session.handle(codec.EndOfHeaders()) == cont
    assert session.handle(codec.Body(b"x")) == Send()


def test_full_offer_leaves_every_event_unanswered_until_end_of_message() -> None:
    session, _ = negotiated()
    silent(
        session, CONNECT, codec.Helo("h"), MAIL, RCPT, codec.Data(), codec.Header(b"A", b" b"),
        codec.EndOfHeaders(), codec.Body(b"x"), codec.Unknown(b"VRFY"),
    )
    assert decide(session, codec.EndOfMessage(b"")).leading_space


def test_edits_the_mta_did_not_allow_are_dropped_and_reported() -> None:
    edits = (
        codec.ChangeHeader(1, "X-Milter-Verdict", ""),
        codec.InsertHeader(0, "X-Milter-Category", "ham"),
        codec.AddHeader("X-Extra", "1"),
        codec.Quarantine("held"),
    )
    decision = Decision(codec.CONTINUE, edits)

    # No CHGHDRS (0x10) offered: the deletion goes, the rest stays in order, the final reply last.
    session, reply = negotiated(actions=0x01 | 0x20 | 0x100)
    assert reply.actions == 0x121
    start_message(session)
    decide(session, codec.EndOfMessage(b""))
    assert session.dropped_edits(decision) == (edits[0],)
    assert session.decided(decision) == (*edits[1:], codec.CONTINUE)

    # Only CHGHDRS: header additions and the quarantine go.
    session, _ = negotiated(actions=0x10)
    start_message(session)
    decide(session, codec.EndOfMessage(b""))
    assert session.dropped_edits(decision) == edits[1:]
    assert session.decided(decision) == (edits[0], codec.CONTINUE)

    # Everything offered: nothing dropped.
    session, _ = negotiated()
    start_message(session)
    decide(session, codec.EndOfMessage(b""))
    assert session.dropped_edits(decision) == ()
    assert session.decided(decision) == (*edits, codec.CONTINUE)


@pytest.mark.parametrize("version", [0, 1])
def test_protocol_versions_before_2_are_refused(version: int) -> None:
    with pytest.raises(ProtocolError, match="too old"):
        FilterSession().handle(codec.OptNeg(version, FULL_ACTIONS, FULL_STEPS))


@pytest.mark.parametrize(("offered", "spoken"), [(2, 2), (6, 6), (7, 6), (0xFFFFFFFF, 6)])
def test_version_is_the_lower_of_the_offer_and_6(offered: int, spoken: int) -> None:
    assert negotiated(version=offered)[1].version == spoken


def test_optneg_packet_decodes_and_a_short_one_is_refused() -> None:
    data = struct.pack("!III", 6, FULL_ACTIONS, FULL_STEPS)
    assert decode_one(pkt(b"O", data)) == codec.OptNeg(6, FULL_ACTIONS, FULL_STEPS)
    with pytest.raises(ProtocolError, match="option negotiation"):
        Decoder().feed(pkt(b"O", data[:11]))


# -- macros -----------------------------------------------------------------------------------------


def test_connect_macros_survive_messages_and_message_macros_reset_after_decision_and_abort() -> None:
    session, _ = negotiated()
    silent(
        session,
        codec.Macros(b"C", (("j", "mx.test"), ("{daemon_name}", "smtpd"))),
        CONNECT,
        codec.Macros(b"H", (("{tls_version}", "TLSv1.3"),)),
        codec.Helo("helo.test"),
        codec.Macros(b"M", (("i", "Q1"), ("{auth_authen}", "bob"))),
        MAIL,
        codec.Macros(b"R", (("{rcpt_mailer}", "local"),)),
        RCPT,
        codec.Macros(b"E", (("i", "Q1-eom"),)),
    )
    first = decide(session, codec.EndOfMessage(b""))
    conn = {"j": "mx.test", "{daemon_name}": "smtpd", "{tls_version}": "TLSv1.3"}
    assert dict(first.macros) == conn | {"i": "Q1-eom", "{auth_authen}": "bob", "{rcpt_mailer}": "local"}
    session.decided(ACCEPT)

    # Second message, no macros of its own: only the connection's are left.
    start_message(session)
    second = decide(session, codec.EndOfMessage(b""))
    assert dict(second.macros) == conn
    session.decided(ACCEPT)

    # A message aborted after its MAIL macros: the next one does not inherit them.
    silent(session, codec.Macros(b"M", (("{auth_type}", "PLAIN"),)), MAIL, RCPT, codec.Abort())
    start_message(session)
    assert dict(decide(session, codec.EndOfMessage(b"")).macros) == conn
    session.decided(ACCEPT)

    # A message's macros are a snapshot: later messages do not change what was handed out.
    assert dict(first.macros)["i"] == "Q1-eom" and "{auth_type}" not in first.macros
    assert first.connect == CONNECT and first.helo == "helo.test"


def test_macro_packets_decode_and_malformed_ones_are_refused() -> None:
    assert decode_one(pkt(b"D", b"C" + z(b"j", b"mx.test", b"{daemon_name}", b"smtpd"))) == codec.Macros(
        b"C", (("j", "mx.test"), ("{daemon_name}", "smtpd"))
    )
    assert decode_one(pkt(b"D", b"M")) == codec.Macros(b"M", ())
    for bad in (b"", b"C" + z(b"j"), b"C" + b"j\0mx"):  # no stage; a name without value; unterminated
        with pytest.raises(ProtocolError):
            Decoder().feed(pkt(b"D", bad))


# -- message assembly -------------------------------------------------------------------------------


def test_body_in_many_chunks_is_reassembled_from_a_stream_cut_anywhere() -> None:
    rng = random.Random(7)
    body = rng.randbytes(3 * c.CHUNK_SIZE + 1234)
    chunks = [body[i : i + c.CHUNK_SIZE] for i in range(0, len(body), c.CHUNK_SIZE)]
    assert len(chunks) == 4
    stream = (
        pkt(b"O", struct.pack("!III", 6, FULL_ACTIONS, FULL_STEPS))
        + pkt(b"M", z(b"<a@b.test>"))
        + pkt(b"R", z(b"<c@d.test>"))
        + pkt(b"L", z(b"Subject", b" chunks"))
        + b"".join(pkt(b"B", chunk) for chunk in chunks)
        + pkt(b"E", b"tail")
    )
    decoder, session = Decoder(), FilterSession()
    messages: list[Message] = []
    pos = 0
    while pos < len(stream):
        step = rng.choice((1, 3, 7, 1000, 70000))
        for command in decoder.feed(stream[pos : pos + step]):
            out = session.handle(command)
            if isinstance(out, Decide):
                messages.append(out.message)
        pos += step
    assert decoder.buffered == 0
    [message] = messages
    assert message.body == body + b"tail"
    assert message.raw() == b"Subject: chunks\r\n\r\n" + body + b"tail"
    assert message.rcpts == (codec.RcptTo("<c@d.test>", ()),)
    assert not message.too_big


def test_raw_is_byte_exact_with_leading_space() -> None:
    original = (
        b"From: Alice <alice@sender.test>\r\n"
        b"Subject: a folded\r\n\tsubject line\r\n"
        b"X-Two-Spaces:  kept\r\n"
        b"X-Tab:\tvalue\r\n"
        b"X-Empty:\r\n"
        b"\r\n"
        b"Body line 1\r\nline 2\r\n"
    )
    session, _ = negotiated()  # HDR_LEADSPC taken: values arrive with their leading whitespace
    start_message(session)
    # Postfix passes folded values with bare LF between the lines.
    silent(
        session,
        codec.Header(b"From", b" Alice <alice@sender.test>"),
        codec.Header(b"Subject", b" a folded\n\tsubject line"),
        codec.Header(b"X-Two-Spaces", b"  kept"),
        codec.Header(b"X-Tab", b"\tvalue"),
        codec.Header(b"X-Empty", b""),
        codec.EndOfHeaders(),
        codec.Body(b"Body line 1\r\n"),
        codec.Body(b"line 2\r\n"),
    )
    message = decide(session, codec.EndOfMessage(b""))
    assert message.leading_space
    assert message.raw() == original


def test_raw_without_leading_space_puts_one_back_and_makes_folds_crlf() -> None:
    session, reply = negotiated(steps=FULL_STEPS & ~0x100000)
    assert not reply.steps & 0x100000
    start_message(session)
    silent(
        session,
        codec.Header(b"From", b"alice@sender.test"),
        codec.Header(b"Subject", b"bare LF\n folded\n\tagain"),
        codec.Header(b"X-Sendmail", b"CRLF\r\n folded"),  # sendmail's way: already CRLF, kept CRLF
        codec.Header(b"X-Empty", b""),
    )
    message = decide(session, codec.EndOfMessage(b""))
    assert not message.leading_space
    assert message.raw() == (
        b"From: alice@sender.test\r\n"
        b"Subject: bare LF\r\n folded\r\n\tagain\r\n"
        b"X-Sendmail: CRLF\r\n folded\r\n"
        b"X-Empty:\r\n"
        b"\r\n"
    )


def test_header_packets_keep_8bit_values_and_refuse_malformed_ones() -> None:
    assert decode_one(pkt(b"L", z(b"Subject", b" caf\xc3\xa9 \xff"))) == codec.Header(
        b"Subject", b" caf\xc3\xa9 \xff"
    )
    assert decode_one(pkt(b"L", z(b"X-Empty", b""))) == codec.Header(b"X-Empty", b"")
    for bad in (z(b"Subject"), z(b"", b"v"), z(b"A", b"b", b"c"), b"Subject\0value"):
        with pytest.raises(ProtocolError, match="header"):
            Decoder().feed(pkt(b"L", bad))


# -- size limit -------------------------------------------------------------------------------------


def test_body_exactly_at_the_limit_is_kept_one_byte_more_is_too_big() -> None:
    for size, too_big in ((1000, False), (1001, True)):
        session, _ = negotiated(max_size=1000)
        start_message(session)
        silent(session, codec.Body(b"x" * (size - 1)))
        message = decide(session, codec.EndOfMessage(b"y"))
        assert (message.size, message.too_big) == (size, too_big)
        assert len(message.body) <= 1000


def test_size_limit_stops_keeping_the_message_but_counts_all_of_it() -> None:
    limit = 100_000
    session, _ = negotiated(max_size=limit)
    start_message(session)
    silent(session, codec.Header(b"Subject", b" big"))
    chunk = b"z" * c.CHUNK_SIZE
    for _ in range(50):  # 3.2 MB through a 100 kB limit
        silent(session, codec.Body(chunk))
    silent(session, codec.Header(b"X-Late", b" after the limit"))
    message = decide(session, codec.EndOfMessage(b"tail"))
    assert message.too_big
    assert message.size >= 50 * c.CHUNK_SIZE + 4
    # Memory is bounded: only what fitted under the limit was kept (the first chunk), nothing after.
    assert message.body == chunk
    assert message.headers == ((b"Subject", b" big"),)
    session.decided(Decision(codec.ReplyCode("552 5.3.4 Message too big")))

    # The next message on the connection starts from zero.
    start_message(session)
    silent(session, codec.Body(b"small"))
    message = decide(session, codec.EndOfMessage(b""))
    assert (message.too_big, message.size, message.body) == (False, 5, b"small")


def test_no_limit_keeps_everything() -> None:
    session, _ = negotiated(max_size=0)
    start_message(session)
    for _ in range(20):
        silent(session, codec.Body(b"q" * c.CHUNK_SIZE))
    message = decide(session, codec.EndOfMessage(b""))
    assert not message.too_big and len(message.body) == 20 * c.CHUNK_SIZE


# -- transactions and connections -------------------------------------------------------------------


def test_abort_mid_message_discards_it_and_the_next_message_starts_clean() -> None:
    session, _ = negotiated()
    silent(session, CONNECT, codec.Helo("h"), MAIL, RCPT, codec.Header(b"Subject", b" lost"),
           codec.Body(b"lost body"), codec.Abort())
    # The aborted transaction is gone: a recipient without a new MAIL is out of order.
    with pytest.raises(ProtocolError, match="before MAIL"):
        session.handle(RCPT)

    session, _ = negotiated()
    silent(session, CONNECT, codec.Helo("h"), MAIL, RCPT, codec.Header(b"Subject", b" lost"),
           codec.Body(b"lost body"), codec.Abort())
    other = codec.MailFrom("<other@sender.test>", ())
    silent(session, other, codec.RcptTo("<x@rcpt.test>", ()), codec.Body(b"kept"))
    message = decide(session, codec.EndOfMessage(b""))
    assert message.mail_from == other
    assert message.rcpts == (codec.RcptTo("<x@rcpt.test>", ()),)
    assert (message.headers, message.body) == ((), b"kept")
    assert message.connect == CONNECT and message.helo == "h"  # the connection is not aborted


def test_several_messages_on_one_connection_each_get_their_own_decision() -> None:
    session, _ = negotiated()
    silent(session, CONNECT, codec.Helo("helo.test"))
    for n in range(3):
        silent(
            session,
            codec.MailFrom(f"<s{n}@sender.test>", ()),
            *(codec.RcptTo(f"<r{n}.{k}@rcpt.test>", ()) for k in range(n + 1)),
            codec.Header(b"Subject", f" message {n}".encode()),
            codec.Body(f"body {n}\r\n".encode()),
        )
        message = decide(session, codec.EndOfMessage(b""))
        assert message.mail_from.address == f"<s{n}@sender.test>"
        assert len(message.rcpts) == n + 1
        assert message.headers == ((b"Subject", f" message {n}".encode()),)
        assert message.body == f"body {n}\r\n".encode()
        assert (message.connect, message.helo) == (CONNECT, "helo.test")
        reject = codec.ReplyCode("550 5.7.1 no")
        assert session.decided(Decision(reject)) == (reject,)


def test_quit_nc_resets_the_connection_but_keeps_the_negotiation() -> None:
    session, _ = negotiated()
    silent(session, codec.Macros(b"C", (("j", "mx.test"),)), CONNECT, codec.Helo("h"), MAIL, RCPT)
    assert session.handle(decode_one(pkt(b"K"))) == Send()  # SMFIC_QUIT_NC: no reply, stay open
    # No new OPTNEG: the next SMTP session starts with its CONNECT, and replies stay negotiated away.
    with pytest.raises(ProtocolError, match="before MAIL"):
        session.handle(RCPT)
    silent(session, MAIL, RCPT)
    message = decide(session, codec.EndOfMessage(b""))
    assert dict(message.macros) == {}
    assert (message.connect, message.helo) == (None, None)

    other = codec.Connect("other.test", "6", 25, "2001:db8::1")
    session.decided(ACCEPT)
    silent(session, codec.Quit(True), codec.Macros(b"C", (("j", "mx2.test"),)), other, MAIL, RCPT)
    message = decide(session, codec.EndOfMessage(b""))
    assert (dict(message.macros), message.connect, message.helo) == ({"j": "mx2.test"}, other, None)


def test_quit_closes() -> None:
    session, _ = negotiated()
    assert decode_one(pkt(b"Q")) == codec.Quit(False)
    assert isinstance(session.handle(codec.Quit(False)), Close)


# -- order of commands ------------------------------------------------------------------------------

EVERY_COMMAND: list[codec.Command] = [
    codec.Macros(b"C", (("j", "x"),)),
    CONNECT,
    codec.Helo("h"),
    MAIL,
    RCPT,
    codec.Data(),
    codec.Header(b"A", b"b"),
    codec.EndOfHeaders(),
    codec.Body(b"x"),
    codec.EndOfMessage(b""),
    codec.Abort(),
    codec.Quit(False),
    codec.Quit(True),
    codec.Unknown(b"HELP"),
]


@pytest.mark.parametrize("command", EVERY_COMMAND, ids=lambda cmd: type(cmd).__name__)
def test_every_command_before_negotiation_is_a_protocol_error(command: codec.Command) -> None:
    with pytest.raises(ProtocolError, match="before option negotiation"):
        FilterSession().handle(command)


@pytest.mark.parametrize(
    "command",
    [RCPT, codec.Header(b"A", b"b"), codec.Body(b"x"), codec.EndOfMessage(b"")],
    ids=lambda cmd: type(cmd).__name__,
)
def test_message_commands_before_mail_are_protocol_errors(command: codec.Command) -> None:
    session, _ = negotiated()
    silent(session, CONNECT, codec.Helo("h"))
    with pytest.raises(ProtocolError, match="before MAIL"):
        session.handle(command)


@pytest.mark.parametrize(
    "command",
    [cmd for cmd in EVERY_COMMAND if not isinstance(cmd, codec.Abort | codec.Quit)]
    + [codec.OptNeg(6, FULL_ACTIONS, FULL_STEPS)],
    ids=lambda cmd: type(cmd).__name__,
)
def test_commands_while_a_message_is_decided_are_protocol_errors(command: codec.Command) -> None:
    session, _ = negotiated()
    start_message(session)
    decide(session, codec.EndOfMessage(b""))
    with pytest.raises(ProtocolError, match="while a message is being decided"):
        session.handle(command)


def test_abort_may_overtake_a_pending_decision() -> None:
    session, _ = negotiated()
    start_message(session)
    decide(session, codec.EndOfMessage(b""))
    assert session.handle(codec.Abort()) == Send()
    with pytest.raises(ProtocolError, match="without a message"):
        session.decided(ACCEPT)  # the MTA gave up on that message: nothing is waiting any more
    start_message(session)
    assert decide(session, codec.EndOfMessage(b"")).rcpts == (RCPT,)


def test_decision_without_a_pending_message_raises() -> None:
    session, _ = negotiated()
    with pytest.raises(ProtocolError, match="without a message"):
        session.decided(ACCEPT)
    start_message(session)
    decide(session, codec.EndOfMessage(b""))
    assert session.decided(ACCEPT) == (codec.CONTINUE,)
    with pytest.raises(ProtocolError, match="without a message"):
        session.decided(ACCEPT)  # the same message twice


# -- packet parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("packet", "command"),
    [
        (pkt(b"C", z(b"mx.test") + b"4" + struct.pack("!H", 40000) + z(b"192.0.2.1")),
         codec.Connect("mx.test", "4", 40000, "192.0.2.1")),
        (pkt(b"C", z(b"[2001:db8::1]") + b"6" + struct.pack("!H", 25) + z(b"IPv6:2001:db8::1")),
         codec.Connect("[2001:db8::1]", "6", 25, "IPv6:2001:db8::1")),
        (pkt(b"C", z(b"localhost") + b"L" + b"\0\0" + z(b"/run/sock")),
         codec.Connect("localhost", "L", 0, "/run/sock")),
        (pkt(b"C", z(b"unknown") + b"U"), codec.Connect("unknown", "U", None, None)),
        (pkt(b"H", z(b"helo.test")), codec.Helo("helo.test")),
        (pkt(b"M", z(b"<a@b.test>", b"SIZE=100", b"BODY=8BITMIME")),
         codec.MailFrom("<a@b.test>", ("SIZE=100", "BODY=8BITMIME"))),
        (pkt(b"M", z(b"<>")), codec.MailFrom("<>", ())),
        (pkt(b"R", z(b"<c@d.test>", b"NOTIFY=NEVER")), codec.RcptTo("<c@d.test>", ("NOTIFY=NEVER",))),
        (pkt(b"R", z(b"<\xc3\xa9@d.test>")), codec.RcptTo("<é@d.test>", ())),
        (pkt(b"T"), codec.Data()),
        (pkt(b"N"), codec.EndOfHeaders()),
        (pkt(b"B", b"\0body\r\n\0"), codec.Body(b"\0body\r\n\0")),
        (pkt(b"E"), codec.EndOfMessage(b"")),
        (pkt(b"A"), codec.Abort()),
        (pkt(b"Q"), codec.Quit(False)),
        (pkt(b"K"), codec.Quit(True)),
        (pkt(b"U", z(b"XYZZY arg")), codec.Unknown(b"XYZZY arg")),
    ],
)
def test_command_packets_decode(packet: bytes, command: codec.Command) -> None:
    assert decode_one(packet) == command


@pytest.mark.parametrize(
    "packet",
    [
        pkt(b"C", b"mx.test"),  # no NUL after the host name
        pkt(b"C", z(b"mx.test")),  # no family
        pkt(b"C", z(b"mx.test") + b"X\0\0" + z(b"1.2.3.4")),  # unknown family
        pkt(b"C", z(b"mx.test") + b"4\0"),  # port cut short
        pkt(b"C", z(b"mx.test") + b"4\0\x19" + b"1.2.3.4"),  # address not terminated
        pkt(b"C", z(b"mx.test") + b"4\0\x19" + z(b"1.2.3.4", b"extra")),
        pkt(b"H", b"helo"),
        pkt(b"H", z(b"a", b"b")),
        pkt(b"M", b""),
        pkt(b"M", b"<a@b>"),
        pkt(b"R", b"<c@d>"),
        pkt(b"T", b"x"),
        pkt(b"N", b"x"),
        pkt(b"A", b"x"),
        pkt(b"Q", b"x"),
        pkt(b"K", b"x"),
        pkt(b"Z"),  # no such command
        pkt(b"\0"),
        pkt(b"c"),  # a reply code coming from the MTA
    ],
)
def test_malformed_packets_are_protocol_errors(packet: bytes) -> None:
    with pytest.raises(ProtocolError):
        Decoder().feed(packet)


# -- framing ----------------------------------------------------------------------------------------


def test_a_packet_fed_byte_by_byte_comes_out_once_complete() -> None:
    packet = pkt(b"L", z(b"Subject", b" hello"))
    decoder = Decoder()
    for i, byte in enumerate(packet[:-1]):
        assert decoder.feed(bytes([byte])) == []
        assert decoder.buffered == i + 1
    assert decoder.feed(packet[-1:]) == [codec.Header(b"Subject", b" hello")]
    assert decoder.buffered == 0


def test_several_packets_in_one_read_and_a_partial_one_kept() -> None:
    stream = pkt(b"M", z(b"<a@b>")) + pkt(b"R", z(b"<c@d>")) + pkt(b"B", b"abcdef")
    decoder = Decoder()
    assert decoder.feed(stream[:-3]) == [codec.MailFrom("<a@b>", ()), codec.RcptTo("<c@d>", ())]
    assert decoder.buffered == 4 + 1 + 3
    assert decoder.feed(stream[-3:]) == [codec.Body(b"abcdef")]


@pytest.mark.parametrize("length", [0, c.MAX_PACKET + 1, 2**31, 2**32 - 1])
def test_a_bad_length_is_refused_from_its_four_bytes_alone(length: int) -> None:
    decoder = Decoder()
    assert decoder.feed(struct.pack("!I", length)[:3]) == []
    with pytest.raises(ProtocolError, match="packet length"):
        decoder.feed(struct.pack("!I", length)[3:])


def test_the_largest_packet_is_accepted() -> None:
    body = b"b" * (c.MAX_PACKET - 1)
    assert Decoder().feed(pkt(b"B", body)) == [codec.Body(body)]
    assert c.MAX_PACKET >= 1024 * 1024  # Postfix's SMFIP_MDS_1M chunks must fit


def test_a_smaller_max_packet_is_honoured() -> None:
    decoder = Decoder(max_packet=16)
    assert decoder.feed(pkt(b"B", b"x" * 15)) == [codec.Body(b"x" * 15)]
    with pytest.raises(ProtocolError):
        decoder.feed(pkt(b"B", b"x" * 16))


# -- replies ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        (codec.CONTINUE, b"\0\0\0\x01c"),
        (codec.ACCEPT, b"\0\0\0\x01a"),
        (codec.DISCARD, b"\0\0\0\x01d"),
        (codec.REJECT, b"\0\0\0\x01r"),
        (codec.TEMPFAIL, b"\0\0\0\x01t"),
        (codec.PROGRESS, b"\0\0\0\x01p"),
        (codec.ReplyCode("550 5.7.1 No"), b"\0\0\0\x0ey550 5.7.1 No\0"),
        (codec.ReplyCode("451 4.3.0 a\0b"), b"\0\0\0\x0fy451 4.3.0 a b\0"),  # a NUL cannot cut it short
        # the MTA reads it as a format ("%%" is one "%"): a reason quoting "50% OFF" must stay whole
        (codec.ReplyCode("550 5.7.1 50% OFF"), b"\0\0\0\x14y550 5.7.1 50%% OFF\0"),
        (codec.AddHeader("X-A", "v 1"), b"\0\0\0\x09hX-A\0v 1\0"),
        (codec.AddHeader("X-U", "caf\u00e9"), b"\0\0\0\x0bhX-U\0caf\xc3\xa9\0"),
        (codec.InsertHeader(0, "X-B", "w"), b"\0\0\0\x0bi\0\0\0\0X-B\0w\0"),
        (codec.InsertHeader(0x01020304, "X-B", " folded\n\tvalue"),
         b"\0\0\0\x18i\x01\x02\x03\x04X-B\0 folded\n\tvalue\0"),
        (codec.ChangeHeader(2, "Subject", ""), b"\0\0\0\x0em\0\0\0\x02Subject\0\0"),
        (codec.ChangeHeader(1, "Subject", "[SPAM] hi"), b"\0\0\0\x17m\0\0\0\x01Subject\0[SPAM] hi\0"),
        (codec.Quarantine("held"), b"\0\0\0\x06qheld\0"),
        (codec.Negotiated(6, 0x31, 0x1FF3C0), b"\0\0\0\x0dO\0\0\0\x06\0\0\0\x31\0\x1f\xf3\xc0"),
        (codec.Negotiated(2, 1, 0, ((5, "i"), (0, "j"))),
         b"\0\0\0\x19O\0\0\0\x02\0\0\0\x01\0\0\0\0\0\0\0\x05i\0\0\0\0\0j\0"),
    ],
)
def test_encode_every_reply_type(reply: codec.Response, wire: bytes) -> None:
    assert encode(reply) == wire
    (length,) = struct.unpack("!I", wire[:4])
    assert length == len(wire) - 4  # the length counts the command byte and the data


def test_encode_refuses_what_is_not_a_reply() -> None:
    with pytest.raises(TypeError):
        encode(codec.Abort())  # type: ignore[arg-type]


# -- bounds besides the message size ----------------------------------------------------------------


def test_recipients_beyond_the_bound_are_a_protocol_error() -> None:
    session, _ = negotiated()
    silent(session, MAIL)
    silent(session, *[codec.RcptTo(f"<r{i}@rcpt.test>", ()) for i in range(MAX_RECIPIENTS)])
    with pytest.raises(ProtocolError, match="recipients"):
        session.handle(codec.RcptTo("<one-too-many@rcpt.test>", ()))


def test_distinct_macros_beyond_the_bound_are_a_protocol_error() -> None:
    session, _ = negotiated()
    names = tuple((f"{{m{i}}}", "v") for i in range(MAX_MACROS))
    silent(session, codec.Macros(b"M", names))
    silent(session, codec.Macros(b"M", names))  # the same names again: no growth
    with pytest.raises(ProtocolError, match="macros"):
        session.handle(codec.Macros(b"M", (("{extra}", "v"),)))
