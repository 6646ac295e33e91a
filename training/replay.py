"""Replay real mailboxes in time order through the correspondence history (issue 17, item 4).

    .venv/bin/python -m training.replay --corpus enron-spam-raw [--scope org|mailbox] [--warmup-days 90]
                                        [--json out.json]

What it measures, before any history signal may act in the gateway: for each signal
(`milter.history_signals.SIGNALS`), how many real ham messages it fires on; and on BEC cases generated
from the same mail (`training.bec_cases`), how many the right signal catches and how many of their
legitimate counterparts pass. It also times the history's own CPU per message (`lookup` + signals +
`observe`; feature extraction is the gateway's anyway and not counted).

**The data.** `.cache/corpora/<corpus>/MANIFEST.tsv`: ham rows only; the sub-collection is the mailbox
(kaminski-v, farmer-d, ...), i.e. its owner. Messages are ordered by their Date header; undated ones are
skipped and counted. The Enron export keeps From as a bare address and the display name the reader saw
in `X-From` ("Kitchen, Louise </O=ENRON/...>", "Jim Lokay <lokay@bigfoot.com>@ENRON <IMCEANOTES-...>"),
so a display name is taken from From, else from X-From with its <...> parts and @ENRON suffix removed.
There is no Reply-To anywhere in the Enron ham: `reply_to_unseen` cannot fire on it, and its 0 says nothing.

**Sent mail.** The mailboxes have no "sent" folders in this corpus; the owner's own messages are filed
among the rest. The owner's address is the mailbox's commonest recipient whose local part holds the
mailbox's surname (kaminski-v: vince.kaminski@enron.com), and a message whose From is that address is
outbound: our user writing to its To/Cc/Bcc. Found in the data: kaminski-v 865 such messages, lokay-m 57,
williams-w3 22, kitchen-l 19, beck-s 3, farmer-d none (daren.farmer@enron.com never appears in From).
Every other message is inbound, to the owner (the envelope recipient that filed it in this mailbox),
whatever its To says (lists, Bcc).

**Scope.** `org` (default): one history for enron.com, as one gateway would keep it, fed by all six
mailboxes in one time order. `mailbox`: a history per mailbox, as six separate small sites.

**Warm-up.** The first `--warmup-days` (90) of each mailbox, counted from its first dated message, only
teach the history: a new site's first months are all first contacts. After it every inbound message is
judged (signals, before it is observed) and then observed; outbound messages are only observed.

**BEC cases.** Built after warm-up from inbound messages the history already knows something about, one
in `CASE_EVERY` by the message's sha256, at most `CASES_PER_SENDER` per sender address and kind and
`--max-cases` per kind, each judged against the history as it stands at that moment and never observed:

* `freemail_name`: the display name has come on >= `FREQUENT` messages, the sender is not at free-mail,
  and the generated free-mail address was never seen (an internal or external correspondent alike: the
  CEO's name is the classic one);
* `lookalike_vendor`: the sender is outside our domains, not at free-mail, and its address has exchanged
  >= 2 messages with us (there is a thread to continue); the lookalike domain was never seen;
* `reply_to_bank`: the sender is outside our domains and its address has exchanged >= 2 messages with
  us; the message is one text/plain part (its body is rewritten); the Reply-To was never seen.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

from milter.features import extract
from milter.features.context import Protected
from milter.features.lexicon import FREEMAIL
from milter.history import (
    CorrespondenceHistory,
    HistoryLimits,
    HistoryView,
    MessageFacts,
    domain_of,
    facts_from_summary,
)
from milter.history_signals import MONEY_LANGUAGE, SIGNALS, evaluate
from milter.parse import ParsedMessage, parse
from milter.policy.table import in_domain
from training import bec_cases
from training.corpora import dedupe, load_manifest, parse_date, read_header_block

CASE_EVERY = 4  # one eligible message in four becomes a case (by sha256), spreading cases over time
CASES_PER_SENDER = 3  # per kind: no single chatty correspondent fills a kind
FREQUENT = 5  # messages that make a display name or a domain a frequent correspondent
DEFAULT_MAX_CASES = 300
_ANGLE = re.compile(r"<[^>]*>?")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True)
class Mail:
    """One ham message of the corpus, as the replay orders and routes it."""

    mailbox: str
    path: Path
    sha256: str
    when: datetime
    order: int
    sender: str
    display: str
    recipients: tuple[str, ...]  # To, Cc and Bcc addresses


@dataclass(frozen=True)
class CaseResult:
    kind: str
    technique: str
    sender: str  # the real correspondent
    attacker: str  # the address the attacker controls
    internal_source: bool  # built from a message by one of our own people
    caught: bool  # the kind's expected signal fired on the attack
    counterpart_right_silent: bool  # the expected signal stayed silent on the counterpart
    counterpart_silent: bool  # no signal at all fired on the counterpart


@dataclass
class Tallies:
    """The replay's counters (one owner: `replay`; returned frozen as `Report`)."""

    fires: Counter[str] = field(default_factory=Counter)
    fires_external: Counter[str] = field(default_factory=Counter)
    money_groups: Counter[str] = field(default_factory=Counter)
    judged: int = 0
    judged_external: int = 0
    outbound: int = 0
    warmup: int = 0
    cpu_ns: list[int] = field(default_factory=list)
    cases: list[CaseResult] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))


@dataclass(frozen=True)
class Report:
    corpus: str
    scope: str
    warmup_days: float
    case_slice: int
    our_domains: tuple[str, ...]
    ham: int
    undated: int
    outbound: int
    warmup: int
    judged: int
    judged_external: int
    fires: dict[str, int]
    fires_external: dict[str, int]
    money_groups: dict[str, int]
    cases: dict[str, dict[str, int]]
    techniques: dict[str, dict[str, int]]
    cpu_us: dict[str, float]
    entries: int
    owners: dict[str, str]
    examples: dict[str, list[str]]
    missed: dict[str, list[str]]


# --- reading the corpus ------------------------------------------------------------------------------


def xfrom_name(value: str | None) -> str:
    """The display name in an Enron X-From ('' when it is only an address)."""
    if not value:
        return ""
    text = _ANGLE.sub(" ", value).replace("@ENRON", " ").strip().strip('"').strip()
    return "" if "@" in text else " ".join(text.split())


def _mail(mailbox: str, path: Path, sha256: str, order: int, when: datetime, head: ParsedMessage) -> Mail:
    froms = head.addresses("from")
    sender, display = (froms[0][1], froms[0][0]) if froms else ("", "")
    rcpts = tuple(dict.fromkeys(a for n in ("to", "cc", "bcc") for _, a in head.addresses(n) if "@" in a))
    return Mail(mailbox, path, sha256, when, order, sender, display or xfrom_name(head.get("x-from")), rcpts)


def load_mail(corpus_dir: Path) -> tuple[list[Mail], int]:
    """The corpus's ham, deduplicated, in Date order; and how many undated messages were skipped."""
    messages, _ = dedupe(m for m in load_manifest(corpus_dir) if m.label == "ham")
    out: list[Mail] = []
    undated = 0
    for m in messages:
        block = read_header_block(m.path)
        when = parse_date(block)
        if when is None:
            undated += 1
            continue
        out.append(_mail(m.subcollection, m.path, m.sha256, m.order, when, parse(block + b"\n\n")))
    out.sort(key=lambda m: (m.when, m.order))
    return out, undated


def owners_of(mail: Iterable[Mail], our_domains: Sequence[str]) -> dict[str, str]:
    """Each mailbox's owner: its commonest recipient in our domains whose local part holds the mailbox's
    surname ("kaminski-v" -> kaminski), else its commonest recipient."""
    seen: dict[str, Counter[str]] = defaultdict(Counter)
    for m in mail:
        seen[m.mailbox].update(m.recipients)
    owners = {}
    for mailbox, counts in seen.items():
        surname = mailbox.split("-")[0].lower()
        mine = [(n, a) for a, n in counts.items()
                if surname in a.partition("@")[0] and in_domain(a.rpartition("@")[2], our_domains)]
        owners[mailbox] = max(mine)[1] if mine else counts.most_common(1)[0][0]
    return owners


# --- one message -------------------------------------------------------------------------------------


def facts_of(raw: bytes, mail: Mail, owner: str, outbound: bool) -> MessageFacts:
    """The facts the gateway would see: the summary of `extract`, the replay's recipients, and the X-From
    display name where From has none (see the module docstring)."""
    summary = extract(raw).summary
    recipients = mail.recipients if outbound else (owner,)
    facts = facts_from_summary(summary, recipients)
    if not facts.display and summary.from_addr == mail.sender:
        facts = replace(facts, display=mail.display)
    return facts


def _single_text_part(raw: bytes) -> bool:
    head = parse(_BLANK_LINE.split(raw, maxsplit=1)[0] + b"\n\n")
    ctype = (head.get("content-type") or "text/plain").lower()
    cte = (head.get("content-transfer-encoding") or "7bit").strip().lower()
    return ctype.startswith("text/plain") and cte in ("7bit", "8bit")


# --- BEC cases ---------------------------------------------------------------------------------------


def _make_cases(
    raw: bytes, mail: Mail, facts: MessageFacts, view: HistoryView, history: CorrespondenceHistory,
    protected: Protected, made: Counter[tuple[str, str]], case_slice: int = 0,
) -> list[bec_cases.Case]:
    """The cases this real message is eligible for (module docstring), each checked to use an address
    or domain the history has never seen."""
    # sampling and the generator's choices read different bits of the hash: sharing them would tie
    # the technique to the sampling (every sampled seed even, so half the techniques never drawn)
    if int(mail.sha256[:8], 16) % CASE_EVERY != case_slice or not facts.sender:
        return []
    seed = int(mail.sha256[8:24], 16)
    domain = domain_of(facts.sender)
    external = in_domain(domain, protected.domains) is None
    freemail = domain in FREEMAIL
    out = []
    if view.name and view.name_messages >= FREQUENT and not freemail:
        case = bec_cases.freemail_name(raw, facts.display, seed)
        if case.attacker not in history.addresses and case.attacker not in view.name_addresses:
            out.append(case)
    if external and not freemail and view.address is not None and view.address.messages >= 2:
        case = bec_cases.lookalike_vendor(raw, facts.display, facts.sender, seed, domain)
        if domain_of(case.attacker) not in history.keys:
            out.append(case)
    if external and view.address is not None and view.address.messages >= 2 and _single_text_part(raw):
        case = bec_cases.reply_to_bank(raw, facts.sender, seed, domain)
        if case.attacker not in history.addresses and case.attacker not in history.reply_tos:
            out.append(case)
    kept = [c for c in out if made[(c.kind, facts.sender)] < CASES_PER_SENDER]
    for c in kept:
        made[(c.kind, facts.sender)] += 1
    return kept


def _judge_case(
    case: bec_cases.Case, mail: Mail, owner: str, history: CorrespondenceHistory, protected: Protected
) -> CaseResult:
    expected = bec_cases.EXPECTED[case.kind]

    def fired(raw: bytes) -> set[str]:
        facts = facts_of(raw, mail, owner, outbound=False)
        return set(evaluate(facts, history.lookup(facts, protected.names), protected))

    attack, counterpart = fired(case.attack), fired(case.counterpart)
    return CaseResult(
        kind=case.kind, technique=case.technique, sender=mail.sender, attacker=case.attacker,
        internal_source=in_domain(domain_of(mail.sender), protected.domains) is not None,
        caught=bool(attack & expected),
        counterpart_right_silent=not counterpart & expected,
        counterpart_silent=not counterpart,
    )


# --- the replay --------------------------------------------------------------------------------------


def replay(
    mail: Sequence[Mail], owners: Mapping[str, str], protected: Protected, *, scope: str = "org",
    warmup_days: float = 90.0, limits: HistoryLimits | None = None, max_cases: int = DEFAULT_MAX_CASES,
    case_slice: int = 0,
) -> tuple[Tallies, int]:
    """Run the replay; returns the counters and the entries the history holds at the end. `case_slice`
    (0 to CASE_EVERY - 1) picks which quarter of the messages become cases: disjoint sets, so a slice
    nobody looked at while writing the signals is a held-out test of them."""
    histories: dict[str, CorrespondenceHistory] = {}
    starts: dict[str, datetime] = {}
    warmup = timedelta(days=warmup_days)
    made: Counter[tuple[str, str]] = Counter()
    t = Tallies()
    for m in mail:
        history = histories.setdefault("org" if scope == "org" else m.mailbox, CorrespondenceHistory(limits))
        start = starts.setdefault(m.mailbox, m.when)
        owner = owners[m.mailbox]
        outbound = m.sender == owner
        raw = m.path.read_bytes()
        facts = facts_of(raw, m, owner, outbound)
        if outbound or m.when < start + warmup:
            t.outbound += outbound
            t.warmup += not outbound
            history.observe(facts, m.when, outbound)
            continue
        began = time.thread_time_ns()
        view = history.lookup(facts, protected.names)
        fired = evaluate(facts, view, protected)
        spent = time.thread_time_ns() - began
        _count(t, facts, fired, protected)
        # cases are judged against the history as it was before the real message, like the message itself
        for case in _make_cases(raw, m, facts, view, history, protected, made, case_slice):
            if sum(c.kind == case.kind for c in t.cases) < max_cases:
                t.cases.append(_judge_case(case, m, owner, history, protected))
        began = time.thread_time_ns()
        history.observe(facts, m.when, outbound=False)
        t.cpu_ns.append(spent + time.thread_time_ns() - began)
    return t, sum(len(h) for h in histories.values())


def _count(t: Tallies, facts: MessageFacts, fired: Mapping[str, str], protected: Protected) -> None:
    external = in_domain(domain_of(facts.sender), protected.domains) is None
    t.judged += 1
    t.judged_external += external
    for name, reason in fired.items():
        t.fires[name] += 1
        t.fires_external[name] += external
        if len(t.examples[name]) < 5:
            t.examples[name].append(reason)
    if "first_contact_money" in fired:
        groups = facts.language & MONEY_LANGUAGE
        t.money_groups.update(groups)
        t.money_groups["(not urgency alone)"] += groups != {"urgency"}


def _report(
    t: Tallies, corpus: str, scope: str, warmup_days: float, protected: Protected, ham: int, undated: int,
    entries: int, owners: Mapping[str, str], case_slice: int = 0,
) -> Report:
    cases: dict[str, dict[str, int]] = {}
    for kind in bec_cases.KINDS:
        rows = [c for c in t.cases if c.kind == kind]
        cases[kind] = {
            "cases": len(rows), "internal_source": sum(c.internal_source for c in rows),
            "caught": sum(c.caught for c in rows),
            "counterpart_right_silent": sum(c.counterpart_right_silent for c in rows),
            "counterpart_silent": sum(c.counterpart_silent for c in rows),
        }
    techniques: dict[str, dict[str, int]] = defaultdict(lambda: {"cases": 0, "caught": 0})
    for c in t.cases:
        techniques[f"{c.kind}/{c.technique}"]["cases"] += 1
        techniques[f"{c.kind}/{c.technique}"]["caught"] += c.caught
    ns = t.cpu_ns or [0]
    cpu_us = {
        "median": statistics.median(ns) / 1000, "mean": statistics.fmean(ns) / 1000,
        "p99": sorted(ns)[int(len(ns) * 0.99) - 1 if len(ns) > 1 else 0] / 1000, "max": max(ns) / 1000,
    }
    return Report(
        corpus=corpus, scope=scope, warmup_days=warmup_days, case_slice=case_slice,
        our_domains=protected.domains, ham=ham,
        undated=undated, outbound=t.outbound, warmup=t.warmup, judged=t.judged,
        judged_external=t.judged_external,
        fires={name: t.fires[name] for name, _ in SIGNALS},
        fires_external={name: t.fires_external[name] for name, _ in SIGNALS},
        money_groups=dict(sorted(t.money_groups.items())), cases=cases,
        techniques=dict(sorted(techniques.items())), cpu_us=cpu_us, entries=entries, owners=dict(owners),
        examples={k: v for k, v in t.examples.items()},
        missed={kind: [f"{c.sender} -> {c.attacker}" for c in t.cases if c.kind == kind and not c.caught][:20]
                for kind in bec_cases.KINDS},
    )


# --- output ------------------------------------------------------------------------------------------


def _pct(n: int, d: int) -> str:
    return f"{100 * n / d:.3f} %" if d else "-"


def format_report(r: Report) -> str:
    ours = ", ".join(r.our_domains)
    lines = [
        f"Correspondence-history replay: {r.corpus} ham, scope {r.scope}, our domains: {ours}",
        f"warm-up: the first {r.warmup_days:g} days of each mailbox only teach the history",
        f"ham {r.ham} (undated, skipped: {r.undated}); outbound (owner's own) {r.outbound}; "
        f"inbound in warm-up {r.warmup}; judged {r.judged} (from outside {ours}: {r.judged_external})",
        "",
        f"{'signal':<26}{'fires':>7}{'% of judged ham':>18}{'% of outside ham':>18}",
    ]
    for name, _ in SIGNALS:
        lines.append(f"{name:<26}{r.fires[name]:>7}{_pct(r.fires[name], r.judged):>18}"
                     f"{_pct(r.fires_external[name], r.judged_external):>18}")
    if r.money_groups:
        groups = ", ".join(f"{g} {n}" for g, n in r.money_groups.items())
        lines.append(f"first_contact_money by language group (a message may have several): {groups}")
        lines.append("  (not urgency alone): fires where payment, bank-change or gift-card words are present")
    lines += ["", f"BEC cases (slice {r.case_slice} of {CASE_EVERY}); cp = the legitimate counterparts",
              f"{'kind':<18}{'cases':>6}{'internal':>9}{'caught (right signal)':>24}"
              f"{'cp: right one silent':>22}{'cp: all silent':>20}"]
    for kind, c in r.cases.items():
        n = c["cases"]
        lines.append(f"{kind:<18}{n:>6}{c['internal_source']:>9}{_frac(c['caught'], n):>24}"
                     f"{_frac(c['counterpart_right_silent'], n):>22}{_frac(c['counterpart_silent'], n):>20}")
    lines.append("caught by technique:")
    lines += [f"  {k:<40}{_frac(v['caught'], v['cases']):>20}" for k, v in r.techniques.items()]
    cpu = r.cpu_us
    lines += ["", "history CPU per judged message (lookup + signals + observe): "
                  f"median {cpu['median']:.1f} us, mean {cpu['mean']:.1f} us, p99 {cpu['p99']:.1f} us, "
                  f"max {cpu['max']:.1f} us; entries held at the end: {r.entries}"]
    return "\n".join(lines)


def _frac(n: int, d: int) -> str:
    return f"{n}/{d} ({100 * n / d:.1f} %)" if d else "0/0"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.replay", description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="enron-spam-raw")
    ap.add_argument("--cache-dir", type=Path, default=Path(".cache/corpora"))
    ap.add_argument("--scope", choices=("org", "mailbox"), default="org")
    ap.add_argument("--warmup-days", type=float, default=90.0)
    ap.add_argument("--our-domain", action="append", dest="our_domains", help="repeatable; default enron.com")
    ap.add_argument("--protected-name", action="append", dest="protected_names", default=[])
    ap.add_argument("--max-age-days", type=float, default=HistoryLimits().max_age_days)
    ap.add_argument("--max-cases", type=int, default=DEFAULT_MAX_CASES, help="per case kind")
    ap.add_argument("--case-slice", type=int, choices=range(CASE_EVERY), default=0,
                    help="which disjoint quarter of the messages become BEC cases")
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args(argv)
    protected = Protected(domains=tuple(args.our_domains or ["enron.com"]), names=tuple(args.protected_names))
    mail, undated = load_mail(args.cache_dir / args.corpus)
    if not mail:
        print(f"no dated ham in {args.cache_dir / args.corpus}", file=sys.stderr)
        return 1
    owners = owners_of(mail, protected.domains)
    tallies, entries = replay(
        mail, owners, protected, scope=args.scope, warmup_days=args.warmup_days,
        limits=HistoryLimits(max_age_days=args.max_age_days), max_cases=args.max_cases,
        case_slice=args.case_slice,
    )
    report = _report(tallies, args.corpus, args.scope, args.warmup_days, protected, len(mail) + undated,
                     undated, entries, owners, args.case_slice)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
