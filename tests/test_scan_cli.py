"""`milter scan` contract: one JSON object per line per message, errors reported and counted."""

from __future__ import annotations

import json
import mailbox
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from milter.cli import main

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
KEYS = {"path", "verdict", "action", "scores", "reasons", "model"}


def rows(output: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def check_row(row: dict[str, object], explain_all: bool = False) -> None:
    explained = explain_all or row["action"] != "accept"  # flagged mail always says why
    assert set(row) == (KEYS | {"explanation", "why"} if explained else KEYS), row
    if explained:
        e = row["explanation"]
        assert isinstance(e, dict) and isinstance(row["why"], str)
        listed = sum(c["contribution"] for c in [*e["towards"], *e["against"]])
        assert abs(e["base"] + listed + e["rest"] - e["score"]) < 1e-4
        assert e["target"] == (row["verdict"] if row["verdict"] in ("spam", "bec") else "ham")
        assert all(c["text"] for c in [*e["towards"], *e["against"]])
    assert row["verdict"] in ("ham", "bulk", "spam", "bec")
    assert row["action"] in ("accept", "tag", "quarantine", "reject")
    scores = row["scores"]
    assert isinstance(scores, dict) and set(scores) == {"ham", "spam", "bec"}
    assert abs(sum(scores.values()) - 1.0) < 1e-3
    assert isinstance(row["reasons"], list) and all(isinstance(r, str) for r in row["reasons"])
    assert isinstance(row["model"], str) and row["model"]


def test_scan_json_on_fixture_folder_subprocess() -> None:
    """The README's example, run as a user would: the real console script over all fixtures."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "milter"), "scan", "--json", str(FIXTURES)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = rows(proc.stdout)
    emls = sorted(FIXTURES.rglob("*.eml"))
    assert len(out) == len(emls)
    errors = [r for r in out if "error" in r]
    # only the zero-byte fixture is not a message
    assert [Path(str(r["path"])).name for r in errors] == ["empty-message.eml"]
    assert proc.returncode == 1
    for row in out:
        if "error" not in row:
            check_row(row)


def test_scan_clean_input_exits_zero_and_reads_stdin() -> None:
    raw = (FIXTURES / "bec" / "ham-meeting.eml").read_bytes()
    result = CliRunner().invoke(main, ["scan", "--json", "-"], input=raw)
    assert result.exit_code == 0, result.output
    (row,) = rows(result.stdout)
    check_row(row)
    assert row["path"] == "-"


def test_unreadable_file_gets_error_line_and_scan_goes_on(tmp_path: Path) -> None:
    good = FIXTURES / "bec" / "ham-meeting.eml"
    result = CliRunner().invoke(main, ["scan", "--json", str(tmp_path / "missing.eml"), str(good)])
    out = rows(result.stdout)
    assert result.exit_code == 1
    assert str(out[0]["path"]).endswith("missing.eml") and "error" in out[0]
    check_row(out[1])


def test_mbox_messages_are_scanned_one_by_one(tmp_path: Path) -> None:
    box_path = tmp_path / "inbox.mbox"
    box = mailbox.mbox(str(box_path))
    picks = sorted((FIXTURES / "bec").glob("*.eml"))[:3]
    for p in picks:
        box.add(p.read_bytes())
    box.close()
    result = CliRunner().invoke(main, ["scan", "--json", str(box_path)])
    out = rows(result.stdout)
    assert [r["path"] for r in out] == [f"{box_path}#{i}" for i in range(3)]
    for row in out:
        check_row(row)


def test_bec_fixtures_with_protected_config(tmp_path: Path) -> None:
    cfg = tmp_path / "milter.toml"
    cfg.write_text(
        '[policy]\nprotected_domains = ["example.com"]\nprotected_names = ["Jane Smith", "Robert Brown"]\n'
    )
    result = CliRunner().invoke(main, ["scan", "--json", "--config", str(cfg), str(FIXTURES / "bec")])
    out = {Path(str(r["path"])).name: r for r in rows(result.stdout)}
    bec = [n for n in out if n.startswith("bec-")]
    ham = [n for n in out if n.startswith("ham-")]
    caught = [n for n in bec if out[n]["verdict"] == "bec" or out[n]["action"] != "accept"]
    assert len(caught) >= len(bec) - 1, {n: out[n]["verdict"] for n in bec}
    assert all(out[n]["action"] in ("accept", "tag") for n in ham), {n: out[n] for n in ham}


def test_table_output_has_summary() -> None:
    result = CliRunner().invoke(main, ["scan", str(FIXTURES / "bec")])
    assert result.exit_code == 0, result.output
    assert "messages:" in result.output


NEWSLETTER = (
    b"From: Bulletin <news@bulletin.example>\r\nTo: bob@example.org\r\nSubject: This week\r\n"
    b"Message-ID: <issue-42@bulletin.example>\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"List-Unsubscribe: <https://bulletin.example/u/42>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"Feedback-ID: 42:bulletin\r\n\r\nThis week's news.\r\n"
)


def test_bulk_verdict_in_json_and_in_the_summary(tmp_path: Path) -> None:
    # the model's ladders off, so the verdict depends on the sender's evidence alone, with any model
    cfg = tmp_path / "milter.toml"
    off = "tag = false\nquarantine = false\n"
    cfg.write_text(f"[policy.spam]\n{off}\n[policy.bec]\n{off}")
    result = CliRunner().invoke(main, ["scan", "--json", "--config", str(cfg), "-"], input=NEWSLETTER)
    assert result.exit_code == 0, result.output
    (row,) = rows(result.stdout)
    check_row(row)
    assert (row["verdict"], row["action"]) == ("bulk", "accept")
    assert row["reasons"][0] == "bulk sender: one-click unsubscribe (RFC 8058), Feedback-ID"  # type: ignore[index]
    table = CliRunner().invoke(main, ["scan", "--config", str(cfg), "-"], input=NEWSLETTER)
    assert table.exit_code == 0 and "1 messages: bulk 1 | actions: accept 1" in table.output


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[policy.spam]\nquarantine = 7\n")
    result = CliRunner().invoke(main, ["scan", "--config", str(cfg), str(FIXTURES / "bec")])
    assert result.exit_code == 2
    assert "policy.spam.quarantine" in result.output


def test_scan_dns_verifies_dkim_and_applies_dmarc(tmp_path: Path) -> None:
    """--dns: the gateway's DKIM / DMARC, over a real DNS server on loopback named in [auth]."""
    from auth_support import SELECTOR, FakeDns, dns_in_thread, generate_key, sign

    pem, record = generate_key(tmp_path)
    invoice = (FIXTURES / "bec" / "ham-vendor-invoice.eml").read_bytes()
    signed = tmp_path / "signed.eml"
    signed.write_bytes(sign(invoice, pem, "acme-supplies.test"))
    spoof = tmp_path / "spoof.eml"
    spoof.write_bytes(invoice)  # the same From, unsigned
    server = FakeDns(records={
        f"{SELECTOR}._domainkey.acme-supplies.test": [f'"{record}"'],
        "_dmarc.acme-supplies.test": ['"v=DMARC1; p=reject"'],
    })
    with dns_in_thread(server) as port:
        cfg = tmp_path / "milter.toml"
        cfg.write_text(
            f'[auth]\nnameservers = ["127.0.0.1:{port}"]\nauthserv_id = "scan.test"\n'
            '[policy]\nprotected_domains = ["acme-supplies.test"]\n'
        )
        args = ["scan", "--json", "--dns", "--config", str(cfg), str(signed), str(spoof)]
        result = CliRunner().invoke(main, args)
        plain = CliRunner().invoke(main, ["scan", "--json", "--config", str(cfg), str(spoof)])
    assert result.exit_code == 0, result.output
    good, bad = rows(result.output)
    good_auth, bad_auth, bad_reasons = str(good["auth"]), str(bad["auth"]), bad["reasons"]
    assert good_auth.startswith("scan.test; dkim=pass ") and "dmarc=pass" in good_auth
    assert (good["verdict"], good["action"]) == ("ham", "accept")
    assert "dmarc=fail" in bad_auth
    assert (bad["verdict"], bad["action"]) == ("bec", "quarantine")
    assert isinstance(bad_reasons, list)
    assert bad_reasons[0].startswith("protected domain spoofed: From domain acme-supplies.test")
    # without --dns: no lookups, no "auth" key, the contract's keys exactly
    check_row(rows(plain.output)[0])
    assert server.count("_dmarc.acme-supplies.test") == 1  # cached: asked once for both messages


def test_explain_explains_accepted_mail_too() -> None:
    raw = (FIXTURES / "bec" / "ham-meeting.eml").read_bytes()
    plain = CliRunner().invoke(main, ["scan", "--json", "-"], input=raw)
    explained = CliRunner().invoke(main, ["scan", "--json", "--explain", "-"], input=raw)
    (a,), (b,) = rows(plain.stdout), rows(explained.stdout)
    assert a["action"] == b["action"] == "accept" and "explanation" not in a
    check_row(b, explain_all=True)
    explanation = b["explanation"]
    assert isinstance(explanation, dict) and explanation["target"] == "ham"  # against the likelier other


def test_scan_dns_asks_the_blocklists_about_sender_and_link_domains(tmp_path: Path) -> None:
    """--dns with [reputation] zones: the From domain and the link domains are asked (a file has no
    client address), and a listing decides as in the gateway."""
    from auth_support import FakeDns, dns_in_thread

    invoice = (FIXTURES / "bec" / "ham-vendor-invoice.eml").read_bytes()
    path = tmp_path / "invoice.eml"
    link = b"Pay online: https://pay.invoices-portal.test/inv/88213\n\nAcme Supplies Billing"
    path.write_bytes(invoice.replace(b"Acme Supplies Billing\n--", link + b"\n--", 1))
    server = FakeDns(typed={("acme-supplies.test.dbl.test", "A"): ["127.0.1.2"]})
    with dns_in_thread(server) as port:
        cfg = tmp_path / "milter.toml"
        cfg.write_text(
            f'[auth]\nnameservers = ["127.0.0.1:{port}"]\n'
            '[[reputation.zone]]\nname = "dbl.test"\nkind = "domain"\naction = "quarantine"\n'
            'codes = { "127.0.1.2" = "spam domain" }\n'
        )
        listed = CliRunner().invoke(main, ["scan", "--json", "--dns", "--config", str(cfg), str(path)])
        plain = CliRunner().invoke(main, ["scan", "--json", "--config", str(cfg), str(path)])
    assert listed.exit_code == 0, listed.output
    (row,) = rows(listed.output)
    assert (row["verdict"], row["action"]) == ("spam", "quarantine")
    reasons = row["reasons"]
    assert isinstance(reasons, list)
    assert reasons[0] == "From domain acme-supplies.test listed in dbl.test (127.0.1.2: spam domain)"
    (unasked,) = rows(plain.output)
    assert unasked["action"] == "accept"  # without --dns no list is asked
    assert server.count("acme-supplies.test.dbl.test") == 1
    assert server.count("invoices-portal.test.dbl.test") == 1  # the link's domain, not listed
