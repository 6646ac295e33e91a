"""`milter report --as ham|bulk|spam|bec FILE.eml...`: feed a user's "this was a mistake" into the
learning loop (bulk: a wanted newsletter; like ham it trains the model's ham class).

For each file, the reported message is matched to its stored verdict by Message-ID and labelled there
(every copy, label source "user-report"). When the store never saw it (delivered before the gateway,
or scanned elsewhere), it is scanned now and stored as a labelled example with its feature vector.
A file forwarded "as attachment" (one message/rfc822 part) reports the message inside; the outer
Message-ID is tried too, in case the reported message itself merely carried an attachment.

One line per file (`matched` / `stored` / `error`), or with --json one object per line:
  {"path", "result": "matched"|"stored"|"error", "label", "message_id", "rows" | "id" | "error"}
Exit status: 0 when every file was recorded, 1 when any failed, 2 for bad usage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from email import policy
from email.message import Message
from email.parser import BytesParser
from pathlib import Path

import click

from milter.config import Config, load_config
from milter.errors import ConfigError, MilterError
from milter.features import SCHEMA
from milter.parse import parse
from milter.scan import Scanner, build_scanner, prepare
from milter.store import Store
from milter.store.labels import record_labelled
from milter.types import VERDICTS, Envelope

SOURCE = "user-report"


@dataclass(frozen=True)
class Outcome:
    path: str
    result: str  # matched | stored | error
    label: str
    message_id: str | None = None
    rows: int | None = None  # matched: how many stored verdicts were labelled
    id: int | None = None  # stored: the new row
    error: str | None = None

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"path": self.path, "result": self.result, "label": self.label,
                                  "message_id": self.message_id}
        for key in ("rows", "id", "error"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def line(self) -> str:
        if self.result == "matched":
            return (f"matched {self.path}: {self.message_id} labelled {self.label} "
                    f"({self.rows} stored verdict(s))")
        if self.result == "stored":
            what = self.message_id or "no Message-ID"
            return f"stored  {self.path}: {what} as labelled example #{self.id} ({self.label})"
        return f"error   {self.path}: {self.error}"


def forwarded_inner(raw: bytes) -> bytes | None:
    """The message inside a forward-as-attachment: exactly one top-level message/rfc822 part."""
    outer = BytesParser(policy=policy.compat32).parsebytes(raw)
    if not outer.is_multipart():
        return None
    parts = [p for p in outer.get_payload() if isinstance(p, Message)
             and p.get_content_type() == "message/rfc822"]
    if len(parts) != 1:
        return None
    inner = parts[0].get_payload()
    if isinstance(inner, list) and len(inner) == 1 and isinstance(inner[0], Message):
        return inner[0].as_bytes(policy=policy.compat32)
    return None


def message_id(raw: bytes) -> str | None:
    """The Message-ID as the gateway stores it (milter.features.summarise: the header, stripped)."""
    value = parse(raw).get("message-id")
    return (value.strip() or None) if value else None


class Reporter:
    """Matches or stores one reported message at a time; loads the model only when first needed."""

    def __init__(self, store: Store, cfg: Config, label: str, source: str, unwrap: bool) -> None:
        self.store, self.cfg, self.label, self.source, self.unwrap = store, cfg, label, source, unwrap
        self._scanner: Scanner | None = None

    def scanner(self) -> Scanner:
        if self._scanner is None:
            self._scanner = build_scanner(self.cfg)
        return self._scanner

    def report(self, path: Path) -> Outcome:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            return Outcome(str(path), "error", self.label, error=f"cannot read: {exc.strerror}")
        if not raw.strip():
            return Outcome(str(path), "error", self.label, error="empty file")
        try:
            return self._report(str(path), raw)
        except MilterError as exc:  # store or model trouble: this file failed, say why, go on
            return Outcome(str(path), "error", self.label, error=str(exc))

    def _report(self, path: str, raw: bytes) -> Outcome:
        inner = forwarded_inner(raw) if self.unwrap else None
        reported = inner if inner is not None else raw
        candidates = [reported] if inner is None else [inner, raw]
        for msg in candidates:
            mid = message_id(msg)
            if mid is None:
                continue
            n = self.store.set_label(mid, self.label, self.source)
            if n:
                return Outcome(path, "matched", self.label, message_id=mid, rows=n)
        scanner = self.scanner()
        envelope = Envelope()
        ext = prepare(reported, envelope, scanner.policy.protected)
        result = scanner.decide([ext], [envelope], scanner.predict([ext]))[0]
        pk = record_labelled(self.store, result, self.label, self.source, SCHEMA.digest, envelope)
        return Outcome(path, "stored", self.label, message_id=ext.summary.message_id, id=pk)


@click.command("report")
@click.option("--as", "label", type=click.Choice(VERDICTS), required=True,
              help="What the message really is (bulk: a wanted newsletter; it trains as ham).")
@click.option("--db", "db_url", envvar="MILTER_STORE_URL",
              help="Store URL [default: the config's store.url].")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="Config file (store URL, model for messages the store never saw).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line per file.")
@click.option("--source", default=SOURCE, show_default=True, help="Label source kept with the label.")
@click.option("--unwrap/--no-unwrap", default=True, show_default=True,
              help="Report the message inside a forward-as-attachment.")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
def report(label: str, db_url: str | None, config_path: Path | None, as_json: bool, source: str,
           unwrap: bool, files: tuple[Path, ...]) -> None:
    """Label reported FILE.eml... for retraining: matched by Message-ID, else scanned and stored."""
    try:
        cfg = load_config(config_path)
        store = Store.open(db_url or cfg.store.url)
    except (ConfigError, MilterError) as exc:
        raise click.ClickException(str(exc)) from exc
    failed = 0
    with store:
        reporter = Reporter(store, cfg, label, source, unwrap)
        for path in files:
            outcome = reporter.report(path)
            failed += outcome.result == "error"
            click.echo(json.dumps(outcome.as_json(), ensure_ascii=False) if as_json else outcome.line())
    click.get_current_context().exit(1 if failed else 0)
