"""The gateway's side of the DNS blocklists ([reputation], milter/auth/dnsbl.py): which of a message's
addresses and domains are asked, through the [auth] resolver and its cache, under one deadline.

Asked once the prepare process has read the message (the link domains come from its parse), while the
DKIM verification of signed mail runs in the pool, and before the message is announced to the batcher,
which waits a moment for announced messages, never for DNS. A DNS outage costs a message at most
`reputation.timeout` and ends as "error" results, which no rule acts on.

The client address is asked only for clients from outside (`policy.internal_networks`, XFORWARD
SOURCE=LOCAL): our own users' addresses say nothing, and a dynamic-address list (Spamhaus PBL) lists
most of them by design. Sender domains are the From, envelope sender and Reply-To registrable domains,
less our protected domains (a list naming our own domain would hold all our mail; that is an incident
for a person, not a filter decision). Neither they nor the link domains are asked when they are a
free-mail provider's (no domain list names gmail.com; asking costs a query per message) or in
`reputation.skip_domains`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from milter.auth import Resolver
from milter.auth.dnsbl import Reputation, Subject, Zone, look_up, subjects
from milter.config import ReputationConfig, ZoneConfig
from milter.features.domains import registrable
from milter.features.lexicon import FREEMAIL
from milter.features.summary import MessageSummary
from milter.gateway.logfmt import kv
from milter.policy.table import IPNetwork, is_internal, parse_client
from milter.types import Action, Envelope, Verdict

log = logging.getLogger("milter.gateway")

#: A zone that refuses us is logged again after this long (every message would be too many lines).
REFUSAL_LOG_INTERVAL = 3600.0


def zone_of(config: ZoneConfig) -> Zone:
    return Zone(
        name=config.name, kind=config.kind, action=Action(config.action), verdict=Verdict(config.verdict),
        codes=dict(config.codes), sources=config.sources, refusals=config.refusals,
        min_score=config.min_score,
    )


class Blocklists:
    def __init__(
        self,
        resolver: Resolver,
        zones: Sequence[Zone],
        timeout: float,
        internal: Sequence[IPNetwork] = (),
        protected_domains: Sequence[str] = (),
        skip_domains: Sequence[str] = (),
    ) -> None:
        self.resolver = resolver
        self.zones = tuple(zones)
        self.timeout = timeout
        self.internal = tuple(internal)
        # never asked: ours, the free-mail providers (no domain list names them), the admin's skip list
        self.unasked = frozenset(d.lower() for d in (*protected_domains, *FREEMAIL, *skip_domains))
        self._refusal_logged: dict[str, float] = {}  # zone -> when its refusal was last logged

    def targets(self, summary: MessageSummary, envelope: Envelope) -> tuple[Subject, ...]:
        """What this message offers the lists (module docstring)."""
        ip = parse_client(envelope.client_addr)
        client = str(ip) if ip is not None and not is_internal(envelope, self.internal) else None
        envelope_domain = registrable((envelope.mail_from or "").strip("<>").rpartition("@")[2])
        senders = [
            (role, domain)
            for role, domain in (
                ("From domain", summary.from_org_domain),
                ("envelope sender domain", envelope_domain),
                ("Reply-To domain", summary.reply_to_domain),
            )
            if domain and not self.skipped(domain)
        ]
        links = [d for d in summary.link_domains if not self.skipped(d)]
        return subjects(client, senders, links)

    def skipped(self, domain: str) -> bool:
        """`domain` is, or is under, a domain never asked (a set lookup per label, not a scan)."""
        labels = domain.lower().split(".")
        return any(".".join(labels[i:]) in self.unasked for i in range(len(labels)))

    async def check(self, summary: MessageSummary, envelope: Envelope, msg_id: str) -> Reputation | None:
        """The lists' answers for one message; None (and a log line) if asking itself broke, so a bug
        here costs the message its blocklist results, never its delivery."""
        try:
            targets = self.targets(summary, envelope)
            reputation = await look_up(self.resolver, self.zones, targets, self.timeout)
        except Exception as exc:
            log.error(kv("dnsbl_failed", id=msg_id, error=type(exc).__name__, detail=str(exc)[:200]))
            return None
        self._log_refusals(reputation)
        return reputation

    def _log_refusals(self, reputation: Reputation) -> None:
        now = time.monotonic()
        for result in reputation.results:
            if result.result != "refused":
                continue
            last = self._refusal_logged.get(result.zone)
            if last is not None and now - last < REFUSAL_LOG_INTERVAL:
                continue
            self._refusal_logged[result.zone] = now
            log.warning(kv(
                "dnsbl_refused", zone=result.zone, answer=result.detail,
                fix="the list refuses this resolver (a public or shared one, or over its free volume): "
                    "use a local recursive resolver in auth.nameservers, or a subscription zone",
            ))


def build_blocklists(
    config: ReputationConfig,
    resolver: Resolver,
    internal: Sequence[IPNetwork] = (),
    protected_domains: Sequence[str] = (),
) -> Blocklists | None:
    """From the [reputation] table; None when it names no zone."""
    if not config.zones:
        return None
    zones = tuple(zone_of(z) for z in config.zones)
    log.info(kv("dnsbl", zones=",".join(f"{z.name}:{z.kind}:{z.action.value}" for z in zones),
                timeout=config.timeout))
    return Blocklists(resolver, zones, config.timeout, internal, protected_domains, config.skip_domains)
