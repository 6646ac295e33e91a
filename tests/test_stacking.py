"""The text stage (milter/stacking.py, training/model.py): fitted out of fold, exported into the graph in
front of the trees, read back by the explainer, refused when its metadata is broken."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import pytest

from milter.errors import ModelError
from milter.explain import Explainer
from milter.features.describe import describe
from milter.stacking import STAGE_NAMES, TextStage, stage_columns
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
    np.testing.assert_allclose(scores, model.stage.scores(X), rtol=1e-5, atol=1e-5)
    extended = np.hstack([X, scores])
    assert mdl.check_parity(mdl.predict_extended(model.booster, extended), probs) < mdl.PARITY_TOL
    # the stage matters: with its weights zeroed the graph scores differently
    weights = next(t for t in proto.graph.initializer if t.name == "text_weights")
    zeroed = np.zeros((weights.dims[0], weights.dims[1]), dtype=np.float32)
    weights.raw_data = zeroed.tobytes()
    changed = mdl.onnx_probabilities(proto.SerializeToString(), X)
    assert np.abs(changed - probs).max() > 0.05


def _explainer(model: mdl.Fitted, names: tuple[str, ...]) -> Explainer:
    text = model.booster.model_to_string()
    return _Fake(lgb.Booster(model_str=text), model.stage, names)


class _Fake(Explainer):
    """The explainer over a toy schema (the real one checks the code's SCHEMA)."""

    def __init__(self, booster: lgb.Booster, stage: TextStage | None, names: tuple[str, ...]) -> None:
        self._booster = booster
        self.model = "toy"
        self.token_examples = {}
        self._stage = stage
        self._names = names + (stage.names if stage else ())


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
