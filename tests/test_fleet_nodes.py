"""Two gateway nodes on one PostgreSQL store (issue 16's acceptance test): 50 SMTP clients split across
them; a model promoted in the shared registry while mail flows, adopted by both nodes; then one node killed
with SIGKILL. The clients fail over to the other node as a sending MTA tries its next MX, and at the end
every message is accounted for by Message-ID (at the downstream or in the shared quarantine), none lost;
a message shows up twice only if it was in flight at the killed node; the quarantine holds both nodes'
messages, reviewable from either node's configuration; and what the killed node learned of its
correspondents before it died is in the shared history.

The nodes are `milter serve` subprocesses with their own config files, model directories and working
directories, two workers each, as separate machines would run them; only the store and the downstream
are shared.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from gateway_support import QUARANTINE_SENDER, Outcome, Sink, make_message, send
from serve_support import ServeProcess
from store_support import pg_schema_url
from test_fleet_registry import MODEL_NAME, fleet_config, local_models, node_toml, served, start_nodes
from test_gateway_reload import model_variant

from milter.cli import main as cli
from milter.store import Store
from milter.store.models import MESSAGES

CLIENTS = 50
KILL_AFTER = 200  # messages answered 250 (after the promotion) before node A is killed
EARLY = 5  # messages to node A alone before the load


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from pg_schema_url()


#: What the nodes here add to test_fleet_registry's: no DNS, and a history written often.
NODE_EXTRA = """
[auth]
enabled = false
[policy.history]
flush_seconds = 0.2
refresh_seconds = 1.0
"""


def sender_of(mid: str, i: int) -> str:
    # one in five quarantined (deny list); the rest each from a sender of its own, so that what the
    # history knows of a sender was learned by the node that answered that one message
    return QUARANTINE_SENDER if i % 5 == 0 else f"s-{mid.split('@')[0]}@senders.test"


@pytest.mark.timeout(900)  # four gateway processes and their prepare pools start on a small machine
def test_two_nodes_a_promotion_and_one_killed_midway_lose_nothing(
    tmp_path: Path, free_port: Callable[[], int], pg_url: str
) -> None:
    Store.open(pg_url).close()  # migrate once, before two nodes race to
    ports = {"a": free_port(), "b": free_port()}
    sink_port = free_port()
    nodes = {n: ServeProcess(tmp_path / n) for n in ports}
    admin = fleet_config(tmp_path / "admin.toml", pg_url, local_models(tmp_path / "admin"))
    variant = model_variant(tmp_path / "cand", "fleet-v2")
    finals: dict[str, Outcome] = {}
    tried: set[str] = set()  # every Message-ID a client started to send
    failed_at_a: set[str] = set()  # Message-IDs with an attempt at A that got no 250
    first_node: dict[str, str] = {}  # Message-ID -> the node that answered 250
    answered_after_promotion = 0

    async def client(c: int, stop: asyncio.Event, promoted: asyncio.Event, enough: asyncio.Event) -> None:
        nonlocal answered_after_promotion
        order = ("a", "b") if c % 2 == 0 else ("b", "a")
        i = 0
        while not stop.is_set():
            mid = f"f{c}-{i}@fleet.test"
            tried.add(f"<{mid}>")
            sender = sender_of(mid, i)
            raw = make_message(mid).replace(b"alice@sender.test", sender.encode())
            for attempt in range(8):  # as an MTA: the next MX, then again after a pause
                node = order[attempt % 2]
                outcome = await send(ports[node], raw, mail_from=sender, smtp_timeout=20)
                if outcome.code == 250:
                    finals[outcome.mid], first_node[outcome.mid] = outcome, node
                    if promoted.is_set():
                        answered_after_promotion += 1
                        if answered_after_promotion >= KILL_AFTER:
                            enough.set()
                    break
                if node == "a":
                    failed_at_a.add(outcome.mid)
                await asyncio.sleep(0.2)
            i += 1

    async def run() -> Sink:
        sink = Sink()
        await sink.start(sink_port)
        try:
            await start_nodes(nodes, lambda n, m: node_toml(pg_url, m, ports[n], sink_port, n, NODE_EXTRA))
            for k in range(EARLY):  # to A alone, a second before the load: A's history must keep them
                sender = f"early{k}@early{k}.test"
                raw = make_message(f"early{k}@fleet.test").replace(b"alice@sender.test", sender.encode())
                assert (await send(ports["a"], raw, mail_from=sender)).code == 250
            await asyncio.sleep(1.0)
            stop, promoted, enough = asyncio.Event(), asyncio.Event(), asyncio.Event()
            clients = [asyncio.create_task(client(c, stop, promoted, enough)) for c in range(CLIENTS)]
            await asyncio.sleep(1.0)  # mail flows
            result = await asyncio.to_thread(CliRunner().invoke, cli,
                                             ["model", "promote", str(variant), "--config", str(admin)])
            assert result.exit_code == 0, result.output
            for _ in range(300):  # both nodes serve the promoted model, within the 1 s poll and a reload
                if set(served(pg_url).values()) == {("fleet-v2", None)} and len(served(pg_url)) == 2:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"not adopted by both nodes within 30 s: {served(pg_url)}")
            promoted.set()
            await enough.wait()
            nodes["a"].kill()  # the whole process group: A's sessions are in every state right now
            await asyncio.sleep(1.0)  # failing over
            stop.set()
            await asyncio.gather(*clients)
            await asyncio.to_thread(nodes["b"].stop)  # B drains: its verdict rows and history are written
        finally:
            for proc in nodes.values():
                await asyncio.to_thread(proc.stop)
            await sink.stop()
        return sink

    sink = asyncio.run(run())
    assert set(finals) == tried  # every message got its 250, from one node or the other
    assert failed_at_a, "the kill cut no session off: it happened too late to test anything"
    with Store.open(pg_url) as store:
        held = [row.message_id for row in store.quarantine_list(limit=100_000)]
        places = Counter(sink.message_ids()) + Counter(held)
        assert all(places[mid] >= 1 for mid in tried), sorted(m for m in tried if not places[m])
        twice = {mid for mid in tried if places[mid] > 1}
        assert twice <= failed_at_a  # only a message whose reply A never gave can have gone twice
        assert set(held) == {m for m in tried if int(m.split("-")[1].split("@")[0]) % 5 == 0}
        # the killed node's quarantine is everyone's: its held messages are listed from B's config
        by_a = {mid for mid, node in first_node.items() if node == "a"} & set(held)
        assert by_a, "node A quarantined nothing before it died"
        review = ["quarantine", "list", "--json", "--limit", "100000", "--config",
                  str(nodes["b"].workdir / "milter.toml")]
        listed = CliRunner().invoke(cli, review)
        assert listed.exit_code == 0, listed.output
        assert by_a <= {json.loads(line)["message_id"] for line in listed.stdout.splitlines()}
        # both nodes scored with the promoted model once it was adopted, A until it died
        with store.engine.connect() as conn:
            models = {mid: m for mid, m in conn.execute(sa.select(MESSAGES.c.message_id, MESSAGES.c.model))}
        assert {models[m] for m in by_a} <= {MODEL_NAME, "fleet-v2"}
        # B's verdict rows, written in batches by two workers beside A's until it died: none lost
        assert {m for m, n in first_node.items() if n == "b"} <= set(models)
        assert "fleet-v2" in {models[m] for m, n in first_node.items() if n == "a" and m in models}
        # what A learned before it died is in the shared history: the early senders wrote to A alone
        learned = {r.key for r in store.history_rows() if r.kind == "address"}
        assert {f"early{k}@early{k}.test" for k in range(EARLY)} <= learned
