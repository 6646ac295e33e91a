"""bench/languages.py: the language of a message as the bench reports it, and its table."""

from __future__ import annotations

import importlib.util
from email.message import EmailMessage
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_languages", ROOT / "bench" / "languages.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _message(tmp_path: Path, name: str, subject: str, body: str, html: bool = False) -> Path:
    msg = EmailMessage()
    msg["From"] = "News <news@example.org>"
    msg["To"] = "reader@example.com"
    msg["Subject"] = subject
    if html:
        link = "<a href='https://example.org/'>mehr</a>"
        msg.set_content(f"<html><body><p>{body}</p>{link}</body></html>", "html")
    else:
        msg.set_content(body)
    path = tmp_path / name
    path.write_bytes(msg.as_bytes())
    return path


GERMAN = (
    "Liebe Leserinnen und Leser, in diesem Monat berichten wir über die Arbeit unserer Beratungsstelle "
    "und laden Sie herzlich zu unserem Sommerfest im Stadtteilzentrum ein."
)
ENGLISH = (
    "Dear readers, this month we report on the work of our advice centre and warmly invite you to our "
    "summer party at the community centre."
)


def test_the_language_of_plain_and_html_mail_and_too_little_text(tmp_path: Path) -> None:
    bench = _bench()
    assert bench.language(_message(tmp_path, "de.eml", "Januar-Newsletter", GERMAN)) == "de"
    assert bench.language(_message(tmp_path, "de-html.eml", "Newsletter", GERMAN, html=True)) == "de"
    assert bench.language(_message(tmp_path, "en.eml", "January newsletter", ENGLISH)) == "en"
    assert bench.language(_message(tmp_path, "short.eml", "Hi", "See you at 5.")) == "none"
    broken = tmp_path / "broken.eml"
    broken.write_bytes(b"\xff\xfe\x00garbage without headers")
    assert bench.language(broken) in {"none", "en", "de"}  # a guess or none, never an exception


def test_rare_languages_are_pooled_and_the_table_counts_each_class_and_language() -> None:
    bench = _bench()
    langs = ["en"] * 30 + ["de"] * 20 + ["fr"] * 3 + ["none"] * 2
    pooled = bench.pooled(langs)
    assert pooled.count("other") == 3 and pooled.count("de") == 20 and pooled.count("none") == 2
    y = np.array([0] * 25 + [2] * 5 + [0] * 4 + [2] * 16 + [2] * 3 + [0] * 2, dtype=np.int64)
    flagged = np.zeros(len(y), dtype=bool)
    flagged[25:30] = True  # the English phishing
    flagged[30:32] = True  # two of the four German ham
    flagged[34:50] = True  # the German phishing
    held = flagged.copy()
    held[31] = False
    lines = bench.table(y, pooled, flagged, held)
    assert "| ham | de | 4 | 50.0 % | 25.0 % |" in lines
    assert "| ham | en | 25 | 0.0 % | 0.0 % |" in lines
    assert "| bec | de | 16 | 100.0 % | 100.0 % |" in lines
    assert "| bec | other | 3 | 0.0 % | 0.0 % |" in lines
    assert not any("| spam |" in line for line in lines)  # no spam rows, no spam lines
