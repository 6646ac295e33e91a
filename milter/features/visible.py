"""The words of an HTML part as a mail client shows them.

selectolax's `text(separator=" ")` puts the separator between every two text nodes, so `g<span>ift</span>
card`, `gi<!-- -->ft card` and `gi<wbr>ft card` each read as the two words "g ift" / "gi ft", while a
reader sees "gift card": an empty tag or comment inside a word was enough to hide the word from the
language counts and the hashed n-grams (a gift-card BEC went from quarantine to accept). Here comments and
`<wbr>` go, elements that flow inside a line (span, b, font, a, ...) are unwrapped, and the text nodes
they leave side by side are merged before the text is read; elements that start a new box (p, div, td,
li, br, ...) still separate words. Invisible format characters (zero-width space, soft hyphen, ...) are
the text features' business (milter.features.text.words).

No library does this: lexbor's own text join is the separator one, and its `unwrap_tags` /
`merge_text_nodes` are the pieces used here.
"""

from __future__ import annotations

import time

from selectolax.lexbor import LexborHTMLParser

#: Elements laid out inside a line of text (HTML's phrasing content that draws no box of its own).
#: `img`, `input`, `button` and the like are left alone: they are shown as something between words.
INLINE_TAGS: tuple[str, ...] = (
    "a", "abbr", "b", "bdi", "bdo", "big", "cite", "code", "data", "del", "dfn", "em", "font", "i",
    "ins", "kbd", "label", "mark", "nobr", "q", "s", "samp", "small", "span", "strike", "strong", "sub",
    "sup", "time", "tt", "u", "var",
)
_INLINE_SELECTOR = ",".join(INLINE_TAGS)
_DROPPED = frozenset({"-comment", "wbr"})
#: CPU seconds the unwrapping may take for one message (the corpora's largest HTML needs milliseconds)
UNWRAP_BUDGET_S = 0.2


def visible_text(tree: LexborHTMLParser) -> str:
    """The body's text with words joined as shown. Mutates `tree`: read links and anything else that
    needs the inline elements (`a`) before calling it."""
    body = tree.body
    if body is None:
        return ""
    # collected first: decomposing while traversing would cut the walk short
    for node in [n for n in body.traverse(include_text=True) if n.tag in _DROPPED]:
        node.decompose()
    # one element at a time, not unwrap_tags: lexbor's unwrap costs the size of what the element holds,
    # so 2,048 unclosed <span> around 60,000 <p> took 2 s of CPU (tests/hostile.py). Past a CPU budget
    # that real mail never comes near, the rest stays wrapped and is read as before (a word split by a
    # tag may read as two): the message is hostile, and reading it must not stall the pool.
    start = time.process_time()
    for i, node in enumerate(tree.css(_INLINE_SELECTOR)):
        if i % 64 == 63 and time.process_time() - start > UNWRAP_BUDGET_S:
            break
        node.unwrap(delete_empty=True)  # an empty <span></span> splits a word too
    tree.merge_text_nodes()
    return body.text(separator=" ")
