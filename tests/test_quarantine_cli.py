"""`milter quarantine`: the --json line contract, table output, purge, and exit codes scripts rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from store_support import BACKENDS, backend_url, make_result

from milter.cli import main
from milter.store import Store
from milter.types import Action, Envelope, Verdict

ENV = Envelope(mail_from="alice@example.com", rcpt_tos=("bob@example.org",), client_addr="192.0.2.7")
RAW = b"Subject: Hi\r\n\r\nbody\r\n"
MILTER = Path(sys.executable).with_name("milter")


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from backend_url(request.param, tmp_path)


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
    shown = run(main, ["quarantine", "show", str(new), "--db", url])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["verdict"] == "bec"
    raw = run(main, ["quarantine", "raw", str(new), "--db", url])
    assert raw.exit_code == 0 and raw.stdout_bytes == RAW
    labelled = run(main, ["quarantine", "label", "<a@x>", "ham", "--db", url])
    assert labelled.exit_code == 0 and "labelled 1" in labelled.stdout
    assert run(main, ["quarantine", "delete", str(old), "--db", url]).exit_code == 0
    gone = run(main, ["quarantine", "raw", str(old), "--db", url])
    assert gone.exit_code == 1 and "not held in quarantine" in gone.stderr
    stats = json.loads(run(main, ["quarantine", "stats", "--db", url]).stdout)
    assert (stats["messages"], stats["quarantined"], stats["labelled"]) == (3, 1, 1)
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
    result = CliRunner().invoke(main, ["quarantine", "show", "42", "--db", f"sqlite:///{tmp_path}/x.db"])
    assert result.exit_code == 1 and "no message with id 42" in result.stderr
