"""`milter scan` (placeholder until implemented)."""

from __future__ import annotations

import click


@click.command("scan")
def scan() -> None:
    """Not implemented yet."""
    raise click.ClickException("not implemented yet")
