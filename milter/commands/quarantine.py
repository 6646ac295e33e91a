"""`milter quarantine`: list, inspect, label, delete and purge what the store holds.

Scripts can trust the exit status: 0 ok, 1 error (one clear line on stderr, never a traceback),
2 bad usage (click's convention). `list --json` prints one JSON object per line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from milter.config import load_config
from milter.errors import ConfigError, StoreError
from milter.store import MessageRow, Store
from milter.types import CLASS_NAMES

F = TypeVar("F", bound=Callable[..., Any])


def _store_options(func: F) -> F:
    func = click.option("--config", "config_path", type=click.Path(path_type=Path),
                        help="Config file; its [store] url is the default database.")(func)
    return click.option("--db", "db_url", envvar="MILTER_STORE_URL",
                        help="Store URL (sqlite:///path or postgresql+psycopg://...).")(func)


def _config_store(config_path: Path | None) -> tuple[str, int]:
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    return cfg.store.url, cfg.store.retention_days


def _open(db_url: str | None, config_path: Path | None) -> Store:
    url = db_url or _config_store(config_path)[0]
    try:
        return Store.open(url)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc


def _parse_since(value: str | None) -> datetime | None:
    """ISO 8601 date/time (naive means UTC) or a relative age such as 90m, 24h, 7d."""
    if value is None:
        return None
    units = {"m": "minutes", "h": "hours", "d": "days"}
    if value[:-1].isdigit() and value[-1:] in units:
        return datetime.now(UTC) - timedelta(**{units[value[-1]]: int(value[:-1])})
    try:
        when = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter("expected ISO 8601 (2024-05-01T12:00) or an age like 24h / 7d") from exc
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


@click.group("quarantine")
def quarantine() -> None:
    """Review the quarantine and maintain the verdict store."""


@quarantine.command("list")
@_store_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--since", help="Only messages received since (ISO 8601 or an age: 24h, 7d).")
@click.option("--verdict", type=click.Choice(CLASS_NAMES))
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0)
@click.option("--all", "include_deleted", is_flag=True, help="Include deleted messages.")
def list_cmd(db_url: str | None, config_path: Path | None, as_json: bool, since: str | None,
             verdict: str | None, limit: int, offset: int, include_deleted: bool) -> None:
    """Quarantined messages, newest first."""
    after = _parse_since(since)
    with _open(db_url, config_path) as store:
        rows = _call(lambda: store.quarantine_list(after, verdict, limit, offset, include_deleted))
    if as_json:
        for row in rows:
            click.echo(json.dumps(row.as_json(), ensure_ascii=False))
    else:
        console = Console()
        if not console.is_terminal:  # piped (grep, less): do not squeeze into 80 columns
            console = Console(width=200)
        console.print(_table(rows))


def _call(func: Callable[[], Any]) -> Any:
    try:
        return func()
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc


def _table(rows: list[MessageRow]) -> Table:
    table = Table("id", "received (UTC)", "verdict", "action", "spam", "bec", "from", "subject", "state")
    for r in rows:
        state = "deleted" if r.deleted_at else "released" if r.released_at else "held"
        table.add_row(
            str(r.id), r.received_at.strftime("%Y-%m-%d %H:%M:%S"), r.verdict, r.action,
            f"{r.scores.spam:.3f}", f"{r.scores.bec:.3f}", r.from_addr or "", r.subject or "", state,
        )
    if not rows:
        table.caption = "quarantine is empty"
    return table


@quarantine.command("show")
@_store_options
@click.argument("message", type=int)
def show_cmd(db_url: str | None, config_path: Path | None, message: int) -> None:
    """Everything the store knows about one message (JSON)."""
    with _open(db_url, config_path) as store:
        row = _call(lambda: store.get(message))
    if row is None:
        raise click.ClickException(f"no message with id {message}")
    click.echo(json.dumps(row.as_json(), ensure_ascii=False, indent=2))


@quarantine.command("raw")
@_store_options
@click.argument("message", type=int)
def raw_cmd(db_url: str | None, config_path: Path | None, message: int) -> None:
    """Write the quarantined bytes to stdout (e.g. `| sendmail -i -- RCPT` to release by hand)."""
    with _open(db_url, config_path) as store:
        raw = _call(lambda: store.get_raw(message))
    if raw is None:
        raise click.ClickException(f"message {message} is not held in quarantine")
    sys.stdout.buffer.write(raw)
    sys.stdout.buffer.flush()


@quarantine.command("delete")
@_store_options
@click.argument("messages", type=int, nargs=-1, required=True)
def delete_cmd(db_url: str | None, config_path: Path | None, messages: tuple[int, ...]) -> None:
    """Delete the bytes of quarantined messages (their verdicts stay)."""
    with _open(db_url, config_path) as store:
        n = _call(lambda: store.delete(messages))
    click.echo(f"deleted {n} of {len(messages)}")


@quarantine.command("label")
@_store_options
@click.option("--source", default="cli", show_default=True, help="Who says so (kept with the label).")
@click.argument("message")
@click.argument("label", type=click.Choice(CLASS_NAMES))
def label_cmd(db_url: str | None, config_path: Path | None, source: str, message: str, label: str) -> None:
    """Label MESSAGE (row id, or Message-ID for every copy) as ham, spam or bec for retraining."""
    ref: int | str = int(message) if message.isdigit() else message
    with _open(db_url, config_path) as store:
        n = _call(lambda: store.set_label(ref, label, source))
    if n == 0:
        raise click.ClickException(f"no message matches {message!r}")
    click.echo(f"labelled {n} message(s) {label}")


@quarantine.command("purge")
@_store_options
@click.option("--days", type=click.IntRange(min=0), help="Retention in days [default: store.retention_days].")
def purge_cmd(db_url: str | None, config_path: Path | None, days: int | None) -> None:
    """Delete verdicts and quarantined messages older than the retention (labelled verdicts stay)."""
    if days is None:
        days = _config_store(config_path)[1]
    with _open(db_url, config_path) as store:
        counts = _call(lambda: store.purge(days))
    click.echo(f"purged {counts.messages} verdict(s) and {counts.quarantined} quarantined message(s) "
               f"older than {days} day(s)")


@quarantine.command("stats")
@_store_options
def stats_cmd(db_url: str | None, config_path: Path | None) -> None:
    """Counts by verdict and action (JSON)."""
    with _open(db_url, config_path) as store:
        st = _call(store.stats)
    click.echo(json.dumps({
        "messages": st.messages, "quarantined": st.quarantined, "released": st.released,
        "labelled": st.labelled, "by_verdict": dict(st.by_verdict), "by_action": dict(st.by_action),
        "oldest": st.oldest.isoformat() if st.oldest else None,
        "newest": st.newest.isoformat() if st.newest else None,
    }))
