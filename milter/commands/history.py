"""`milter history`: rebuild the correspondence history (milter.history) from the stored verdicts, and
show what the store holds of it.

`rebuild` is for a site that turns the history on with months of verdicts already stored, and for
recovering from a bad history (wrong config, a bug): it replays every stored verdict that teaches, in
id order, through the same `CorrespondenceHistory.observe` the gateway runs, and replaces the table in
one transaction, so a rebuild that fails leaves the old history. It sees only what retention kept of
the verdicts ([store] retention_days; labelled verdicts stay).

What teaches: a label decides when there is one (ham and bulk teach; spam and bec never do, however
the message was delivered); otherwise the gateway's own `teaches` flag, or for verdicts stored before it
was recorded, an accepted ham or bulk verdict.

Exit status: 0 ok, 1 error (one clear line on stderr), 2 bad usage, as for `milter quarantine`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import click
from rich.table import Table

from milter.commands.quarantine import _call, _config, _console, _open, _store_options
from milter.history import KINDS, CorrespondenceHistory, HistoryLimits, MessageFacts, limits_of, stored_facts
from milter.store import HistorySource, Store

PAGE = 2000  # verdicts per read: a large store is replayed without holding it all
TEACHING_LABELS = ("ham", "bulk")  # wanted mail (milter.types.wanted_label)
LEGACY_TEACHING_VERDICTS = ("ham", "bulk")


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
    for src in _sources(store):
        read += 1
        if teaches(src):
            taught += 1
            history.observe(facts_of(src), src.received_at, outbound=bool(src.outbound))
    history.expire(now)
    return Replay(history, read, taught)


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
def rebuild_cmd(db_url: str | None, config_path: Path | None, dry_run: bool) -> None:
    """Replace the history with a replay of the stored verdicts ([policy.history] limits)."""
    limits = limits_of(_config(config_path).policy.history)
    with _open(db_url, config_path) as store:
        result = replay(store, limits, time.time())
        counts: dict[str, int] = {}
        for row in result.history.rows():
            counts[row.kind] = counts.get(row.kind, 0) + 1
        if not dry_run:
            _call(lambda: store.history_replace(result.history.rows()))
    console = _console()
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
