"""The shipped model against its metadata and the code's schema; refusal of mismatched or broken models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from milter.classifier import Classifier, load_metadata
from milter.config import DEFAULT_MODEL
from milter.errors import ModelError, SchemaMismatchError
from milter.features import SCHEMA, extract
from milter.types import CLASS_NAMES

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(scope="module")
def shipped() -> Classifier:
    return Classifier.load(DEFAULT_MODEL)


def copy_model(tmp_path: Path) -> Path:
    dst = tmp_path / "model.onnx"
    shutil.copy(DEFAULT_MODEL, dst)
    shutil.copy(DEFAULT_MODEL.with_suffix(".json"), dst.with_suffix(".json"))
    shutil.copy(DEFAULT_MODEL.with_suffix(".lgb.txt"), dst.with_suffix(".lgb.txt"))
    shutil.copy(DEFAULT_MODEL.with_suffix(".tensor.onnx"), dst.with_suffix(".tensor.onnx"))
    return dst


def test_shipped_metadata_matches_code_and_model(shipped: Classifier) -> None:
    meta = load_metadata(DEFAULT_MODEL.with_suffix(".json"))
    raw = meta.raw
    assert meta.schema_digest == SCHEMA.digest
    assert tuple(raw["schema"]["feature_names"]) == SCHEMA.names
    assert tuple(meta.class_names) == CLASS_NAMES
    for cls in ("spam", "bec"):
        assert 0.0 < meta.thresholds[cls]["quarantine"] <= 1.0
    assert (
        "CC BY-NC" in json.dumps(raw["licence"]) or "phishing-pot" in raw["training_data"]["excluded_corpora"]
    )
    assert raw["training_data"]["manifest_digest"]
    assert raw["export"]["max_abs_diff"] <= 1e-5
    import hashlib

    assert hashlib.sha256(DEFAULT_MODEL.read_bytes()).hexdigest() == raw["onnx"]["sha256"]
    assert shipped.providers and shipped.providers[-1] == "CPUExecutionProvider"


def test_predict_batch_gives_probabilities(shipped: Classifier) -> None:
    raws = [p.read_bytes() for p in sorted((FIXTURES / "sample").glob("*.eml"))[:20]]
    X = np.stack([extract(r).vector for r in raws])
    probs = shipped.predict(X)
    assert probs.shape == (len(raws), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    # one call for the batch equals row-by-row calls
    singles = np.vstack([shipped.predict(X[i : i + 1]) for i in range(len(raws))])
    np.testing.assert_allclose(probs, singles, atol=1e-6)


def test_wrong_width_batch_is_refused(shipped: Classifier) -> None:
    with pytest.raises(ModelError, match="shape"):
        shipped.predict(np.zeros((2, len(SCHEMA) - 1), dtype=np.float32))


def test_schema_mismatch_is_refused_at_load(tmp_path: Path) -> None:
    model = copy_model(tmp_path)
    meta_path = model.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["schema"]["digest"] = "0000000000000000"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SchemaMismatchError, match="retrain"):
        Classifier.load(model)


def test_corrupt_and_missing_models_are_refused(tmp_path: Path) -> None:
    model = copy_model(tmp_path)
    model.write_bytes(b"not an onnx file")
    with pytest.raises(ModelError, match="cannot load model"):
        Classifier.load(model)
    with pytest.raises(ModelError, match="not found"):
        Classifier.load(tmp_path / "absent.onnx")
    broken_meta = copy_model(tmp_path)
    broken_meta.with_suffix(".json").write_text('{"name": 1}')
    with pytest.raises(ModelError, match="required key"):
        Classifier.load(broken_meta)
