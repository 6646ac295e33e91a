"""Glue between the pure stages: prepare (parse + features) and decide (model scores + policy).

`prepare` is a pure function of the message bytes, safe to run in worker processes; `Scanner.decide`
takes a batch of prepared messages with the model's probabilities for them, and explains (milter.explain)
the ones the policy did not simply accept, or every one when asked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from milter.auth import Evidence, evaluate_evidence
from milter.classifier import Classifier
from milter.config import Config
from milter.explain import Contribution, Explainer, Explanation, Words
from milter.features import Protected, bucket_words, extract
from milter.features.summary import Extracted, MessageSummary
from milter.history import HistoryLookup
from milter.policy import Policy
from milter.types import Action, Envelope, Scores, Verdict

log = logging.getLogger(__name__)

#: row indexes of a batch -> each row's own words per hashed word bucket (see `Scanner.decide`)
WordsOf = Callable[[Sequence[int]], Sequence[Words]]


@dataclass(frozen=True)
class ScanResult:
    verdict: Verdict
    action: Action
    scores: Scores
    reasons: tuple[str, ...]
    model: str
    summary: MessageSummary
    vector: npt.NDArray[np.float32]
    subject_prefix: str | None = None
    explanation: Explanation | None = None  # the model's reasons in features (flagged mail, or asked for)
    teaches: bool = False  # Decision.teaches: the correspondence history learns from it once delivered
    outbound: bool = False  # Decision.outbound: our users' mail to their correspondents


def prepare(
    raw: bytes,
    envelope: Envelope | None = None,
    protected: Protected | None = None,
    evidence: Evidence | None = None,
) -> Extracted:
    """Parse and extract features, and verify DKIM / evaluate DMARC from the DNS answers in `evidence`
    when there are any; never raises for malformed mail (defects become features)."""
    ext = extract(raw, envelope, protected)
    if evidence is None:
        return ext
    return replace(ext, summary=replace(ext.summary, auth=evaluate_evidence(raw, evidence)))


class Scanner:
    def __init__(
        self,
        classifier: Classifier,
        policy: Policy,
        explainer: Explainer | None = None,
        explain_all: bool = False,
    ) -> None:
        """`explainer`: None scans without per-feature reasons; `explain_all`: explain accepted mail too
        (`milter scan --explain`), not only what the policy tags, quarantines or rejects."""
        self.classifier = classifier
        self.policy = policy
        self.explainer = explainer
        self.explain_all = explain_all

    def decide(
        self,
        items: Sequence[Extracted],
        envelopes: Sequence[Envelope],
        probs: npt.NDArray[np.float32],
        words_of: WordsOf | None = None,
        histories: Sequence[HistoryLookup | None] | None = None,
    ) -> list[ScanResult]:
        """Scores and policy decision per message. Explanations (see `_explained`) name hashed words by
        the message's own when `words_of` gives them (for the rows explained), by the model's examples
        if not."""
        out = []
        known = histories if histories is not None else [None] * len(items)
        for ext, env, row, history in zip(items, envelopes, probs, known, strict=True):
            scores = Scores(ham=float(row[0]), spam=float(row[1]), bec=float(row[2]))
            decision = self.policy.decide(scores, ext, env, history)
            out.append(
                ScanResult(
                    verdict=decision.verdict,
                    action=decision.action,
                    scores=scores,
                    reasons=decision.reasons,
                    model=self.classifier.name,
                    summary=ext.summary,
                    vector=ext.vector,
                    subject_prefix=decision.subject_prefix,
                    teaches=decision.teaches,
                    outbound=decision.outbound,
                )
            )
        return self._explained(out, probs, words_of)

    def _explained(
        self, results: list[ScanResult], probs: npt.NDArray[np.float32], words_of: WordsOf | None
    ) -> list[ScanResult]:
        """`results` with explanations for the rows that get one. An explanation that fails leaves its
        messages unexplained, never unscanned: the verdict does not depend on it."""
        if self.explainer is None:
            return results
        rows = [i for i, r in enumerate(results) if self.explain_all or r.action is not Action.ACCEPT]
        if not rows:
            return results
        try:
            found = self.explainer.explain(
                np.stack([results[i].vector for i in rows]), [results[i].verdict.value for i in rows],
                probs[rows],
            )
            if words_of is not None:
                found = _in_own_words(found, rows, words_of, self.explainer.token_examples)
        except Exception:  # LightGBM raises its own types; the message must still go on
            log.exception("explaining %d message(s) failed; their verdicts go on without reasons", len(rows))
            return results
        for i, explanation in zip(rows, found, strict=True):
            results[i] = replace(results[i], explanation=explanation)
        return results

    def predict(self, items: Sequence[Extracted]) -> npt.NDArray[np.float32]:
        return self.classifier.predict(np.stack([e.vector for e in items]))

    def scan_batch(
        self, raws: Sequence[bytes], envelopes: Sequence[Envelope] | None = None
    ) -> list[ScanResult]:
        envs = list(envelopes) if envelopes is not None else [Envelope()] * len(raws)
        items = [prepare(raw, env, self.policy.protected) for raw, env in zip(raws, envs, strict=True)]
        return self.decide(items, envs, self.predict(items), words_from(raws))


def _in_own_words(
    found: list[Explanation], rows: Sequence[int], words_of: WordsOf, examples: Words
) -> list[Explanation]:
    """`found` with hashed word groups named by each message's own words, read (a second parse) only for
    the messages whose listed reasons include a word group the message has."""
    wanted = [k for k, e in enumerate(found) if any(_has_words(c) for c in e.contributions)]
    if not wanted:
        return found
    own = words_of([rows[k] for k in wanted])
    out = list(found)
    for k, words in zip(wanted, own, strict=True):
        out[k] = found[k].reworded(words, examples)
    return out


def _has_words(c: Contribution) -> bool:
    return c.feature.startswith("tok_") and c.value > 0


def words_from(raws: Sequence[bytes], mapper: Callable[..., Iterable[Words]] = map) -> WordsOf:
    """`words_of` for `decide`: each explained row's own words, from its bytes (`mapper`: map, or a
    process pool's map, since it parses the message again)."""
    return lambda rows: list(mapper(bucket_words, [raws[i] for i in rows]))


def load_explainer(classifier: Classifier) -> Explainer | None:
    """The explainer shipped with the classifier's model, checked against its graph; None (logged) for a
    model that ships none. ModelError for one that is missing, corrupt or not the graph's trees."""
    explainer = Explainer.load(classifier.path, classifier.metadata.raw, classifier.predict)
    if explainer is None:
        log.warning("model %s ships no explainer (%s): verdicts carry no per-feature reasons",
                    classifier.name, classifier.path.with_suffix(".lgb.txt").name)
    else:
        log.info("explanations on: model %s's trees (%s) match its digest and its graph",
                 classifier.name, classifier.path.with_suffix(".lgb.txt").name)
    return explainer


def build_scanner(cfg: Config, model_path: Path | None = None, explain_all: bool = False) -> Scanner:
    """Load the model named by the config (or `model_path`), its explainer and the policy around its
    thresholds."""
    classifier = Classifier.load(model_path or cfg.model.path, provider=cfg.model.provider)
    policy = Policy(cfg.policy, classifier.metadata.thresholds)
    explainer = load_explainer(classifier) if cfg.model.explain or explain_all else None
    return Scanner(classifier, policy, explainer, explain_all)
