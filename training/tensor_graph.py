"""Compile a LightGBM booster into an ONNX graph of standard tensor operators, so that it can run on a GPU.

Why: the shipped graph scores with one `ai.onnx.ml` TreeEnsembleClassifier node, and ONNX Runtime's CUDA
provider has no kernel for it: under onnxruntime-gpu the trees still run on the CPU (issue 15). Here the same
trees become Gather / LessOrEqual / MatMul / Equal / ReduceSum / Softmax (the GEMM formulation of Hummingbird,
Nakandala et al., OSDI 2020), operators the CUDA provider implements (`OPS`, checked on every compiled
graph). Hummingbird itself no longer exports with current torch (the issue).

Why in training/: compiling is a training-time step (its output is meant to ship beside the TreeEnsemble
graph, named in the metadata with its own digest, as the issue asks), and it needs the `onnx` package, which
only the training extra installs. A gateway loads a compiled and checked file; it never compiles one.

What is compiled: the LightGBM model text (`Booster.model_to_string()`, or the `current.lgb.txt` shipped
beside the graph), read directly rather than through `dump_model()`, which writes an infinite threshold as
1e300: not the same split for an input of +inf. With `graph=` (the shipped ONNX graph) its TreeEnsemble node
is replaced in place, so everything around it (the text stage of milter/stacking.py in front, the
converter's Identity / Cast / Mul behind) is kept node for node and the result has the shipped graph's
inputs and outputs (`input` (n, 1697) float32 -> `label`, `probabilities` (n, 3), `text_scores`).

Exactly what LightGBM does (src/io/tree.h `NumericalDecision`, c_api.cpp `RowPairFunctionFromDenseMatric`)
for every float32 input, checked by tests/test_tensor_graph.py against `Booster.predict`:
  - decision_type bit 0 categorical (refused: CompileError), bit 1 default_left, bits 2-3 missing type
    (0 None, 1 Zero, 2 NaN);
  - an input with |x| <= kZeroThreshold (1e-35f) is left out of the row LightGBM predicts on: it reads 0.0;
  - missing type None: NaN reads 0.0 (left iff 0 <= threshold, whatever default_left says); missing type
    Zero: NaN and |x| <= 1e-35 go to the default side; missing type NaN: NaN goes to the default side;
    any other value goes left iff x <= threshold, compared in double;
  - multiclass: the raw score of class k sums the trees i with i % num_class == k; then softmax.
The graph compares float32 values with float32 thresholds: each threshold becomes the largest float32 <= the
double (as `_fix_thresholds` in training/model.py does for the TreeEnsemble graph), so `x <= t32` iff
`x <= t` for every float32 x; a threshold inside the band LightGBM reads as zero moves to the band's edge.
No IsNaN is needed: a split that sends NaN right is `x <= t32`, false for NaN; one that sends NaN left is
written as "goes right", `-x <= -nextup(t32)` (x > t32 on the float32 grid), false for NaN too. Missing type
Zero reads its columns with |x| <= 1e-35 replaced by NaN, which turns it into missing type NaN.

GEMM, per tree t (T trees, I = most splits, L = most leaves; smaller trees padded): V = the tested values
(I, n); C = (V <= threshold) as 0 / 1; P = A[t] @ C (L, n), with A[t][l, i] = +1 when leaf l needs test i
true, -1 when it needs it false, 0 when i is not on its path; leaf l is reached iff P[l] equals its number
of +1 (every test on its path went its way; any other leaf falls short). The one-hot leaves (T L, n) times
the leaf values, summed per class, is a second MatMul whose weights are split in three parts of 11
significant bits (`tf32_parts`): the CUDA provider runs float MatMul in TF32 by default, which keeps 11 bits
of each input, so the tree part is exact with TF32 on or off (0 / 1 / -1 and small integer sums are exact in
TF32 too). The text stage's MatMul in front of the trees is not: make the CUDA session with
`CUDA_PROVIDER_OPTIONS` (TF32 off).

GEMM or tree traversal, measured (onnxruntime 1.32 CPU provider on this 2-core machine; the shipped model:
396 trees of 15 leaves, 5 to 13 levels deep; real corpus feature vectors; rows/s, median of 5 to 200 calls):

    batch    trees alone (input: features + text scores)    whole graph (text stage included)
             TreeEnsemble     GEMM    tree traversal         TreeEnsemble     GEMM    tree traversal
    1              54 k        6.6 k      4.5 k                    24 k        6.4 k      4.1 k
    64            100 k         48 k      2.6 k                    32 k        9.6 k      2.2 k
    1024           34 k         34 k      3.3 k                    19 k         15 k      1.9 k
    16384          34 k         35 k      4.3 k                    22 k         20 k      4.0 k

GEMM is chosen: from 64 rows up it scores 8 to 19 times the rows of tree traversal (4 to 8 times with the
text stage both share), 1.5 times at one row, and from 1,024 rows it is as fast as the TreeEnsemble kernel
on the CPU. The tree traversal measured (Hummingbird's TT: every tree one level per step, 7 gathers over
(n, 396) a step, 13 steps for these trees; written for this comparison and dropped) pays for the depth;
GEMM's cost is bounded by the leaves (15 a tree, whatever the depth), which favours it for these deep,
narrow trees on a GPU as well. Perfect tree traversal would pad every tree to 2^13 - 1 splits.

Size: the shipped model (`mailsift-20261207-0474fb11`, 411 trees) compiles to 8.04 MB against 7.82 MB
for the shipped graph; most of both is the text stage, kept: its wide table (2^18 x 2 float32, 2.1 MB) and
its topics (16,385 x 128 float16 and a 2^18 int32 index, 5.2 MB). (`mailsift-20261205-9e10f5ac`, 579
trees: 8.31 against 8.01 MB; the model before the text stage's ids: 2.76 against 2.55 MB, the compiled
trees' constants 0.64 MB where the TreeEnsemble node was 0.43 MB.)

Denormals: a GPU that flushes them to zero changes no branch, since LightGBM reads every |x| <= 1e-35 as 0.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Every operator a compiled graph may hold (ai.onnx domain); each has a CUDA provider kernel for the types
#: used here (float32, int64, bool). Besides the trees' own (Gather, Neg, Abs, Where, Concat, Transpose,
#: LessOrEqual, Cast, MatMul, Equal, Reshape, ReduceSum, Softmax, ArgMax), those of the text stage (Gather,
#: MatMul, Add, Cast, Clip, ReduceSum, Greater, Max, Sqrt, Div, Concat) and of the converter's tail
#: (Identity, Cast, Mul), kept from the shipped graph.
OPS: frozenset[str] = frozenset(
    {
        "Abs", "Add", "ArgMax", "Cast", "Clip", "Concat", "Div", "Equal", "Gather", "Greater", "Identity",
        "LessOrEqual", "MatMul", "Max", "Mul", "Neg", "ReduceSum", "Reshape", "Softmax", "Sqrt", "Transpose",
        "Where",
    }
)

#: For an onnxruntime CUDA session of a compiled graph: TF32 off, so that the text stage's MatMul is float32
#: as on the CPU (the CUDA provider turns TF32 on by default, rounding MatMul inputs to 11 significant bits).
CUDA_PROVIDER_OPTIONS: dict[str, str] = {"use_tf32": "0"}

#: LightGBM's kZeroThreshold (a C float, 1e-35f): smaller magnitudes are zeros to it.
ZERO_THRESHOLD = np.float32(1e-35)
OPSET = 13  # ReduceSum with axes as an input, Softmax over one axis
PREFIX = "tg_"  # names of the compiled nodes and tensors: never clash with the graph spliced into
F32_INF = np.float32(np.inf)


class CompileError(ValueError):
    """The booster (or the graph to splice into) holds something this compiler does not reproduce exactly."""


class Missing(enum.IntEnum):
    """LightGBM's MissingType, bits 2-3 of decision_type."""

    NONE = 0
    ZERO = 1
    NAN = 2


@dataclass(frozen=True)
class Split:
    """One numerical split as LightGBM stores it; a child >= 0 is a split, < 0 the leaf ~child."""

    feature: int
    threshold: float
    default_left: bool
    missing: Missing
    left: int
    right: int


@dataclass(frozen=True)
class Tree:
    splits: tuple[Split, ...]  # splits[0] is the root (none: a single leaf)
    leaves: tuple[float, ...]


@dataclass(frozen=True)
class Forest:
    trees: tuple[Tree, ...]  # tree i adds to the raw score of class i % num_class
    num_class: int
    num_feature: int


@dataclass(frozen=True, order=True)
class Column:
    """A column of the tested-values matrix: an input feature, negated or not, zeros read as NaN or not."""

    negated: bool
    zero_is_missing: bool
    feature: int


@dataclass(frozen=True)
class Test:
    """A split as the graph runs it: `column <= threshold` is true or false; `true_is_left` says which child
    true means."""

    column: Column
    threshold: np.float32
    true_is_left: bool


# --- reading the model text ------------------------------------------------------------------------------


def model_text(booster: lgb.Booster | str | Path) -> str:
    """The model text of a Booster (its best iteration, as `predict` uses), of a file, or as given."""
    if isinstance(booster, Path):
        return booster.read_text(encoding="utf-8")
    if isinstance(booster, str):
        return booster
    text: str = booster.model_to_string()
    return text


def parse_model(text: str) -> Forest:
    """The trees of a LightGBM model text; CompileError for what the graph would not compute exactly."""
    if not text.startswith("tree\n"):
        raise CompileError("not a LightGBM model text (a str is the text itself; pass a file as a Path)")
    try:
        return _parse_model(text)
    except CompileError:
        raise
    except (KeyError, ValueError) as exc:  # a missing key, a number that is not one
        raise CompileError(f"malformed LightGBM model text: {exc!r}") from exc


def _parse_model(text: str) -> Forest:
    header, _, body = text.partition("\nTree=")
    head = _key_values(header)
    objective = head.get("objective", "").split()
    if not objective or objective[0] != "multiclass":
        raise CompileError(f"objective {' '.join(objective) or '?'}: only multiclass (softmax) is compiled")
    if "average_output" in header.splitlines():
        raise CompileError("random-forest boosters (average_output) are not compiled")
    num_class = int(head["num_tree_per_iteration"])
    blocks = body.partition("\nend of trees")[0].split("\nTree=") if body else []
    trees = tuple(_parse_tree(block) for block in blocks)
    if not trees or len(trees) % num_class:
        raise CompileError(f"{len(trees)} trees is not a whole number of rounds of {num_class} classes")
    if not any(tree.splits for tree in trees):
        raise CompileError("no tree has a split: a constant model, nothing to compile")
    return Forest(trees, num_class, int(head["max_feature_idx"]) + 1)


def _key_values(block: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in block.splitlines() if "=" in line)


def _parse_tree(block: str) -> Tree:
    kv = _key_values(block)
    index = block.split("\n", 1)[0]
    if int(kv.get("num_cat", "0")) > 0:
        raise CompileError(f"tree {index} has categorical splits: not compiled")
    if kv.get("is_linear", "0") != "0":
        raise CompileError(f"tree {index} is a linear tree: not compiled")
    leaves = tuple(float(v) for v in kv["leaf_value"].split())
    n = int(kv["num_leaves"]) - 1
    if n == 0:
        return Tree((), leaves)
    keys = ("split_feature", "threshold", "decision_type", "left_child", "right_child")
    columns = [kv[k].split() for k in keys]
    if any(len(c) != n for c in columns) or len(leaves) != n + 1:
        raise CompileError(f"tree {index} is malformed: {n + 1} leaves but other split counts")
    return Tree(tuple(_split(index, *row) for row in zip(*columns, strict=True)), leaves)


def _split(index: str, feature: str, threshold: str, decision: str, left: str, right: str) -> Split:
    bits, t = int(decision), float(threshold)
    if bits & 1:
        raise CompileError(f"tree {index} has a categorical split: not compiled")
    missing = (bits >> 2) & 3
    if missing not in tuple(Missing) or np.isnan(t):
        raise CompileError(f"tree {index}: decision_type {bits} / threshold {threshold} not understood")
    return Split(int(feature), t, bool(bits & 2), Missing(missing), int(left), int(right))


# --- a split as float32 tensor operations ---------------------------------------------------------------


def floor32(t: float) -> np.float32:
    """Largest float32 <= t: for every float32 x, `x <= t` (in double) iff `x <= floor32(t)`."""
    with np.errstate(over="ignore"):
        near = np.float32(t)
    return near if float(near) <= t else np.float32(np.nextafter(near, -F32_INF))


def _left_threshold(split: Split) -> np.float32:
    """t32 such that, for every float32 x that is not missing, LightGBM goes left iff x <= t32."""
    t = split.threshold
    if split.missing is not Missing.ZERO:
        # |x| <= 1e-35 reads 0.0: a threshold inside that band moves to its edge (0 <= t: the band goes left)
        if 0.0 <= t < float(ZERO_THRESHOLD):
            return ZERO_THRESHOLD
        if -float(ZERO_THRESHOLD) <= t < 0.0:
            return np.float32(np.nextafter(-ZERO_THRESHOLD, -F32_INF))
    return floor32(t)


def nan_goes_left(split: Split) -> bool:
    if split.missing is Missing.NONE:
        return split.threshold >= 0.0  # NaN reads 0.0
    return split.default_left  # NaN (and, for Zero, |x| <= 1e-35) go to the default side


def lower(split: Split) -> Test:
    """The split as one float32 comparison `column <= threshold`, NaN always false."""
    zero = split.missing is Missing.ZERO
    t = _left_threshold(split)
    if not nan_goes_left(split):
        return Test(Column(False, zero, split.feature), t, True)
    # NaN must go left: test "goes right", x > t, as -x <= -nextup(t), which NaN fails. Nothing is above
    # +inf: that split sends everything left, and a NaN threshold makes the test false for every x.
    right = np.float32(np.nan) if t == F32_INF else -np.nextafter(t, F32_INF)
    return Test(Column(True, zero, split.feature), np.float32(right), False)


# --- graph building ----------------------------------------------------------------------------------------


class _Builder:
    """Collects nodes and initializers under unique PREFIX names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{PREFIX}{hint}_{self._count}"

    def const(self, hint: str, value: npt.ArrayLike, dtype: type[np.generic]) -> str:
        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], output: str | None = None,
           **attrs: int | list[int]) -> str:
        out = output or self._name(op_type.lower())
        node = helper.make_node(op_type, list(inputs), [out], name=self._name(op_type))
        node.attribute.extend(helper.make_attribute(key, value) for key, value in attrs.items())
        self.nodes.append(node)
        return out


def _tested_values(g: _Builder, x: str, columns: Sequence[Column]) -> str:
    """(n, len(columns)): the columns, in order (sorted: plain, then zero-missing, negated last)."""
    blocks = []
    for negated, zero in sorted({(c.negated, c.zero_is_missing) for c in columns}):
        features = [c.feature for c in columns if (c.negated, c.zero_is_missing) == (negated, zero)]
        v = g.op("Gather", [x, g.const("features", features, np.int64)], axis=1)
        if zero:  # missing type Zero: zeros (|x| <= 1e-35) become NaN, missing like NaN itself
            tiny = g.op("LessOrEqual", [g.op("Abs", [v]), g.const("zero", ZERO_THRESHOLD, np.float32)])
            v = g.op("Where", [tiny, g.const("nan", np.nan, np.float32), v])
        blocks.append(g.op("Neg", [v]) if negated else v)
    return blocks[0] if len(blocks) == 1 else g.op("Concat", blocks, axis=1)


@dataclass(frozen=True)
class _Lowered:
    tests: tuple[tuple[Test, ...], ...]  # per tree, per split
    columns: tuple[Column, ...]

    @classmethod
    def of(cls, forest: Forest) -> _Lowered:
        tests = tuple(tuple(lower(s) for s in tree.splits) for tree in forest.trees)
        return cls(tests, tuple(sorted({t.column for tree in tests for t in tree})))

    def index(self) -> dict[Column, int]:
        return {c: i for i, c in enumerate(self.columns)}


def _paths(tree: Tree, tests: Sequence[Test]) -> Iterator[tuple[int, list[tuple[int, bool]]]]:
    """(leaf, [(split, test outcome that leads to the leaf), ...]) for every leaf."""
    if not tree.splits:
        yield 0, []
        return
    stack: list[tuple[int, list[tuple[int, bool]]]] = [(0, [])]
    while stack:
        node, path = stack.pop()
        split, test = tree.splits[node], tests[node]
        for child, went_left in ((split.left, True), (split.right, False)):
            step = [*path, (node, went_left == test.true_is_left)]
            if child < 0:
                yield ~child, step
            else:
                stack.append((child, step))


@dataclass(frozen=True, eq=False)
class _GemmTables:
    """The GEMM formulation's constants; T trees, I most splits, L most leaves, K classes (padded with
    splits that nothing reads and leaves that nothing reaches)."""

    column: npt.NDArray[np.int64]  # (T, I): each split's column of the tested values
    threshold: npt.NDArray[np.float32]  # (T, I, 1)
    paths: npt.NDArray[np.float32]  # (T, L, I): +1 / -1 where the leaf needs the test true / false
    wanted: npt.NDArray[np.float32]  # (T, L, 1): number of +1 of the leaf (a padding leaf: -1, never met)
    scores: npt.NDArray[np.float32]  # (3 K, T L): leaf values summed per class, in three TF32-exact parts

    @classmethod
    def of(cls, forest: Forest, low: _Lowered) -> _GemmTables:
        where = low.index()
        n_trees, k = len(forest.trees), forest.num_class
        width = max(len(t.splits) for t in forest.trees)
        height = max(len(t.leaves) for t in forest.trees)
        column = np.zeros((n_trees, width), dtype=np.int64)
        threshold = np.zeros((n_trees, width, 1), dtype=np.float32)
        paths = np.zeros((n_trees, height, width), dtype=np.float32)
        wanted = np.full((n_trees, height, 1), -1.0, dtype=np.float32)
        value = np.zeros((k, n_trees, height), dtype=np.float32)
        for t, (tree, tests) in enumerate(zip(forest.trees, low.tests, strict=True)):
            for i, test in enumerate(tests):
                column[t, i], threshold[t, i, 0] = where[test.column], test.threshold
            for leaf, path in _paths(tree, tests):
                for i, outcome in path:
                    paths[t, leaf, i] = 1.0 if outcome else -1.0
                wanted[t, leaf, 0] = sum(outcome for _, outcome in path)
                value[t % k, t, leaf] = tree.leaves[leaf]
        return cls(column, threshold, paths, wanted, tf32_parts(value.reshape(k, -1)))


def tf32_parts(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """(3 n, ...) float32 parts of 11 significant bits or fewer, summing exactly to `values`.

    A GPU MatMul in TF32 (the CUDA provider's default) rounds its inputs to 11 significant bits: these
    parts pass through unchanged, so the products by 0 / 1 that select leaf values are exact either way."""
    v = np.ascontiguousarray(values, dtype=np.float32)
    parts = []
    for _ in range(2):
        high = (v.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)  # keep 1 + 10 mantissa bits
        parts.append(high)
        v = v - high  # exact: the low mantissa bits of v
    parts.append(v)  # 24 - 2 * 11 = 2 significant bits at most
    return np.concatenate(parts, axis=0)


def _gemm(g: _Builder, x: str, forest: Forest) -> str:
    """(n, num_class) raw scores, the GEMM way (see the module docstring)."""
    low = _Lowered.of(forest)
    tab = _GemmTables.of(forest, low)
    n_trees, height = tab.paths.shape[:2]
    values = g.op("Transpose", [_tested_values(g, x, low.columns)], perm=[1, 0])  # (columns, n)
    v = g.op("Gather", [values, g.const("column", tab.column, np.int64)], axis=0)  # (T, I, n)
    went = g.op("LessOrEqual", [v, g.const("threshold", tab.threshold, np.float32)])
    p = g.op("MatMul", [g.const("paths", tab.paths, np.float32), g.op("Cast", [went], to=TensorProto.FLOAT)])
    hit = g.op("Equal", [p, g.const("wanted", tab.wanted, np.float32)])  # (T, L, n): one leaf per tree
    onehot = g.op("Reshape", [g.op("Cast", [hit], to=TensorProto.FLOAT),
                              g.const("shape", [n_trees * height, -1], np.int64)])
    parts = g.op("MatMul", [g.const("scores", tab.scores, np.float32), onehot])  # (3 K, n)
    parts = g.op("Reshape", [parts, g.const("shape", [3, forest.num_class, -1], np.int64)])
    per_class = g.op("ReduceSum", [parts, g.const("axis", [0], np.int64)], keepdims=0)  # (K, n)
    return g.op("Transpose", [per_class], perm=[1, 0])


def _trees(g: _Builder, x: str, forest: Forest, probabilities: str, label: str) -> None:
    """Nodes from the trees' input `x` to the `probabilities` and `label` outputs, as the converter's."""
    g.op("Softmax", [_gemm(g, x, forest)], probabilities, axis=1)
    g.op("ArgMax", [probabilities], label, axis=1, keepdims=0)


# --- whole graphs ------------------------------------------------------------------------------------------


def compile_booster(
    booster: lgb.Booster | str | Path, *, graph: onnx.ModelProto | None = None, input_name: str = "input"
) -> onnx.ModelProto:
    """The booster as standard tensor operators (a str is model text, a Path a model file).

    Without `graph`: a graph `input_name` (n, num_feature) float32 -> `label` (n,) int64, `probabilities`
    (n, num_class) float32. With `graph` (an onnxmltools export, e.g. models/current.onnx): that graph with
    its TreeEnsembleClassifier node replaced and everything else kept; the booster must be its trees.
    """
    forest = parse_model(model_text(booster))
    model = _standalone(forest, input_name) if graph is None else _splice(graph, forest)
    check_ops(model)
    onnx.checker.check_model(model)
    return model


def _standalone(forest: Forest, input_name: str) -> onnx.ModelProto:
    g = _Builder()
    _trees(g, input_name, forest, "probabilities", "label")
    graph = helper.make_graph(
        g.nodes,
        "mailsift_tensor_trees",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [None, forest.num_feature])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, forest.num_class]),
        ],
        g.initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


def _splice(graph: onnx.ModelProto, forest: Forest) -> onnx.ModelProto:
    """`graph` with its tree ensemble node replaced by the compiled trees, reading and writing its tensors."""
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    nodes = list(model.graph.node)
    ensembles = [i for i, n in enumerate(nodes) if n.op_type == "TreeEnsembleClassifier"]
    if len(ensembles) != 1:
        raise CompileError(f"the graph has {len(ensembles)} TreeEnsembleClassifier nodes, expected one")
    at = ensembles[0]
    _check_same_trees(nodes[at], forest)
    g = _Builder()
    _trees(g, nodes[at].input[0], forest, nodes[at].output[1], nodes[at].output[0])
    del model.graph.node[:]
    model.graph.node.extend([*nodes[:at], *g.nodes, *nodes[at + 1 :]])
    model.graph.initializer.extend(g.initializers)
    # the ai.onnx.ml import goes with its only node; ai.onnx rises to what the compiled nodes need
    opsets = {o.domain: o.version for o in model.opset_import if o.domain != "ai.onnx.ml"}
    opsets[""] = max(opsets.get("", 0), OPSET)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(opsets.items()))
    model.ir_version = max(model.ir_version, 7)
    return model


def _check_same_trees(node: onnx.NodeProto, forest: Forest) -> None:
    """The node to replace must hold the booster's trees (counted), classes and softmax."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    trees = len(set(attrs.get("nodes_treeids", [])))
    labels = list(attrs.get("classlabels_int64s", []))
    if attrs.get("post_transform") != b"SOFTMAX" or labels != list(range(forest.num_class)):
        raise CompileError("the graph's tree ensemble is not a softmax over classes 0..k-1")
    if trees != len(forest.trees):
        raise CompileError(
            f"the graph holds {trees} trees, the booster {len(forest.trees)}: not the same model"
        )


def used_ops(model: onnx.ModelProto) -> set[str]:
    """Every operator of the graph, as `domain:op` for other domains than ai.onnx."""
    return {n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}" for n in model.graph.node}


def check_ops(model: onnx.ModelProto) -> None:
    outside = used_ops(model) - OPS
    if outside:
        raise CompileError(f"the graph uses operators outside OPS (no CUDA kernel known): {sorted(outside)}")

