"""`milter report --as LABEL FILE...`: user reports become labels on stored verdicts or new examples.

The store is real (SQLite and PostgreSQL, see store_support); unmatched messages are scanned with a
copy of the shipped model named by a config file, so --config is exercised too.
"""

from __future__ import annotations

import json
import shutil
from email.message import EmailMessage
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from store_support import make_result

from milter.commands.report import forwarded_inner, report
from milter.config import DEFAULT_MODEL
from milter.features import SCHEMA
from milter.store import Store, training_arrays
from milter.types import Action, Envelope, Verdict

ENV = Envelope(mail_from="alice@example.com", rcpt_tos=("bob@example.org",))
CAROL = "carol@partner.example"  # the From of `eml`'s messages: a report matches Message-ID and From


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("model")
    shutil.copyfile(DEFAULT_MODEL, where / "current.onnx")
    shutil.copyfile(DEFAULT_MODEL.with_suffix(".json"), where / "current.json")
    shutil.copyfile(DEFAULT_MODEL.with_suffix(".lgb.txt"), where / "current.lgb.txt")
    return where / "current.onnx"


def config_for(tmp_path: Path, url: str, model: Path) -> Path:
    cfg = tmp_path / "milter.toml"
    cfg.write_text(f'[model]\npath = "{model}"\n\n[store]\nurl = "{url}"\n')
    return cfg


def eml(path: Path, message_id: str | None, subject: str = "Quarterly numbers") -> Path:
    msg = EmailMessage()
    msg["From"] = "Carol <carol@partner.example>"
    msg["To"] = "bob@example.org"
    msg["Subject"] = subject
    if message_id is not None:
        msg["Message-ID"] = message_id
    msg.set_content("Hi Bob,\n\nthe numbers for the quarter are attached as discussed.\n\nCarol\n")
    path.write_bytes(msg.as_bytes())
    return path


def forward_as_attachment(path: Path, original: Path) -> Path:
    fwd = EmailMessage()
    fwd["From"] = "bob@example.org"
    fwd["To"] = "abuse@example.org"
    fwd["Subject"] = "Fwd: not spam"
    fwd["Message-ID"] = "<forward-1@example.org>"
    fwd.set_content("This was quarantined but it is fine.\n")
    fwd.add_attachment(_as_message(original), filename="original.eml")  # a message/rfc822 part
    path.write_bytes(fwd.as_bytes())
    return path


def _as_message(original: Path) -> EmailMessage:
    from email import policy
    from email.parser import BytesParser

    parsed = BytesParser(policy=policy.default).parsebytes(original.read_bytes())
    assert isinstance(parsed, EmailMessage)
    return parsed


def lines(result: Result) -> list[dict[str, object]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_matched_by_message_id_sets_label(tmp_path: Path, url: str) -> None:
    with Store.open(url) as s:
        pk = s.record(make_result(Verdict.SPAM, Action.QUARANTINE, message_id="<q1@partner.example>",
                                  from_addr=CAROL), ENV, b"raw", "d")
        other = s.record(make_result(message_id="<other@x>"), ENV, b"raw", "d")
    path = eml(tmp_path / "reported.eml", "<q1@partner.example>")
    res = CliRunner().invoke(report, ["--as", "ham", "--db", url, str(path)])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"matched {path}: <q1@partner.example> labelled ham (1 stored verdict(s))")
    with Store.open(url) as s:
        row = s.get(pk)
        assert row is not None and (row.label, row.label_source) == ("ham", "user-report")
        untouched = s.get(other)
        assert untouched is not None and untouched.label is None
        assert s.stats().messages == 2  # labelled in place, nothing new stored


def test_unmatched_is_scanned_and_stored_as_labelled_example(tmp_path: Path, url: str,
                                                             model_copy: Path) -> None:
    cfg = config_for(tmp_path, url, model_copy)
    Store.open(url).close()  # the gateway's store: `report` labels in an existing one only
    path = eml(tmp_path / "missed.eml", "<never-seen@partner.example>", subject="Gift cards, urgent")
    res = CliRunner().invoke(report, ["--as", "bec", "--config", str(cfg), "--json", str(path)])
    assert res.exit_code == 0, res.output
    [out] = lines(res)
    assert (out["result"], out["label"]) == ("stored", "bec")
    assert out["message_id"] == "<never-seen@partner.example>"
    with Store.open(url) as s:
        row = s.get(int(str(out["id"])))
        assert row is not None
        assert (row.label, row.label_source, row.subject) == ("bec", "user-report", "Gift cards, urgent")
        assert row.model == json.loads(model_copy.with_suffix(".json").read_text())["name"]
        assert not row.quarantined
        examples = s.labelled_examples(SCHEMA.digest)
    assert [e.message_id for e in examples] == ["<never-seen@partner.example>"]
    x, y = training_arrays(examples)
    assert x.shape == (1, len(SCHEMA)) and y.tolist() == [2] and np.isfinite(x).all()
    # Reporting the same file again finds the example just stored instead of adding a second one.
    again = CliRunner().invoke(report, ["--as", "bec", "--config", str(cfg), "--json", str(path)])
    assert [o["result"] for o in lines(again)] == ["matched"]
    with Store.open(url) as s:
        assert s.stats().messages == 1


def test_forward_as_attachment_reports_the_inner_message(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    with Store.open(url) as s:
        pk = s.record(make_result(message_id="<orig-7@partner.example>", from_addr=CAROL), ENV, b"raw", "d")
    original = eml(tmp_path / "orig.eml", "<orig-7@partner.example>")
    fwd = forward_as_attachment(tmp_path / "fwd.eml", original)
    inner = forwarded_inner(fwd.read_bytes())
    assert inner is not None and b"orig-7@partner.example" in inner
    res = CliRunner().invoke(report, ["--as", "ham", "--db", url, "--json", str(fwd)])
    assert [(o["result"], o["message_id"]) for o in lines(res)] == [("matched", "<orig-7@partner.example>")]
    with Store.open(url) as s:
        row = s.get(pk)
        assert row is not None and row.label == "ham"


def test_failed_file_exits_1_and_others_still_count(tmp_path: Path, model_copy: Path) -> None:
    url = f"sqlite:///{tmp_path / 'e.db'}"
    with Store.open(url) as s:
        pk = s.record(make_result(message_id="<ok@x>", from_addr=CAROL), ENV, b"raw", "d")
    good = eml(tmp_path / "good.eml", "<ok@x>")
    empty = tmp_path / "empty.eml"
    empty.write_bytes(b"")
    res = CliRunner().invoke(report, ["--as", "spam", "--db", url, "--json",
                                      str(tmp_path / "missing.eml"), str(empty), str(good)])
    assert res.exit_code == 1
    assert [o["result"] for o in lines(res)] == ["error", "error", "matched"]
    assert "cannot read" in str(lines(res)[0]["error"]) and lines(res)[1]["error"] == "empty file"
    with Store.open(url) as s:
        row = s.get(pk)
        assert row is not None and row.label == "spam"


def test_label_must_be_a_class(tmp_path: Path) -> None:
    path = eml(tmp_path / "m.eml", "<m@x>")
    with Store.open(f"sqlite:///{tmp_path / 'x.db'}"):
        pass
    res = CliRunner().invoke(report, ["--as", "phish", "--db", f"sqlite:///{tmp_path / 'x.db'}", str(path)])
    assert res.exit_code == 2 and "phish" in res.output


def test_reported_as_bulk_is_labelled_bulk_and_trains_as_ham(tmp_path: Path, url: str) -> None:
    with Store.open(url) as s:
        pk = s.record(make_result(Verdict.SPAM, Action.TAG, message_id="<issue-7@partner.example>",
                                  from_addr=CAROL), ENV, None, SCHEMA.digest)
    path = eml(tmp_path / "newsletter.eml", "<issue-7@partner.example>", subject="This week at Partner")
    res = CliRunner().invoke(report, ["--as", "bulk", "--db", url, "--json", str(path)])
    assert res.exit_code == 0, res.output
    assert [(o["result"], o["label"], o["rows"]) for o in lines(res)] == [("matched", "bulk", 1)]
    with Store.open(url) as s:
        row = s.get(pk)
        assert row is not None and (row.label, row.label_source) == ("bulk", "user-report")
        _, y = training_arrays(s.labelled_examples())
    assert y.tolist() == [0]  # CLASS_NAMES[0]: ham


def test_a_forward_whose_inner_message_is_unknown_never_labels_the_forward(tmp_path: Path, url: str,
                                                                          model_copy: Path) -> None:
    """Before, the outer Message-ID was tried next: the user's own forward (the gateway stores internal
    mail too) was labelled spam, and the message they reported was not stored at all."""
    with Store.open(url) as s:
        fwd_row = s.record(make_result(message_id="<forward-1@example.org>", from_addr="bob@example.org"),
                           ENV, None, "d")
    original = eml(tmp_path / "orig.eml", "<never-seen@partner.example>", subject="You won")
    fwd = forward_as_attachment(tmp_path / "fwd.eml", original)
    res = CliRunner().invoke(report, ["--as", "spam", "--config", str(config_for(tmp_path, url, model_copy)),
                                      "--json", str(fwd)])
    assert res.exit_code == 0, res.output
    [out] = lines(res)
    assert (out["result"], out["message_id"]) == ("stored", "<never-seen@partner.example>")
    with Store.open(url) as s:
        forward = s.get(fwd_row)
        assert forward is not None and forward.label is None
        stored = s.get(int(str(out["id"])))
        assert stored is not None and (stored.label, stored.subject, stored.from_addr) == (
            "spam", "You won", CAROL)


def test_a_copied_message_id_labels_only_the_reported_sender(tmp_path: Path, url: str) -> None:
    """A phish carrying a real message's Message-ID: reporting it labelled the bank's real statement
    spam too, over the admin's ham label. Now only rows with the same From are labelled, and an admin's
    label is kept and said so."""
    mid = "<20261201.abc123@mail.bank.example>"
    with Store.open(url) as s:
        real = s.record(make_result(message_id=mid, from_addr="news@bank.example"), ENV, None, "d")
        s.set_label(real, "ham", "cli")
        unlabelled_real = s.record(make_result(message_id=mid, from_addr="news@bank.example"), ENV, None, "d")
        mine = s.record(make_result(message_id=mid, from_addr=CAROL), ENV, None, "d")
        admin_mine = s.record(make_result(message_id=mid, from_addr=CAROL), ENV, None, "d")
        s.set_label(admin_mine, "ham", "release")
    path = eml(tmp_path / "phish.eml", mid)  # From: carol@partner.example
    res = CliRunner().invoke(report, ["--as", "spam", "--db", url, str(path)])
    assert res.exit_code == 0, res.output
    assert res.stdout == (f"matched {path}: {mid} labelled spam (1 stored verdict(s)); 1 kept the label an "
                          "admin gave (ham by release)\n")
    as_json = CliRunner().invoke(report, ["--as", "spam", "--db", url, "--json", str(path)])
    [out] = lines(as_json)
    assert (out["rows"], out["kept"], out["kept_labels"]) == (1, 1, [{"label": "ham", "source": "release"}])
    with Store.open(url) as s:
        rows = [s.get(pk) for pk in (real, unlabelled_real, mine, admin_mine)]
    labels = [(r.label, r.label_source) for r in rows if r is not None]
    assert labels == [("ham", "cli"), (None, None), ("spam", "user-report"), ("ham", "release")]


def test_report_refuses_a_missing_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --config in another folder, the label went into a new store under ./var, exit 0."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MILTER_STORE_URL", raising=False)
    path = eml(tmp_path / "m.eml", "<m@x>")
    res = CliRunner().invoke(report, ["--as", "ham", str(path)])
    assert res.exit_code == 1
    assert f"no store at {tmp_path / 'var' / 'milter.db'}: the file does not exist" in res.stderr
    assert not (tmp_path / "var").exists()
