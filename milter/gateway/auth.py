"""The gateway's side of sender authentication: DNS on the event loop, verification in the pool.

`SenderAuth.gather` runs before `prepare`: it reads the header block, looks up DKIM keys and DMARC
records through one cached resolver per worker process (one deadline per message, `auth.timeout`), and
hands the answers to the prepare process, which verifies and evaluates (milter.auth.check explains the
split). A DNS outage therefore costs at most `auth.timeout` per message and ends as "temperror", which
no policy rule acts on: mail is never refused or quarantined because DNS was slow.

The gateway adds its own Authentication-Results header to the mail it relays and removes incoming ones
that carry its authserv-id (RFC 8601 section 5): anybody can write such a header before us.
"""

from __future__ import annotations

import logging

from milter.auth import CachingResolver, DnsResolver, Evidence, TxtResolver, gather
from milter.config import AuthConfig, nameserver
from milter.errors import ConfigError
from milter.gateway.logfmt import kv

log = logging.getLogger("milter.gateway")


class SenderAuth:
    def __init__(
        self, resolver: TxtResolver, timeout: float, authserv_id: str, trusted_ids: tuple[str, ...] = ()
    ) -> None:
        self.resolver = resolver
        self.timeout = timeout
        self.authserv_id = authserv_id
        self.trusted_ids = trusted_ids

    async def gather(self, raw: bytes, msg_id: str) -> Evidence | None:
        """The DNS evidence for one message; None (and a log line) if gathering itself broke, so a bug
        here costs the message its authentication results, never its delivery."""
        try:
            return await gather(raw, self.resolver, self.timeout, self.trusted_ids)
        except Exception as exc:
            log.error(kv("auth_gather_failed", id=msg_id, error=type(exc).__name__, detail=str(exc)[:200]))
            return None


def build_sender_auth(
    config: AuthConfig, hostname: str, resolver: TxtResolver | None = None
) -> SenderAuth | None:
    """From the [auth] table; `resolver` replaces the DNS one (tests, offline use). None when disabled."""
    if not config.enabled:
        log.info(kv("auth", dkim_dmarc="off"))
        return None
    if resolver is None:
        resolver = CachingResolver(_dns_resolver(config))
    authserv_id = config.authserv_id or hostname
    log.info(
        kv(
            "auth",
            dkim_dmarc="on",
            nameservers=",".join(config.nameservers) or "system",
            timeout=config.timeout,
            authserv_id=authserv_id,
        )
    )
    return SenderAuth(resolver, config.timeout, authserv_id, config.trusted_authserv_ids)


def _dns_resolver(config: AuthConfig) -> DnsResolver:
    servers = [nameserver(n, f"auth.nameservers[{i}]") for i, n in enumerate(config.nameservers)]
    try:
        return DnsResolver(servers or None, lifetime=config.timeout)
    except Exception as exc:  # dnspython: no /etc/resolv.conf, or one without nameservers
        raise ConfigError(
            "auth.nameservers",
            f"no usable system resolver ({type(exc).__name__}): set auth.nameservers or auth.enabled = false",
        ) from exc
