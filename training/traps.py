"""Corpus traps the features cannot neutralise themselves: columns hidden from training, per corpus.

Most traps of ../shared/corpora/README.md are neutralised where the bytes are read, so serving and
training see the same thing: line endings and defanged links in `milter.parse.normalise`, the cw-l
``MM-DD-YYYY`` dates in `milter.features.headers`, placeholder hosts and the anonymisers' words in
`milter.features.text`; receiving-side headers are never read at all. What is left is a corpus whose
*sender's* own facts were rewritten: a column there describes the publisher's anonymiser, not the
sender, and the model must not learn from it. Those values become NaN in the training rows of that
corpus only. LightGBM then learns every split of the column from the other corpora's rows (missing
values take no part in choosing a threshold), while validation and test rows keep their real values,
so the thresholds and metrics see what the gateway will see.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

#: corpus -> (columns hidden in its training rows, why). Column names must exist in the schema.
HIDDEN: Mapping[str, tuple[tuple[str, ...], str]] = {
    "sisimai-bounces": (
        (
            "id_local_len",
            "id_local_digits_ratio",
            "id_local_random",
            "id_domain_len",
            "id_domain_hyphens",
            "id_domain_digits",
            "id_subdomain_depth",
            "id_suspicious_tld",
            "hdr_msgid_domain_mismatch",
            "url_from_domain_share",
            "snd_dkim_aligned",
            "snd_links_related_share",
            "snd_links_unrelated_log",
            "snd_display_names_domain",
            "snd_text_names_domain",
        ),
        "addresses and hosts replaced by placeholders (example.jp, neko.example.jp, xxxx.xxxx.net)",
    ),
    "cw-l-spam": (
        ("hdr_to_missing", "hdr_to_count_log", "hdr_to_undisclosed", "hdr_rcpt_many"),
        "every recipient rewritten to one redacted@redacted.com",
    ),
}


#: (corpus, label) whose machine-generated reports (DSN bounces, auto-replies: `snd_auto_report`) are
#: label noise: Enron-Spam's SH spam holds backscatter that sisimai-bounces, rightly, calls ham. Kept,
#: the two corpora teach opposite answers for the same kind of message; such rows are dropped.
NOISY_REPORTS = (("enron-spam-raw", "spam"),)


def label_noise(
    corpora: Sequence[str], labels: Sequence[str], auto_report: npt.NDArray[np.float32]
) -> npt.NDArray[np.bool_]:
    """Rows to drop: a machine-generated report in a (corpus, label) listed in NOISY_REPORTS."""
    listed = np.array([(c, lab) in NOISY_REPORTS for c, lab in zip(corpora, labels, strict=True)], dtype=bool)
    noisy: npt.NDArray[np.bool_] = listed & (auto_report > 0)
    return noisy


def hide_artefacts(
    X: npt.NDArray[np.float32],
    corpora: Sequence[str],
    names: Sequence[str],
    hidden: Mapping[str, tuple[tuple[str, ...], str]] = HIDDEN,
) -> npt.NDArray[np.float32]:
    """A copy of the training rows X (row i from corpus corpora[i]) with each corpus's hidden columns NaN.

    A name the schema lacks raises KeyError: a renamed feature must not silently end the hiding."""
    out = np.array(X, dtype=np.float32, copy=True)
    index = {n: i for i, n in enumerate(names)}
    corpus_of = np.asarray(corpora, dtype=object)
    for corpus, (columns, _why) in hidden.items():
        rows = np.flatnonzero(corpus_of == corpus)
        if rows.size:
            cols = np.array([index[c] for c in columns], dtype=np.intp)
            out[np.ix_(rows, cols)] = np.nan
    return out
