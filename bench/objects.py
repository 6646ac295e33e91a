"""Live objects by type in every process of a running gateway: what grows between two snapshots?

    .venv/bin/python bench/objects.py snapshot SERVE_PID OUT.json     # while bench/rss.py (or anything) runs
    .venv/bin/python bench/objects.py diff BEFORE.json AFTER.json [--top 12]

RSS says that a process grows, not what grows. This tool asks the processes themselves: gdb attaches
to each process under the `milter serve` pid (itself, its workers and their prepare processes) and runs
`gc.collect()` then counts `gc.get_objects()` by type name inside it (PyGILState_Ensure +
PyRun_SimpleString, so the process's own interpreter does the counting, between two of its bytecodes).
`diff` prints, per process role, the total and the types that changed most.

What it sees: container objects the garbage collector tracks (dicts, lists, tuples, class instances,
modules, compiled patterns), created after start-up: the gateway `gc.freeze()`s what start-up made,
and frozen objects are not listed. What it does not see: strings, bytes and numbers (not tracked), and
memory the allocator keeps after it was freed (bench/rss.py --trim measures that). It found that the
workers' slow rise was the DNS cache filling to its bound (docs/soak.md, run F).

Needs gdb and ptrace rights over the processes (root, or the same user with ptrace_scope 0). Each
attach stops a process for well under a second; do not use it on a production gateway under load.
Where gdb answers "Couldn't write extended state status: Bad address" (seen on a Firecracker VM,
2026-12-04) it cannot restore the registers after the call, and the process is left broken: a worker
aborted ("The futex facility returned an unexpected error code") and the parent was left holding the
GIL, so it no longer restarted workers. Check with a throw-away process first.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss import roles as gateway_roles

#: Run inside the target process: one line, no quotes that gdb's command line would need escaped.
_COUNT = (
    "import gc, collections; gc.collect(); "
    "c = collections.Counter(type(o).__qualname__ for o in gc.get_objects()); "
    "open({path!r}, 'w').write(repr((sum(c.values()), c.most_common(200))))"
)


def roles(serve_pid: int) -> dict[str, int]:
    """The parent, worker-N and worker-N/prepare-K, named as bench/rss.py names them (the resource
    tracker runs no gateway code and is left out)."""
    return {
        role: pid
        for role, pid in gateway_roles(serve_pid, {}).items()
        if role == "parent" or role.startswith("worker-")
    }


def count(pid: int, timeout: float = 60.0) -> tuple[int, dict[str, int]]:
    """(tracked objects, {type name: count}) inside `pid`, through gdb."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "counts")
        os.chmod(tmp, 0o777)  # the target may run as another user
        code = _COUNT.format(path=path).replace('"', '\\"')
        subprocess.run(
            ["gdb", "-p", str(pid), "-batch", "-ex", "call (int)PyGILState_Ensure()",
             "-ex", f'call (int)PyRun_SimpleString("{code}")', "-ex", "call (void)PyGILState_Release($1)"],
            capture_output=True, timeout=timeout, check=False,
        )
        try:
            total, common = ast.literal_eval(Path(path).read_text())
        except (OSError, ValueError, SyntaxError) as exc:
            raise RuntimeError(f"pid {pid}: gdb could not run the count (is gdb allowed to attach?)") from exc
    return int(total), {str(k): int(v) for k, v in common}


def snapshot(serve_pid: int) -> dict[str, dict[str, object]]:
    return {role: dict(zip(("total", "types"), count(pid), strict=True)) | {"pid": pid}
            for role, pid in roles(serve_pid).items()}


def diff(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], top: int) -> str:
    lines = []
    for role in sorted(set(before) & set(after)):
        a, b = before[role], after[role]
        ta, tb = a["types"], b["types"]
        change = sorted(set(ta) | set(tb), key=lambda t: -abs(tb.get(t, 0) - ta.get(t, 0)))
        lines.append(f"{role}: {a['total']:,} -> {b['total']:,} tracked objects")
        for name in change[:top]:
            d = tb.get(name, 0) - ta.get(name, 0)
            if d:
                lines.append(f"    {name:32s} {ta.get(name, 0):8,} -> {tb.get(name, 0):8,}  ({d:+,})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("snapshot", help="count objects in every gateway process")
    s.add_argument("serve_pid", type=int)
    s.add_argument("out", type=Path)
    d = sub.add_parser("diff", help="what changed between two snapshots")
    d.add_argument("before", type=Path)
    d.add_argument("after", type=Path)
    d.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    if args.cmd == "snapshot":
        snap = snapshot(args.serve_pid)
        if not snap:
            print(f"no gateway processes under pid {args.serve_pid}", file=sys.stderr)
            return 1
        args.out.write_text(json.dumps(snap, indent=1) + "\n")
        print(f"{len(snap)} processes: {', '.join(snap)} -> {args.out}")
        return 0
    print(diff(json.loads(args.before.read_text()), json.loads(args.after.read_text()), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
