"""`milter quarantine senders`: whom the admins' labels vouch for (milter.policy.learned).

A vouched-for sender's mail that authenticates (DMARC pass; without a DMARC record, its own DKIM
signature) is tagged, not quarantined, on the model's score alone.
The gateway reads the same counts at start and on reload; this shows them now, so an admin can see why
a sender's mail was only tagged, and end the credit by labelling one of its messages spam.
"ham" counts the labels ham and bulk: both say the recipient wants the sender's mail.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from milter.commands import quarantine_view as view
from milter.commands.quarantine import _call, _config, _console, _open, _store_options
from milter.policy.table import LearnedSenders


@click.command("senders")
@_store_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--all", "show_all", is_flag=True, help="Every labelled sender, not only those vouched for.")
def senders_cmd(db_url: str | None, config_path: Path | None, as_json: bool, show_all: bool) -> None:
    """Senders (From domain; address for free-mail) vouched for by their labels, most ham first."""
    min_ham = _config(config_path).policy.learned_sender_labels
    with _open(db_url, config_path) as store:
        rows = _call(store.sender_labels)
    learned = LearnedSenders.from_labels(rows, min_ham)
    entries = [
        (key, labels, learned.vouched(key) is not None)
        for key, labels in sorted(learned.counts.items(), key=lambda item: (-item[1].ham, item[0]))
    ]
    shown = [e for e in entries if show_all or e[2]]
    if as_json:
        for key, labels, vouched in shown:
            click.echo(view.json_text({"sender": key, "ham": labels.ham, "unwanted": labels.unwanted,
                                       "vouched": vouched}))
        return
    table = Table("sender", "ham/bulk labels", "spam/bec labels", "vouched")
    for key, labels, vouched in shown:
        # the key is the From address or domain of stored mail: sender text, escapes and all
        sender = Text(view.safe_line(key))
        table.add_row(sender, str(labels.ham), str(labels.unwanted), "yes" if vouched else "no")
    console = _console()
    console.print(table)
    state = f"policy.learned_sender_labels = {min_ham}" + ("" if min_ham else ": off")
    console.print(f"{learned.vouched_count} of {len(entries)} labelled sender(s) vouched for ({state})")
