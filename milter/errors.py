"""One error hierarchy, mapped to SMTP replies in one place (`smtp_reply`).

Every failure the gateway can meet is one of these classes; the front ends never invent reply codes.
"""

from __future__ import annotations


class MilterError(Exception):
    """Base of every error this package raises on purpose."""

    #: SMTP reply for a message that hit this error (code, enhanced status, text).
    smtp_code: int = 451
    smtp_status: str = "4.3.0"
    smtp_text: str = "Internal error, try again later"


class ConfigError(MilterError):
    """Broken configuration; the message names the offending key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config key {key!r}: {problem}")
        self.key = key
        self.problem = problem


class ModelError(MilterError):
    """Model missing, corrupt, or failing at inference."""

    smtp_text = "Content scanner unavailable, try again later"


class SchemaMismatchError(ModelError):
    """A model trained for another feature schema than the code computes; refused at load."""


class ScanError(MilterError):
    """Parsing or feature extraction failed in a way that is not a property of the message."""


class ScanTimeout(ScanError):
    """A message's scan passed server.scan_timeout; policy.on_error decides what the message gets."""

    smtp_text = "Scan took too long, try again later"


class DeliveryError(MilterError):
    """Downstream relay unreachable, timed out, or answered with an error."""

    smtp_status = "4.4.1"
    smtp_text = "Downstream relay unavailable, try again later"

    def __init__(self, message: str, code: int = 451, status: str = "4.4.1", text: str | None = None) -> None:
        super().__init__(message)
        self.smtp_code = code
        self.smtp_status = status
        if text is not None:
            self.smtp_text = text


class DownstreamProtocolError(DeliveryError):
    """The downstream's reply was not SMTP: no reply code, a code that is not three digits or outside
    2yz-5yz, a line or reply over aiosmtplib's limits, or a success where a refusal or the 354 was due.
    A 451, whatever the code it sent: passed back, it could tell the client "delivered" (a 250 to DATA,
    before a byte of the message was sent) or nothing SMTP at all."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 451, "4.5.0", "Downstream relay sent an invalid reply, try again later")


class StoreError(MilterError):
    """The verdict / quarantine store could not commit."""

    smtp_text = "Quarantine store unavailable, try again later"


class MessageTooBig(MilterError):
    smtp_code = 552
    smtp_status = "5.3.4"
    smtp_text = "Message too big for system"


def smtp_reply(exc: BaseException) -> str:
    """The one place an exception becomes an SMTP reply line."""
    if isinstance(exc, MilterError):
        return f"{exc.smtp_code} {exc.smtp_status} {exc.smtp_text}"
    return "451 4.3.0 Internal error, try again later"
