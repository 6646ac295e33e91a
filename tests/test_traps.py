"""Corpus traps (../shared/corpora/README.md): no feature may tell the corpora apart by their artefacts.

Each neutraliser is proven the strong way: the whole feature vector, hence any model's score, is the
same with and without the artefact. Columns that only hiding can protect (training/traps.py) are proven
on a model trained where the artefact alone would separate the classes.
"""

from __future__ import annotations

import numpy as np
import pytest

from milter.features import SCHEMA, extract
from milter.features.text import tokens
from training import model as mdl
from training.corpora import Message
from training.dataset import TEST, TRAIN, VAL, sender_key, sender_split
from training.traps import HIDDEN, hide_artefacts

BASE = """From: "Shop Team" <news@shop.example>
To: bob@company.example
Subject: Your order has shipped
Date: Wed, 15 Apr 2026 23:35:48 +0000
Message-ID: <a1@shop.example>
MIME-Version: 1.0
Content-Type: text/html; charset=utf-8

<html><body><p>Hello Bob, your order 1234 is on its way.</p>
<p><a href="{link}">Track it</a> or visit {plain}</p>
<p>Call 212-555-0199. Sent to {rcpt}. Unsubscribe any time.</p></body></html>
"""


def vector(text: str) -> np.ndarray:
    return extract(text.encode()).vector


def fill(**kw: str) -> str:
    values = {"link": "https://track.shop.example/p/1", "plain": "https://shop.example/help"}
    values["rcpt"] = "anna@mycompany.com"
    values.update(kw)
    return BASE.format(**values)


def test_defanged_links_read_as_the_links_they_are() -> None:
    fanged = vector(fill(link="https://evil.example.net/login", plain="https://evil.example.net/x"))
    defanged = vector(
        fill(link="hxxps://evil[.]example[.]net/login", plain="hxxps[:]//evil[.]example(.)net/x")
    )
    np.testing.assert_array_equal(fanged, defanged)
    assert defanged[SCHEMA.names.index("url_count_log")] > 0  # the link is seen, not dropped


def test_redacted_date_syntax_reads_as_a_date() -> None:
    real = fill()
    redacted = real.replace("Date: Wed, 15 Apr 2026 23:35:48 +0000", "Date: 04-15-2026")
    assert redacted != real
    np.testing.assert_array_equal(vector(real), vector(redacted))
    # a date no program writes in any form still counts as unparseable
    broken = real.replace("Date: Wed, 15 Apr 2026 23:35:48 +0000", "Date: yesterday-ish")
    assert vector(broken)[SCHEMA.names.index("hdr_date_unparseable")] == 1.0


@pytest.mark.parametrize(
    ("artefact", "plain"),
    [
        ("To: redacted@redacted.com", "To: bob@company.example"),  # cw-l's recipient
        ("To: user@example.com", "To: bob@company.example"),  # foff's anonymised local parts
    ],
)
def test_rewritten_recipients_do_not_change_features(artefact: str, plain: str) -> None:
    real = fill()
    np.testing.assert_array_equal(vector(real), vector(real.replace(plain, artefact)))


def test_anonymiser_words_phones_and_placeholder_hosts_are_no_tokens() -> None:
    a = "Sent to user@baddomain.com by neko.example.jp, call 555-123-4567 [redacted]"
    b = "Sent to jane@company.example by mx.mail-host.net, call 212-555-0199"
    assert tokens(a) == tokens(b)
    # and in a whole message: the foff owner's domain and phone placeholders change nothing
    real = fill()
    anon = real.replace("212-555-0199", "555-123-4567").replace("anna@mycompany.com", "user@baddomain.com")
    assert anon != real
    np.testing.assert_array_equal(vector(real), vector(anon))


def test_hidden_columns_are_nan_only_in_their_corpus_rows() -> None:
    names = SCHEMA.names
    X = np.ones((4, len(names)), dtype=np.float32)
    out = hide_artefacts(X, ["sisimai-bounces", "enron-spam-raw", "cw-l-spam", "sisimai-bounces"], names)
    assert X.all() and np.isfinite(X).all()  # the input is not modified
    for row, corpus in ((0, "sisimai-bounces"), (2, "cw-l-spam"), (3, "sisimai-bounces")):
        hidden = {names.index(c) for c in HIDDEN[corpus][0]}
        assert {int(j) for j in np.flatnonzero(np.isnan(out[row]))} == hidden
    assert np.isfinite(out[1]).all()
    with pytest.raises(KeyError):
        hide_artefacts(X[:, :3], ["sisimai-bounces"] * 4, names[:3])


def test_a_hidden_artefact_cannot_move_the_score() -> None:
    """An artefact that alone separates one corpus's ham from spam: visible, the model uses it; hidden
    in that corpus's rows, its predictions do not depend on it."""
    rng = np.random.default_rng(3)
    n = 600
    signal = rng.normal(size=n).astype(np.float32)
    y = (signal + rng.normal(scale=0.8, size=n) > 0).astype(np.int64)  # ham 0 / spam 1, noisy
    artefact = np.zeros(n, dtype=np.float32)
    placeholder_ham = (y == 0) & (np.arange(n) % 3 == 0)  # a third of the ham: the placeholder corpus
    artefact[placeholder_ham] = 1.0
    X = np.stack([signal, artefact], axis=1)
    corpora = ["placeholders" if p else "real" for p in placeholder_ham]
    hidden = {"placeholders": (("signal", "artefact")[1:], "test")}
    cfg = mdl.FitConfig(max_rounds=60, early_stopping=60, min_data_in_leaf=10)
    w = np.ones(n)
    probe = np.stack([np.linspace(-2, 2, 41, dtype=np.float32), np.zeros(41, np.float32)], axis=1)
    probe_art = probe.copy()
    probe_art[:, 1] = 1.0

    def fit(Xt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        booster = mdl.fit(Xt, y, w, X, y, w, ("signal", "artefact"), cfg)
        return mdl.predict(booster, probe), mdl.predict(booster, probe_art)

    seen, seen_art = fit(X)
    assert np.abs(seen - seen_art).max() > 0.05  # visible, the artefact moves the score
    masked, masked_art = fit(hide_artefacts(X, corpora, ("signal", "artefact"), hidden))
    np.testing.assert_array_equal(masked, masked_art)


def _msg(i: int, sender: str, corpus: str = "c", label: str = "ham") -> Message:
    return Message(corpus, corpus, label, 0, f"{i:064x}", None, i, None, sender)  # type: ignore[arg-type]


def test_sender_split_keeps_every_sender_on_one_side() -> None:
    msgs = [_msg(i, f"u{i % 7}@d{i % 40}.example") for i in range(800)]
    msgs += [_msg(800 + i, f"person{i}@gmail.com") for i in range(100)]  # free-mail: by address
    msgs += [_msg(900 + i, f"staff{i % 50}@bigcorp.example", "own") for i in range(300)]  # dominant
    msgs += [_msg(1200 + i, "") for i in range(50)]  # no sender: each message alone
    split = sender_split(msgs)
    sides: dict[str, set[int]] = {}
    for m, s in zip(msgs, split.tolist(), strict=True):
        sides.setdefault(sender_key(m, frozenset({("own", "ham", "bigcorp.example")})), set()).add(s)
    assert all(len(v) == 1 for v in sides.values())
    assert {k.split(":")[0] for k in sides} == {"domain", "address", "message"}
    shares = [float((split == k).mean()) for k in (TRAIN, VAL, TEST)]
    assert 0.55 < shares[0] < 0.85 and 0.03 < shares[1] < 0.2 and 0.1 < shares[2] < 0.32
    np.testing.assert_array_equal(split, sender_split(list(reversed(msgs)))[::-1])  # order-free
    bigcorp = {s for m, s in zip(msgs, split.tolist(), strict=True) if m.corpus == "own"}
    assert len(bigcorp) == 3  # a corpus's own domain is spread over the sides by address


def test_a_list_copy_says_nothing_about_unsubscribing() -> None:
    """A mailing list manager adds List-Unsubscribe, Precedence: list and an unsubscribe footer to every
    copy; in the corpora every list message is ham, so none of that may read as the author's."""
    real = fill().replace("Unsubscribe any time.", "Unsubscribe at https://lists.example.org/u.")
    listed = "List-Id: <dev.lists.example.org>\n" + real
    managed = (
        "List-Id: <dev.lists.example.org>\nList-Unsubscribe: <https://lists.example.org/u>\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\nPrecedence: list\n" + real
    )
    np.testing.assert_array_equal(vector(listed), vector(managed))
    for name in ("snd_unsubscribe_header", "snd_footer_unsubscribe"):
        assert vector(listed)[SCHEMA.names.index(name)] == 0.0
    # the same headers from the author (no List-Id) are the sender's own evidence
    own = vector(managed.replace("List-Id: <dev.lists.example.org>\n", ""))
    assert own[SCHEMA.names.index("snd_oneclick_unsub")] == 1.0
    assert own[SCHEMA.names.index("snd_footer_unsubscribe")] == 1.0


def test_a_salted_sender_split_draws_other_senders_and_still_keeps_each_on_one_side() -> None:
    msgs = [_msg(i, f"u{i % 7}@d{i % 40}.example") for i in range(800)]
    msgs += [_msg(800 + i, f"person{i}@gmail.com") for i in range(100)]
    default = sender_split(msgs)
    np.testing.assert_array_equal(default, sender_split(msgs, salt=""))  # no salt: the shipped split
    salted = sender_split(msgs, salt="b2")
    assert (salted != default).mean() > 0.2  # other senders in test ...
    np.testing.assert_array_equal(salted, sender_split(msgs, salt="b2"))  # ... the same ones every run
    sides: dict[str, set[int]] = {}
    for m, s in zip(msgs, salted.tolist(), strict=True):
        sides.setdefault(sender_key(m, frozenset()), set()).add(s)
    assert all(len(v) == 1 for v in sides.values())
    shares = [float((salted == k).mean()) for k in (TRAIN, VAL, TEST)]
    assert 0.55 < shares[0] < 0.85 and 0.03 < shares[1] < 0.2 and 0.1 < shares[2] < 0.32
