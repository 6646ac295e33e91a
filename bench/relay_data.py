"""Memory and event-loop time of the relay's DATA: aiosmtplib's `SMTP.data()` against relay_data.

    .venv/bin/python bench/relay_data.py [--runs 5] [--json]

Sends each message, over loopback, to a sink in its own process (a minimal SMTP server that reads
DATA in 1 MiB chunks and throws it away, so it costs the sender nothing) through both paths:

* `old`: `aiosmtplib.SMTP.data(raw)` (what milter/gateway/relay.py did until issue 13's fix);
* `new`: `relay_data.start_data` + `send_body(DataPayload.encode(raw))` (what it does now).

Messages: tests/hostile.py's `one-byte-lines` as the gateway relays it (CRLF, as it came in over SMTP:
3 million lines, 9 MB), the same with its bare LFs (6 MB; every line ending to convert), and its
`bare-cr` (2 million bare CRs, 4 MB). Each run is a fresh process (so one run's heap does not carry
into the next): it builds the message, connects (EHLO, MAIL, RCPT), resets its peak RSS
(/proc/self/clear_refs 5; where that fails, ru_maxrss, which then also counts the build), then sends
DATA while a task wakes every millisecond to see how long the event loop was held. It reports the
peak RSS growth over the RSS just before DATA (MiB), the longest the loop was held (ms) and the
DATA's wall time (ms). Printed: medians over `--runs` (and the range).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from hostile import ATTACKS  # noqa: E402

MESSAGES = ("one-byte-lines-crlf", "one-byte-lines-lf", "bare-cr")
PATHS = ("old", "new")
END = b"\r\n.\r\n"


def build(name: str) -> bytes:
    raw: bytes
    if name == "one-byte-lines-crlf":  # as received over SMTP: a bare LF arrives as CRLF
        raw = ATTACKS["one-byte-lines"].build().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    elif name == "one-byte-lines-lf":
        raw = ATTACKS["one-byte-lines"].build()
    elif name == "bare-cr":
        raw = ATTACKS["bare-cr"].build()
    else:
        raise ValueError(name)
    return raw


# -- the sink: its own process, so that its memory is not the sender's ----------------------------


async def _sink_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 sink ESMTP\r\n")
    with contextlib.suppress(ConnectionError):
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-sink\r\n250 8BITMIME\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 Bye\r\n")
                break
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                tail = b"\r\n"  # the end line of an empty body is the data's first line
                while True:
                    chunk = await reader.read(1 << 20)
                    if not chunk:
                        return
                    window = tail + chunk  # an end line may be split across reads
                    if END in window:  # dot-stuffed data holds no other (and the client waits)
                        break
                    tail = window[-(len(END) - 1) :]
                writer.write(b"250 2.0.0 Ok: discarded\r\n")
            else:
                writer.write(b"250 Ok\r\n")
            await writer.drain()
    writer.close()


async def _serve_sink() -> None:
    server = await asyncio.start_server(_sink_session, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


# -- one measurement, in a fresh process ----------------------------------------------------------


@dataclass(frozen=True)
class Measure:
    message: str
    path: str
    wire_mb: float
    rss_before_mib: float
    growth_mib: float
    loop_held_ms: float
    data_ms: float
    hwm_source: str


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> str:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return "VmHWM"
    except OSError:
        return "ru_maxrss"


async def _measure(message: str, path: str, port: int) -> Measure:
    import aiosmtplib

    from milter.gateway.relay_data import DataPayload, send_body, start_data

    raw = build(message)
    wire_mb = DataPayload.encode(raw).size / 1e6
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=120, start_tls=False,
                             local_hostname="bench.test")
    await client.connect()
    await client.ehlo()
    await client.mail("a@bench.test")
    await client.rcpt("b@bench.test")
    gc.collect()
    source = _reset_peak()
    before = _status("VmRSS")

    held = 0.0
    stop = False

    async def heartbeat() -> None:
        nonlocal held
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            held = max(held, now - last - 0.001)
            last = now

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.01)
    start = time.perf_counter()
    if path == "old":
        resp = await client.data(raw)
    else:
        await start_data(client)
        resp = await send_body(client, DataPayload.encode(raw))
    data_ms = (time.perf_counter() - start) * 1000
    stop = True
    await beat
    if resp.code != 250:
        raise RuntimeError(f"sink answered {resp}")
    if source == "VmHWM":
        peak = _status("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    client.close()
    return Measure(message, path, round(wire_mb, 2), round(before, 1), round(peak - before, 1),
                   round(held * 1000, 1), round(data_ms, 1), source)


def _one(message: str, path: str, port: int) -> Measure:
    out = subprocess.run(
        [sys.executable, __file__, "--one", message, path, str(port)],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )
    return Measure(**json.loads(out.stdout))


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="also print every run as a JSON line")
    ap.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one", nargs=3, metavar=("MESSAGE", "PATH", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sink:
        asyncio.run(_serve_sink())
        return 0
    if args.one:
        message, path, port = args.one
        print(json.dumps(asdict(asyncio.run(_measure(message, path, int(port))))))
        return 0

    sink = subprocess.Popen([sys.executable, __file__, "--sink"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        results: dict[tuple[str, str], list[Measure]] = {}
        for _ in range(args.runs):  # interleaved, so that a busy moment on the machine hits both paths
            for message in MESSAGES:
                for path in PATHS:
                    m = _one(message, path, port)
                    results.setdefault((message, path), []).append(m)
                    if args.json:
                        print(json.dumps(asdict(m)), flush=True)
    finally:
        sink.terminate()
        sink.wait()

    print(f"medians of {args.runs} runs (min-max); peak RSS growth over the RSS before DATA "
          f"({results[MESSAGES[0], 'old'][0].hwm_source})")
    print(f"{'message':22} {'path':4} {'wire MB':>7} {'RSS before':>10} {'growth MiB':>22} "
          f"{'loop held ms':>22} {'DATA ms':>22}")
    for (message, path), ms in results.items():
        before = statistics.median(m.rss_before_mib for m in ms)
        print(f"{message:22} {path:4} {ms[0].wire_mb:7.2f} {before:10.1f} "
              f"{_fmt([m.growth_mib for m in ms]):>22} {_fmt([m.loop_held_ms for m in ms]):>22} "
              f"{_fmt([m.data_ms for m in ms]):>22}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
