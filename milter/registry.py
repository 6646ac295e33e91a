"""Model history: promote a validated model to current, list what was promoted, roll back.

Layout of a model directory (the folder of `[model] path`, models/ by default):

    current.onnx, current.json        what the gateway loads
    current.lgb.txt                   the same trees as LightGBM text, for explanations (milter.explain)
    current.tensor.onnx               the same trees as standard tensor operators, for the CUDA provider
                                      (docs/gpu.md; older models have none)
    history/<name>.onnx, .json, .lgb.txt, .tensor.onnx   every model ever promoted (name = "name")

A candidate is validated before anything changes: its metadata must carry the sha256 of its ONNX file,
`Classifier.load` must accept it (feature-schema check) and a smoke scan of the sample fixtures must
give finite probabilities that sum to 1; the explainer its metadata names must match its digest and
compute the graph's probabilities (older models without one are accepted, with a warning); so must the
tensor graph it names (on the CPU provider, against the TreeEnsemble graph's probabilities). The swap
writes the files under temporary names in the same directory, then replaces current.onnx, then
current.lgb.txt and current.tensor.onnx, and last current.json. A reader that loads the JSON first and
the ONNX second can therefore only ever catch "old JSON + new ONNX", which the sha256 in the JSON
exposes; it never gets a silently mismatched pair.

history/log.jsonl records every change of the current model (time, name, action): it is the audit
trail, and what `rollback()` without a name follows back to the model that was current before.

With [model] registry = "store" the fleet's registry in the store decides (milter.store.registry), and
each node installs the fleet's current model here with `adopt`: the same validation and swap, action
"fleet" in the log, so a node that restarts while the store is down still loads that model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from milter.classifier import (
    CPU,
    CUDA_PARITY_TOLERANCE,
    Classifier,
    ModelMetadata,
    load_metadata,
    read_tensor_graph,
    tensor_graph_path,
)
from milter.errors import ConfigError, ModelError
from milter.explain import Explainer, explainer_path
from milter.features import SCHEMA

log = logging.getLogger(__name__)

CURRENT_ONNX, CURRENT_JSON = "current.onnx", "current.json"
HISTORY = "history"
LOCK = ".registry.lock"
#: Written before a swap's first rename, removed after its last: the model being made current (`_swap`).
JOURNAL = ".swap"
LOG = "log.jsonl"  # inside history/
SAMPLES = Path(__file__).resolve().parent.parent / "fixtures" / "sample"
PROB_TOLERANCE = 1e-3  # float32 probabilities from the ONNX graph sum to 1 within rounding
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")

# Used only when the checkout's fixtures are not installed beside the package: enough to exercise
# the graph on a ham-like, a spam-like and a near-empty message.
_BUILTIN_SAMPLES = (
    b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: Lunch on Friday?\r\n"
    b"Message-ID: <s1@example.com>\r\n\r\nShall we meet at noon as usual?\r\n",
    b"From: Deals <win@promo.example>\r\nTo: bob@example.org\r\nSubject: WIN a FREE prize now!!!\r\n"
    b"Content-Type: text/html\r\n\r\n<a href='http://198.51.100.7/claim'>Click here to claim</a>\r\n",
    b"Subject: \r\n\r\n",
)


@dataclass(frozen=True)
class ModelInfo:
    """One row of `list_models`: a promoted model (or a current one that never went through history)."""

    name: str
    created: datetime | None
    schema_version: str
    schema_digest: str
    schema_ok: bool  # the digest matches the feature schema this code computes
    metrics: Mapping[str, float | None] = field(default_factory=dict)  # quarantine level, all corpora
    is_current: bool = False
    in_history: bool = True

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name, "created": self.created.isoformat() if self.created else None,
            "schema_version": self.schema_version, "schema_digest": self.schema_digest,
            "schema_ok": self.schema_ok, "metrics": dict(self.metrics), "current": self.is_current,
            "in_history": self.in_history,
        }


@dataclass(frozen=True)
class SwapResult:
    """What promote / rollback did: the model now current, and the one it replaced (None if none)."""

    name: str
    previous: str | None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _created(raw: Mapping[str, Any]) -> datetime | None:
    try:
        when = datetime.fromisoformat(str(raw["created"]))
    except (KeyError, ValueError):
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def _metrics_summary(raw: Mapping[str, Any]) -> dict[str, float | None]:
    """ham FPR / spam and bec recall of the test split at the quarantine threshold, pooled over corpora."""
    try:
        pooled = raw["metrics"]["quarantine"]["ALL"]
        return {k: (None if pooled.get(k) is None else float(pooled[k]))
                for k in ("ham_fpr", "spam_recall", "bec_recall") if k in pooled}
    except (KeyError, TypeError, ValueError, AttributeError):
        return {}  # older or hand-made metadata: listing must still work


def _info(meta: ModelMetadata, current: str | None, in_history: bool) -> ModelInfo:
    return ModelInfo(
        name=meta.name, created=_created(meta.raw), schema_version=meta.schema_version,
        schema_digest=meta.schema_digest,
        schema_ok=(meta.schema_digest, meta.schema_version) == (SCHEMA.digest, SCHEMA.version),
        metrics=_metrics_summary(meta.raw), is_current=meta.name == current, in_history=in_history,
    )


def _order(info: ModelInfo) -> tuple[datetime, str]:
    return (info.created or datetime.min.replace(tzinfo=UTC), info.name)


def _current_meta(directory: Path) -> ModelMetadata | None:
    path = directory / CURRENT_JSON
    return load_metadata(path) if path.exists() else None


def list_models(directory: Path) -> list[ModelInfo]:
    """Every model in history, oldest first, plus the current one if it never went through history.

    Unreadable history entries are logged and skipped rather than hiding the rest.
    """
    current = _current_meta(directory)
    current_name = current.name if current else None
    rows: list[ModelInfo] = []
    for meta_path in sorted((directory / HISTORY).glob("*.json")):
        try:
            rows.append(_info(load_metadata(meta_path), current_name, in_history=True))
        except ModelError as exc:
            log.warning("skipping history entry %s: %s", meta_path, exc)
    if current is not None and all(r.name != current.name for r in rows):
        rows.append(_info(current, current_name, in_history=False))
    return sorted(rows, key=_order)


# -- validation --------------------------------------------------------------------------------


def _sample_messages(samples: Sequence[bytes] | None) -> Sequence[bytes]:
    if samples:
        return samples
    found = [p.read_bytes() for p in sorted(SAMPLES.glob("*.eml"))]
    return found or _BUILTIN_SAMPLES


def validate(onnx_path: Path, samples: Sequence[bytes] | None = None) -> ModelMetadata:
    """Check a model whose metadata is the .json beside it; ModelError (or its subclass) if unfit.

    The sha256 check comes first: a truncated copy or a pair caught mid-swap is refused with a
    message that says so, instead of whatever ONNX Runtime makes of the bytes.
    """
    from milter.scan import prepare  # scan imports policy and features: keep `milter model list` light

    meta = load_metadata(onnx_path.with_suffix(".json"))
    if not _SAFE_NAME.match(meta.name):
        raise ModelError(f"model name {meta.name!r} is not usable as a file name")
    expected = meta.raw.get("onnx", {}).get("sha256") if isinstance(meta.raw.get("onnx"), Mapping) else None
    if not isinstance(expected, str):
        raise ModelError(f"model metadata for {meta.name} lacks onnx.sha256: cannot verify the ONNX file")
    try:
        actual = sha256_file(onnx_path)
    except OSError as exc:
        raise ModelError(f"cannot read model {onnx_path}: {exc.strerror}") from exc
    if actual != expected:
        raise ModelError(
            f"model {onnx_path} does not match its metadata (sha256 {actual[:12]}…, metadata says "
            f"{expected[:12]}…): the file is corrupt or belongs to another model"
        )
    from milter.policy import metadata_ladders  # as prepare: the policy is heavier than `model list`

    metadata_ladders(meta.raw.get("thresholds"))  # what every gateway's policy would refuse at load
    classifier = Classifier.load(onnx_path, providers=("CPUExecutionProvider",))
    messages = _sample_messages(samples)
    vectors = np.stack([prepare(raw).vector for raw in messages])
    probs = classifier.predict(vectors)
    if not np.all(np.isfinite(probs)):
        raise ModelError(f"model {meta.name} gives non-finite probabilities on the sample messages")
    worst = float(np.max(np.abs(probs.sum(axis=1) - 1.0)))
    if worst > PROB_TOLERANCE or float(probs.min()) < -PROB_TOLERANCE:
        raise ModelError(
            f"model {meta.name} gives rows that are not probabilities (|sum - 1| up to {worst:.3g})"
        )
    check_tensor_graph(onnx_path, meta, classifier, vectors)
    explainer = Explainer.load(onnx_path, meta.raw, classifier.predict)
    if explainer is None:
        log.warning("model %s ships no explainer: its verdicts will carry no per-feature reasons", meta.name)
    else:
        explainer.check_against(classifier.predict, vectors)
    log.info("model %s validated on %d sample messages", meta.name, len(messages))
    return meta


def check_tensor_graph(
    onnx_path: Path, meta: ModelMetadata, classifier: Classifier, vectors: npt.NDArray[np.float32]
) -> None:
    """The tensor graph the metadata names must be there, match its sha256 and score `vectors` as the
    TreeEnsemble graph does (on the CPU provider: what runs on CUDA is checked by each gateway at load).
    A model that names none is accepted: older models, and GPU-less fleets, do without."""
    if meta.raw.get("tensor_graph") is None:
        log.info("model %s ships no tensor graph: it will be scored on the CPU everywhere", meta.name)
        return
    tensor, absent = read_tensor_graph(onnx_path, meta)  # the classifier's own digest check
    if tensor is None:  # named by the metadata, not on disk: a pair that does not belong together
        raise ModelError(f"cannot read tensor graph: {absent}")
    path, data = tensor.path, tensor.data
    try:
        session = ort.InferenceSession(data, providers=[CPU])
        (probs,) = session.run(["probabilities"], {session.get_inputs()[0].name: vectors})
    except Exception as exc:  # onnxruntime raises its own types
        raise ModelError(f"tensor graph {path} cannot score: {exc}") from exc
    worst = float(np.max(np.abs(np.asarray(probs, dtype=np.float64) - classifier.predict(vectors))))
    if not worst <= CUDA_PARITY_TOLERANCE:
        raise ModelError(f"tensor graph {path} scores otherwise than the model's graph (max probability "
                         f"difference {worst:.3g} > {CUDA_PARITY_TOLERANCE:g}): not the same trees")


# -- file operations ---------------------------------------------------------------------------


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One promote / rollback at a time (the nightly timer and an operator may meet)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / LOCK).open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_temp(src: Path, directory: Path) -> Path:
    """A durable copy of `src` under a temporary name in `directory` (same filesystem as the target)."""
    fd, name = tempfile.mkstemp(prefix=f".{src.name}.", suffix=".tmp", dir=directory)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
            shutil.copyfileobj(inp, out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the gateway may run as another user than the trainer
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def companions(onnx_path: Path) -> list[Path]:
    """The files that travel with a model's graph: its explainer and its tensor graph (either may be
    absent: models from before them)."""
    return [explainer_path(onnx_path), tensor_graph_path(onnx_path)]


def _swap(directory: Path, onnx_src: Path, json_src: Path, name: str) -> None:
    """Make (onnx_src, its companions, json_src) current: all staged first, then .onnx replaced, then the
    companions, then .json. A companion the model lacks is removed after the .json (no stale explainer
    or tensor graph of another model stays current).

    The files are replaced one by one, so a process killed between two renames would leave a current
    .onnx and .json of two models, which no gateway loads (their sha256 differ) and which rollback
    cannot name. The journal (JOURNAL: `name`, already in history) is written durably before the first
    rename and removed after the last: whoever takes the lock next, or a gateway before it loads its
    model (`recover`), finishes the swap from history."""
    current_onnx = directory / CURRENT_ONNX
    shipped = [(src, dst) for src, dst in zip(companions(onnx_src), companions(current_onnx), strict=True)
               if src.is_file()]
    pairs = [(onnx_src, current_onnx), *shipped, (json_src, directory / CURRENT_JSON)]
    staged: list[tuple[Path, Path]] = []
    try:
        for src, dst in pairs:
            staged.append((_copy_temp(src, directory), dst))
        _write_journal(directory, name)
        for tmp, dst in staged:
            os.replace(tmp, dst)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    for src, dst in zip(companions(onnx_src), companions(current_onnx), strict=True):
        if not src.is_file():
            dst.unlink(missing_ok=True)
    _fsync_dir(directory)
    (directory / JOURNAL).unlink(missing_ok=True)
    _fsync_dir(directory)


def _write_journal(directory: Path, name: str) -> None:
    tmp = directory / f"{JOURNAL}.tmp"
    with tmp.open("w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / JOURNAL)
    _fsync_dir(directory)


def _finish_interrupted_swap(directory: Path) -> str | None:
    """The lock is held: complete a swap the journal names (see `_swap`); the model's name, or None."""
    journal = directory / JOURNAL
    try:
        name = journal.read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # unreadable or not text: nothing to finish from
        log.error("cannot read the interrupted-swap journal %s (%s): current files left as they are",
                  journal, exc)
        journal.unlink(missing_ok=True)
        return None
    src = directory / HISTORY / f"{name}.onnx"
    if _SAFE_NAME.match(name) and src.is_file() and src.with_suffix(".json").is_file():
        _swap(directory, src, src.with_suffix(".json"), name)
        logged = _logged_names(directory)
        if not logged or logged[-1] != name:  # killed before it was logged: rollback reads the log
            _record_change(directory, None, name, "recovered")
        log.warning("finished an interrupted swap to model %s (from history)", name)
        return name
    log.error("an interrupted swap names model %r, which %s does not hold: current files left as they are",
              name, directory / HISTORY)
    journal.unlink(missing_ok=True)
    return None


def recover(directory: Path) -> str | None:
    """Finish a promote, adoption or rollback that was killed half-way (`_swap`), so that the current
    files are one model's again; the model's name, or None when there was nothing to finish. A gateway
    calls it before it loads its model; every promote, adoption and rollback does first."""
    if not (directory / JOURNAL).exists():
        return None
    with _locked(directory):
        return _finish_interrupted_swap(directory)


def _same_bytes(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and sha256_file(a) == sha256_file(b)


def _archive(history: Path, name: str, onnx_src: Path, json_src: Path) -> None:
    """Put a model into history under its name; an existing entry must hold the same bytes."""
    history.mkdir(parents=True, exist_ok=True)
    dst_onnx, dst_json = history / f"{name}.onnx", history / f"{name}.json"
    extra = [(src, dst) for src, dst in zip(companions(onnx_src), companions(dst_onnx), strict=True)
             if src.is_file()]
    if dst_onnx.exists() and dst_json.exists():
        if _same_bytes(onnx_src, dst_onnx) and _same_bytes(json_src, dst_json):
            for src, dst in extra:  # an entry archived before it had this companion
                if not dst.is_file():
                    os.replace(_copy_temp(src, history), dst)
            return
        raise ModelError(f"history already holds a different model named {name}")
    for src, dst in [(onnx_src, dst_onnx), *extra, (json_src, dst_json)]:
        os.replace(_copy_temp(src, history), dst)
    _fsync_dir(history)


def _archive_current(directory: Path) -> str | None:
    """Keep the outgoing current model (e.g. written by milter-train directly) so rollback can reach it."""
    onnx, meta_path = directory / CURRENT_ONNX, directory / CURRENT_JSON
    if not (onnx.exists() and meta_path.exists()):
        return None
    try:
        meta = load_metadata(meta_path)
    except ModelError as exc:
        log.warning("current model metadata unreadable, not archived: %s", exc)
        return None
    if _SAFE_NAME.match(meta.name):
        try:
            _archive(directory / HISTORY, meta.name, onnx, meta_path)
        except ModelError as exc:  # a name clash must not block replacing a model
            log.warning("current model not archived: %s", exc)
    return meta.name


def _log(directory: Path, name: str, action: str) -> None:
    """Append one line to history/log.jsonl (durably: it decides what a later rollback returns to)."""
    entry = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "name": name, "action": action}
    with (directory / HISTORY / LOG).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _logged_names(directory: Path) -> list[str]:
    """Names that became current, oldest first; unreadable lines are skipped (the log is advisory)."""
    try:
        text = (directory / HISTORY / LOG).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    names = []
    for line in text.splitlines():
        try:
            names.append(str(json.loads(line)["name"]))
        except (ValueError, KeyError, TypeError):
            continue
    return names


def _record_change(directory: Path, previous: str | None, name: str, action: str) -> None:
    # A current model that never went through promote (written by milter-train) enters the log first,
    # so that rolling back from its successor finds it.
    logged = _logged_names(directory)
    if previous is not None and (not logged or logged[-1] != previous):
        _log(directory, previous, "was-current")
    _log(directory, name, action)


def promote(
    directory: Path, onnx_path: Path, json_path: Path | None = None, samples: Sequence[bytes] | None = None
) -> SwapResult:
    """Validate a candidate, add it to history and make it current; ModelError leaves current untouched.

    `json_path` defaults to the .json beside `onnx_path`. The candidate is validated from its staged
    copy inside `directory`, so the bytes checked are the bytes installed.
    """
    json_path = json_path or onnx_path.with_suffix(".json")
    for path in (onnx_path, json_path):
        if not path.is_file():
            raise ModelError(f"candidate file {path} not found")
    with _locked(directory):
        _finish_interrupted_swap(directory)
        stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=directory))
        try:
            staged = stage / "candidate.onnx"
            shutil.copyfile(onnx_path, staged)
            shutil.copyfile(json_path, staged.with_suffix(".json"))
            for src, dst in zip(companions(onnx_path), companions(staged), strict=True):
                if src.is_file():
                    shutil.copyfile(src, dst)
            done = _install_staged(directory, staged, "promote", samples)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    log.info("promoted model %s (previous: %s)", done.name, done.previous)
    return done


def _install_staged(
    directory: Path, staged: Path, action: str, samples: Sequence[bytes] | None
) -> SwapResult:
    """Validate the staged candidate, keep it in history, make it current; the lock is held."""
    meta = validate(staged, samples)
    previous = _archive_current(directory)
    _archive(directory / HISTORY, meta.name, staged, staged.with_suffix(".json"))
    _swap(directory, staged, staged.with_suffix(".json"), meta.name)
    _record_change(directory, previous, meta.name, action)
    return SwapResult(name=meta.name, previous=previous)


def current_digest(directory: Path) -> str | None:
    """The ONNX sha256 the current model's metadata declares; None when there is none or it is unreadable."""
    try:
        meta = _current_meta(directory)
    except ModelError:
        return None
    onnx = meta.raw.get("onnx") if meta is not None else None
    digest = onnx.get("sha256") if isinstance(onnx, Mapping) else None
    return digest if isinstance(digest, str) else None


@dataclass(frozen=True)
class FleetModel:
    """A model as the fleet's registry hands it out (milter.store.registry.ModelFiles, without the
    store: this module stays importable by the CLI without SQLAlchemy's cost)."""

    name: str
    onnx_sha256: str
    onnx: bytes
    meta_json: bytes
    lgb_text: bytes | None = None
    tensor_onnx: bytes | None = None  # the tensor graph (None: a model without one)


def write_files(
    staged: Path, onnx: bytes, meta_json: bytes, lgb_text: bytes | None, tensor_onnx: bytes | None
) -> None:
    """A model's files as `staged` (.onnx), its .json and the companions it has, for validation or install:
    a model fetched from the fleet's store arrives as bytes."""
    staged.write_bytes(onnx)
    staged.with_suffix(".json").write_bytes(meta_json)
    for path, data in zip(companions(staged), (lgb_text, tensor_onnx), strict=True):
        if data is not None:
            path.write_bytes(data)


def adopt(directory: Path, model: FleetModel, samples: Sequence[bytes] | None = None) -> SwapResult | None:
    """Make the fleet's `model` current here, validated exactly as a promotion; None when it already is.

    Several worker processes of one node adopt the same model at about the same time: under the
    directory's lock the first installs it and the others find current.json already naming its digest.
    ModelError (a model unfit here, or bytes that are not what the store says) leaves current untouched.
    """
    if not _SAFE_NAME.match(model.name):
        raise ModelError(f"model name {model.name!r} is not usable as a file name")
    if hashlib.sha256(model.onnx).hexdigest() != model.onnx_sha256:
        raise ModelError(f"model {model.name}: the ONNX bytes fetched do not match the store's sha256")
    with _locked(directory):
        _finish_interrupted_swap(directory)
        if current_digest(directory) == model.onnx_sha256:
            return None
        stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=directory))
        try:
            staged = stage / "candidate.onnx"
            write_files(staged, model.onnx, model.meta_json, model.lgb_text, model.tensor_onnx)
            meta = load_metadata(staged.with_suffix(".json"))
            if meta.name != model.name:
                raise ModelError(f"model {model.name}: its metadata names it {meta.name!r}")
            done = _install_staged(directory, staged, "fleet", samples)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    log.info("adopted the fleet's model %s (previous: %s)", done.name, done.previous)
    return done


def _previous_name(directory: Path, current: str, entries: Sequence[ModelInfo]) -> str:
    """The model current before `current`: from the log, else the newest one created before it."""
    available = {r.name for r in entries}
    for name in reversed(_logged_names(directory)):
        if name != current and name in available:
            return name
    here = next((r for r in list_models(directory) if r.name == current), None)
    older = [r for r in entries if here is not None and _order(r) < _order(here)]
    if not older:
        raise ModelError(f"no earlier model in history to roll back to from {current}")
    return older[-1].name


def rollback(directory: Path, to: str | None = None, samples: Sequence[bytes] | None = None) -> SwapResult:
    """Make a history entry current again: `to` by name, or the model that was current before.

    Rolling back twice without a name therefore returns to where it started (like an undo). The entry
    is validated like a candidate: a model from before a feature-schema change is refused.
    """
    with _locked(directory):
        _finish_interrupted_swap(directory)
        current = _current_meta(directory)
        entries = [r for r in list_models(directory) if r.in_history]
        if to is None:
            if current is None:
                raise ModelError(f"no current model in {directory}: name the model to roll back to")
            to = _previous_name(directory, current.name, entries)
        if not _SAFE_NAME.match(to) or not (directory / HISTORY / f"{to}.onnx").is_file():
            known = ", ".join(r.name for r in entries) or "none"
            raise ModelError(f"no model named {to!r} in {directory / HISTORY} (known: {known})")
        src = directory / HISTORY / f"{to}.onnx"
        meta = validate(src, samples)
        previous = _archive_current(directory)
        _swap(directory, src, src.with_suffix(".json"), meta.name)
        _record_change(directory, previous, meta.name, "rollback")
    log.info("rolled back to model %s (previous: %s)", meta.name, previous)
    return SwapResult(name=meta.name, previous=previous)


def model_dir(model_path: Path) -> Path:
    """The registry directory of a configured model path (its folder)."""
    return model_path.parent


def registry_dir(model_path: Path) -> Path:
    """The folder the registry installs models into for a gateway configured with `model_path`.
    ConfigError naming `model.path` unless that path is the folder's current.onnx: promote, rollback
    and the nightly retrain install a model as current.onnx, so for a gateway serving any other file
    they would install models it never loads, and the retrain would compare its challenger with a
    model that serves no mail (or with none, promoting a worse one uncompared). Such a gateway pins
    its model; the registry's commands then take an explicit folder (--dir, --models-dir)."""
    if model_path.name != CURRENT_ONNX:
        raise ConfigError(
            "model.path",
            f"names {model_path.name!r}, but the registry installs models as {CURRENT_ONNX} beside it, "
            f"which this gateway would not load: set model.path to {model_path.parent / CURRENT_ONNX} "
            "(or name the models folder explicitly to act on it anyway)",
        )
    return model_path.parent


def describe_metrics(metrics: Mapping[str, float | None]) -> str:
    """'ham FPR 0.05% · spam 98.9% · bec 97.5%' for tables; '' when unknown."""
    labels = {"ham_fpr": "ham FPR", "spam_recall": "spam", "bec_recall": "bec"}
    parts = []
    for key, label in labels.items():
        value = metrics.get(key)
        if value is not None and math.isfinite(value):
            parts.append(f"{label} {value:.2%}")
    return " · ".join(parts)


__all__ = ["FleetModel", "ModelInfo", "SwapResult", "adopt", "check_tensor_graph", "companions",
           "current_digest", "describe_metrics", "list_models", "model_dir", "promote", "recover",
           "rollback", "validate", "write_files"]
