"""The fault-matrix soak (bench/soak.py): its accounting on made-up histories, then the short soak itself.

The short soak is CI's version of docs/soak.md: 1,000 real corpus messages from 50 clients through
`milter serve --workers 2` while every fault of the schedule happens once (DNS losing packets, the
downstream slow, answering 4xx, 5xx and down, a SIGHUP, the store unavailable, SIGKILL of a worker,
a corrupt model reloaded, SIGKILL of the whole gateway). It asserts the accounting by Message-ID.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPORA = ROOT / ".cache" / "corpora"


def _load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", ROOT / "bench" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


soak = _load_soak()


def item(mid: str, *attempts: tuple[float, float, int, str]) -> object:
    it = soak.Item(0, mid, Path("x.eml"))
    it.attempts.extend(soak.Attempt(*a) for a in attempts)
    return it


# -- the accounting, on histories made up to the second ----------------------------------------


def test_delivered_quarantined_rejected_add_up() -> None:
    items = [
        item("<a>", (0, 1, 250, "2.0.0 Ok: queued")),
        item("<q>", (0, 1, 250, "2.0.0 Ok: quarantined as 7")),
        item("<r>", (0, 1, 554, "5.7.1 refused")),
    ]
    rows = [soak.Row(7, "<q>", 0.5, True, True), soak.Row(8, "<a>", 1.2, False, False)]
    report = soak.account(items, {"<a>": [soak.Copy(0.5)]}, rows, [])
    assert (report["delivered"], report["quarantined"], report["rejected"]) == (1, 1, 1)
    assert report["adds_up"] and report["lost"] == 0 and report["unexplained"] == 0


def test_a_250_without_its_copy_or_row_is_lost() -> None:
    items = [
        item("<a>", (0, 1, 250, "2.0.0 Ok: queued")),
        item("<q>", (0, 1, 250, "2.0.0 Ok: quarantined as 7")),
        item("<q2>", (0, 1, 250, "2.0.0 Ok: quarantined as 9")),
    ]
    rows = [soak.Row(9, "<q2>", 0.5, True, False)]  # held, but its bytes are gone
    report = soak.account(items, {}, rows, [])
    assert report["lost"] == 3
    assert report["quarantine_rows_without_raw"] == 1


def test_a_message_still_deferred_is_unfinished_and_does_not_add_up() -> None:
    report = soak.account([item("<a>", (0, 1, 451, "4.4.1 later"))], {}, [], [])
    assert report["unfinished"] == 1 and not report["adds_up"]


def test_duplicates_get_their_cause_or_count_as_unexplained() -> None:
    items = [
        # the gateway gave up on the downstream after DATA: 451, then delivered again
        item("<t>", (0, 6, 451, "4.4.1 Downstream relay unavailable"), (8, 9, 250, "2.0.0 Ok")),
        # the connection broke while a SIGKILL landed: delivered, our 250 never sent
        item("<k>", (10, 11, 0, "SMTPServerDisconnected"), (13, 14, 250, "2.0.0 Ok")),
        # the connection broke with no SIGKILL anywhere near: nothing explains the second copy
        item("<u>", (20, 21, 0, "SMTPServerDisconnected"), (40, 41, 250, "2.0.0 Ok")),
    ]
    copies = {
        "<t>": [soak.Copy(1, reply_lost=True), soak.Copy(8.5)],
        "<k>": [soak.Copy(10.5), soak.Copy(13.5)],
        "<u>": [soak.Copy(20.5), soak.Copy(40.5)],
    }
    report = soak.account(items, copies, [], [(10.8, "kill_gateway")])
    causes = report["duplicate_copies_at_sink"]
    assert sum(causes.values()) == 3
    assert report["unexplained"] == 1
    assert any(k.startswith("kill_gateway") for k in causes)
    assert any(k.startswith("downstream reply lost") for k in causes)


def test_rows_for_a_message_never_acknowledged_as_quarantined_are_orphans() -> None:
    items = [item("<r>", (0, 1, 554, "5.7.1 refused"))]
    rows = [soak.Row(3, "<r>", 0.5, True, True), soak.Row(4, "<never-sent>", 0.5, True, True)]
    report = soak.account(items, {}, rows, [])
    assert sum(report["orphan_rows"].values()) == 2
    assert report["unexplained"] == 2


def test_message_id_is_replaced_including_a_folded_one() -> None:
    raw = b"Subject: hi\r\nMessage-ID:\r\n <old@x>\r\nFrom: a@b.example\r\n\r\nbody\r\n"
    out = soak.with_message_id(raw, "<new@soak.test>")
    assert out.startswith(b"Message-ID: <new@soak.test>\r\n")
    assert b"old@x" not in out and b"Subject: hi\r\nFrom: a@b.example\r\n\r\nbody\r\n" in out
    assert soak.header_message_id(out) == "<new@soak.test>"


# -- the short soak ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_short_soak_accounts_for_every_message(tmp_path: Path) -> None:
    if not any(CORPORA.glob("*/*/*.eml")):
        pytest.fail(f"corpora not unpacked in {CORPORA} (make corpora)")
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--short", "--json", str(out),
         "--workdir", str(tmp_path / "gw")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert out.exists(), tail
    report = json.loads(out.read_text())
    assert report["sent"] == 1000
    assert report["lost"] == 0, (report["lost_message_ids"], tail)
    assert report["unfinished"] == 0, (report["unfinished_message_ids"], tail)
    assert report["adds_up"]
    assert report["unexplained"] == 0, tail
    assert report["phantom_250"] == 0 and report["quarantine_rows_without_raw"] == 0
    # Every fault ran once and did what it should (the corrupt model refused by both workers, ...).
    assert [f["name"] for f in report["faults"]] == list(soak.FAULTS), tail
    assert report["faults_failed"] == [], tail
    # The mix and the faults really bit: mail of every fate, deferrals and broken connections retried.
    assert min(report["delivered"], report["quarantined"], report["rejected"]) > 0
    assert report["replies"].get("4xx", 0) > 0 and report["replies"].get("conn", 0) > 0
    assert report["gateway_log"]["internal_error"] == 0, tail
    assert proc.returncode == 0, tail
