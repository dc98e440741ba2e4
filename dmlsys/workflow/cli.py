"""``python -m dmlsys.workflow cache ls|show KEY|gc|clear``: look into and tidy the memo store.

(The end-to-end pipeline is an application on top of this library: ``python -m dmlsys.pipeline``.)"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from typing import Sequence

from .store import DEFAULT_ROOT, Entry, MemoStore

_UNITS_T = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_UNITS_B = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30,
            "t": 1 << 40, "tb": 1 << 40}


def parse_duration(text: str) -> float:
    """'90' (seconds), '30m', '2h', '7d', '1w' -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhdw]?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; use e.g. 90, 30m, 2h, 7d")
    return float(m.group(1)) * _UNITS_T[m.group(2)]


def parse_size(text: str) -> int:
    """'1048576', '500M', '2G' (binary units) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?b?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 1048576, 500M, 2G")
    return int(float(m.group(1)) * _UNITS_B[m.group(2)])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _when(t: float | None) -> str:
    return "" if t is None else datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _table(entries: Sequence[Entry], title: str):  # -> rich Table
    from rich.table import Table

    t = Table(title=title)
    for col, just in (("key", "left"), ("step", "left"), ("size", "right"), ("created", "left"),
                      ("last hit", "left"), ("hits", "right")):
        t.add_column(col, justify=just)
    for e in entries:
        t.add_row(e.key[:16], e.step, human_bytes(e.size), _when(e.created), _when(e.last_hit), str(e.hits))
    return t


def build_parser(prog: str = "python -m dmlsys.workflow") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog,
                                 description="dmlsys workflows: inspect and tidy the step memo store.")
    sub = ap.add_subparsers(dest="group", required=True)
    cache = sub.add_parser("cache", help="the memo store (SQLite index + blobs)",
                           description="List, inspect, garbage-collect or clear memoized step results.")
    cache.add_argument("--root", default=str(DEFAULT_ROOT), help=f"store directory (default {DEFAULT_ROOT})")
    cmd = cache.add_subparsers(dest="cmd", required=True)
    ls = cmd.add_parser("ls", help="list entries, newest first")
    ls.add_argument("--step", help="only entries of this step")
    show = cmd.add_parser("show", help="details of one entry (a unique key prefix is enough)")
    show.add_argument("key")
    gc = cmd.add_parser("gc", help="remove entries unused for --max-age, then least recently used beyond --max-bytes")
    gc.add_argument("--max-age", type=parse_duration, help="e.g. 7d, 12h, 3600")
    gc.add_argument("--max-bytes", type=parse_size, help="total size budget, e.g. 500M, 2G")
    gc.add_argument("--dry-run", action="store_true", help="show what would be removed, remove nothing")
    clear = cmd.add_parser("clear", help="remove every entry")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return ap


def main(argv: Sequence[str] | None = None, prog: str = "python -m dmlsys.workflow") -> int:
    """``prog``: the command as the user typed it (``python -m dmlsys.cluster`` passes its own),
    so that --help and errors show that."""
    args = build_parser(prog).parse_args(argv)
    from rich.console import Console

    console = Console()
    with MemoStore(args.root) as store:
        if args.cmd == "ls":
            entries = [e for e in store.entries() if args.step is None or e.step == args.step]
            entries.sort(key=lambda e: (e.created, e.key), reverse=True)
            console.print(_table(entries, f"{args.root}: {len(entries)} entries, {human_bytes(sum(e.size for e in entries))}"))
        elif args.cmd == "show":
            found = store.find(args.key)
            if len(found) != 1:
                what = "no entry" if not found else f"{len(found)} entries"
                console.print(f"[red]{what} with key prefix {args.key!r} in {args.root}; "
                              "run `cache ls` and give a longer prefix[/]")
                return 1
            e = found[0]
            for field in ("key", "step", "size", "created", "last_hit", "hits", "fingerprint", "checksum"):
                v = getattr(e, field)
                shown = _when(v) + f"  ({v})" if field in ("created", "last_hit") and v else v
                console.print(f"[bold]{field:12}[/] {shown}")
            console.print(f"[bold]{'blob':12}[/] {store.blob_path(e.key)}")
        elif args.cmd == "gc":
            if args.max_age is None and args.max_bytes is None:
                console.print("[red]gc needs --max-age and/or --max-bytes[/]")
                return 2
            if args.dry_run:
                from .store import select_for_gc

                doomed = select_for_gc(store.entries(), store.clock(), args.max_age, args.max_bytes)
            else:
                doomed = store.gc(max_age=args.max_age, max_bytes=args.max_bytes)
            verb = "would remove" if args.dry_run else "removed"
            freed = sum(e.size for e in doomed)
            kept = store.total_bytes() - (freed if args.dry_run else 0)
            console.print(_table(doomed, f"{verb} {len(doomed)} entries, {human_bytes(freed)}; {human_bytes(kept)} kept"))
        elif args.cmd == "clear":
            if not args.yes and sys.stdin.isatty():
                if input(f"remove every entry under {args.root}? [y/N] ").strip().lower() != "y":
                    return 1
            console.print(f"removed {store.clear()} entries from {args.root}")
    return 0
