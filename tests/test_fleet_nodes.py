"""Two gateway nodes on one PostgreSQL store (issue 16): 50 SMTP clients split across them, one node
killed with SIGKILL midway. The clients fail over to the other node as a sending MTA tries its next MX,
and at the end every message is accounted for by Message-ID (at the downstream or in the shared
quarantine), none lost; a message shows up twice only if it was in flight at the killed node; the
quarantine holds both nodes' messages, reviewable from either node's configuration; and what the killed
node learned of its correspondents before it died is in the shared history.

The nodes are `milter serve` subprocesses with their own config files and working directories, two
workers each, as separate machines would run them; only the store and the downstream are shared.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from gateway_support import MODEL, QUARANTINE_SENDER, ROOT, Outcome, Sink, make_message, send
from store_support import pg_schema_url
from test_gateway_serve import MILTER, POLICY_TOML, wait_listening, with_group_killed

from milter.cli import main as cli
from milter.store import Store

CLIENTS = 50
PER_CLIENT = 8
KILL_AFTER = 200  # messages answered 250 before node A is killed (half)
EARLY = 5  # messages to node A alone before the load


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from pg_schema_url()


def node_config(workdir: Path, listen: int, sink_port: int, url: str) -> Path:
    workdir.mkdir()
    cfg = workdir / "milter.toml"
    cfg.write_text(f"""
[model]
path = "{MODEL}"
[server]
listen = "127.0.0.1:{listen}"
downstream = "127.0.0.1:{sink_port}"
workers = 2
downstream_timeout = 5.0
[store]
url = "{url}"
[auth]
enabled = false
""" + POLICY_TOML + """
[policy.history]
flush_seconds = 0.2
refresh_seconds = 1.0
""")
    return cfg


def start_node(cfg: Path) -> subprocess.Popen[bytes]:
    log = (cfg.parent / "serve.log").open("wb")
    return subprocess.Popen([*MILTER, "-v", "serve", "--config", str(cfg), "--metrics-listen", "off"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)


def sender_of(client: int, i: int) -> str:
    # one in five quarantined (deny list); the rest each from a sender of its own, so that what the
    # history knows of a sender was learned by the node that answered that one message
    return QUARANTINE_SENDER if i % 5 == 0 else f"c{client}m{i}@sender{client}.test"


def test_two_nodes_one_killed_midway_lose_nothing(
    tmp_path: Path, free_port: Callable[[], int], pg_url: str
) -> None:
    ports = {"a": free_port(), "b": free_port()}
    sink_port = free_port()
    configs = {n: node_config(tmp_path / n, ports[n], sink_port, pg_url) for n in ports}
    procs = {n: start_node(cfg) for n, cfg in configs.items()}
    finals: dict[str, Outcome] = {}
    failed_at_a: set[str] = set()  # Message-IDs with an attempt at A that got no 250
    first_node: dict[str, str] = {}  # Message-ID -> the node that answered 250
    answered = 0

    async def client(c: int, killed: asyncio.Event, enough: asyncio.Event) -> None:
        nonlocal answered
        order = ("a", "b") if c % 2 == 0 else ("b", "a")
        for i in range(PER_CLIENT):
            mid = f"f{c}-{i}@fleet.test"
            raw = make_message(mid).replace(b"alice@sender.test", sender_of(c, i).encode())
            for attempt in range(6):  # as an MTA: the next MX, then again after a pause
                node = order[attempt % 2]
                outcome = await send(ports[node], raw, mail_from=sender_of(c, i), smtp_timeout=20)
                if outcome.code == 250:
                    finals[outcome.mid] = outcome
                    first_node[outcome.mid] = node
                    answered += 1
                    if answered >= KILL_AFTER:
                        enough.set()
                    break
                if node == "a":
                    failed_at_a.add(outcome.mid)
                await asyncio.sleep(0.2)

    async def run() -> Sink:
        sink = Sink()
        await sink.start(sink_port)
        try:
            for n in ports:
                await wait_listening(ports[n], procs[n], limit=120)
            for k in range(EARLY):
                sender = f"early{k}@early{k}.test"
                raw = make_message(f"early{k}@fleet.test").replace(b"alice@sender.test", sender.encode())
                assert (await send(ports["a"], raw, mail_from=sender)).code == 250
            await asyncio.sleep(1.0)
            killed, enough = asyncio.Event(), asyncio.Event()
            clients = [asyncio.create_task(client(c, killed, enough)) for c in range(CLIENTS)]
            await enough.wait()
            os.killpg(procs["a"].pid, signal.SIGKILL)  # mid-load: A's sessions are in every state
            killed.set()
            await asyncio.gather(*clients)
            procs["b"].send_signal(signal.SIGTERM)  # B drains: its verdict rows and history are written
            await asyncio.to_thread(procs["b"].wait, 60)
        finally:
            await sink.stop()
        return sink

    try:
        sink = asyncio.run(run())
    finally:
        for proc in procs.values():
            with_group_killed(proc)
    sent = {f"<f{c}-{i}@fleet.test>" for c in range(CLIENTS) for i in range(PER_CLIENT)}
    assert set(finals) == sent  # every message got its 250, from one node or the other
    assert procs["b"].returncode == 0, (tmp_path / "b" / "serve.log").read_text()[-3000:]
    with Store.open(pg_url) as store:
        held = [row.message_id for row in store.quarantine_list(limit=10_000)]
        places = Counter(sink.message_ids()) + Counter(held)
        assert all(places[mid] >= 1 for mid in sent), sorted(m for m in sent if not places[m])
        twice = {mid for mid in sent if places[mid] > 1}
        assert twice <= failed_at_a  # only a message whose reply A never gave can have gone twice
        assert len(set(held)) == sum(1 for c in range(CLIENTS) for i in range(PER_CLIENT) if i % 5 == 0)
        # the killed node's quarantine is everyone's: its held messages are listed from B's config
        by_a = {mid for mid, node in first_node.items() if node == "a"} & set(held)
        assert by_a, "node A quarantined nothing before it died"
        review = ["quarantine", "list", "--json", "--limit", "1000", "--config", str(configs["b"])]
        listed = CliRunner().invoke(cli, review)
        assert listed.exit_code == 0, listed.output
        assert by_a <= {json.loads(line)["message_id"] for line in listed.stdout.splitlines()}
        # what A learned before it died is in the shared history (written every 0.2 s)
        learned = {r.key for r in store.history_rows() if r.kind == "address"}
        # what A learned before it died is in the shared history: the early senders wrote to A alone,
        # a second before the load (A writes what it learned every 0.2 s, flush_seconds)
        assert {f"early{k}@early{k}.test" for k in range(EARLY)} <= learned
    assert failed_at_a, "the kill cut no session off: it happened too late to test anything"
