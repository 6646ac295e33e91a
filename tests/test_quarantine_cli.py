"""`milter quarantine`: the --json line contract, table output, purge, and exit codes scripts rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SMTPEnvelope
from click.testing import CliRunner
from store_support import make_result

from milter.cli import main
from milter.store import Store
from milter.types import Action, Envelope, Verdict

ENV = Envelope(mail_from="alice@example.com", rcpt_tos=("bob@example.org",), client_addr="192.0.2.7")
RAW = b"Subject: Hi\r\n\r\nbody\r\n"
MILTER = Path(sys.executable).with_name("milter")


@pytest.fixture
def filled(url: str) -> Iterator[tuple[str, list[int]]]:
    """A store with two quarantined messages (older spam, newer BEC) and one accepted ham."""
    with Store.open(url) as s:
        old = s.record(make_result(subject="Cheap pills", message_id="<a@x>"), ENV, RAW, "d",
                       received_at=datetime.now(UTC) - timedelta(hours=3))
        new = s.record(make_result(Verdict.BEC, subject="Wire transfer, urgent", message_id="<b@x>",
                                   scores=(0.1, 0.1, 0.8)), ENV, RAW, "d")
        s.record(make_result(Verdict.HAM, Action.ACCEPT), ENV, None, "d")
    yield url, [new, old]


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _check_contract(objs: list[dict[str, object]], ids: list[int]) -> None:
    assert [o["id"] for o in objs] == ids  # newest first, accepted ham not listed
    for o in objs:
        for key in ("id", "message_id", "verdict", "action", "received_at", "scores", "from", "subject"):
            assert key in o, key
        when = datetime.fromisoformat(str(o["received_at"]))
        assert when.utcoffset() == timedelta(0)
        assert o["action"] == "quarantine" and o["from"] == "alice@example.com"
    assert (objs[0]["verdict"], objs[0]["subject"], objs[0]["message_id"]) == (
        "bec", "Wire transfer, urgent", "<b@x>")
    assert objs[0]["scores"] == pytest.approx({"ham": 0.1, "spam": 0.1, "bec": 0.8})


def test_list_json_contract(filled: tuple[str, list[int]]) -> None:
    url, ids = filled
    result = CliRunner().invoke(main, ["quarantine", "list", "--json", "--db", url])
    assert result.exit_code == 0, result.output
    _check_contract(_json_lines(result.stdout), ids)


def test_list_json_via_subprocess(filled: tuple[str, list[int]]) -> None:
    url, ids = filled
    proc = subprocess.run([str(MILTER), "quarantine", "list", "--json", "--db", url],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    _check_contract(_json_lines(proc.stdout), ids)


def test_list_filters(filled: tuple[str, list[int]]) -> None:
    url, ids = filled
    run = CliRunner().invoke
    by_verdict = run(main, ["quarantine", "list", "--json", "--db", url, "--verdict", "spam"])
    assert [o["id"] for o in _json_lines(by_verdict.stdout)] == [ids[1]]
    recent = run(main, ["quarantine", "list", "--json", "--db", url, "--since", "1h"])
    assert [o["id"] for o in _json_lines(recent.stdout)] == [ids[0]]
    paged = run(main, ["quarantine", "list", "--json", "--db", url, "--limit", "1", "--offset", "1"])
    assert [o["id"] for o in _json_lines(paged.stdout)] == [ids[1]]


def test_list_table(filled: tuple[str, list[int]]) -> None:
    url = filled[0]
    result = CliRunner().invoke(main, ["quarantine", "list", "--db", url])
    assert result.exit_code == 0, result.output
    assert "Wire transfer, urgent" in result.stdout and "Cheap pills" in result.stdout
    assert result.stdout.index("Wire transfer") < result.stdout.index("Cheap pills")
    assert "0.800" in result.stdout


def test_db_from_config_file(tmp_path: Path) -> None:
    db = tmp_path / "from-config.db"
    with Store.open(f"sqlite:///{db}") as s:
        pk = s.record(make_result(), ENV, RAW, "d")
    cfg = tmp_path / "milter.toml"
    cfg.write_text(f'[store]\nurl = "sqlite:///{db}"\n')
    result = CliRunner().invoke(main, ["quarantine", "list", "--json", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert [o["id"] for o in _json_lines(result.stdout)] == [pk]


def test_purge_uses_retention_from_config(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    with Store.open(url) as s:
        old = s.record(make_result(), ENV, RAW, "d", received_at=datetime.now(UTC) - timedelta(days=10))
        new = s.record(make_result(), ENV, RAW, "d", received_at=datetime.now(UTC) - timedelta(days=2))
    cfg = tmp_path / "milter.toml"
    cfg.write_text(f'[store]\nurl = "{url}"\nretention_days = 7\n')
    result = CliRunner().invoke(main, ["quarantine", "purge", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "purged 1 verdict(s) and 1 quarantined message(s) older than 7 day(s)" in result.stdout
    result = CliRunner().invoke(main, ["quarantine", "purge", "--db", url, "--days", "1"])
    assert result.exit_code == 0 and "purged 1 verdict(s)" in result.stdout
    with Store.open(url) as s:
        assert s.get(old) is None and s.get(new) is None


def test_show_raw_label_delete(filled: tuple[str, list[int]]) -> None:
    url, (new, old) = filled
    run = CliRunner().invoke
    shown = run(main, ["quarantine", "show", str(new), "--db", url, "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["verdict"] == "bec"
    raw = run(main, ["quarantine", "raw", str(new), "--db", url])
    assert raw.exit_code == 0 and raw.stdout_bytes == RAW
    labelled = run(main, ["quarantine", "label", "<a@x>", "ham", "--db", url])
    assert labelled.exit_code == 0 and "labelled 1" in labelled.stdout
    assert run(main, ["quarantine", "delete", str(old), "--db", url]).exit_code == 0
    gone = run(main, ["quarantine", "raw", str(old), "--db", url])
    assert gone.exit_code == 1 and "not held in quarantine" in gone.stderr
    stats = json.loads(run(main, ["quarantine", "stats", "--json", "--db", url]).stdout)
    assert (stats["messages"], stats["quarantined"], stats["labelled"]) == (3, 1, 1)
    assert sum(d["count"] for d in stats["daily"]) == 3
    # the fixture's old row was received 3 hours ago: between 00:00 and 03:00 UTC that is yesterday
    now = datetime.now(UTC)
    days = {t.date().isoformat() for t in (now, now - timedelta(hours=3))}
    assert {d["day"] for d in stats["daily"]} == days
    table = run(main, ["quarantine", "stats", "--db", url]).stdout
    assert "last 14 days" in table and datetime.now(UTC).date().isoformat() in table
    with Store.open(url) as s:
        row = s.get(old)
        assert row is not None and row.label == "ham" and row.deleted_at is not None


@pytest.mark.parametrize("db", ["not a url", "postgresql+psycopg://postgres@127.0.0.1:{port}/test"])
def test_bad_or_unreachable_db_exits_1_without_traceback(db: str, free_port: object) -> None:
    db = db.format(port=free_port())  # type: ignore[operator]
    proc = subprocess.run([str(MILTER), "quarantine", "list", "--json", "--db", db],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PGCONNECT_TIMEOUT": "3"})
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("Error: cannot open store") and "Traceback" not in proc.stderr


def test_missing_message_exits_1(tmp_path: Path) -> None:
    Store.open(f"sqlite:///{tmp_path}/x.db").close()  # an existing store (a missing one: exit 1 too)
    result = CliRunner().invoke(main, ["quarantine", "show", "42", "--db", f"sqlite:///{tmp_path}/x.db"])
    assert result.exit_code == 1 and "no message with id 42" in result.stderr


# -- list filters ----------------------------------------------------------------------------------


@pytest.fixture
def addressed(url: str) -> Iterator[tuple[str, dict[str, int]]]:
    """Quarantined messages with distinct envelopes; '_' in an address checks LIKE escaping."""
    envs = {
        "a": (Envelope(mail_from="Alice@Example.com", rcpt_tos=("bob@example.org", "Carol@Example.org")),
              "alice@example.com"),
        "b": (Envelope(mail_from="bounce@lists.example", rcpt_tos=("dave_x@example.org",)),
              "news@example.net"),
        "c": (Envelope(mail_from="", rcpt_tos=("davexx@example.org", "bob@example.org.evil")),
              "Mallory@Evil.test"),
    }
    ids: dict[str, int] = {}
    with Store.open(url) as s:
        for hours, (key, (env, from_addr)) in enumerate(envs.items()):
            ids[key] = s.record(make_result(from_addr=from_addr), env, RAW, "d",
                                received_at=datetime.now(UTC) - timedelta(hours=10 - hours))
    yield url, ids


def _listed(url: str, *args: str) -> list[object]:
    result = CliRunner().invoke(main, ["quarantine", "list", "--json", "--db", url, *args])
    assert result.exit_code == 0, result.output
    return [o["id"] for o in _json_lines(result.stdout)]


def test_list_recipient_filter(addressed: tuple[str, dict[str, int]]) -> None:
    url, ids = addressed
    assert _listed(url, "--recipient", "bob@example.org") == [ids["a"]]  # not the ".evil" lookalike
    assert _listed(url, "--recipient", "CAROL@example.ORG") == [ids["a"]]  # second rcpt, any case
    assert _listed(url, "--recipient", "dave_x@example.org") == [ids["b"]]  # '_' is not a wildcard
    assert _listed(url, "--recipient", "example.org") == []  # whole addresses only
    assert _listed(url, "--recipient", "bob@example.org", "--verdict", "bec") == []


def test_list_sender_filter(addressed: tuple[str, dict[str, int]]) -> None:
    url, ids = addressed
    assert _listed(url, "--sender", "alice@EXAMPLE.com") == [ids["a"]]  # envelope and From agree
    assert _listed(url, "--sender", "bounce@lists.example") == [ids["b"]]  # envelope sender only
    assert _listed(url, "--sender", "news@example.net") == [ids["b"]]  # From only
    assert _listed(url, "--sender", "mallory@evil.test") == [ids["c"]]
    assert _listed(url, "--sender", "nobody@example.com") == []
    both = _listed(url, "--sender", "news@example.net", "--recipient", "dave_x@example.org", "--limit", "1")
    assert both == [ids["b"]]


def test_list_reason_filter(url: str) -> None:
    """--reason: what one blocklist (or any rule) held, to audit it; any case, '_' and '%' literal."""
    reasons = {
        "dbl": ("From domain shop.example listed in dbl.spamhaus.org (127.0.1.2: spam domain)",),
        "zen": ("spam score 0.99", "client address 192.0.2.7 listed in zen.spamhaus.org (127.0.0.2: SBL)"),
        "tld": ("sender domain fipie.shop is on an often-abused TLD (.shop) and scores 0.60 as spam",),
        "pct": ("spam score 0.91", "100% off_today"),
    }
    ids: dict[str, int] = {}
    with Store.open(url) as s:
        for hours, (key, why) in enumerate(reasons.items()):
            ids[key] = s.record(replace(make_result(), reasons=why), Envelope(rcpt_tos=("bob@example.org",)),
                                RAW, "d", received_at=datetime.now(UTC) - timedelta(hours=10 - hours))
    assert _listed(url, "--reason", "DBL.Spamhaus.org") == [ids["dbl"]]
    assert _listed(url, "--reason", "zen.spamhaus.org") == [ids["zen"]]  # a later reason counts too
    assert set(_listed(url, "--reason", "spamhaus.org")) == {ids["dbl"], ids["zen"]}
    assert _listed(url, "--reason", "often-abused TLD", "--verdict", "spam") == [ids["tld"]]
    assert _listed(url, "--reason", "0% off_") == [ids["pct"]]
    assert _listed(url, "--reason", "1%0") == [] and _listed(url, "--reason", "off_t_day") == []
    assert _listed(url, "--reason", "surbl") == []


# -- release ---------------------------------------------------------------------------------------


class _Collect:
    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []
        self.mail_options: list[list[str]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SMTPEnvelope) -> str:
        self.received.append((envelope.mail_from or "", list(envelope.rcpt_tos),
                              envelope.original_content or b""))
        self.mail_options.append(list(envelope.mail_options))
        return "250 2.0.0 Ok: queued"


def _downstream(port: int, smtputf8: bool) -> tuple[Controller, _Collect]:
    handler = _Collect()
    return Controller(handler, hostname="127.0.0.1", port=port, enable_SMTPUTF8=smtputf8), handler


@pytest.fixture
def sink(free_port: object) -> Iterator[tuple[int, _Collect]]:
    """A real aiosmtpd downstream on a free loopback port, in its own thread."""
    port = free_port()  # type: ignore[operator]
    controller, handler = _downstream(port, smtputf8=False)
    controller.start()
    try:
        yield port, handler
    finally:
        controller.stop()


UTF8_ENV = Envelope(mail_from="alice@example.com", rcpt_tos=("bob@example.org", "jörg@example.org"))
UTF8_RAW = "Subject: Grüße\r\nTo: jörg@example.org\r\n\r\nkörper\r\n".encode()


@pytest.mark.parametrize("smtputf8", [True, False], ids=["downstream-smtputf8", "downstream-ascii"])
def test_release_asks_for_what_the_message_needs(url: str, free_port: object, smtputf8: bool) -> None:
    """The store keeps no MAIL parameters: a release works them out. Before, it sent none, the relay
    refused the non-ASCII recipient itself and the message counted as released for everyone."""
    with Store.open(url) as s:
        held = s.record(make_result(message_id="<u@x>"), UTF8_ENV, UTF8_RAW, "d")
    port = free_port()  # type: ignore[operator]
    controller, handler = _downstream(port, smtputf8)
    controller.start()
    try:
        code, lines, err = _release(url, "--downstream", f"127.0.0.1:{port}", str(held))
    finally:
        controller.stop()
    [line] = lines
    assert line["released"] is True and handler.received[0][2] == UTF8_RAW
    if smtputf8:
        assert code == 0 and line["refused"] == []
        assert handler.received[0][1] == ["bob@example.org", "jörg@example.org"]
        assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(handler.mail_options[0])
    else:
        # the others have it, so it is released; who did not get it is said, and the command fails
        assert handler.received[0][1] == ["bob@example.org"]
        refused = line["refused"]
        assert isinstance(refused, list) and len(refused) == 1
        assert str(refused[0]).startswith("jörg@example.org (553")
        assert code == 1 and f"message {held} released, but not to: jörg@example.org (553" in err
    with Store.open(url) as s:
        row = s.get(held)
        assert row is not None and row.released_at is not None


def _release(url: str, *args: str) -> tuple[int, list[dict[str, object]], str]:
    result = CliRunner().invoke(main, ["quarantine", "release", "--json", "--db", url, *args])
    return result.exit_code, _json_lines(result.stdout), result.stderr


def test_release_delivers_marks_and_labels(filled: tuple[str, list[int]], sink: tuple[int, _Collect]) -> None:
    url, (new, old) = filled
    port, handler = sink
    code, lines, _ = _release(url, "--downstream", f"127.0.0.1:{port}", str(new))
    assert code == 0
    assert [(o["id"], o["released"], o["labelled"]) for o in lines] == [(new, True, True)]
    assert handler.received == [("alice@example.com", ["bob@example.org"], RAW)]
    with Store.open(url) as s:
        row = s.get(new)
        assert row is not None and row.released_at is not None
        assert (row.label, row.label_source) == ("ham", "release")
        untouched = s.get(old)
        assert untouched is not None and untouched.released_at is None
        # released as ham: the correspondence history knows the sender now (every gateway, at its refresh)
        pairs = {(r.key, r.member, r.inbound) for r in s.history_rows() if r.kind == "pair"}
        assert pairs == {("alice@example.com", "bob@example.org", 1)}
    again, lines, err = _release(url, "--downstream", f"127.0.0.1:{port}", str(new))
    assert again == 1 and "already released" in str(lines[0]["detail"])
    assert err.startswith("Error: 1 of 1 message(s) not released") and len(handler.received) == 1


def test_release_no_label_and_deleted(filled: tuple[str, list[int]], sink: tuple[int, _Collect]) -> None:
    url, (new, old) = filled
    port, handler = sink
    with Store.open(url) as s:
        s.delete([old])
    result = CliRunner().invoke(main, ["quarantine", "release", "--no-label", "--db", url,
                                       "--downstream", f"127.0.0.1:{port}", str(new), str(old)])
    assert result.exit_code == 1
    assert "released" in result.stdout and "deleted from the quarantine" in result.stdout
    assert result.stderr.strip() == f"Error: 1 of 2 message(s) not released: {old}"
    assert len(handler.received) == 1
    with Store.open(url) as s:
        row = s.get(new)
        assert row is not None and row.released_at is not None and row.label is None
        assert s.history_rows() == []  # not labelled ham: the history learns nothing from it


def test_release_to_closed_port_stays_quarantined(filled: tuple[str, list[int]], free_port: object) -> None:
    url, (new, _) = filled
    port = free_port()  # type: ignore[operator]
    code, lines, err = _release(url, "--downstream", f"127.0.0.1:{port}", str(new))
    assert code == 1 and "Traceback" not in err
    assert lines[0]["released"] is False and "cannot connect to downstream" in str(lines[0]["detail"])
    with Store.open(url) as s:
        row = s.get(new)
        assert row is not None and row.released_at is None and row.label is None
        assert s.get_raw(new) == RAW


def test_release_bad_downstream_is_usage_error(filled: tuple[str, list[int]]) -> None:
    url, (new, _) = filled
    code, _, err = _release(url, "--downstream", "no-port", str(new))
    assert code == 2 and "--downstream" in err


# -- show ------------------------------------------------------------------------------------------

HTML_RAW = (
    b"From: \"Pay\x1b[31mroll\" <payroll@evil.test>\r\nTo: bob@example.org\r\n"
    b"Subject: =?utf-8?q?Invoice_=E2=80=AE_[bold]due[/bold]?=\r\nMessage-ID: <h@x>\r\n"
    b"Date: Mon, 6 May 2024 10:00:00 +0000\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b"<html><head><style>p{color:red}</style><script>alert('x')</script></head><body>"
    b"<p>Please <b>wire</b> the money\x1b]0;owned\x07 today\x1b[2J</p>"
    + b"".join(b"<p>line %d</p>" % i for i in range(60)) + b"</body></html>\r\n"
)


ROOT = Path(__file__).resolve().parent.parent
PHISH = ROOT / "fixtures" / "bec" / "bec-invoice-bank-change.eml"


def _scanned(raw: bytes) -> Any:
    """The shipped model's real verdict on `raw`, held whatever the policy said (as `tag` would be)."""
    from dataclasses import replace

    from milter.config import load_config
    from milter.scan import build_scanner

    (result,) = build_scanner(load_config(None), explain_all=True).scan_batch([raw])
    assert result.explanation is not None
    return replace(result, action=Action.QUARANTINE)


def _show(url: str, pk: int, *extra: str) -> Any:
    return CliRunner().invoke(main, ["quarantine", "show", str(pk), "--db", url, *extra])


def test_show_is_safe_and_explains_in_signed_words(url: str) -> None:
    from milter.features import SCHEMA

    result = _scanned(HTML_RAW)
    with Store.open(url) as s:
        pk = s.record(result, ENV, HTML_RAW, SCHEMA.digest)
    shown = _show(url, pk)
    assert shown.exit_code == 0, shown.output
    out = shown.stdout
    assert "Please wire the money today" in out  # inline tags do not break lines
    for bad in ("<b>", "<p>", "alert(", "color:red", "\x1b", "\x07", "\u202e", "owned"):
        assert bad not in out, bad
    assert "[bold]due[/bold]" in out  # sender text printed as typed, not as Rich markup
    assert "line 30" in out and "line 59" not in out and "more line(s)" in out
    assert "<payroll@evil.test>" in out and "<h@x>" in out
    assert "value x gain" not in out and "importance" not in out  # the old, inexact table is gone
    e = result.explanation
    assert "stored with the verdict" in out and f"log-odds {e.score:+.2f}" in out
    for reason in result.reasons:  # the policy's rules that fired
        assert reason[:40] in " ".join(out.split())
    top = e.towards[0]
    assert f"{top.contribution:+.3f}" in out and top.feature in out and top.text[:25] in out

    facts = json.loads(_show(url, pk, "--json").stdout)
    assert facts["preview_source"].startswith("text/html") and "<" not in facts["preview"]
    assert facts["headers"]["message-id"] == "<h@x>"
    why = facts["why"]["explanation"]
    listed = sum(c["contribution"] for c in [*why["towards"], *why["against"]])
    assert why["base"] + listed + why["rest"] == pytest.approx(why["score"], abs=1e-5)
    assert [c["feature"] for c in why["towards"]] == [c.feature for c in e.towards]


def test_show_names_hashed_words_by_the_messages_own(url: str) -> None:
    from milter.features import SCHEMA, bucket_words

    raw = PHISH.read_bytes()
    result = _scanned(raw)
    with Store.open(url) as s:
        pk = s.record(result, ENV, raw, SCHEMA.digest)
    why = json.loads(_show(url, pk, "--json").stdout)["why"]["explanation"]
    words = bucket_words(raw)
    shown = [*why["towards"], *why["against"]]
    toks = [c for c in shown if c["feature"].startswith("tok_") and c["value"] > 0]
    for c in toks:  # the gateway stored example words; show names the message's own
        assert any(w[:20] in c["text"] for w in words[c["feature"]]), c


def test_show_computes_an_explanation_for_an_older_verdict(url: str) -> None:
    """A verdict stored without one (before the upgrade) is explained from its stored vector now, and
    says so; the numbers are the current model's exact ones."""
    from dataclasses import replace

    from milter.features import SCHEMA

    raw = PHISH.read_bytes()
    result = _scanned(raw)
    with Store.open(url) as s:
        pk = s.record(replace(result, explanation=None, model="mailsift-older"), ENV, raw, SCHEMA.digest)
    shown = _show(url, pk)
    assert shown.exit_code == 0, shown.output
    assert "computed now with model" in shown.stdout and "mailsift-older" in shown.stdout
    why = json.loads(_show(url, pk, "--json").stdout)["why"]
    assert why["explanation"]["score"] == pytest.approx(result.explanation.score, abs=1e-6)


def test_show_without_a_usable_vector_says_why(filled: tuple[str, list[int]]) -> None:
    url, (new, _) = filled  # recorded under schema digest "d", without an explanation
    shown = _show(url, new)
    assert shown.exit_code == 0, shown.output
    assert "the stored vector uses feature schema d" in " ".join(shown.stdout.split())
    assert "body" in shown.stdout  # text/plain preview of RAW


def test_senders_lists_whom_the_labels_vouch_for(url: str, tmp_path: Path) -> None:
    with Store.open(url) as store:
        for from_addr, label in [
            ("news@bulletin.example", "ham"), ("editor@bulletin.example", "ham"),
            ("news@bulletin.example", "ham"),
            ("a@gmail.com", "ham"), ("b@gmail.com", "ham"), ("c@gmail.com", "ham"),
            ("deals@mixed.example", "ham"), ("deals@mixed.example", "ham"), ("deals@mixed.example", "ham"),
            ("deals@mixed.example", "spam"),
        ]:
            pk = store.record(make_result(from_addr=from_addr), Envelope(), None, "d")
            store.set_label(pk, label, "admin")
    runner = CliRunner()
    result = runner.invoke(main, ["quarantine", "senders", "--json", "--db", url])
    assert result.exit_code == 0, result.output
    vouched = {"sender": "bulletin.example", "ham": 3, "unwanted": 0, "vouched": True}
    assert _json_lines(result.output) == [vouched]
    every = _json_lines(runner.invoke(main, ["quarantine", "senders", "--json", "--all", "--db", url]).output)
    assert [(o["sender"], o["vouched"]) for o in every] == [
        ("bulletin.example", True), ("mixed.example", False),
        ("a@gmail.com", False), ("b@gmail.com", False), ("c@gmail.com", False),
    ]
    config = tmp_path / "milter.toml"
    config.write_text("[policy]\nlearned_sender_labels = 4\n")
    text = runner.invoke(main, ["quarantine", "senders", "--db", url, "--config", str(config)])
    assert text.exit_code == 0, text.output
    assert "0 of 5 labelled sender(s) vouched for (policy.learned_sender_labels = 4)" in text.output


def test_bulk_is_a_verdict_to_list_and_a_label_that_vouches(url: str) -> None:
    with Store.open(url) as s:
        bulk = s.record(make_result(Verdict.BULK, subject="This week", message_id="<n1@x>",
                                    from_addr="news@bulletin.example"), ENV, RAW, "d")
        s.record(make_result(subject="Cheap pills", message_id="<s1@x>"), ENV, RAW, "d")
        for n in (2, 3):  # two more issues of the newsletter, delivered
            s.record(make_result(Verdict.BULK, Action.ACCEPT, message_id=f"<n{n}@x>",
                                 from_addr="news@bulletin.example"), ENV, None, "d")
    run = CliRunner().invoke
    listed = run(main, ["quarantine", "list", "--json", "--db", url, "--verdict", "bulk"])
    assert listed.exit_code == 0, listed.output
    assert [(o["id"], o["verdict"]) for o in _json_lines(listed.stdout)] == [(bulk, "bulk")]
    for ref in (str(bulk), "<n2@x>", "<n3@x>"):
        labelled = run(main, ["quarantine", "label", ref, "bulk", "--db", url])
        assert labelled.exit_code == 0 and "labelled 1 message(s) bulk" in labelled.stdout, labelled.output
    with Store.open(url) as s:
        row = s.get(bulk)
        assert row is not None and row.label == "bulk"
    # three bulk labels vouch for the sender as three ham labels do (policy.learned_sender_labels = 3)
    senders = _json_lines(run(main, ["quarantine", "senders", "--json", "--db", url]).stdout)
    assert senders == [{"sender": "bulletin.example", "ham": 3, "unwanted": 0, "vouched": True}]
    stats = run(main, ["quarantine", "stats", "--db", url])
    assert stats.exit_code == 0 and "bulk" in stats.stdout
    by_verdict = json.loads(run(main, ["quarantine", "stats", "--json", "--db", url]).stdout)["by_verdict"]
    assert by_verdict == {"bulk": 3, "spam": 1}
    wrong = run(main, ["quarantine", "label", str(bulk), "promo", "--db", url])
    assert wrong.exit_code == 2 and "'ham', 'bulk', 'spam', 'bec'" in wrong.output
