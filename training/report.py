"""The human-readable training report: reports/<model name>/report.md, metrics.json and curve PNGs."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from milter.types import CLASS_NAMES
from training.evaluate import MODERN_SPAM, Metrics, acceptance
from training.thresholds import BEC, HAM, Probs, Thresholds, bec_score, spam_score

# Feature names that would mean the model can tell *where* a message was collected rather than what it
# is (see ../shared/corpora/README.md, "Traps"). The schema should contain none of them.
_CORPUS_MARKERS = re.compile(
    r"enron|lfdr|phish(ing)?_?pot|spamassassin|taint|sourceforge|received|x_ms_exchange|forefront|"
    r"authentication_results|x_gmail|gm_thrid|crlf|line_ending|list_id|list_|date_year|year|x_mailer|user_agent",
    re.IGNORECASE,
)


# Tokens that name a corpus, its collectors or its placeholders; seen in a top hashed bucket they mean
# the bucket may be learning the source (the features module should already drop most of them).
_CORPUS_TOKENS = frozenset(
    {
        "enron",
        "ect",
        "hou",
        "ees",
        "lfdr",
        "taint",
        "sourceforge",
        "spamassassin",
        "phishing",
        "pot",
        "ettus",
        "usrp",
        "samba",
        "openwrt",
        "jailhouse",
        "iscsi",
        "ksummit",
        "cip",
        "exmh",
        "zzzz",
        "razor",
        "kaminski",
        "vince",
        "actblue",
        "gmail",
        "javamail",
        "redacted",
        "baddomain",
        "neko",
        "juliett",
    }
)


def corpus_identifier_flags(
    names: Sequence[str], bucket_tokens: Mapping[str, Sequence[str]] | None = None
) -> list[str]:
    """Feature names that look like corpus identifiers, or hashed buckets whose top tokens are ones."""
    tokens = bucket_tokens or {}
    return [
        n
        for n in names
        if _CORPUS_MARKERS.search(n) or any(w in _CORPUS_TOKENS for t in tokens.get(n, ()) for w in t.split())
    ]


def top_features(names: Sequence[str], gain: npt.NDArray[np.float64], k: int) -> list[tuple[str, float]]:
    total = float(gain.sum()) or 1.0
    order = np.argsort(-gain, kind="stable")[:k]
    return [(names[i], float(gain[i]) / total) for i in order if gain[i] > 0]


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def _metrics_table(slices: Mapping[str, Metrics]) -> list[str]:
    lines = [
        "| slice | n | ham FPR | spam recall | bec recall | bec→bec | confusion (rows: true h/s/b) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for key, m in slices.items():
        conf = " / ".join(",".join(str(v) for v in row) for row in m.confusion)
        lines.append(
            f"| {key} | {m.n} | {_fmt(m.ham_fpr)} | {_fmt(m.spam_recall)} | {_fmt(m.bec_recall)} | "
            f"{_fmt(m.bec_exact_recall)} | {conf} |"
        )
    return lines


def plot_curves(probs: Probs, y: npt.NDArray[np.int64], out_dir: Path) -> list[str]:
    """PR and ROC curves for "not ham vs ham" and "bec vs rest"; returns the PNG file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    tasks = [("not-ham vs ham", y != HAM, spam_score(probs)), ("bec vs rest", y == BEC, bec_score(probs))]
    files: list[str] = []
    for kind in ("roc", "pr"):
        fig, ax = plt.subplots(figsize=(6, 5))
        for label, truth, score in tasks:
            if truth.all() or not truth.any():
                continue
            if kind == "roc":
                fpr, tpr, _ = roc_curve(truth, score)
                ax.plot(fpr, tpr, label=label)
                ax.set_xscale("log")
                ax.set_xlim(1e-4, 1)
                ax.set_xlabel("false positive rate (log)")
                ax.set_ylabel("true positive rate")
            else:
                prec, rec, _ = precision_recall_curve(truth, score)
                ax.plot(rec, prec, label=label)
                ax.set_xlabel("recall")
                ax.set_ylabel("precision")
        ax.legend(loc="lower right")
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{kind.upper()} on the test split")
        name = f"{kind}.png"
        fig.savefig(out_dir / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        files.append(name)
    return files


@dataclass(frozen=True)
class HardHam:
    """One message of the fixed hardest-ham set (training/hard_ham.tsv) as the new model scores it."""

    sha256: str
    source: str  # corpus/relative path
    split: str  # train / validation / test: a train row's score is in-sample
    spam_score: float
    action: str  # accept / tag / quarantine at the new thresholds
    then: str  # what the reference model did


HARD_HAM_FILE = Path(__file__).with_name("hard_ham.tsv")


def load_hard_ham(path: Path = HARD_HAM_FILE) -> dict[str, tuple[str, str]]:
    """sha256 -> (corpus/relative path, what the reference model did)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or line.startswith("sha256\t") or not line.strip():
            continue
        sha, corpus, rel, then, _ = line.split("\t")
        out[sha] = (f"{corpus}/{rel}", then)
    return out


def production_rows(
    results: Mapping[str, Mapping[str, Mapping[str, Metrics]]],
) -> list[tuple[str, int, float | None, float | None]]:
    """(group, n, flagged = not accepted at the tag level, quarantined) for the groups an admin asks
    about: modern ham, all ham, spam pooled and per modern source, phishing."""
    tag, quar = results["tag"], results["quarantine"]
    rows: list[tuple[str, int, float | None, float | None]] = []
    for group in ("modern ham", "old ham"):
        if group in tag["group"]:
            m_t, m_q = tag["group"][group], quar["group"][group]
            rows.append((group, m_t.n, m_t.ham_fpr, m_q.ham_fpr))
    all_t, all_q = tag["corpus"]["ALL"], quar["corpus"]["ALL"]
    rows.append(("all ham", sum(all_t.confusion[HAM]), all_t.ham_fpr, all_q.ham_fpr))
    rows.append(("spam, pooled", sum(all_t.confusion[1]), all_t.spam_recall, all_q.spam_recall))
    for corpus in MODERN_SPAM:
        if corpus in tag["corpus"] and tag["corpus"][corpus].spam_recall is not None:
            m_t, m_q = tag["corpus"][corpus], quar["corpus"][corpus]
            rows.append((f"spam, {corpus}", sum(m_t.confusion[1]), m_t.spam_recall, m_q.spam_recall))
    rows.append(("phishing (bec), pooled", sum(all_t.confusion[BEC]), all_t.bec_recall, all_q.bec_recall))
    return rows


def production_lines(results: Mapping[str, Mapping[str, Mapping[str, Metrics]]]) -> list[str]:
    lines = [
        "| group | n | flagged (tag level or worse) | quarantined |",
        "|---|---:|---:|---:|",
    ]
    for group, n, flagged, quarantined in production_rows(results):
        lines.append(f"| {group} | {n} | {_fmt(flagged)} | {_fmt(quarantined)} |")
    return lines


def hard_ham_lines(hard: Sequence[HardHam]) -> list[str]:
    if not hard:
        return ["None of the set is in this training data."]
    flagged = sum(h.action != "accept" for h in hard)
    held = sum(h.action == "quarantine" for h in hard)
    out_of_sample = [h for h in hard if h.split != "train"]
    lines = [
        f"{len(hard)} messages: {flagged} flagged, {held} quarantined "
        f"({sum(h.action != 'accept' for h in out_of_sample)} and "
        f"{sum(h.action == 'quarantine' for h in out_of_sample)} of the {len(out_of_sample)} "
        "not trained on).",
        "",
        "| message | split | spam score | now | reference model |",
        "|---|---|---:|---|---|",
    ]
    for h in sorted(hard, key=lambda h: -h.spam_score):
        lines.append(f"| {h.source} | {h.split} | {h.spam_score:.4f} | {h.action} | {h.then} |")
    return lines


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(
    out_dir: Path,
    metadata: Mapping[str, Any],
    results: Mapping[str, Mapping[str, Mapping[str, Metrics]]],
    thresholds: Thresholds,
    probs: Probs,
    y: npt.NDArray[np.int64],
    features: Sequence[tuple[str, float]],
    bucket_tokens: Mapping[str, Sequence[str]] | None,
    hard_ham: Sequence[HardHam] = (),
) -> Path:
    """Write report.md, metrics.json and the curves; returns the report path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = plot_curves(probs, y, out_dir)
    metrics_json = {
        level: {kind: {k: m.as_dict() for k, m in sl.items()} for kind, sl in by.items()}
        for level, by in results.items()
    }
    write_atomic(out_dir / "metrics.json", json.dumps(metrics_json, indent=2, sort_keys=True) + "\n")

    flags = set(corpus_identifier_flags([n for n, _ in features], bucket_tokens))
    lines = [f"# Training report: {metadata['name']}", ""]
    lines += [
        f"- schema {metadata['schema']['version']} ({metadata['schema']['digest'][:16]})",
        f"- data manifest digest {metadata['training_data']['manifest_digest'][:16]}, "
        f"rows per split {metadata['training_data']['rows']}",
        f"- excluded corpora: {metadata['training_data']['excluded_corpora'] or 'none'}",
        f"- thresholds: `{json.dumps(thresholds.as_dict())}`",
        "  (spam score = P(spam)+P(bec), bec score = P(bec))",
        f"- ONNX vs LightGBM max |diff| on test rows: {metadata['export']['max_abs_diff']:.3g}",
        "",
    ]
    per_corpus_cuts = metadata["threshold_selection"].get("per_corpus", {})
    if per_corpus_cuts:
        lines += ["## Per-corpus thresholds (validation and out-of-fold training rows)", ""]
        lines += ["| score | level | " + " | ".join(sorted(per_corpus_cuts["spam"]["tag"])) + " |"]
        lines += ["|---|---|" + "---:|" * len(per_corpus_cuts["spam"]["tag"])]
        for kind, levels in per_corpus_cuts.items():
            for level, cuts in levels.items():
                lines.append(
                    f"| {kind} | {level} | " + " | ".join(f"{cuts[c]:.4f}" for c in sorted(cuts)) + " |"
                )
        lines.append("")
    lines += [
        f"## Production question ({metadata['training_data']['split']}; test split)",
        "",
        *production_lines(results),
        "",
        "## The hardest ham (fixed set, training/hard_ham.tsv)",
        "",
        *hard_ham_lines(hard_ham),
        "",
    ]
    lines += ["## Acceptance (quarantine level, test split, per corpus)", ""]
    lines += ["| corpus | metric | value | target | ok | n |", "|---|---|---:|---:|---|---:|"]
    per_corpus = {k: v for k, v in results["quarantine"]["corpus"].items() if k != "ALL"}
    for corpus, name, value, target, ok in acceptance(per_corpus):
        n = sum(per_corpus[corpus].confusion[{"ham_fpr": 0, "spam_recall": 1, "bec_recall": 2}[name]])
        lines.append(f"| {corpus} | {name} | {_fmt(value)} | {target} | {'yes' if ok else '**NO**'} | {n} |")
    for level in ("quarantine", "tag"):
        for kind in ("corpus", "subcollection"):
            lines += ["", f"## {level} level, per {kind}", "", *_metrics_table(results[level][kind])]
    lines += ["", "## Curves", ""] + [f"![{p}]({p})" for p in pngs]
    lines += ["", "## Top features by gain", "", "| # | feature | gain share | flag |", "|---:|---|---:|---|"]
    for i, (name, share) in enumerate(features, 1):
        extra = ", ".join(bucket_tokens.get(name, ())) if bucket_tokens else ""
        flag = "**looks like a corpus identifier**" if name in flags else ""
        lines.append(f"| {i} | {name}{f' ({extra})' if extra else ''} | {share:.4f} | {flag} |")
    if bucket_tokens is None:
        lines += [
            "",
            "Hashed token buckets not mapped back: the features module exposes no bucket-token map.",
        ]
    lines += ["", f"Class order: {', '.join(CLASS_NAMES)}.", "", str(metadata["licence"]), ""]
    report = out_dir / "report.md"
    write_atomic(report, "\n".join(lines))
    return report
