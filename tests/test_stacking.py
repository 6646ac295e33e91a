"""The text stage (milter/stacking.py, training/model.py): fitted out of fold, exported into the graph in
front of the trees, read back by the explainer, refused when its metadata is broken."""

from __future__ import annotations

import base64
from dataclasses import replace

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import pytest
from onnx import TensorProto, numpy_helper

from milter.errors import ModelError
from milter.explain import Explainer, class_boosters
from milter.features.describe import describe
from milter.features.text import GRAM_SLOTS, GRAM_SPACE, gram_id, gram_ids
from milter.stacking import (
    STAGE_NAMES,
    TOPIC_PREFIX,
    TextStage,
    TopicProjection,
    gram_norm,
    id_columns,
    stage_columns,
)
from training import model as mdl
from training.retrain import label_groups

N_TOK = 40


def _words_only_data(n: int = 1200, seed: int = 0) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Spam and phishing told apart from ham only by many weak word columns (each shifts a little):
    the kind of evidence a sum sees and single splits hardly do. Column 0 is a non-word feature."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int64)
    tok = rng.poisson(0.6, size=(n, N_TOK)).astype(np.float32)
    tok[y == 1, :15] += rng.poisson(0.4, size=(int((y == 1).sum()), 15))
    tok[y == 2, 15:30] += rng.poisson(0.4, size=(int((y == 2).sum()), 15))
    X = np.hstack([rng.normal(size=(n, 1)), np.log1p(tok)]).astype(np.float32)
    return X, y


NAMES = ("other", *(f"tok_{i:04d}" for i in range(N_TOK)))
CFG = mdl.FitConfig(max_rounds=40, early_stopping=40, min_data_in_leaf=10)


def _fitted() -> tuple[mdl.Fitted, npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    X, y = _words_only_data()
    w = np.ones(len(y))
    groups = [f"sender{i % 97}" for i in range(len(y))]
    return mdl.fit(X, y, w, X, y, w, NAMES, CFG, groups=groups), X, y


def test_the_stage_reads_the_word_columns_and_adds_two_named_scores() -> None:
    model, X, y = _fitted()
    assert model.stage is not None
    assert model.stage.columns == stage_columns(NAMES) == tuple(range(1, N_TOK + 1))
    assert model.feature_names == (*NAMES, *STAGE_NAMES)
    scores = model.stage.scores(X)
    # the unwanted-mail score ranks spam and phishing above ham, the phishing score phishing above spam
    assert scores[y != 0, 0].mean() > scores[y == 0, 0].mean() + 1.0
    assert scores[y == 2, 1].mean() > scores[y == 1, 1].mean() + 1.0


def test_without_word_columns_or_with_c_zero_there_is_no_stage() -> None:
    X, y = _words_only_data(300)
    w = np.ones(len(y))
    assert mdl.fit(X[:, :1], y, w, X[:, :1], y, w, NAMES[:1], CFG).stage is None
    off = mdl.FitConfig(max_rounds=5, early_stopping=5, min_data_in_leaf=10, text_c=0.0)
    assert mdl.fit(X, y, w, X, y, w, NAMES, off).stage is None


def test_training_rows_are_scored_by_a_stage_that_never_saw_their_sender() -> None:
    """Each sender has a word of its own and one class: a stage fitted on a sender's mail knows its word,
    one fitted without it cannot. Out-of-fold scores must be the second kind."""
    rng = np.random.default_rng(1)
    senders = 60
    per = 20
    y = np.repeat(rng.integers(0, 2, senders), per).astype(np.int64)
    X = np.zeros((senders * per, senders), dtype=np.float32)
    X[np.arange(senders * per), np.repeat(np.arange(senders), per)] = 1.0  # the sender's own word
    w = np.ones(len(y))
    columns = tuple(range(senders))
    groups = [f"s{i}" for i in np.repeat(np.arange(senders), per)]
    in_sample = mdl.fit_text_stage(X, y, w, columns, 1.0).scores(X)[:, 0]
    oof = mdl.out_of_fold_scores(X, y, w, groups, columns, mdl.FitConfig())[:, 0]
    sign = np.where(y == 1, 1.0, -1.0)
    assert (sign * in_sample).min() > 1.0  # seen: every sender's word gives its class away
    # unseen: the word carries nothing; within a fold every row gets the same score (the prior)
    folds = mdl.fold_of(groups, 5)
    for k in range(5):
        assert np.ptp(oof[folds == k]) < 1e-4
    assert (sign * oof).mean() < 0.2
    # and rows of one sender always share a fold
    for s in range(senders):
        assert len(set(folds[s * per : (s + 1) * per].tolist())) == 1


def test_label_copies_share_a_fold_group() -> None:
    groups = label_groups(3, 30)
    assert groups[:10] == ["label:0"] * 10 and groups[10:20] == ["label:1"] * 10 and len(set(groups)) == 3
    assert label_groups(0, 0) == []


def test_the_graph_computes_the_stage_and_the_trees_on_its_scores() -> None:
    model, X, _ = _fitted()
    proto = mdl.to_onnx(model, X.shape[1])
    assert [i.name for i in proto.graph.input] == [mdl.INPUT_NAME]  # the gateway feeds the vector alone
    assert {"Gather", "MatMul", "Add", "Concat"} <= {n.op_type for n in proto.graph.node}
    data = proto.SerializeToString()
    probs, scores = mdl.onnx_outputs(data, X)
    assert model.stage is not None and scores is not None
    # to the bit: the trees split on these scores, and the explainer computes them in numpy
    np.testing.assert_array_equal(scores, model.stage.scores(X))
    extended = np.hstack([X, scores])
    assert mdl.check_parity(mdl.predict_extended(model.booster, extended), probs) < mdl.PARITY_TOL
    # the stage matters: with its weights zeroed the graph scores differently
    weights = next(t for t in proto.graph.initializer if t.name == "text_weights")
    weights.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(weights)), weights.name))
    changed = mdl.onnx_probabilities(proto.SerializeToString(), X)
    assert np.abs(changed - probs).max() > 0.05


def _explainer(model: mdl.Fitted, names: tuple[str, ...]) -> Explainer:
    text = model.booster.model_to_string()
    return _Fake(lgb.Booster(model_str=text), model.stage, names)


class _Fake(Explainer):
    """The explainer over a toy schema (the real one checks the code's SCHEMA)."""

    def __init__(self, booster: lgb.Booster, stage: TextStage | None, names: tuple[str, ...]) -> None:
        self._booster = booster
        self._per_class = class_boosters(booster)
        self.model = "toy"
        self.token_examples = {}
        self._stage = stage
        self._names = names + (stage.out_names if stage else ())
        self._topics = tuple(i for i, n in enumerate(self._names) if n.startswith(TOPIC_PREFIX))


def test_explanations_include_the_stage_and_sum_to_the_graph_score() -> None:
    model, X, _ = _fitted()
    probs = mdl.onnx_probabilities(mdl.to_onnx(model, X.shape[1]).SerializeToString(), X)
    explainer = _explainer(model, NAMES)
    phi = explainer.contributions(X[:50])
    assert phi.shape == (50, 3, len(NAMES) + len(STAGE_NAMES) + 1)
    raw = explainer.raw_scores(X[:50])
    np.testing.assert_allclose(phi.sum(axis=2), raw, atol=1e-6)
    soft = np.exp(raw) / np.exp(raw).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(soft, probs[:50], atol=1e-4)
    # the stage's columns carry weight in the trees (they are the evidence the trees lean on here)
    stage_share = np.abs(phi[:, :, len(NAMES) : len(NAMES) + 2]).sum() / np.abs(phi[:, :, :-1]).sum()
    assert stage_share > 0.3


def test_real_explainer_refuses_trees_over_other_columns() -> None:
    model, _, _ = _fitted()
    with pytest.raises(ModelError, match="other features"):
        Explainer(lgb.Booster(model_str=model.booster.model_to_string()), "toy", {}, model.stage)


def test_stage_metadata_round_trips_and_broken_entries_are_refused() -> None:
    model, X, _ = _fitted()
    assert model.stage is not None
    back = TextStage.from_json(model.stage.as_json(), X.shape[1])
    np.testing.assert_array_equal(back.scores(X), model.stage.scores(X))
    good = model.stage.as_json()
    for broken, match in (
        ({**good, "format": "other"}, "not a linear-v1"),
        ({k: v for k, v in good.items() if k != "bias"}, "malformed"),
        ({**good, "columns": [X.shape[1] + 5] * len(good["columns"])}, "outside"),
        ({**good, "bias": [0.0]}, "malformed"),
        ("nonsense", "not a linear-v1"),
    ):
        with pytest.raises(ModelError, match=match):
            TextStage.from_json(broken, X.shape[1])


def test_stage_scores_are_described_in_words() -> None:
    assert describe("txt_words_unwanted", 4.0).endswith("read strongly like spam or phishing")
    assert describe("txt_words_unwanted", -1.2).endswith("read like wanted mail")
    assert describe("txt_words_phishing", 2.0).endswith("read like phishing")
    assert "lean neither way" in describe("txt_words_phishing", 0.1)
    assert "lean neither way" in describe("txt_words_phishing", float("nan"))


# --- the wide vocabulary: gram ids read by the stage, never by the trees -------------------------------

N_SLOTS = 24
WIDE_NAMES = (*NAMES, *(f"gram_{i:03d}" for i in range(N_SLOTS)))


def _wide_data(n: int = 1500, seed: int = 1) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The word columns are noise; the class is told by which of 6,000 gram ids a message holds (spam
    draws a third of its grams from 300 ids of its own), which only the wide part can see."""
    rng = np.random.default_rng(seed)
    X, y = _words_only_data(n, seed)
    X[:, 1:] = np.log1p(rng.poisson(0.6, size=(n, N_TOK))).astype(np.float32)
    ids = np.zeros((n, N_SLOTS), dtype=np.float32)
    for i in range(n):
        k = int(rng.integers(4, N_SLOTS + 1))
        pool = rng.choice(np.arange(1000, 7000), size=k, replace=False)
        if y[i] == 1:
            pool[: k // 3] = rng.choice(np.arange(1, 301), size=k // 3, replace=False)
        ids[i, :k] = pool
    return np.hstack([X, ids]).astype(np.float32), y


def _wide_fitted() -> tuple[mdl.Fitted, npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    X, y = _wide_data()
    w = np.ones(len(y))
    groups = [f"sender{i % 97}" for i in range(len(y))]
    return mdl.fit(X, y, w, X, y, w, WIDE_NAMES, CFG, groups=groups), X, y


def test_the_wide_part_sees_what_the_word_columns_cannot() -> None:
    model, X, y = _wide_fitted()
    stage = model.stage
    assert stage is not None and stage.table is not None
    assert stage.id_columns == id_columns(WIDE_NAMES) == tuple(range(N_TOK + 1, N_TOK + 1 + N_SLOTS))
    assert stage.space == GRAM_SPACE
    scores = stage.scores(X)
    assert scores[y == 1, 0].mean() > scores[y == 0, 0].mean() + 1.0
    # the ids of spam carry the weight; an id never seen in training carries none
    assert stage.table[1:301, 0].mean() > 0 > stage.table[1000:7000, 0].mean()
    assert not stage.table[7000:].any()
    # text_grams="unwanted" (the default): the phishing score reads the word columns only
    assert not stage.table[:, 1].any()
    # the trees never split on an id column: a hash is not a quantity
    used = model.booster.feature_importance(importance_type="split")
    assert not used[list(stage.id_columns)].any()
    assert used[len(WIDE_NAMES)] > 0  # ... but on the stage's score


def test_the_graph_computes_the_wide_part_as_the_stage_does() -> None:
    model, X, _ = _wide_fitted()
    assert model.stage is not None
    proto = mdl.to_onnx(model, X.shape[1])
    assert [i.name for i in proto.graph.input] == [mdl.INPUT_NAME]
    data = proto.SerializeToString()
    probs, scores = mdl.onnx_outputs(data, X)
    assert scores is not None
    # the stage's output: its two scores, then its topics
    np.testing.assert_array_equal(scores, model.stage.outputs(X))  # to the bit (TextStage._scores64)
    trees = mdl.predict_extended(model.booster, np.hstack([X, scores]))
    assert mdl.check_parity(trees, probs) < mdl.PARITY_TOL
    # ids outside the table (a hand-made vector) are clipped alike, not an inference error
    odd = X[:5].copy()
    odd[:, list(model.stage.id_columns)] = [[-7.0, 1e9, 3.5, *([0.0] * (N_SLOTS - 3))]] * 5
    _, odd_scores = mdl.onnx_outputs(data, odd)
    assert odd_scores is not None
    np.testing.assert_array_equal(odd_scores, model.stage.outputs(odd))
    # the table matters: zeroed, the graph scores differently
    table = next(t for t in proto.graph.initializer if t.name == "gram_table")
    table.raw_data = np.zeros((table.dims[0], table.dims[1]), dtype=np.float32).tobytes()
    assert np.abs(mdl.onnx_probabilities(proto.SerializeToString(), X) - probs).max() > 0.05


def test_an_export_whose_trees_read_an_id_column_is_refused() -> None:
    model, X, y = _wide_fitted()
    assert model.stage is not None
    leaky = lgb.train({**mdl.lgb_params(CFG), "min_data_in_leaf": 5}, lgb.Dataset(
        np.hstack([X, model.stage.outputs(X)]), y, feature_name=[*WIDE_NAMES, *model.stage.out_names]), 20)
    assert leaky.feature_importance(importance_type="split")[list(model.stage.id_columns)].any()
    with pytest.raises(mdl.ExportMismatchError, match="gram id columns"):
        mdl.to_onnx(mdl.Fitted(leaky, model.stage), X.shape[1])


def test_the_wide_table_round_trips_and_a_broken_one_is_refused() -> None:
    model, X, _ = _wide_fitted()
    assert model.stage is not None
    good = model.stage.as_json()
    back = TextStage.from_json(good, X.shape[1])
    np.testing.assert_array_equal(back.scores(X), model.stage.scores(X))
    assert back.table is not None and back.table.shape == (GRAM_SPACE + 1, len(STAGE_NAMES))
    row0 = np.zeros_like(back.table)
    row0[0, 0] = 1.0
    for broken, match in (
        ({**good, "table_f32le_b64": "not base64!"}, "malformed"),
        ({**good, "table_shape": [7, 2]}, "malformed"),
        ({**good, "table_f32le_b64": base64.b64encode(row0.astype("<f4").tobytes()).decode()}, "malformed"),
        ({**good, "id_columns": [X.shape[1]]}, "outside"),
        ({**good, "precision": "float16"}, "malformed"),
    ):
        with pytest.raises(ModelError, match=match):
            TextStage.from_json(broken, X.shape[1])


def test_a_stage_from_before_float64_sums_is_read_and_exported_in_float32() -> None:
    """Models exported before the float64 sums carry no "precision": their graphs sum in float32, and
    the explainer must sum as they do (its load check compares the two)."""
    model, X, _ = _wide_fitted()
    assert model.stage is not None and model.stage.precision == "float64"
    old = {k: v for k, v in model.stage.as_json().items() if k != "precision"}
    stage32 = TextStage.from_json(old, X.shape[1])
    assert stage32.precision == "float32"
    proto = mdl.to_onnx(mdl.Fitted(model.booster, stage32), X.shape[1])
    words = [n for n in proto.graph.node if n.op_type == "Cast" and not n.name.startswith("topic")]
    assert TensorProto.DOUBLE not in [a.i for n in words for a in n.attribute if a.name == "to"]
    _, scores = mdl.onnx_outputs(proto.SerializeToString(), X)
    assert scores is not None
    np.testing.assert_allclose(scores, stage32.outputs(X), rtol=1e-5, atol=1e-5)
    # the two precisions are different computations (else this test would prove nothing)
    assert not np.array_equal(stage32.scores(X), model.stage.scores(X))


def test_float64_sums_agree_with_the_graph_to_the_bit_on_many_rows() -> None:
    """The bug this guards against: summed in float32, numpy and ONNX Runtime differed by 12 float32
    steps on one message of 1,872 and a tree's split read them on both sides (a refused retrain)."""
    model, X, _ = _wide_fitted()
    assert model.stage is not None
    rng = np.random.default_rng(7)
    rows = np.repeat(X, 8, axis=0)
    tok = list(model.stage.columns)
    rows[:, tok] = rng.gamma(1.0, 3.0, (len(rows), len(tok))).astype(np.float32)
    _, scores = mdl.onnx_outputs(mdl.to_onnx(model, X.shape[1]).SerializeToString(), rows)
    np.testing.assert_array_equal(scores, model.stage.outputs(rows))


def test_gram_ids_are_the_first_distinct_grams_in_reading_order() -> None:
    toks = ["click", "here", "click", "here", "now"]
    ids = gram_ids(toks)
    assert ids.dtype == np.float32 and ids.shape == (GRAM_SLOTS,)
    expected = [gram_id(g) for g in ("click", "click here", "here", "here click", "here now", "now")]
    assert ids[:6].tolist() == expected  # "click here" once though it occurs twice
    assert not ids[6:].any()
    assert all(1 <= i <= GRAM_SPACE for i in expected) and max(expected) < 2**24  # exact in float32
    long = gram_ids([f"w{i}" for i in range(5 * GRAM_SLOTS)])
    assert long.all() and long[0] == gram_id("w0")  # full, and it kept the start
    assert not gram_ids([]).any()


def test_gram_norm_keeps_a_long_text_from_summing_to_certainty() -> None:
    ids = np.zeros((3, 8), dtype=np.int64)
    ids[1, :1] = 5
    ids[2, :] = np.arange(1, 9)
    assert gram_norm(ids).tolist() == pytest.approx([1.0, 1.0, np.sqrt(8)])


def test_stage_labels_choose_which_admin_labels_the_stage_learns_from() -> None:
    """"none": labels teach the trees only, the stage is the corpora's; "ham": ham labels move the
    stage (a word the corpora know as spam reads less so), spam labels still do not; "all": both."""
    X, y = _words_only_data(600)
    w = np.ones(len(y))
    groups = [f"sender{i % 97}" for i in range(len(y))]
    rng = np.random.default_rng(3)
    spam_word = 1  # tok_0000: the corpora's spam carries it more (columns 1..15)
    ham_labels = np.log1p(rng.poisson(0.6, size=(30, N_TOK + 1))).astype(np.float32)
    ham_labels[:, spam_word] = 3.0
    spam_labels = ham_labels.copy()
    spam_labels[:, spam_word] = 0.0
    spam_labels[:, 20] = 3.0

    def stage(mode: str, with_spam: bool) -> TextStage:
        rows = [X, ham_labels] + ([spam_labels] if with_spam else [])
        ys = [y, np.zeros(30, dtype=np.int64)] + ([np.ones(30, dtype=np.int64)] if with_spam else [])
        n_lab = 60 if with_spam else 30
        labels = np.r_[np.zeros(len(y), dtype=bool), np.ones(n_lab, dtype=bool)]
        cfg = mdl.FitConfig(max_rounds=5, early_stopping=5, min_data_in_leaf=10, stage_labels=mode)
        fitted = mdl.fit(
            np.vstack(rows), np.concatenate(ys), np.ones(len(labels)) * 5, X, y, w, NAMES, cfg,
            groups=groups + label_groups(n_lab, n_lab), labels=labels,
        )
        assert fitted.stage is not None
        return fitted.stage

    corpora_only = mdl.fit_text_stage(X, y, np.ones(len(y)) * 5, stage_columns(NAMES), 1.0)
    none = stage("none", True)
    np.testing.assert_allclose(none.weights, corpora_only.weights, rtol=1e-6, atol=1e-6)
    ham = stage("ham", False)
    col = none.columns.index(spam_word)
    assert ham.weights[col, 0] < none.weights[col, 0] - 0.2
    np.testing.assert_allclose(stage("ham", True).weights, ham.weights, rtol=1e-6, atol=1e-6)
    both = stage("all", True)
    assert both.weights[none.columns.index(20), 0] > ham.weights[none.columns.index(20), 0] + 0.2


def test_threshold_rows_are_scored_by_trees_that_never_saw_their_sender() -> None:
    """As for the stage: each sender's rows sit at its own value of a feature and share one class, so
    trees fitted on a sender's mail know it (in sample) and trees fitted without it cannot. The scores
    the thresholds are chosen on (`Fitted.oof`) must be the second kind."""
    rng = np.random.default_rng(3)
    senders, per = 24, 60
    y = np.repeat(rng.integers(0, 2, senders), per).astype(np.int64)
    jitter = rng.normal(0, 0.01, (senders * per, 1))
    X: npt.NDArray[np.float32] = (np.repeat(np.arange(senders), per)[:, None] + jitter).astype(np.float32)
    w = np.ones(len(y))
    groups = [f"s{i}" for i in np.repeat(np.arange(senders), per)]
    cfg = mdl.FitConfig(max_rounds=60, early_stopping=60, min_data_in_leaf=20, text_c=0.0, threshold_folds=4)
    model = mdl.fit(X, y, w, X, y, w, ("sender",), cfg, groups=groups)
    assert model.oof is not None and model.oof.shape == (len(y), 3)
    in_sample = mdl.predict(model, X)

    def hit(p: npt.NDArray[np.float64]) -> float:
        return float((p[:, 1].round() == y).mean())

    assert hit(in_sample) > 0.95  # every sender's value gives its class away to trees that saw it
    assert hit(model.oof) < 0.75  # and nothing away to trees that did not
    np.testing.assert_allclose(model.oof.sum(axis=1), 1.0, rtol=1e-6)
    # without the setting there are no such scores (and no extra fits)
    off = mdl.fit(X, y, w, X, y, w, ("sender",), replace(cfg, threshold_folds=0), groups=groups)
    assert off.oof is None


# --- the stage's topics: what the text is about (TopicProjection, mdl.fit_topics) -------------------


def test_topics_follow_the_scores_and_the_trees_read_them() -> None:
    model, X, y = _wide_fitted()
    stage = model.stage
    assert stage is not None and stage.topics is not None
    assert stage.out_names == (*STAGE_NAMES, *(f"{TOPIC_PREFIX}{j:02d}" for j in range(CFG.topics)))
    assert model.feature_names == (*WIDE_NAMES, *stage.out_names)
    topics = stage.outputs(X)[:, len(STAGE_NAMES):]
    # unit length: only the direction of a text's grams counts, not how many it has
    np.testing.assert_allclose(np.linalg.norm(topics, axis=1), 1.0, atol=1e-5)
    # spam's 300 ids of its own point somewhere ham's do not: the nearer of the two centroids tells
    # most spam from ham (no labels went into the topics; a coin would get half)
    pair = (y == 0) | (y == 1)
    centroids = np.stack([topics[y == 0].mean(axis=0), topics[y == 1].mean(axis=0)])
    nearer = np.argmax(topics[pair] @ centroids.T, axis=1)
    assert (nearer == y[pair]).mean() > 0.8
    used = model.booster.feature_importance(importance_type="split")
    assert used[len(WIDE_NAMES) + len(STAGE_NAMES):].sum() > 0
    # the graph computes the very same topics, to the bit (float64 sums of float16 values are exact in any
    # order): a last-bit difference can flip a tree's split, and the explainer's check would refuse it
    _, graph_out = mdl.onnx_outputs(mdl.to_onnx(model, X.shape[1]).SerializeToString(), X)
    assert graph_out is not None
    np.testing.assert_array_equal(graph_out[:, len(STAGE_NAMES):], topics)


def test_a_text_without_known_grams_has_zero_topics_not_nan() -> None:
    model, X, _ = _wide_fitted()
    stage = model.stage
    assert stage is not None and stage.topics is not None
    empty = X[:3].copy()
    empty[:, list(stage.id_columns)] = 0.0  # no grams at all
    empty[1, list(stage.id_columns)[:2]] = [GRAM_SPACE - 1, GRAM_SPACE - 2]  # grams outside the vocabulary
    topics = stage.outputs(empty)[:, len(STAGE_NAMES):]
    assert np.isfinite(topics).all() and not topics.any()
    _, scores = mdl.onnx_outputs(mdl.to_onnx(model, X.shape[1]).SerializeToString(), empty)
    assert scores is not None
    np.testing.assert_array_equal(scores[:, len(STAGE_NAMES):], topics)


def test_the_topics_read_the_commonest_grams_and_the_same_rows_give_the_same_table() -> None:
    X, _ = _wide_data(600)
    ids = id_columns(WIDE_NAMES)
    a = mdl.fit_topics(X, ids, 8, 500, seed=3)
    b = mdl.fit_topics(X.copy(), ids, 8, 500, seed=3)
    assert a is not None and b is not None
    np.testing.assert_array_equal(a.vocab, b.vocab)
    np.testing.assert_array_equal(a.table, b.table)
    # the vocabulary is the 500 grams found in most rows
    assert len(a.vocab) == 500 and a.table.shape == (501, 8)
    df = np.bincount(np.clip(X[:, list(ids)].astype(np.int64), 0, None).ravel(), minlength=GRAM_SPACE + 1)
    df[0] = 0
    assert df[a.vocab].min() >= np.delete(df, a.vocab).max()
    assert mdl.fit_topics(X, ids, 0, 500, seed=3) is None
    assert mdl.fit_topics(X, (), 8, 500, seed=3) is None


def test_the_topics_round_trip_and_broken_ones_are_refused() -> None:
    model, X, _ = _wide_fitted()
    assert model.stage is not None and model.stage.topics is not None
    good = model.stage.as_json()
    back = TextStage.from_json(good, X.shape[1])
    np.testing.assert_array_equal(back.outputs(X), model.stage.outputs(X))
    topics = model.stage.topics
    with pytest.raises(ValueError, match="vocab"):
        TopicProjection(topics.vocab[::-1].copy(), topics.table)
    row0 = topics.table.copy()
    row0[0, 0] = 1.0
    with pytest.raises(ValueError, match="row 0"):
        TopicProjection(topics.vocab, row0)
    nan = topics.table.copy()
    nan[1, 0] = np.nan
    broken = {**good, "topics": TopicProjection(topics.vocab, nan).as_json()}
    with pytest.raises(ModelError, match="non-finite"):
        TextStage.from_json(broken, X.shape[1])
    with pytest.raises(ModelError, match="malformed"):
        TextStage.from_json({**good, "topics": {"table_shape": [2, 2]}}, X.shape[1])


def test_the_topics_are_one_reason_in_an_explanation() -> None:
    model, X, _ = _wide_fitted()
    assert model.stage is not None
    explainer = _explainer(model, WIDE_NAMES)
    probs = mdl.onnx_probabilities(mdl.to_onnx(model, X.shape[1]).SerializeToString(), X[:40])
    found = explainer.explain(X[:40], ["spam"] * 40, probs)
    names = [c.feature for e in found for c in e.contributions]
    assert not any(n.startswith(TOPIC_PREFIX) for n in names)
    assert "txt_topics" in names
    # grouping moves no weight: listed + rest is still the score above the base
    for e in found:
        listed = sum(c.contribution for c in e.towards) + sum(c.contribution for c in e.against)
        assert abs(e.base + listed + e.rest - e.score) < 1e-6
    one = next(c for e in found for c in e.contributions if c.feature == "txt_topics")
    assert one.text == "what the text is about (its topics, weighed together)"


def _split_features(booster: lgb.Booster) -> set[str]:
    names = booster.feature_name()
    used = booster.feature_importance(importance_type="split")
    return {n for n, k in zip(names, used, strict=True) if k > 0}


def test_without_tree_words_the_trees_read_the_words_only_through_the_stage() -> None:
    """FitConfig.tree_words=False: no tree splits on a hashed word column, the stage still reads them
    all and the model still separates the classes (through the stage's scores)."""
    X, y = _words_only_data()
    w = np.ones(len(y))
    groups = [f"sender{i % 97}" for i in range(len(y))]
    with_words, _, _ = _fitted()
    assert any(n.startswith("tok_") for n in _split_features(with_words.booster))  # the test can fail
    cfg = replace(CFG, tree_words=False, threshold_folds=0)
    model = mdl.fit(X, y, w, X, y, w, NAMES, cfg, groups=groups)
    used = _split_features(model.booster)
    assert not [n for n in used if n.startswith("tok_")]
    assert used & set(STAGE_NAMES)
    assert model.stage is not None and model.stage.columns == stage_columns(NAMES)
    accuracy = float((mdl.predict(model, X).argmax(axis=1) == y).mean())
    assert accuracy > 0.6  # three classes: a third by chance
