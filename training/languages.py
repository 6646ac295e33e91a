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
