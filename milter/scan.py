"""Glue between the pure stages: prepare (parse + features) and decide (model scores + policy).

`prepare` is a pure function of the message bytes, safe to run in worker processes; `Scanner.decide`
takes a batch of prepared messages with the model's probabilities for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from milter.auth import Evidence, evaluate_evidence
from milter.classifier import Classifier
from milter.config import Config
from milter.features import Protected, extract
from milter.features.summary import Extracted, MessageSummary
from milter.policy import Policy
from milter.types import Action, Envelope, Scores, Verdict


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
    def __init__(self, classifier: Classifier, policy: Policy) -> None:
        self.classifier = classifier
        self.policy = policy

    def decide(
        self,
        items: Sequence[Extracted],
        envelopes: Sequence[Envelope],
        probs: npt.NDArray[np.float32],
    ) -> list[ScanResult]:
        out = []
        for ext, env, row in zip(items, envelopes, probs, strict=True):
            scores = Scores(ham=float(row[0]), spam=float(row[1]), bec=float(row[2]))
            decision = self.policy.decide(scores, ext, env)
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
                )
            )
        return out

    def predict(self, items: Sequence[Extracted]) -> npt.NDArray[np.float32]:
        return self.classifier.predict(np.stack([e.vector for e in items]))

    def scan_batch(
        self, raws: Sequence[bytes], envelopes: Sequence[Envelope] | None = None
    ) -> list[ScanResult]:
        envs = list(envelopes) if envelopes is not None else [Envelope()] * len(raws)
        items = [prepare(raw, env, self.policy.protected) for raw, env in zip(raws, envs, strict=True)]
        return self.decide(items, envs, self.predict(items))


def build_scanner(cfg: Config, model_path: Path | None = None) -> Scanner:
    """Load the model named by the config (or `model_path`) and the policy around its thresholds."""
    classifier = Classifier.load(model_path or cfg.model.path)
    return Scanner(classifier, Policy(cfg.policy, classifier.metadata.thresholds))
