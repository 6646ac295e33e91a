#!/usr/bin/env python3
"""The nightly learning loop on a source the base model never saw, gate included (issue 11).

`make unseen` refits the model with a source's oldest messages as labels and scores the rest, the model
alone: it says what the labels *could* teach. This runs what a site runs instead:

1. `milter-retrain` on an empty store with the whole source held out of the base corpora
   (`--holdout-sha256`): the champion of a site that has never seen that sender population;
2. the source's K oldest messages (`--label-ham-only`: its K oldest ham) scanned by that champion and
   recorded in a store as the gateway records verdicts, then labelled with their true class as an admin
   would (`Store.set_label`);
3. `milter-retrain` again, gate and all: every fifth label held back, champion against challenger,
   promoted or refused;
4. the rest of the source scored by whichever model is current afterwards: its ham quarantined and
   tagged (the model at its own thresholds; and through the policy, `ScanResult.action`, which adds the
   bulk verdict and the BEC rules; learned senders are not counted here: `make unseen` reports them).

Usage: .venv/bin/python bench/learning_loop.py --source foff-milter-mailbox [--labels 20] [--label-ham-only]
       [--label-subcollection TEXT] [--language-adjust X] [--no-tree-words] [--show-flagged]
       [--train-args "--language-balance 0.5"] [--work DIR] [--max-per-group N]
       (a fit of the full corpora takes a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from milter.config import load_config  # noqa: E402
from milter.features import SCHEMA  # noqa: E402
from milter.scan import Scanner, ScanResult, build_scanner  # noqa: E402
from milter.store import Store  # noqa: E402
from milter.types import CLASS_NAMES, Action, Envelope  # noqa: E402
from training import retrain as rt  # noqa: E402
from training.corpora import Message, load_corpora, parse_date, read_header_block  # noqa: E402
from training.thresholds import HAM, decide  # noqa: E402

CORPORA = REPO / ".cache" / "corpora"
SHARE = REPO.parent / "shared" / "corpora"
_NEVER = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Figures:
    """The rest of the source, ham only, under one model."""

    model: str
    n: int
    quarantined: float  # the model at its quarantine thresholds
    tagged_or_worse: float  # ... at its tag thresholds
    policy_quarantined: float  # through the policy (bulk verdict, BEC rules)
    policy_flagged: float  # tagged or quarantined through the policy
    flagged: tuple[str, ...] = ()  # one line per message flagged through the policy (--show-flagged)


def oldest_first(messages: Sequence[Message]) -> list[Message]:
    def key(m: Message) -> tuple[datetime, int]:
        return (parse_date(read_header_block(m.path)) or _NEVER, m.order)

    return sorted(messages, key=key)


def retrain(work: Path, db: str, holdout: Path, extra: Sequence[str]) -> rt.RetrainResult:
    args = [
        "--db", db, "--models-dir", str(work / "models"), "--report", str(work / "reports"),
        "--holdout-sha256", str(holdout), "--cache-dir", str(REPO / ".cache"), "--corpora-dir",
        str(CORPORA), "--corpora-src", str(SHARE), "--no-progress", *extra,
    ]  # fmt: skip
    return rt.run(rt.parse_args(args))


FLAGGED = (Action.QUARANTINE, Action.TAG)  # what the policy does to mail it does not simply accept


def figures(scanner: Scanner, ham: Sequence[Message]) -> Figures:
    raws = [m.path.read_bytes() for m in ham]
    results = scanner.scan_batch(raws)
    probs = np.array([[r.scores.ham, r.scores.spam, r.scores.bec] for r in results], dtype=np.float32)
    t = rt.thresholds_of(scanner.classifier.metadata.thresholds)
    held = decide(probs, t.spam_quarantine, t.bec_quarantine) != HAM
    tagged = decide(probs, t.spam_tag, t.bec_tag) != HAM
    actions = [r.action for r in results]
    return Figures(
        scanner.classifier.name,
        len(ham),
        float(held.mean()),
        float(tagged.mean()),
        sum(a == Action.QUARANTINE for a in actions) / len(ham),
        sum(a in FLAGGED for a in actions) / len(ham),
        tuple(flagged_line(m, r) for m, r in zip(ham, results, strict=True) if r.action in FLAGGED),
    )


def flagged_line(m: Message, r: ScanResult) -> str:
    """Which message, how the policy flagged it and why: what a reader of the figures asks next."""
    s = r.scores
    return (f"{r.action.value:<10} {r.verdict.value:<4} ham={s.ham:.3f} spam={s.spam:.3f} bec={s.bec:.3f} "
            f"{m.subcollection} {m.path.name}: {'; '.join(r.reasons)}")


def label(store: Store, scanner: Scanner, messages: Sequence[Message]) -> None:
    """Record what the gateway would (verdict, vector, the bytes of held mail), then the admin's label."""
    raws = [m.path.read_bytes() for m in messages]
    for m, raw, result in zip(messages, raws, scanner.scan_batch(raws), strict=True):
        held = raw if result.action == Action.QUARANTINE else None
        pk = store.record(result, Envelope(), held, SCHEMA.digest)
        store.set_label(pk, CLASS_NAMES[m.klass], "admin")


def show(title: str, f: Figures, show_flagged: bool = False) -> None:
    print(
        f"  {title:<28} {f.model:<28} ham n={f.n:<4} model: quarantined {100 * f.quarantined:5.1f} %, "
        f"tagged+ {100 * f.tagged_or_worse:5.1f} % | policy: quarantined "
        f"{100 * f.policy_quarantined:5.1f} %, flagged {100 * f.policy_flagged:5.1f} %"
    )
    for line in f.flagged if show_flagged else ():
        print(f"    {line}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="corpus to hold out and then label")
    p.add_argument("--labels", type=int, default=20)
    p.add_argument("--label-ham-only", action="store_true", help="label the K oldest ham, not messages")
    p.add_argument(
        "--label-subcollection",
        metavar="TEXT",
        help="label only messages of the sub-collections whose name contains TEXT (a site's own kind of "
        "mail, e.g. its language: BBND-unspy is the German newsletters); the rest of it is shown apart",
    )
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    p.add_argument("--max-per-group", type=int, help="base messages per (corpus, label), for a quick run")
    p.add_argument("--language-adjust", type=float, help="milter-retrain's --language-adjust, both retrains")
    p.add_argument("--no-tree-words", action="store_true", help="milter-retrain's --no-tree-words, both")
    p.add_argument("--train-args", default="",
                   help="more milter-retrain options for both retrains, e.g. \"--language-balance 0.5\"")
    p.add_argument("--show-flagged", action="store_true",
                   help="list the rest's ham the policy tags or quarantines, with reasons, under each model")
    args = p.parse_args(argv)
    extra = ["--max-per-group", str(args.max_per_group)] if args.max_per_group else []
    if args.language_adjust is not None:
        extra += ["--language-adjust", str(args.language_adjust)]
    if args.no_tree_words:
        extra.append("--no-tree-words")
    extra += shlex.split(args.train_args)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        source, _ = load_corpora(CORPORA, SHARE, include=[args.source])
        holdout = work / "holdout.sha256"
        holdout.write_text("".join(f"{m.sha256}\n" for m in source))
        ordered = oldest_first(source)
        pool = [m for m in ordered if m.klass == HAM] if args.label_ham_only else ordered
        if args.label_subcollection:
            pool = [m for m in pool if args.label_subcollection in m.subcollection]
        labelled = pool[: args.labels]
        rest_ham = [m for m in ordered if m not in labelled and m.klass == HAM]

        base = retrain(work, f"sqlite:///{work / 'empty.db'}", holdout, extra)
        outcome = "promoted" if base.promoted else base.reason
        print(f"base model without {args.source}: {base.challenger} ({outcome})")
        champion = build_scanner(load_config(None), work / "models" / "current.onnx")
        own = args.label_subcollection
        kin = [m for m in rest_ham if own and own in m.subcollection]
        before, before_kin = figures(champion, rest_ham), figures(champion, kin) if kin else None

        db = f"sqlite:///{work / 'store.db'}"
        with Store.open(db) as store:
            label(store, champion, labelled)
        by_class = {c: sum(CLASS_NAMES[m.klass] == c for m in labelled) for c in CLASS_NAMES}
        result = retrain(work, db, holdout, extra)
        current = build_scanner(load_config(None), work / "models" / "current.onnx")
        after, after_kin = figures(current, rest_ham), figures(current, kin) if kin else None

    print(f"{args.source}: {len(labelled)} labels ({by_class}), {len(rest_ham)} more ham scored")
    print(f"  retrain: {'PROMOTED' if result.promoted else 'REFUSED'} {result.challenger}: {result.reason}")
    show("before the labels", before, args.show_flagged)
    show("after the nightly retrain", after, args.show_flagged)
    if before_kin and after_kin:
        print(f"  of which {args.label_subcollection} (the labels' own kind of mail):")
        show("before the labels", before_kin)
        show("after the nightly retrain", after_kin)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
