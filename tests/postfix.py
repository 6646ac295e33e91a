"""A private, throw-away Postfix instance on loopback, for end-to-end tests.

Postfix runs with its own config_directory, queue_directory and data_directory under a temp dir
(`postfix -c DIR start`), so tests never touch the machine's /etc/postfix or its queue, and several
instances (or a system instance someone else started) can run side by side on different ports.

The layout is the after-queue content-filter loop from ../shared/notes/postfix-loopback.md:

    client -> inbound smtpd (content_filter=scan:[127.0.0.1]:FILTER) -> queue -> `scan` smtp client
      (XFORWARD on) -> the filter under test -> reinjection smtpd (no content_filter, no_milters)
      -> queue -> virtual(8) -> Maildir under the temp dir

Needs root (master(8) must start as root) and the `postfix` package; `skip_reason()` says why not.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

DOMAIN = "test.localdomain"
# virtual(8) delivers as this uid/gid; it need not exist in /etc/passwd (virtual only needs a number
# other than 0). 5000 is what the shared notes use; override with MILTER_TEST_VMAIL_UID if taken.
VMAIL_UID = int(os.environ.get("MILTER_TEST_VMAIL_UID", "5000"))

# Standard daemons, all with chroot off: Debian's chroot needs files its systemd unit copies in.
_MASTER_BASE = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def skip_reason() -> str | None:
    """Why a private Postfix cannot run here, or None when it can."""
    for tool in ("postfix", "postconf", "postqueue"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin") is None:
            return f"{tool} not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (master(8) starts as root)"
    return None


def _tool(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin")
    if found is None:
        raise FileNotFoundError(name)
    return found


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def listen_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, below the kernel's ephemeral range.

    Not bind-to-0: that hands out an ephemeral port, which the kernel may give to an outgoing
    connection (Postfix's, a client's) before the test binds it. In CI a gateway then failed to start
    with "Address already in use"; ports outside the range are never taken that way.
    """
    top = min(_ephemeral_start(), 32768)
    for _ in range(200):
        port = random.randrange(20000, top)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in 20000-{top} on {host}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, outside the ephemeral range (`listen_port`)."""
    return listen_port(host)


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


@dataclass
class Postfix:
    """One private Postfix instance. Use `running_postfix()` rather than building this by hand."""

    root: Path
    filter_port: int | None
    inbound_port: int = field(default_factory=free_port)
    reinject_port: int = field(default_factory=free_port)
    # Extra `-o name=value` for the inbound smtpd (e.g. smtpd_milters, smtpd_proxy_filter for tests
    # of the before-queue modes), and extra main.cf settings.
    inbound_overrides: Mapping[str, str] = field(default_factory=dict)
    main_overrides: Mapping[str, str] = field(default_factory=dict)
    # master.cf process limit of the `scan` transport: the most messages in the content filter at once.
    scan_procs: str = "4"

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "spool"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    @property
    def maildir(self) -> Path:
        """Every recipient in DOMAIN lands in this one Maildir (virtual_mailbox_maps = static:sink/)."""
        return self.root / "vmail" / "sink"

    # -- setup -------------------------------------------------------------------------------------

    def write_config(self) -> None:
        for sub in ("etc", "spool", "data", "vmail"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # data_directory must belong to mail_owner; the mailbox base to the uid virtual(8) runs as.
        shutil.chown(self.root / "data", user="postfix")
        os.chown(self.root / "vmail", VMAIL_UID, VMAIL_UID)
        # Debian builds most map types as plugins listed here; without it postconf warns on each call.
        dynamicmaps = Path("/etc/postfix/dynamicmaps.cf")
        if dynamicmaps.exists():
            shutil.copy(dynamicmaps, self.config_dir / "dynamicmaps.cf")

        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.root / "data"),
            # No syslog on these machines: postlogd writes the log; the prefix list is a safety check
            # that would otherwise only allow /var and /dev/stdout.
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.root}",
            "maillog_file": str(self.maillog),
            "syslog_name": f"postfix-test-{self.inbound_port}",
            "myhostname": f"mx.{DOMAIN}",
            "mydomain": DOMAIN,
            "myorigin": f"mx.{DOMAIN}",
            # The virtual domain must stay out of mydestination; nothing is delivered by local(8).
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "virtual_mailbox_domains": DOMAIN,
            "virtual_mailbox_base": str(self.root / "vmail"),
            "virtual_mailbox_maps": "static:sink/",
            "virtual_uid_maps": f"static:{VMAIL_UID}",
            "virtual_gid_maps": f"static:{VMAIL_UID}",
            # Mail for anywhere else must never leave the machine.
            "default_transport": "error:test instance delivers only to " + DOMAIN,
            "relay_transport": "error:test instance delivers only to " + DOMAIN,
            "biff": "no",
            "delay_warning_time": "0",
            # Deferred mail stays deferred until the test flushes the queue (defaults, made explicit).
            "minimal_backoff_time": "300s",
            "queue_run_delay": "300s",
            **self.main_overrides,
        }
        (self.config_dir / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in main.items()), encoding="utf-8"
        )

        inbound: dict[str, str] = {"receive_override_options": "no_address_mappings"}
        if self.filter_port is not None:
            inbound["content_filter"] = f"scan:[127.0.0.1]:{self.filter_port}"
        inbound.update(self.inbound_overrides)
        services = [
            _service(f"127.0.0.1:{self.inbound_port}", "inet", "n", "-", "smtpd", inbound),
            # The filter's client: XFORWARD carries the original client's name/address to the filter.
            _service("scan", "unix", "-", self.scan_procs, "smtp", {
                "smtp_send_xforward_command": "yes",
                "disable_mime_output_conversion": "yes",
                "syslog_name": f"postfix-test-{self.inbound_port}/scan",
            }),
            # Where the filter hands mail back: no content_filter (no loop), no milters (no second scan),
            # and it trusts XFORWARD from loopback so the Received header names the original client.
            _service(f"127.0.0.1:{self.reinject_port}", "inet", "n", "10", "smtpd", {
                "content_filter": "",
                "receive_override_options":
                    "no_unknown_recipient_checks,no_header_body_checks,no_milters",
                "smtpd_recipient_restrictions": "permit_mynetworks,reject",
                "smtpd_relay_restrictions": "permit_mynetworks,reject",
                "mynetworks": "127.0.0.0/8",
                "smtpd_authorized_xforward_hosts": "127.0.0.0/8",
                "syslog_name": f"postfix-test-{self.inbound_port}/reinject",
            }),
        ]
        (self.config_dir / "master.cf").write_text(_MASTER_BASE + "".join(services), encoding="utf-8")

    # -- control -----------------------------------------------------------------------------------

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_tool(argv[0]), "-c", str(self.config_dir), *argv[1:]],
            check=check, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )

    def start(self) -> None:
        proc = self._run("postfix", "start", check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"postfix start failed ({proc.returncode}): {proc.stderr}\n{self.log()}")
        wait_for_port(self.inbound_port)
        wait_for_port(self.reinject_port)

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 15.0) -> None:
        pid = self.master_pid()
        self._run("postfix", "stop", check=False)
        if pid is None:
            return
        # `postfix stop` only signals master(8); wait for it so the temp dir can be removed.
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                self._run("postfix", "abort", check=False)
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.1)

    def postconf(self, *args: str) -> str:
        return self._run("postconf", *args).stdout

    def flush(self) -> None:
        """`postqueue -f`: retry deferred mail now (it also revives destinations marked dead)."""
        self._run("postqueue", "-f")

    def queue(self) -> list[dict[str, Any]]:
        """The queue as `postqueue -j` lists it: one dict per message (queue_name, recipients, ...)."""
        out = self._run("postqueue", "-j").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def postcat(self, queue_id: str) -> str:
        """A queued message's envelope, headers and body as `postcat -q` prints them."""
        return self._run("postcat", "-q", queue_id).stdout

    # -- observing ---------------------------------------------------------------------------------

    def log(self) -> str:
        try:
            return self.maillog.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """First match of a regex in the mail log, polling until it appears."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log())
            if m is not None:
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not in the mail log after {timeout}s:\n{self.log()}")
            time.sleep(0.1)

    def delivered(self) -> list[Path]:
        new = self.maildir / "new"
        return sorted(new.iterdir(), key=lambda p: p.stat().st_mtime) if new.is_dir() else []

    def wait_for_mail(self, count: int = 1, timeout: float = 30.0) -> list[bytes]:
        """The raw bytes of the first `count` delivered messages, waiting for them to arrive."""
        deadline = time.monotonic() + timeout
        while True:
            files = self.delivered()
            if len(files) >= count:
                return [p.read_bytes() for p in files[:count]]
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(files)} of {count} messages delivered after {timeout}s; queue: {self.queue()}"
                    f"\n{self.log()}"
                )
            time.sleep(0.1)

    def send(
        self,
        message: EmailMessage | bytes,
        mail_from: str = "alice@example.org",
        rcpt_tos: Sequence[str] = (f"bob@{DOMAIN}",),
        source_addr: str = "127.0.0.2",
    ) -> None:
        """Submit over SMTP to the inbound port, from `source_addr` (any 127/8 address works on Linux,
        so tests can tell the original client apart from the filter's own 127.0.0.1 connections)."""
        raw = message.as_bytes() if isinstance(message, EmailMessage) else message
        with smtplib.SMTP("127.0.0.1", self.inbound_port, timeout=30,
                          source_address=(source_addr, 0)) as smtp:
            smtp.sendmail(mail_from, list(rcpt_tos), raw)


def _service(name: str, kind: str, private: str, maxproc: str, command: str,
             options: Mapping[str, str]) -> str:
    # master.cf: service type private unpriv chroot wakeup maxproc command. Unprivileged (smtpd
    # refuses to run as root), chroot off.
    lines = [f"{name} {kind} {private} - n - {maxproc} {command}"]
    lines += [f"  -o {k}={v}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def running_postfix(
    filter_port: int | None,
    inbound_overrides: Mapping[str, str] | None = None,
    main_overrides: Mapping[str, str] | None = None,
    scan_procs: int | str = "4",
) -> Iterator[Postfix]:
    """Start a private Postfix whose content filter is 127.0.0.1:`filter_port`; stop and remove it after.

    The temp dir is made here, not under pytest's tmp_path: virtual(8) delivers as VMAIL_UID, which
    cannot traverse pytest's 0700 directories. Set MILTER_TEST_KEEP_POSTFIX=1 to keep it for a look.
    """
    root = Path(tempfile.mkdtemp(prefix="milter-postfix-"))
    root.chmod(0o755)
    pf = Postfix(root=root, filter_port=filter_port, inbound_overrides=inbound_overrides or {},
                 main_overrides=main_overrides or {}, scan_procs=str(scan_procs))
    try:
        pf.write_config()
        pf.start()
        yield pf
    finally:
        pf.stop()
        if os.environ.get("MILTER_TEST_KEEP_POSTFIX") != "1":
            shutil.rmtree(root, ignore_errors=True)
