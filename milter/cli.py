"""`milter` command line: one click group; each sub-command lives in milter/commands/.

Sub-commands are imported when they are run, not at start-up: together they pull in ONNX Runtime,
SQLAlchemy with Alembic and aiosmtpd, which took 1.5 s before `milter scan` could read a byte.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

#: name -> (module, attribute) of each sub-command
COMMANDS: dict[str, tuple[str, str]] = {
    "check-config": ("milter.commands.config_cmd", "check_config"),
    "history": ("milter.commands.history", "history"),
    "model": ("milter.commands.model", "model"),
    "quarantine": ("milter.commands.quarantine", "quarantine"),
    "report": ("milter.commands.report", "report"),
    "scan": ("milter.commands.scan", "scan"),
    "serve": ("milter.commands.serve", "serve"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attr = COMMANDS[cmd_name]
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Email-security gateway: scan, serve, review the quarantine."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
