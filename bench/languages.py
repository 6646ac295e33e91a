#!/usr/bin/env python3
"""A model's figures by the language of the text: the corpora teach the language as a label.

Almost every non-English message in the share is phishing: about 46 % of `phishing-pot` (Portuguese,
Spanish, German, French), against a few dozen of the 30,000 ham. A model can learn "not English ->
phishing" and look good doing it, since the test split holds the same proportions; a German, Brazilian
or French site would pay for it with its own legitimate mail, and an English-speaking one reads a pooled
phishing recall that its own (English) phishing does not reach. This prints, per class and language,
how many messages the model flags (tag threshold or above) and quarantines, so both show.

Rows: the sender-split test rows of `milter-train` (the same corpora, dedupe and split, from the same
feature cache), or with `--corpus` every row of those corpora (for a model trained without them, as
`bench/learning_loop.py` leaves them). The model alone at its own thresholds (the report's figures), not
the policy. The language is py3langid's guess on the subject and the body text (text/plain, else the
HTML's visible text, first 4,000 characters); "none" for fewer than 40 letters; languages with fewer
than 20 rows in the selection are pooled as "other".

Usage: .venv/bin/python bench/languages.py [--model models/current.onnx] [--corpus NAME ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from milter.features.context import Protected, build  # noqa: E402
from milter.parse import parse  # noqa: E402
from milter.types import CLASS_NAMES, Envelope  # noqa: E402
from training import model as mdl  # noqa: E402
from training import train as tr  # noqa: E402
from training.dataset import TEST  # noqa: E402
from training.retrain import thresholds_of  # noqa: E402
from training.thresholds import HAM, decide  # noqa: E402

TEXT_CHARS = 4000
MIN_LETTERS = 40
MIN_ROWS = 20


def language(path: Path) -> str:
    """py3langid's guess for one message, or "none" when there is too little text to tell."""
    import py3langid

    try:
        ctx = build(parse(path.read_bytes()), Envelope(), Protected())
    except Exception:  # a message the parser refuses has no language to report
        return "none"
    text = f"{ctx.parsed.subject}\n{ctx.body_text}"[:TEXT_CHARS]
    if sum(ch.isalpha() for ch in text) < MIN_LETTERS:
        return "none"
    return str(py3langid.classify(text)[0])


def languages(paths: Sequence[Path], processes: int) -> list[str]:
    with ProcessPoolExecutor(processes) as pool:
        return list(pool.map(language, paths, chunksize=64))


def pooled(langs: Sequence[str]) -> list[str]:
    counts = Counter(langs)
    return [lg if counts[lg] >= MIN_ROWS or lg == "none" else "other" for lg in langs]


def table(
    y: npt.NDArray[np.int64],
    langs: Sequence[str],
    flagged: npt.NDArray[np.bool_],
    held: npt.NDArray[np.bool_],
) -> list[str]:
    names = np.asarray(langs)
    order = [lg for lg, _ in Counter(langs).most_common()]
    lines = ["| class | language | n | flagged | quarantined |", "|---|---|---:|---:|---:|"]
    for k, cls in enumerate(CLASS_NAMES):
        for lg in order:
            m = (y == k) & (names == lg)
            if m.any():
                lines.append(
                    f"| {cls} | {lg} | {int(m.sum()):,} | {100 * flagged[m].mean():.1f} % | "
                    f"{100 * held[m].mean():.1f} % |"
                )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / "models" / "current.onnx")
    p.add_argument(
        "--corpus", action="append", default=[], help="every row of this corpus, not the test split"
    )
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the rows' languages and verdicts here")
    args = p.parse_args(argv)

    train_args = tr.parse_args(["--no-progress", "--processes", str(args.processes)])
    features, code_version = tr._features(train_args.features_module)
    ds, _ = tr.load_dataset(train_args, features, code_version)
    if args.corpus:
        rows = np.flatnonzero(np.isin([m.corpus for m in ds.messages], args.corpus))
    else:
        rows = ds.rows(TEST)
    meta = json.loads(args.model.with_suffix(".json").read_text())
    probs, _ = mdl.onnx_outputs(args.model.read_bytes(), ds.X[rows])
    t = thresholds_of(meta["thresholds"])
    flagged = decide(probs, t.spam_tag, t.bec_tag) != HAM
    held = decide(probs, t.spam_quarantine, t.bec_quarantine) != HAM
    langs = pooled(languages([ds.messages[i].path for i in rows], args.processes))
    y = ds.y[rows]
    what = ", ".join(args.corpus) if args.corpus else "the sender-split test rows"
    print(f"{meta['name']} on {what} ({len(rows):,} messages), the model at its own thresholds:")
    print("\n".join(table(y, langs, flagged, held)))
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        "sha256": ds.messages[i].sha256,
                        "corpus": ds.messages[i].corpus,
                        "class": CLASS_NAMES[k],
                        "language": lg,
                        "flagged": bool(f),
                        "quarantined": bool(h),
                    }
                    for i, k, lg, f, h in zip(rows, y.tolist(), langs, flagged, held, strict=True)
                ]
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
