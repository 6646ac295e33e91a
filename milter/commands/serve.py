"""`milter serve`: the gateway (Postfix content_filter, smtpd_proxy_filter, or smtpd_milters).

Flags override the configuration file; see milter/gateway/ for how a message is handled.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import click

from milter.config import Config, host_port, load_config, milter_address
from milter.errors import ConfigError, MilterError


def effective_config(
    config_path: Path | None,
    listen: str | None,
    downstream: str | None,
    db: str | None,
    workers: int | None,
    mode: str | None,
    metrics_listen: str | None,
    milter_listen: str | None = None,
) -> Config:
    """The file's configuration with the command-line flags applied and checked."""
    cfg = load_config(config_path)
    server = cfg.server
    if listen is not None:
        if listen in ("", "off"):
            listen = ""
        else:
            host_port(listen, "--listen")
        server = replace(server, listen=listen)
    if milter_listen is not None:
        if milter_listen in ("", "off"):
            server = replace(server, milter_listen=None)
        else:
            milter_address(milter_listen, "--milter-listen")
            server = replace(server, milter_listen=milter_listen)
    if not server.listen and server.milter_listen is None:
        raise ConfigError("--listen", "SMTP is off and no milter listener is set: nothing to serve")
    if downstream is not None:
        host_port(downstream, "--downstream")
        server = replace(server, downstream=downstream)
    if workers is not None:
        if workers < 1:
            raise ConfigError("--workers", f"must be at least 1, got {workers}")
        server = replace(server, workers=workers)
    if mode is not None:
        server = replace(server, mode=mode)
    if metrics_listen is not None:
        if metrics_listen in ("", "off"):
            server = replace(server, metrics_listen=None)
        else:
            host_port(metrics_listen, "--metrics-listen")
            server = replace(server, metrics_listen=metrics_listen)
    store = replace(cfg.store, url=db) if db is not None else cfg.store
    return replace(cfg, server=server, store=store)


@click.command("serve")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML configuration file.")
@click.option("--listen", help="HOST:PORT to accept SMTP on, or 'off' (server.listen).")
@click.option(
    "--milter-listen",
    help="inet:HOST:PORT or unix:/PATH to speak the milter protocol on, or 'off' (server.milter_listen).",
)
@click.option("--downstream", help="HOST:PORT to relay to (server.downstream).")
@click.option("--db", help="Store URL, e.g. sqlite:///var/milter.db (store.url).")
@click.option("--workers", type=int, help="Worker processes; 1 serves in this process (server.workers).")
@click.option("--mode", type=click.Choice(["after-queue", "before-queue"]), help="server.mode")
@click.option(
    "--metrics-listen", help="HOST:PORT for /metrics and /healthz, or 'off' (server.metrics_listen)."
)
def serve(
    config_path: Path | None,
    listen: str | None,
    milter_listen: str | None,
    downstream: str | None,
    db: str | None,
    workers: int | None,
    mode: str | None,
    metrics_listen: str | None,
) -> None:
    """Run the gateway: scan every message, then relay, tag or quarantine it (SMTP), or tell the MTA
    to (milter).

    SIGHUP (systemctl reload) reloads the model from [model] path in every worker; a model that fails
    its checks is refused and the running one keeps serving."""
    from milter.gateway.workers import run_single, run_workers

    # A service logs a line per message (and its start, model and providers) by default: INFO, not
    # the WARNING the other commands use; `milter -vv serve` adds debug.
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    # aiosmtpd logs every command at INFO under "mail.log": far too much for a busy relay; alembic
    # says at INFO which plugins it set up each time a store opens.
    root_level = logging.getLogger().getEffectiveLevel()
    if root_level > logging.DEBUG:
        for noisy in ("mail.log", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = effective_config(
            config_path, listen, downstream, db, workers, mode, metrics_listen, milter_listen
        )
        if cfg.server.workers == 1:
            run_single(cfg)
        else:
            run_workers(cfg, root_level)
    except MilterError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:  # typically the listen address is in use
        raise click.ClickException(f"cannot serve: {exc}") from exc
