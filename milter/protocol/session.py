"""The filter side of one milter connection, sans-I/O: negotiation, macros, message assembly, replies.

`FilterSession.handle(command)` says what to do next: `Send` these replies now, `Decide` on a complete
message (the I/O layer scans it and answers with `decided(Decision)`), or `Close` the connection.
Nothing here reads a socket or a clock, so every path, including every malformed one, is testable
with plain values (tests/test_milter_protocol.py) and fuzzable at a hundred thousand cases a minute.

What the filter asks of the MTA (`negotiate`): every step it needs (connect, HELO, MAIL, RCPT, headers,
body, end of message), none it does not (DATA, end of headers, unknown commands), no reply to any
step before end of message (the gateway decides once, on the whole message; with Postfix that saves a
round trip per header), header values with their leading space (so the message is rebuilt byte for
byte), and the actions it uses: add and change headers, quarantine. Whatever the MTA does not offer
is left out, and `decided` drops edits the MTA did not allow rather than break the protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from milter.protocol import codec
from milter.protocol import constants as c
from milter.protocol.codec import ProtocolError

WANTED_ACTIONS = c.Action.ADDHDRS | c.Action.CHGHDRS | c.Action.QUARANTINE
SKIPPED_STEPS = c.Step.NODATA | c.Step.NOEOH | c.Step.NOUNKNOWN
NO_REPLIES = (
    c.Step.NR_CONN | c.Step.NR_HELO | c.Step.NR_MAIL | c.Step.NR_RCPT | c.Step.NR_DATA
    | c.Step.NR_UNKN | c.Step.NR_EOH | c.Step.NR_HDR | c.Step.NR_BODY
)
#: Macros the gateway reads, per stage (Postfix's defaults send more; asking for fewer saves bytes).
#: `i` is the queue id, known to Postfix from the first accepted RCPT on; `{auth_authen}` marks a
#: client that authenticated (our own user).
WANTED_MACROS: tuple[tuple[c.Stage, str], ...] = (
    (c.Stage.CONNECT, "j {daemon_name}"),
    (c.Stage.ENVFROM, "i {auth_type} {auth_authen}"),
    (c.Stage.ENVRCPT, "i"),
    (c.Stage.EOM, "i"),
)

#: Bounds on what a connection may make us keep besides the message (which server.max_message_size
#: bounds): far above what an MTA sends (Postfix: smtpd_recipient_limit 1000, a few dozen macros).
MAX_RECIPIENTS = 10_000
MAX_MACROS = 1_000

Edit = codec.AddHeader | codec.InsertHeader | codec.ChangeHeader | codec.Quarantine
Final = codec.Reply | codec.ReplyCode

_EDIT_NEEDS: dict[type, c.Action] = {
    codec.AddHeader: c.Action.ADDHDRS,
    codec.InsertHeader: c.Action.ADDHDRS,
    codec.ChangeHeader: c.Action.CHGHDRS,
    codec.Quarantine: c.Action.QUARANTINE,
}


@dataclass(frozen=True)
class Message:
    """One message as the MTA passed it to the filter."""

    macros: Mapping[str, str]
    connect: codec.Connect | None
    helo: str | None
    mail_from: codec.MailFrom
    rcpts: tuple[codec.RcptTo, ...]
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    size: int  # bytes received, also past the limit
    too_big: bool  # the size limit cut in: headers or body were not all kept
    leading_space: bool  # header values carry the space after the colon (SMFIP_HDR_LEADSPC)
    actions: c.Action = WANTED_ACTIONS  # what the MTA lets the filter do at end of message

    def raw(self) -> bytes:
        """The message rebuilt from headers and body as the MTA passed them (CRLF line endings)."""
        lines = []
        for name, value in self.headers:
            if not self.leading_space and value:
                value = b" " + value  # the MTA stripped it; one space is what nearly every sender wrote
            lines.append(name + b":" + _crlf(value) + b"\r\n")
        return b"".join(lines) + b"\r\n" + self.body


def _crlf(value: bytes) -> bytes:
    # Folded header values come with bare LF (Postfix) or CRLF (sendmail) between their lines.
    return value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@dataclass(frozen=True)
class Decision:
    """The filter's answer to one message: edits first, then the final reply."""

    final: Final
    edits: tuple[Edit, ...] = ()


@dataclass(frozen=True)
class Send:
    replies: tuple[codec.Response, ...] = ()


@dataclass(frozen=True)
class Decide:
    message: Message


@dataclass(frozen=True)
class Close:
    reason: str


Outcome = Send | Decide | Close
NOTHING = Send()


@dataclass
class _Transaction:
    mail_from: codec.MailFrom | None = None
    rcpts: list[codec.RcptTo] = field(default_factory=list)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    size: int = 0
    too_big: bool = False
    content: bool = False  # a header or body chunk came: the MTA is streaming the message


class FilterSession:
    """One connection's protocol state. `max_size` bounds what is kept of a message (0: no limit)."""

    def __init__(self, max_size: int = 0, macros: tuple[tuple[c.Stage, str], ...] = WANTED_MACROS) -> None:
        self._max_size = max_size
        self._want_macros = macros
        self.actions = c.Action(0)
        self.steps = c.Step(0)
        self.version = 0
        self._negotiated = False
        self._silent: frozenset[bytes] = frozenset()  # commands the MTA expects no reply to
        self._deciding = False
        self._conn_macros: dict[str, str] = {}
        self._msg_macros: dict[str, str] = {}
        self._connect: codec.Connect | None = None
        self._helo: str | None = None
        self._tx = _Transaction()

    # -- negotiation -------------------------------------------------------------------------------

    def _negotiate(self, offer: codec.OptNeg) -> codec.Negotiated:
        if offer.version < 2:
            raise ProtocolError(f"milter protocol version {offer.version} is too old (need 2 or later)")
        offered_actions = c.Action(offer.actions & 0x1FF)
        offered_steps = c.Step(offer.steps & int(_ALL_STEPS))
        self.version = min(offer.version, c.VERSION)
        self.actions = WANTED_ACTIONS & offered_actions
        self.steps = (SKIPPED_STEPS | NO_REPLIES | c.Step.HDR_LEADSPC) & offered_steps
        macros: tuple[tuple[int, str], ...] = ()
        if c.Action.SETSYMLIST in offered_actions and self._want_macros:
            self.actions |= c.Action.SETSYMLIST
            macros = tuple((int(stage), names) for stage, names in self._want_macros)
        self._negotiated = True
        # Worked out once: a Flag membership test per header and body chunk cost more than the rest
        # of the command's handling.
        self._silent = frozenset(cmd for cmd, step in c.NO_REPLY.items() if step in self.steps)
        return codec.Negotiated(self.version, int(self.actions), int(self.steps), macros)

    # -- events ------------------------------------------------------------------------------------

    def handle(self, command: codec.Command) -> Outcome:
        """The next step after one command from the MTA. Raises ProtocolError for a broken peer."""
        if self._deciding:
            # Only an abort or a close may overtake a pending decision (the MTA gave up waiting).
            if isinstance(command, codec.Abort | codec.Quit):
                self._deciding = False
            else:
                raise ProtocolError(f"{type(command).__name__} while a message is being decided")
        if isinstance(command, codec.OptNeg):
            return Send((self._negotiate(command),))
        if not self._negotiated:
            raise ProtocolError(f"{type(command).__name__} before option negotiation")
        match command:
            # The commands of every message first: `match` tries the class patterns in order.
            case codec.Header(name, value):
                self._require_mail("header")
                self._tx.content = True
                if self._keep(len(name) + len(value) + 4):
                    self._tx.headers.append((name, value))
                return self._ack(c.SMFIC_HEADER)
            case codec.Body(chunk):
                self._require_mail("body")
                self._tx.content = True
                self._add_body(chunk)
                return self._ack(c.SMFIC_BODY)
            case codec.Macros(stage, values):
                target = self._conn_macros if stage in (c.SMFIC_CONNECT, c.SMFIC_HELO) else self._msg_macros
                target.update(values)
                if len(target) > MAX_MACROS:  # distinct names: an MTA sends a few dozen at most
                    raise ProtocolError(f"more than {MAX_MACROS} distinct macros")
                return NOTHING
            case codec.Connect():
                self._reset_connection(keep_macros=True)  # this connection's macros came just before it
                self._connect = command
                return self._ack(c.SMFIC_CONNECT)
            case codec.Helo(name):
                self._helo = name
                return self._ack(c.SMFIC_HELO)
            case codec.MailFrom():
                self._reset_message(keep_macros=True)
                self._tx.mail_from = command
                return self._ack(c.SMFIC_MAIL)
            case codec.RcptTo():
                self._require_mail("RCPT")
                if len(self._tx.rcpts) >= MAX_RECIPIENTS:
                    raise ProtocolError(f"more than {MAX_RECIPIENTS} recipients")
                self._tx.rcpts.append(command)
                return self._ack(c.SMFIC_RCPT)
            case codec.Data():
                return self._ack(c.SMFIC_DATA)
            case codec.EndOfHeaders():
                return self._ack(c.SMFIC_EOH)
            case codec.EndOfMessage(chunk):
                self._require_mail("end of message")
                self._add_body(chunk)
                self._deciding = True
                return Decide(self._message())
            case codec.Abort():
                self._reset_message(keep_macros=False)
                return NOTHING
            case codec.Quit(new_connection):
                if new_connection:
                    self._reset_connection(keep_macros=False)
                    return NOTHING
                return Close("quit")
            case codec.Unknown():
                return self._ack(c.SMFIC_UNKNOWN)
        raise ProtocolError(f"unexpected command {command!r}")

    @property
    def streaming(self) -> bool:
        """Between a message's first header (or body chunk) and its end: the MTA sends these from its
        queue file one after the other, so a pause here is a stalled peer, not a slow SMTP client."""
        return self._tx.content

    def decided(self, decision: Decision) -> tuple[codec.Response, ...]:
        """The replies for a decision on the message last handed out by `Decide`; the next may start."""
        if not self._deciding:
            raise ProtocolError("a decision without a message waiting for one")
        self._deciding = False
        self._reset_message(keep_macros=False)
        edits = tuple(e for e in decision.edits if _EDIT_NEEDS[type(e)] in self.actions)
        return (*edits, decision.final)

    def dropped_edits(self, decision: Decision) -> tuple[Edit, ...]:
        """The edits of `decision` that the MTA did not allow (for the caller's log)."""
        return tuple(e for e in decision.edits if _EDIT_NEEDS[type(e)] not in self.actions)

    # -- helpers -----------------------------------------------------------------------------------

    def _ack(self, command: bytes) -> Send:
        if command in self._silent:
            return NOTHING
        return Send((codec.CONTINUE,))

    def _require_mail(self, what: str) -> None:
        if self._tx.mail_from is None:
            raise ProtocolError(f"{what} before MAIL FROM")

    def _keep(self, size: int) -> bool:
        tx = self._tx
        tx.size += size
        if self._max_size and tx.size > self._max_size:
            tx.too_big = True
        return not tx.too_big

    def _add_body(self, chunk: bytes) -> None:
        if chunk and self._keep(len(chunk)):
            self._tx.body += chunk

    def _message(self) -> Message:
        tx = self._tx
        assert tx.mail_from is not None
        return Message(
            macros=MappingProxyType({**self._conn_macros, **self._msg_macros}),
            connect=self._connect,
            helo=self._helo,
            mail_from=tx.mail_from,
            rcpts=tuple(tx.rcpts),
            headers=tuple(tx.headers),
            body=bytes(tx.body),
            size=tx.size,
            too_big=tx.too_big,
            leading_space=c.Step.HDR_LEADSPC in self.steps,
            actions=self.actions,
        )

    def _reset_message(self, keep_macros: bool) -> None:
        macros = self._msg_macros if keep_macros else {}
        self._tx = _Transaction()
        self._msg_macros = macros

    def _reset_connection(self, keep_macros: bool) -> None:
        if not keep_macros:
            self._conn_macros = {}
        self._connect = None
        self._helo = None
        self._reset_message(keep_macros=False)


_ALL_STEPS = c.Step(0x1FFFFF) | c.Step.MDS_256K | c.Step.MDS_1M
