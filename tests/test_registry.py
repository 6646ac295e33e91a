"""Model registry: promote validates first and never harms the current model; history; rollback.

Every test works on copies of the shipped model in tmp_path (models/ itself is never touched). Model
variants differ in their bytes without a new training run: a protobuf field appended to the ONNX file
(a doc_string; the last occurrence of a field wins), with the metadata's name and sha256 to match.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from milter.classifier import tensor_graph_path
from milter.commands.model import model
from milter.config import DEFAULT_MODEL, PolicyConfig
from milter.errors import ModelError, SchemaMismatchError
from milter.explain import explainer_path
from milter.features import SCHEMA
from milter.registry import (
    CURRENT_JSON,
    CURRENT_ONNX,
    HISTORY,
    LOG,
    list_models,
    promote,
    rollback,
    validate,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
# A few real messages keep the API tests fast; the CLI test runs the full default smoke scan.
SAMPLES = [p.read_bytes() for p in sorted((FIXTURES / "sample").glob("*.eml"))[:6]]


@dataclass(frozen=True)
class Candidate:
    onnx: Path
    json: Path
    name: str

    def pair(self) -> tuple[bytes, bytes]:
        return self.onnx.read_bytes(), self.json.read_bytes()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def make_candidate(where: Path, name: str, created: str, *, onnx_bytes: bytes | None = None,
                   schema_digest: str | None = None, fix_sha: bool = True,
                   explainer: bool = True, tensor: bool = True) -> Candidate:
    """A copy of the shipped model renamed `name`; its ONNX bytes made unique unless given. With the
    shipped explainer and tensor graph beside it, or (explainer=False, tensor=False) as a model from
    before them."""
    where.mkdir(parents=True, exist_ok=True)
    if onnx_bytes is None:
        doc = f"variant {name}".encode()
        onnx_bytes = DEFAULT_MODEL.read_bytes() + b"\x32" + _varint(len(doc)) + doc  # field 6: doc_string
    meta = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
    meta["name"], meta["created"] = name, created
    if schema_digest is not None:
        meta["schema"]["digest"] = schema_digest
    if fix_sha:
        meta["onnx"]["sha256"] = hashlib.sha256(onnx_bytes).hexdigest()
    onnx, js = where / f"{name}.onnx", where / f"{name}.json"
    if explainer:
        shutil.copyfile(explainer_path(DEFAULT_MODEL), explainer_path(onnx))
    else:
        del meta["explainer"]
    if tensor:
        shutil.copyfile(tensor_graph_path(DEFAULT_MODEL), tensor_graph_path(onnx))
    else:
        del meta["tensor_graph"]
    onnx.write_bytes(onnx_bytes)
    js.write_text(json.dumps(meta, indent=2) + "\n")
    return Candidate(onnx, js, name)


def current_pair(directory: Path) -> tuple[bytes, bytes]:
    return (directory / CURRENT_ONNX).read_bytes(), (directory / CURRENT_JSON).read_bytes()


def leftovers(directory: Path) -> list[str]:
    """Temporary files or staging folders a failed promotion must not leave behind."""
    return sorted(p.name for p in directory.rglob("*") if ".tmp" in p.name or p.name.startswith(".stage"))


@pytest.fixture
def models(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture
def a_and_b(tmp_path: Path, models: Path) -> tuple[Candidate, Candidate]:
    """Two promoted models: a (older) then b (current)."""
    a = make_candidate(tmp_path / "cand", "model-a", "2024-05-01T02:30:00+00:00")
    b = make_candidate(tmp_path / "cand", "model-b", "2024-05-02T02:30:00+00:00")
    assert promote(models, a.onnx, samples=SAMPLES).name == "model-a"
    done = promote(models, b.onnx, samples=SAMPLES)
    assert (done.name, done.previous) == ("model-b", "model-a")
    return a, b


def _with_thresholds(cand: Candidate, thresholds: dict[str, dict[str, float]]) -> Candidate:
    meta = json.loads(cand.json.read_text())
    meta["thresholds"] = thresholds
    cand.json.write_text(json.dumps(meta, indent=2) + "\n")
    return cand


@pytest.mark.parametrize(
    ("thresholds", "refused"),
    [
        ({"spam": {"tag": 0.99, "quarantine": 0.10}, "bec": {"tag": 0.8, "quarantine": 0.9}},
         "spam.quarantine"),  # a tag step no score could reach before the quarantine one
        ({"spam": {"tag": 0.9, "quarantine": 0.95}, "bec": {"tag": -0.1, "quarantine": 0.9}}, "bec.tag"),
        ({"spam": {"tag": 0.9, "quarantine": float("nan")}, "bec": {"tag": 0.8, "quarantine": 0.9}},
         "spam.quarantine"),
    ],
)
def test_thresholds_a_gateway_would_refuse_are_refused_at_promotion(
    tmp_path: Path, models: Path, a_and_b: tuple[Candidate, Candidate],
    thresholds: dict[str, dict[str, float]], refused: str,
) -> None:
    """Before, promote checked no thresholds: every gateway then refused the current model at its
    next reload or start (and a fleet node, having installed it, could not start at all)."""
    before = current_pair(models)
    bad = _with_thresholds(make_candidate(tmp_path / "bad", "model-c", "2024-05-03T00:00:00+00:00"),
                           thresholds)
    with pytest.raises(ModelError, match=refused):
        promote(models, bad.onnx, samples=SAMPLES)
    assert current_pair(models) == before


def test_a_class_without_training_examples_is_served_with_that_ladder_off(tmp_path: Path) -> None:
    """Training writes 2.0 (thresholds.DISABLED) for a class it had no examples of: a cut no
    probability reaches. Before, every gateway refused such a model ("must be within [0, 1]")."""
    from milter.policy import Policy, metadata_ladders

    off = {"spam": {"tag": 0.9, "quarantine": 0.95}, "bec": {"tag": 2.0, "quarantine": 2.0}}
    cand = _with_thresholds(make_candidate(tmp_path, "no-bec", "2024-05-03T00:00:00+00:00"), off)
    assert validate(cand.onnx, SAMPLES).name == "no-bec"
    spam, bec = metadata_ladders(off)
    assert (spam.tag, spam.quarantine) == (0.9, 0.95) and (bec.tag, bec.quarantine) == (None, None)
    assert Policy(PolicyConfig(), off).default_rules.bec.rows == ()


def test_variants_still_load_and_differ(tmp_path: Path) -> None:
    a = make_candidate(tmp_path, "model-a", "2024-05-01T00:00:00+00:00")
    assert a.onnx.read_bytes() != DEFAULT_MODEL.read_bytes()
    assert validate(a.onnx, SAMPLES).name == "model-a"


def test_promote_installs_byte_for_byte_and_lists_history(models: Path,
                                                          a_and_b: tuple[Candidate, Candidate]) -> None:
    a, b = a_and_b
    assert current_pair(models) == b.pair()
    assert (models / HISTORY / "model-a.onnx").read_bytes() == a.onnx.read_bytes()
    rows = list_models(models)
    assert [(r.name, r.is_current, r.in_history) for r in rows] == [
        ("model-a", False, True), ("model-b", True, True)]
    assert all(r.schema_ok and r.schema_digest == SCHEMA.digest for r in rows)
    assert set(rows[0].metrics) >= {"ham_fpr", "spam_recall"}
    assert leftovers(models) == []


def test_wrong_schema_digest_is_refused_and_current_kept(tmp_path: Path, models: Path,
                                                         a_and_b: tuple[Candidate, Candidate]) -> None:
    before = current_pair(models)
    bad = make_candidate(tmp_path / "bad", "model-c", "2024-05-03T00:00:00+00:00",
                         schema_digest="0" * 16)
    with pytest.raises(SchemaMismatchError, match="feature schema"):
        promote(models, bad.onnx, samples=SAMPLES)
    assert current_pair(models) == before
    assert not (models / HISTORY / "model-c.onnx").exists()
    assert [r.name for r in list_models(models)] == ["model-a", "model-b"]
    assert leftovers(models) == []


@pytest.mark.parametrize("damage", ["truncated", "garbage-with-matching-sha"])
def test_corrupt_model_is_refused_and_current_kept(tmp_path: Path, models: Path, damage: str,
                                                   a_and_b: tuple[Candidate, Candidate]) -> None:
    before = current_pair(models)
    if damage == "truncated":  # a partial copy: the metadata's sha256 no longer matches
        good = make_candidate(tmp_path / "src", "model-c", "2024-05-03T00:00:00+00:00")
        good.onnx.write_bytes(good.onnx.read_bytes()[:4096])
        cand, expected = good, "does not match its metadata"
    else:  # consistent metadata around bytes ONNX Runtime cannot read
        cand = make_candidate(tmp_path / "src", "model-c", "2024-05-03T00:00:00+00:00",
                              onnx_bytes=b"\x00not an onnx model" * 64)
        expected = "cannot load model"
    with pytest.raises(ModelError, match=expected):
        promote(models, cand.onnx, samples=SAMPLES)
    assert current_pair(models) == before
    assert not (models / HISTORY / "model-c.onnx").exists()
    assert leftovers(models) == []


def test_reader_catching_new_onnx_with_old_json_is_told(models: Path,
                                                       a_and_b: tuple[Candidate, Candidate]) -> None:
    """The one inconsistent state the swap order allows is detected by the sha256 in the metadata."""
    a, _ = a_and_b
    shutil.copyfile(a.onnx, models / CURRENT_ONNX)  # as if caught between the two os.replace calls
    with pytest.raises(ModelError, match="does not match its metadata"):
        validate(models / CURRENT_ONNX, SAMPLES)


def test_rollback_restores_previous_files_byte_for_byte(models: Path,
                                                        a_and_b: tuple[Candidate, Candidate]) -> None:
    a, b = a_and_b
    done = rollback(models, samples=SAMPLES)
    assert (done.name, done.previous) == ("model-a", "model-b")
    assert current_pair(models) == a.pair()
    assert [r.name for r in list_models(models) if r.is_current] == ["model-a"]
    # Without a name, rollback returns to the model current before: a second one undoes the first.
    assert rollback(models, samples=SAMPLES).name == "model-b"
    assert current_pair(models) == b.pair()
    assert rollback(models, "model-a", samples=SAMPLES).name == "model-a"
    assert current_pair(models) == a.pair()
    with pytest.raises(ModelError, match="no model named 'nope'"):
        rollback(models, "nope", samples=SAMPLES)
    assert current_pair(models) == a.pair()
    log = [json.loads(line) for line in (models / HISTORY / LOG).read_text().splitlines()]
    assert [(e["name"], e["action"]) for e in log] == [
        ("model-a", "promote"), ("model-b", "promote"), ("model-a", "rollback"),
        ("model-b", "rollback"), ("model-a", "rollback")]


def test_rollback_follows_promotion_order_not_creation_date(tmp_path: Path, models: Path,
                                                            a_and_b: tuple[Candidate, Candidate]) -> None:
    """Re-promoting an older model by hand, then rolling back, returns to the model it replaced."""
    a, b = a_and_b
    assert promote(models, a.onnx, samples=SAMPLES).previous == "model-b"
    assert rollback(models, samples=SAMPLES).name == "model-b"
    assert current_pair(models) == b.pair()


def test_rollback_with_nothing_earlier_is_refused(tmp_path: Path, models: Path) -> None:
    only = make_candidate(tmp_path / "c", "model-only", "2024-05-01T00:00:00+00:00")
    promote(models, only.onnx, samples=SAMPLES)
    with pytest.raises(ModelError, match="no earlier model"):
        rollback(models, samples=SAMPLES)
    assert current_pair(models) == only.pair()


def test_rollback_refuses_history_entry_from_another_schema(tmp_path: Path, models: Path,
                                                            a_and_b: tuple[Candidate, Candidate]) -> None:
    _, b = a_and_b
    old = make_candidate(tmp_path / "old", "model-old", "2023-01-01T00:00:00+00:00", schema_digest="0" * 16)
    shutil.copyfile(old.onnx, models / HISTORY / "model-old.onnx")  # as left by an older release
    shutil.copyfile(old.json, models / HISTORY / "model-old.json")
    assert [r.schema_ok for r in list_models(models)] == [False, True, True]
    with pytest.raises(SchemaMismatchError):
        rollback(models, "model-old", samples=SAMPLES)
    assert current_pair(models) == b.pair()


def test_current_written_by_training_is_archived_on_promotion(tmp_path: Path, models: Path) -> None:
    """milter-train writes current.* directly; promoting over it must keep it reachable by rollback."""
    trained = make_candidate(tmp_path / "t", "model-trained", "2024-04-01T00:00:00+00:00")
    models.mkdir()
    shutil.copyfile(trained.onnx, models / CURRENT_ONNX)
    shutil.copyfile(trained.json, models / CURRENT_JSON)
    shutil.copyfile(explainer_path(trained.onnx), explainer_path(models / CURRENT_ONNX))
    shutil.copyfile(tensor_graph_path(trained.onnx), tensor_graph_path(models / CURRENT_ONNX))
    assert [(r.name, r.in_history, r.is_current) for r in list_models(models)] == [
        ("model-trained", False, True)]
    new = make_candidate(tmp_path / "n", "model-new", "2024-05-01T00:00:00+00:00")
    assert promote(models, new.onnx, samples=SAMPLES).previous == "model-trained"
    assert rollback(models, samples=SAMPLES).name == "model-trained"
    assert current_pair(models) == trained.pair()


def test_cli_promote_list_rollback(tmp_path: Path, models: Path) -> None:
    a = make_candidate(tmp_path / "cand", "model-a", "2024-05-01T00:00:00+00:00")
    b = make_candidate(tmp_path / "cand", "model-b", "2024-05-02T00:00:00+00:00")
    run = CliRunner().invoke
    for cand in (a, b):
        res = run(model, ["promote", "--dir", str(models), str(cand.onnx)])
        assert res.exit_code == 0, res.output
        assert f"promoted {cand.name}" in res.stdout
    listed = run(model, ["list", "--json", "--dir", str(models)])
    objs = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(o["name"], o["current"]) for o in objs] == [("model-a", False), ("model-b", True)]
    table = run(model, ["list", "--dir", str(models)])
    assert table.exit_code == 0 and "model-a" in table.stdout and "spam" in table.stdout
    res = run(model, ["rollback", "--dir", str(models)])
    assert res.exit_code == 0 and "rolled back to model-a" in res.stdout
    assert current_pair(models) == a.pair()
    bad = make_candidate(tmp_path / "bad", "model-c", "2024-05-03T00:00:00+00:00", fix_sha=False)
    res = run(model, ["promote", "--dir", str(models), str(bad.onnx)])
    assert res.exit_code == 1 and "not promoted" in res.stderr and "Traceback" not in res.output
    assert current_pair(models) == a.pair()


def test_cli_dir_defaults_to_config_model_folder(tmp_path: Path) -> None:
    a = make_candidate(tmp_path / "cand", "model-a", "2024-05-01T00:00:00+00:00")
    cfg = tmp_path / "milter.toml"
    cfg.write_text('[model]\npath = "var/models/current.onnx"\n')  # relative to the config file
    res = CliRunner().invoke(model, ["promote", "--config", str(cfg), str(a.onnx)])
    assert res.exit_code == 0, res.output
    assert current_pair(tmp_path / "var" / "models") == a.pair()


def test_a_gateway_pinned_to_another_file_is_not_installed_into(tmp_path: Path) -> None:
    """model.path naming another file than current.onnx: the gateway serves that file, so a promote
    or rollback through its config would install a current.onnx it never loads. Refused, naming the
    key; listing still works, and --dir still acts on the folder when asked to."""
    a = make_candidate(tmp_path / "cand", "model-a", "2024-05-01T00:00:00+00:00")
    cfg = tmp_path / "milter.toml"
    cfg.write_text('[model]\npath = "var/models/site.onnx"\n')
    for args in (["promote", "--config", str(cfg), str(a.onnx)], ["rollback", "--config", str(cfg)]):
        res = CliRunner().invoke(model, args)
        assert res.exit_code == 1 and "'model.path'" in res.output and "current.onnx" in res.output
    assert not (tmp_path / "var" / "models" / "current.onnx").exists()
    assert CliRunner().invoke(model, ["list", "--config", str(cfg)]).exit_code == 0
    res = CliRunner().invoke(model, ["promote", "--dir", str(tmp_path / "var" / "models"), str(a.onnx)])
    assert res.exit_code == 0 and current_pair(tmp_path / "var" / "models") == a.pair()


def test_the_explainer_travels_with_its_model(tmp_path: Path, models: Path) -> None:
    """Promotion installs and archives the explainer beside the graph; rolling back to a model from
    before explanations leaves no stale explainer of another model current."""
    old = make_candidate(tmp_path / "cand", "model-old", "2024-05-01T00:00:00+00:00", explainer=False)
    new = make_candidate(tmp_path / "cand", "model-new", "2024-05-02T00:00:00+00:00")
    promote(models, old.onnx, samples=SAMPLES)
    assert not explainer_path(models / CURRENT_ONNX).exists()
    promote(models, new.onnx, samples=SAMPLES)
    shipped = explainer_path(DEFAULT_MODEL).read_bytes()
    assert explainer_path(models / CURRENT_ONNX).read_bytes() == shipped
    assert explainer_path(models / HISTORY / "model-new.onnx").read_bytes() == shipped
    assert rollback(models, samples=SAMPLES).name == "model-old"
    assert not explainer_path(models / CURRENT_ONNX).exists()
    assert rollback(models, samples=SAMPLES).name == "model-new"
    assert explainer_path(models / CURRENT_ONNX).read_bytes() == shipped
    assert leftovers(models) == []


def test_a_candidate_with_a_broken_explainer_is_refused(tmp_path: Path, models: Path) -> None:
    good = make_candidate(tmp_path / "cand", "model-good", "2024-05-01T00:00:00+00:00")
    promote(models, good.onnx, samples=SAMPLES)
    before = current_pair(models), explainer_path(models / CURRENT_ONNX).read_bytes()
    bad = make_candidate(tmp_path / "cand", "model-bad", "2024-05-02T00:00:00+00:00")
    explainer_path(bad.onnx).write_bytes(explainer_path(bad.onnx).read_bytes()[:-100])  # truncated copy
    with pytest.raises(ModelError, match=r"explainer .* does not match its metadata"):
        promote(models, bad.onnx, samples=SAMPLES)
    explainer_path(bad.onnx).unlink()
    with pytest.raises(ModelError, match="cannot read explainer"):
        promote(models, bad.onnx, samples=SAMPLES)
    assert (current_pair(models), explainer_path(models / CURRENT_ONNX).read_bytes()) == before
    assert leftovers(models) == []


# -- the tensor graph (docs/gpu.md) -----------------------------------------------------------------


def test_the_tensor_graph_travels_with_its_model_and_rollback_restores_it(tmp_path: Path,
                                                                          models: Path) -> None:
    """Promotion installs and archives the tensor graph beside the graph; rolling back restores the
    previous model's, and to a model from before tensor graphs leaves none of another model current."""
    old = make_candidate(tmp_path / "cand", "model-old", "2024-05-01T00:00:00+00:00", tensor=False)
    a = make_candidate(tmp_path / "cand", "model-a", "2024-05-02T00:00:00+00:00")
    b = make_candidate(tmp_path / "cand", "model-b", "2024-05-03T00:00:00+00:00")
    other = tensor_graph_path(DEFAULT_MODEL).read_bytes() + b"\x32\x07variant"  # doc_string: other bytes
    tensor_graph_path(b.onnx).write_bytes(other)
    meta = json.loads(b.json.read_text())
    meta["tensor_graph"]["sha256"] = hashlib.sha256(other).hexdigest()
    b.json.write_text(json.dumps(meta, indent=2) + "\n")
    current_tensor = tensor_graph_path(models / CURRENT_ONNX)

    promote(models, old.onnx, samples=SAMPLES)
    assert not current_tensor.exists()
    promote(models, a.onnx, samples=SAMPLES)
    assert current_tensor.read_bytes() == tensor_graph_path(DEFAULT_MODEL).read_bytes()
    promote(models, b.onnx, samples=SAMPLES)
    assert current_tensor.read_bytes() == other
    assert tensor_graph_path(models / HISTORY / "model-b.onnx").read_bytes() == other
    assert tensor_graph_path(models / HISTORY / "model-a.onnx").read_bytes() == tensor_graph_path(
        DEFAULT_MODEL).read_bytes()
    assert rollback(models, samples=SAMPLES).name == "model-a"
    assert current_tensor.read_bytes() == tensor_graph_path(DEFAULT_MODEL).read_bytes()
    assert rollback(models, to="model-old", samples=SAMPLES).name == "model-old"
    assert not current_tensor.exists()
    assert leftovers(models) == []


def test_a_candidate_with_a_missing_or_mismatched_tensor_graph_is_refused(tmp_path: Path,
                                                                        models: Path) -> None:
    good = make_candidate(tmp_path / "cand", "model-good", "2024-05-01T00:00:00+00:00")
    promote(models, good.onnx, samples=SAMPLES)
    before = current_pair(models), tensor_graph_path(models / CURRENT_ONNX).read_bytes()
    bad = make_candidate(tmp_path / "cand", "model-bad", "2024-05-02T00:00:00+00:00")
    tensor = tensor_graph_path(bad.onnx)
    tensor.write_bytes(tensor.read_bytes()[:-100])  # a truncated copy
    with pytest.raises(ModelError, match=r"tensor graph .* does not match its metadata"):
        promote(models, bad.onnx, samples=SAMPLES)
    tensor.unlink()
    with pytest.raises(ModelError, match="cannot read tensor graph"):
        promote(models, bad.onnx, samples=SAMPLES)
    # a graph whose digest the metadata names but whose trees are not the model's (leaf values doubled)
    other = other_trees(tensor_graph_path(DEFAULT_MODEL).read_bytes())
    tensor.write_bytes(other)
    meta = json.loads(bad.json.read_text())
    meta["tensor_graph"]["sha256"] = hashlib.sha256(other).hexdigest()
    bad.json.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="scores otherwise than the model's graph"):
        promote(models, bad.onnx, samples=SAMPLES)
    assert (current_pair(models), tensor_graph_path(models / CURRENT_ONNX).read_bytes()) == before
    assert leftovers(models) == []


def other_trees(tensor: bytes) -> bytes:
    """The tensor graph with its leaf values doubled: a valid graph of other trees."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(tensor)
    (scores,) = [t for t in proto.graph.initializer if t.name.startswith("tg_scores")]
    scores.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scores) * 2, scores.name))
    data: bytes = proto.SerializeToString()
    return data


class _Killed(BaseException):
    """Stands for SIGKILL or a power cut at that instant (no except clause of ours catches it)."""


def _kill_before_json(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Make the next swap die after current.onnx is replaced and before current.json is; returns undo."""
    real = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name == CURRENT_JSON:
            raise _Killed()
        real(src, dst)

    monkeypatch.setattr("milter.registry.os.replace", replace)
    return lambda: monkeypatch.setattr("milter.registry.os.replace", real)


def _promotion_killed_half_way(
    tmp_path: Path, models: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Candidate, Candidate]:
    """model-a promoted, then the promotion of model-b killed between current.onnx and current.json."""
    a = make_candidate(tmp_path / "c", "model-a", "2024-05-01T00:00:00+00:00")
    b = make_candidate(tmp_path / "c", "model-b", "2024-05-02T00:00:00+00:00")
    promote(models, a.onnx, samples=SAMPLES)
    undo = _kill_before_json(monkeypatch)
    with pytest.raises(_Killed):
        promote(models, b.onnx, samples=SAMPLES)
    undo()
    return a, b


def test_a_swap_killed_half_way_is_finished_before_the_next_load(
    tmp_path: Path, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A promote killed between its renames left current.onnx of the new model beside current.json of
    the old: no gateway could load it, and rollback did not know the new one. Now the journal it wrote
    first lets the next load (`recover`, as a gateway calls it) or registry operation finish it."""
    from milter.registry import JOURNAL, recover

    a, b = _promotion_killed_half_way(tmp_path, models, monkeypatch)
    assert current_pair(models) == (b.onnx.read_bytes(), a.json.read_bytes())  # two models' files
    assert (models / JOURNAL).read_text().strip() == "model-b"
    assert recover(models) == "model-b"
    assert current_pair(models) == b.pair() and not (models / JOURNAL).exists()
    last = json.loads((models / HISTORY / LOG).read_text().splitlines()[-1])
    assert (last["name"], last["action"]) == ("model-b", "recovered")  # the log says how it came
    assert validate(models / CURRENT_ONNX, SAMPLES).name == "model-b"
    assert recover(models) is None  # nothing left to finish

    undo = _kill_before_json(monkeypatch)  # the same, killed in a rollback this time
    with pytest.raises(_Killed):
        rollback(models, samples=SAMPLES)
    undo()
    c = make_candidate(tmp_path / "c", "model-c", "2024-05-03T00:00:00+00:00")
    done = promote(models, c.onnx, samples=SAMPLES)  # the next operation finishes it first
    assert (done.name, done.previous) == ("model-c", "model-a")
    assert current_pair(models) == c.pair() and leftovers(models) == []


def test_a_gateway_finishes_an_interrupted_swap_before_it_loads(
    tmp_path: Path, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from milter.config import Config, ModelConfig, StoreConfig
    from milter.gateway.workers import load

    _promotion_killed_half_way(tmp_path, models, monkeypatch)
    config = Config(model=ModelConfig(path=models / CURRENT_ONNX, explain=False),
                    store=StoreConfig(url=f"sqlite:///{tmp_path / 'store.db'}"))
    loaded = load(config)
    try:
        assert loaded.scanner.classifier.name == "model-b"
    finally:
        loaded.store.close()
