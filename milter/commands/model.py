"""`milter model`: list the model history, promote a validated model, roll back to an earlier one.

The directory is the folder of `[model] path` (models/ by default; /var/lib/milter/models for the
systemd service), or --dir. Exit status: 0 done, 1 refused or failed (one line on stderr, the current
model untouched), 2 bad usage. A running gateway keeps its model until it is reloaded (SIGHUP:
`systemctl reload milter`).

With `[model] registry = "store"` in --config (and no --dir) the same commands act on the whole fleet
through the store (milter.commands.model_fleet), and `status` lists every node.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from milter.config import load_config
from milter.errors import ConfigError, ModelError, StoreError
from milter.registry import ModelInfo, describe_metrics, list_models, promote, registry_dir, rollback

if TYPE_CHECKING:
    from milter.store import Store

RELOAD_HINT = "a running gateway keeps its model until reloaded (systemctl reload milter)"


def _directory(dir_opt: Path | None, config_path: Path | None, installs: bool = True) -> Path:
    """--dir, or the folder of the config's model.path; one that `installs` (promote, rollback) only
    when model.path is that folder's current.onnx (`registry_dir`): else the gateway would not load
    what they install."""
    if dir_opt is not None:
        return dir_opt
    try:
        model_path = load_config(config_path).model.path
        return registry_dir(model_path) if installs else model_path.parent
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@contextmanager
def _fleet(dir_opt: Path | None, config_path: Path | None) -> Iterator[Store | None]:
    """The fleet's store when --config says registry = "store" (and no --dir); None: act locally."""
    if dir_opt is not None:
        yield None
        return
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if cfg.model.registry != "store":
        yield None
        return
    from milter.store import Store

    try:
        store = Store.open(cfg.store.url)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        yield store
    finally:
        store.close()


def _console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=200)


_dir_option = click.option("--dir", "dir_opt", type=click.Path(file_okay=False, path_type=Path),
                           help="Model directory [default: the folder of the config's model.path].")
_config_option = click.option("--config", "config_path", type=click.Path(path_type=Path),
                              help="TOML configuration file.")


@click.group("model")
def model() -> None:
    """Model history: list, promote, roll back."""


@model.command("list")
@_dir_option
@_config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, oldest first.")
def list_cmd(dir_opt: Path | None, config_path: Path | None, as_json: bool) -> None:
    """Promoted models, oldest first; the current one is marked."""
    with _fleet(dir_opt, config_path) as store:
        if store is not None:
            try:
                published = store.model_list()
            except StoreError as exc:
                raise click.ClickException(str(exc)) from exc
            from milter.commands import model_fleet

            for published_row in published if as_json else ():
                click.echo(json.dumps(model_fleet.model_json(published_row)))
            if not as_json:
                _console().print(model_fleet.models_table(published))
            return
    directory = _directory(dir_opt, config_path, installs=False)
    try:
        rows = list_models(directory)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        for row in rows:
            click.echo(json.dumps(row.as_json()))
        return
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(_table(rows, directory))


def _table(rows: list[ModelInfo], directory: Path) -> Table:
    table = Table("", "name", "created (UTC)", "schema", "test metrics (quarantine level)")
    for r in rows:
        schema = f"{r.schema_version}/{r.schema_digest[:12]}" + ("" if r.schema_ok else " (mismatch)")
        when = r.created.strftime("%Y-%m-%d %H:%M") if r.created else "?"
        name = r.name if r.in_history else f"{r.name} (not in history)"
        table.add_row("*" if r.is_current else "", name, when, schema, describe_metrics(r.metrics))
    if not rows:
        table.caption = f"no models in {directory}"
    return table


@model.command("promote")
@_dir_option
@_config_option
@click.option("--metadata", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Metadata JSON [default: the .json beside ONNX].")
@click.argument("onnx", type=click.Path(dir_okay=False, path_type=Path))
def promote_cmd(dir_opt: Path | None, config_path: Path | None, json_path: Path | None, onnx: Path) -> None:
    """Validate ONNX (schema, sha256, smoke scan), keep it in history and make it current (for the
    whole fleet with registry = "store")."""
    with _fleet(dir_opt, config_path) as store:
        if store is not None:
            from milter.commands import model_fleet

            try:
                name, previous = model_fleet.promote(store, onnx, json_path)
            except (ModelError, StoreError) as exc:
                raise click.ClickException(f"not promoted: {exc}") from exc
            click.echo(f"promoted {name} for the fleet (previous: {previous or 'none'}); "
                       f"{model_fleet.ADOPT_HINT}")
            return
    directory = _directory(dir_opt, config_path)
    try:
        done = promote(directory, onnx, json_path)
    except ModelError as exc:
        raise click.ClickException(f"not promoted: {exc}") from exc
    click.echo(f"promoted {done.name} (previous: {done.previous or 'none'}); {RELOAD_HINT}")


@model.command("rollback")
@_dir_option
@_config_option
@click.argument("name", required=False)
def rollback_cmd(dir_opt: Path | None, config_path: Path | None, name: str | None) -> None:
    """Make NAME (default: the model before the current one) current again (fleet-wide with
    registry = "store")."""
    with _fleet(dir_opt, config_path) as store:
        if store is not None:
            from milter.commands import model_fleet

            try:
                to, previous = model_fleet.rollback(store, name)
            except (ModelError, StoreError) as exc:
                raise click.ClickException(f"not rolled back: {exc}") from exc
            click.echo(f"rolled the fleet back to {to} (previous: {previous or 'none'}); "
                       f"{model_fleet.ADOPT_HINT}")
            return
    directory = _directory(dir_opt, config_path)
    try:
        done = rollback(directory, name)
    except ModelError as exc:
        raise click.ClickException(f"not rolled back: {exc}") from exc
    click.echo(f"rolled back to {done.name} (previous: {done.previous or 'none'}); {RELOAD_HINT}")


@model.command("status")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per node.")
def status_cmd(config_path: Path | None, as_json: bool) -> None:
    """Every gateway node of the fleet: its model, whether it is the fleet's current one, its last
    check-in and error (needs [model] registry = "store")."""
    with _fleet(None, config_path) as store:
        if store is None:
            raise click.ClickException(
                "milter model status needs [model] registry = \"store\" in --config: with a local "
                "registry each gateway reports its model in its log and milter_model_info"
            )
        from milter.commands import model_fleet

        try:
            fleet, rows = store.model_current(), store.node_list()
        except StoreError as exc:
            raise click.ClickException(str(exc)) from exc
    if as_json:
        for row in rows:
            click.echo(json.dumps(model_fleet.node_json(row, fleet)))
        return
    _console().print(model_fleet.nodes_table(rows, fleet))
