"""`milter` command line: one click group; each sub-command lives in milter/commands/."""

from __future__ import annotations

import logging
import sys

import click

from milter.commands.config_cmd import check_config
from milter.commands.model import model
from milter.commands.quarantine import quarantine
from milter.commands.report import report
from milter.commands.scan import scan
from milter.commands.serve import serve


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Email-security gateway: scan, serve, review the quarantine."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


main.add_command(scan)
main.add_command(serve)
main.add_command(check_config)
main.add_command(quarantine)
main.add_command(model)
main.add_command(report)
