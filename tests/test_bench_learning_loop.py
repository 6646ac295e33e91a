"""bench/learning_loop.py: the figures of the rest of a source, and the flagged messages it lists."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from milter.config import load_config
from milter.scan import build_scanner
from training.corpora import Message

ROOT = Path(__file__).resolve().parent.parent


def _bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_learning_loop", ROOT / "bench" / "learning_loop.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _message(name: str, order: int) -> Message:
    path = ROOT / "fixtures" / "bec" / name
    return Message("fixtures", "bec", "ham", 0, f"{order:064x}", path, order, None)


def test_the_flagged_messages_are_listed_with_how_and_why(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = _bench(monkeypatch)
    ham, held = _message("ham-meeting.eml", 1), _message("bec-invoice-bank-change.eml", 2)
    figures = bench.figures(build_scanner(load_config(None)), [ham, held])
    assert figures.n == 2 and figures.policy_quarantined == 0.5
    assert len(figures.flagged) == 1
    line = figures.flagged[0]
    assert line.startswith("quarantine bec") and "bec-invoice-bank-change.eml" in line
    assert "bank or payroll details" in line  # the policy's own reason
    bench.show("after", figures, show_flagged=True)
    bench.show("after", figures)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[1].strip() == line and "ham-meeting" not in "".join(out)
