"""The fleet's model registry (issue 16, item 2): the store's tables, the CLI against them, and two real
`milter serve` nodes on one store adopting a promotion while mail flows, and refusing a broken one.

Store and CLI tests run on SQLite and PostgreSQL (tests/store_support.py); the end-to-end test runs two
gateway processes (two workers each, separate configs and model directories) on both backends too.
Model variants are the shipped graph with another ONNX doc_string (test_gateway_reload.model_variant).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from gateway_support import (
    MODEL,
    TEST_POLICY,
    Outcome,
    Sink,
    load_scanner,
    make_message,
    send,
)
from serve_support import ServeProcess
from test_gateway_reload import model_variant
from test_gateway_serve import POLICY_TOML

from milter.commands.model import model
from milter.config import parse_config
from milter.errors import ConfigError, ModelError, StoreError
from milter.gateway.fleet import FleetFollower, FleetSettings, adopt_at_start
from milter.gateway.metrics import GatewayMetrics
from milter.gateway.process import ModelSlot
from milter.gateway.reload import ModelReloader, load_checked
from milter.registry import CURRENT_JSON, FleetModel, adopt, current_digest
from milter.store import Store
from milter.store.models import MESSAGES
from milter.store.registry import ModelFiles, NodeStatus

MODEL_NAME = json.loads(MODEL.with_suffix(".json").read_text())["name"]

# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    with Store.open(url) as s:
        yield s


def files(name: str, onnx: bytes = b"onnx bytes", lgb: bytes | None = b"trees",
          tensor: bytes | None = None) -> ModelFiles:
    meta = json.dumps({"name": name}).encode()
    return ModelFiles(name, hashlib.sha256(onnx).hexdigest(), onnx, meta, lgb, tensor)


def node(name: str, model_name: str = "m1", error: str | None = None) -> NodeStatus:
    return NodeStatus(node=name, model=model_name, onnx_sha256="ab" * 32, last_checkin=datetime.now(UTC),
                      last_error=error, pid=123, host="h")


def local_models(directory: Path) -> Path:
    """A model directory holding a copy of the shipped model as current (what a node starts with)."""
    directory.mkdir(parents=True, exist_ok=True)
    for suffix in (".onnx", ".json", ".lgb.txt", ".tensor.onnx"):
        shutil.copyfile(MODEL.with_suffix(suffix), directory / f"current{suffix}")
    return directory / "current.onnx"


def fleet_config(path: Path, url: str, model_path: Path, poll: float = 1.0, extra: str = "") -> Path:
    path.write_text(
        f'[model]\npath = "{model_path}"\nregistry = "store"\nregistry_poll_seconds = {poll}\n'
        f'[store]\nurl = "{url}"\n{extra}',
        encoding="utf-8",
    )
    return path


def broken(name: str) -> ModelFiles:
    """A model whose metadata is fine and whose ONNX bytes are not a model (a corrupt artefact)."""
    onnx = b"this is not an ONNX graph"
    meta = json.loads(MODEL.with_suffix(".json").read_text())
    meta["name"], meta["onnx"]["sha256"] = name, hashlib.sha256(onnx).hexdigest()
    return ModelFiles(name, meta["onnx"]["sha256"], onnx, json.dumps(meta).encode(), None)


def as_fleet_model(path: Path) -> FleetModel:
    meta = json.loads(path.with_suffix(".json").read_text())
    onnx = path.read_bytes()
    return FleetModel(meta["name"], hashlib.sha256(onnx).hexdigest(), onnx,
                      path.with_suffix(".json").read_bytes(), path.with_suffix(".lgb.txt").read_bytes(),
                      path.with_suffix(".tensor.onnx").read_bytes())


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Seconds until `check()` held; AssertionError naming `what` after `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.2)
    return time.monotonic() - start


# -- store ----------------------------------------------------------------------------------------


def test_publish_is_idempotent_and_a_name_keeps_its_bytes(store: Store) -> None:
    assert store.model_publish(files("m1"), "alice@h") is True
    assert store.model_publish(files("m1"), "bob@h") is False  # a retried promotion: no-op
    with pytest.raises(StoreError, match="different model named m1"):
        store.model_publish(files("m1", onnx=b"other bytes"), "bob@h")
    got = store.model_fetch("m1")
    assert got == files("m1")
    assert store.model_publish(files("old", lgb=None), "a")
    assert store.model_fetch("old") == files("old", lgb=None)
    assert store.model_publish(files("gpu", tensor=b"tensor graph"), "a")  # the tensor graph travels too
    assert store.model_fetch("gpu") == files("gpu", tensor=b"tensor graph")
    assert store.model_fetch("nope") is None
    assert [(m.name, m.promoted_by) for m in store.model_list()][:2] == [("m1", "alice@h"), ("old", "a")]


def test_current_follows_the_log_and_rollback_undoes(store: Store) -> None:
    assert store.model_current() is None and store.model_previous() is None
    for name in ("m1", "m2"):
        store.model_publish(files(name, onnx=name.encode()), "a")
    with pytest.raises(StoreError, match="no model named 'm3'"):
        store.model_set_current("m3", "promote", "a")
    store.model_set_current("m1", "promote", "a")
    assert store.model_previous() is None
    store.model_set_current("m2", "promote", "a")
    current = store.model_current()
    assert current is not None
    assert (current.name, current.onnx_sha256) == ("m2", files("m2", b"m2").onnx_sha256)
    assert store.model_previous() == "m1"
    store.model_set_current("m1", "rollback", "a")
    assert store.model_previous() == "m2"  # rolling back twice returns to where it started
    assert [m.name for m in store.model_list() if m.is_current] == ["m1"]


def test_check_in_replaces_the_nodes_row(store: Store) -> None:
    store.node_check_in(node("a", "m1"))
    store.node_check_in(node("b", "m1"))
    store.node_check_in(node("a", "m2", error="cannot serve m3: bad"))
    rows = store.node_list()
    assert [(r.node, r.model, r.last_error) for r in rows] == [
        ("a", "m2", "cannot serve m3: bad"), ("b", "m1", None)]
    store.node_check_in(node("a", "m2"))
    assert store.node_list()[0].last_error is None


# -- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "key"), [
    ({"model": {"registry": "s3"}}, "model.registry"),
    ({"model": {"registry": "store", "registry_poll_seconds": 0}}, "model.registry_poll_seconds"),
    ({"model": {"registry": "store", "path": "/x/model.onnx"}}, "model.path"),
    ({"server": {"node_name": 3}}, "server.node_name"),
])
def test_config_errors_name_the_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.key == key


def test_config_defaults_keep_the_local_registry() -> None:
    cfg = parse_config({})
    assert (cfg.model.registry, cfg.model.registry_poll_seconds, cfg.server.node_name) == ("local", 30.0, "")


# -- local adoption (milter.registry.adopt) --------------------------------------------------------


def test_adopt_installs_once_and_refuses_bytes_that_are_not_the_stores(tmp_path: Path) -> None:
    live = local_models(tmp_path / "node")
    variant = as_fleet_model(model_variant(tmp_path / "cand", "fleet-v2"))
    done = adopt(live.parent, variant)
    assert done is not None and done.name == "fleet-v2"
    assert current_digest(live.parent) == variant.onnx_sha256
    assert (live.parent / "current.tensor.onnx").read_bytes() == variant.tensor_onnx
    assert adopt(live.parent, variant) is None  # a second worker of the node: already swapped
    before = (live.parent / CURRENT_JSON).read_bytes()
    tampered = FleetModel("fleet-v3", variant.onnx_sha256, variant.onnx + b"x", variant.meta_json)
    with pytest.raises(ModelError, match="do not match"):
        adopt(live.parent, tampered)
    bad = broken("fleet-bad")
    with pytest.raises(ModelError):
        adopt(live.parent, FleetModel(bad.name, bad.onnx_sha256, bad.onnx, bad.meta_json))
    assert (live.parent / CURRENT_JSON).read_bytes() == before


def test_a_starting_node_adopts_the_fleets_model_and_starts_anyway_without_it(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    live = local_models(tmp_path / "node")
    shipped = current_digest(live.parent)
    adopt_at_start(store, live.parent)  # nothing promoted yet: the local model stays
    assert current_digest(live.parent) == shipped
    store.model_publish(broken("fleet-broken"), "t")
    store.model_set_current("fleet-broken", "promote", "t")
    with caplog.at_level(logging.ERROR, logger="milter.gateway.fleet"):
        adopt_at_start(store, live.parent)  # unfit here: logged, the local model serves
    assert current_digest(live.parent) == shipped and "fleet_model_not_adopted_at_start" in caplog.text
    variant = as_fleet_model(model_variant(tmp_path / "cand", "fleet-v2"))
    store.model_publish(ModelFiles(variant.name, variant.onnx_sha256, variant.onnx, variant.meta_json,
                                   variant.lgb_text, variant.tensor_onnx), "t")
    store.model_set_current("fleet-v2", "promote", "t")
    adopt_at_start(store, live.parent)
    assert current_digest(live.parent) == variant.onnx_sha256


# -- the follower on a store that goes away --------------------------------------------------------


def test_follower_keeps_serving_and_logs_once_when_the_store_cannot_be_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "var" / "store.db"
    live = local_models(tmp_path / "node")
    metrics = GatewayMetrics()
    slot = ModelSlot(load_scanner(TEST_POLICY))
    reloader = ModelReloader(slot, live, TEST_POLICY, metrics, loader=load_checked)
    executor = ThreadPoolExecutor(max_workers=1)

    def registry_errors() -> float:
        return float(metrics.errors.labels("registry")._value.get())

    async def main(store: Store) -> None:
        settings = FleetSettings("n1", live.parent, 1.0)
        follower = FleetFollower(settings, store, slot, reloader, metrics, executor)
        await follower.poll()
        assert registry_errors() == 0 and [r.node for r in store.node_list()] == ["n1"]
        store.engine.dispose()
        db.rename(db.with_suffix(".away"))
        db.write_bytes(b"not a database" * 100)  # every read now fails, as with a store gone bad
        with caplog.at_level(logging.ERROR, logger="milter.gateway.fleet"):
            await follower.poll()
            await follower.poll()
        assert registry_errors() == 2
        assert sum("registry_unavailable" in r.getMessage() for r in caplog.records) == 1  # once an outage
        assert slot.name == MODEL_NAME  # still serving
        store.engine.dispose()
        db.unlink()
        db.with_suffix(".away").rename(db)
        await follower.poll()
        assert registry_errors() == 2

    with Store.open(f"sqlite:///{db}") as store:
        asyncio.run(main(store))
    executor.shutdown()


# -- CLI ----------------------------------------------------------------------------------------------


def test_cli_promote_list_rollback_status_act_on_the_store(tmp_path: Path, url: str) -> None:
    cfg = fleet_config(tmp_path / "admin.toml", url, local_models(tmp_path / "admin"))
    runner = CliRunner()
    a = model_variant(tmp_path / "cand", "fleet-a")
    b = model_variant(tmp_path / "cand", "fleet-b")

    def cli(*args: str) -> str:
        result = runner.invoke(model, [*args, "--config", str(cfg)])
        assert result.exit_code == 0, result.output
        return result.output

    def current() -> str:
        with Store.open(url) as s:
            now = s.model_current()
        return now.name if now else ""

    assert "promoted fleet-a for the fleet (previous: none)" in cli("promote", str(a))
    with Store.open(url) as s:
        published = s.model_fetch("fleet-a")
    assert published is not None and published.tensor_onnx == a.with_suffix(".tensor.onnx").read_bytes()
    assert "previous: fleet-a" in cli("promote", str(b))
    cli("promote", str(b))  # the same model again: idempotent
    bad = tmp_path / "cand" / "bad.onnx"
    bad.write_bytes(b"garbage")
    meta = json.loads(a.with_suffix(".json").read_text())
    meta["name"], meta["onnx"]["sha256"] = "fleet-bad", hashlib.sha256(b"garbage").hexdigest()
    bad.with_suffix(".json").write_text(json.dumps(meta))
    refused = runner.invoke(model, ["promote", str(bad), "--config", str(cfg)])
    assert refused.exit_code == 1 and "not promoted" in refused.output
    listed = [json.loads(line) for line in cli("list", "--json").splitlines()]
    assert [(r["name"], r["current"]) for r in listed] == [("fleet-a", False), ("fleet-b", True)]
    assert "rolled the fleet back to fleet-a" in cli("rollback")
    assert current() == "fleet-a"
    cli("rollback", "fleet-b")
    assert current() == "fleet-b"
    missing = runner.invoke(model, ["rollback", "nope", "--config", str(cfg)])
    assert missing.exit_code == 1 and "no model named 'nope'" in missing.output
    with Store.open(url) as s:
        s.node_check_in(NodeStatus("n1", "fleet-a", as_fleet_model(a).onnx_sha256, datetime.now(UTC),
                                   "cannot serve fleet-b: boom", 7, "h1"))
    status = [json.loads(line) for line in cli("status", "--json").splitlines()]
    assert [(s["node"], s["model"], s["current"], s["last_error"]) for s in status] == [
        ("n1", "fleet-a", False, "cannot serve fleet-b: boom")]
    table = cli("status")
    assert "n1" in table and "fleet-b" in table and "ago" in table and "boom" in table
    # --dir (or registry = "local") keeps today's local behaviour: nothing was written there
    assert "no models in" in runner.invoke(model, ["list", "--dir", str(tmp_path / "empty")]).output


def test_cli_status_needs_the_store_registry(tmp_path: Path) -> None:
    cfg = tmp_path / "local.toml"
    cfg.write_text("[model]\nregistry = \"local\"\n")
    result = CliRunner().invoke(model, ["status", "--config", str(cfg)])
    assert result.exit_code == 1 and "registry = \"store\"" in result.output


# -- end to end: two nodes, one store ----------------------------------------------------------------


def node_toml(url: str, model_path: Path, port: int, sink_port: int, name: str, extra: str = "") -> str:
    return (
        f'[model]\npath = "{model_path}"\nregistry = "store"\nregistry_poll_seconds = 1\n'
        f'[server]\nlisten = "127.0.0.1:{port}"\ndownstream = "127.0.0.1:{sink_port}"\nworkers = 2\n'
        f'node_name = "{name}"\nhostname = "{name}.test"\n'
        f'[store]\nurl = "{url}"\n' + POLICY_TOML + extra
    )


async def start_nodes(nodes: Mapping[str, ServeProcess], toml_of: Callable[[str, Path], str]) -> None:
    """Launch every node at once, each with a copy of the shipped model as its model directory and the
    config `toml_of(name, model path)`; return when both workers of every node listen."""
    starts = []
    for name, proc in nodes.items():
        proc.workdir.mkdir()
        toml = toml_of(name, local_models(proc.workdir / "models"))
        ready = functools.partial(listening, proc)
        starts.append(asyncio.to_thread(proc.launch, toml, ("--metrics-listen", "off"), ready, 300))
    await asyncio.gather(*starts)


def verdict_models(url: str) -> dict[str, str]:
    with Store.open(url) as s, s.engine.connect() as conn:
        rows = conn.execute(sa.select(MESSAGES.c.message_id, MESSAGES.c.model))
        return {str(mid).strip("<>"): str(m) for mid, m in rows}


def served(url: str) -> dict[str, tuple[str, str | None]]:
    with Store.open(url) as s:
        return {r.node: (r.model, r.last_error) for r in s.node_list()}


def listening(node: ServeProcess) -> bool:
    """Both workers serve (their socket accepts before the warm-up ends, so a banner check could hang)."""
    return node.output.count("milter.gateway: listening") >= 2


def count(node: ServeProcess, event: str, model_name: str) -> int:
    return sum(1 for line in node.output.splitlines() if event in line and model_name in line)


@pytest.mark.timeout(900)  # four gateway processes and their prepare pools start on a small machine
def test_two_nodes_adopt_a_promotion_while_mail_flows_and_refuse_a_broken_one(
    tmp_path: Path, url: str, free_port: Callable[[], int]
) -> None:
    Store.open(url).close()  # migrate once, before two nodes race to
    sink_port = free_port()
    nodes = {name: ServeProcess(tmp_path / name) for name in ("node-a", "node-b")}
    ports = {name: free_port() for name in nodes}
    shipped = MODEL_NAME
    variant = model_variant(tmp_path / "cand", "fleet-v2")
    admin = fleet_config(tmp_path / "admin.toml", url, local_models(tmp_path / "admin"))
    outcomes: list[Outcome] = []
    held_back: list[str] = []  # Message-IDs of mail sent after both nodes adopted fleet-v2

    async def mail(tag: str, n: int) -> list[Outcome]:
        sent = []
        for i in range(n):
            for name, port in ports.items():
                quarantine = i % 3 == 0
                raw = make_message(f"{tag}-{name}-{i}@fleet.test")
                sender = "quarantine@sender.test" if quarantine else "alice@sender.test"
                sent.append(await send(port, raw, mail_from=sender))
        return sent

    async def main() -> Sink:
        sink = Sink()
        await sink.start(sink_port)
        try:
            await start_nodes(nodes, lambda name, path: node_toml(url, path, ports[name], sink_port, name))
            outcomes.extend(await mail("before", 3))
            # mail keeps flowing to both nodes while the fleet's model changes
            flowing = asyncio.create_task(mail("during", 8))
            promoted = await asyncio.to_thread(CliRunner().invoke, model, ["promote", str(variant),
                                                                           "--config", str(admin)])
            assert promoted.exit_code == 0, promoted.output
            took = await asyncio.to_thread(
                wait_until, "both nodes' workers adopt fleet-v2",
                lambda: all(count(p, "model reloaded", "fleet-v2") == 2 for p in nodes.values()), 60)
            outcomes.extend(await flowing)
            after = await mail("after", 3)
            outcomes.extend(after)
            held_back.extend(o.mid.strip("<>") for o in after)
            assert took < 30, f"adoption took {took:.1f}s with a 1 s poll"
            await asyncio.to_thread(wait_until, "both nodes check in with fleet-v2",
                                    lambda: all(m == "fleet-v2" for m, _ in served(url).values()), 20)
            # a broken model reaches the store (validated elsewhere, corrupt here): refused, not served
            with Store.open(url) as s:
                s.model_publish(broken("fleet-broken"), "test")
                s.model_set_current("fleet-broken", "promote", "test")
            await asyncio.to_thread(
                wait_until, "both nodes report the broken model",
                lambda: all(e is not None and "fleet-broken" in e for _, e in served(url).values()), 30)
            await asyncio.sleep(3)  # three more polls: a refused digest is not retried
            outcomes.extend(broken_mail := await mail("broken", 2))
            held_back.extend(o.mid.strip("<>") for o in broken_mail)
            return sink
        finally:
            for proc in nodes.values():
                await asyncio.to_thread(proc.stop)
            await sink.stop()

    sink = asyncio.run(main())
    status = served(url)
    assert set(status) == {"node-a", "node-b"}
    assert all(m == "fleet-v2" and e is not None and "fleet-broken" in e for m, e in status.values()), status
    for name, proc in nodes.items():
        refused = count(proc, "fleet_model_refused", "fleet-broken")
        assert refused == 2, f"{name}: once per worker, not per poll: {refused}\n{proc.output}"
        assert current_digest(proc.workdir / "models") == as_fleet_model(variant).onnx_sha256
    # no message lost: every one got 250 and is at the sink or in the quarantine, exactly once
    assert len(outcomes) == 2 * (3 + 8 + 3 + 2) and all(o.code == 250 for o in outcomes), outcomes
    delivered = [str(m).strip("<>") for m in sink.message_ids()]
    with Store.open(url) as s:
        held = [str(r.message_id).strip("<>") for r in s.quarantine_list(limit=1000)]
    for o in outcomes:
        mid = o.mid.strip("<>")
        assert delivered.count(mid) + held.count(mid) == 1, mid
    models = verdict_models(url)
    assert {models[m] for m in held_back} == {"fleet-v2"}
    assert models["before-node-a-0@fleet.test"] == models["before-node-b-0@fleet.test"] == shipped
    cli = CliRunner().invoke(model, ["status", "--config", str(admin)])
    assert cli.exit_code == 0 and "node-a" in cli.output and "node-b" in cli.output and "NO" in cli.output


def test_the_nightly_retrain_publishes_its_promotion_to_the_fleet(tmp_path: Path) -> None:
    """milter-retrain on a node of a fleet: the challenger it promotes becomes the fleet's current model
    (without it, that node's own follower would reinstall the fleet's older model at its next poll)."""
    from training.retrain import install

    url = f"sqlite:///{tmp_path}/fleet.db"
    here = local_models(tmp_path / "models").parent
    candidate = model_variant(tmp_path / "cand", "nightly-1")
    install(here, candidate, None)  # a lone node: local only, the store's registry untouched
    with Store.open(url) as s:
        assert s.model_current() is None
    install(here, model_variant(tmp_path / "cand2", "nightly-2"), url)
    with Store.open(url) as s:
        current = s.model_current()
        assert current is not None and current.name == "nightly-2"
    assert json.loads((here / CURRENT_JSON).read_text())["name"] == "nightly-2"


def test_a_failure_that_may_pass_is_tried_again_at_the_next_poll(tmp_path: Path) -> None:
    """The reload after an adoption failed once for a reason outside the model (the store's sender
    labels unreadable for a moment): deferred and tried again, then served. Before, it was remembered
    as a refusal of that model for good, though the model was already installed on disk."""
    from test_gateway_reload import model_variant

    from milter.errors import StoreError
    from milter.store.registry import CurrentModel, ModelFiles

    live = local_models(tmp_path / "node")
    fleet = as_fleet_model(model_variant(tmp_path / "cand", "fleet-v2"))
    files = ModelFiles(fleet.name, fleet.onnx_sha256, fleet.onnx, fleet.meta_json, fleet.lgb_text,
                       fleet.tensor_onnx)

    class OneModelStore:
        def __init__(self) -> None:
            self.errors: list[str | None] = []

        def model_current(self) -> CurrentModel:
            return CurrentModel(files.name, files.onnx_sha256)

        def model_fetch(self, name: str) -> ModelFiles:
            return files

        def node_check_in(self, status: Any) -> None:
            self.errors.append(status.last_error)

    calls = [0]

    def flaky(path: Path, policy: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise StoreError("could not read sender labels: connection reset")  # one blip
        return load_checked(path, policy, explain=False)

    metrics = GatewayMetrics()
    slot = ModelSlot(load_scanner(TEST_POLICY))
    reloader = ModelReloader(slot, live, TEST_POLICY, metrics, loader=flaky)
    store = OneModelStore()
    executor = ThreadPoolExecutor(max_workers=1)

    async def main() -> None:
        follower = FleetFollower(FleetSettings("n1", live.parent, 1.0), store, slot, reloader, metrics,
                                 executor)
        await follower.poll()
        assert slot.name == MODEL_NAME  # deferred: reported at check-in as such, not as refused
        assert store.errors[-1] is not None and store.errors[-1].startswith("not serving fleet-v2 yet")
        await follower.poll()
        assert slot.name == "fleet-v2" and calls[0] == 2 and store.errors[-1] is None

    asyncio.run(main())
    executor.shutdown()
    assert metrics.registry_adoptions.labels("deferred")._value.get() == 1
    assert metrics.registry_adoptions.labels("failed")._value.get() == 0
