"""`milter scan [--json] PATH...`: classify files, folders of .eml, mbox files or stdin (`-`).

With --json, exactly one JSON object per line per message:
  {"path", "verdict", "action", "scores": {"ham", "spam", "bec"}, "reasons": [...], "model"}
plus, for messages the policy did not simply accept (every message with --explain), the model's exact
per-feature contributions: "explanation" (milter.explain.Explanation.as_json) and "why" (its short form).
"verdict" is ham, bulk, spam or bec; "scores" are the model's three classes (bulk is no model class:
the policy derives it from the sender's evidence, milter.policy.bulk).
and {"path", "error"} for input that could not be read or scanned; the scan goes on and the exit status
is 1 when any message failed (2 for a bad model or configuration).

With --dns, DKIM signatures are verified and DMARC evaluated as the gateway does ([auth] settings), and
each row gains "auth" (the Authentication-Results value); the [reputation] zones are asked about the
sender and link domains (a file has no client address) and a listing shows in the reasons. Off by
default: a folder of old mail would cost a DNS lookup per sender, and the keys of years-old signatures
are long gone.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from milter.auth import CachingResolver, Evidence, Resolver, gather
from milter.auth.dnsbl import Reputation
from milter.config import Config, load_config
from milter.errors import ConfigError, ModelError
from milter.features import Protected
from milter.features.summary import Extracted
from milter.gateway.auth import dns_resolver
from milter.gateway.reputation import build_blocklists
from milter.scan import Scanner, ScanResult, build_scanner, prepare, words_from
from milter.sources import Item, expand, read_items
from milter.types import Envelope

BATCH = 64
PROGRESS_MIN = 200  # show a progress bar on stderr from this many files


@click.command("scan")
@click.argument("paths", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line per message.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML configuration file.")
@click.option("--model", "model_path", type=click.Path(path_type=Path), help="ONNX model (default: shipped).")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Processes for parsing and feature extraction.",
)
@click.option(
    "--dns", "use_dns", is_flag=True, help="Verify DKIM and evaluate DMARC over DNS (the [auth] table)."
)
@click.option(
    "--explain", is_flag=True,
    help="Explain every message's score, not only those the policy tags, quarantines or rejects.",
)
def scan(
    paths: tuple[str, ...],
    as_json: bool,
    config_path: Path | None,
    model_path: Path | None,
    workers: int,
    use_dns: bool,
    explain: bool,
) -> None:
    """Classify messages and print verdict, action, scores, reasons and the model's explanation."""
    try:
        cfg = load_config(config_path)
        scanner = build_scanner(cfg, model_path, explain_all=explain)
        dns = _Dns(cfg, cfg.auth.authserv_id or cfg.server.hostname) if use_dns else None
    except (ConfigError, ModelError) as exc:
        click.echo(f"milter scan: {exc}", err=True)
        sys.exit(2)
    files = expand(list(paths))
    bar = tqdm(total=len(files), unit="file", file=sys.stderr, disable=len(files) < PROGRESS_MIN)
    rows: list[dict[str, Any]] = []
    failed = 0
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for item_batch in _batches(read_items(files), batch_size(cfg, scanner)):
            for row in _scan_batch(scanner, item_batch, pool, dns):
                failed += "error" in row
                if as_json:
                    click.echo(json.dumps(row, ensure_ascii=False))
                else:
                    rows.append(row)
            bar.update(len({i.path.split("#")[0] for i in item_batch}))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
        if dns is not None:
            dns.close()
    if not as_json:
        _print_table(rows)
    sys.exit(1 if failed else 0)


class _Dns:
    """One event loop and one cached resolver for the whole scan, so repeated senders cost one lookup."""

    def __init__(self, config: Config, authserv_id: str) -> None:
        # an explicit --dns without a usable resolver is a configuration error (exit 2), not a warning
        auth = config.auth
        self.resolver: Resolver = CachingResolver(dns_resolver(auth), max_entries=auth.dns_cache_entries)
        self.config = auth
        self.authserv_id = authserv_id
        # [reputation] zones, asked for the sender and link domains (a file has no client address)
        self.blocklists = build_blocklists(
            config.reputation, self.resolver, protected_domains=config.policy.protected_domains
        )
        self._runner = asyncio.Runner()

    def evidence(self, raws: list[bytes]) -> list[Evidence]:
        """Every message's lookups at once, each under its own auth.timeout deadline."""
        cfg = self.config

        async def all_of() -> list[Evidence]:
            jobs = (
                gather(r, self.resolver, cfg.timeout, cfg.trusted_authserv_ids,
                       trusted_arc_sealers=cfg.trusted_arc_sealers)
                for r in raws
            )
            return list(await asyncio.gather(*jobs))

        return self._runner.run(all_of())

    def listed(self, exts: list[Extracted]) -> list[Extracted]:
        """`exts` with what the [reputation] zones said of each (unchanged without zones)."""
        blocklists = self.blocklists
        if blocklists is None:
            return exts

        async def all_of() -> list[Reputation | None]:
            jobs = (blocklists.check(ext.summary, Envelope(), ext.summary.message_id or "") for ext in exts)
            return list(await asyncio.gather(*jobs))

        found = self._runner.run(all_of())
        return [
            ext if rep is None else replace(ext, summary=replace(ext.summary, reputation=rep))
            for ext, rep in zip(exts, found, strict=True)
        ]

    def close(self) -> None:
        self._runner.close()


def batch_size(cfg: Config, scanner: Scanner) -> int:
    """Messages per model call: [model] gpu_batch_size when the tensor graph scores on CUDA (a GPU wants
    hundreds of rows a call), else BATCH (enough for the CPU, and a short wait for the first rows)."""
    return cfg.model.gpu_batch_size if scanner.classifier.on_gpu else BATCH


def _batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _scan_batch(
    scanner: Scanner, items: list[Item], pool: ProcessPoolExecutor | None, dns: _Dns | None = None
) -> list[dict[str, Any]]:
    good = [i for i in items if i.raw is not None]
    protected = scanner.policy.protected
    raws = [i.raw for i in good if i.raw is not None]
    evidence: list[Evidence | None] = list(dns.evidence(raws)) if dns is not None else [None] * len(raws)
    prepared: list[Extracted | BaseException] = []
    if pool is not None:
        pairs = zip(raws, evidence, strict=True)
        futures = [pool.submit(prepare, raw, None, protected, ev) for raw, ev in pairs]
        prepared = [_outcome(f) for f in futures]
    else:
        prepared = [_safe_prepare(raw, protected, ev) for raw, ev in zip(raws, evidence, strict=True)]
    ok = [(item, ext) for item, ext in zip(good, prepared, strict=True) if isinstance(ext, Extracted)]
    results: dict[str, ScanResult] = {}
    if ok:
        exts = [ext for _, ext in ok]
        if dns is not None:
            exts = dns.listed(exts)
        envs = [Envelope()] * len(exts)
        words_of = words_from([item.raw or b"" for item, _ in ok], pool.map if pool is not None else map)
        decided = scanner.decide(exts, envs, scanner.predict(exts), words_of)
        for (item, _), res in zip(ok, decided, strict=True):
            results[item.path] = res
    rows = []
    errors = {
        item.path: ext for item, ext in zip(good, prepared, strict=True) if isinstance(ext, BaseException)
    }
    for item in items:
        if item.error is not None:
            rows.append({"path": _text(item.path), "error": item.error})
        elif item.path in errors:
            rows.append({"path": _text(item.path), "error": f"scan failed: {errors[item.path]!r}"})
        else:
            rows.append(result_row(item.path, results[item.path], dns.authserv_id if dns else ""))
    return rows


def _safe_prepare(
    raw: bytes, protected: Protected, evidence: Evidence | None
) -> Extracted | BaseException:
    try:
        return prepare(raw, None, protected, evidence)
    except Exception as exc:  # extraction is built not to raise; if it does, report and go on
        return exc


def _outcome(future: Any) -> Extracted | BaseException:
    try:
        result: Extracted = future.result()
    except Exception as exc:
        return exc
    return result


def _text(value: str) -> str:
    """Valid UTF-8 only: file names and header text can carry undecodable bytes (surrogate escapes)."""
    return value.encode("utf-8", "replace").decode("utf-8")


def result_row(path: str, res: ScanResult, authserv_id: str = "") -> dict[str, Any]:
    row = {
        "path": _text(path),
        "verdict": res.verdict.value,
        "action": res.action.value,
        "scores": {k: round(v, 6) for k, v in res.scores.as_dict().items()},
        "reasons": [_text(r) for r in res.reasons],
        "model": res.model,
    }
    if res.summary.auth is not None:  # only with --dns
        row["auth"] = res.summary.auth.header_value(authserv_id)
    if res.explanation is not None:  # flagged mail, or every message with --explain
        row["explanation"] = res.explanation.as_json()
        row["why"] = _text(res.explanation.short(towards=3, against=1))
    return row


def _print_table(rows: list[dict[str, Any]]) -> None:
    console = Console()
    table = Table(show_lines=False)
    for col in ("path", "verdict", "action", "ham", "spam", "bec", "top reason"):
        table.add_column(col, overflow="fold")
    for row in rows:
        if "error" in row:
            table.add_row(row["path"], "[red]error[/red]", "", "", "", "", row["error"])
            continue
        s = row["scores"]
        table.add_row(
            row["path"],
            row["verdict"],
            row["action"],
            f"{s['ham']:.3f}",
            f"{s['spam']:.3f}",
            f"{s['bec']:.3f}",
            "\n".join(filter(None, [row["reasons"][0] if row["reasons"] else "", row.get("why", "")])),
        )
    console.print(table)
    verdicts = Counter(r.get("verdict", "error") for r in rows)
    actions = Counter(r["action"] for r in rows if "action" in r)
    console.print(
        f"{len(rows)} messages: "
        + ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items()))
        + " | actions: "
        + ", ".join(f"{k} {v}" for k, v in sorted(actions.items()))
    )
