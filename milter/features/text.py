"""Body text: shape statistics, payment / urgency language, and hashed word uni- and bigrams.

Tokens are hashed with CRC-32 (stable across processes, unlike `hash()`) into `HASH_BUCKETS` slots.
Before hashing, digits become '0' (years and dates in the text say which corpus a message came from),
URLs, e-mail addresses and host names are removed (they have their own features, and the corpora's placeholder
addresses would otherwise leak the source), and a short list of corpus identifiers is dropped.
"""

from __future__ import annotations

import itertools
import math
import re
import zlib
from collections import Counter

import numpy as np
import numpy.typing as npt

from milter.features import lexicon
from milter.features.context import Context

HASH_BUCKETS = 1024
MAX_TOKENS = 2000
MAX_TEXT = 12_000  # characters of body text read; the start of a message carries its intent

STAT_NAMES: tuple[str, ...] = (
    "txt_len_log",
    "txt_words_log",
    "txt_upper_ratio",
    "txt_digit_ratio",
    "txt_nonascii_ratio",
    "txt_excl",
    "txt_currency",
    "txt_distinct_ratio",
    "txt_avg_word_len",
    "txt_lines_log",
    "txt_empty",
    "txt_replacement_chars",
)
LANG_NAMES: tuple[str, ...] = tuple(f"lang_{name}" for name in lexicon.LANGUAGE)
HASH_NAMES: tuple[str, ...] = tuple(f"tok_{i:04d}" for i in range(HASH_BUCKETS))
# The text stage's wide vocabulary (milter/stacking.py): the message's first GRAM_SLOTS distinct uni- and
# bigrams, each as its hashed id in 1..GRAM_SPACE (0: an empty slot). In 1,024 shared buckets each word
# shares its column with thousands of others; 2^18 ids share 256 times less (the training corpora's 9.8
# million gram occurrences fall on all but 0.2 % of them, so ids still collide). The ids travel inside
# the feature vector (as float32, exact below 2^24) so the gateway, the store and the training cache carry
# one vector as before; the trees never read these columns (training/model.py hides them), only the
# stage. 512 slots hold all of a median message (170 distinct grams) and the start of a long newsletter.
GRAM_SPACE = 1 << 18
GRAM_SLOTS = 512
GRAM_NAMES: tuple[str, ...] = tuple(f"gram_{i:03d}" for i in range(GRAM_SLOTS))

# Words that name the corpora or their collectors rather than saying anything about a message.
CORPUS_STOPWORDS = frozenset(
    {
        "enron",
        "ect",
        "hou",
        "ees",
        "enronxgate",
        "corp",
        "vince",
        "kaminski",
        "sbeck",
        "thyme",
        "lokay",
        "farmer",
        "kitchen",
        "williams",
        "taint",
        "sourceforge",
        "spamassassin",
        "phishing",
        "pot",
        "lfdr",
        "jailhouse",
        "openwrt",
        "samba",
        "iscsi",
        "usrp",
        "ettus",
        "ksummit",
        "cip",
        "javamail",
        "evans",
        # the 2025-26 corpora's anonymisers and redaction tools (../shared/corpora/README.md, "Traps")
        "redacted",
        "baddomain",
    }
)

_TOKEN = re.compile(r"[^\W_]{2,24}|0")
# Characters a reader never sees (Unicode's default-ignorable code points: format characters such as the
# zero-width space and joiners, the soft hyphen, bidi marks, variation selectors, tag characters, Hangul
# fillers). Inside a word they split it into tokens ("gi\u200bft card" read as "gi ft card") and hid a
# gift-card BEC's phrases from the language counts; words() drops them first, so the words are the ones
# shown. The text statistics still count them (txt_nonascii_ratio): padding with them is a signal.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)
_UPPER = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LOWER = b"abcdefghijklmnopqrstuvwxyz"
_DIGITS = re.compile(r"\d+")
# Host names in running text (bounces quote "neko.example.jp", footers "example.com"): URL features cover
# them, and as tokens they name the corpora's placeholder hosts instead of saying anything.
# Only ever asked whether a word holds one: `[a-z0-9-]\.(?:[a-z0-9-]+\.)*[a-z]{2,}\b` matches somewhere
# exactly when its last label does with the character and dot before it, so the middle labels are not
# matched. They made it quadratic: in one word "a.a.a..." every start took and gave back all the labels
# after it (1.5 s a message at MAX_TEXT).
_HOSTNAME = re.compile(r"(?i)[a-z0-9-]\.[a-z]{2,}\b")


def stat_features(ctx: Context) -> list[float]:
    # trailing blank lines and spaces are never seen: appended by the thousand they moved five of these
    body = ctx.body_text.rstrip()
    text = body[:MAX_TEXT]
    if not text.strip():
        return [0.0] * (len(STAT_NAMES) - 2) + [1.0, 0.0]
    words = text.split()
    # counting through bytes.translate runs in C; a per-character generator costs milliseconds here
    data = text.encode("utf-8", "replace")
    ascii_only = text.encode("ascii", "ignore")
    upper = len(ascii_only) - len(ascii_only.translate(None, _UPPER))
    letters = upper + len(ascii_only) - len(ascii_only.translate(None, _LOWER))
    digits = len(ascii_only) - len(ascii_only.translate(None, b"0123456789"))
    n = len(text)
    return [
        math.log1p(len(body)),
        math.log1p(len(words)),
        upper / letters if letters else 0.0,
        digits / n,
        (n - len(ascii_only)) / n,
        float(text.count("!")),
        float(sum(text.count(c) for c in "$€£¥₹")),
        len(set(words)) / len(words) if words else 0.0,
        (len(data) - data.count(b" ")) / len(words) if words else 0.0,
        math.log1p(text.count("\n")),
        0.0,
        float(text.count("\ufffd")),
    ]


def phrase_counts(toks: list[str]) -> dict[str, int]:
    """How many of each lexicon group's phrases occur in `toks`."""
    counts = dict.fromkeys(lexicon.LANGUAGE, 0)
    for i, tok in enumerate(toks):
        for n in _FIRST_WORDS.get(tok, ()):
            group = _PHRASES.get(tuple(toks[i : i + n]))
            if group is not None:
                counts[group] += 1
    return counts


def language_features(ctx: Context, toks: list[str]) -> tuple[list[float], list[str]]:
    counts = phrase_counts(toks)
    signals = []
    if counts["giftcard"] and (counts["availability"] or counts["urgency"] or counts["secrecy"]):
        signals.append("asks for gift cards with urgency or secrecy")
    if counts["bank_change"]:
        signals.append("mentions changed bank or payroll details")
    if counts["payment"] and counts["urgency"] and counts["secrecy"]:
        signals.append("payment request with urgency and secrecy")
    if counts["credentials"] >= 2 and ctx.links and _prose_count(ctx, "credentials") >= 2:
        signals.append("asks to log in or verify an account through a link")
    return [math.log1p(c) for c in counts.values()], signals


#: Words joined by "-" or "_" ("login-action", "auto-login-action", "verify_boot_image"): the name of
#: a test case, a job or a file, and no one is asked to log in by it. A join that is itself a phrase of
#: the lexicon ("sign-in", "log-in") is how people write the request, and stays. The lookbehind and the
#: possessive parts keep it linear on a long run of letters (hostile mail): a match can only start
#: where a word starts, and a part is never given back.
_JOINED = re.compile(r"(?<![^\W_])[^\W_]++(?:[-_][^\W_]++)+")
_JOIN_MARK = re.compile(r"[-_]")


def _unjoin(match: re.Match[str]) -> str:
    spaced = _JOIN_MARK.sub(" ", match.group(0))
    return spaced if tuple(_TOKEN.findall(_DIGITS.sub("0", spaced.lower()))) in _PHRASES else " "


def _prose_count(ctx: Context, group: str) -> int:
    """How often `group`'s phrases occur in subject and body outside names joined by "-" or "_".

    For the reasons shown to admins only, never a feature (the lang_* counts keep every token, so
    the model and its training data are unchanged): an automated test report that lists
    `login-action` and a `validate` step beside its log link was explained as asking to log in."""
    text = (ctx.parsed.subject + "\n" + ctx.body_text)[:MAX_TEXT]
    return phrase_counts(words(_JOINED.sub(_unjoin, text)))[group]


def words(text: str) -> list[str]:
    """Lower-cased word tokens with digit runs as "0"; URLs and addresses removed; characters no reader
    sees dropped first (`_INVISIBLE`)."""
    kept = " ".join(
        w
        for w in _INVISIBLE.sub("", text[:MAX_TEXT]).split()
        # a host name holds a dot: most words are spared the regex (0.223 -> 0.182 ms a message)
        if "@" not in w and "://" not in w and not w.startswith(("www.", "<www."))
        and ("." not in w or not _HOSTNAME.search(w))
    )
    return _TOKEN.findall(_DIGITS.sub("0", kept.lower()))


def tokens(text: str) -> list[str]:
    """The unigrams the hasher sees (bigrams are joined pairs of these)."""
    return [t for t in words(text) if t not in CORPUS_STOPWORDS]


def bucket(token: str) -> int:
    return zlib.crc32(token.encode("utf-8", "replace")) % HASH_BUCKETS


def hashed_grams(toks: list[str]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """(the HASH_BUCKETS columns, the GRAM_SLOTS gram ids) of a token list, from one pass: each distinct
    uni- and bigram is joined and hashed once (CRC-32) for both."""
    pairs = list(map(" ".join, itertools.pairwise(toks)))
    # reading order: each unigram, then the bigram it starts; a Counter keeps first-seen order
    grams = Counter(itertools.chain.from_iterable(zip(toks, pairs, strict=False)))  # pairs: one fewer
    grams.update(toks[len(pairs) :])  # the last token starts no bigram
    crc = np.fromiter((zlib.crc32(g.encode("utf-8", "replace")) for g in grams), np.int64, len(grams))
    # numpy does the per-bucket sums and the log scaling: a long newsletter must not drown the tree
    # splits in raw counts
    counts = np.bincount(crc % HASH_BUCKETS, weights=np.fromiter(grams.values(), np.float64, len(grams)),
                         minlength=HASH_BUCKETS)
    ids = crc % GRAM_SPACE + 1
    _, first = np.unique(ids, return_index=True)  # two grams may share an id: keep it once, where first seen
    slots = np.zeros(GRAM_SLOTS, dtype=np.float32)
    kept = ids[np.sort(first)[:GRAM_SLOTS]]
    slots[: len(kept)] = kept
    return np.log1p(counts).astype(np.float32), slots


def hash_features(toks: list[str]) -> npt.NDArray[np.float32]:
    return hashed_grams(toks)[0]


def gram_ids(toks: list[str]) -> npt.NDArray[np.float32]:
    """The first GRAM_SLOTS distinct gram ids in reading order (each unigram, then the bigram it starts),
    zero-padded: a set, so a word repeated a hundred times counts once, and long mail keeps its start."""
    return hashed_grams(toks)[1]


def gram_id(gram: str) -> int:
    return zlib.crc32(gram.encode("utf-8", "replace")) % GRAM_SPACE + 1


def bucket_grams(text: str, limit: int = 3) -> dict[str, tuple[str, ...]]:
    """For explanations: each nonzero hashed column (`tok_0123`) -> the grams of `text` that fell in it,
    commonest first (ties: first seen), at most `limit`. `text` is what `text_features` reads (subject,
    newline, body text), tokenised and counted exactly as there."""
    toks = [t for t in words(text)[:MAX_TOKENS] if t not in CORPUS_STOPWORDS]
    seen: list[str] = []  # in reading order: each unigram, then the bigram it starts
    for i, tok in enumerate(toks):
        seen.append(tok)
        if i + 1 < len(toks):
            seen.append(f"{tok} {toks[i + 1]}")
    by_bucket: dict[int, list[str]] = {}
    for gram, _ in Counter(seen).most_common():  # a stable sort: equal counts stay in first-seen order
        by_bucket.setdefault(bucket(gram), []).append(gram)
    return {HASH_NAMES[b]: tuple(grams[: max(limit, 0)]) for b, grams in sorted(by_bucket.items())}


def text_features(ctx: Context) -> tuple[list[float] | npt.NDArray[np.float32], list[str]]:
    """Language counts and hashed n-grams share one tokenisation of subject + body."""
    all_words = words(ctx.parsed.subject + "\n" + ctx.body_text)
    lang, signals = language_features(ctx, all_words)
    toks = [t for t in all_words[:MAX_TOKENS] if t not in CORPUS_STOPWORDS]
    buckets, ids = hashed_grams(toks)
    return np.concatenate([np.asarray(lang, dtype=np.float32), buckets, ids]), signals


def _phrase_tables() -> tuple[dict[tuple[str, ...], str], dict[str, tuple[int, ...]]]:
    phrases: dict[tuple[str, ...], str] = {}
    for group, items in lexicon.LANGUAGE.items():
        for phrase in items:
            phrases[tuple(_TOKEN.findall(_DIGITS.sub("0", phrase)))] = group
    first: dict[str, set[int]] = {}
    for key in phrases:
        first.setdefault(key[0], set()).add(len(key))
    return phrases, {w: tuple(sorted(ns)) for w, ns in first.items()}


_PHRASES, _FIRST_WORDS = _phrase_tables()
