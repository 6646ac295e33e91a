"""The tensor graph (training/tensor_graph.py) computes what LightGBM computes, with operators the CUDA
provider has.

On the shipped model: real feature vectors (fixtures and a corpus sample) through the whole compiled graph,
text stage included, against `Booster.predict` and the shipped TreeEnsemble graph; and, on the trees' own
input, a row reaching every split of every tree with that split's feature set to the threshold, its float32
neighbours and the values LightGBM treats specially (NaN, +-inf, +-0, +-1e-35), both edges of every split
checked as exercised. On small models trained here: missing types NaN and Zero with both default sides, and
thresholds placed by hand in LightGBM's zero band and at +-inf.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from conftest import in_ci

from milter.classifier import load_metadata, metadata_path
from milter.features import SCHEMA
from milter.scan import prepare
from milter.stacking import TOPIC_PREFIX, TextStage
from training.tensor_graph import (
    OPS,
    CompileError,
    Forest,
    Missing,
    Split,
    Tree,
    check_ops,
    compile_booster,
    floor32,
    parse_model,
    tf32_parts,
    used_ops,
)

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "current.onnx"
TEXT = ROOT / "models" / "current.lgb.txt"
CORPORA = ROOT / ".cache" / "corpora"
SHIPPED_TOL = 1e-5  # the bound on the shipped model
EXACT_TOL = 1e-6  # small models: a few float32 leaf values summed
CORPUS_SAMPLE = 1500

F32 = np.float32
INF = F32(np.inf)
ZERO_BAND = F32(1e-35)  # LightGBM's kZeroThreshold
#: Values LightGBM reads specially (NaN, infinities, zeros, the edge of the band it reads as zero).
SPECIAL = tuple(F32(v) for v in (np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-35, -1e-35))
#: Tried once per feature: the largest magnitudes, the band's float32 neighbours, a denormal.
EXTREME = tuple(
    F32(v)
    for v in (
        np.finfo(np.float32).max, -np.finfo(np.float32).max, np.nextafter(ZERO_BAND, INF),
        np.nextafter(ZERO_BAND, -INF), -np.nextafter(ZERO_BAND, INF), 1e-45, -1e-45, 1e30,
    )
)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def probabilities(
    sess: ort.InferenceSession, X: npt.NDArray[np.float32], name: str = "input"
) -> npt.NDArray[np.float64]:
    (out,) = sess.run(["probabilities"], {name: np.ascontiguousarray(X, dtype=np.float32)})
    return np.asarray(out, dtype=np.float64)


def worst(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    assert a.shape == b.shape
    diff = np.abs(a - b)
    assert not np.isnan(diff).any(), "NaN probabilities"
    return float(diff.max()) if diff.size else 0.0


# --- the shipped model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def booster() -> lgb.Booster:
    return lgb.Booster(model_file=str(TEXT))


@pytest.fixture(scope="module")
def shipped() -> onnx.ModelProto:
    return onnx.load(str(MODEL))


@pytest.fixture(scope="module")
def whole(shipped: onnx.ModelProto) -> onnx.ModelProto:
    """The shipped graph with its tree ensemble compiled (text stage and tail kept)."""
    return compile_booster(TEXT, graph=shipped)


def _vectors(paths: list[Path]) -> npt.NDArray[np.float32]:
    return np.stack([prepare(p.read_bytes()).vector for p in paths])


@pytest.fixture(scope="module")
def stage() -> TextStage | None:
    raw = load_metadata(metadata_path(MODEL)).raw.get("text_stage")
    return None if raw is None else TextStage.from_json(raw, len(SCHEMA))


def check_real_mail(
    X: npt.NDArray[np.float32],
    whole: onnx.ModelProto,
    shipped: onnx.ModelProto,
    booster: lgb.Booster,
    stage: TextStage | None,
) -> None:
    label, probs, text = session(whole).run(None, {"input": X})
    label0, probs0, text0 = session(shipped).run(None, {"input": X})
    np.testing.assert_array_equal(text, text0)  # the stage is the shipped one, node for node
    ours = np.asarray(probs, dtype=np.float64)
    # LightGBM on the trees' very input: the features and the graph's own text-stage scores
    assert worst(ours, np.asarray(booster.predict(np.hstack([X, text])), dtype=np.float64)) <= SHIPPED_TOL
    # ... and end to end, the stage computed by numpy from the metadata (as training's parity check does)
    extended = X if stage is None else stage.extend(X)
    assert worst(ours, np.asarray(booster.predict(extended), dtype=np.float64)) <= SHIPPED_TOL
    assert worst(ours, np.asarray(probs0, dtype=np.float64)) <= SHIPPED_TOL
    np.testing.assert_array_equal(label, np.argmax(probs, axis=1))
    clear = np.sort(probs0, axis=1)[:, -1] - np.sort(probs0, axis=1)[:, -2] > 1e-4  # no near tie
    np.testing.assert_array_equal(label[clear], label0[clear])


def test_whole_graph_matches_lightgbm_and_the_shipped_graph_on_the_fixtures(
    whole: onnx.ModelProto, shipped: onnx.ModelProto, booster: lgb.Booster, stage: TextStage | None
) -> None:
    paths = sorted((ROOT / "fixtures").rglob("*.eml"))
    assert len(paths) > 100
    check_real_mail(_vectors(paths), whole, shipped, booster, stage)


def test_whole_graph_matches_lightgbm_and_the_shipped_graph_on_corpus_mail(
    whole: onnx.ModelProto, shipped: onnx.ModelProto, booster: lgb.Booster, stage: TextStage | None
) -> None:
    corpus = sorted(CORPORA.glob("*/*/*.eml"))
    if not corpus:
        if in_ci():
            pytest.fail(f"corpora not unpacked under {CORPORA} under CI=true (make corpora)")
        pytest.skip(f"no corpus under {CORPORA} (make corpora): parity on corpus mail not tested")
    step = max(1, len(corpus) // CORPUS_SAMPLE)
    X = _vectors(corpus[::step][:CORPUS_SAMPLE])
    assert len(X) == min(CORPUS_SAMPLE, len(corpus))
    check_real_mail(X, whole, shipped, booster, stage)


# --- the tensor graph shipped in models/ (training/tensor_export.py) ------------------------------------


SHIPPED_TENSOR = ROOT / "models" / "current.tensor.onnx"


def test_the_shipped_tensor_graph_is_the_compiled_model_and_its_metadata_says_so(
    whole: onnx.ModelProto,
) -> None:
    """models/current.tensor.onnx is exactly what the compiler makes of the shipped model (reproducible:
    `python -m training.tensor_export`), and current.json names it with its digest, operators and parity."""
    data = SHIPPED_TENSOR.read_bytes()
    assert data == whole.SerializeToString()
    entry = json.loads(MODEL.with_suffix(".json").read_text())["tensor_graph"]
    assert entry["file"] == SHIPPED_TENSOR.name
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["ops"] == sorted(used_ops(onnx.load_from_string(data))) and set(entry["ops"]) <= OPS
    assert entry["max_abs_diff"] <= entry["tolerance"] == SHIPPED_TOL
    assert entry["cuda_provider_options"] == {"use_tf32": "0"}


def test_the_shipped_tensor_graph_matches_lightgbm_on_the_fixtures(
    booster: lgb.Booster, stage: TextStage | None
) -> None:
    paths = sorted((ROOT / "fixtures").rglob("*.eml"))
    X = _vectors(paths)
    sess = ort.InferenceSession(SHIPPED_TENSOR.read_bytes(), providers=["CPUExecutionProvider"])
    ours = probabilities(sess, X)
    extended = X if stage is None else stage.extend(X)
    assert worst(ours, np.asarray(booster.predict(extended), dtype=np.float64)) <= SHIPPED_TOL


def test_export_fails_when_the_tensor_graph_misses_lightgbm(shipped: onnx.ModelProto) -> None:
    """milter-train's check: a reference the graph does not meet within 1e-5 fails the export."""
    from training.model import ExportMismatchError
    from training.tensor_export import export_tensor_graph

    text, onnx_bytes = TEXT.read_text(), shipped.SerializeToString()
    X = _vectors(sorted((ROOT / "fixtures" / "sample").glob("*.eml"))[:20])
    _, stage_scores = session(shipped).run(["probabilities", "text_scores"], {"input": X})
    reference = np.asarray(lgb.Booster(model_str=text).predict(np.hstack([X, stage_scores])), np.float64)
    done = export_tensor_graph(text, onnx_bytes, X, reference)
    assert done.data == SHIPPED_TENSOR.read_bytes() and done.rows == len(X) and done.max_abs_diff <= 1e-5
    off = reference.copy()
    off[3] += np.array([2e-5, -2e-5, 0.0])
    with pytest.raises(ExportMismatchError, match=r"tensor graph: .* 1 of 20 rows"):
        export_tensor_graph(text, onnx_bytes, X, off)


def test_whole_graph_keeps_the_shipped_inputs_and_outputs(
    whole: onnx.ModelProto, shipped: onnx.ModelProto
) -> None:
    def io(model: onnx.ModelProto) -> list[tuple[str, str]]:
        return [(v.name, str(v.type)) for v in [*model.graph.input, *model.graph.output]]

    assert io(whole) == io(shipped)
    assert len(whole.SerializeToString()) < 1.25 * len(shipped.SerializeToString())


# --- every split of the shipped trees, at its edges --------------------------------------------------------


def _inside(lo: float, hi: float) -> np.float32 | None:
    """A float32 x with lo < x <= hi, outside LightGBM's zero band when possible; None when there is none."""
    candidates = [floor32(hi)] if np.isfinite(hi) else []
    candidates += [np.nextafter(floor32(lo), INF)] if np.isfinite(lo) else []
    candidates += [F32(1.0), F32(-1.0), F32(0.0)]
    fits = [x for x in candidates if lo < float(x) <= hi]
    plain = [x for x in fits if abs(x) > ZERO_BAND or x == 0]
    return next(iter(plain + fits), None)


def _reaching(tree: Tree) -> Iterator[tuple[Split, dict[int, np.float32]]]:
    """Every split with feature values that lead to it (values within the bounds its ancestors set; NaN
    below the right side of a split at +inf, which only missing values reach)."""
    stack: list[tuple[int, dict[int, tuple[float, float, bool]]]] = [(0, {})] if tree.splits else []
    while stack:
        node, box = stack.pop()
        split = tree.splits[node]
        values = {f: F32(np.nan) if nan else _inside(lo, hi) for f, (lo, hi, nan) in box.items()}
        if all(v is not None for v in values.values()):
            yield split, {f: v for f, v in values.items() if v is not None}
        lo, hi, nan = box.get(split.feature, (-np.inf, np.inf, False))
        t = split.threshold
        left, right = (lo, min(hi, t), nan), (max(lo, t), hi, nan or t == np.inf)
        for child, bounds in ((split.left, left), (split.right, right)):
            if child >= 0:
                stack.append((child, {**box, split.feature: bounds}))


def probe_rows(forest: Forest, chunk: int = 4096) -> Iterator[npt.NDArray[np.float32]]:
    """Rows reaching each split with its feature at the threshold (as float32, and the float32 neighbours),
    then at each SPECIAL value; the first split of each feature also at each EXTREME value."""
    rows: list[npt.NDArray[np.float32]] = []
    seen: set[int] = set()
    for tree in forest.trees:
        for split, base in _reaching(tree):
            row = np.zeros(forest.num_feature, dtype=np.float32)
            row[list(base)] = list(base.values())
            t32 = floor32(split.threshold)
            edges = (np.nextafter(t32, -INF), t32, np.nextafter(t32, INF), *SPECIAL)
            edges += EXTREME if split.feature not in seen else ()
            seen.add(split.feature)
            for value in edges:
                rows.append(row.copy())
                rows[-1][split.feature] = value
            if len(rows) >= chunk:
                yield np.stack(rows)
                rows = []
    if rows:
        yield np.stack(rows)


def _leaves_under(tree: Tree, child: int) -> set[int]:
    if child < 0:
        return {~child}
    split = tree.splits[child]
    return _leaves_under(tree, split.left) | _leaves_under(tree, split.right)


def _both_edges_exercised(forest: Forest, reached: list[set[int]]) -> float:
    """Share of the splits whose left and right subtrees each hold a leaf some row reached."""
    total = hit = 0
    for tree, leaves in zip(forest.trees, reached, strict=True):
        for split in tree.splits:
            total += 1
            sides = (_leaves_under(tree, split.left), _leaves_under(tree, split.right))
            hit += all(leaves & side for side in sides)
    return hit / total


def _tree_ensemble_alone(shipped: onnx.ModelProto) -> ort.InferenceSession:
    """The shipped graph from the trees' input on: its TreeEnsemble node and the converter's tail."""
    inferred = onnx.shape_inference.infer_shapes(shipped)
    (ensemble,) = [n for n in shipped.graph.node if n.op_type == "TreeEnsembleClassifier"]
    return session(onnx.utils.Extractor(inferred).extract_model([ensemble.input[0]], ["probabilities"]))


def test_every_split_edge_matches_lightgbm(booster: lgb.Booster, shipped: onnx.ModelProto) -> None:
    forest = parse_model(booster.model_to_string())
    compiled = session(compile_booster(booster))
    tree_ensemble = _tree_ensemble_alone(shipped)
    # The shipped export took its thresholds from dump_model(), which writes LightGBM's +inf thresholds as
    # 1e300: in the shipped graph an input of +inf in a feature split at +inf goes right, where LightGBM
    # (and the compiled graph) send it left. Those rows are compared with LightGBM only.
    split_at_inf = sorted({s.feature for t in forest.trees for s in t.splits if s.threshold == np.inf})
    # LightGBM reads |x| <= 1e-35 as zero where a split's missing type is Zero; the converted TreeEnsemble
    # does not for negative x. Of the trees' inputs only the text stage's topics are ever negative, and
    # the graph computes them from a float16 table (a nonzero topic is at least about 1e-11 in size), so
    # a topic in (-1e-35, 0) cannot reach the trees: those rows are compared with LightGBM only.
    topics = [j for j, name in enumerate(booster.feature_name()) if name.startswith(TOPIC_PREFIX)]
    reached: list[set[int]] = [set() for _ in forest.trees]
    ours = theirs = 0.0
    n = 0
    for X in probe_rows(forest):
        n += len(X)
        reference = np.asarray(booster.predict(X), dtype=np.float64)
        ours = max(ours, worst(probabilities(compiled, X), reference))
        band = X[:, topics]
        unreachable = ((band < 0) & (band >= -1e-35)).any(axis=1)
        comparable = ~np.isposinf(X[:, split_at_inf]).any(axis=1) & ~unreachable
        te = probabilities(tree_ensemble, X[comparable], tree_ensemble.get_inputs()[0].name)
        theirs = max(theirs, worst(probabilities(compiled, X[comparable]), te))
        for t, leaves in enumerate(np.asarray(booster.predict(X, pred_leaf=True)).T):
            reached[t].update(leaves.tolist())
    assert n > 10 * sum(len(t.splits) for t in forest.trees)
    assert _both_edges_exercised(forest, reached) == 1.0
    assert ours <= SHIPPED_TOL, f"compiled vs LightGBM: {ours:.3g}"
    assert theirs <= SHIPPED_TOL, f"compiled vs the shipped TreeEnsemble graph: {theirs:.3g}"


# --- small models: every missing type, both default sides ---------------------------------------------------


def _train(X: npt.NDArray[np.float32], y: npt.NDArray[np.int64], **params: object) -> lgb.Booster:
    base = {"objective": "multiclass", "num_class": 3, "num_leaves": 8, "min_data_in_leaf": 10,
            "learning_rate": 0.3, "verbose": -1, "seed": 3, "deterministic": True, "num_threads": 1}
    return lgb.train({**base, **params}, lgb.Dataset(X, y), num_boost_round=20)


def _holey(hole: float) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Features 0 and 1 decide the class; feature 0 has holes where it is high (missing goes right),
    feature 1 where it is low (missing goes left); features 2-4 are noise and hole-free."""
    rng = np.random.default_rng(15)
    X = rng.normal(size=(4000, 5)).astype(np.float32)
    y = ((X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0.3)).astype(np.int64)
    X[(X[:, 0] > 0.8) & (rng.random(len(X)) < 0.7), 0] = hole
    X[(X[:, 1] < -0.5) & (rng.random(len(X)) < 0.7), 1] = hole
    return X, y


def _kinds(booster: lgb.Booster) -> set[tuple[Missing, bool]]:
    forest = parse_model(booster.model_to_string())
    return {(s.missing, s.default_left) for t in forest.trees for s in t.splits}


def _test_rows(booster: lgb.Booster, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Training-like rows with holes of every special value, then every split's edges."""
    rng = np.random.default_rng(16)
    rows = X[rng.choice(len(X), 2000, replace=False)].copy()
    mask = rng.random(rows.shape) < 0.15
    rows[mask] = rng.choice(np.array(SPECIAL + EXTREME), mask.sum())
    return np.vstack([rows, *probe_rows(parse_model(booster.model_to_string()))])


@pytest.mark.parametrize("zero_as_missing", [False, True], ids=["nan-missing", "zero-missing"])
def test_small_model_with_missing_values_matches_lightgbm(zero_as_missing: bool) -> None:
    X, y = _holey(0.0 if zero_as_missing else np.nan)
    booster = _train(X, y, zero_as_missing=zero_as_missing)
    kind = Missing.ZERO if zero_as_missing else Missing.NAN
    assert {(kind, True), (kind, False)} <= _kinds(booster), _kinds(booster)
    if not zero_as_missing:
        assert Missing.NONE in {m for m, _ in _kinds(booster)}  # the hole-free features
    rows = _test_rows(booster, X)
    got = probabilities(session(compile_booster(booster)), rows)
    assert worst(got, np.asarray(booster.predict(rows), dtype=np.float64)) <= EXACT_TOL


def _one_split_model(threshold: str, decision_type: int) -> lgb.Booster:
    """A tiny trained model whose first tree's root split is rewritten to this threshold and decision type."""
    rng = np.random.default_rng(17)
    X = rng.normal(size=(600, 2)).astype(np.float32)
    booster = _train(X, (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0), num_leaves=3, min_data_in_leaf=5)
    lines, done = [], set()
    for line in booster.model_to_string(num_iteration=1).splitlines():
        key, _, value = line.partition("=")
        if key == "tree_sizes":  # byte offsets of the trees: stale once a line changes length
            continue
        if key in ("threshold", "decision_type") and key not in done and value:
            done.add(key)
            first = threshold if key == "threshold" else str(decision_type)
            line = f"{key}={' '.join([first, *value.split()[1:]])}"
        lines.append(line)
    assert done == {"threshold", "decision_type"}
    return lgb.Booster(model_str="\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "threshold",
    ["0", "1e-37", "-1e-37", "-5e-36", "1.0000000180025095e-35", "-1.0000000180025095e-35", "inf", "-inf",
     "0.3"],
)
def test_thresholds_in_the_zero_band_and_at_infinity_match_lightgbm(threshold: str) -> None:
    """LightGBM reads |x| <= 1e-35 as 0.0 (before any split), NaN as 0.0 unless missing type NaN, and
    compares in double: a threshold placed anywhere near those edges must split as it does."""
    values = np.array(
        [*SPECIAL, *EXTREME, 1e-36, -1e-36, 1e-37, -1e-37, 2e-35, -2e-35, 0.3, F32(0.3) + 1e-8, 1.0, -1.0],
        dtype=np.float32,
    )
    for decision_type in (0, 2, 4, 6, 8, 10):  # missing None / Zero / NaN, default right / left
        booster = _one_split_model(threshold, decision_type)
        root = parse_model(booster.model_to_string()).trees[0].splits[0]
        rows = np.zeros((len(values), 2), dtype=np.float32)
        rows[:, root.feature] = values
        got = probabilities(session(compile_booster(booster)), rows)
        reference = np.asarray(booster.predict(rows), dtype=np.float64)
        assert worst(got, reference) <= EXACT_TOL, (threshold, decision_type)


# --- what the graph may hold, and what is refused -----------------------------------------------------------


def test_compiled_graphs_use_only_the_allowed_operators(whole: onnx.ModelProto, booster: lgb.Booster) -> None:
    for model in (whole, compile_booster(booster)):
        assert used_ops(model) <= OPS, sorted(used_ops(model) - OPS)
        assert {n.domain for n in model.graph.node} <= {""}
        assert {o.domain for o in model.opset_import} == {""}
    with pytest.raises(CompileError, match="TreeEnsembleClassifier"):
        check_ops(onnx.load(str(MODEL)))


def test_categorical_splits_are_refused() -> None:
    rng = np.random.default_rng(18)
    X = np.column_stack([rng.integers(0, 6, 800), rng.normal(size=800)]).astype(np.float32)
    y = (X[:, 0] % 3).astype(np.int64)
    booster = lgb.train(
        {"objective": "multiclass", "num_class": 3, "verbose": -1, "min_data_per_group": 5, "cat_smooth": 1},
        lgb.Dataset(X, y, categorical_feature=[0]),
        num_boost_round=3,
    )
    text = booster.model_to_string()
    assert any(line.startswith("num_cat=") and line != "num_cat=0" for line in text.splitlines())
    with pytest.raises(CompileError, match="categorical"):
        compile_booster(booster)


def test_other_objectives_and_a_foreign_booster_are_refused(shipped: onnx.ModelProto) -> None:
    X, y = _holey(np.nan)
    binary = lgb.train({"objective": "binary", "verbose": -1}, lgb.Dataset(X, (y > 0).astype(int)), 3)
    with pytest.raises(CompileError, match="multiclass"):
        compile_booster(binary)
    with pytest.raises(CompileError, match="not the same model"):
        compile_booster(_train(X, y), graph=shipped)
    with pytest.raises(CompileError, match="pass a file as a Path"):
        compile_booster(str(TEXT))


def test_tf32_parts_are_exact_and_survive_tf32_rounding() -> None:
    rng = np.random.default_rng(19)
    values = (rng.normal(size=(3, 500)) * 10.0 ** rng.integers(-8, 3, size=(3, 500))).astype(np.float32)
    parts = tf32_parts(values).reshape(3, *values.shape)
    np.testing.assert_array_equal((parts[0] + parts[1]) + parts[2], values)
    truncated = (parts.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)  # 10 mantissa bits kept
    np.testing.assert_array_equal(truncated, parts)
