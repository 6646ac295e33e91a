"""How the From header names the sender: five marks of mail sent by spam tools and from throwaway domains,
tagged at a lower spam score.

* **A brand's name as the mailbox of a domain that is not the brand's** (`name_as_mailbox`,
  `policy.name_mailbox_tag`, 0.85 by default): `Hardware ACE <hardwareace@landyselect.com>`, `Club VP Sams
  <clubvpsams@mswoodtrader.com>`, `AAA Driver Care <AAADriverCare@wifimarfixhotspot.com>`. A spam run
  registers a domain per campaign and names the mailbox after the brand it poses as, so the display name
  and the local part agree and the domain says nothing of either. A real brand's mail names the brand in
  its domain or comes from its platform's (`McDonald's <McDonalds@sparkpostmail.com>` matches too; it
  scores 0.68 out of fold, under the cut). Only names of 8 letters or more count. Such senders sign
  their mail and offer one-click unsubscribing as the brands do (87 % of the shop mailbox's spam is
  DKIM-signed), so neither the signature rules nor the bulk rule separate them; the model scores them
  0.87-0.97 as not-ham, under the spam tag cut that old ham sets (docs/DETECTION.md).
* **A person's name over a gibberish mailbox** (`gibberish_mailbox`, `policy.gibberish_mailbox_tag`, 0.5
  by default): `Gregorio Newman <snqkmfowgmlmyx@verizon.net>`. Spam tools pair a random display name with a
  random local part; a person's own address carries their name or initials, and a platform's generated
  address (VERP, tracking ids) carries digits and separators, which this test excludes: only a local part
  of 8 or more ASCII letters, under a fifth of them vowels, sharing no word of 3 or more letters with the
  display name counts.
* **A mailbox a tool padded** (`padded_mailbox`, `policy.padded_mailbox_tag`, 0.5 by default):
  `ADAC<migo0004-----R165@smkn1purwosari.sch.id>`, `magicalstock______r-oinnuinpmgttm@stocksnut.com`. A
  run of three or more dashes, underscores or dots in the local part is a fixed-width field that a
  sending tool filled: RFC 5322's dot-atom forbids even two dots in a row, a person's mailbox separates
  words with one mark, and the platforms' generated addresses (VERP, SRS, SES and tracking ids) use one
  `=`, `+` or `-` at a time. In the corpora 23 spam and phishing messages have such a From (a German
  brand-phishing run from many compromised school and government domains, two stock-tip runs), and none
  of the 29,242 ham. Sent from many domains, such a run lands on both sides of a sender split: on one of
  them (docs/DETECTION.md, "Other sender splits") the model gave the eight it had not seen 0.6-0.96.
* **A person's name over a mailbox with none of it** (`unrelated_mailbox`, `policy.unrelated_mailbox_tag`,
  0.85 by default): `Courtney Curran <deviyn@lhs75.every1.net>`, `rolland lemieux
  <genevieweinhjef@dad-mail.com>` (another person's mailbox). Spam tools fill the display name from a
  list of names and the address from another list or a stolen one; a person's own mailbox carries the
  first three letters of one of their names, their initials ("gkm" for Glen McCready, "jd1975"), or
  sits at a domain named after them. Only names of two or three words of letters count (two of them of 3
  letters or more), and only mailboxes a person would own: no role words (info@, sales@, accounts@,
  hello@, hq@, list managers, `user@` and `yyyy@` placeholders; German, French, Spanish, Portuguese,
  Dutch and Italian ones too: vertrieb@, contato@), no system accounts (root@), no tracking ids (more
  digits than letters, '#' or '='). A title is not part of the name: `Rep. Pete Olson
  <tx22poima@mail.house.gov>` carries his initials. People do write from old or odd addresses ("Vincent
  Chin <nukiez@hotmail.com>"), so the cut is the name rule's, not the gibberish rule's: the model must
  lean hard to spam already.
* **A brand in the display name that the From domain is not** (`brand_display_name`,
  `policy.brand_display_tag`, 0.85 by default): `Norton Security <jokes@funnysnails.com>`. The brands are
  the features' (`lexicon.BRANDS`, the ones phishing impersonates most), read as a reader takes the name
  in (`identity.brand_in_display`: "PayPaI" is PayPal). The model reads the same fact as one feature
  among hundreds, and its cut is set by old ham; this rule is the display-name spoof rules of SpamAssassin
  and Rspamd, gated on the model's score because co-branded mail names a brand it is not sent by
  (`Amazon Web Services <invoicing@aws.com>`, `Synchrony for your PayPal Extras World Mastercard`).
  A co-brand names itself as well, in its address: another word of the display name is in the mailbox or
  the host (`...@servicing.synchrony.com`), or the name's initials are (`aws`). Where neither holds and
  the brand is named in whole words (`brand_alone`: "Norton Security <jokes@...>", "MetaMask
  <support@wonolo.com>"; not "ZoomCare", not "Purchase"), the brand is borrowed and nothing else is
  claimed, and the cut is `policy.brand_alone_tag` (0.3 by default): 543 of the corpora's spam and
  phishing and none of their ham have that shape: the shop mailbox's 4 ham that name a brand (0.20-0.74),
  two "Lockergnome Apple Core" newsletters (the name in the host) and a list member called Chase Conklin
  (his name in his mailbox) do not. The same lower cut applies where the display name spells the brand
  only when its capital I is read as an l ("WaImart Hello <hellowaimart@qpstoree.com>"): a spelling
  meant to get past filters, which no co-brand uses (2 of the shop mailbox's spam, no ham).
  The brands are the features' and the admin's (`policy.brands`, `borrowed_brand`): the features' list is
  an input the model was fitted with and changes only with a refit, and it lacks brands that modern spam
  runs borrow ("Consumer Cellular Deals <jokes@funnysnails.com>", the shop mailbox's, sent as a bulk
  sender, missed on each of the four sender draws of five that put it in test; "Lowes-Rewards", "AARP
  Membership Offer"). The default adds 42 that the corpora's spam and phishing name over other domains
  (296 messages) and their ham never does, read in whole words only ("Klaus Heinz" is no Shein, "Mia
  Aldington" no Aldi); not Disney or McDonald's, whose mail in the shop mailbox's ham comes from their
  platform's domain. An entry may also give one of the features' brands a domain it mails from (a
  co-brand's platform): the features still name it, the rule does not.

Measured (docs/DETECTION.md, "How From names the sender"): among the corpora's 29,242 ham none has a
name over a gibberish mailbox, against 2,636 of Enron's 28,279 spam and 28 of phishing-pot's 5,930
messages; a name as the mailbox of another domain marks 33 of the shop mailbox's 127 spam and 20 ham
(people at their own domains, brands mailing from their platform's: `McDonald's
<McDonalds@sparkpostmail.com>`); none of those scored out of fold reaches 0.7. The cuts were chosen on the
out-of-fold threshold rows, not on the test split. A person's name over a mailbox with none of it marks
none of Enron's 17,184 ham and none of the lists' (list copies are exempt), 29 of SpamAssassin's 3,113
ham and 1 of the 558 modern ham, against 13,639 of Enron's 28,279 spam, 201 of SpamAssassin's 1,423, 44
of cw-l's 603 and 558 of the 5,941 phishing; out of fold one ham reaches 0.85 (the 2002 hotmail user
above, 0.87) and none 0.9. The corpora hold no modern one-to-one business mail
from people whose mailbox is their full name at a domain that is not (`Jane Doe <janedoe@acme.example>`),
which the first rule would judge too; it needs the model to lean hard to spam already (0.85; 0.35 % of
Enron's business ham scores that high out of fold), and it only tags.

None of the five judges internal clients, our own domains, a mailing list's copy or a machine-generated
report (bounces come from `MAILER-DAEMON`); the first never judges free-mail (a person's own mailbox). All
only tag, after the allow lists and the blocklists, before the bulk rule (a brand-named throwaway sender's
unsubscribe header does not make it bulk) and never softer than the spam ladder; the unrelated-mailbox
rule runs after the brand rule, so "Norton Security <jokes@...>" is named a borrowed brand. Four of the
tests are written here, as hand rules for the policy rather than model inputs; the brand rule reads the
features' own brand test (`MessageSummary.display_brand`), so that the model and the rule agree on what
a borrowed brand is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from milter.errors import ConfigError
from milter.features.domains import registrable
from milter.features.identity import display_letters
from milter.features.summary import MessageSummary
from milter.policy.table import Brand, Context, Hit, judged_sender, tag_from, tag_judged

#: The shortest squashed display name that counts ("Hardware ACE" does; "Jessica <jessica@...>", a person's
#: first name over her own mailbox, does not; nor did a 2002 "Tesco .ie" newsletter from its mailing
#: platform's domain, the only ham out of fold this rule would have tagged with 5).
MIN_NAME = 8
#: The shortest brand name `policy.brands` takes (as the features' brand test: "AARP" does, "CVS" does not).
MIN_BRAND = 4
#: A gibberish local part: this many ASCII letters or more, and under this share of vowels.
GIBBERISH_LETTERS = 8
GIBBERISH_VOWELS = 0.2
#: A tool's padding in a local part: "migo0004-----R165", "onlythebest_______r-7552100-332".
_PADDING = re.compile(r"[-_.]{3,}")
#: RFC 5321's own mailboxes: a bounce names its sender after them at whatever host it came from.
ROLE_MAILBOXES = frozenset({"mailer-daemon", "postmaster"})
_WORDS = re.compile(r"[\s\-_.,&'/+()]+")
#: A mailbox a person would own: no '#', '=' or other marks of VERP, SRS or tracking addresses, and at
#: least half of it letters ("2.20290.44-t9bsgc0tywdu.1" is a newsletter's per-recipient id).
_PERSONAL_LOCAL = re.compile(r"[a-z0-9._-]{1,32}")
#: A host's system accounts: "Cron Daemon <root@host>" is a machine reporting, not a person.
SYSTEM_MAILBOXES = ROLE_MAILBOXES | {"root", "daemon", "nobody"}
#: Words of a shared mailbox: a person's name over info@ or sales@ is someone writing for the company.
ROLE_WORDS = (
    "info", "news", "sales", "support", "service", "admin", "office", "contact", "hello", "team", "reply",
    "mail", "market", "bill", "help", "editor", "account", "order", "notif", "alert", "member", "event",
    "press", "career", "jobs", "recruit", "invoice", "booking", "reserv", "customer", "client", "enquir",
    "inquir", "update", "list", "donat", "outreach", "offer", "deal", "promo", "shop", "store", "reward",
    "tips", "donotuse", "feedback",
    "user",  # a placeholder, not a person's mailbox (templates, and corpora anonymised by rewriting)
    # The same in the languages the corpora's non-English mail is in (German, French, Spanish, Portuguese,
    # Dutch, Italian): a site whose mail is not in English writes from "vertrieb@" and "contato@".
    "vertrieb", "verkauf", "kunden", "buchhaltung", "rechnung", "bestell", "kontakt", "anfrage", "redaktion",
    "versand", "zentrale", "mitglied", "spende", "commande", "factur", "compta", "equipe", "accueil",
    "vente", "abonne", "redaction", "secretariat", "ventas", "contato", "contacto", "atencion",
    "atendimento", "pedido", "fatura", "cobranca", "compras", "equipo", "noticias", "soporte", "suporte",
    "boletin", "verkoop", "klant", "factuur", "nieuws", "redactie", "vendite", "ordini", "assistenza",
)
#: Role words too short to look for inside a local part ("hr" is in "christine"): whole tokens only
#: ("Lucy Caldwell <hq@joewalsh.org>" writes for a campaign's headquarters).
ROLE_TOKENS = frozenset({"hq", "hr", "pr", "it", "ir"})
#: Titles and suffixes around a person's name: not the name ("Rep. Pete Olson <tx22poima@mail.house.gov>"
#: carries the initials of Pete Olson, not of Rep Pete Olson).
HONORIFICS = frozenset({
    "mr", "mrs", "ms", "miss", "mx", "dr", "prof", "professor", "rev", "sir", "dame", "hon", "rep",
    "sen", "senator", "congressman", "congresswoman", "governor", "gov", "mayor", "judge", "pastor",
    "fr", "capt", "col", "gen", "lt", "sgt", "jr", "sr", "ii", "iii", "iv", "phd", "md", "esq",
    "herr", "frau", "mme", "mlle", "sra", "srta", "dott", "dra",
})


def name_as_mailbox(ctx: Context) -> Hit | None:
    cut = ctx.rules.cuts.name_mailbox
    summary = ctx.summary
    if cut is None or not judged_sender(ctx) or summary.freemail_sender:
        return None
    display = brand_mailbox_elsewhere(summary)
    if display is None:
        return None
    where = f"a mailbox named {display!r} at {summary.from_org_domain}, a domain not that name's,"
    return tag_from(ctx, cut, lambda score: f"{where} scores {score:.2f} as spam")


def gibberish_mailbox(ctx: Context) -> Hit | None:
    return _name_over(ctx, ctx.rules.cuts.gibberish_mailbox, name_over_gibberish, "a gibberish mailbox")


def padded_mailbox(ctx: Context) -> Hit | None:
    """A From local part with a run of three or more separators (`padded`; see the module docstring)."""
    summary = ctx.summary
    if not padded(summary.from_addr or ""):
        return None
    what = f"the From mailbox {summary.from_addr} is padded the way a sending tool fills a field"
    return tag_judged(ctx, ctx.rules.cuts.padded_mailbox, what)


def unrelated_mailbox(ctx: Context) -> Hit | None:
    return _name_over(ctx, ctx.rules.cuts.unrelated_mailbox, name_over_unrelated, "a mailbox with none of it")


def _name_over(
    ctx: Context, cut: float | None, matches: Callable[[MessageSummary], bool], mailbox: str
) -> Hit | None:
    """Tag from `cut` where the display name over the From mailbox `matches` (the two name tests)."""
    summary = ctx.summary
    if cut is None or not judged_sender(ctx) or not matches(summary):
        return None
    where = f"a name ({summary.from_display!r}) over {mailbox} ({summary.from_addr})"
    return tag_from(ctx, cut, lambda score: f"{where} scores {score:.2f} as spam")


def brand_display_name(ctx: Context) -> Hit | None:
    summary, cuts = ctx.summary, ctx.rules.cuts
    brand = borrowed_brand(summary, cuts.brands)
    if brand is None or not judged_sender(ctx):
        return None
    # "WaImart": spelled so that a reader sees the brand and a filter does not; no co-brand does that
    disguised = brand not in _plain(summary.from_display or "")
    alone = disguised or brand_alone(summary, brand)
    # the lower of the two cuts where the name is the brand alone; one that is off leaves the other
    applying = (cuts.brand_display, cuts.brand_alone if alone else None)
    cut = min((c for c in applying if c is not None), default=None)
    if cut is None:
        return None
    # the admin's spelling of a policy.brands name ("Consumer Cellular"); the features' key otherwise
    shown = next((b.name for b in cuts.brands if b.letters == brand), brand)
    where = f"the display name names {shown} but the sender domain is {summary.from_org_domain}"
    if disguised:
        where = f"{where}, and it spells the name with a capital I for an l"
    elif alone:
        where = f"{where} and its address has no other word of the name"
    return tag_from(ctx, cut, lambda score: f"{where}, and it scores {score:.2f} as spam")


def borrowed_brand(summary: MessageSummary, extra: tuple[Brand, ...]) -> str | None:
    """The brand (its letters) the From display name names that the From domain is not: the features' own
    test (`MessageSummary.display_brand`, unless `policy.brands` gives that brand the domain), else a
    brand of `policy.brands` (`extra`, from `brands`) named in whole words ("Lowe's Rewards"; not "Mia
    Aldington" for Aldi) over a domain that is not among its own and does not spell it (lidl.de is
    Lidl's)."""
    org = summary.from_org_domain or ""
    if (brand := summary.display_brand) is not None:
        return None if any(b.letters == brand and org in b.owned for b in extra) else brand
    if not summary.from_display or not extra:
        return None
    words, spelled = name_words(summary.from_display), display_letters(org)
    for b in extra:
        if org not in b.owned and b.letters not in spelled and _words_spelling(words, b.letters) is not None:
            return b.letters
    return None


def brands(configured: Iterable[tuple[str, Iterable[str]]]) -> tuple[Brand, ...]:
    """`policy.brands` as `borrowed_brand` reads them: each name as a reader takes it in ("Lowe's" ->
    "lowes") with its domains as registrable domains; a name under 4 letters (read inside too many other
    names) or a domain with no dot is a configuration error naming the key."""
    out = []
    for raw, domains in configured:
        letters = display_letters(raw)
        if len(letters) < MIN_BRAND:
            raise ConfigError(f"policy.brands.{raw}", f"a brand name needs {MIN_BRAND} letters or digits")
        named = [d.strip().lower().strip(".") for d in domains]
        if bad := [d for d in named if "." not in d]:
            raise ConfigError(f"policy.brands.{raw}", f"not a domain: {bad[0]!r}")
        # the rule compares registrable From domains: "mail.lowes.com" is lowes.com's
        out.append(Brand(letters, raw.strip(), frozenset(registrable(d) or d for d in named)))
    return tuple(out)


def brand_alone(summary: MessageSummary, brand: str) -> bool:
    """The display name names `brand` in whole words ("Norton Security", "Liberty Mutual", "WaImart"), and
    its address has nothing of the rest of it: no other word of 3 letters or more in the local part or the
    host, and not the words' initials as a label there. A co-branded sender names itself too ("Amazon
    Benefits at Fidelity <...@mail.fidelity.com>", "Amazon Web Services <invoicing@aws.com>", "Lockergnome
    Apple Core <subscriptions@lockergnome.com>"), and so does a person who bears a brand's name ("Chase
    Conklin <chase.conklin@...>"); a brand inside a longer word is not named ("ZoomCare", "Purchase"); and
    a registrable domain that carries the brand is left to the co-brand cut ("Dropbox
    <no-reply@dropboxmail.com>")."""
    display, addr = summary.from_display, summary.from_addr
    if not display or not addr:
        return False
    words = name_words(display)
    span = _words_spelling(words, brand)
    if span is None:
        return False
    # the brand in the registrable domain's name is the features' other brand test (a brand's second
    # domain, dropboxmail.com, or a phisher's, docusign.me): the model weighs it, the co-brand cut applies
    if brand in display_letters(summary.from_org_domain or ""):
        return False
    address = addr.lower()
    local, _, host = address.rpartition("@")
    others = [w for k, w in enumerate(words) if not span[0] <= k < span[1] and len(w) >= 3]
    if any(w in address for w in others):
        return False
    initials = "".join(w[0] for w in words)
    return len(words) < 2 or initials not in _WORDS.split(local) + host.split(".")


def brand_mailbox_elsewhere(summary: MessageSummary) -> str | None:
    """The display name, where the From mailbox is that name squashed and the From domain carries none of
    it (no word of 3 letters or more, nor the words' initials: British Airways at ba.com is at home)."""
    display, addr, domain = summary.from_display, summary.from_addr, summary.from_org_domain
    if not display or not addr or not domain:
        return None
    name, local = display_letters(display), addr.partition("@")[0]
    if local.lower() in ROLE_MAILBOXES:  # "Mailer Daemon <MAILER-DAEMON@mx.example>": a bounce
        return None
    # "AcETooIs <acetoois@...>": the display's capital I reads as an l, the mailbox keeps the i
    if len(name) < MIN_NAME or display_letters(local) not in (name, _plain(display)):
        return None
    label = domain.partition(".")[0]
    words = name_words(display)
    initials = "".join(w[0] for w in words)
    if name in label or label in name or label in initials:
        return None
    if any(len(w) >= 3 and w in label for w in words):
        return None
    return display


def _words_spelling(words: list[str], brand: str) -> tuple[int, int] | None:
    """(first, end) of the run of consecutive `words` that spells `brand` ("sam", "s", "club"), or None."""
    for first in range(len(words)):
        for end in range(first + 1, len(words) + 1):
            if "".join(words[first:end]) == brand:
                return first, end
    return None


def _plain(text: str) -> str:
    """Letters and digits of `text`, lower case, with no I-for-l reading (as a mailbox spells it)."""
    return display_letters(text.lower())


def name_over_gibberish(summary: MessageSummary) -> bool:
    """A display name with a word of 3 letters or more, over a gibberish local part that shares none of
    its words (see the module docstring)."""
    display, addr = summary.from_display, summary.from_addr
    if not display or not addr:
        return False
    local = addr.partition("@")[0].lower()
    if not gibberish(local):
        return False
    words = [w for w in name_words(display) if len(w) >= 3]
    return bool(words) and not any(w in local or local in w for w in words)


def name_over_unrelated(summary: MessageSummary) -> bool:
    """A person's name (two or three words of letters, two of them of 3 letters or more) over a personal
    mailbox (letters, digits, dots, dashes, underscores; no role word) that has nothing of it: no name
    word's first three letters in the local part or the From domain, not the initials, and not a local
    part that opens with the first name's initial and then holds the last name's ("gkm" for Glen
    McCready)."""
    display, addr = summary.from_display, summary.from_addr
    if not display or not addr:
        return False
    local, _, domain = addr.lower().rpartition("@")
    local, _, tag = local.partition("+")  # a sub-address ("jane+lists") is still her mailbox ...
    if any(c.isdigit() for c in tag):  # ... but "creator+5696@" is a platform's, per customer
        return False
    # Not `name_words`: its capital-I-for-l reading (for brands: "PayPaI") would turn McIntyre into mclntyre.
    words = [w for w in map(_plain, _WORDS.split(display)) if w]
    if not 2 <= len(words) <= 3 or not all(w.isalpha() for w in words) or sum(len(w) >= 3 for w in words) < 2:
        return False
    if not _personal(local):
        return False
    if any(len(w) >= 3 and (w[:3] in local or w[:3] in domain) for w in words):
        return False
    # the initials with and without a title ("Rep. Pete Olson <tx22poima@mail.house.gov>" is P. O.'s)
    untitled = [w for w in words if w not in HONORIFICS]
    untitled = untitled if len(untitled) >= 2 else words  # "Mrs. Miller": one initial matches anything
    letters = "".join(c for c in local if c.isalpha())
    for name in (words, untitled):
        initials = "".join(w[0] for w in name)
        if initials in local or initials in domain:
            return False
        if letters[:1] == name[0][0] and name[-1][0] in letters[1:]:
            return False
    return True


def _personal(local: str) -> bool:
    """A local part that could be one person's own mailbox (see `_PERSONAL_LOCAL`, `ROLE_WORDS`)."""
    if not _PERSONAL_LOCAL.fullmatch(local) or 2 * sum(c.isalpha() for c in local) < len(local):
        return False
    if local in SYSTEM_MAILBOXES or (len(local) >= 3 and len(set(local)) == 1):  # "yyyy@": a placeholder
        return False
    if any(word in local for word in ROLE_WORDS):
        return False
    return ROLE_TOKENS.isdisjoint(_WORDS.split(local))  # the dots, dashes and underscores of a mailbox


def padded(addr: str) -> bool:
    """A local part (of `addr`, an addr-spec) with a run of three or more dashes, underscores or dots."""
    local, sep, _ = addr.rpartition("@")
    return bool(sep) and _PADDING.search(local) is not None


def gibberish(local: str) -> bool:
    """8 or more ASCII letters and nothing else, under a fifth of them vowels ("snqkmfowgmlmyx")."""
    if len(local) < GIBBERISH_LETTERS or not (local.isascii() and local.isalpha()):
        return False
    vowels = sum(c in "aeiou" for c in local.lower())
    return vowels / len(local) < GIBBERISH_VOWELS


def name_words(display: str) -> list[str]:
    """The display name's words, each as `display_letters` reads it (empty ones dropped)."""
    return [w for w in (display_letters(part) for part in _WORDS.split(display)) if w]
