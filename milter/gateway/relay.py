"""Downstream delivery: a small pool of connected aiosmtplib clients, reused across messages.

Recipient policy (SMTP DATA has one reply for all recipients): every RCPT is sent before DATA.
* any recipient refused with 4xx, or all refused: RSET, nothing is delivered, and the client gets that
  reply (so a 4xx retries the whole message later: no loss, no duplicate for the others);
* some refused with 5xx, the rest accepted: deliver to the rest and answer 250, naming the refused
  recipients in the reply text (Postfix logs it) and in our log: those addresses do not exist
  downstream, and tempfailing would only bounce the good recipients days later.

A transaction that fails on a reused connection before the downstream's 354 to DATA is retried once on
a fresh one (an idle connection the downstream closed is not a delivery failure; until the 354 not a
byte of the message was sent). Once the 354 came, a failure is a 451: the message may have arrived, and
a duplicate is better than a loss.

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

import aiosmtplib

from milter.errors import DeliveryError
from milter.gateway.logfmt import kv
from milter.gateway.relay_data import DataPayload, send_body, start_data
from milter.gateway.xforward import XForward, advertised

log = logging.getLogger("milter.gateway.relay")

DEFAULT_POOL_SIZE = 64
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\s+")


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
    """Connection-level failure; `before_data` says whether a retry could not duplicate."""

    def __init__(self, cause: BaseException, before_data: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.before_data = before_data


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
                        log.info(kv("downstream_reconnect", reason=type(exc.cause).__name__))
                        continue
                    raise DeliveryError(f"downstream {self.host}:{self.port}: {exc.cause!r}") from exc.cause
                except DeliveryError:
                    await self._recycle(client, reset=True)
                    raise
                await self._recycle(client, reset=False)
                return result
            raise AssertionError("unreachable")
        finally:
            self._slots.release()

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
        try:
            await client.connect()
            await client.ehlo()
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            client.close()
            raise DeliveryError(f"cannot connect to downstream {self.host}:{self.port}: {exc!r}") from exc
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
        data_sent = False
        try:
            utf8 = "SMTPUTF8" in mail_options and client.supports_extension("smtputf8")
            if xforward is not None and not xforward.empty and client.supports_extension("xforward"):
                for args in xforward.commands(advertised(client.esmtp_extensions["xforward"])):
                    resp = await client.execute_command(b"XFORWARD", args)
                    if resp.code != 250:  # metadata only: deliver without it rather than fail
                        log.warning(kv("xforward_refused", code=resp.code, text=resp.message))
            await self._mail(client, mail_from, self._options(client, raw, mail_options), utf8)
            refused = await self._recipients(client, rcpt_tos, utf8)
            # Built before DATA, so that nothing can fail between the 354 and the first byte of the
            # body; usually no copy at all (relay_data: why not `client.data(raw)`).
            payload = DataPayload.encode(raw)
            try:
                await start_data(client)
                # Past the 354 the body goes out and may arrive even if we hear nothing more: no
                # retry of our own from here; a failure is a 451 (the sender's retry may duplicate).
                data_sent = True
                resp = await send_body(client, payload)
            except aiosmtplib.SMTPDataError as exc:
                raise passthrough(exc.code, exc.message, "message") from None
            return Delivered(resp.code, resp.message, refused)
        except (
            aiosmtplib.SMTPServerDisconnected,
            aiosmtplib.SMTPTimeoutError,
            aiosmtplib.SMTPConnectError,
            OSError,
            TimeoutError,
        ) as exc:
            raise _Failed(exc, before_data=not data_sent) from exc

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
            raise passthrough(exc.code, exc.message, "sender") from None

    @staticmethod
    async def _recipients(
        client: aiosmtplib.SMTP, rcpt_tos: Sequence[str], utf8: bool
    ) -> tuple[Refusal, ...]:
        refused: list[Refusal] = []
        for rcpt in rcpt_tos:
            try:
                await client.rcpt(rcpt, encoding="utf-8" if utf8 else "ascii")
            except aiosmtplib.SMTPRecipientRefused as exc:
                refused.append(Refusal(rcpt, exc.code, exc.message))
        temporary = [r for r in refused if r.code < 500]
        if temporary or len(refused) == len(rcpt_tos):
            worst = (temporary or refused)[0]
            raise passthrough(worst.code, worst.text, f"recipient {worst.recipient}")
        return tuple(refused)
