"""Downstream delivery: a small pool of connected aiosmtplib clients, reused across messages.

Recipient policy (SMTP DATA has one reply for all recipients): every RCPT is sent before DATA.
* any recipient refused with 4xx, or all refused: RSET, nothing is delivered, and the client gets that
  reply (so a 4xx retries the whole message later: no loss, no duplicate for the others);
* some refused with 5xx, the rest accepted: deliver to the rest and answer 250, naming the refused
  recipients in the reply text (Postfix logs it) and in our log: those addresses do not exist
  downstream, and tempfailing would only bounce the good recipients days later. The sending MTA
  takes the 250 for every recipient, so the gateway reports the refused ones to the sender itself
  (milter.gateway.dsn, sent by process.py before it answers).

A transaction that fails on a reused connection before the downstream's 354 to DATA is retried once on
a fresh one (an idle connection the downstream closed is not a delivery failure; until the 354 not a
byte of the message was sent). Once the 354 came, a failure is a 451: the message may have arrived, and
a duplicate is better than a loss.

A reply that is not SMTP (`garbled`: no reply code, a line or reply over aiosmtplib's limits, a code
outside 4xx/5xx where a refusal was read) is never passed back: it becomes DownstreamProtocolError, a
451, and the connection is closed like a lost one (what the downstream took from it is unknown), with
the same retry rule at the 354. Any other exception inside a transaction also closes the connection
and goes on to process.py, which answers 451: no connection in an unknown state goes back to the pool.

An address that is not ASCII needs SMTPUTF8 (RFC 6531) on both hops. When the client did not ask for it or
the downstream does not offer it, the relay sends nothing for that address: a non-ASCII sender is
553 5.6.7 for the message, a non-ASCII recipient a 553 5.6.7 refusal of that recipient (the others are
delivered, as for any 5xx refusal). A 4xx would only make the sender retry for days what this downstream
can never take (RFC 6531 section 3.5 asks for the 5.6.7 reply).

DATA itself goes through milter.gateway.relay_data rather than aiosmtplib's `SMTP.data()`, whose
per-line regex passes cost hundreds of MiB and a second of event loop on a message of many short lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeGuard

import aiosmtplib
from aiosmtplib.typing import SMTPStatus

from milter.errors import DeliveryError, DownstreamProtocolError
from milter.gateway.logfmt import kv
from milter.gateway.relay_data import DataPayload, send_body, start_data
from milter.gateway.xforward import XForward, advertised

log = logging.getLogger("milter.gateway.relay")

DEFAULT_POOL_SIZE = 64
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\s+")
#: The step after the 354: a failure from here on may follow a delivered message (no retry).
AFTER_354 = "end of data"
#: RFC 3463 / RFC 6531: "non-ASCII addresses not permitted for that sender/recipient".
NO_UTF8_STATUS = "5.6.7"
NO_UTF8_RECIPIENT = f"{NO_UTF8_STATUS} Non-ASCII recipient address not accepted downstream (no SMTPUTF8)"
BAD_UTF8_RECIPIENT = f"{NO_UTF8_STATUS} Recipient address is not valid UTF-8"


def needed_options(raw: bytes, mail_from: str, rcpt_tos: Sequence[str]) -> tuple[str, ...]:
    """The MAIL parameters a message we send on our own needs (a release from the quarantine, a
    delivery report): SMTPUTF8 when an envelope address is not ASCII (RFC 6531), BODY=8BITMIME when the
    bytes are not 7-bit (RFC 6152). `Downstream.deliver` sends each only where the downstream offers it."""
    options = []
    if not all(address.isascii() for address in (mail_from, *rcpt_tos)):
        options.append("SMTPUTF8")
    if not raw.isascii():
        options.append("BODY=8BITMIME")
    return tuple(options)


def bad_utf8(address: str) -> bool:
    """An address whose bytes were not UTF-8 (aiosmtpd keeps them as surrogate escapes): it cannot be
    sent as SMTPUTF8, and before this check each try failed on the encoding with a 451, forever."""
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
#: How much of an invalid reply goes into the error (and so into the relay_failed log line).
_QUOTED = 100


@dataclass(frozen=True)
class Refusal:
    recipient: str
    code: int
    text: str


@dataclass(frozen=True)
class Delivered:
    """Downstream accepted the message for all recipients but `refused` (all 5xx)."""

    code: int
    text: str
    refused: tuple[Refusal, ...] = ()

    @property
    def reply(self) -> str:
        first = self.text.splitlines()[0] if self.text else "Ok"
        if not self.refused:
            return f"{self.code} {first}"
        names = ", ".join(f"<{r.recipient}> ({r.code})" for r in self.refused[:5])
        return f"{self.code} 2.0.0 Ok: delivered except refused {names}"


def garbled(exc: BaseException) -> TypeGuard[aiosmtplib.SMTPResponseException]:
    """Whether an aiosmtplib error is a reply that is not SMTP, rather than a refusal to pass back.

    aiosmtplib raises a bare SMTPResponseException with code -1 for a line it cannot parse (no number,
    over 8192 bytes, a reply over 32 KiB); it reads a code with `int()` of a line's first three bytes,
    so "25 ok" is code 25; and its refusal errors carry whatever came where another code was due (a
    250 to DATA, a 354 to MAIL). Only a 4xx or a 5xx is a refusal: passing back anything else could
    tell the client "delivered" for a message the downstream never got, or send it no SMTP at all."""
    return isinstance(exc, aiosmtplib.SMTPResponseException) and not 400 <= exc.code <= 599


def _what_came(exc: aiosmtplib.SMTPResponseException) -> str:
    # aiosmtplib's parse errors quote the offending line themselves; otherwise the code it read
    text = exc.message if exc.code == SMTPStatus.invalid_response else f"reply code {exc.code}: {exc.message}"
    return repr(text[:_QUOTED])


def passthrough(code: int, text: str, what: str) -> DeliveryError:
    """A downstream's error reply as our reply: same code and enhanced status, first line only.
    421 becomes 451: the downstream closing its channel is not us closing ours."""
    code = 451 if code == 421 else code
    first = (text.splitlines() or [""])[0]
    m = _ENHANCED.match(first)
    if m and m.group(1) == str(code)[0]:
        status, rest = first[: m.end()].strip(), first[m.end() :]
    else:
        status, rest = f"{str(code)[0]}.0.0", first
    return DeliveryError(f"downstream refused {what}: {code} {first}", code, status, rest or "Refused")


class _Failed(Exception):
    """A transaction failed with its connection in an unknown state (lost, timed out, or a reply that is
    not SMTP) at `stage`; `before_data`: before the 354, so a retry cannot duplicate the message."""

    def __init__(self, cause: BaseException, stage: str) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.stage = stage

    @property
    def before_data(self) -> bool:
        return self.stage != AFTER_354


class Downstream:
    """Pool of up to `size` connections to host:port; `deliver` is safe to call concurrently."""

    def __init__(
        self, host: str, port: int, timeout: float, local_hostname: str, size: int = DEFAULT_POOL_SIZE
    ) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._local_hostname = local_hostname
        self._slots = asyncio.Semaphore(size)
        self._idle: list[aiosmtplib.SMTP] = []

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.quit(), 2)
            client.close()

    async def deliver(
        self,
        raw: bytes,
        mail_from: str,
        rcpt_tos: Sequence[str],
        mail_options: Sequence[str] = (),
        xforward: XForward | None = None,
    ) -> Delivered:
        """Deliver or raise DeliveryError carrying the reply the client should get."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise DeliveryError("no free downstream connection in time") from None
        try:
            for attempt in (1, 2):
                client, reused = await self._checkout()
                try:
                    result = await self._transaction(client, raw, mail_from, rcpt_tos, mail_options, xforward)
                except _Failed as exc:
                    client.close()
                    if reused and exc.before_data and attempt == 1:
                        log.info(kv("downstream_reconnect", stage=exc.stage, reason=type(exc.cause).__name__,
                                    detail=str(self._failure(exc.cause, exc.stage))))
                        continue
                    raise self._failure(exc.cause, exc.stage) from exc.cause
                except DeliveryError:
                    await self._recycle(client, reset=True)
                    raise
                except BaseException:
                    # A bug, or the task cancelled: where the downstream stands is unknown, so the
                    # connection is closed, never pooled; process.py answers 451 and logs the traceback.
                    client.close()
                    raise
                await self._recycle(client, reset=False)
                return result
            raise AssertionError("unreachable")
        finally:
            self._slots.release()

    def _failure(self, cause: BaseException, stage: str) -> DeliveryError:
        """The 451 for a failed step; its text (logged as relay_failed) names the downstream, the step,
        and for a reply that is not SMTP what came."""
        where = f"downstream {self.host}:{self.port}"
        if garbled(cause):
            return DownstreamProtocolError(f"{where} sent an invalid reply at {stage}: {_what_came(cause)}")
        return DeliveryError(f"{where} at {stage}: {cause!r}")

    async def _checkout(self) -> tuple[aiosmtplib.SMTP, bool]:
        while self._idle:
            client = self._idle.pop()
            if client.is_connected:
                return client, True
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            timeout=self.timeout,
            local_hostname=self._local_hostname,
            start_tls=False,
        )
        stage = "greeting"
        try:
            await client.connect()
            stage = "EHLO"
            await client.ehlo()
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            client.close()
            if garbled(exc):
                raise self._failure(exc, stage) from exc
            raise DeliveryError(f"cannot connect to downstream {self.host}:{self.port}: {exc!r}") from exc
        except BaseException:
            client.close()  # a bug or a cancel: no half-open connection left behind
            raise
        return client, False

    async def _recycle(self, client: aiosmtplib.SMTP, reset: bool) -> None:
        """Back to the pool; after a refused transaction RSET first, so the next one starts clean."""
        if reset:
            try:
                await client.rset()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()
                return
        if client.is_connected:
            self._idle.append(client)

    async def _transaction(
        self,
        client: aiosmtplib.SMTP,
        raw: bytes,
        mail_from: str,
        rcpt_tos: Sequence[str],
        mail_options: Sequence[str],
        xforward: XForward | None,
    ) -> Delivered:
        stage = "XFORWARD"
        try:
            utf8 = "SMTPUTF8" in mail_options and client.supports_extension("smtputf8")
            if bad_utf8(mail_from):
                raise DeliveryError(f"sender {mail_from!r} is not valid UTF-8", 553, NO_UTF8_STATUS,
                                    "Sender address is not valid UTF-8")
            if not utf8 and not mail_from.isascii():
                raise DeliveryError(
                    f"non-ASCII sender {mail_from!r} and {self._no_utf8(mail_options)}",
                    553,
                    NO_UTF8_STATUS,
                    "Non-ASCII sender address not accepted downstream (no SMTPUTF8)",
                )
            await self._xforward(client, xforward)
            stage = "MAIL"
            await self._mail(client, mail_from, self._options(client, raw, mail_options), utf8)
            stage = "RCPT"
            refused = await self._recipients(client, rcpt_tos, utf8)
            # Built before DATA, so that nothing can fail between the 354 and the first byte of the
            # body; usually no copy at all (relay_data: why not `client.data(raw)`).
            payload = DataPayload.encode(raw)
            try:
                stage = "DATA"
                await start_data(client)
                # Past the 354 the body goes out and may arrive even if we hear nothing more: no
                # retry of our own from here; a failure is a 451 (the sender's retry may duplicate).
                stage = AFTER_354
                resp = await send_body(client, payload)
            except aiosmtplib.SMTPDataError as exc:
                if garbled(exc):
                    raise
                raise passthrough(exc.code, exc.message, "message") from None
            return Delivered(resp.code, resp.message, refused)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # Lost, timed out, a reply that is not SMTP, or an aiosmtplib error not met before: the
            # refusals to pass back were taken above, so whatever this is, this connection is done.
            raise _Failed(exc, stage) from exc

    @staticmethod
    def _no_utf8(mail_options: Sequence[str]) -> str:
        if "SMTPUTF8" not in mail_options:
            return "the client did not ask for SMTPUTF8"
        return "the downstream does not offer SMTPUTF8"

    @staticmethod
    async def _xforward(client: aiosmtplib.SMTP, xforward: XForward | None) -> None:
        if xforward is None or xforward.empty or not client.supports_extension("xforward"):
            return
        for args in xforward.commands(advertised(client.esmtp_extensions["xforward"])):
            resp = await client.execute_command(b"XFORWARD", args)
            if not 200 <= resp.code <= 599:  # `execute_command` checks no code: "25 ok" is code 25
                raise aiosmtplib.SMTPResponseException(resp.code, resp.message)
            if resp.code != 250:  # metadata only: deliver without it rather than fail
                log.warning(kv("xforward_refused", code=resp.code, text=resp.message))

    @staticmethod
    def _options(client: aiosmtplib.SMTP, raw: bytes, mail_options: Sequence[str]) -> list[str]:
        opts = []
        if client.supports_extension("size"):
            opts.append(f"SIZE={len(raw)}")
        if "BODY=8BITMIME" in mail_options and client.supports_extension("8bitmime"):
            opts.append("BODY=8BITMIME")
        if "SMTPUTF8" in mail_options and client.supports_extension("smtputf8"):
            opts.append("SMTPUTF8")
        return opts

    @staticmethod
    async def _mail(client: aiosmtplib.SMTP, mail_from: str, options: list[str], utf8: bool) -> None:
        try:
            await client.mail(mail_from, options=options, encoding="utf-8" if utf8 else "ascii")
        except aiosmtplib.SMTPSenderRefused as exc:
            if garbled(exc):
                raise  # not a refusal (`_transaction` ends the connection)
            raise passthrough(exc.code, exc.message, "sender") from None

    @staticmethod
    async def _recipients(
        client: aiosmtplib.SMTP, rcpt_tos: Sequence[str], utf8: bool
    ) -> tuple[Refusal, ...]:
        refused: list[Refusal] = []
        for rcpt in rcpt_tos:
            if bad_utf8(rcpt):
                refused.append(Refusal(rcpt, 553, BAD_UTF8_RECIPIENT))
                continue
            if not utf8 and not rcpt.isascii():
                refused.append(Refusal(rcpt, 553, NO_UTF8_RECIPIENT))
                continue
            try:
                await client.rcpt(rcpt, encoding="utf-8" if utf8 else "ascii")
            except aiosmtplib.SMTPRecipientRefused as exc:
                if garbled(exc):
                    raise  # not a refusal: a "999" is no 5xx to deliver around (`_transaction`)
                refused.append(Refusal(rcpt, exc.code, exc.message))
        temporary = [r for r in refused if r.code < 500]
        if temporary or len(refused) == len(rcpt_tos):
            worst = (temporary or refused)[0]
            raise passthrough(worst.code, worst.text, f"recipient {worst.recipient}")
        return tuple(refused)
