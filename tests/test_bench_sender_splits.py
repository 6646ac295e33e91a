"""bench/sender_splits.py: issue 11's lines from scored test rows, and the policy that scores them."""

from __future__ import annotations

import importlib.util
import sys
from email.message import EmailMessage
from pathlib import Path
from types import ModuleType

import pytest

from milter.types import Action

ROOT = Path(__file__).resolve().parent.parent


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_sender_splits", ROOT / "bench" / "sender_splits.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up; its pool pickles by name
    spec.loader.exec_module(module)
    return module


B = _bench()


def _scored(corpus: str, label: str, action: Action, n: int = 1) -> list[object]:
    return [B.Scored(B.Row(corpus, label, f"/x/{corpus}/{label}/{i}.eml"), action, (0.5, 0.4, 0.1), ())
            for i in range(n)]


def test_the_lines_group_rows_as_issue_11_counts_them() -> None:
    rows = (
        _scored("foff-milter-mailbox", "ham", Action.QUARANTINE)
        + _scored("modern-bulk-ham", "ham", Action.TAG)
        + _scored("modern-bulk-ham", "ham", Action.ACCEPT, 2)
        + _scored("enron-spam-raw", "ham", Action.ACCEPT, 6)
        + _scored("foff-milter-mailbox", "spam", Action.TAG, 3)
        + _scored("foff-milter-mailbox", "spam", Action.ACCEPT)
        + _scored("enron-spam-raw", "spam", Action.REJECT, 4)
        + _scored("phishing-pot", "phish", Action.QUARANTINE, 2)
    )
    got = B.lines(rows)
    assert got["modern ham"] == (4, 50.0, 25.0)  # the tag counts as flagged, the quarantine as both
    assert got["  modern-bulk-ham ham"] == (3, pytest.approx(100 / 3), 0.0)
    assert got["all ham"] == (10, 20.0, 10.0)
    assert got["spam pooled"] == (8, 87.5, 50.0)  # a rejection is held
    assert got["  foff-milter-mailbox spam"] == (4, 75.0, 0.0)
    assert got["phishing"] == (2, 100.0, 100.0)
    assert "  cw-l-spam spam" not in got  # no rows, no line
    text = B.table({"salt x": got})
    assert "modern ham" in text and "50.00 / 25.00 n=4" in text and "<= 2 / 0.5" in text
    assert "  cw-l-spam spam" in text  # the line is listed, with no figure


def _from(sender: str, corpus: str, label: str, action: Action, n: int = 1) -> list[object]:
    return [B.Scored(B.Row(corpus, label, f"/x/{sender}/{i}.eml", sender), action, (0.5, 0.4, 0.1), ())
            for i in range(n)]


def test_the_worst_sender_of_each_line_and_the_line_without_it() -> None:
    rows = (
        _from("feed.example", "spamassassin-public", "ham", Action.TAG, 6)  # one feed's items, flagged
        + _from("feed.example", "spamassassin-public", "ham", Action.ACCEPT, 4)
        + _from("alice@mail.example", "enron-spam-raw", "ham", Action.TAG)
        + _from("bob.example", "enron-spam-raw", "ham", Action.ACCEPT, 89)
        + _from("casino.example", "phishing-pot", "phish", Action.ACCEPT, 3)
        + _from("kit.example", "phishing-pot", "phish", Action.QUARANTINE, 7)
    )
    worst = B.worst_senders(rows)
    ham = worst["all ham"]
    assert (ham.sender, ham.wrong, ham.rows) == ("feed.example", 6, 10)
    assert ham.without == pytest.approx(100 / 90)  # alice's one tag among the 90 other ham
    phish = worst["phishing"]
    assert (phish.sender, phish.wrong, phish.rows, phish.without) == ("casino.example", 3, 3, 100.0)
    assert "spam pooled" not in worst  # no rows, no worst sender
    assert "modern ham" not in worst
    text = B.senders_table({"salt x": worst})
    assert "feed.example" in text and "6 of 10" in text and "casino.example" in text


def test_rows_are_scored_through_the_shipped_policy(tmp_path: Path) -> None:
    def mail(name: str, html: str) -> Path:
        msg = EmailMessage()
        msg["From"] = "Derila <NeckandShoulder@promosprout.help>"
        msg["To"] = "bob@example.com"
        msg["Subject"] = "Restful nights start with this"
        msg.set_content("Open the picture.")
        msg.add_alternative(html, subtype="html")
        path = tmp_path / name
        path.write_bytes(bytes(msg))
        return path

    link = '<a href="https://promosprout.help/c"><img src="https://promosprout.help/a.png"></a>'
    picture = mail("a.eml", f"<html><body>{link}</body></html>")
    rows = [B.Row("foff-milter-mailbox", "spam", str(picture))]
    scored = B.score(rows, ROOT / "models" / "current.onnx", None)
    assert [s.row for s in scored] == rows
    assert scored[0].action in (Action.TAG, Action.QUARANTINE)
    assert scored[0].reasons  # the policy said why


def test_a_refit_passes_the_recipe_options_and_the_salt_to_milter_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **_: object) -> None:
        calls.append(cmd)

    monkeypatch.setattr(B.subprocess, "run", fake_run)
    out = tmp_path / "a1"
    assert B.refit("a1", out, ["--sender-balance", "0.5"]) == out / "current.onnx"
    cmd = calls[0]
    assert cmd[cmd.index("--split-salt") + 1] == "a1"
    assert cmd[-2:] == ["--sender-balance", "0.5"]
    assert cmd[cmd.index("--out") + 1] == str(out)
    # a model already there is reused, not refitted
    (out / "current.onnx").write_bytes(b"")
    B.refit("a1", out, ["--sender-balance", "0.5"])
    assert len(calls) == 1


def test_the_shipped_split_is_named_default_not_an_empty_salt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(B.subprocess, "run", lambda *_a, **_k: None)
    B.refit("", tmp_path / "default")
    B.refit("a1", tmp_path / "a1")
    out = capsys.readouterr().out
    assert "salt 'default' (the shipped split): refitting" in out
    assert "salt 'a1': refitting" in out
    assert "salt '':" not in out
