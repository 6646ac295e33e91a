"""Pure parts of the gateway: XFORWARD parsing, header rewriting on bytes, the micro-batcher."""

from __future__ import annotations

import asyncio
import email
import threading
from collections.abc import Sequence
from email import policy as email_policy

import pytest

from milter.gateway.batcher import MicroBatcher
from milter.gateway.headers import fold, rewrite
from milter.gateway.relay import passthrough
from milter.gateway.xforward import XForward, XForwardError, advertised, xtext_decode, xtext_encode

RAW = (
    b"Received: from a by b\r\nX-Milter-Verdict: ham\r\nSubject: Hello\r\n"
    b"x-milter-scores: ham=1.0\r\n\tspam=0.0\r\nFrom: a@b.test\r\n\r\n"
    b"X-Milter-Verdict: in the body stays\r\nbody\r\n"
)


def test_xforward_parses_postfix_attributes_and_xtext() -> None:
    xf = XForward().updated("NAME=mail.example.com ADDR=192.0.2.7 PROTO=ESMTP HELO=mx+3Dexample")
    xf = xf.updated("IDENT=4ABC12 SOURCE=REMOTE")
    assert xf.client_addr == "192.0.2.7"
    assert xf.known("NAME") == "mail.example.com"
    assert xf.helo == "mx=example"
    assert xf.ident == "4ABC12"


def test_xforward_unavailable_values_and_ipv6() -> None:
    xf = XForward().updated("NAME=[UNAVAILABLE] ADDR=IPV6:2001:db8::1 HELO=[TEMPUNAVAIL]")
    assert xf.known("NAME") is None
    assert xf.known("HELO") is None
    assert xf.client_addr == "2001:db8::1"
    assert xf.name == "[UNAVAILABLE]"  # forwarded downstream as received


@pytest.mark.parametrize("arg", ["", "BOGUS=1", "ADDR", "NAME=a+0Db"])
def test_xforward_rejects_bad_attributes(arg: str) -> None:
    with pytest.raises(XForwardError) as info:
        XForward().updated(arg)
    assert info.value.reply.startswith("501 5.5.4")


def test_xforward_commands_only_advertised_and_split() -> None:
    xf = XForward(name="n" * 300, addr="192.0.2.1", ident="Q1", helo="h e")
    cmds = xf.commands(advertised("NAME ADDR HELO"))
    assert all(len(c) <= 400 for c in cmds)
    joined = b" ".join(cmds)
    assert b"IDENT=" not in joined  # not advertised by that downstream
    assert b"HELO=h+20e" in joined and b"ADDR=192.0.2.1" in joined


def test_xtext_round_trip() -> None:
    text = "a+b=c d\u00e9"
    assert xtext_decode(xtext_encode(text).replace("+C3+A9", "\u00e9")) == text
    assert xtext_encode("a+b=c") == "a+2Bb+3Dc"


def test_rewrite_strips_forged_headers_with_continuations_only_in_header() -> None:
    out = rewrite(RAW)
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"milter" not in head.lower()
    assert b"spam=0.0" not in out
    assert body == b"X-Milter-Verdict: in the body stays\r\nbody\r\n"
    assert head.startswith(b"Received: from a by b\r\nSubject: Hello\r\nFrom: a@b.test")


def test_rewrite_adds_headers_on_top_and_keeps_body_bytes() -> None:
    body = b"caf\xe9 =?x?= \r\n.\r\nline\r\n"
    raw = b"Subject: Hi\r\nFrom: a@b.test\r\n\r\n" + body
    out = rewrite(raw, [("X-Milter-Verdict", "spam"), ("X-Milter-Reasons", "a\r\nInjected: yes")], "[SPAM]")
    assert out.endswith(b"\r\n\r\n" + body)
    assert out.startswith(b"X-Milter-Verdict: spam\r\nX-Milter-Reasons: a Injected: yes\r\n")
    assert b"\r\nSubject: [SPAM] Hi\r\n" in out
    msg = email.message_from_bytes(out, policy=email_policy.default)
    assert msg["Injected"] is None


def test_rewrite_subject_prefix_not_stacked_and_added_when_missing() -> None:
    once = rewrite(b"Subject: [SPAM] Hi\r\n\r\nb\r\n", subject_prefix="[SPAM]")
    assert once.count(b"[SPAM]") == 1
    added = rewrite(b"From: a@b.test\r\n\r\nb\r\n", subject_prefix="[SPAM]")
    assert b"Subject: [SPAM]\r\n" in added


def test_rewrite_lf_message_and_header_only_message() -> None:
    out = rewrite(b"Subject: x\nX-Milter-Verdict: ham\n\nbody\n", [("X-Milter-Verdict", "spam")])
    assert out == b"X-Milter-Verdict: spam\nSubject: x\n\nbody\n"
    assert rewrite(b"Subject: x") == b"Subject: x\r\n\r\n"


def test_fold_long_and_non_ascii_values() -> None:
    value = " ".join(["reason"] * 40)
    folded = fold("X-Milter-Reasons", value)
    lines = folded.split(b"\r\n")[:-1]
    assert all(len(line) <= 78 for line in lines) and len(lines) > 1
    assert all(line.startswith(b" ") for line in lines[1:])
    parsed = email.message_from_bytes(folded + b"\r\n", policy=email_policy.default)
    assert parsed["X-Milter-Reasons"] == value
    utf = fold("X-Milter-Reasons", "display name J\u00fcrgen\nX-Evil: 1")
    assert utf.isascii() and b"\nX-Evil" not in utf
    assert "J\u00fcrgen" in str(
        email.message_from_bytes(utf + b"\r\n", policy=email_policy.default)["X-Milter-Reasons"]
    )


def test_passthrough_keeps_downstream_code_and_status() -> None:
    err = passthrough(550, "5.1.1 <x@y>: Recipient address rejected", "recipient")
    assert (err.smtp_code, err.smtp_status) == (550, "5.1.1")
    assert passthrough(421, "4.3.2 Shutting down", "message").smtp_code == 451
    assert passthrough(452, "Too many", "x").smtp_status == "4.0.0"


def test_batcher_groups_concurrent_items_and_isolates_failures() -> None:
    calls: list[int] = []
    threads: set[str] = set()

    def fn(items: Sequence[int]) -> list[int]:
        calls.append(len(items))
        threads.add(threading.current_thread().name)
        if -1 in items:
            raise ValueError("bad batch")
        return [i * 2 for i in items]

    async def main() -> None:
        b: MicroBatcher[int, int] = MicroBatcher(fn, max_items=4, max_wait=0.05)
        b.start()
        results = await asyncio.gather(*(b.submit(i) for i in range(10)))
        assert results == [i * 2 for i in range(10)]
        assert calls[:2] == [4, 4]  # full batches go at once, the rest after the wait
        assert sum(calls) == 10
        with pytest.raises(ValueError):
            await b.submit(-1)
        assert await b.submit(5) == 10  # the batcher survives a failed batch
        await b.close()

    asyncio.run(main())
    assert threads and not any(t == threading.main_thread().name for t in threads)


def test_batcher_scores_a_lone_item_at_once_and_waits_only_for_announced_ones() -> None:
    """max_wait is long (5 s): a batch that waited for it would make these awaits take 5 s."""
    calls: list[list[int]] = []

    def fn(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        return [i * 2 for i in items]

    async def announced(b: MicroBatcher[int, int], item: int, delay: float) -> int:
        with b.expect() as submit:
            await asyncio.sleep(delay)  # preparing
            return await submit(item)

    async def withdrawn(b: MicroBatcher[int, int], delay: float) -> None:
        with b.expect():
            await asyncio.sleep(delay)
            raise ValueError("preparation failed")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        b: MicroBatcher[int, int] = MicroBatcher(fn, max_items=8, max_wait=5.0)
        b.start()
        t0 = loop.time()
        assert await b.submit(1) == 2  # nothing else on its way: no wait
        assert await announced(b, 2, 0) == 4
        assert loop.time() - t0 < 2.5
        calls.clear()
        # One item arrives at once, another is announced and arrives 0.2 s later: one batch of two.
        results = await asyncio.gather(announced(b, 3, 0), announced(b, 4, 0.2))
        assert list(results) == [6, 8] and calls == [[3, 4]]
        calls.clear()
        # An announced item that never comes (its preparation failed) releases the batch at once.
        t0 = loop.time()
        outcome = await asyncio.gather(announced(b, 5, 0), withdrawn(b, 0.2), return_exceptions=True)
        assert outcome[0] == 10 and isinstance(outcome[1], ValueError)
        assert calls == [[5]] and loop.time() - t0 < 2.5
        await b.close()

    asyncio.run(main())


def test_group_commit_writes_at_once_when_idle_and_groups_while_busy() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from milter.gateway.recorder import GroupCommit

    batches: list[int] = []
    release = threading.Event()

    def write(items: Sequence[tuple[object, object, bytes]]) -> list[int]:
        batches.append(len(items))
        if len(batches) == 1:
            release.wait(5)  # the first transaction is slow: others queue up behind it
        if any(raw == b"fail" for _, _, raw in items):
            raise RuntimeError("disk full")
        if any(raw == b"short" for _, _, raw in items):
            return []  # a store bug: no ids at all
        return [int(raw) if raw.isdigit() else -1 for _, _, raw in items]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as pool:
            gc = GroupCommit(write, pool, max_batch=3)  # type: ignore[arg-type]
            first = loop.create_task(gc.commit(None, None, b"1"))  # type: ignore[arg-type]
            await asyncio.sleep(0.05)
            later = [loop.create_task(gc.commit(None, None, str(i).encode())) for i in range(2, 7)]  # type: ignore[arg-type]
            await asyncio.sleep(0.05)
            assert batches == [1]  # the others wait for the first commit
            release.set()
            assert await first == 1
            assert list(await asyncio.gather(*later)) == [2, 3, 4, 5, 6]
            assert batches == [1, 3, 2]
            # Two commits arriving together share one transaction: its failure fails both, and the
            # next commit is written normally.
            both = await asyncio.gather(
                gc.commit(None, None, b"7"), gc.commit(None, None, b"fail"), return_exceptions=True  # type: ignore[arg-type]
            )
            assert batches[-1] == 2 and all(isinstance(r, RuntimeError) for r in both)
            assert await gc.commit(None, None, b"8") == 8  # type: ignore[arg-type]
            # Ids missing for a batch fail its callers instead of leaving them waiting for ever.
            with pytest.raises(RuntimeError, match="0 ids for 1 rows"):
                await asyncio.wait_for(gc.commit(None, None, b"short"), 5)  # type: ignore[arg-type]

    asyncio.run(main())


@pytest.mark.parametrize(
    "arg",
    [
        "<bob@rcpt.test>",
        "<bob@rcpt.test> SIZE=100 BODY=8BITMIME",
        "<a.b+c@x-y.example.org>  ",
        "<>",
        " <a@b.c>",
        '<"a b"@c.d>',
        "<a@[127.0.0.1]>",
        "<@x.y:a@b.c>",
        "<a@b.c",
        "a@b.c",
        "<a..b@c.d>",
        "",
    ],
)
def test_fast_address_parsing_agrees_with_aiosmtpd(arg: str) -> None:
    """The fast path for plain `<local@domain>` gives exactly what aiosmtpd's own parser gives."""
    from aiosmtpd.smtp import SMTP

    from milter.gateway.session import XForwardSMTP

    session = XForwardSMTP.__new__(XForwardSMTP)
    session.local_part_limit = 0
    assert XForwardSMTP._getaddr(session, arg) == SMTP._getaddr(session, arg)
    session.local_part_limit = 2
    assert XForwardSMTP._getaddr(session, arg) == SMTP._getaddr(session, arg)
