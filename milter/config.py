"""TOML configuration: documented defaults, one frozen dataclass per table, errors that name the key.

Every key has a default, so an empty file (or none) is a working configuration: the shipped model,
SQLite under ./var, loopback ports.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from milter.errors import ConfigError
from milter.names import ascii_domain

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "current.onnx"


@dataclass(frozen=True)
class ClassThresholds:
    """Score (probability of the class) at or above which each action applies; None disables it."""

    tag: float | None = None
    quarantine: float | None = None
    reject: float | None = None


@dataclass(frozen=True)
class DomainRule:
    """Per recipient-domain override of the thresholds (Mailman-style: one small rule)."""

    domain: str
    spam: ClassThresholds | None = None
    bec: ClassThresholds | None = None
    action_override: str | None = None  # e.g. "tag" to never quarantine for this domain
    bulk_action: str | None = None  # this domain's action for bulk mail; None: policy.bulk.action


@dataclass(frozen=True)
class Lists:
    allow_senders: tuple[str, ...] = ()
    allow_domains: tuple[str, ...] = ()
    allow_ips: tuple[str, ...] = ()
    deny_senders: tuple[str, ...] = ()
    deny_domains: tuple[str, ...] = ()
    deny_ips: tuple[str, ...] = ()


#: What [policy.bulk] action and a domain rule's bulk_action may say.
BULK_ACTIONS: tuple[str, ...] = ("accept", "tag", "quarantine")


@dataclass(frozen=True)
class BulkConfig:
    """The `bulk` verdict for legitimate bulk mail (milter.policy.bulk)."""

    enabled: bool = True  # false: such mail keeps the model's verdict (ham, or spam when tagged)
    action: str = "accept"  # "accept", "tag" or "quarantine"


#: What a correspondence-history signal may do ([policy.history]): "off" (not evaluated), "note" (a reason
#: on the verdict headers only) or "tag". Never quarantine: on the Enron replay every signal fires on
#: more than 0.1 % of real ham from outside (docs/bec-history.md), issue 17's bar for holding mail.
HISTORY_ACTIONS: tuple[str, ...] = ("off", "note", "tag")


@dataclass(frozen=True)
class HistoryConfig:
    """The correspondence history and its signals (milter.history, milter.policy.history). Each signal's
    default follows its rate on the Enron replay's ham from outside (docs/bec-history.md): the first
    contacts are everyday business (12.6 %, 1.2 %, 3.0 % with money or urgency talk) and only say so;
    the borrowed names and Reply-Tos (1.2 %, 0.4 %, none measured) tag."""

    enabled: bool = True  # false: no history is kept, read or written
    first_contact_org: str = "note"
    first_contact_recipient: str = "note"
    display_name_new_address: str = "tag"
    correspondent_elsewhere: str = "tag"
    reply_to_unseen: str = "tag"
    first_contact_money: str = "note"
    max_age_days: int = 400  # entries not seen for this long are forgotten (yearly invoices stay known)
    max_entries: int = 200_000  # per table in each gateway process's memory (about 360 bytes each)
    refresh_seconds: float = 60.0  # how often a gateway reads what other processes and nodes learned
    flush_seconds: float = 1.0  # how often a gateway writes what it learned (one transaction)

    def action(self, signal: str) -> str:
        value = getattr(self, signal)
        assert isinstance(value, str)
        return value


#: The history signals, by their config key (milter.history_signals.SIGNALS, same order).
HISTORY_SIGNALS: tuple[str, ...] = (
    "first_contact_org", "first_contact_recipient", "display_name_new_address",
    "correspondent_elsewhere", "reply_to_unseen", "first_contact_money",
)


#: One release may be a mistake; three are a decision.
DEFAULT_LEARNED_SENDER_LABELS = 3
#: policy.brands by default (milter.policy.mailbox, "borrowed brands"): brands that the corpora's spam and
#: phishing name in whole words over domains that are not theirs and that their ham never names so, picked
#: from a pool of about 250 brands that spam borrows (docs/DETECTION.md). Domains that spell the name
#: (lidl.de, macys.com) need no entry. Left out: Disney and McDonald's (the shop mailbox's own ham from them
#: comes from their mailing platform's domain), and brands that are also words or surnames (Target, Visa,
#: Wise, Meta, Sam's, Schwab, Sears, Lloyds).
DEFAULT_BRANDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # US retail and services, as the shop mailbox's spam borrows them
    ("Consumer Cellular", ()), ("AARP", ()), ("Omaha Steaks", ()), ("Lowe's", ()),
    ("CVS Pharmacy", ("cvs.com",)),
    ("Southwest Airlines", ("southwest.com", "southwestvacations.com")), ("Medicare", ("cms.gov", "hhs.gov")),
    ("Dick's Sporting Goods", ("dcsg.com",)), ("Starbucks", ()), ("Macy's", ()), ("Ulta", ()), ("Keurig", ()),
    ("Dyson", ()), ("Yeti", ()), ("DeWalt", ()), ("Experian", ()), ("Nintendo", ()),
    ("Xbox", ("microsoft.com",)), ("Yahoo", ("ymail.com",)), ("Shein", ()), ("Pandora", ()), ("Hulu", ()),
    ("GoDaddy", ()), ("LifeLock", ("norton.com",)), ("Overstock", ()), ("Victoria's Secret", ()),
    # travel
    ("Hilton", ()), ("Hyatt", ()), ("Marriott", ()), ("Booking.com", ()), ("Lufthansa", ()),
    # Europe and Brazil, as phishing-pot's borrow them
    ("Lidl", ()), ("Aldi", ()), ("La Poste", ()), ("Correos", ()), ("Evri", ()), ("ABN AMRO", ()),
    ("Ledger", ()),
    ("Banco do Brasil", ("bb.com.br",)), ("Nubank", ("nu.com.mx",)),
    ("Mercado Pago", ("mercadolibre.com", "mercadolivre.com.br")), ("Mercado Livre", ("mercadolibre.com",)),
)


@dataclass(frozen=True)
class PolicyConfig:
    # None: take the thresholds chosen at training time from the model's metadata.
    spam: ClassThresholds | None = None
    bec: ClassThresholds | None = None
    subject_prefix: str | None = None
    on_error: str = "tempfail"  # or "accept": accept and tag "unscanned" when scanning fails
    protected_domains: tuple[str, ...] = ()
    protected_names: tuple[str, ...] = ()
    domains: tuple[DomainRule, ...] = ()
    lists: Lists = field(default_factory=Lists)
    # What mail failing DMARC from a domain that publishes p=quarantine or p=reject gets when no stricter
    # rule fired: "none", "tag" or "quarantine". A protected domain failing it is always BEC, quarantined.
    dmarc_fail_action: str = "tag"
    # Clients whose mail is ours, not judged by DMARC (our own users' mail is often not yet signed when
    # it passes the filter). XFORWARD SOURCE=LOCAL counts as internal too.
    internal_networks: tuple[str, ...] = (
        "127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7",
    )
    # A From domain that passes DMARC (no record: its own DKIM signature) and has at least this many
    # messages labelled ham in the store (and none spam or bec) is tagged, not quarantined, on the
    # model's score alone; 0 turns this off (milter.policy.learned).
    learned_sender_labels: int = DEFAULT_LEARNED_SENDER_LABELS
    bulk: BulkConfig = field(default_factory=BulkConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    # Mail from a From domain on an often-abused TLD (.shop, .xyz, ...) is tagged as spam once the model
    # scores it at least this much as not-ham (milter.policy.abused_tld); None (false in TOML): off.
    abused_tld_tag: float | None = 0.5
    # TLDs that rule judges beside the features' own list (lexicon.SUSPICIOUS_TLDS, fixed with the model):
    # cheap ones that spam runs register by the thousand; [] judges the features' list alone.
    abused_tlds: tuple[str, ...] = (
        "help", "bar", "autos", "skin", "boats", "homes", "makeup", "mom", "yachts", "motorcycles",
    )
    # HTML mail with no DKIM signature and no unsubscribe offer is tagged as spam once the model scores it
    # at least this much as not-ham (milter.policy.unsigned); None (false in TOML): off.
    unsigned_html_tag: float | None = 0.93
    # A multipart/digest holding parts that are not messages is tagged as spam once the model scores it at
    # least this much as not-ham (milter.policy.unsigned); None (false in TOML): off.
    odd_digest_tag: float | None = 0.5
    # HTML that is images with under 100 characters of text is tagged as spam once the model scores it at
    # least this much as not-ham (milter.policy.unsigned); None (false in TOML): off.
    image_only_tag: float | None = 0.5
    # A brand's name as the mailbox of a domain that is not the brand's ("Hardware ACE
    # <hardwareace@landyselect.com>") is tagged as spam from this not-ham score (milter.policy.mailbox).
    name_mailbox_tag: float | None = 0.85
    # A person's name over a gibberish mailbox ("Gregorio Newman <snqkmfowgmlmyx@verizon.net>"): the same.
    gibberish_mailbox_tag: float | None = 0.5
    # A From mailbox with a run of three or more dashes, underscores or dots ("migo0004-----R165@..."):
    # the same.
    padded_mailbox_tag: float | None = 0.5
    # A person's name over a mailbox that has nothing of it ("Courtney Curran <deviyn@lhs75.every1.net>"):
    # the same, from a higher score (people do write from old or odd addresses).
    unrelated_mailbox_tag: float | None = 0.85
    # A brand in the From display name that the From domain is not ("Norton Security <x@funnysnails.com>"):
    # the same, and such a sender is never given the bulk verdict.
    brand_display_tag: float | None = 0.85
    # The same where the display name is the brand and words the address has nothing of ("Norton Security
    # <jokes@funnysnails.com>", not "Amazon Web Services <invoicing@aws.com>"): from this lower score.
    brand_alone_tag: float | None = 0.3
    # Brands the brand rule reads in display names beside the features' own (lexicon.BRANDS, fixed with the
    # model), each with the registrable domains it mails from: {"Consumer Cellular" =
    # ["consumercellular.com"]} in TOML. A features' brand named here gains those domains for the rule
    # (a co-brand's platform). The default: brands the corpora's spam and phishing borrow and their ham never
    # names from another domain (milter.policy.mailbox); {} reads the features' list alone.
    brands: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_BRANDS
    # A Subject that says "Re:" over a message that answers nothing (no In-Reply-To, no References) is
    # tagged as spam from this not-ham score (milter.policy.form).
    fake_reply_tag: float | None = 0.5
    # A From that names no mailbox (none, no address, an undecoded encoded word; bounces exempt): the same.
    no_mailbox_tag: float | None = 0.3
    # A From with several addresses, which DMARC cannot judge (milter.policy.form): the same, from any score.
    several_from_tag: float | None = 0.0
    # A To header that tries one mailbox name at three or more organisations (milter.policy.recipients):
    # tagged as spam from this not-ham score.
    harvested_recipients_tag: float | None = 0.3


@dataclass(frozen=True)
class ModelConfig:
    path: Path = DEFAULT_MODEL
    # Explain what the policy does not simply accept (milter.explain: about 2.5 ms of CPU a flagged
    # message); false skips it, and `milter quarantine show` then explains from the stored vector.
    explain: bool = True
    # Where promotions live: "local" (the folder of `path`, reloaded by SIGHUP) or "store" (the fleet's
    # registry in [store] url: every node adopts the current model by itself, docs/fleet.md).
    registry: str = "local"
    # With registry = "store": how often each worker asks the store which model the fleet serves.
    registry_poll_seconds: float = 30.0
    # Which graph scores the mail (docs/gpu.md): "cpu" the TreeEnsemble graph on the CPU; "auto" the
    # model's tensor graph on CUDA when onnxruntime offers CUDAExecutionProvider and every node runs
    # there, else the CPU graph; "cuda" the same, with an ERROR line when it falls back (it never
    # refuses to start: the gateway keeps scoring on the CPU).
    provider: str = "auto"
    # The micro-batcher's settings while the CUDA graph scores (server.batch_max / batch_wait_ms stay
    # for the CPU): a GPU call costs about the same for one row as for hundreds, so it waits for more
    # company; `milter scan` scores in batches of gpu_batch_size too.
    gpu_batch_size: int = 512
    gpu_batch_wait_ms: float = 5.0


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:10025"  # the SMTP listener; "" for none (milter only)
    # The milter listener for Postfix's smtpd_milters / Sendmail's INPUT_MAIL_FILTER:
    # "inet:HOST:PORT" or "unix:PATH"; None for none.
    milter_listen: str | None = None
    # What a quarantined message becomes once it is committed to the store: "discard" (the MTA drops
    # its copy) or "hold" (the MTA keeps it in its own hold queue too, SMFIR_QUARANTINE).
    milter_quarantine: str = "discard"
    # Seconds between SMFIR_PROGRESS packets while a message is scanned, so Postfix's
    # milter_content_timeout never fires on a gateway that is merely busy.
    milter_progress_interval: float = 10.0
    # Seconds a milter connection may be silent between packets. The MTA shows the filter nothing
    # while its client uploads a message or pauses, so this outlasts an SMTP transaction (libmilter's
    # own default, 7210 s); a packet begun, replies not read and the first packet get command_timeout.
    milter_timeout: float = 7210.0
    downstream: str = "127.0.0.1:10026"
    mode: str = "after-queue"  # or "before-queue" (smtpd_proxy_filter)
    workers: int = 2
    max_message_size: int = 25 * 1024 * 1024  # bytes; 0: no limit (the MTA's own limit then applies)
    max_sessions: int = 200
    # Recipients per SMTP transaction; past it 452 4.5.3 and the client sends the rest in another
    # one. At most the downstream's own limit (Postfix's smtpd_recipient_limit, 1000 by default), or it
    # refuses the message as a whole. 0: no limit.
    max_recipients: int = 1000
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    # The hard deadline of one message's scan (parse, features, DNS, model), from its end of data:
    # past it the message gets policy.on_error and the prepare process working on it is replaced.
    # The parser's budgets keep a real scan far below (bench/fuzz.py: the slowest of 200,000 hostile
    # messages took under a second); this catches what nothing foresaw. 0: no deadline.
    scan_timeout: float = 30.0
    # A prepare process whose resident memory passes this many MiB after a job is retired: it
    # finishes what it holds and exits, and a new pool takes the next jobs (no message is lost).
    # A leak in the parser or a library then costs a restart, never the host's memory. 0: off.
    prepare_max_rss_mb: int = 1024
    # Jobs (messages, and DKIM verifications of signed ones) a prepare pool runs before a fresh pool,
    # started and warmed up beside it, takes over; the old one finishes what it holds. CPython's heap
    # fragments under months of varied mail, so a process's lifetime bounds its memory (as Postfix's
    # max_use does). About 1 s of CPU per new pool (0.5 s per process): 0.05 ms per job at the
    # default. 0: never.
    prepare_max_jobs: int = 20_000
    # Seconds between checks of the free memory glibc holds in each worker and prepare process; past
    # 8 MiB it is given back (malloc_trim). A second line behind the fixed malloc thresholds
    # (milter.gateway.heap; docs/soak.md runs I-K). A few milliseconds per trim, in a thread. 0: never.
    heap_trim_interval: float = 60.0
    downstream_timeout: float = 60.0
    batch_max: int = 32
    batch_wait_ms: float = 2.0
    metrics_listen: str | None = "127.0.0.1:9925"
    hostname: str = "milter.localdomain"
    # Clients whose XFORWARD is believed (the MTA that hands us mail). Anyone else could claim any client
    # address and walk past the IP allow and deny lists, so XFORWARD is neither offered nor accepted.
    xforward_hosts: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # This node's name in the fleet's registry (`milter model status`); "" means the host name.
    node_name: str = ""


@dataclass(frozen=True)
class StoreConfig:
    url: str = "sqlite:///var/milter.db"
    retention_days: int = 30
    keep_feature_vectors: bool = True


@dataclass(frozen=True)
class AuthConfig:
    """DKIM and DMARC checks (milter/auth) in the gateway; `milter scan --dns` uses them too."""

    enabled: bool = True
    # One deadline for all of a message's DNS lookups: past it, a check is "temperror", never a stall.
    timeout: float = 1.0
    # Empty: the system resolver (/etc/resolv.conf). Else "IP" or "IP:PORT" ("[IPv6]:PORT") entries.
    nameservers: tuple[str, ...] = ()
    # The name in our Authentication-Results header; None means server.hostname.
    authserv_id: str | None = None
    # Upstream MTAs whose Authentication-Results we believe for SPF (their authserv-id), where we cannot
    # check it ourselves (no client address); nobody else's.
    trusted_authserv_ids: tuple[str, ...] = ()
    # Answers kept per worker (milter/auth/cache.py): about 0.5-1 KiB each with their names, so the
    # default is 5-10 MiB a worker once as many sender domains have been seen (docs/soak.md).
    dns_cache_entries: int = 10_000
    # ARC sealers (the d= of the newest ARC-Seal, exact domains) whose recorded results we believe when
    # forwarding broke DMARC (milter.policy.dmarc); nobody's by default: anyone can seal a chain.
    trusted_arc_sealers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ZoneConfig:
    """One `[[reputation.zone]]`: a DNS blocklist (milter/auth/dnsbl.py says how answers are read)."""

    name: str  # the list's zone, "zen.spamhaus.org"
    kind: str  # "ip" (the client address) or "domain" (sender and link domains)
    action: str = "tag"  # "tag", "quarantine" or "reject" (reject needs server.mode = "before-queue")
    verdict: str = "spam"  # "spam" or "bec"
    # answer address -> meaning; empty: every list answer (127.0.0.0/8 less the refusals) counts
    codes: tuple[tuple[str, str], ...] = ()
    sources: tuple[str, ...] = ("sender", "links")  # domain zones: the sender's domains, the links'
    refusals: tuple[str, ...] = ("127.255.255.0/24", "127.0.0.1/32")  # answers that mean "refused"
    # a listing acts only when the model scores the message at least this much as not-ham (0: always)
    min_score: float = 0.0


@dataclass(frozen=True)
class ReputationConfig:
    """DNS blocklists, asked through the [auth] resolver (its nameservers and cache)."""

    zones: tuple[ZoneConfig, ...] = ()  # none: nothing is asked
    # One deadline for all of a message's blocklist lookups; past it they are errors, never listings.
    timeout: float = 1.0
    # Domains never asked of the domain lists (besides our protected domains and the free-mail
    # providers, which are never asked): large senders no list names, as SpamAssassin's
    # uridnsbl_skip_domain; each saves a query per message that carries it.
    skip_domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    reputation: ReputationConfig = field(default_factory=ReputationConfig)


def _thresholds(key: str, raw: Any) -> ClassThresholds:
    if not isinstance(raw, Mapping):
        raise ConfigError(key, "must be a table with tag / quarantine / reject")
    out: dict[str, float | None] = {}
    for name, value in raw.items():
        sub = f"{key}.{name}"
        if name not in ("tag", "quarantine", "reject"):
            raise ConfigError(sub, "unknown key (expected tag, quarantine or reject)")
        if value is False:
            out[name] = None
            continue
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
            raise ConfigError(sub, f"must be a number between 0 and 1 or false, got {value!r}")
        out[name] = float(value)
    thresholds = ClassThresholds(**out)
    _check_ladder(key, thresholds)
    return thresholds


def _check_ladder(key: str, t: ClassThresholds) -> None:
    """tag <= quarantine <= reject among the steps set. The policy takes the strictest step a score
    reaches, so a quarantine cut under the tag cut means the tag step never applies: a swapped pair,
    not a setting (the model's own thresholds are always in this order)."""
    steps = [(name, cut) for name, cut in (("tag", t.tag), ("quarantine", t.quarantine), ("reject", t.reject))
             if cut is not None]
    for (low, low_cut), (high, high_cut) in itertools.pairwise(steps):
        if high_cut < low_cut:
            raise ConfigError(
                f"{key}.{high}",
                f"must be at least {key}.{low} ({low_cut:g}), got {high_cut:g}: the stricter action needs "
                f"the higher score, or the {low} step never applies",
            )


def _score_or_off(key: str, value: Any) -> float | None:
    if value is False:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ConfigError(key, f"must be a number between 0 and 1 or false, got {value!r}")
    return float(value)


def _table(key: str, raw: Any) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(key, "must be a table")
    return raw


def _simple(cls: type, key: str, raw: Mapping[str, Any], base: Any) -> Any:
    """Fill a flat dataclass from a table, checking key names and value types against the defaults."""
    values: dict[str, Any] = {}
    known = {f.name: f for f in fields(cls)}
    for name, value in raw.items():
        sub = f"{key}.{name}"
        if name not in known:
            raise ConfigError(sub, f"unknown key (known: {', '.join(sorted(known))})")
        default = getattr(base, name)
        values[name] = _coerce(sub, value, default)
    return replace(base, **values)


def _coerce(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(key, f"must be a non-negative integer, got {value!r}")
        return value
    if isinstance(default, float):
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ConfigError(key, f"must be a non-negative number, got {value!r}")
        return float(value)
    if isinstance(default, Path):
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a path string, got {value!r}")
        return Path(value)
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"must be a list of strings, got {value!r}")
        return tuple(value)
    if default is None or isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    raise ConfigError(key, "unsupported value")


def _policy(raw: Mapping[str, Any]) -> PolicyConfig:
    base = PolicyConfig()
    lower_cuts = (
        "abused_tld_tag", "unsigned_html_tag", "odd_digest_tag", "image_only_tag", "name_mailbox_tag",
        "gibberish_mailbox_tag", "padded_mailbox_tag", "unrelated_mailbox_tag", "brand_display_tag",
        "brand_alone_tag", "fake_reply_tag", "no_mailbox_tag", "several_from_tag", "harvested_recipients_tag",
    )
    nested = ("spam", "bec", "domain", "lists", "bulk", "history", "brands", *lower_cuts)
    flat = {k: v for k, v in raw.items() if k not in nested}
    pol: PolicyConfig = _simple(PolicyConfig, "policy", flat, base)
    for key in lower_cuts:  # a score, or false: off
        if key in raw:
            pol = replace(pol, **{key: _score_or_off(f"policy.{key}", raw[key])})  # type: ignore[arg-type]
    if pol.on_error not in ("tempfail", "accept"):
        raise ConfigError("policy.on_error", f"must be 'tempfail' or 'accept', got {pol.on_error!r}")
    _check_networks("policy.internal_networks", pol.internal_networks)
    pol = replace(pol, protected_domains=_domains("policy.protected_domains", pol.protected_domains))
    if pol.dmarc_fail_action not in ("none", "tag", "quarantine"):
        got = pol.dmarc_fail_action
        raise ConfigError("policy.dmarc_fail_action", f"must be 'none', 'tag' or 'quarantine', got {got!r}")
    if "spam" in raw:
        pol = replace(pol, spam=_thresholds("policy.spam", raw["spam"]))
    if "bec" in raw:
        pol = replace(pol, bec=_thresholds("policy.bec", raw["bec"]))
    if "lists" in raw:
        lists: Lists = _simple(Lists, "policy.lists", _table("policy.lists", raw["lists"]), Lists())
        for ip_key in ("allow_ips", "deny_ips"):
            _check_networks(f"policy.lists.{ip_key}", getattr(lists, ip_key))
        lists = replace(lists, allow_domains=_domains("policy.lists.allow_domains", lists.allow_domains),
                        deny_domains=_domains("policy.lists.deny_domains", lists.deny_domains))
        for sender_key in ("allow_senders", "deny_senders"):
            _check_addresses(f"policy.lists.{sender_key}", getattr(lists, sender_key))
        pol = replace(pol, lists=lists)
    if "bulk" in raw:
        pol = replace(pol, bulk=_bulk(_table("policy.bulk", raw["bulk"])))
    if "brands" in raw:
        pol = replace(pol, brands=_brands(_table("policy.brands", raw["brands"])))
    if "history" in raw:
        pol = replace(pol, history=_history(_table("policy.history", raw["history"])))
    rules = [_domain_rule(f"policy.domain[{i}]", item) for i, item in enumerate(raw.get("domain", []))]
    seen: dict[str, int] = {}
    for i, rule in enumerate(rules):
        if (first := seen.setdefault(rule.domain, i)) != i:  # which one applied would be a guess
            raise ConfigError(f"policy.domain[{i}].domain",
                              f"{rule.domain!r} already has a rule (policy.domain[{first}])")
    return replace(pol, domains=tuple(rules))


#: What [model] registry may say.
REGISTRIES: tuple[str, ...] = ("local", "store")
#: What [model] provider may say (milter.classifier.PROVIDER_SETTINGS; not imported: config stays light).
MODEL_PROVIDERS: tuple[str, ...] = ("auto", "cpu", "cuda")
#: Bounds of the GPU batch: past 65,536 rows a call holds seconds of mail; a wait past a second would
#: delay every message of a quiet gateway by that much.
MAX_GPU_BATCH = 65_536
MAX_GPU_BATCH_WAIT_MS = 1000.0
#: The file a registry (local or the fleet's) makes current: a node following the fleet loads this one.
CURRENT_MODEL_FILE = "current.onnx"


def _model(raw: Mapping[str, Any]) -> ModelConfig:
    model: ModelConfig = _simple(ModelConfig, "model", raw, ModelConfig())
    if model.registry not in REGISTRIES:
        raise ConfigError("model.registry", f"must be 'local' or 'store', got {model.registry!r}")
    if model.registry_poll_seconds <= 0:
        raise ConfigError("model.registry_poll_seconds", "must be more than 0 seconds")
    if model.provider not in MODEL_PROVIDERS:
        raise ConfigError("model.provider", f"must be 'auto', 'cpu' or 'cuda', got {model.provider!r}")
    if not 1 <= model.gpu_batch_size <= MAX_GPU_BATCH:
        raise ConfigError("model.gpu_batch_size", f"must be 1 to {MAX_GPU_BATCH}, got {model.gpu_batch_size}")
    if not 0 <= model.gpu_batch_wait_ms <= MAX_GPU_BATCH_WAIT_MS:
        raise ConfigError("model.gpu_batch_wait_ms",
                          f"must be 0 to {MAX_GPU_BATCH_WAIT_MS:g} ms, got {model.gpu_batch_wait_ms:g}")
    if model.registry == "store" and model.path.name != CURRENT_MODEL_FILE:
        raise ConfigError("model.path", f"must name a {CURRENT_MODEL_FILE} with registry = 'store' "
                          f"(the fleet's model is installed as that file), got {model.path.name!r}")
    return model


def _history(raw: Mapping[str, Any]) -> HistoryConfig:
    hist: HistoryConfig = _simple(HistoryConfig, "policy.history", raw, HistoryConfig())
    for signal in HISTORY_SIGNALS:
        if (got := hist.action(signal)) not in HISTORY_ACTIONS:
            raise ConfigError(f"policy.history.{signal}", f"must be 'off', 'note' or 'tag', got {got!r}")
    for key in ("max_age_days", "max_entries", "refresh_seconds", "flush_seconds"):
        if not getattr(hist, key):
            raise ConfigError(f"policy.history.{key}", "must be above 0")
    return hist


def _brands(raw: Mapping[str, Any]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """[policy.brands]: brand name -> the domains it mails from (checked as names by the policy)."""
    out = []
    for name, domains in raw.items():
        if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
            raise ConfigError(f"policy.brands.{name}", f"must be a list of domains, got {domains!r}")
        out.append((name, tuple(domains)))
    return tuple(out)


def _bulk(raw: Mapping[str, Any]) -> BulkConfig:
    bulk: BulkConfig = _simple(BulkConfig, "policy.bulk", raw, BulkConfig())
    if bulk.action not in BULK_ACTIONS:
        got = bulk.action
        raise ConfigError("policy.bulk.action", f"must be 'accept', 'tag' or 'quarantine', got {got!r}")
    return bulk


def _domain_rule(key: str, raw: Any) -> DomainRule:
    item = _table(key, raw)
    if not isinstance(item.get("domain"), str):
        raise ConfigError(f"{key}.domain", "required string")
    unknown = set(item) - {"domain", "spam", "bec", "action_override", "bulk_action"}
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}", "unknown key")
    override = item.get("action_override")
    if override is not None and override not in ("accept", "tag", "quarantine"):
        raise ConfigError(f"{key}.action_override", "must be accept, tag or quarantine")
    bulk_action = item.get("bulk_action")
    if bulk_action is not None and bulk_action not in BULK_ACTIONS:
        raise ConfigError(f"{key}.bulk_action", f"must be accept, tag or quarantine, got {bulk_action!r}")
    return DomainRule(
        domain=_domain_name(f"{key}.domain", item["domain"]),
        spam=_thresholds(f"{key}.spam", item["spam"]) if "spam" in item else None,
        bec=_thresholds(f"{key}.bec", item["bec"]) if "bec" in item else None,
        action_override=override,
        bulk_action=bulk_action,
    )


def parse_config(raw: Mapping[str, Any]) -> Config:
    cfg = Config()
    known = {"model", "policy", "server", "store", "auth", "reputation"}
    for name in raw:
        if name not in known:
            raise ConfigError(name, f"unknown table (known: {', '.join(sorted(known))})")
    if "model" in raw:
        cfg = replace(cfg, model=_model(_table("model", raw["model"])))
    if "policy" in raw:
        cfg = replace(cfg, policy=_policy(_table("policy", raw["policy"])))
    if "server" in raw:
        server = _simple(ServerConfig, "server", _table("server", raw["server"]), ServerConfig())
        _check_server_limits(server)
        if server.mode not in ("after-queue", "before-queue"):
            raise ConfigError("server.mode", f"must be 'after-queue' or 'before-queue', got {server.mode!r}")
        if server.listen:
            _host_port("server.listen", server.listen)
        _host_port("server.downstream", server.downstream)
        if server.milter_listen is not None:
            milter_address(server.milter_listen, "server.milter_listen")
        if server.metrics_listen is not None and server.metrics_listen.strip() in ("", "off"):
            server = replace(server, metrics_listen=None)  # TOML has no null: "" or "off" turn it off
        elif server.metrics_listen is not None:
            # checked here, not first when the workers bind it: check-config said OK and every worker
            # died at start, restarted each second
            _host_port("server.metrics_listen", server.metrics_listen)
        if not server.listen and server.milter_listen is None:
            raise ConfigError("server.listen", "is empty and server.milter_listen is unset: nothing to serve")
        if server.milter_quarantine not in ("discard", "hold"):
            got = server.milter_quarantine
            raise ConfigError("server.milter_quarantine", f"must be 'discard' or 'hold', got {got!r}")
        if server.milter_progress_interval <= 0:
            raise ConfigError("server.milter_progress_interval", "must be more than 0 seconds")
        _check_networks("server.xforward_hosts", server.xforward_hosts)
        cfg = replace(cfg, server=server)
    if "store" in raw:
        cfg = replace(cfg, store=_store(_table("store", raw["store"])))
    if "auth" in raw:
        cfg = replace(cfg, auth=_auth(_table("auth", raw["auth"])))
    if "reputation" in raw:
        cfg = replace(cfg, reputation=_reputation(_table("reputation", raw["reputation"])))
        if cfg.reputation.zones and not cfg.auth.enabled:
            raise ConfigError("reputation.zone", "needs auth.enabled = true (its resolver asks the lists)")
    scan_timeout = cfg.server.scan_timeout
    if cfg.auth.enabled and scan_timeout and cfg.auth.timeout >= scan_timeout:
        raise ConfigError(
            "auth.timeout",
            f"({cfg.auth.timeout:g} s) must stay under server.scan_timeout ({scan_timeout:g} s), or a DNS "
            "outage would fail every scan",
        )
    dns_wait = cfg.auth.timeout + cfg.reputation.timeout
    if cfg.reputation.zones and cfg.server.scan_timeout and dns_wait >= cfg.server.scan_timeout:
        raise ConfigError(
            "reputation.timeout",
            f"auth.timeout + reputation.timeout ({dns_wait:g} s) must stay under server.scan_timeout "
            f"({cfg.server.scan_timeout:g} s), or a DNS outage would fail every scan",
        )
    return cfg


#: store.retention_days bounds: 0 put purge's cutoff at "now" (read by many as "keep forever", it
#: deleted every unlabelled verdict and held message); past 100 years the cutoff date overflows.
RETENTION_DAYS_MAX = 36_500


def _store(raw: Mapping[str, Any]) -> StoreConfig:
    store: StoreConfig = _simple(StoreConfig, "store", raw, StoreConfig())
    if not 1 <= store.retention_days <= RETENTION_DAYS_MAX:
        raise ConfigError("store.retention_days", f"must be 1 to {RETENTION_DAYS_MAX} days, got "
                          f"{store.retention_days} (0 would purge every message, even one held a second ago)")
    return store


#: [server] counts that must be at least 1: no worker serves nothing, a batch of none scores nothing
#: (the batcher refuses to start), no session slot refuses every client.
SERVER_COUNTS = ("workers", "batch_max", "max_sessions")
#: [server] timeouts that must be more than 0: at 0 every session, DATA phase or relay attempt would
#: time out at once (scan_timeout, heap_trim_interval and the prepare limits read 0 as off).
SERVER_TIMEOUTS = ("command_timeout", "data_timeout", "downstream_timeout", "milter_timeout")


def _check_server_limits(server: ServerConfig) -> None:
    """What `milter serve` cannot run with fails here, so `milter check-config` catches it too."""
    for key in SERVER_COUNTS:
        if (count := getattr(server, key)) < 1:
            raise ConfigError(f"server.{key}", f"must be at least 1, got {count!r}")
    for key in SERVER_TIMEOUTS:
        if (seconds := getattr(server, key)) <= 0:
            raise ConfigError(f"server.{key}", f"must be more than 0 seconds, got {seconds!r}")
    if not server.hostname.strip() or any(c.isspace() for c in server.hostname):
        raise ConfigError("server.hostname", f"must be a host name (our EHLO name), got {server.hostname!r}")


ZONE_KINDS = ("ip", "domain")
ZONE_ACTIONS = ("tag", "quarantine", "reject")
ZONE_VERDICTS = ("spam", "bec")
ZONE_SOURCES = ("sender", "links")


def _reputation(raw: Mapping[str, Any]) -> ReputationConfig:
    unknown = set(raw) - {"zone", "timeout", "skip_domains"}
    if unknown:
        known = "skip_domains, timeout, zone"
        raise ConfigError(f"reputation.{sorted(unknown)[0]}", f"unknown key (known: {known})")
    rep: ReputationConfig = _simple(
        ReputationConfig, "reputation", {k: v for k, v in raw.items() if k != "zone"}, ReputationConfig()
    )
    rep = replace(rep, skip_domains=_domains("reputation.skip_domains", rep.skip_domains))
    if rep.timeout <= 0:
        raise ConfigError("reputation.timeout", f"must be more than 0 seconds, got {rep.timeout!r}")
    zones = raw.get("zone", [])
    if not isinstance(zones, list):
        raise ConfigError("reputation.zone", "must be an array of tables ([[reputation.zone]])")
    return replace(rep, zones=tuple(_zone(f"reputation.zone[{i}]", z) for i, z in enumerate(zones)))


def _zone(key: str, raw: Any) -> ZoneConfig:
    item = dict(_table(key, raw))
    for required in ("name", "kind"):
        if not isinstance(item.get(required), str):
            raise ConfigError(f"{key}.{required}", "required string")
    codes = item.pop("codes", {})
    if not isinstance(codes, Mapping) or not all(isinstance(v, str) for v in codes.values()):
        raise ConfigError(f"{key}.codes", 'must be a table of "127.0.0.2" = "meaning" entries')
    base = ZoneConfig(name=item["name"], kind=item["kind"])
    zone: ZoneConfig = _simple(ZoneConfig, key, {k: v for k, v in item.items() if k != "codes"}, base)
    name = zone.name.strip().rstrip(".").lower()
    if _DOMAIN_NAME.fullmatch(name) is None:
        raise ConfigError(f"{key}.name", f"must be a DNS zone such as zen.spamhaus.org, got {zone.name!r}")
    for field_name, allowed in (("kind", ZONE_KINDS), ("action", ZONE_ACTIONS), ("verdict", ZONE_VERDICTS)):
        if (got := getattr(zone, field_name)) not in allowed:
            raise ConfigError(f"{key}.{field_name}", f"must be one of {', '.join(allowed)}, got {got!r}")
    for i, source in enumerate(zone.sources):
        if source not in ZONE_SOURCES:
            raise ConfigError(f"{key}.sources[{i}]", f"must be 'sender' or 'links', got {source!r}")
    for code in codes:
        if not _is_ip(code) or ipaddress.ip_address(code) not in ipaddress.ip_network("127.0.0.0/8"):
            raise ConfigError(f"{key}.codes", f"{code!r} is not a list answer (an address in 127.0.0.0/8)")
    _check_networks(f"{key}.refusals", zone.refusals)
    if not 0.0 <= zone.min_score <= 1.0:
        raise ConfigError(f"{key}.min_score", f"must be a number between 0 and 1, got {zone.min_score!r}")
    return replace(zone, name=name, codes=tuple(sorted(codes.items())))


def _check_networks(key: str, entries: tuple[str, ...]) -> None:
    for i, net in enumerate(entries):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError as exc:
            raise ConfigError(f"{key}[{i}]", f"not an IP address or CIDR: {net!r}") from exc


#: About 100 MiB of answers per worker, and a 17 ms sweep of them on the event loop every 10,000
#: lookups (milter/auth/cache.py); a million would hold the loop a third of a second.
MAX_DNS_CACHE_ENTRIES = 100_000


def _auth(raw: Mapping[str, Any]) -> AuthConfig:
    auth: AuthConfig = _simple(AuthConfig, "auth", raw, AuthConfig())
    if auth.timeout <= 0:
        raise ConfigError("auth.timeout", f"must be more than 0 seconds, got {auth.timeout!r}")
    for i, entry in enumerate(auth.nameservers):
        nameserver(entry, f"auth.nameservers[{i}]")
    if auth.dns_cache_entries > MAX_DNS_CACHE_ENTRIES:
        raise ConfigError(
            "auth.dns_cache_entries",
            f"must be at most {MAX_DNS_CACHE_ENTRIES} (0: no cache), got {auth.dns_cache_entries!r}",
        )
    sealers = tuple(
        _sealer(f"auth.trusted_arc_sealers[{i}]", d) for i, d in enumerate(auth.trusted_arc_sealers)
    )
    return replace(auth, trusted_arc_sealers=sealers)


_LABEL = r"[a-z0-9_](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})+")


def _sealer(key: str, value: str) -> str:
    """A trusted ARC sealer: a domain name with at least two labels (an ARC-Seal's d=), lower case.
    Compared exactly, so a typo or a wildcard must fail here rather than trust nobody silently."""
    domain = value.strip().rstrip(".").lower()
    if _DOMAIN_NAME.fullmatch(domain) is None or _is_ip(domain):
        raise ConfigError(key, f"must be a domain name such as 'lists.example.org', got {value!r}")
    return domain


# A domain entry of a list or rule: labels of letters (any script), digits, '-' and '_'. One label is
# allowed (a deny entry "xyz" covers the whole TLD); "@", wildcards and spaces are not: in_domain
# compares names, so "@example.com" or "*.example.com" would silently match nothing.
_ENTRY_DOMAIN = re.compile(r"(?=.{1,253}$)[\w-]{1,63}(?:\.[\w-]{1,63})*")
_DOMAIN_HINT = "a domain name such as 'example.com' (its subdomains are included; no '@' or wildcards)"


def _domain_name(key: str, value: str) -> str:
    """One domain entry, normalised as the policy compares it (trimmed, lower case, no final dot, in
    A-labels: the From domains of real mail are punycode, so a Unicode entry would match nothing)."""
    name = value.strip().rstrip(".").lower()
    if _ENTRY_DOMAIN.fullmatch(name) is None:
        raise ConfigError(key, f"must be {_DOMAIN_HINT}, got {value!r}")
    try:
        return ascii_domain(name)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


def _domains(key: str, entries: tuple[str, ...]) -> tuple[str, ...]:
    """Domain entries checked (`_domain_name`) and stored as compared; blank ones dropped, as the
    policy always skipped them."""
    return tuple(_domain_name(f"{key}[{i}]", e) for i, e in enumerate(entries) if e.strip())


def _check_addresses(key: str, entries: tuple[str, ...]) -> None:
    """Every non-blank entry an address (local@domain): the policy compares whole addresses, so a bare
    name, a domain or an address in angle brackets would silently match nobody."""
    for i, entry in enumerate(entries):
        text = entry.strip()
        if not text:
            continue
        local, at, domain = text.rpartition("@")
        if at and local and not any(c.isspace() or c in "<>*" for c in local):
            try:
                # the domain part as a domain entry is checked: a name, and one with an A-label form
                _domain_name(key, domain)
                continue
            except ConfigError:
                pass
        hint = " (a whole domain goes in the _domains list)" if not at else ""
        raise ConfigError(
            f"{key}[{i}]", f"must be an address such as 'jane@example.com'{hint}, got {entry!r}"
        )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def nameserver(entry: str, key: str = "nameserver") -> tuple[str, int]:
    """"IP", "IP:PORT" or "[IPv6]:PORT" -> (ip, port); ConfigError naming `key` otherwise."""
    text, port = entry.strip(), 53
    try:
        ipaddress.ip_address(text)
        return text, port
    except ValueError:
        pass
    host, port = _host_port(key, text)
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(key, f"not an IP address (with an optional :PORT): {entry!r}") from exc
    return host, port


def _host_port(key: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(key, f"must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def host_port(value: str, key: str = "address") -> tuple[str, int]:
    """Split HOST:PORT (IPv6 in brackets allowed); ConfigError naming `key` otherwise."""
    return _host_port(key, value)


@dataclass(frozen=True)
class MilterAddress:
    """Where the milter listens: a TCP address or a unix socket path (Postfix's notation)."""

    host: str | None = None
    port: int | None = None
    path: str | None = None


def milter_address(value: str, key: str = "server.milter_listen") -> MilterAddress:
    """`inet:HOST:PORT` (IPv6 in brackets), `inet6:...` or `unix:PATH` / `local:PATH`."""
    kind, sep, rest = value.partition(":")
    if sep and kind in ("unix", "local"):
        if not rest.startswith("/"):
            raise ConfigError(key, f"a unix socket needs an absolute path, got {value!r}")
        return MilterAddress(path=rest)
    if sep and kind in ("inet", "inet6"):
        # Port 0 lets the system choose (tests; the "listening" log line names the port chosen).
        host, psep, port = rest.rpartition(":")
        if psep and host and port == "0":
            return MilterAddress(host=host.strip("[]"), port=0)
        host, number = _host_port(key, rest)
        return MilterAddress(host=host, port=number)
    raise ConfigError(key, f"must be 'inet:HOST:PORT' or 'unix:/PATH', got {value!r}")


def load_config(path: Path | None) -> Config:
    """Read a TOML file; None gives the defaults."""
    if path is None:
        return Config()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from exc
    cfg = parse_config(raw)
    if not cfg.model.path.is_absolute() and "path" in raw.get("model", {}):
        # a relative model path means "next to this config file", not "wherever the service started"
        cfg = replace(cfg, model=replace(cfg.model, path=(path.parent / cfg.model.path).resolve()))
    return cfg
