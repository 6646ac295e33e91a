"""`milter report --as ham|bulk|spam|bec FILE.eml...`: feed a user's "this was a mistake" into the
learning loop (bulk: a wanted newsletter; like ham it trains the model's ham class).

For each file, the reported message is matched to its stored verdicts by Message-ID *and* From
address (a phish that copies a real message's Message-ID must not label the real one) and labelled
there (every copy, label source "user-report"). A copy an admin labelled (`quarantine label`, a
release: any source but a report's) keeps the admin's label, and the line says so. When the store never
saw it (delivered before the gateway, or scanned elsewhere), it is scanned now and stored as a labelled
example with its feature vector. A file forwarded "as attachment" (one message/rfc822 part) reports the
message inside, and only it: the forward itself is the user's own mail, which the gateway may have
stored too (--no-unwrap reports a message that merely carried a message as an attachment).

One line per file (`matched` / `stored` / `error`), or with --json one object per line:
  {"path", "result": "matched"|"stored"|"error", "label", "message_id", "rows" [+ "kept", "kept_labels"]
   | "id" | "error"}
("rows": stored verdicts labelled now; "kept": those that kept an admin's label, "kept_labels" which.)
Exit status: 0 when every file was recorded, 1 when any failed, 2 for bad usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from email import policy
from email.message import Message
from email.parser import BytesParser
from pathlib import Path

import click

from milter.commands import quarantine_view as view
from milter.config import Config, load_config
from milter.errors import ConfigError, MilterError
from milter.features import SCHEMA, extract
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
    kept: int | None = None  # matched: stored verdicts that kept the label an admin gave
    kept_labels: tuple[tuple[str, str], ...] = ()  # (label, source) of those

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"path": self.path, "result": self.result, "label": self.label,
                                  "message_id": self.message_id}
        for key in ("rows", "id", "error", "kept"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.kept:
            out["kept_labels"] = [{"label": lab, "source": src} for lab, src in self.kept_labels]
        return out

    def line(self) -> str:
        # the Message-ID and the errors quote the sender's text: no terminal escapes through here
        mid = view.safe_line(self.message_id or "no Message-ID")
        if self.result == "matched":
            text = f"matched {self.path}: {mid} labelled {self.label} ({self.rows} stored verdict(s))"
            if self.kept:
                labels = ", ".join(f"{lab} by {src}" for lab, src in self.kept_labels)
                text += f"; {self.kept} kept the label an admin gave ({view.safe_line(labels)})"
            return text
        if self.result == "stored":
            return f"stored  {self.path}: {mid} as labelled example #{self.id} ({self.label})"
        return f"error   {self.path}: {view.safe_line(self.error or '')}"


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


def identity(raw: bytes) -> tuple[str | None, str | None]:
    """(Message-ID, From address) exactly as the gateway stored them: milter.features.summarise's, the
    header stripped and the first From's addr-spec with its domain as carried (A-labels)."""
    summary = extract(raw).summary
    return (summary.message_id or None), summary.from_addr


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
        # Once a forwarded message is found, the outer one is never labelled: it is the user's own
        # forward (internal mail is stored too), and labelling it taught that their forwards are spam.
        reported = inner if inner is not None else raw
        mid, from_addr = identity(reported)
        if mid is not None:
            done = self.store.label_reported(mid, from_addr, self.label, self.source)
            if done.labelled or done.kept:
                return Outcome(path, "matched", self.label, message_id=mid, rows=done.labelled,
                               kept=done.kept, kept_labels=done.kept_labels)
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
        # must exist: a label stored in a new, stray store (the default URL is relative) is lost
        store = Store.open(db_url or cfg.store.url, must_exist=True)
    except (ConfigError, MilterError) as exc:
        raise click.ClickException(str(exc)) from exc
    failed = 0
    with store:
        reporter = Reporter(store, cfg, label, source, unwrap)
        for path in files:
            outcome = reporter.report(path)
            failed += outcome.result == "error"
            click.echo(view.json_text(outcome.as_json()) if as_json else outcome.line())
    click.get_current_context().exit(1 if failed else 0)
