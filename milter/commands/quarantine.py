"""`milter quarantine`: list, inspect, release, label, delete and purge what the store holds; `senders`
(milter/commands/quarantine_senders.py) shows whom the labels vouch for.

Scripts can trust the exit status: 0 ok, 1 error (one clear line on stderr, never a traceback),
2 bad usage (click's convention). `list --json` and `release --json` print one JSON object per line;
`show --json` prints one object. Text from messages is printed without Rich markup: a Subject such as
"[bold]" must show as typed, not style the terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from milter.commands import quarantine_view as view
from milter.commands.quarantine_release import ReleaseOutcome, release
from milter.config import RETENTION_DAYS_MAX, Config, host_port, load_config
from milter.errors import ConfigError, StoreError
from milter.parse import parse
from milter.store import MessageRow, Store
from milter.types import VERDICTS

F = TypeVar("F", bound=Callable[..., Any])

# Bounds on numbers from the command line: beyond them SQLite cannot even bind the value (64-bit
# INTEGER), and a date that far back overflows; both ended in a traceback, not one line and exit 2.
MAX_INT64 = 2**63 - 1
MAX_ID = 2**31 - 1  # messages.id is an INTEGER: 32 bits on PostgreSQL ("integer out of range" above)
MessageId = click.IntRange(1, MAX_ID)
PER_DAY = {"m": 24 * 60, "h": 24, "d": 1}  # --since units in a day


def _store_options(func: F) -> F:
    func = click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        help="Config file; its [store] url is the default database.",
    )(func)
    return click.option(
        "--db",
        "db_url",
        envvar="MILTER_STORE_URL",
        help="Store URL (sqlite:///path or postgresql+psycopg://...).",
    )(func)


def _config(config_path: Path | None) -> Config:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _config_store(config_path: Path | None) -> tuple[str, int]:
    cfg = _config(config_path)
    return cfg.store.url, cfg.store.retention_days


def _console() -> Console:
    console = Console()
    if not console.is_terminal:  # piped (grep, less): do not squeeze into 80 columns
        console = Console(width=200)
    return console


def _open(db_url: str | None, config_path: Path | None) -> Store:
    url = db_url or _config_store(config_path)[0]
    try:
        # must exist: these commands review what the gateway stored; creating an empty store instead
        # (a relative default URL in the wrong folder, a mistyped --db) showed "quarantine is empty"
        return Store.open(url, must_exist=True)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc


def _parse_since(value: str | None) -> datetime | None:
    """ISO 8601 date/time (naive means UTC) or a relative age such as 90m, 24h, 7d."""
    if value is None:
        return None
    units = {"m": "minutes", "h": "hours", "d": "days"}
    if value[:-1].isdigit() and value[-1:] in units:
        amount = int(value[:-1])
        # compared before any timedelta is made: a large one overflowed with a traceback
        if amount > RETENTION_DAYS_MAX * PER_DAY[value[-1]]:
            raise click.BadParameter(f"an age must be at most {RETENTION_DAYS_MAX} days")
        return datetime.now(UTC) - timedelta(**{units[value[-1]]: amount})
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
@click.option("--verdict", type=click.Choice(VERDICTS))
@click.option("--limit", type=click.IntRange(1, MAX_INT64), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(0, MAX_INT64), default=0)
@click.option("--recipient", metavar="ADDR", help="Only messages with ADDR among the envelope recipients.")
@click.option("--sender", metavar="ADDR", help="Only messages whose envelope sender or From is ADDR.")
@click.option("--reason", metavar="TEXT",
              help="Only messages with a reason containing TEXT (e.g. a blocklist's zone), any case.")
@click.option("--all", "include_deleted", is_flag=True, help="Include deleted messages.")
def list_cmd(
    db_url: str | None,
    config_path: Path | None,
    as_json: bool,
    since: str | None,
    verdict: str | None,
    limit: int,
    offset: int,
    recipient: str | None,
    sender: str | None,
    reason: str | None,
    include_deleted: bool,
) -> None:
    """Quarantined messages, newest first (addresses match whole, case-insensitively)."""
    after = _parse_since(since)
    with _open(db_url, config_path) as store:
        rows = _call(
            lambda: store.quarantine_list(
                after, verdict, limit, offset, include_deleted, recipient=recipient, sender=sender,
                reason=reason,
            )
        )
    if as_json:
        for row in rows:
            click.echo(view.json_text(row.as_json()))
    else:
        _console().print(_table(rows))


def _call(func: Callable[[], Any]) -> Any:
    try:
        return func()
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    except OverflowError as exc:  # a number the database cannot bind; the options bound most of them
        raise click.ClickException(f"number out of range: {exc}") from exc


def _table(rows: list[MessageRow]) -> Table:
    table = Table("id", "received (UTC)", "verdict", "action", "spam", "bec", "from", "subject", "state")
    for r in rows:
        state = "deleted" if r.deleted_at else "released" if r.released_at else "held"
        table.add_row(
            str(r.id),
            r.received_at.strftime("%Y-%m-%d %H:%M:%S"),
            r.verdict,
            r.action,
            f"{r.scores.spam:.3f}",
            f"{r.scores.bec:.3f}",
            Text(view.safe_line(r.from_addr or "")),
            Text(view.safe_line(r.subject or "")),
            state,
        )
    if not rows:
        table.caption = "quarantine is empty"
    return table


@quarantine.command("show")
@_store_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object with the same facts.")
@click.argument("message", type=MessageId)
def show_cmd(db_url: str | None, config_path: Path | None, as_json: bool, message: int) -> None:
    """One message for review: envelope, headers, verdict, a safe text preview, and why it was held.

    The preview is the text/plain part, or the HTML converted to text (never rendered), with control
    characters and terminal escapes removed, in a frame (text in a message cannot pass for the lines
    after it). "Why" lists the policy rules that fired and the model's
    exact per-feature contributions (TreeSHAP) to its score, in words: those stored with the verdict, or
    for an older verdict computed from its stored vector by the current model ([model] path in --config).
    """
    with _open(db_url, config_path) as store:
        row = _call(lambda: store.get(message))
        if row is None:
            raise click.ClickException(f"no message with id {message}")
        raw = _call(lambda: store.get_raw(message))
        vector = _call(lambda: store.get_vector(message))
    facts = _show_facts(row, raw, vector, _config(config_path).model.path)
    if as_json:
        click.echo(view.json_text(facts, indent=2))
    else:
        _print_show(_console(), row, facts)


def _show_facts(row: MessageRow, raw: bytes | None, vector: Any, model_path: Path) -> dict[str, Any]:
    """`row.as_json()` plus what only the raw bytes and the model can tell; the --json document."""
    facts: dict[str, Any] = row.as_json()
    if raw is not None:
        parsed = parse(raw)
        text, source = view.preview(parsed)
        facts.update(headers=view.headers(parsed), preview=text, preview_source=source,
                     raw_size=len(raw), parts=view.parts(parsed))
    else:
        facts.update(headers={}, preview=None, preview_source=None, raw_size=None, parts=None)
    facts["why"] = view.explain_row(row, raw, vector, model_path).as_json()
    return facts


def _kv_table(title: str, pairs: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in pairs:
        table.add_row(key, Text(view.safe_line(value)))
    return table


def _print_show(console: Console, row: MessageRow, facts: dict[str, Any]) -> None:
    state = (
        "deleted"
        if row.deleted_at
        else "released"
        if row.released_at
        else "held"
        if row.quarantined
        else "not quarantined"
    )
    console.print(
        _kv_table(
            f"message {row.id}",
            [
                ("received", row.received_at.isoformat()),
                ("state", state),
                ("mail from", row.mail_from or "<>"),
                ("rcpt to", ", ".join(row.rcpt_tos)),
                (
                    "client",
                    f"{row.client_addr or '?'} ({row.client_name or 'unknown'}) helo {row.helo or '?'}",
                ),
                ("verdict", f"{row.verdict} -> {row.action}  (model {row.model})"),
                ("scores", "  ".join(f"{k} {v:.3f}" for k, v in row.scores.as_dict().items())),
                ("label", f"{row.label} ({row.label_source})" if row.label else "-"),
            ],
        )
    )
    shown = [(view.SHOWN_HEADERS.get(k, k), v) for k, v in facts["headers"].items()]
    console.print(_kv_table("headers", shown))
    source = facts["preview_source"]
    console.print(Text(f"preview from {source or 'no text body'}:", style="bold"))
    console.print(view.framed(_preview_text(facts)))
    _print_why(console, row, facts["why"])


def _preview_text(facts: dict[str, Any]) -> str:
    """The preview, or why there is none: no bytes (deleted, never held) is not the same as bytes with
    no text in them (an image-only or attachment-only message), which a reviewer can still `raw`."""
    if facts["raw_size"] is None:
        return "(quarantined bytes not available)"
    if facts["preview"]:
        return str(facts["preview"])
    return f"(no text to preview: {facts['raw_size']} bytes; {view.describe_parts(facts['parts'])})"


def _print_why(console: Console, row: MessageRow, why: dict[str, Any]) -> None:
    """The policy's rules, then the model's contributions: signed, largest first, in words."""
    console.print(Text("why: the policy", style="bold"))
    for reason in row.reasons or ("no rule fired",):
        console.print(Text(f"  - {view.safe_line(reason)}"))
    console.print(Text(f"why: the model ({why['source']})", style="bold"))
    raw = why.get("explanation")
    if raw is None:
        return
    from milter.explain import Explanation  # here: `list` and `release` need not load the features

    e = Explanation.from_json(raw)
    console.print(Text(
        f"  {e.headline()}: the message's log-odds of {e.target} against {e.versus}, "
        f"the sum of the base and every feature's contribution below (exact, TreeSHAP)"
    ))
    table = Table("contribution", "in words", "feature", "value", show_edge=False)
    for c in (*e.towards, *e.against):
        table.add_row(f"{c.contribution:+.3f}", Text(view.safe_line(c.text)), c.feature, f"{c.value:.4g}")
    listed = sum(c.contribution for c in e.contributions)
    table.add_row(f"{e.rest:+.3f}", Text("all other features together"), "", "")
    table.add_row(f"{e.base:+.3f}", Text("base value (before looking at the message)"), "", "")
    total = f"= log-odds: base {e.base:+.3f}, listed {listed:+.3f}, all others {e.rest:+.3f}"
    table.add_row(f"{e.score:+.3f}", Text(total), "", "")
    console.print(table)


@quarantine.command("release")
@_store_options
@click.option("--downstream", metavar="HOST:PORT", help="Deliver here [default: server.downstream].")
@click.option("--no-label", is_flag=True, help="Do not label released messages ham.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per id.")
@click.argument("messages", type=MessageId, nargs=-1, required=True)
def release_cmd(
    db_url: str | None,
    config_path: Path | None,
    downstream: str | None,
    no_label: bool,
    as_json: bool,
    messages: tuple[int, ...],
) -> None:
    """Deliver quarantined MESSAGES downstream with their stored envelope; mark them released.

    A message is marked released (and labelled ham, source "release", unless --no-label) only after
    the downstream accepted it; otherwise it stays held and the line says why (exit status 1). A
    message the downstream took for some recipients but refused for others is marked released, and
    the command names the refused ones and exits 1.
    """
    cfg = _config(config_path)
    try:
        host, port = host_port(downstream or cfg.server.downstream, "--downstream")
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--downstream") from exc
    with _open(db_url, config_path) as store:
        outcomes = release(
            store,
            messages,
            host,
            port,
            cfg.server.downstream_timeout,
            cfg.server.hostname,
            label=not no_label,
        )
    _print_release(outcomes, as_json)
    failed = [o for o in outcomes if not o.released]
    partial = [o for o in outcomes if o.released and o.refused]
    problems = []
    if failed:
        problems.append(f"{len(failed)} of {len(outcomes)} message(s) not released: "
                        + ", ".join(str(o.id) for o in failed))
    for o in partial:
        problems.append(f"message {o.id} released, but not to: {'; '.join(o.refused)}")
    if problems:
        raise click.ClickException("; ".join(problems))


def _print_release(outcomes: list[ReleaseOutcome], as_json: bool) -> None:
    if as_json:
        for o in outcomes:
            click.echo(view.json_text(o.as_json()))
        return
    table = Table("id", "result", "labelled", "detail")
    for o in outcomes:
        table.add_row(
            str(o.id),
            ("released" if not o.refused else f"released, {len(o.refused)} recipient(s) refused")
            if o.released else "FAILED",
            "ham" if o.labelled else "-",
            Text(view.safe_line(o.detail)),
        )
    _console().print(table)


@quarantine.command("raw")
@_store_options
@click.argument("message", type=MessageId)
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
@click.argument("messages", type=MessageId, nargs=-1, required=True)
def delete_cmd(db_url: str | None, config_path: Path | None, messages: tuple[int, ...]) -> None:
    """Delete the bytes of quarantined messages (their verdicts stay).

    A message being released right now (here or on another node) is not deleted: the release would
    deliver it and find it deleted. Once that release has ended it is released, or held again and can
    be deleted. An abandoned release (its process died) stops protecting the message after 10 minutes.
    Ids not deleted are named with why, and the exit status is then 1.
    """
    wanted = tuple(dict.fromkeys(messages))  # an id given twice is deleted once
    with _open(db_url, config_path) as store:
        before = {pk: _call(partial(store.get, pk)) for pk in wanted}
        n = _call(lambda: store.delete(wanted))
        after = {pk: _call(partial(store.get, pk)) for pk in wanted}
    click.echo(f"deleted {n} of {len(wanted)}")
    skipped = [f"{pk} ({_not_deleted_why(before[pk], after[pk])})" for pk in wanted
               if not _just_deleted(before[pk], after[pk])]
    if skipped:
        raise click.ClickException(f"not deleted: {', '.join(skipped)}")


def _just_deleted(before: MessageRow | None, after: MessageRow | None) -> bool:
    if before is None or after is None:
        return False
    return before.deleted_at is None and after.deleted_at is not None


def _not_deleted_why(before: MessageRow | None, after: MessageRow | None) -> str:
    if before is None or after is None:
        return "no such message"
    if not before.quarantined:
        return "not quarantined"
    if before.deleted_at is not None:
        return "already deleted"
    return "being released right now; try again once that release has ended"


@quarantine.command("label")
@_store_options
@click.option("--source", default="cli", show_default=True, help="Who says so (kept with the label).")
@click.argument("message")
@click.argument("label", type=click.Choice(VERDICTS))
def label_cmd(db_url: str | None, config_path: Path | None, source: str, message: str, label: str) -> None:
    """Label MESSAGE (row id, or Message-ID for every copy) as ham, bulk, spam or bec for retraining
    (bulk is wanted mail: it trains the model as ham and vouches for its sender like ham)."""
    ref: int | str = message
    if message.isdigit():
        ref = int(message)
        if ref > MAX_ID:  # no row has such an id, and the database cannot even compare it
            raise click.ClickException(f"no message matches {message!r}")
    with _open(db_url, config_path) as store:
        n = _call(lambda: store.set_label(ref, label, source))
    if n == 0:
        raise click.ClickException(f"no message matches {message!r}")
    click.echo(f"labelled {n} message(s) {label}")


@quarantine.command("purge")
@_store_options
@click.option("--days", type=click.IntRange(1, RETENTION_DAYS_MAX),
              help="Retention in days [default: store.retention_days]; 0 would purge everything.")
def purge_cmd(db_url: str | None, config_path: Path | None, days: int | None) -> None:
    """Delete verdicts and quarantined messages older than the retention (labelled verdicts stay)."""
    if days is None:
        days = _config_store(config_path)[1]
    with _open(db_url, config_path) as store:
        counts = _call(lambda: store.purge(days))
    click.echo(
        f"purged {counts.messages} verdict(s) and {counts.quarantined} quarantined message(s) "
        f"older than {days} day(s)"
    )


@quarantine.command("stats")
@_store_options
@click.option(
    "--days",
    type=click.IntRange(1, 3650),
    default=14,
    show_default=True,
    help="Per-day volumes (with --why: the reasons) for this many days.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object (totals and daily volumes, or --why).")
@click.option("--why", is_flag=True, help="Which reasons drive the quarantine (stored explanations).")
@click.option("--verdict", type=click.Choice(VERDICTS), help="With --why: only held mail of this verdict.")
@click.option("--top", type=click.IntRange(min=1), help="With --why: reasons per verdict [default: 15].")
def stats_cmd(
    db_url: str | None,
    config_path: Path | None,
    days: int,
    as_json: bool,
    why: bool,
    verdict: str | None,
    top: int | None,
) -> None:
    """Volumes by action and verdict: totals, and per day (UTC).

    With --why: over the held messages of the period, per verdict, how often each reason is among a
    message's three largest pushes towards its verdict (milter/commands/quarantine_why.py).
    """
    if why:
        _stats_why(db_url, config_path, days, as_json, verdict, top or WHY_TOP)
        return
    if verdict is not None or top is not None:
        raise click.UsageError("--verdict and --top go with --why")
    with _open(db_url, config_path) as store:
        st = _call(store.stats)
        daily = _call(lambda: store.daily_volumes(days))
    if as_json:
        click.echo(
            view.json_text(
                {
                    "messages": st.messages,
                    "quarantined": st.quarantined,
                    "released": st.released,
                    "labelled": st.labelled,
                    "by_verdict": dict(st.by_verdict),
                    "by_action": dict(st.by_action),
                    "oldest": st.oldest.isoformat() if st.oldest else None,
                    "newest": st.newest.isoformat() if st.newest else None,
                    "daily": [{"day": d, "action": a, "verdict": v, "count": n} for d, a, v, n in daily],
                }
            )
        )
        return
    console = Console()
    console.print(
        f"{st.messages} messages, {st.quarantined} held in quarantine, {st.released} released, "
        f"{st.labelled} labelled"
    )
    table = Table(title=f"last {days} days (UTC)")
    table.add_column("day")
    table.add_column("action")
    for verdict in VERDICTS:
        table.add_column(verdict, justify="right")
    rows: dict[tuple[str, str], dict[str, int]] = {}
    for d, a, v, n in daily:
        rows.setdefault((d, a), {})[v] = n
    for (d, a), counts in rows.items():
        table.add_row(d, a, *(str(counts.get(v, 0)) for v in VERDICTS))
    console.print(table)


WHY_TOP = 15
WHY_PAGE = 2000  # held messages per read: a long period is aggregated without holding it all


def _stats_why(
    db_url: str | None, config_path: Path | None, days: int, as_json: bool, verdict: str | None, top: int
) -> None:
    from milter.commands import quarantine_why as why_report  # loads the features: only when asked

    since = datetime.now(UTC) - timedelta(days=days)
    with _open(db_url, config_path) as store:

        def fetch(after: int) -> list[why_report.HeldRow]:
            page: list[why_report.HeldRow] = _call(
                lambda: store.held_explanations(since, verdict, after, WHY_PAGE))
            return page

        report = why_report.aggregate(why_report.paged(fetch), since, days, verdict)
    if as_json:
        click.echo(view.json_text(report.as_json(top)))
    else:
        why_report.render(_console(), report, top)


# Defined in its own module (this one is long enough); it uses the helpers above, hence the late import.
from milter.commands.quarantine_senders import senders_cmd  # noqa: E402

quarantine.add_command(senders_cmd)
