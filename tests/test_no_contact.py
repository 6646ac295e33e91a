"""Nothing leaves the host unasked: `milter serve` and `milter scan --dns` contact only what their
configuration names (all on loopback here: the sink downstream, a DNS responder for sender
authentication; the store is an SQLite file), and neither does bench/gateway.py's load generator.

Two witnesses, since each misses what the other sees:

* strace -f (connect, sendto, sendmsg, sendmmsg of every process and thread) sees contacts made below
  Python: onnxruntime's 1DS telemetry resolves mobile.events.data.microsoft.com through the host's
  resolver about 9.5 s after `import onnxruntime` (milter/telemetry.py), so the traced processes are
  kept alive past TELEMETRY_WAIT.
* A Python audit hook (a sitecustomize on the traced processes' PYTHONPATH) sees name-service lookups:
  socket.getfqdn(), gethostbyaddr, getaddrinfo of a name. Where the host's name is in /etc/hosts, as on
  the test machines, they never reach the network and strace cannot see them; on a host whose name is
  not, each is a DNS query to the system resolver. That was the burst of about 200 DNS packets in a
  2,000-message load run: bench/gateway.py's SMTP clients took aiosmtplib's default EHLO name,
  socket.getfqdn(), once per connection (150 per run).

Allowed, and why:

* AF_INET 127.0.0.0/8, AF_INET6 ::1 and ::ffff:127.0.0.0/104: loopback, where this test's sink and DNS
  responder listen; but never port 53, which is the host's resolver even on loopback (127.0.0.53 with
  systemd-resolved, 127.0.0.1 without a resolv.conf); this test's DNS responder has a port of its own;
* AF_UNIX: local sockets (glibc's nscd probe, journald, a milter socket);
* AF_NETLINK: the kernel (glibc's getaddrinfo asks it for the interfaces' addresses);
* AF_UNSPEC: connect(AF_UNSPEC) dissolves a UDP socket's association and sends nothing.

ONNX Runtime also stays silent when it sees a CI variable (CI, GITHUB_ACTIONS, ...): the traced
processes run without those, so that only the code's own switch can keep it quiet.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from auth_support import FakeDns, dns_in_thread
from gateway_support import CORPORA, MODEL, ROOT, Sink, send
from serve_support import ServeProcess, milter_command

STRACE = shutil.which("strace")
TRACED_CALLS = "connect,sendto,sendmsg,sendmmsg"
# onnxruntime 1.32's first telemetry query went out 9.5 s after `import onnxruntime`, in every run.
TELEMETRY_WAIT = 15.0
# Variables under which ONNX Runtime keeps quiet by itself (its library's own list), and its switch.
CI_VARIABLES = (
    "CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL",
    "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR", "BITBUCKET_BUILD_NUMBER",
    "ORT_RUNNING_UNIT_TESTS", "ORT_DISABLE_TELEMETRY",
)
LOCAL_FAMILIES = {"AF_UNIX", "AF_NETLINK", "AF_UNSPEC"}
SYSTEM_RESOLVER_PORT = 53
FIXTURES = [
    ROOT / "fixtures" / "bec" / "ham-meeting.eml",
    ROOT / "fixtures" / "bec" / "bec-gift-card-ceo.eml",
    ROOT / "fixtures" / "sample" / "lfdr-mailing-lists-ham-004435.eml",  # DKIM-signed
]

# The audit hook: one JSON line per name-service lookup, into $NO_CONTACT_LOG/<pid>.jsonl.
HOOK = '''
import ipaddress, json, os, sys, traceback

_LOG = os.environ.get("NO_CONTACT_LOG")
_LOOKUPS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
            "socket.gethostbyaddr", "socket.getnameinfo"}


def _literal(host):
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    try:
        ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False
    return True


def _hook(event, args):
    if event not in _LOOKUPS or (event == "socket.getaddrinfo" and _literal(args[0])):
        return
    row = {"pid": os.getpid(), "argv": sys.argv[:4], "event": event, "args": repr(args)[:200],
           "stack": traceback.format_stack(limit=10)[:-1]}
    with open(os.path.join(_LOG, f"{os.getpid()}.jsonl"), "a") as out:
        out.write(json.dumps(row) + "\\n")


if _LOG:
    sys.addaudithook(_hook)
'''


# -- strace output -------------------------------------------------------------------------------

_CALL = re.compile(r"^(\d+)\s+(connect|sendto|sendmsg|sendmmsg)\((.*)$")
_SOCKADDR = re.compile(r"\{sa_family=(AF_\w+)([^{}]*)\}")
_IPV4 = re.compile(r'inet_addr\("([^"]+)"\)')
_IPV6 = re.compile(r'inet_pton\(AF_INET6, "([^"]+)"')
_PORT = re.compile(r"sin6?_port=htons\((\d+)\)")


@dataclass(frozen=True)
class Contact:
    pid: int
    call: str
    family: str  # "?" when strace printed no address we could read
    address: str
    port: int | None
    line: str

    def local(self) -> bool:
        if self.family in LOCAL_FAMILIES:
            return True
        if self.family not in ("AF_INET", "AF_INET6") or self.port == SYSTEM_RESOLVER_PORT:
            return False
        try:
            ip = ipaddress.ip_address(self.address)
        except ValueError:
            return False
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def contacts(trace: str) -> list[Contact]:
    """Every destination in the traced calls. A call on a connected socket names none (its connect
    did); a call whose destination strace did not decode is kept as family "?", which is not local."""
    out: list[Contact] = []
    for line in trace.splitlines():
        m = _CALL.match(line)
        if m is None:  # "<... connect resumed>" and the like: the arguments were on the first line
            continue
        pid, call, rest = int(m.group(1)), m.group(2), m.group(3)
        for family, body in _SOCKADDR.findall(rest):
            v4, v6, port = _IPV4.search(body), _IPV6.search(body), _PORT.search(body)
            address = v4.group(1) if v4 else v6.group(1) if v6 else body.strip(", ")
            out.append(Contact(pid, call, family, address, int(port.group(1)) if port else None, line))
        if _undecoded(call, rest):
            out.append(Contact(pid, call, "?", "", None, line))
    return out


def _undecoded(call: str, args: str) -> bool:
    if call == "connect":
        return _SOCKADDR.search(args) is None
    if call == "sendto":
        return _SOCKADDR.search(args) is None and ", NULL, 0" not in args
    names = re.findall(r"msg_name=(\S{0,11})", args)
    return any(not (n.startswith("NULL") or n.startswith("{sa_family")) for n in names)


def outside(found: Sequence[Contact]) -> list[Contact]:
    return [c for c in found if not c.local()]


def describe(found: Sequence[Contact], limit: int = 20) -> str:
    lines = [f"  {c.call} -> {c.family} {c.address}:{c.port}  ({c.line[:160]})" for c in found[:limit]]
    more = [f"  ... and {len(found) - limit} more"] if len(found) > limit else []
    return "\n".join([f"{len(found)} calls:", *lines, *more])


# -- running things traced -------------------------------------------------------------------------


def _missing(reason: str) -> None:
    """Under CI=true a missing tracer is a broken CI machine, never a skip (as in tests/conftest.py)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"strace is required under CI=true (.ci/run installs it): {reason}")
    pytest.skip(reason)


@pytest.fixture
def strace() -> str:
    if STRACE is None:
        _missing("strace is not installed (apt-get install strace)")
    assert STRACE is not None
    probe = subprocess.run(
        [STRACE, "-f", "-qq", "--seccomp-bpf", "-e", f"trace={TRACED_CALLS}", "-o", os.devnull, "true"],
        capture_output=True, text=True, timeout=60,
    )
    if probe.returncode != 0:
        _missing(f"strace cannot trace here: {probe.stderr.strip()}")
    return STRACE


@dataclass(frozen=True)
class Witnesses:
    """Where one traced command's strace output and audit-hook log go."""

    trace: Path
    lookups: Path

    def prefix(self, strace: str, hook_dir: Path) -> list[str]:
        """`env` without the CI variables, with the hook, then strace: put in front of a command."""
        self.lookups.mkdir(parents=True, exist_ok=True)
        unset = [arg for name in CI_VARIABLES for arg in ("-u", name)]
        path = os.pathsep.join(p for p in (str(hook_dir), os.environ.get("PYTHONPATH", "")) if p)
        return [
            "env", *unset, f"PYTHONPATH={path}", f"NO_CONTACT_LOG={self.lookups}",
            strace, "-f", "-qq", "--seccomp-bpf", "-e", "signal=none", "-e", f"trace={TRACED_CALLS}",
            "-o", str(self.trace),
        ]

    def contacts(self) -> list[Contact]:
        return contacts(self.trace.read_text(errors="replace"))

    def name_lookups(self) -> list[Lookup]:
        rows = []
        for path in sorted(self.lookups.glob("*.jsonl")):
            rows += [Lookup.from_json(line) for line in path.read_text().splitlines() if line]
        return rows


@dataclass(frozen=True)
class Lookup:
    """One name-service call seen by the audit hook."""

    pid: int
    argv: tuple[str, ...]
    event: str
    args: str
    stack: tuple[str, ...]

    @classmethod
    def from_json(cls, line: str) -> Lookup:
        row = json.loads(line)
        return cls(int(row["pid"]), tuple(row["argv"]), str(row["event"]), str(row["args"]),
                   tuple(row["stack"]))

    def __str__(self) -> str:
        return f"  pid {self.pid} {list(self.argv)}: {self.event}{self.args}\n" + "".join(self.stack)


def hook_dir(tmp_path: Path) -> Path:
    path = tmp_path / "hook"
    path.mkdir(exist_ok=True)
    (path / "sitecustomize.py").write_text(HOOK, encoding="utf-8")
    return path


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc: kernels without /proc/PID/task/*/children too)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def smtp_banner(port: int) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                return s.recv(512).startswith(b"220")
        except OSError:
            return False

    return ready


def report_lookups(rows: Sequence[Lookup], limit: int = 5) -> str:
    more = [f"  ... and {len(rows) - limit} more"] if len(rows) > limit else []
    return "\n".join([f"{len(rows)} lookups:", *map(str, rows[:limit]), *more])


# -- the tracer itself -----------------------------------------------------------------------------


def test_the_witnesses_see_an_outside_contact_and_a_name_lookup(strace: str, tmp_path: Path) -> None:
    """The check can fail: a UDP connect to 192.0.2.1:53 (TEST-NET-1; a UDP connect sends nothing) is
    reported, loopback is not, and socket.getfqdn() shows up as a lookup."""
    w = Witnesses(tmp_path / "probe.trace", tmp_path / "probe-lookups")
    code = (
        "import socket\n"
        "for address in (('127.0.0.1', 9), ('192.0.2.1', 53)):\n"
        "    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:\n"
        "        s.connect(address)\n"
        "socket.getfqdn()\n"
    )
    prefix = w.prefix(strace, hook_dir(tmp_path))
    subprocess.run([*prefix, sys.executable, "-c", code], check=True, timeout=60)
    found = w.contacts()
    assert [(c.address, c.port) for c in outside(found)] == [("192.0.2.1", 53)], describe(found)
    assert any(c.address == "127.0.0.1" and c.port == 9 for c in found), describe(found)
    assert [r.event for r in w.name_lookups()] == ["socket.gethostbyaddr"], w.name_lookups()


def test_contacts_parser_on_strace_lines() -> None:
    lines = "\n".join([
        '7 connect(8, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.255.255.53")}, 16) = 0',
        '7 connect(3, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) = -1 ENOENT',
        '8 sendto(9, "\\30."..., 50, MSG_NOSIGNAL, NULL, 0 <unfinished ...>',
        '8 <... connect resumed>) = 0',
        '9 connect(5, {sa_family=AF_INET6, sin6_port=htons(25), sin6_flowinfo=htonl(0), '
        'inet_pton(AF_INET6, "::ffff:127.0.0.1", &sin6_addr), sin6_scope_id=0}, 28) = 0',
        '9 connect(5, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), '
        'inet_pton(AF_INET6, "2001:db8::1", &sin6_addr), sin6_scope_id=0}, 28) = -1 ENETUNREACH',
        '9 sendmmsg(3, [{msg_hdr={msg_name={sa_family=AF_INET, sin_port=htons(53), '
        'sin_addr=inet_addr("127.0.0.53")}, msg_namelen=16}}], 1, 0) = 1',
        "9 connect(4, 0x7ffd0000, 16) = -1 EFAULT",
        '9 sendto(4, "x", 1, 0, {sa_family=AF_INET, sin_port=htons(5353), '
        'sin_addr=inet_addr("127.0.0.1")}, 16) = 1',
    ])
    bad = [(c.family, c.address, c.port) for c in outside(contacts(lines))]
    assert bad == [
        ("AF_INET", "10.255.255.53", 53),  # the host's resolver
        ("AF_INET6", "2001:db8::1", 443),
        ("AF_INET", "127.0.0.53", 53),  # loopback, but port 53: the system resolver
        ("?", "", None),  # undecoded: not presumed harmless
    ]


# -- the gateway and milter scan -----------------------------------------------------------------


CONFIG = """
[model]
path = "{model}"
[server]
listen = "127.0.0.1:{listen}"
downstream = "127.0.0.1:{sink}"
workers = 2
metrics_listen = "127.0.0.1:{metrics}"
[store]
url = "sqlite:///{tmp}/gw.db"
[auth]
nameservers = ["127.0.0.1:{dns}"]
timeout = 2.0
[policy]
internal_networks = []
[[reputation.zone]]
name = "dbl.test"
kind = "domain"
"""


def test_serve_and_scan_contact_only_what_the_configuration_names(
    strace: str, tmp_path: Path, free_port: Callable[[], int]
) -> None:
    """Serve (2 workers, their prepare processes, a SIGHUP model reload) and `milter scan --dns` run for
    longer than the telemetry waits; every contact is loopback: sink, DNS responder, nothing else."""
    listen, sink_port, metrics = free_port(), free_port(), free_port()
    hooks = hook_dir(tmp_path)
    serve_w = Witnesses(tmp_path / "serve.trace", tmp_path / "serve-lookups")
    scan_w = Witnesses(tmp_path / "scan.trace", tmp_path / "scan-lookups")
    raws = [p.read_bytes() for p in FIXTURES]
    dns = FakeDns()
    gw = ServeProcess(tmp_path)

    async def scenario(config: str, scan: subprocess.Popen[bytes]) -> tuple[list[int], bytes, bytes]:
        sink = Sink()
        await sink.start(sink_port)
        try:
            await asyncio.to_thread(
                gw.launch, config, [], smtp_banner(listen), 120.0, serve_w.prefix(strace, hooks)
            )
            assert gw.proc is not None
            (gateway,) = children(gw.proc.pid)  # strace's one child: `milter serve`
            codes = [(await send(listen, raw)).code for raw in raws]
            os.kill(gateway, signal.SIGHUP)
            await wait_for(lambda: gw.output.count("model reloaded") >= 2, 60, gw)  # both workers
            codes += [(await send(listen, raw)).code for raw in raws]
            await asyncio.sleep(TELEMETRY_WAIT)
            stdout, stderr = await asyncio.to_thread(scan.communicate, raws[0], 120)
            os.kill(gateway, signal.SIGTERM)
            await asyncio.to_thread(gw.proc.wait, 60)
        finally:
            if gw.proc is not None and gw.proc.poll() is None:
                gw.kill()  # the whole group: strace and every gateway process
            await sink.stop()
        assert sink.messages, "nothing reached the sink: the trace would prove nothing"
        return codes, stdout, stderr

    with dns_in_thread(dns) as dns_port:
        config = CONFIG.format(model=MODEL, listen=listen, sink=sink_port, metrics=metrics, tmp=tmp_path,
                               dns=dns_port)
        (tmp_path / "scan.toml").write_text(config, encoding="utf-8")
        # scan reads `-` after loading the model: it lives, onnxruntime loaded, until stdin is closed
        scan = subprocess.Popen(
            [*scan_w.prefix(strace, hooks), milter_command(), "scan", "--json", "--dns",
             "--config", str(tmp_path / "scan.toml"), *map(str, FIXTURES), "-"],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            codes, stdout, stderr = asyncio.run(scenario(config, scan))
        finally:
            if scan.poll() is None:
                scan.kill()
                scan.wait()

    assert codes == [250] * len(codes), gw.output[-3000:]
    assert scan.returncode == 0, stderr.decode(errors="replace")[-3000:]
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert len(rows) == len(FIXTURES) + 1 and all("auth" in r for r in rows), rows
    assert dns.queries, "no sender-authentication lookup reached the configured DNS server"
    assert any(q.endswith(".dbl.test") for q in dns.queries), "no blocklist lookup reached it"

    for name, w in (("milter serve", serve_w), ("milter scan", scan_w)):
        found = w.contacts()
        # the trace followed every process: the workers' relay to the sink and DNS queries are in it
        ports = {c.port for c in found if c.address == "127.0.0.1"}
        assert dns_port in ports, f"{name}: no traced query to the DNS responder:\n{describe(found)}"
        if name == "milter serve":
            assert sink_port in ports, f"no traced connection to the sink:\n{describe(found)}"
        assert not outside(found), f"{name} contacted what its configuration does not name:\n" + describe(
            outside(found)
        )
        lookups = w.name_lookups()
        assert not lookups, f"{name} looked names up:\n{report_lookups(lookups)}"


async def wait_for(condition: Callable[[], bool], limit: float, gw: ServeProcess) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"timed out; serve log ends:\n{gw.output[-3000:]}"
        await asyncio.sleep(0.2)


# -- the load generator ----------------------------------------------------------------------------


def test_bench_load_generator_looks_no_names_up(strace: str, tmp_path: Path) -> None:
    """bench/gateway.py's whole run (its SMTP clients, sink, DNS responder and the gateway) asks no name
    service: its clients once said EHLO with socket.getfqdn(), a DNS query per connection where the
    host's name is not in /etc/hosts."""
    if not any(CORPORA.glob("*/*/*.eml")):
        _missing(f"no corpus under {CORPORA}: unpack with ../shared/corpora/unpack .cache/corpora")
    w = Witnesses(tmp_path / "bench.trace", tmp_path / "bench-lookups")
    run = subprocess.run(
        [*w.prefix(strace, hook_dir(tmp_path)), sys.executable, str(ROOT / "bench" / "gateway.py"),
         "--messages", "20", "--clients", "3", "--corpus", "20", "--workers", "1", "--dns", "local"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "gateway: 20 msgs" in run.stdout, run.stdout
    lookups = w.name_lookups()
    assert not lookups, f"bench/gateway.py looked names up:\n{report_lookups(lookups)}"
    assert not outside(w.contacts()), describe(outside(w.contacts()))
