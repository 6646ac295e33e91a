"""The gateway's side of sender authentication: DNS on the event loop, verification after it.

`SenderAuth.gather` runs while the prepare process parses the message: it reads the header block and
looks up DKIM and ARC keys and DMARC records through one cached resolver per worker process (one deadline per
message, `auth.timeout`). The answers are then evaluated (milter.auth.check explains the split): on
the loop for unsigned mail, in the pool when there are signatures to verify (MessageProcessor._verify).
A DNS outage therefore costs at most `auth.timeout` per message and ends as "temperror", which no
policy rule acts on: mail is never refused or quarantined because DNS was slow.

SPF is checked for clients from outside (XFORWARD's original client, or the peer), beside the DKIM /
DMARC lookups and under the same deadline. Not for our own clients (`policy.internal_networks`,
XFORWARD SOURCE=LOCAL): their addresses are in nobody's SPF record, and DMARC does not judge them.

The gateway adds its own Authentication-Results header to the mail it relays and removes incoming ones
that carry its authserv-id (RFC 8601 section 5): anybody can write such a header before us.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from milter.auth import CachingResolver, DnsResolver, Evidence, NoResolver, Resolver, SpfClient, gather
from milter.config import AuthConfig, ReputationConfig, nameserver
from milter.errors import ConfigError
from milter.gateway.logfmt import kv
from milter.gateway.reputation import Blocklists, build_blocklists
from milter.policy.table import IPNetwork, is_internal, parse_client, parse_networks
from milter.types import Envelope

log = logging.getLogger("milter.gateway")


class SenderAuth:
    def __init__(
        self,
        resolver: Resolver,
        timeout: float,
        authserv_id: str,
        trusted_ids: tuple[str, ...] = (),
        internal: Sequence[IPNetwork] = (),
        trusted_arc_sealers: tuple[str, ...] = (),
        blocklists: Blocklists | None = None,
    ) -> None:
        self.resolver = resolver
        self.blocklists = blocklists  # [reputation] zones, asked through the same resolver
        self.timeout = timeout
        self.authserv_id = authserv_id
        self.trusted_ids = trusted_ids
        self.internal = tuple(internal)
        self.trusted_arc_sealers = trusted_arc_sealers

    async def gather(self, raw: bytes, msg_id: str, envelope: Envelope | None = None) -> Evidence | None:
        """The DNS evidence for one message; None (and a log line) if gathering itself broke, so a bug
        here costs the message its authentication results, never its delivery."""
        try:
            client = self.spf_client(envelope) if envelope is not None else None
            return await gather(
                raw, self.resolver, self.timeout, self.trusted_ids, client, self.trusted_arc_sealers
            )
        except Exception as exc:
            log.error(kv("auth_gather_failed", id=msg_id, error=type(exc).__name__, detail=str(exc)[:200]))
            return None

    def spf_client(self, envelope: Envelope) -> SpfClient | None:
        """Who SPF is checked for; None for our own clients or an address we cannot read."""
        ip = parse_client(envelope.client_addr)
        if ip is None or is_internal(envelope, self.internal):
            return None
        return SpfClient(str(ip), envelope.mail_from, envelope.helo)


def build_sender_auth(
    config: AuthConfig,
    hostname: str,
    resolver: Resolver | None = None,
    internal_networks: Sequence[str] = (),
    reputation: ReputationConfig | None = None,
    protected_domains: Sequence[str] = (),
) -> SenderAuth | None:
    """From the [auth] table; `resolver` replaces the DNS one (tests, offline use). None when disabled.
    `internal_networks` (policy.internal_networks, already validated) are not SPF-checked, nor asked of
    the [reputation] zones, which use the same resolver; `protected_domains` are never asked."""
    if not config.enabled:
        log.info(kv("auth", dkim_dmarc="off"))
        return None
    if resolver is None:
        resolver = CachingResolver(_system_or_none(config), max_entries=config.dns_cache_entries)
    authserv_id = config.authserv_id or hostname
    log.info(
        kv(
            "auth",
            dkim_dmarc="on",
            nameservers=",".join(config.nameservers) or "system",
            timeout=config.timeout,
            cache_entries=config.dns_cache_entries,
            authserv_id=authserv_id,
            trusted_arc_sealers=",".join(config.trusted_arc_sealers) or "none",
        )
    )
    internal = parse_networks("internal_networks", internal_networks, "policy")
    blocklists = None
    if reputation is not None:
        blocklists = build_blocklists(reputation, resolver, internal, protected_domains)
    return SenderAuth(
        resolver, config.timeout, authserv_id, config.trusted_authserv_ids, internal,
        config.trusted_arc_sealers, blocklists,
    )


def dns_resolver(config: AuthConfig) -> DnsResolver:
    """The DNS resolver the [auth] table names (its nameservers, or the system's); ConfigError naming
    auth.nameservers when there is no usable one. Shared by the gateway and `milter scan --dns`."""
    servers = [nameserver(n, f"auth.nameservers[{i}]") for i, n in enumerate(config.nameservers)]
    try:
        return DnsResolver(servers or None, lifetime=config.timeout)
    except Exception as exc:  # dnspython: no /etc/resolv.conf, or one without nameservers
        raise ConfigError("auth.nameservers", f"no usable system resolver ({type(exc).__name__})") from exc


def _system_or_none(config: AuthConfig) -> Resolver:
    try:
        return dns_resolver(config)
    except ConfigError as exc:
        # Mail must still flow on such a host: every result is then temperror, which no rule acts on.
        fix = "set auth.nameservers or auth.enabled = false"
        log.warning(kv("auth_no_resolver", detail=exc.problem, fix=fix))
        return NoResolver(exc.problem)
