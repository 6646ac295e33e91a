"""`milter quarantine stats --why`: which reasons drive the quarantine over a period.

For every held message (action "quarantine") with a stored explanation (milter.explain), the three
largest pushes towards its verdict count once each. Per feature the report gives in how many held
messages it is among those three (count, and share of the explained held messages of that verdict),
the sum and the median of its contribution over those messages, and its commonest wording. An admin
then sees that, say, half of the held spam is held mostly for "HTML only" and can label accordingly.

Hashed word buckets (`tok_NNNN`) are counted per bucket and also together, as one line: 1,024
buckets each with a few messages would otherwise hide that words are what holds the mail. The words
line counts a message once however many of its top three are buckets, and its contribution in that
message is the sum of theirs.

Held messages without a stored explanation (stored before explanations were, scored by a model
without an explainer, or explaining failed) are counted as such and said so, never silently dropped.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from milter.commands import quarantine_view as view
from milter.explain import Contribution, Explanation

TOP_PUSHES = 3
WORDS_FEATURE = "tok_*"
WORDS_TEXT = "words in the text (hashed word groups)"
_TOKEN_PREFIX = "tok_"
UNEXPLAINED_WHY = ("stored before explanations were, scored by a model without an explainer, "
                   "or explaining failed")

#: (id, verdict, stored explanation): what Store.held_explanations returns
HeldRow = tuple[int, str, object]


@dataclass(frozen=True)
class Reason:
    """One feature (or the words line) over the held messages of one verdict."""

    feature: str
    text: str  # its commonest wording (for the words line: WORDS_TEXT)
    count: int  # explained held messages in which it is among the top TOP_PUSHES pushes
    share: float  # count / explained held messages of the verdict
    total: float  # sum of its contribution (log-odds) over those messages
    median: float  # median of it over those messages
    text_count: int = 0  # in how many of those messages it reads so
    wordings: int = 1  # distinct wordings among those messages (a count or size reads differently in each)
    buckets: int = 0  # the words line: how many distinct hashed word buckets it sums

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "feature": self.feature, "text": self.text, "count": self.count, "share": round(self.share, 6),
            "sum": round(self.total, 6), "median": round(self.median, 6),
            "text_count": self.text_count, "wordings": self.wordings,
        }
        if self.feature == WORDS_FEATURE:
            out["buckets"] = self.buckets
        return out


@dataclass(frozen=True)
class VerdictReport:
    verdict: str
    held: int
    explained: int
    unexplained: int  # no stored explanation
    unreadable: int  # a stored explanation that does not parse (counted apart: not "none")
    explains: Mapping[str, int]  # "spam vs ham" -> messages: what the explanations weigh
    models: Mapping[str, int]  # model name -> explained messages
    reasons: tuple[Reason, ...]  # every feature ever among the top pushes, ranked

    def as_json(self, top: int) -> dict[str, Any]:
        return {
            "verdict": self.verdict, "held": self.held, "explained": self.explained,
            "unexplained": self.unexplained, "unreadable": self.unreadable,
            "explains": dict(self.explains), "models": dict(self.models),
            "reasons_total": len(self.reasons), "reasons": [r.as_json() for r in self.reasons[:top]],
        }


@dataclass(frozen=True)
class WhyReport:
    since: datetime
    days: int
    verdict: str | None  # the --verdict filter
    groups: tuple[VerdictReport, ...]  # most held first

    @property
    def held(self) -> int:
        return sum(g.held for g in self.groups)

    @property
    def explained(self) -> int:
        return sum(g.explained for g in self.groups)

    @property
    def unexplained(self) -> int:
        return sum(g.unexplained for g in self.groups)

    @property
    def unreadable(self) -> int:
        return sum(g.unreadable for g in self.groups)

    def as_json(self, top: int) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(), "days": self.days, "verdict": self.verdict,
            "top_pushes": TOP_PUSHES, "held": self.held, "explained": self.explained,
            "unexplained": self.unexplained, "unreadable": self.unreadable,
            "verdicts": [g.as_json(top) for g in self.groups],
        }


@dataclass
class _Tally:
    """The running counts of one verdict; local to one `aggregate` call."""

    held: int = 0
    unexplained: int = 0
    unreadable: int = 0
    explains: Counter[str] = field(default_factory=Counter)
    models: Counter[str] = field(default_factory=Counter)
    contributions: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    texts: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def add(self, stored: object) -> None:
        self.held += 1
        if stored is None:
            self.unexplained += 1
            return
        try:
            if not isinstance(stored, Mapping):
                raise TypeError(type(stored).__name__)
            explanation = Explanation.from_json(stored)
        except (KeyError, TypeError, ValueError):
            self.unreadable += 1
            return
        self.explains[f"{explanation.target} vs {explanation.versus}"] += 1
        self.models[explanation.model] += 1
        top = top_pushes(explanation)
        for c in top:
            self._note(c.feature, c.contribution, c.text)
        words = [c for c in top if c.feature.startswith(_TOKEN_PREFIX)]
        if words:
            self._note(WORDS_FEATURE, sum(c.contribution for c in words), *(c.text for c in words))

    def _note(self, feature: str, contribution: float, *texts: str) -> None:
        self.contributions[feature].append(contribution)
        self.texts[feature].update(texts)

    def report(self, verdict: str) -> VerdictReport:
        explained = self.held - self.unexplained - self.unreadable
        reasons = [self._reason(f, explained) for f in self.contributions]
        reasons.sort(key=lambda r: (-r.count, -r.total, r.feature))
        return VerdictReport(
            verdict=verdict, held=self.held, explained=explained, unexplained=self.unexplained,
            unreadable=self.unreadable, explains=dict(self.explains.most_common()),
            models=dict(self.models.most_common()), reasons=tuple(reasons),
        )

    def _reason(self, feature: str, explained: int) -> Reason:
        values = self.contributions[feature]
        if feature == WORDS_FEATURE:
            text, text_count = WORDS_TEXT, len(values)
            buckets = sum(1 for f in self.contributions if f.startswith(_TOKEN_PREFIX) and f != WORDS_FEATURE)
        else:
            (text, text_count), buckets = self.texts[feature].most_common(1)[0], 0
        return Reason(feature=feature, text=text, count=len(values), share=len(values) / explained,
                      total=sum(values), median=statistics.median(values),
                      text_count=text_count, wordings=len(self.texts[feature]), buckets=buckets)


def paged(fetch: Callable[[int], list[HeldRow]]) -> Iterator[HeldRow]:
    """Every row of `fetch(after_id)` pages (ascending ids) until an empty page."""
    after = 0
    while page := fetch(after):
        yield from page
        after = page[-1][0]


def aggregate(rows: Iterable[HeldRow], since: datetime, days: int, verdict: str | None = None) -> WhyReport:
    """The report over `rows` (Store.held_explanations pages, any order); pure: no I/O."""
    tallies: dict[str, _Tally] = {}
    for _id, row_verdict, stored in rows:
        tallies.setdefault(row_verdict, _Tally()).add(stored)
    groups = [t.report(v) for v, t in tallies.items()]
    groups.sort(key=lambda g: (-g.held, g.verdict))
    return WhyReport(since=since, days=days, verdict=verdict, groups=tuple(groups))


def top_pushes(explanation: Explanation) -> list[Contribution]:
    """The pushes the report counts for one message: its largest towards the verdict."""
    return sorted(explanation.towards, key=lambda c: -c.contribution)[:TOP_PUSHES]


# -- for people -------------------------------------------------------------------------------------


def render(console: Console, report: WhyReport, top: int) -> None:
    """Tables for a terminal. Wordings come from senders (a hashed word bucket names the message's own
    words), so each goes through safe_line and Text: never Rich markup, never a terminal escape."""
    scope = f" (verdict {report.verdict})" if report.verdict else ""
    console.print(Text(
        f"held in quarantine in the last {report.days} day(s){scope}: {report.held} message(s), "
        f"{report.explained} with an explanation; each counts its {TOP_PUSHES} largest pushes towards "
        "its verdict"
    ))
    if not report.groups:
        console.print(Text("nothing was held in this period"))
    for group in report.groups:
        console.print(_table(group, top))
        parts = []
        if group.unexplained:
            parts.append(f"{group.unexplained} held {group.verdict} message(s) without a stored explanation "
                         f"({UNEXPLAINED_WHY})")
        if group.unreadable:
            parts.append(f"{group.unreadable} whose stored explanation could not be read")
        if parts:
            console.print(Text("  not counted above: " + "; ".join(parts)))


def _table(group: VerdictReport, top: int) -> Table:
    weighs = ", ".join(f"{k} ({n})" for k, n in group.explains.items()) or "-"
    table = Table(
        "#", "reason (commonest wording)", "feature", "top-3 in", "share", "sum", "median",
        title=(f"verdict {group.verdict}: {group.held} held, {group.explained} explained; "
               f"log-odds of {weighs}"),
        title_justify="left",
    )
    for rank, r in enumerate(group.reasons[:top], start=1):
        table.add_row(
            str(rank), Text(view.safe_line(_wording(r))), Text(view.safe_line(_feature(r))), str(r.count),
            f"{r.share:.0%}", f"{r.total:+.2f}", f"{r.median:+.2f}",
        )
    hidden = len(group.reasons) - min(top, len(group.reasons))
    models = ", ".join(f"{m} ({n})" for m, n in group.models.items())
    more = f"{hidden} more reason(s) not shown (--top); " if hidden else ""
    table.caption = Text(view.safe_line(more + (f"model {models}" if models else "")))
    return table


def _wording(r: Reason) -> str:
    # "682 characters of HTML" alone would read as the reason of every message the line counts
    if r.feature == WORDS_FEATURE or r.wordings < 2:
        return r.text
    return f"{r.text} ({r.text_count} of {r.count})"


def _feature(r: Reason) -> str:
    if r.feature != WORDS_FEATURE:
        return r.feature
    return f"{WORDS_FEATURE} ({r.buckets} group{'' if r.buckets == 1 else 's'})"
