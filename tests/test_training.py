"""The offline training pipeline: corpora handling, time split, thresholds, ONNX parity, end to end."""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnxmltools import convert_lightgbm
from onnxmltools.convert.common.data_types import FloatTensorType

from milter.config import load_config
from milter.scan import build_scanner
from milter.types import CLASS_NAMES
from training import model as mdl
from training.corpora import (
    CorporaError,
    Message,
    attach_dates,
    available_corpora,
    dedupe,
    ensure_unpacked,
    load_corpora,
    load_manifest,
    parse_date,
    subcollection,
)
from training.dataset import TEST, TRAIN, VAL, subsample, time_split
from training.tensor_graph import OPS
from training.thresholds import (
    DISABLED,
    choose_thresholds,
    decide,
    rule_threshold,
    threshold_for_fpr,
    worst_corpus_threshold,
)
from training.train import parse_args as train_parse_args

REPO = Path(__file__).resolve().parents[1]
SHARE = REPO.parent / "shared" / "corpora"
CORPORA = REPO / ".cache" / "corpora"


def _msg(corpus: str, label: str, order: int, date: datetime | None, sha: str | None = None) -> Message:
    klass = {"ham": 0, "spam": 1, "phish": 2}[label]
    sha = sha or hashlib.sha256(f"{corpus}/{label}/{order}".encode()).hexdigest()
    return Message(corpus, corpus, label, klass, sha, Path(f"/nonexistent/{order}.eml"), order, date)


@pytest.fixture(scope="module")
def corpora_dir() -> Path:
    """The real corpora, unpacked from ../shared/corpora by its own script when not there yet."""
    if not all((CORPORA / c / ".stamp").is_file() for c in ("modern-bulk-ham", "phishing-pot")):
        if not (SHARE / "unpack").is_file():
            pytest.fail(f"corpora not unpacked in {CORPORA} and no {SHARE}/unpack to unpack them")
        subprocess.run([str(SHARE / "unpack"), str(CORPORA)], check=True)
    return CORPORA


# --- corpora -------------------------------------------------------------------------------------


def test_parse_date_is_robust_to_garbage_and_absurd_values() -> None:
    ok = parse_date(b"From: a@b\nDate: Tue, 03 Sep 2002 10:00:00 +0200\nSubject: x")
    assert ok == datetime(2002, 9, 3, 8, 0, tzinfo=UTC)
    folded = parse_date(b"Date: Tue, 03 Sep 2002\r\n 10:00:00 -0000\r\nSubject: x")
    assert folded == datetime(2002, 9, 3, 10, 0, tzinfo=UTC)
    assert parse_date(b"Subject: no date") is None
    assert parse_date(b"Date: yesterday-ish\n") is None
    assert parse_date(b"Date: Mon, 01 Jan 2103 00:00:00 +0000\n") is None  # absurd future
    assert parse_date(b"Date: Mon, 01 Jan 1970 00:00:00 +0000\n") is None  # epoch zero


def test_subcollection_names_the_part_of_each_corpus() -> None:
    assert subcollection("enron-spam-raw", "ham", "x/y", "training_data/ham/beck-s/2001_plan/1") == "beck-s"
    assert subcollection("enron-spam-raw", "spam", "x/y", "training_data/spam/GP/part1/3") == "GP"
    sa = subcollection("spamassassin-public", "ham", "k/s", "training_data/ham/hard_ham/0001.abc")
    assert sa == "training/hard_ham"
    assert subcollection("spamassassin-public", "spam", "k/s", "testing_data/spam/0001.abc") == "testing/spam"
    lfdr = subcollection(
        "lfdr-mailing-lists", "ham", "linux-mailinglist-archives/usrp-users.lists.ettus.com.0", "a:m"
    )
    assert lfdr == "usrp-users"
    assert (
        subcollection("modern-bulk-ham", "ham", "moralmunky/Home-Assistant@abc", "t.eml") == "Home-Assistant"
    )


def test_dedupe_keeps_first_and_drops_label_conflicts() -> None:
    a = _msg("a-corpus", "ham", 0, None, sha="1" * 64)
    a_again = _msg("b-corpus", "ham", 5, None, sha="1" * 64)
    c = _msg("a-corpus", "spam", 1, None, sha="2" * 64)
    c_as_ham = _msg("b-corpus", "ham", 6, None, sha="2" * 64)  # same bytes, other label: unusable
    d = _msg("b-corpus", "spam", 7, None, sha="3" * 64)
    kept, dropped = dedupe([a, c, a_again, c_as_ham, d])
    assert kept == [a, d]
    assert dropped == 3


def test_load_corpora_dedupes_and_excludes(corpora_dir: Path) -> None:
    # The share grows (new corpora arrive): expect what it offers now, less the two left out.
    excluded = {"enron-spam-raw", "lfdr-mailing-lists"}
    offered = set(available_corpora(corpora_dir, SHARE))
    assert {"spamassassin-public", "modern-bulk-ham", "phishing-pot"} <= offered
    msgs, dropped = load_corpora(corpora_dir, SHARE, exclude=sorted(excluded))
    assert {m.corpus for m in msgs} == offered - excluded
    assert len({m.sha256 for m in msgs}) == len(msgs)
    assert all(m.path.is_file() for m in msgs[:: max(1, len(msgs) // 50)])
    assert {m.klass for m in msgs if m.label == "phish"} == {CLASS_NAMES.index("bec")}
    no_pot, _ = load_corpora(
        corpora_dir, SHARE, exclude=["phishing-pot"], include=["phishing-pot", "modern-bulk-ham"]
    )
    assert {m.corpus for m in no_pot} == {"modern-bulk-ham"}
    assert dropped >= 0


def test_unpacks_from_the_share_when_missing(tmp_path: Path) -> None:
    ensure_unpacked(tmp_path, SHARE, ["modern-bulk-ham"])  # the smallest archive
    msgs = load_manifest(tmp_path / "modern-bulk-ham")
    assert len(msgs) >= 200 and all(m.path.is_file() for m in msgs)
    with pytest.raises(CorporaError):
        ensure_unpacked(tmp_path / "elsewhere", tmp_path / "no-share", ["modern-bulk-ham"])


# --- split ---------------------------------------------------------------------------------------


def _messages_for_split() -> list[Message]:
    base = datetime(2020, 1, 1, tzinfo=UTC)
    rng = np.random.default_rng(7)
    msgs = []
    for g, (corpus, label) in enumerate([("c1", "ham"), ("c1", "spam"), ("c2", "phish")]):
        days = rng.permutation(50)  # manifest order unrelated to date
        for order, day in enumerate(days):
            msgs.append(_msg(corpus, label, order + 100 * g, base + timedelta(days=int(day) + 400 * g)))
        for order in range(10):  # undated ones go by manifest order
            msgs.append(_msg(corpus, label, 1000 + order + 100 * g, None))
    return msgs


def test_time_split_puts_newest_in_test_per_group() -> None:
    msgs = _messages_for_split()
    split = time_split(msgs)
    for group in {m.group for m in msgs}:
        dated = [(m.date, s) for m, s in zip(msgs, split, strict=True) if m.group == group and m.date]
        by_split = {k: [d for d, s in dated if s == k] for k in (TRAIN, VAL, TEST)}
        assert [len(by_split[k]) for k in (TRAIN, VAL, TEST)] == [35, 5, 10]
        assert max(by_split[TRAIN]) < min(by_split[VAL])
        assert max(by_split[VAL]) < min(by_split[TEST])
        undated = [(m.order, s) for m, s in zip(msgs, split, strict=True) if m.group == group and not m.date]
        assert [s for _, s in sorted(undated)] == [TRAIN] * 7 + [VAL] + [TEST] * 2


def test_split_and_subsample_are_deterministic() -> None:
    msgs = _messages_for_split()
    assert np.array_equal(time_split(msgs), time_split(list(reversed(msgs)))[::-1])
    assert subsample(msgs, 20, seed=3) == subsample(msgs, 20, seed=3)
    assert subsample(msgs, 20, seed=3) != subsample(msgs, 20, seed=4)
    assert all(n == 20 for n in _group_sizes(subsample(msgs, 20, seed=3)).values())


def _group_sizes(msgs: list[Message]) -> dict[tuple[str, str], int]:
    sizes: dict[tuple[str, str], int] = {}
    for m in msgs:
        sizes[m.group] = sizes.get(m.group, 0) + 1
    return sizes


# --- thresholds ----------------------------------------------------------------------------------


def test_threshold_meets_target_fpr_and_is_tight() -> None:
    scores = np.linspace(0.0, 0.999, 2000)
    t = threshold_for_fpr(scores, 0.001)  # may flag floor(2) = 2 ham
    assert np.mean(scores >= t) <= 0.001
    assert np.sum(scores >= t) == 2
    t0 = threshold_for_fpr(scores, 0.0)
    assert t0 > scores.max()
    assert threshold_for_fpr(np.array([0.2, 1.0]), 0.001) > 1.0  # top ham at 1.0: flag nothing


def test_worst_corpus_threshold_protects_small_corpus() -> None:
    big = np.zeros(10_000)
    small = np.array([0.0, 0.0, 0.9])  # one modern newsletter scoring high
    scores = np.concatenate([big, small])
    corpora = ["big"] * len(big) + ["small"] * len(small)
    is_ham = np.ones(len(scores), dtype=bool)
    t = worst_corpus_threshold(scores, is_ham, corpora, 0.001)
    assert t > 0.9  # pooled FPR would have allowed flagging it (1 of 10,003 < 0.1%)


def test_rule_pools_old_ham_guards_each_corpus_and_keeps_modern_ham_apart() -> None:
    """Old ham pooled at the target; a corpus never past its guard; the modern group at its own target."""
    big = np.zeros(9_000)
    mid = np.concatenate([np.zeros(997), [0.8, 0.81, 0.82]])  # three high ham in a 1,000-ham corpus
    scores = np.concatenate([big, mid])
    corpora = ["big"] * len(big) + ["mid"] * len(mid)
    is_ham = np.ones(len(scores), dtype=bool)
    # per corpus at 0.1 % the three would set the cut; pooled, 10 of 10,000 may be flagged
    assert worst_corpus_threshold(scores, is_ham, corpora, 0.001) > 0.81
    assert rule_threshold(scores, is_ham, corpora, 0.001, 0.005, 0.005) <= 0.8
    # a guard of 0.2 % allows 2 of the corpus's 1,000: the third stays unflagged
    assert 0.8 < rule_threshold(scores, is_ham, corpora, 0.001, 0.002, 0.005) <= 0.81
    # modern ham is its own group: one of 40 newsletters at 0.95 sets the cut at a 0.5 % target
    with_modern = np.concatenate([scores, np.zeros(39), [0.95]])
    names = corpora + ["modern-bulk-ham"] * 40
    is_ham = np.ones(len(with_modern), dtype=bool)
    assert rule_threshold(with_modern, is_ham, names, 0.001, 0.005, 0.005) > 0.95
    assert rule_threshold(with_modern, is_ham, names, 0.001, 0.005, 0.03) <= 0.8  # 1 of 40 allowed


def test_the_modern_group_s_targets_are_the_training_options() -> None:
    """milter-train --modern-tag-fpr / --modern-quarantine-fpr reach the cuts the modern ham sets."""
    # 100 modern ham (float32 as scored, compared in float64 as the rule compares); old ham at zero
    modern = np.linspace(0.50, 0.99, 100, dtype=np.float32).astype(np.float64)
    spam = np.concatenate([np.zeros(2_000), modern])
    probs = np.zeros((len(spam), 3), dtype=np.float32)
    probs[:, 1] = spam
    probs[:, 0] = 1.0 - spam
    y = np.zeros(len(spam), dtype=np.int64)
    names = ["enron-spam-raw"] * 2_000 + ["foff-milter-mailbox"] * 100
    shipped = choose_thresholds(probs, y, names, 0.001, 0.004)
    assert modern[-3] < shipped.spam_tag <= modern[-2]  # 2 % of 100: the two highest are tagged
    assert modern[-1] < shipped.spam_quarantine  # 0.5 % of 100: none is held
    stricter = choose_thresholds(probs, y, names, 0.001, 0.004, modern_tag_fpr=0.01)
    assert modern[-2] < stricter.spam_tag <= modern[-1]
    looser = choose_thresholds(probs, y, names, 0.001, 0.004, modern_quarantine_fpr=0.03)
    assert modern[-4] < looser.spam_quarantine <= modern[-3]
    args = train_parse_args(["--modern-tag-fpr", "0.01", "--modern-quarantine-fpr", "0.002"])
    assert (args.modern_tag_fpr, args.modern_quarantine_fpr) == (0.01, 0.002)


def test_class_without_training_examples_gets_disabled_thresholds() -> None:
    rng = np.random.default_rng(1)
    probs = np.zeros((200, 3), dtype=np.float32)
    probs[:, 1] = rng.random(200)
    probs[:, 2] = rng.random(200) * 1e-15  # what LightGBM gives a class it never saw
    probs[:, 0] = 1.0 - probs[:, 1] - probs[:, 2]
    y = np.array([0] * 100 + [1] * 100, dtype=np.int64)
    t = choose_thresholds(probs, y, ["c"] * 200, 0.001, 0.01, trained_classes=frozenset({0, 1}))
    assert t.bec_tag == t.bec_quarantine == DISABLED
    assert not (decide(probs, t.spam_quarantine, t.bec_quarantine) == 2).any()
    fitted = choose_thresholds(probs, y, ["c"] * 200, 0.001, 0.01)
    assert fitted.bec_quarantine < 1e-14  # the failure this guards against


def test_decide_prefers_bec_when_its_threshold_passes() -> None:
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.1, 0.3, 0.6], [0.5, 0.1, 0.4]], dtype=np.float32)
    assert decide(probs, spam_cut=0.55, bec_cut=0.35).tolist() == [0, 1, 2, 2]
    assert decide(probs, spam_cut=0.55, bec_cut=0.99).tolist() == [0, 1, 2, 0]


# --- export parity -------------------------------------------------------------------------------


def _tiny_booster() -> tuple[mdl.Fitted, npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 6)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 1).astype(np.int64)
    w = np.ones(len(y))
    cfg = mdl.FitConfig(max_rounds=30, early_stopping=10)
    booster = mdl.fit(X, y, w, X, y, w, [f"f{i}" for i in range(6)], cfg)
    return booster, X, y


def test_export_parity_holds_and_catches_a_tampered_model() -> None:
    booster, X, _ = _tiny_booster()
    proto = mdl.to_onnx(booster, X.shape[1])
    good = mdl.onnx_probabilities(proto.SerializeToString(), X)
    assert good.shape == (len(X), 3)
    assert mdl.check_parity(mdl.predict(booster, X), good) < mdl.PARITY_TOL

    tree = next(n for n in proto.graph.node if n.op_type == "TreeEnsembleClassifier")
    weights = next(a for a in tree.attribute if a.name == "class_weights")
    weights.floats[0] += 0.5  # one leaf value off: a converter bug in miniature
    bad = mdl.onnx_probabilities(proto.SerializeToString(), X)
    with pytest.raises(mdl.ExportMismatchError, match="differs"):
        mdl.check_parity(mdl.predict(booster, X), bad)
    with pytest.raises(mdl.ExportMismatchError, match="shape"):
        mdl.check_parity(mdl.predict(booster, X)[:5], good)


def test_export_is_exact_when_a_split_threshold_rounds_up_onto_a_feature_value() -> None:
    """Values one float32 step apart: LightGBM's double midpoint thresholds round (to nearest) onto them."""
    levels = [np.float32(1.0)]
    for _ in range(11):
        levels.append(np.nextafter(levels[-1], np.float32(2.0)))
    rng = np.random.default_rng(0)
    k = rng.integers(0, len(levels), 3000)
    X = np.stack([np.array(levels)[k], rng.normal(size=3000)], axis=1).astype(np.float32)
    y = (k % 3).astype(np.int64)
    booster = lgb.train({**mdl.lgb_params(mdl.FitConfig()), "min_data_in_leaf": 5}, lgb.Dataset(X, y), 20)
    fitted = mdl.Fitted(booster, None)
    naive = convert_lightgbm(
        booster,
        initial_types=[("input", FloatTensorType([None, 2]))],
        zipmap=False,
        target_opset=mdl.TARGET_OPSET,
    )
    with pytest.raises(mdl.ExportMismatchError):  # the converter alone gets rows wrong
        mdl.check_parity(mdl.predict(fitted, X), mdl.onnx_probabilities(naive.SerializeToString(), X))
    fixed = mdl.to_onnx(fitted, 2)
    assert (
        mdl.check_parity(mdl.predict(fitted, X), mdl.onnx_probabilities(fixed.SerializeToString(), X)) < 1e-5
    )


def test_sample_weights_balance_classes_and_lift_small_corpora() -> None:
    y = np.array([0] * 100 + [0] * 4 + [1] * 10)
    corpora = ["big"] * 100 + ["small"] * 4 + ["big"] * 10
    w = mdl.sample_weights(y, corpora, 0.5)
    assert w[y == 0].sum() == pytest.approx(w[y == 1].sum())
    assert w[100] > w[0]  # a small-corpus ham counts more than a big-corpus ham
    assert w[100:104].sum() < w[:100].sum()  # but the small corpus as a whole still counts less


def test_sender_balance_gives_a_prolific_sender_sqrt_weight_within_its_corpus() -> None:
    # ham: one feed of 100 items and 4 one-message senders, in one corpus; spam: 10 senders elsewhere
    y = np.array([0] * 104 + [1] * 10)
    corpora = ["lists"] * 104 + ["spam"] * 10
    senders = ["feed"] * 100 + ["a", "b", "c", "d"] + [f"s{i}" for i in range(10)]
    plain = mdl.sample_weights(y, corpora, 0.5)
    balanced = mdl.sample_weights(y, corpora, 0.5, senders=senders, sender_balance=0.5)
    # the feed weighs as sqrt(100) = 10 messages against each single sender's one
    assert balanced[:100].sum() / balanced[100] == pytest.approx(10.0)
    assert plain[:100].sum() / plain[100] == pytest.approx(100.0)
    # the corpus keeps its weight, so the classes stay balanced; one-message senders are untouched
    assert balanced[:104].sum() == pytest.approx(plain[:104].sum())
    np.testing.assert_allclose(balanced[104:], plain[104:])
    # 1 is per message, as without senders
    np.testing.assert_allclose(mdl.sample_weights(y, corpora, 0.5, senders=senders), plain)
    with pytest.raises(ValueError, match="sender keys"):
        mdl.sample_weights(y, corpora, 0.5, senders=senders[:5], sender_balance=0.5)


def test_modern_spam_weight_lifts_modern_spam_within_the_spam_class_only() -> None:
    y = np.array([0] * 50 + [1] * 100 + [1] * 10)
    corpora = ["enron-spam-raw"] * 150 + ["cw-l-spam"] * 10
    plain = mdl.sample_weights(y, corpora, 0.5)
    lifted = mdl.sample_weights(y, corpora, 0.5, modern_spam_weight=4.0)
    modern, old_spam, ham = slice(150, 160), slice(50, 150), slice(0, 50)
    # within spam, the modern corpus's weight against the old one's grows fourfold

    def share(w: np.ndarray) -> float:
        return float(w[modern].sum() / w[old_spam].sum())

    assert share(lifted) == pytest.approx(4 * share(plain))
    # the classes stay balanced, and ham is untouched
    assert lifted[y == 0].sum() == pytest.approx(lifted[y == 1].sum())
    np.testing.assert_allclose(lifted[ham], plain[ham])


# --- end to end ----------------------------------------------------------------------------------


def test_tiny_end_to_end_training(corpora_dir: Path, tmp_path: Path) -> None:
    from milter.features import SCHEMA, extract
    from training.train import main

    def train(out: str) -> Path:
        args = [
            "--max-per-group",
            "40",
            "--out",
            str(tmp_path / out),
            "--report",
            str(tmp_path / "reports"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--corpora-dir",
            str(corpora_dir),
            "--corpora-src",
            str(SHARE),
            "--no-progress",
            "--max-rounds",
            "60",
            "--seed",
            "5",
        ]
        assert main(args) == 0
        return tmp_path / out

    out = train("models")
    meta = json.loads((out / "current.json").read_text())
    assert meta["schema"] == {
        "version": SCHEMA.version,
        "digest": SCHEMA.digest,
        "feature_names": list(SCHEMA.names),
    }
    assert meta["class_names"] == list(CLASS_NAMES)
    for kind in ("spam", "bec"):
        assert set(meta["thresholds"][kind]) == {"tag", "quarantine"}
        assert 0.0 <= meta["thresholds"][kind]["tag"] <= meta["thresholds"][kind]["quarantine"]
    assert meta["seed"] == 5 and "CC BY-NC 4.0" in meta["licence"]
    # the recipe beside the seed: a model can be refitted from its metadata
    assert meta["recipe"]["modern_spam_weight"] == mdl.FitConfig.modern_spam_weight
    assert meta["recipe"]["text_grams"] == mdl.FitConfig.text_grams and meta["recipe"]["max_rounds"] == 60
    assert "--exclude-corpus phishing-pot" in meta["licence"]
    assert meta["export"]["max_abs_diff"] <= 1e-5
    assert len(meta["training_data"]["manifest_digest"]) == 64
    assert meta["name"].startswith("mailsift-")
    assert (tmp_path / "reports" / meta["name"] / "report.md").is_file()
    assert json.loads((tmp_path / "reports" / meta["name"] / "metrics.json").read_text())["quarantine"]

    onnx_bytes = (out / "current.onnx").read_bytes()
    onnx.checker.check_model(onnx.load_from_string(onnx_bytes))
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    raw = next((corpora_dir / "phishing-pot" / "phish").glob("*.eml")).read_bytes()
    vector = extract(raw).vector[None, :]
    (probs,) = session.run(["probabilities"], {"input": vector})
    assert probs.shape == (1, 3) and abs(float(probs.sum()) - 1.0) < 1e-5

    # the explainer ships beside the graph, named and digested in the metadata, and its trees are the
    # graph's: a scanner built on the trained model loads it (checked against the graph) and explains
    text = (out / "current.lgb.txt").read_bytes()
    assert meta["explainer"]["sha256"] == hashlib.sha256(text).hexdigest()
    assert meta["explainer"]["format"] == "lightgbm-model-text"
    examples = meta["explainer"]["token_examples"]
    assert examples and all(k in SCHEMA.names and 1 <= len(v) <= 3 for k, v in examples.items())
    scanner = build_scanner(load_config(None), out / "current.onnx", explain_all=True)
    assert scanner.explainer is not None
    (result,) = scanner.scan_batch([raw])
    assert result.explanation is not None and result.explanation.model == meta["name"]

    # the tensor graph ships beside it (docs/gpu.md): named with its digest, operators and parity on every
    # validation and test row; it scores as the TreeEnsemble graph does
    tensor = (out / "current.tensor.onnx").read_bytes()
    entry = meta["tensor_graph"]
    assert entry["file"] == "current.tensor.onnx" and entry["sha256"] == hashlib.sha256(tensor).hexdigest()
    assert entry["max_abs_diff"] <= entry["tolerance"] == 1e-5
    split_rows = meta["training_data"]["rows"]
    assert entry["rows"] == split_rows["validation"] + split_rows["test"]
    assert set(entry["ops"]) <= OPS and "TreeEnsembleClassifier" not in entry["ops"]
    gpu_graph = ort.InferenceSession(tensor, providers=["CPUExecutionProvider"])
    (tensor_probs,) = gpu_graph.run(["probabilities"], {"input": vector})
    assert float(np.max(np.abs(tensor_probs - probs))) <= 1e-5

    again = train("models-again")  # features now cached: quick, and must give the same bytes
    assert (again / "current.onnx").read_bytes() == onnx_bytes
    assert (again / "current.lgb.txt").read_bytes() == text
    assert (again / "current.tensor.onnx").read_bytes() == tensor


def test_split_by_subcollection_trains_on_every_part() -> None:
    old = datetime(2019, 1, 1, tzinfo=UTC)
    new = datetime(2024, 1, 1, tzinfo=UTC)
    msgs = [
        replace(
            _msg("bulk", "ham", i, (old if i < 40 else new) + timedelta(days=i)), subcollection=f"s{i // 40}"
        )
        for i in range(50)
    ]
    by_corpus = time_split(msgs)
    assert {m.subcollection for m, s in zip(msgs, by_corpus, strict=True) if s == TRAIN} == {"s0"}
    by_sub = time_split(msgs, by_subcollection=True)
    assert {m.subcollection for m, s in zip(msgs, by_sub, strict=True) if s == TRAIN} == {"s0", "s1"}
    assert {m.subcollection for m, s in zip(msgs, by_sub, strict=True) if s == TEST} == {"s0", "s1"}


def test_infinite_split_thresholds_stay_infinite_in_the_export() -> None:
    """`dump_model()` writes LightGBM's +inf thresholds as 1e300; exported as the largest finite float32,
    an input of +inf would go the other way than in LightGBM. The shipped booster has such splits."""
    booster = lgb.Booster(model_file=str(REPO / "models" / "current.lgb.txt"))
    floors = mdl._exact_split_thresholds(booster)
    assert any(np.isposinf(v) for v in floors.values())
    assert not any(v == float(np.finfo(np.float32).max) for v in floors.values())
    assert mdl.lightgbm_threshold(1e300) == np.inf and mdl.lightgbm_threshold(-1e300) == -np.inf
    assert mdl.lightgbm_threshold(2.5) == 2.5


def _dated(tmp: Path, n: int, tag: str) -> list[Message]:
    out = []
    for i in range(n):
        path = tmp / f"{tag}{i}.eml"
        path.write_bytes(f"From: a{i}@{tag}.test\nDate: Mon, 7 Dec 2026 10:00:00 +0000\n\nx\n".encode())
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        out.append(Message("c", "c", "ham", 0, sha, path, i, None))
    return out


def _slow_attach(msgs: list[Message], cache: Path, pause: float, start: float) -> None:
    """In a child: attach_dates with its cache write slowed (a 65,000-row cache on a busy disk)."""
    import time

    real = np.savez

    def slow(*args: object, **kwargs: object) -> None:
        real(*args, **kwargs)  # type: ignore[arg-type]
        time.sleep(pause)

    time.sleep(start)
    setattr(np, "savez", slow)  # noqa: B010 - this child process only (forked)
    attach_dates(msgs, cache, processes=1)


def test_two_runs_writing_one_headers_cache_both_finish(tmp_path: Path) -> None:
    """The nightly retrain and a manual milter-train on one cache folder: each writes the headers cache
    under a name of its own (one shared temporary name made the slower run's rename fail: exit 1)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    cache = tmp_path / "cache"
    a = ctx.Process(target=_slow_attach, args=(_dated(tmp_path, 5, "a"), cache, 1.0, 0.0))
    b = ctx.Process(target=_slow_attach, args=(_dated(tmp_path, 5, "b"), cache, 0.0, 0.5))
    a.start()
    b.start()
    a.join(30)
    b.join(30)
    assert (a.exitcode, b.exitcode) == (0, 0)
    assert [p.name for p in cache.iterdir()] == ["headers.npz"]  # no temporary left behind
    dated = attach_dates(_dated(tmp_path, 5, "a"), cache, processes=1)
    assert all(m.date is not None and m.sender.endswith("@a.test") for m in dated)
