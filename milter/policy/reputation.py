"""DNS blocklists (milter/auth/dnsbl.py): a listed client address, sender domain or link domain decides
with its zone's configured action and verdict.

After the allow lists, so an admin can vouch for a sender a list names by mistake (the lists' own
documented false positives are shared hosting and abused legitimate domains); after the BEC rules and
the BEC ladder, which decide first with their own verdict. Before the bulk rule, so a listed newsletter
is not accepted as bulk for its headers, and before the spam ladder, which it never softens: when the
model alone would act more strictly than the zone (quarantine against a zone's tag), the stricter
action stands, with the listing as the reason. A zone's `min_score` makes its listings count only
where the model's not-ham score reaches it (for lists too broad to decide alone). Only listings
count: a refused, timed-out or failed lookup is no evidence (the gateway counts and logs those), so a
DNS outage changes no decision.
"""

from __future__ import annotations

from milter.policy.table import SEVERITY, Context, Hit, no_softer_than_ladder

#: Listings quoted in the reason at most (one message can hit a dozen link domains).
MAX_QUOTED = 3


def blocklisted(ctx: Context) -> Hit | None:
    reputation = ctx.summary.reputation
    score = ctx.scores.spam + ctx.scores.bec
    listings = tuple(x for x in reputation.listings if score >= x.min_score) if reputation else ()
    if not listings:
        return None
    strongest = max(listings, key=lambda listing: SEVERITY[listing.action])  # the first on ties
    action = no_softer_than_ladder(ctx, strongest.action, score)
    quoted = [strongest, *(listing for listing in listings if listing is not strongest)][:MAX_QUOTED]
    more = len(listings) - len(quoted)
    reason = "; ".join(listing.reason for listing in quoted) + (f"; {more} more listed" if more else "")
    return Hit(reason, strongest.verdict, action)
