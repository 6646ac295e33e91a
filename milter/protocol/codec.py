"""Milter packets: framing, the MTA's commands as typed values, the filter's replies as bytes.

Sans-I/O: `Decoder.feed(bytes)` returns the complete commands in what arrived so far and keeps the
rest; `encode(reply)` returns the bytes to write. A packet is a 4-byte big-endian length (command
byte included), the command byte and its data. Anything malformed raises `ProtocolError` (a
`MilterError`): the caller logs it and closes the connection, since a milter stream cannot resync.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from milter.errors import MilterError
from milter.protocol import constants as c

_LEN = struct.Struct("!I")
_OPTNEG = struct.Struct("!III")


class ProtocolError(MilterError):
    """The peer broke the milter protocol (bad length, unknown command, malformed data, bad order)."""


# -- commands from the MTA --------------------------------------------------------------------------


@dataclass(frozen=True)
class OptNeg:
    version: int
    actions: int
    steps: int


@dataclass(frozen=True)
class Macros:
    stage: bytes  # the command these macros go with (SMFIC_CONNECT, ...)
    values: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Connect:
    hostname: str
    family: str  # "4", "6", "L" (unix socket) or "U" (unknown)
    port: int | None
    address: str | None


@dataclass(frozen=True)
class Helo:
    name: str


@dataclass(frozen=True)
class MailFrom:
    address: str  # as the MTA sent it, usually "<a@b>"
    params: tuple[str, ...]


@dataclass(frozen=True)
class RcptTo:
    address: str
    params: tuple[str, ...]


@dataclass(frozen=True)
class Data:
    pass


@dataclass(frozen=True)
class Header:
    name: bytes
    value: bytes  # bytes: header values may be 8-bit; they are stored exactly as received


@dataclass(frozen=True)
class EndOfHeaders:
    pass


@dataclass(frozen=True)
class Body:
    chunk: bytes


@dataclass(frozen=True)
class EndOfMessage:
    chunk: bytes  # libmilter allows a last body piece in SMFIC_BODYEOB; Postfix sends none


@dataclass(frozen=True)
class Abort:
    pass


@dataclass(frozen=True)
class Quit:
    new_connection: bool  # SMFIC_QUIT_NC: the MTA reuses this connection for another SMTP session


@dataclass(frozen=True)
class Unknown:
    command: bytes


Command = (
    OptNeg | Macros | Connect | Helo | MailFrom | RcptTo | Data | Header | EndOfHeaders | Body
    | EndOfMessage | Abort | Quit | Unknown
)


def _strings(data: bytes, what: str) -> list[bytes]:
    """NUL-terminated strings; the last must be terminated too."""
    if not data.endswith(b"\0"):
        raise ProtocolError(f"{what}: string not NUL-terminated")
    return data[:-1].split(b"\0")


def _text(raw: bytes) -> str:
    # Envelope and host strings are ASCII in practice (SMTPUTF8 allows UTF-8); never fail on them.
    return raw.decode("utf-8", "surrogateescape")


def _optneg(data: bytes) -> OptNeg:
    if len(data) < _OPTNEG.size:
        raise ProtocolError(f"option negotiation: {len(data)} bytes, need {_OPTNEG.size}")
    version, actions, steps = _OPTNEG.unpack_from(data)
    return OptNeg(version, actions, steps)


def _macros(data: bytes) -> Macros:
    if not data:
        raise ProtocolError("macro packet without a command code")
    stage, rest = data[:1], data[1:]
    if not rest:
        return Macros(stage, ())
    items = _strings(rest, "macros")
    if len(items) % 2:
        raise ProtocolError("macros: a name without a value")
    names, values = items[0::2], items[1::2]
    return Macros(stage, tuple((_text(n), _text(v)) for n, v in zip(names, values, strict=True)))


def _connect(data: bytes) -> Connect:
    host, sep, rest = data.partition(b"\0")
    if not sep or not rest:
        raise ProtocolError("connect: no host name or family")
    family = chr(rest[0])
    if family == "U":
        return Connect(_text(host), family, None, None)
    if family not in "46L" or len(rest) < 3:
        raise ProtocolError(f"connect: bad family {family!r}")
    (port,) = struct.unpack_from("!H", rest, 1)
    address = _strings(rest[3:], "connect address")
    if len(address) != 1:
        raise ProtocolError("connect: trailing data after the address")
    return Connect(_text(host), family, port, _text(address[0]))


def _envelope(data: bytes, what: str) -> tuple[str, tuple[str, ...]]:
    args = _strings(data, what)
    return _text(args[0]), tuple(_text(a) for a in args[1:])


def _header(data: bytes) -> Header:
    parts = _strings(data, "header")
    if len(parts) != 2 or not parts[0]:
        raise ProtocolError("header: expected a name and a value")
    return Header(parts[0], parts[1])


def _single(data: bytes, what: str) -> bytes:
    parts = _strings(data, what)
    if len(parts) != 1:
        raise ProtocolError(f"{what}: expected one string")
    return parts[0]


def _empty(data: bytes, value: Command, what: str) -> Command:
    if data:
        raise ProtocolError(f"{what}: unexpected data")
    return value


def parse(code: bytes, data: bytes) -> Command:
    """One packet's command byte and data as a typed command."""
    match code:
        case c.SMFIC_OPTNEG:
            return _optneg(data)
        case c.SMFIC_MACRO:
            return _macros(data)
        case c.SMFIC_CONNECT:
            return _connect(data)
        case c.SMFIC_HELO:
            return Helo(_text(_single(data, "helo")))
        case c.SMFIC_MAIL:
            return MailFrom(*_envelope(data, "mail"))
        case c.SMFIC_RCPT:
            return RcptTo(*_envelope(data, "rcpt"))
        case c.SMFIC_DATA:
            return _empty(data, Data(), "data")
        case c.SMFIC_HEADER:
            return _header(data)
        case c.SMFIC_EOH:
            return _empty(data, EndOfHeaders(), "end of headers")
        case c.SMFIC_BODY:
            return Body(data)
        case c.SMFIC_BODYEOB:
            return EndOfMessage(data)
        case c.SMFIC_ABORT:
            return _empty(data, Abort(), "abort")
        case c.SMFIC_QUIT:
            return _empty(data, Quit(False), "quit")
        case c.SMFIC_QUIT_NC:
            return _empty(data, Quit(True), "quit_nc")
        case c.SMFIC_UNKNOWN:
            return Unknown(data.rstrip(b"\0"))
    raise ProtocolError(f"unknown command {code!r}")


class Decoder:
    """Splits a byte stream into commands. Buffers at most one packet of up to `max_packet` bytes."""

    def __init__(self, max_packet: int = c.MAX_PACKET) -> None:
        self._buf = bytearray()
        self._max = max_packet

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Command]:
        buf = self._buf
        buf += data
        out: list[Command] = []
        pos = 0
        while len(buf) - pos >= 4:
            (size,) = _LEN.unpack_from(buf, pos)
            if size == 0 or size > self._max:
                # Checked before waiting for the data: a length of 2**32-1 must not make us buffer 4 GiB.
                raise ProtocolError(f"packet length {size} outside 1..{self._max}")
            end = pos + 4 + size
            if len(buf) < end:
                break
            out.append(parse(bytes(buf[pos + 4 : pos + 5]), bytes(buf[pos + 5 : end])))
            pos = end
        del buf[:pos]
        return out


# -- replies from the filter ------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A reply without data: continue, accept, discard, reject, tempfail, progress."""

    code: bytes


CONTINUE = Reply(c.SMFIR_CONTINUE)
ACCEPT = Reply(c.SMFIR_ACCEPT)
DISCARD = Reply(c.SMFIR_DISCARD)
REJECT = Reply(c.SMFIR_REJECT)
TEMPFAIL = Reply(c.SMFIR_TEMPFAIL)
PROGRESS = Reply(c.SMFIR_PROGRESS)


@dataclass(frozen=True)
class ReplyCode:
    """SMFIR_REPLYCODE: the SMTP reply the MTA gives (4xx tempfails, 5xx rejects)."""

    text: str  # "550 5.7.1 Message rejected"


@dataclass(frozen=True)
class AddHeader:
    name: str
    value: str


@dataclass(frozen=True)
class InsertHeader:
    index: int  # 0: above every header the filter was shown
    name: str
    value: str


@dataclass(frozen=True)
class ChangeHeader:
    index: int  # 1-based among the fields of this name; an empty value deletes the field
    name: str
    value: str


@dataclass(frozen=True)
class Quarantine:
    reason: str


@dataclass(frozen=True)
class Negotiated:
    """SMFIR_OPTNEG: what the filter takes of the MTA's offer, and the macros it wants per stage."""

    version: int
    actions: int
    steps: int
    macros: tuple[tuple[int, str], ...] = ()


Response = Reply | ReplyCode | AddHeader | InsertHeader | ChangeHeader | Quarantine | Negotiated


def _packet(code: bytes, data: bytes = b"") -> bytes:
    return _LEN.pack(len(data) + 1) + code + data


def _z(text: str) -> bytes:
    # A NUL inside would end the string early and shift every field after it.
    return text.replace("\0", " ").encode("utf-8", "surrogateescape") + b"\0"


def encode(reply: Response) -> bytes:
    match reply:
        case Reply(code):
            return _packet(code)
        case ReplyCode(text):
            # The MTA reads the text as a format: Postfix's milter8 turns "%%" into "%" and drops a lone
            # "%", and sendmail ignores a text with one. A reason quoting the message ("100% OFF") must
            # reach the sender as written.
            return _packet(c.SMFIR_REPLYCODE, _z(text.replace("%", "%%")))
        case AddHeader(name, value):
            return _packet(c.SMFIR_ADDHEADER, _z(name) + _z(value))
        case InsertHeader(index, name, value):
            return _packet(c.SMFIR_INSHEADER, _LEN.pack(index) + _z(name) + _z(value))
        case ChangeHeader(index, name, value):
            return _packet(c.SMFIR_CHGHEADER, _LEN.pack(index) + _z(name) + _z(value))
        case Quarantine(reason):
            return _packet(c.SMFIR_QUARANTINE, _z(reason))
        case Negotiated(version, actions, steps, macros):
            lists = b"".join(_LEN.pack(stage) + _z(names) for stage, names in macros)
            return _packet(c.SMFIR_OPTNEG, _OPTNEG.pack(version, actions, steps) + lists)
    raise TypeError(f"not a milter reply: {reply!r}")
