"""`milter serve` as a subprocess, as Postfix meets it in production: start, wait until ready, stop, kill.

Used by the end-to-end tests through real Postfix (SMTP content filter and milter). The process runs in
its own session, so `kill()` can SIGKILL the whole gateway (workers and prepare processes) at once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def milter_command() -> str:
    milter = Path(sys.executable).parent / "milter"
    return str(milter if milter.exists() else shutil.which("milter") or "milter")


@dataclass
class ServeProcess:
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def output(self) -> str:
        try:
            return (self.workdir / "serve.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def launch(
        self, config: str, args: Sequence[str], ready: Callable[[], bool], timeout: float = 90.0,
        wrapper: Sequence[str] = (),
    ) -> None:
        """Write `config` (TOML), run `milter -v serve --config FILE ARGS...`, wait until `ready()`.
        `wrapper` goes in front of the command (e.g. strace); `proc` is then the wrapper's process."""
        path = self.workdir / "milter.toml"
        path.write_text(config, encoding="utf-8")
        argv = [*wrapper, milter_command(), "-v", "serve", "--config", str(path), *args]
        with (self.workdir / "serve.log").open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=REPO, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"milter serve exited with {self.proc.returncode}:\n{self.output}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"milter serve not ready after {timeout}s:\n{self.output}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the whole gateway: no drain, no goodbye, replies in flight are lost."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM (the gateway drains what it has in flight), SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
