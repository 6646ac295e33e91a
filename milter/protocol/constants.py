"""Milter protocol version 6 constants, as libmilter (mfdef.h) and Postfix (milter8.c) define them.

Names follow libmilter's (`SMFIC_*` commands from the MTA, `SMFIR_*` replies from the filter, `SMFIF_*`
actions, `SMFIP_*` protocol steps) so that the specs and this code read alike.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

VERSION = 6
#: libmilter's default MILTER_MAX_DATA_SIZE: Postfix sends body chunks of at most this size.
CHUNK_SIZE = 65535
#: The largest packet accepted (the SMFIP_MDS_1M size plus room for a header name). Anything larger
#: is a broken or hostile peer: the connection is closed, nothing is buffered for it.
MAX_PACKET = 1024 * 1024 + 4096


# Commands from the MTA.
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# Replies from the filter.
SMFIR_ACCEPT = b"a"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_QUARANTINE = b"q"
SMFIR_REJECT = b"r"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"
SMFIR_OPTNEG = b"O"


class Action(IntFlag):
    """SMFIF_*: what the filter may do to a message at end of message."""

    ADDHDRS = 0x001
    CHGBODY = 0x002
    ADDRCPT = 0x004
    DELRCPT = 0x008
    CHGHDRS = 0x010
    QUARANTINE = 0x020
    CHGFROM = 0x040
    ADDRCPT_PAR = 0x080
    SETSYMLIST = 0x100


class Step(IntFlag):
    """SMFIP_*: protocol steps the MTA may leave out, and replies the filter may leave out."""

    NOCONNECT = 0x000001
    NOHELO = 0x000002
    NOMAIL = 0x000004
    NORCPT = 0x000008
    NOBODY = 0x000010
    NOHDRS = 0x000020
    NOEOH = 0x000040
    NR_HDR = 0x000080
    NOUNKNOWN = 0x000100
    NODATA = 0x000200
    SKIP = 0x000400
    RCPT_REJ = 0x000800
    NR_CONN = 0x001000
    NR_HELO = 0x002000
    NR_MAIL = 0x004000
    NR_RCPT = 0x008000
    NR_DATA = 0x010000
    NR_UNKN = 0x020000
    NR_EOH = 0x040000
    NR_BODY = 0x080000
    HDR_LEADSPC = 0x100000
    MDS_256K = 0x10000000
    MDS_1M = 0x20000000


class Stage(IntEnum):
    """SMFIM_*: where a macro list applies (the index in SMFIR_OPTNEG's symbol lists)."""

    CONNECT = 0
    HELO = 1
    ENVFROM = 2
    ENVRCPT = 3
    DATA = 4
    EOM = 5
    EOH = 6


#: The command whose macros a `SMFIC_MACRO` packet carries, to the stage it belongs to.
MACRO_STAGE: dict[bytes, Stage] = {
    SMFIC_CONNECT: Stage.CONNECT,
    SMFIC_HELO: Stage.HELO,
    SMFIC_MAIL: Stage.ENVFROM,
    SMFIC_RCPT: Stage.ENVRCPT,
    SMFIC_DATA: Stage.DATA,
    SMFIC_BODYEOB: Stage.EOM,
    SMFIC_EOH: Stage.EOH,
}

#: The no-reply flag that lets the filter stay silent after each event command.
NO_REPLY: dict[bytes, Step] = {
    SMFIC_CONNECT: Step.NR_CONN,
    SMFIC_HELO: Step.NR_HELO,
    SMFIC_MAIL: Step.NR_MAIL,
    SMFIC_RCPT: Step.NR_RCPT,
    SMFIC_DATA: Step.NR_DATA,
    SMFIC_UNKNOWN: Step.NR_UNKN,
    SMFIC_HEADER: Step.NR_HDR,
    SMFIC_EOH: Step.NR_EOH,
    SMFIC_BODY: Step.NR_BODY,
}
