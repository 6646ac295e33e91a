"""`milter history`: rebuild the correspondence history (milter.history) from the stored verdicts, and
show what the store holds of it.

`rebuild` is for a site that turns the history on with months of verdicts already stored, and for
recovering from a bad history (wrong config, a bug): it replays every stored verdict that teaches, in
id order, through the same `CorrespondenceHistory.observe` the gateway runs, and replaces the table in
one transaction, so a rebuild that fails leaves the old history. It sees only what retention kept of
the verdicts ([store] retention_days, 30 by default; labelled verdicts stay), while the history keeps
correspondents for `max_age_days` (400). So a rebuild refuses (exit 1) to drop entries the verdicts can
no longer vouch for: entries the replay lacks that were last seen before the oldest unlabelled verdict
it read (`at_risk`). `--force` replaces the table all the same. Refusing, not merging the old entries
in: a rebuild is also how a bad history is thrown away, and a merge would keep the bad along with the
old without saying so; refusing says what would be lost and leaves the choice to the admin.

What teaches: a label decides when there is one (ham and bulk teach; spam and bec never do, however
the message was delivered); otherwise the gateway's own `teaches` flag, or for verdicts stored before it
was recorded, an accepted ham or bulk verdict.

Exit status: 0 ok, 1 error (one clear line on stderr), 2 bad usage, as for `milter quarantine`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import click
from rich.table import Table

from milter.commands.quarantine import _call, _config, _console, _open, _store_options
from milter.history import (
    KINDS,
    CorrespondenceHistory,
    HistoryLimits,
    HistoryRow,
    MessageFacts,
    limits_of,
    stored_facts,
)
from milter.store import HistorySource, Store

PAGE = 2000  # verdicts per read: a large store is replayed without holding it all
TEACHING_LABELS = ("ham", "bulk")  # wanted mail (milter.types.wanted_label)
LEGACY_TEACHING_VERDICTS = ("ham", "bulk")
_DAY = 86_400.0


def teaches(src: HistorySource) -> bool:
    """Whether the history learns from this stored verdict (see the module docstring)."""
    if src.label is not None:
        return src.label in TEACHING_LABELS
    if src.teaches is not None:
        return src.teaches
    # stored before revision 0003: what the gateway then delivered untouched as wanted mail
    return src.verdict in LEGACY_TEACHING_VERDICTS and src.action == "accept"


def facts_of(src: HistorySource) -> MessageFacts:
    """The facts `observe` reads, as `milter.history.facts_from_summary` made them at the gateway."""
    return stored_facts(src.from_addr, src.from_display, src.rcpt_tos, src.reply_to)


@dataclass(frozen=True)
class Replay:
    """A history replayed from the store, and how much of the store it read."""

    history: CorrespondenceHistory
    read: int  # verdicts read
    taught: int  # of which the history learned from
    # received_at (POSIX) of the oldest unlabelled verdict read: retention deletes those, so before it
    # the replay knows only what labels kept (None: no such verdict, the replay vouches for no time)
    covered_from: float | None = None


def _sources(store: Store) -> Iterator[HistorySource]:
    after = 0
    while True:
        page: list[HistorySource] = _call(partial(store.history_sources, after, PAGE))
        yield from page
        if len(page) < PAGE:
            return
        after = page[-1].id


def replay(store: Store, limits: HistoryLimits, now: float) -> Replay:
    """Every stored verdict that teaches, observed in id order (arrival order), then aged to `now`
    as a gateway's history would be."""
    history = CorrespondenceHistory(limits)
    read = taught = 0
    covered: float | None = None
    for src in _sources(store):
        read += 1
        if src.label is None:
            when = _aware(src.received_at).timestamp()
            covered = when if covered is None else min(covered, when)
        if teaches(src):
            taught += 1
            history.observe(facts_of(src), src.received_at, outbound=bool(src.outbound))
    history.expire(now)
    return Replay(history, read, taught, covered)


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)  # the store keeps UTC


@dataclass(frozen=True)
class AtRisk:
    """Stored entries a rebuild would drop that the stored verdicts no longer vouch for."""

    entries: int
    oldest: float | None  # last seen of the oldest of them


def at_risk(stored: Iterable[HistoryRow], result: Replay, limits: HistoryLimits, now: float) -> AtRisk:
    """Entries of the stored history, not yet aged out, that the replay lacks and that were last seen
    before the replay's coverage (`Replay.covered_from`): what retention deleted the verdicts of. An
    entry last seen after it is missing for a reason the verdicts give (a spam or bec label), which is
    what a rebuild is for."""
    aged = now - limits.max_age_days * _DAY
    covered = now if result.covered_from is None else result.covered_from
    replayed = {(r.kind, r.key, r.member) for r in result.history.rows()}
    lost = [r.last_seen for r in stored
            if aged <= r.last_seen < covered and (r.kind, r.key, r.member) not in replayed]
    return AtRisk(len(lost), min(lost) if lost else None)


def _risk_line(risk: AtRisk, result: Replay) -> str:
    covered = result.covered_from
    kept = f"they go back to {_day(covered)}" if covered is not None else "none is kept"
    return (f"the rebuild would drop {risk.entries} history entries last seen from {_day(risk.oldest)}: the "
            f"stored verdicts no longer cover them ([store] retention_days; {kept})")


def _kind_table(counts: dict[str, int]) -> Table:
    table = Table("kind")
    table.add_column("entries", justify="right")
    known = [k for k in KINDS if k in counts] + sorted(k for k in counts if k not in KINDS)
    for kind in known:
        table.add_row(kind, str(counts[kind]))
    table.add_row("total", str(sum(counts.values())), style="bold")
    return table


def _day(when: float | None) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d") if when is not None else "-"


@click.group("history")
def history() -> None:
    """The correspondence history: who has exchanged mail with whom."""


@history.command("rebuild")
@_store_options
@click.option("--dry-run", is_flag=True, help="Replay and print the counts; write nothing.")
@click.option("--force", is_flag=True,
              help="Replace the history even where the stored verdicts no longer cover entries it holds.")
def rebuild_cmd(db_url: str | None, config_path: Path | None, dry_run: bool, force: bool) -> None:
    """Replace the history with a replay of the stored verdicts ([policy.history] limits)."""
    limits = limits_of(_config(config_path).policy.history)
    now = time.time()
    with _open(db_url, config_path) as store:
        result = replay(store, limits, now)
        counts: dict[str, int] = {}
        for row in result.history.rows():
            counts[row.kind] = counts.get(row.kind, 0) + 1
        stored = _call(partial(store.history_rows, now - limits.max_age_days * _DAY))
        risk = at_risk(stored, result, limits, now)
        if risk.entries and not force and not dry_run:
            raise click.ClickException(_risk_line(risk, result) + "; nothing written (--force replaces it)")
        if not dry_run:
            _call(lambda: store.history_replace(result.history.rows()))
    console = _console()
    if risk.entries:
        console.print(_risk_line(risk, result) + ("" if dry_run else "; replaced anyway (--force)"))
    console.print(f"read {result.read} verdict(s), {result.taught} taught the history")
    total = sum(counts.values())
    console.print(f"would write {total} entries (dry run: nothing written)" if dry_run
                  else f"replaced the history with {total} entries")
    console.print(_kind_table(counts))


@history.command("stats")
@_store_options
def stats_cmd(db_url: str | None, config_path: Path | None) -> None:
    """Entries per kind, and the oldest and newest last seen (UTC days)."""
    with _open(db_url, config_path) as store:
        st = _call(store.history_stats)
    console = _console()
    console.print("correspondence history: entries per kind")
    console.print(_kind_table(dict(st.by_kind)))
    console.print(f"last seen: oldest {_day(st.oldest)}, newest {_day(st.newest)} (UTC); {st.total} in all")
