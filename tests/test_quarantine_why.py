"""`milter quarantine stats --why`: the per-site explanation report, on SQLite and PostgreSQL.

Real verdicts: the fixture messages are scanned with the shipped model and its explainer, under a
policy that quarantines at a modest score so that spam and BEC are both held, and recorded as the
gateway records them. The report's counts are checked against counts computed here, independently,
from the rows read back one by one.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from milter.cli import main
from milter.commands.quarantine_why import WORDS_FEATURE, WORDS_TEXT, aggregate, paged
from milter.config import ClassThresholds, Config, PolicyConfig
from milter.explain import Contribution, Explanation
from milter.features import SCHEMA
from milter.scan import ScanResult, build_scanner
from milter.store import Store
from milter.store.models import Message
from milter.types import Action, Envelope

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "current.onnx"
FIXTURES = [p for folder in ("sample", "bec") for p in sorted((ROOT / "fixtures" / folder).glob("*.eml"))]
ENV = Envelope(mail_from="sender@example.net", rcpt_tos=("bob@example.org",), client_addr="192.0.2.7")
# Quarantine at a modest score: the shipped thresholds hold few of the fixtures, and the report needs
# held spam and held BEC.
MODEST = ClassThresholds(tag=0.3, quarantine=0.5)
POLICY = PolicyConfig(spam=MODEST, bec=MODEST)
MARKUP = "[bold red]held[/bold red] \x1b[31mred"


@dataclass(frozen=True)
class Recorded:
    url: str
    held_recent: list[int]  # quarantined, received now
    old: int  # quarantined, received 30 days ago
    unexplained: int  # quarantined, recorded without its explanation (as before the upgrade)
    not_held: list[int]


@pytest.fixture(scope="module")
def scanned() -> list[tuple[bytes, ScanResult]]:
    scanner = build_scanner(Config(policy=POLICY), MODEL)
    assert scanner.explainer is not None, "the shipped model ships no explainer (models/current.lgb.txt)"
    raws = [p.read_bytes() for p in FIXTURES]
    return list(zip(raws, scanner.scan_batch(raws, [ENV] * len(raws)), strict=True))


@pytest.fixture
def recorded(url: str, scanned: list[tuple[bytes, ScanResult]]) -> Recorded:
    held = [(raw, r) for raw, r in scanned if r.action is Action.QUARANTINE]
    others = [(raw, r) for raw, r in scanned if r.action is not Action.QUARANTINE]
    assert {r.verdict.value for _, r in held} == {"spam", "bec"}, "the fixtures should hold spam and BEC"
    assert all(r.explanation is not None for _, r in held)
    now = datetime.now(UTC)
    with Store.open(url) as s:
        old = s.record(held[0][1], ENV, held[0][0], SCHEMA.digest, received_at=now - timedelta(days=30))
        unexplained = s.record(replace(held[1][1], explanation=None), ENV, held[1][0], SCHEMA.digest)
        recent = [s.record(r, ENV, raw, SCHEMA.digest) for raw, r in held]
        not_held = [s.record(r, ENV, None, SCHEMA.digest) for _, r in others]
    return Recorded(url, recent, old, unexplained, not_held)


def _why(url: str, *args: str) -> dict[str, Any]:
    command = ["quarantine", "stats", "--why", "--json", "--db", url, "--top", "100000", *args]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def _expected(url: str, ids: list[int]) -> dict[str, dict[str, Any]]:
    """Per verdict, what the report must say about these rows, computed from each stored row."""
    groups: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"held": 0, "unexplained": 0, "pushes": defaultdict(list), "texts": defaultdict(Counter)})
    with Store.open(url) as s:
        rows = [s.get(i) for i in ids]
    for row in rows:
        assert row is not None and row.action == "quarantine"
        g = groups[row.verdict]
        g["held"] += 1
        if row.explanation is None:
            g["unexplained"] += 1
            continue
        towards = sorted(row.explanation["towards"], key=lambda c: c["contribution"], reverse=True)[:3]
        for c in towards:
            g["pushes"][c["feature"]].append(c["contribution"])
            g["texts"][c["feature"]][c["text"]] += 1
        words = [c["contribution"] for c in towards if c["feature"].startswith("tok_")]
        if words:
            g["pushes"][WORDS_FEATURE].append(sum(words))
    return groups


def _check(report: dict[str, Any], expected: dict[str, dict[str, Any]]) -> None:
    groups = {g["verdict"]: g for g in report["verdicts"]}
    assert set(groups) == set(expected)
    assert report["held"] == sum(e["held"] for e in expected.values())
    assert report["unexplained"] == sum(e["unexplained"] for e in expected.values())
    for verdict, e in expected.items():
        g = groups[verdict]
        explained = e["held"] - e["unexplained"]
        assert (g["held"], g["unexplained"], g["explained"], g["unreadable"]) == (
            e["held"], e["unexplained"], explained, 0)
        assert g["reasons_total"] == len(e["pushes"]) == len(g["reasons"])
        reasons = {r["feature"]: r for r in g["reasons"]}
        assert {f: r["count"] for f, r in reasons.items()} == {f: len(v) for f, v in e["pushes"].items()}
        for feature, values in e["pushes"].items():
            r = reasons[feature]
            assert r["share"] == pytest.approx(len(values) / explained, abs=1e-6)
            assert r["sum"] == pytest.approx(sum(values), abs=1e-5)
            assert r["median"] == pytest.approx(statistics.median(values), abs=1e-5)
            if feature != WORDS_FEATURE:
                best = max(e["texts"][feature].values())
                assert e["texts"][feature][r["text"]] == best == r["text_count"]
                assert r["wordings"] == len(e["texts"][feature])
        counts = [r["count"] for r in g["reasons"]]
        assert counts == sorted(counts, reverse=True)  # ranked by how often a reason holds mail


def test_report_counts_match_the_stored_rows(recorded: Recorded) -> None:
    report = _why(recorded.url)
    assert report["days"] == 14 and report["top_pushes"] == 3
    _check(report, _expected(recorded.url, [*recorded.held_recent, recorded.unexplained]))
    assert report["unexplained"] == 1  # the row stored without an explanation, and only it


def test_period_excludes_older_rows(recorded: Recorded) -> None:
    everything = [*recorded.held_recent, recorded.unexplained, recorded.old]
    wide = _why(recorded.url, "--days", "60")
    _check(wide, _expected(recorded.url, everything))
    assert wide["held"] == _why(recorded.url)["held"] + 1


def test_verdict_filter(recorded: Recorded) -> None:
    expected = _expected(recorded.url, [*recorded.held_recent, recorded.unexplained])
    for verdict in ("spam", "bec"):
        report = _why(recorded.url, "--verdict", verdict)
        assert report["verdict"] == verdict
        _check(report, {verdict: expected[verdict]})


def test_top_limits_the_lines_not_the_counts(recorded: Recorded) -> None:
    full = _why(recorded.url)
    result = CliRunner().invoke(main, ["quarantine", "stats", "--why", "--json", "--top", "2", "--db",
                                       recorded.url])
    short = json.loads(result.stdout)
    for a, b in zip(full["verdicts"], short["verdicts"], strict=True):
        assert b["reasons"] == a["reasons"][:2] and b["reasons_total"] == a["reasons_total"]


def test_unreadable_explanation_is_counted_apart(recorded: Recorded) -> None:
    with Store.open(recorded.url) as s, s.engine.begin() as conn:
        conn.execute(sa.update(Message).where(Message.id == recorded.held_recent[0])
                     .values(explanation={"not": "an explanation"}))
    report = _why(recorded.url)
    assert report["unreadable"] == 1
    assert report["held"] == report["explained"] + report["unexplained"] + report["unreadable"]


def test_table_for_people(recorded: Recorded) -> None:
    # one held message whose top reason reads as Rich markup and a terminal escape: it must print as typed
    with Store.open(recorded.url) as s:
        pk = recorded.held_recent[0]
        row = s.get(pk)
        assert row is not None and row.explanation is not None
        doctored = dict(row.explanation)
        # a feature of its own, so that its only wording is this one (the commonest wording is shown)
        doctored["towards"] = [{**doctored["towards"][0], "feature": "x_markup_probe", "contribution": 99.0,
                                "text": MARKUP}]
        with s.engine.begin() as conn:
            conn.execute(sa.update(Message).where(Message.id == pk).values(explanation=doctored))
    command = ["quarantine", "stats", "--why", "--top", "100000", "--db", recorded.url]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "verdict spam" in out and "verdict bec" in out
    assert "[bold red]held[/bold red] red" in out and "\x1b" not in out  # escape removed, markup as typed
    assert "not counted above: 1 held" in out and "without a stored explanation" in out
    report = _why(recorded.url)
    if any(r["feature"] == WORDS_FEATURE for g in report["verdicts"] for r in g["reasons"]):
        assert WORDS_TEXT in out


def test_reads_only_the_columns_it_needs(recorded: Recorded) -> None:
    statements: list[str] = []
    with Store.open(recorded.url) as s:
        sa.event.listen(s.engine, "before_cursor_execute",
                        lambda _c, _cur, stmt, *_a: statements.append(stmt.lower()))
        since = datetime.now(UTC) - timedelta(days=14)
        whole = s.held_explanations(since)
        pages = list(paged(lambda after: s.held_explanations(since, None, after, 3)))
    assert pages == whole and len(whole) == len(recorded.held_recent) + 1
    assert [i for i, _, _ in whole] == sorted([*recorded.held_recent, recorded.unexplained])
    reads = [st for st in statements if st.lstrip().startswith("select") and "messages" in st]
    assert reads and not any("feature_vector" in st or "raw" in st or "subject" in st for st in reads)


def test_words_line_sums_the_buckets_of_one_message() -> None:
    def push(feature: str, amount: float) -> Contribution:
        return Contribution(feature, 1.0, amount, f"{feature} text")

    def explanation(*towards: Contribution) -> dict[str, Any]:
        return Explanation("m", "spam", "ham", -1.0, 3.0, towards, (), 0.0).as_json()

    since = datetime.now(UTC)
    rows = [
        (1, "spam", explanation(push("tok_0001", 0.5), push("tok_0002", 0.25),
                                push("mime_top_html_only", 2.0))),
        (2, "spam", explanation(push("mime_top_html_only", 1.0), push("tok_0001", 1.5),
                                push("url_count_log", 0.1), push("tok_0003", 0.05))),  # 4th: not counted
        (3, "spam", None),
    ]
    report = aggregate(rows, since, 14)
    (group,) = report.groups
    reasons = {r.feature: r for r in group.reasons}
    assert (group.held, group.explained, group.unexplained) == (3, 2, 1)
    assert set(reasons) == {"tok_0001", "tok_0002", "mime_top_html_only", "url_count_log", WORDS_FEATURE}
    words = reasons[WORDS_FEATURE]
    assert (words.count, words.buckets, words.text) == (2, 2, WORDS_TEXT)
    assert words.total == pytest.approx(0.5 + 0.25 + 1.5) and words.median == pytest.approx((0.75 + 1.5) / 2)
    assert reasons["tok_0001"].count == 2 and reasons["tok_0002"].count == 1
    assert reasons["mime_top_html_only"].share == 1.0 and reasons["mime_top_html_only"].median == 1.5
    assert group.reasons[0].feature == "mime_top_html_only"  # count 2, largest sum: ranked first


def test_verdict_and_top_need_why(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["quarantine", "stats", "--top", "3", "--db", f"sqlite:///{tmp_path}/s.db"])
    assert result.exit_code == 2 and "--why" in result.output
