"""A training row's language, read from its gram ids: the corpora teach the language as a label.

Almost every non-English message in the share is phishing (Phishing Pot is about half Portuguese,
Spanish, German and French; the ham has a few dozen non-English messages among 30,000), so a text model
learns "German -> phishing" as readily as any word of a lure. Left out of training, 8 of 14 German
newsletters were quarantined as bec after the nightly retrain, and a German site's own labels could not
teach it otherwise: the gate refused the retrain, because unlearning the language cost recall on German
phishing (docs/DETECTION.md, "The language of the text"). `FitConfig.language_adjust` uses these
columns so that the text stage and its topics learn the words, not the language (training/model.py);
nothing here runs in the gateway.

The language is the one whose common function words the row's gram ids (milter/features/text.py: the
first 512 distinct words and word pairs, hashed) hold most, at least MIN_STOPWORDS of them; English and
too little text give no column. Hashing the words the way the features do needs no language-detection
model and no second read of the message; a collision only adds one match. Why not py3langid here (as
bench/languages.py uses): the rows are feature vectors, the raw text is gone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from milter.features.text import gram_id

#: Function words that say which language a text is in and little else (the languages the corpora
#: hold as phishing or spam, not as ham): lower-case, two letters or more, as the tokeniser emits them.
STOPWORDS: dict[str, frozenset[str]] = {
    lang: frozenset(words.split())
    for lang, words in {
        "de": "und der die das nicht mit für ist ein eine wir auf zu den von dem sich auch werden bitte "
        "ihre oder wenn noch zum zur über bei sie ihr ihnen unsere",
        "pt": "você seu sua não para com uma os as ao do da dos das no na em por mais sobre clique "
        "aqui conta",
        "es": "el los las que en para su por con una usted del al es lo como pero más este esta aquí cuenta",
        "fr": "le la les et des vous votre pour dans une est pas sur avec nous du au ce cette sont",
        "it": "il di che per una non con sono gli della del alla le nel questo",
        "nl": "de het een en van ik je dat niet zijn op met voor uw wij naar deze",
    }.items()
}
LANGUAGES = tuple(STOPWORDS)
MIN_STOPWORDS = 4

_IDS = {lang: np.array(sorted(map(gram_id, words)), dtype=np.float32) for lang, words in STOPWORDS.items()}


def language_columns(X: npt.NDArray[np.float32], id_columns: Sequence[int]) -> npt.NDArray[np.float64]:
    """One column per LANGUAGES entry, 1.0 where that is the row's language; all zero for English or
    too little text (and when there are no gram id columns)."""
    out = np.zeros((len(X), len(LANGUAGES)), dtype=np.float64)
    if not len(id_columns) or not len(X):
        return out
    ids = X[:, list(id_columns)]
    counts = np.stack([np.isin(ids, _IDS[lang]).sum(axis=1) for lang in LANGUAGES], axis=1)
    found = counts.max(axis=1) >= MIN_STOPWORDS
    out[np.flatnonzero(found), counts.argmax(axis=1)[found]] = 1.0
    return out


def english_or_unknown(X: npt.NDArray[np.float32], id_columns: Sequence[int]) -> npt.NDArray[np.bool_]:
    """Rows with no other language found (the rows the topics are learned from under language_adjust)."""
    return np.asarray(language_columns(X, id_columns).sum(axis=1) == 0, dtype=np.bool_)


def row_languages(X: npt.NDArray[np.float32], id_columns: Sequence[int]) -> npt.NDArray[np.int64]:
    """Each row's index in LANGUAGES, or -1 for English and too little text."""
    cols = language_columns(X, id_columns)
    out = np.full(len(X), -1, dtype=np.int64)
    found = cols.sum(axis=1) > 0
    out[found] = cols[found].argmax(axis=1)
    return out


def leans(
    weights: npt.NDArray[np.float64], y: npt.NDArray[np.int64], languages: npt.NDArray[np.int64], ham: int = 0
) -> dict[tuple[int, str], float]:
    """(class, language) -> the language's share of the class's weight over its share of ham's (at least
    an average ham row's), for each class but `ham` and each language found in it: what balance_languages
    weighs down, and what the fit log prints."""
    is_ham = y == ham
    if not is_ham.any():
        return {}
    ham_total = float(weights[is_ham].sum())
    floor = 1.0 / int(is_ham.sum())
    out: dict[tuple[int, str], float] = {}
    for klass in np.unique(y[~is_ham]):
        in_class = y == klass
        total = float(weights[in_class].sum())
        for lang in np.unique(languages[in_class]):
            if lang < 0:
                continue
            share = float(weights[in_class & (languages == lang)].sum()) / total
            ham_share = max(float(weights[is_ham & (languages == lang)].sum()) / ham_total, floor)
            out[(int(klass), LANGUAGES[lang])] = share / ham_share
    return out


def balance_languages(
    weights: npt.NDArray[np.float64],
    y: npt.NDArray[np.int64],
    languages: npt.NDArray[np.int64],
    power: float,
    ham: int = 0,
    *,
    redistribute: bool = True,
) -> npt.NDArray[np.float64]:
    """Weights under which a language leans less toward the classes that hold it more than ham does.

    For each class but `ham` and each language (not -1), the lean r is what `leans` gives: the language's
    share of that class's weight over its share of ham's (at least an average ham row's, so a language
    no ham is in leans as if one ham message were). Where r is above 1, the class's rows in that
    language get the share that makes the lean r**(1 - power): 0 changes nothing, 1 leaves the
    language no lean at all. With `redistribute` (the default) the class keeps its total weight: its
    other rows (English, too short to tell, languages that lean toward ham) share what was taken, in
    proportion to their weights. Without it the class's total shrinks by what was taken and its other
    rows keep their weights (English phishing grows no heavier for the German phishing weighed down),
    so a language keeps more of its lean than r**(1 - power).

    Why weights and not a column the graph drops (`FitConfig.language_adjust`): the trees read the
    language from more than the words (the share of non-ASCII letters, topics near zero for a German
    text), and a lean that is not in the training weights is in nothing they read.
    """
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"language balance {power} is not between 0 and 1")
    if not (len(weights) == len(y) == len(languages)):
        raise ValueError(f"{len(weights)} weights, {len(y)} labels and {len(languages)} languages")
    out = weights.astype(np.float64, copy=True)
    is_ham = y == ham
    if power == 0.0 or not is_ham.any():
        return out
    lean = leans(weights, y, languages, ham)
    for klass in np.unique(y[~is_ham]):
        in_class = y == klass
        total = float(weights[in_class].sum())
        shrunk = np.zeros(len(y), dtype=np.bool_)
        kept_share = 1.0
        for lang in np.unique(languages[in_class]):
            r = lean.get((int(klass), LANGUAGES[lang]), 0.0) if lang >= 0 else 0.0
            if r <= 1.0:
                continue
            rows = in_class & (languages == lang)
            share = float(weights[rows].sum()) / total
            target = share * r**-power
            out[rows] *= target / share
            shrunk |= rows
            kept_share -= target
        rest = in_class & ~shrunk
        if not redistribute:
            continue
        if shrunk.any() and rest.any():
            out[rest] *= kept_share * total / float(weights[rest].sum())
        elif shrunk.any():  # every row of the class leans: scale them all back to the class's total
            out[in_class] *= total / float(out[in_class].sum())
    return out
