"""training/languages.py, FitConfig.language_adjust and language_balance: no language learned as a label."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from milter.features.text import GRAM_SLOTS, GRAM_SPACE, gram_ids, tokens
from milter.stacking import STAGE_NAMES, TextStage
from training import model as mdl
from training.languages import (
    LANGUAGES,
    STOPWORDS,
    balance_languages,
    english_or_unknown,
    language_columns,
    leans,
    row_languages,
)

GERMAN = (
    "Liebe Leserinnen und Leser, in diesem Monat berichten wir über die Arbeit unserer Beratungsstelle "
    "und laden Sie herzlich zu unserem Sommerfest ein. Bitte melden Sie sich bei uns an, wenn Sie mit "
    "der Familie kommen, und bringen Sie gute Laune mit."
)
PORTUGUESE = (
    "Prezado cliente, sua conta foi bloqueada por motivos de segurança. Para desbloquear, clique aqui e "
    "confirme os seus dados em nosso site. Você tem mais dois dias para fazer isso."
)
ENGLISH = (
    "Dear readers, this month we report on the work of our advice centre and warmly invite you to our "
    "summer party. Please let us know if you will come with your family, and bring good spirits."
)


def _row(*texts: str) -> npt.NDArray[np.float32]:
    return np.stack([gram_ids(tokens(t)) for t in texts]).astype(np.float32)


def test_a_row_s_language_is_read_from_its_gram_ids() -> None:
    ids = tuple(range(GRAM_SLOTS))
    cols = language_columns(_row(GERMAN, PORTUGUESE, ENGLISH, "und der die", ""), ids)
    assert cols.shape == (5, len(LANGUAGES))
    assert cols[0].tolist() == [float(lang == "de") for lang in LANGUAGES]
    assert cols[1].tolist() == [float(lang == "pt") for lang in LANGUAGES]
    assert not cols[2:].any()  # English, three stopwords only, no text: no column
    assert english_or_unknown(_row(GERMAN, ENGLISH), ids).tolist() == [False, True]
    assert not language_columns(_row(GERMAN), ()).any()  # no gram ids, no language


def test_every_stopword_is_a_token_the_features_emit() -> None:
    """A word the tokeniser never emits (one letter, an upper-case letter) could never match."""
    for words in STOPWORDS.values():
        for word in words:
            assert tokens(word) == [word]


N_TOK = 30  # 0-9: words of the other language, 10-19: phishing words, 20-29: ham words
NAMES = ("other", *(f"tok_{i:04d}" for i in range(N_TOK)), *(f"gram_{i:03d}" for i in range(GRAM_SLOTS)))


def _data(n: int = 1600, seed: int = 3) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """English mail is ham or phishing, told apart by its words; mail in the other language (its own words
    and German function words among its gram ids) is all phishing, as in the corpora."""
    rng = np.random.default_rng(seed)
    german = rng.random(n) < 0.3
    y = np.where(german, 2, rng.choice([0, 2], size=n, p=[0.7, 0.3])).astype(np.int64)
    tok = rng.poisson(0.2, size=(n, N_TOK)).astype(np.float64)
    tok[german, :10] += rng.poisson(1.5, size=(int(german.sum()), 10))
    tok[y == 2, 10:20] += rng.poisson(0.8, size=(int((y == 2).sum()), 10))
    tok[y == 0, 20:30] += rng.poisson(0.8, size=(int((y == 0).sum()), 10))
    ids = np.zeros((n, GRAM_SLOTS), dtype=np.float32)
    german_ids = gram_ids(tokens(GERMAN))
    english_ids = gram_ids(tokens(ENGLISH))
    ids[german] = german_ids
    ids[~german] = english_ids
    # a few grams of their own, so that the rows are not all alike to the topics' SVD
    ids[:, -4:] = rng.integers(GRAM_SPACE // 2, GRAM_SPACE, size=(n, 4))
    X = np.hstack([rng.normal(size=(n, 1)), np.log1p(tok), ids]).astype(np.float32)
    return X, y


def _stage(language_scale: float) -> TextStage:
    X, y = _data()
    columns = tuple(range(1, N_TOK + 1))
    id_cols = tuple(range(N_TOK + 1, N_TOK + 1 + GRAM_SLOTS))
    return mdl.fit_text_stage(
        X, y, np.ones(len(y)), columns, 1.0, id_cols, "unwanted", scale=10.0, language_scale=language_scale
    )


def test_with_language_adjust_the_stage_reads_the_words_not_the_language() -> None:
    plain, adjusted = _stage(0.0), _stage(20.0)
    # nothing of the language is shipped: the same shapes as a stage fitted without it
    assert adjusted.weights.shape == plain.weights.shape == (N_TOK, len(STAGE_NAMES))
    assert adjusted.table is not None and adjusted.table.shape == (GRAM_SPACE + 1, len(STAGE_NAMES))
    rows = {
        # a German newsletter: the language's own words and ham's, no phishing words
        "german ham": np.r_[0.0, [np.log1p(2.0)] * 10, [0.0] * 10, [np.log1p(1.0)] * 10],
        "english ham": np.r_[0.0, [0.0] * 10, [0.0] * 10, [np.log1p(1.0)] * 10],
        "english phish": np.r_[0.0, [0.0] * 10, [np.log1p(1.0)] * 10, [0.0] * 10],
    }
    german_ids = gram_ids(tokens(GERMAN))
    english_ids = gram_ids(tokens(ENGLISH))
    probe = np.stack(
        [
            np.r_[rows["german ham"], german_ids],
            np.r_[rows["english ham"], english_ids],
            np.r_[rows["english phish"], english_ids],
        ]
    ).astype(np.float32)
    before, after = plain.scores(probe), adjusted.scores(probe)
    phishing = STAGE_NAMES.index("txt_words_phishing")
    # the plain stage reads the German newsletter as phishing; adjusted, it is scored by its words
    assert before[0, phishing] > before[1, phishing] + 2.0
    assert after[0, phishing] < before[0, phishing] - 2.0
    # English mail is told apart as well as before
    for stage_scores in (before, after):
        assert stage_scores[2, phishing] > stage_scores[1, phishing] + 2.0


def test_with_language_adjust_the_topics_are_learned_from_english_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[int] = []
    real = mdl.fit_topics

    def spy(X: npt.NDArray[np.float32], *args: object, **kwargs: object) -> object:
        seen.append(len(X))
        return real(X, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mdl, "fit_topics", spy)
    X, y = _data(600)
    w = np.ones(len(y))
    groups = [f"s{i % 53}" for i in range(len(y))]
    english = int(english_or_unknown(X, tuple(range(N_TOK + 1, N_TOK + 1 + GRAM_SLOTS))).sum())
    assert 0 < english < len(y)
    for adjust, rows in ((0.0, len(y)), (20.0, english)):
        cfg = mdl.FitConfig(
            max_rounds=5,
            early_stopping=5,
            min_data_in_leaf=10,
            topics=4,
            topic_vocab=64,
            language_adjust=adjust,
        )
        mdl.fit(X, y, w, X, y, w, NAMES, cfg, groups=groups)
        assert seen[-1] == rows


DE, PT = LANGUAGES.index("de"), LANGUAGES.index("pt")


def test_each_row_s_language_as_an_index() -> None:
    ids = tuple(range(GRAM_SLOTS))
    assert row_languages(_row(GERMAN, PORTUGUESE, ENGLISH, ""), ids).tolist() == [DE, PT, -1, -1]


def test_a_language_the_bad_class_holds_more_of_leans_less_and_the_classes_keep_their_weight() -> None:
    # ham: 98 English, 2 German; phishing (2): 60 English, 40 German, 10 Portuguese; spam (1): English only
    y = np.array([0] * 100 + [2] * 110 + [1] * 50, dtype=np.int64)
    lang = np.array([-1] * 98 + [DE] * 2 + [-1] * 60 + [DE] * 40 + [PT] * 10 + [-1] * 50, dtype=np.int64)
    w = np.ones(len(y))
    before = leans(w, y, lang)[(2, "de")]
    assert before == pytest.approx((40 / 110) / (2 / 100))
    half = balance_languages(w, y, lang, 0.5)
    assert leans(half, y, lang)[(2, "de")] == pytest.approx(before**0.5)
    full = balance_languages(w, y, lang, 1.0)
    assert leans(full, y, lang)[(2, "de")] == pytest.approx(1.0)
    # Portuguese has no ham: it leans as if one ham row were Portuguese (10/110 over 1/100: 9.1)
    assert leans(half, y, lang)[(2, "pt")] == pytest.approx((10 / 110 / (1 / 100)) ** 0.5)
    assert half[(y == 2) & (lang == DE)].max() < half[lang == PT].max() < 1.0  # German leaned more
    for out in (half, full):
        for klass in (0, 1, 2):
            assert out[y == klass].sum() == pytest.approx(w[y == klass].sum())
        assert (out[y == 0] == 1.0).all()  # ham is never reweighed
        assert (out[y == 1] == 1.0).all()  # nor a class with no language leaning
        assert out[(y == 2) & (lang == -1)].min() > 1.0  # English phishing makes up the weight
    assert (balance_languages(w, y, lang, 0.0) == w).all()


def test_without_redistribution_the_class_s_other_rows_keep_their_weight_and_its_total_shrinks() -> None:
    y = np.array([0] * 100 + [2] * 110 + [1] * 50, dtype=np.int64)
    lang = np.array([-1] * 98 + [DE] * 2 + [-1] * 60 + [DE] * 40 + [PT] * 10 + [-1] * 50, dtype=np.int64)
    w = np.linspace(1.0, 2.0, len(y))
    kept = balance_languages(w, y, lang, 0.5)
    dropped = balance_languages(w, y, lang, 0.5, redistribute=False)
    leaning = (y == 2) & (lang >= 0)
    assert dropped[leaning] == pytest.approx(kept[leaning])  # the language is weighed down alike
    assert (dropped[~leaning] == w[~leaning]).all()  # English phishing, spam and ham untouched
    assert dropped[y == 2].sum() < w[y == 2].sum()
    # the class's total shrinks with the language's weight, so the language keeps more of its lean
    before = leans(w, y, lang)[(2, "de")]
    assert before**0.5 < leans(dropped, y, lang)[(2, "de")] < before


def test_a_language_that_leans_toward_ham_is_left_as_it_is() -> None:
    y = np.array([0] * 10 + [2] * 10, dtype=np.int64)
    lang = np.array([DE] * 5 + [-1] * 5 + [DE] * 1 + [-1] * 9, dtype=np.int64)  # 50 % of ham, 10 % of bec
    w = np.linspace(1.0, 2.0, len(y))
    assert balance_languages(w, y, lang, 1.0) == pytest.approx(w)


def test_language_balance_refuses_a_power_out_of_range_and_rows_that_disagree() -> None:
    y = np.zeros(3, dtype=np.int64)
    with pytest.raises(ValueError, match="between 0 and 1"):
        balance_languages(np.ones(3), y, np.full(3, -1), 1.5)
    with pytest.raises(ValueError, match="2 labels"):
        balance_languages(np.ones(3), y[:2], np.full(3, -1), 0.5)


def test_milter_train_s_language_balance_reaches_the_fit_s_weights() -> None:
    """fit_setup (milter-train and milter-retrain) weighs the German phishing rows down, nothing else."""
    from pathlib import Path

    from milter.features import SCHEMA
    from milter.stacking import id_columns
    from training.corpora import Message
    from training.dataset import TEST, TRAIN, VAL, Dataset
    from training.train import fit_setup, parse_args

    names = tuple(SCHEMA.names)
    ids = list(id_columns(names))
    texts = [ENGLISH] * 40 + [GERMAN] * 2 + [ENGLISH] * 30 + [GERMAN] * 20
    y = np.array([0] * 42 + [2] * 50, dtype=np.int64)
    X = np.zeros((len(y), len(names)), dtype=np.float32)
    X[:, ids] = _row(*texts)[:, : len(ids)]
    corpus = {0: "spamassassin-public", 2: "phishing-pot"}
    messages = tuple(
        Message(corpus[int(k)], "", "ham" if k == 0 else "phish", int(k), f"{i:064x}", Path(f"/x/{i}"), i,
                None, f"s{i}@example.com")
        for i, k in enumerate(y)
    )
    split = np.array([TRAIN] * (len(y) - 4) + [VAL, VAL, TEST, TEST], dtype=np.int8)
    split[[0, 41]] = [VAL, TEST]  # each split holds both classes
    ds = Dataset(messages, X, y, split, names)
    plain = fit_setup(parse_args(["--no-progress", "--language-balance", "0"]), ds).weights
    balanced = fit_setup(parse_args(["--no-progress", "--language-balance", "0.5"]), ds).weights
    shipped = fit_setup(parse_args(["--no-progress"]), ds).weights
    assert (shipped == balanced).all()  # the shipped recipe balances at 0.5 (README, "How good it is")
    german_phish = (y == 2) & (np.arange(len(y)) >= 72)
    assert (balanced[german_phish] < plain[german_phish]).all()
    assert (balanced[y == 0] == plain[y == 0]).all()
    assert balanced[y == 2].sum() == pytest.approx(plain[y == 2].sum())
    dropped = fit_setup(parse_args(["--no-progress", "--no-language-redistribute"]), ds).weights
    assert (dropped[german_phish] < plain[german_phish]).all()
    assert (dropped[~german_phish] == plain[~german_phish]).all()
