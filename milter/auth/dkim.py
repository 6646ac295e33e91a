"""DKIM verification (RFC 6376) with dkimpy, reading keys only from pre-fetched answers.

dkimpy does the cryptography, canonicalisation, l= and tag validation; this module only feeds it the
key record the fetch phase already found and turns its outcome into an RFC 8601 result. dkimpy folds
several distinct outcomes into `verify() -> False` (missing key, bad key, DNS timeout, bad signature),
so the key record is classified here first (temperror / permerror), and a False after that can only
mean the signature does not verify. The DNS function handed to dkimpy never touches the network.

Results: pass; fail (signature or body hash does not verify); temperror (key lookup failed
transiently, or was not fetched); permerror (malformed signature, no key at the name, unusable or
revoked key, key shorter than 1024 bits, an RSA key over MAX_RSA_BITS or with an unusable public
exponent: `check_key`); neutral (unsupported key type, or an unexpected verifier
error, so that a bug in a library is never reported as a forgery).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import dkim

from milter.auth.dns import TxtAnswer
from milter.auth.message import SignatureRef, as_domain

DkimStatus = Literal["pass", "fail", "neutral", "temperror", "permerror"]

#: RFC 8301: verifiers must accept RSA keys of 1024 to 4096 bits. A larger key, or a public exponent
#: past 2**32 (real keys use 65537), only costs: dkimpy verifies with Python's pow(), and a sender's
#: 5 KB key of huge modulus and exponent took 8 s of a worker per signature (longer ones, hours).
MAX_RSA_BITS = 4096
MAX_RSA_EXPONENT = 2**32


def check_key(name: str, record: str) -> None:
    """dkimpy's parse of a key record (its errors pass through), then the bounds it does not set:
    ValueError for an RSA key past MAX_RSA_BITS or an exponent that is even, under 3 or past
    MAX_RSA_EXPONENT (RFC 8017 needs it odd). Cheap: no arithmetic on the key."""
    pk, bits, kind, _ = dkim.evaluate_pk(name.encode("ascii"), record.encode("ascii"))
    if kind != b"rsa" or not isinstance(pk, dict):
        return
    exponent = pk.get("publicExponent")
    if bits is not None and bits > MAX_RSA_BITS:
        raise ValueError(f"RSA key of {bits} bits, over {MAX_RSA_BITS} (RFC 8301)")
    if not isinstance(exponent, int) or exponent < 3 or exponent % 2 == 0 or exponent > MAX_RSA_EXPONENT:
        shown = f"{exponent.bit_length()}-bit" if isinstance(exponent, int) else repr(exponent)
        raise ValueError(f"unusable RSA public exponent ({shown})")


@dataclass(frozen=True)
class DkimResult:
    domain: str
    selector: str
    result: DkimStatus
    reason: str = ""


def verify_signatures(
    raw: bytes, signatures: tuple[SignatureRef, ...], answers: Mapping[str, TxtAnswer]
) -> tuple[DkimResult, ...]:
    """One DkimResult per signature in `signatures`; never raises."""
    if not signatures:
        return ()
    try:
        verifier = dkim.DKIM(bytes(raw), logger=_silent_logger(), minkey=1024)
    except Exception as e:  # dkimpy refuses header blocks with junk lines
        return tuple(_result(ref, "permerror", f"unparsable message: {_why(e)}") for ref in signatures)
    return tuple(_verify_one(verifier, ref, answers) for ref in signatures)


def _verify_one(verifier: Any, ref: SignatureRef, answers: Mapping[str, TxtAnswer]) -> DkimResult:
    if ref.error or ref.key_name is None:
        return _result(ref, "permerror", ref.error or "malformed signature")
    problem = _check_header(verifier, ref)
    if problem:
        return _result(ref, "permerror", problem)
    record, failure = _key_record(ref.key_name, answers.get(ref.key_name))
    if failure is not None:
        return _result(ref, *failure)
    return _run_verify(verifier, ref, record)


def _check_header(verifier: Any, ref: SignatureRef) -> str:
    """dkimpy's syntax checks of the signature (mandatory tags, base64, t=/x=, i=), before any key."""
    try:
        prep = verifier.verify_headerprep(ref.index)
    except Exception as e:
        return f"bad signature: {_why(e)}"
    if not prep:
        return "signature not found"
    sig = prep[0]
    domain = as_domain(sig[b"d"].decode("utf-8", "replace"))
    selector = sig[b"s"].decode("utf-8", "replace").strip().lower()
    if (domain, selector) != (ref.domain, ref.selector):
        return "signature does not match the plan"
    return ""


def _key_record(name: str, answer: TxtAnswer | None) -> tuple[str, tuple[DkimStatus, str] | None]:
    if answer is None:
        return "", ("temperror", "key not fetched")
    if answer.status == "temperror":
        return "", ("temperror", f"key lookup failed: {answer.reason or 'temperror'}")
    if answer.status == "none" or not answer.records:
        return "", ("permerror", "no key for signature")
    record = answer.records[0]  # several records at one selector are undefined (RFC 6376 3.6.2.2)
    try:
        check_key(name, record)
    except (dkim.NaClNotFoundError, dkim.UnknownKeyTypeError) as e:
        return "", ("neutral", f"unsupported key: {_why(e)}")
    except Exception as e:
        return "", ("permerror", f"bad key: {_why(e)}")
    return record, None


def _run_verify(verifier: Any, ref: SignatureRef, record: str) -> DkimResult:
    key = record.encode("ascii")

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        return key  # the only name dkimpy asks for is this signature's key name

    try:
        ok = verifier.verify(idx=ref.index, dnsfunc=dnsfunc)
    except dkim.ValidationError as e:
        return _result(ref, "fail", _why(e))
    except (dkim.KeyFormatError, dkim.MessageFormatError) as e:
        return _result(ref, "permerror", _why(e))
    except (dkim.NaClNotFoundError, dkim.UnknownKeyTypeError) as e:
        return _result(ref, "neutral", f"unsupported key: {_why(e)}")
    except Exception as e:
        return _result(ref, "neutral", f"verifier error: {type(e).__name__}")
    if ok is True:
        return _result(ref, "pass", "")
    return _result(ref, "fail", "signature did not verify")


def _result(ref: SignatureRef, status: DkimStatus, reason: str) -> DkimResult:
    return DkimResult(ref.domain, ref.selector, status, reason)


def _why(e: BaseException) -> str:
    """A short, header-safe reason: the message up to any dumped value, printable ASCII only."""
    text = str(e).split("(", 1)[0].strip() or type(e).__name__
    return re.sub(r"[^\x20-\x7e]|[\"\\@;]", "?", text)[:80]


def _silent_logger() -> logging.Logger:
    """dkimpy logs ordinary bad keys at ERROR; results carry the reason, so its logging is discarded.
    A Logger built directly belongs to no hierarchy, so this changes no global logging state."""
    return logging.Logger("milter.auth.dkimpy", logging.CRITICAL + 1)
