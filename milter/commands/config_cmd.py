"""`milter check-config`: load and validate a configuration file, naming the broken key."""

from __future__ import annotations

from pathlib import Path

import click

from milter.config import load_config
from milter.errors import ConfigError


@click.command("check-config")
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True)
def check_config(config_path: Path) -> None:
    """Validate CONFIG and print the effective settings."""
    from milter.policy import Policy  # the policy checks its own lists (TLDs, brands, networks) when built

    try:
        cfg = load_config(config_path)
        # as the gateway builds it, less the model's thresholds: a setting that would stop `milter serve`
        # must not pass here
        Policy(cfg.policy, {})
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{config_path}: OK")
    click.echo(repr(cfg))
