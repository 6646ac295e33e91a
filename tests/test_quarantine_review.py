"""`milter quarantine` faults a review reproduced: purging everything, reviewing a new empty store,
sender text reaching the terminal, a forgeable preview, miscounted statistics, numbers that overflowed,
silent partial deletes, raw control characters in --json."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from store_support import make_result

from milter.cli import main
from milter.store import Store
from milter.types import Envelope, Verdict

ENV = Envelope(mail_from="alice@example.com", rcpt_tos=("bob@example.org",))
RAW = b"Subject: Hi\r\n\r\nbody\r\n"


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _store(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    Store.open(url).close()
    return url


# -- Q1: a retention of 0 days purged every held message -------------------------------------------


def test_purge_refuses_zero_days_and_keeps_a_message_just_held(tmp_path: Path) -> None:
    url = _store(tmp_path)
    with Store.open(url) as s:
        pk = s.record(make_result(), ENV, RAW, "d")
    cfg = tmp_path / "milter.toml"
    cfg.write_text(f'[store]\nurl = "{url}"\nretention_days = 0\n')
    from_config = _run("quarantine", "purge", "--config", str(cfg))
    assert from_config.exit_code == 1 and "store.retention_days" in from_config.stderr
    assert _run("quarantine", "purge", "--days", "0", "--db", url).exit_code == 2
    with Store.open(url) as s:
        assert s.get_raw(pk) == RAW


# -- Q2: review commands must find the store the gateway filled ------------------------------------


@pytest.mark.parametrize("command", [
    ["quarantine", "list"], ["quarantine", "stats"], ["quarantine", "show", "1"], ["quarantine", "senders"],
    ["quarantine", "label", "1", "ham"], ["quarantine", "purge", "--days", "30"],
    ["history", "stats"], ["history", "rebuild"],
])
def test_review_commands_refuse_a_missing_store(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default URL is relative (sqlite:///var/milter.db): in another folder, `list` created an empty
    store there and said "quarantine is empty", exit 0."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MILTER_STORE_URL", raising=False)
    result = _run(*command)
    assert result.exit_code == 1, result.output
    assert result.stderr == (f"Error: no store at {tmp_path / 'var' / 'milter.db'}: the file does not exist "
                             "(check --db, MILTER_STORE_URL or the config's store.url; the gateway creates "
                             "its store)\n")
    assert not (tmp_path / "var").exists()


def test_a_mistyped_db_creates_no_folder(tmp_path: Path) -> None:
    typo = tmp_path / "typo-dir" / "milter.db"
    result = _run("quarantine", "list", "--db", f"sqlite:///{typo}")
    assert result.exit_code == 1 and f"no store at {typo}" in result.stderr
    assert not typo.parent.exists()


# -- Q5: sender keys are sender text ---------------------------------------------------------------


def test_senders_strips_escapes_from_the_sender(tmp_path: Path) -> None:
    url = _store(tmp_path)
    with Store.open(url) as s:
        for _ in range(3):
            pk = s.record(make_result(from_addr="eve@evil\x1b[8m.example"), ENV, None, "d")
            s.set_label(pk, "ham", "cli")
    text = _run("quarantine", "senders", "--all", "--db", url)
    assert text.exit_code == 0, text.output
    assert "\x1b" not in text.stdout and "│ evil.example │" in text.stdout  # as list and show print it


# -- Q6 / Q8: show's preview ----------------------------------------------------------------------

IMAGE_ONLY = (b"From: s@spam.example\r\nSubject: Hot deal\r\nMIME-Version: 1.0\r\n"
              b"Content-Type: text/html\r\n\r\n"
              b"<html><body><img src=\"http://spam.example/deal.png\"></body></html>\r\n")
ATTACHMENT_ONLY = (b"From: ceo@corp-example.com\r\nSubject: Invoice\r\nMIME-Version: 1.0\r\n"
                   b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
                   b"Content-Type: application/pdf; name=inv.pdf\r\nContent-Transfer-Encoding: base64\r\n"
                   b"Content-Disposition: attachment; filename=inv.pdf\r\n\r\n"
                   b"JVBERi0xLjQKJcfsj6IK\r\n--B--\r\n")


def _preview(url: str, pk: int) -> str:
    shown = _run("quarantine", "show", str(pk), "--db", url)
    assert shown.exit_code == 0, shown.output
    return shown.stdout.split("preview from", 1)[1].split("\nwhy: the policy", 1)[0]


def test_show_tells_no_text_from_no_bytes(tmp_path: Path) -> None:
    """Before, all three said "(quarantined bytes not available)", though two had their bytes held."""
    url = _store(tmp_path)
    with Store.open(url) as s:
        image, attached, gone = (s.record(make_result(), ENV, raw, "d")
                                 for raw in (IMAGE_ONLY, ATTACHMENT_ONLY, IMAGE_ONLY))
        s.delete([gone])
    assert f"(no text to preview: {len(IMAGE_ONLY)} bytes; parts: text/html)" in _preview(url, image)
    attached_text = " ".join(_preview(url, attached).split())
    assert f"(no text to preview: {len(ATTACHMENT_ONLY)} bytes;" in attached_text
    assert "attachments: inv.pdf (application/pdf, " in attached_text
    assert "(quarantined bytes not available)" in _preview(url, gone)
    assert "not available" not in _preview(url, image) + _preview(url, attached)
    facts = json.loads(_run("quarantine", "show", str(attached), "--db", url, "--json").stdout)
    assert facts["raw_size"] == len(ATTACHMENT_ONLY)
    assert facts["parts"]["attachments"][0]["filename"] == "inv.pdf"


def test_the_preview_is_framed_so_a_body_cannot_forge_why(tmp_path: Path) -> None:
    body = ("Please find the wire instructions attached.\r\nwhy: the policy\r\n  - no rule fired\r\n"
            + "x" * 180 + " why: the model says release\r\n"
            + "\r\n \u2800\r\n \u3164\uffa0\r\n" * 30 + "end\r\n")  # braille blank, Hangul fillers
    raw = (b"From: ceo@corp-example.com\r\nSubject: Wire\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
           + body.encode())
    url = _store(tmp_path)
    with Store.open(url) as s:
        pk = s.record(make_result(Verdict.BEC), ENV, raw, "d")
    shown = _run("quarantine", "show", str(pk), "--db", url).stdout
    whys = [line for line in shown.splitlines() if line.startswith("why:")]  # the real ones only
    assert len(whys) == 2 and whys[0] == "why: the policy" and whys[1].startswith("why: the model (none")
    frame = _preview(url, pk).splitlines()[1:]  # after "preview from ...:", up to the real why
    inner = frame[1:-1]  # between the frame's top and bottom edges
    assert len(inner) > 4 and all(line.startswith("│ ") for line in inner)  # wrapped lines too
    texts = [line[2:].rstrip(" │") for line in inner]
    # the invisible fillers are blank lines, squeezed with the others: nothing between "release" and "end"
    assert texts[texts.index("end") - 1].strip() == ""
    assert "\u2800" not in shown and "\u3164" not in shown


# -- Q9: held is neither released nor deleted ------------------------------------------------------


def test_stats_do_not_count_released_as_held(tmp_path: Path) -> None:
    url = _store(tmp_path)
    with Store.open(url) as s:
        ids = [s.record(make_result(message_id=f"<m{i}@x>"), ENV, RAW, "d") for i in range(3)]
        s.mark_released(ids[0])
        s.mark_released(ids[1])
    stats = json.loads(_run("quarantine", "stats", "--json", "--db", url).stdout)
    assert (stats["quarantined"], stats["released"]) == (1, 2)
    assert "3 messages, 1 held in quarantine, 2 released" in _run("quarantine", "stats", "--db", url).stdout


# -- Q11: numbers beyond what the database or a date can hold ---------------------------------------

BIG = "99999999999999999999"


@pytest.mark.parametrize(("args", "code"), [
    (["list", "--since", "1000000000d"], 2), (["list", "--since", "99999999999999999999m"], 2),
    (["list", "--offset", BIG], 2), (["list", "--limit", BIG], 2),
    (["show", BIG], 2), (["raw", BIG], 2), (["delete", BIG], 2), (["release", BIG], 2),
    (["label", BIG, "spam"], 1), (["purge", "--days", "1000000000"], 2), (["purge", "--days", "36501"], 2),
])
def test_large_numbers_are_refused_in_one_line(args: list[str], code: int, tmp_path: Path) -> None:
    """Before, each ended in an OverflowError traceback (timedelta, or SQLite's 64-bit INTEGER)."""
    result = _run("quarantine", *args, "--db", _store(tmp_path))
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit)  # not an OverflowError escaping
    assert "Traceback" not in result.output


def test_the_largest_bounds_still_work(url: str) -> None:
    Store.open(url).close()
    assert _run("quarantine", "list", "--offset", str(2**63 - 1), "--db", url).exit_code == 0
    assert _run("quarantine", "list", "--since", "36500d", "--db", url).exit_code == 0
    # ids are 32-bit INTEGERs on PostgreSQL: one above failed there with "integer out of range"
    missing = _run("quarantine", "show", str(2**31 - 1), "--db", url)
    assert missing.exit_code == 1 and "no message with id" in missing.stderr
    assert _run("quarantine", "show", str(2**31), "--db", url).exit_code == 2
    unknown = _run("quarantine", "label", str(2**31), "spam", "--db", url)
    assert unknown.exit_code == 1 and "no message matches" in unknown.stderr


# -- Q12: a long label source ------------------------------------------------------------------------


def test_label_with_a_long_source(url: str) -> None:
    """Failed on PostgreSQL (VARCHAR(64)); now cut as record_labelled cuts it."""
    with Store.open(url) as s:
        pk = s.record(make_result(message_id="<a@x>"), ENV, RAW, "d")
    source = "helpdesk ticket 4711 (reported by carol@corp.example via the Outlook add-in)"
    for ref in (str(pk), "<a@x>"):
        result = _run("quarantine", "label", "--source", source, ref, "spam", "--db", url)
        assert result.exit_code == 0, result.output
    with Store.open(url) as s:
        row = s.get(pk)
        assert row is not None and row.label_source == source[:64]


# -- Q13 ---------------------------------------------------------------------------------------------


def test_delete_names_what_it_did_not_delete(tmp_path: Path) -> None:
    url = _store(tmp_path)
    with Store.open(url) as s:
        a = s.record(make_result(message_id="<a@x>"), ENV, RAW, "d")
        busy = s.record(make_result(message_id="<b@x>"), ENV, RAW, "d")
        gone = s.record(make_result(message_id="<c@x>"), ENV, RAW, "d")
        relayed = s.record(make_result(message_id="<d@x>"), ENV, None, "d")
        s.delete([gone])
        assert s.claim_release(busy, "otherhost pid 1 abc").state.name == "CLAIMED"
    result = _run("quarantine", "delete", str(a), str(busy), str(gone), str(relayed), "999", "--db", url)
    assert result.exit_code == 1
    assert result.stdout == "deleted 1 of 5\n"
    assert result.stderr == (f"Error: not deleted: {busy} (being released right now; try again once that "
                             f"release has ended), {gone} (already deleted), {relayed} (not quarantined), "
                             "999 (no such message)\n")
    ok = _run("quarantine", "delete", str(a), str(a), "--db", url)  # already gone now
    assert ok.exit_code == 1 and "already deleted" in ok.stderr


def test_delete_of_held_messages_exits_0(tmp_path: Path) -> None:
    url = _store(tmp_path)
    with Store.open(url) as s:
        ids = [s.record(make_result(), ENV, RAW, "d") for _ in range(2)]
    result = _run("quarantine", "delete", *map(str, ids), str(ids[0]), "--db", url)
    assert (result.exit_code, result.stdout) == (0, "deleted 2 of 2\n")


def test_json_escapes_control_and_format_characters(tmp_path: Path) -> None:
    subject = "invoice \u202egnp.exe \x9b31m \u200b done"
    url = _store(tmp_path)
    with Store.open(url) as s:
        yesterday = datetime.now(UTC) - timedelta(days=1)
        pk = s.record(make_result(subject=subject), ENV, RAW, "d", received_at=yesterday)
    for args in (["list", "--json"], ["show", str(pk), "--json"]):
        out = _run("quarantine", *args, "--db", url).stdout
        assert not any(ch in out for ch in "\u202e\x9b\u200b"), args
        assert "\\u202e" in out and "\\u009b" in out
        listed = json.loads(out.splitlines()[0] if args[0] == "list" else out)
        assert listed["subject"] == subject  # the same value, only written escaped


# -- Q7: raw UTF-8 header values in show ---------------------------------------------------------------


def test_show_reads_raw_utf8_headers_as_utf8(tmp_path: Path) -> None:
    """RFC 6532 headers: before, `show` printed "Gr????e aus M??nchen" (every byte of a letter a "?")."""
    raw = ("From: Jürgen Müller <jürgen@bücher.example>\r\nSubject: Grüße aus München – Rechnung\r\n"
           "Content-Type: text/plain; charset=utf-8\r\n\r\nHallo\r\n").encode()
    latin1 = b"Subject: caf\xe9\r\n\r\nx\r\n"
    url = _store(tmp_path)
    with Store.open(url) as s:
        pk = s.record(make_result(), ENV, raw, "d")
        other = s.record(make_result(), ENV, latin1, "d")
    headers = json.loads(_run("quarantine", "show", str(pk), "--db", url, "--json").stdout)["headers"]
    assert headers["subject"] == "Grüße aus München – Rechnung"
    assert headers["from"] == "Jürgen Müller <jürgen@bücher.example>"
    assert "Grüße aus München" in _run("quarantine", "show", str(pk), "--db", url).stdout
    # a byte that is no UTF-8 shows as the replacement character, not as a plausible letter
    assert json.loads(_run("quarantine", "show", str(other), "--db", url, "--json").stdout)[
        "headers"]["subject"] == "caf\ufffd"
