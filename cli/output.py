"""Everything the CLI shows: results on stdout, progress and errors on stderr.

Names and paths can come from a manifest, that is from a publisher, who
may put terminal escape sequences in them ("\\x1b[2J" clears the screen;
others retitle the window or, on some terminals, inject input). Every text
shown here goes through ``printable`` first; JSON output escapes control
characters by itself.
"""

from __future__ import annotations

import json
import logging
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape as escape_markup
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from dht_dfs.core.config import format_size
from dht_dfs.core.direntry import DirEntry, EntryKind
from dht_dfs.node import results
from dht_dfs.node.pins import Pin, PinList

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def setup_logging(verbosity: int, *, default: int = logging.WARNING) -> None:
    level = default - 10 * verbosity
    handler: logging.Handler
    if stderr.is_terminal:
        handler = RichHandler(console=stderr, show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=max(logging.DEBUG, level), handlers=[handler], force=True)
    # The DHT library logs every datagram at INFO; keep it for -vv.
    logging.getLogger("kademlia").setLevel(logging.WARNING if verbosity < 2 else logging.DEBUG)
    logging.getLogger("rpcudp").setLevel(logging.WARNING if verbosity < 2 else logging.DEBUG)


def printable(text: str) -> str:
    """``text`` with every non-printable character shown as a Python-style escape.

    Control characters, bidirectional overrides (which reorder what a name
    appears to say), lone surrogates from undecodable file names and
    separators other than the space become ``\\xNN``, ``\\uNNNN`` or
    ``\\UNNNNNNNN``; everything else, accented letters included, is kept.
    """
    if text.isprintable():
        return text
    shown = []
    for char in text:
        if char.isprintable():
            shown.append(char)
            continue
        code = ord(char)
        if code < 0x100:
            shown.append(f"\\x{code:02x}")
        elif code < 0x10000:
            shown.append(f"\\u{code:04x}")
        else:
            shown.append(f"\\U{code:08x}")
    return "".join(shown)


def print_json(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def print_line(text: str) -> None:
    sys.stdout.write(printable(text) + "\n")
    sys.stdout.flush()


def error(message: str) -> None:
    stderr.print(f"dhtfs: error: {printable(message)}", markup=False)


def rate(size: float, seconds: float) -> str:
    """Bytes per second in the units sizes are shown in (MiB/s, not MB/s)."""
    return f"{format_size(size / seconds)}/s" if seconds > 0 else "-"


class _Rate(ProgressColumn):
    """rich's TransferSpeedColumn in binary units, as every size dhtfs prints."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else rate(speed, 1.0), style="progress.data.speed")


@contextmanager
def progress_bar(label: str, *, enabled: bool, unit: str = "bytes") -> Iterator[results.OnEvent]:
    """A progress bar on stderr fed by progress events (off when not a terminal).

    ``unit`` "bytes" shows size, rate and ETA; "chunks" shows a count.
    """
    show = enabled and stderr.is_terminal
    columns = (
        (DownloadColumn(binary_units=True), _Rate(), TimeRemainingColumn())
        if unit == "bytes"
        else (TextColumn("{task.completed} chunks"), TimeElapsedColumn())
    )
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        *columns,
        console=stderr,
        disable=not show,
        transient=False,
    )
    task = progress.add_task(escape_markup(printable(label)), total=None)

    def on_event(event: results.Event) -> None:
        if isinstance(event, results.Progress):
            progress.update(task, completed=event.done, total=event.total or None)
        elif isinstance(event, results.FileFound):
            # The progress columns read markup: "[" in a name is text too.
            description = escape_markup(printable(f"{label} {event.name}".strip()))
            progress.update(task, description=description, total=event.size or None)

    with progress:
        yield on_event


def entry_json(entry: DirEntry) -> dict[str, Any]:
    """One directory entry as ``ls --json`` shows it (names as they are: JSON escapes)."""
    return {
        "name": entry.name,
        "kind": entry.kind.value,
        "size": entry.size,
        "mode": f"{entry.mode:04o}",
        "mtime_ns": entry.mtime_ns,
        "target": entry.target,
        "inline": entry.inline is not None,
        "reference": None if entry.reference is None else str(entry.reference),
    }


_KIND_LETTER = {EntryKind.FILE: "-", EntryKind.DIRECTORY: "d", EntryKind.SYMLINK: "l"}


def entry_line(entry: DirEntry, *, long: bool) -> str:
    """One ``ls`` line: the name, or with ``long`` kind, mode, size and mtime too.

    The caller prints it with ``print_line``, which escapes what a publisher
    chose (names, link targets).
    """
    if not long:
        return entry.name
    mode = stat.filemode(entry.mode)[1:]
    when = datetime.fromtimestamp(entry.mtime_ns / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M")
    name = entry.name if entry.target is None else f"{entry.name} -> {entry.target}"
    return f"{_KIND_LETTER[entry.kind]}{mode} {entry.size:>12} {when} {name}"


SHOWN = 20
"""Chunks (and errors) a human-readable check or repair lists of each kind."""


def print_health(op: str, report: results.HealthReport, root: str) -> None:
    """What ``check`` or ``repair`` found, for a person: a summary line, the first
    chunks of each kind with how many more, why copies could not be added, and
    what to do next."""
    state = "OK" if report.ok else "DEGRADED"
    kind = "proven" if report.verified else "claimed (HAVE; --verify proves them)"
    print_line(
        f"{state}: {report.healthy}/{report.chunks} chunks have "
        f">= {report.replicas_wanted} live copies (fewest: {report.min_copies}); "
        f"holders {kind}" + (f"; {report.copies_added} copies added" if op == "repair" else "")
    )
    if report.failed_proofs:
        print_line(
            f"  {report.failed_proofs} claimed copies failed their proof, "
            f"on {len(report.failed_holders)} node(s)"
        )
    for item in report.under_replicated[:SHOWN]:
        print_line(f"  under-replicated {item.chunk.hex()} ({item.copies} copies)")
    if report.under_replicated_count > SHOWN:
        more = report.under_replicated_count - SHOWN
        print_line(f"  ... and {more} more under-replicated (--json lists them)")
    for item in report.lost[:SHOWN]:
        print_line(f"  LOST {item.chunk.hex()} (no live copy)")
    if report.lost_count > SHOWN:
        print_line(f"  ... and {report.lost_count - SHOWN} more lost (--json lists them)")
    for error in report.errors[:SHOWN]:
        print_line(f"  could not add a copy: {printable(error)}")
    if len(report.errors) > SHOWN:
        print_line(f"  ... and {len(report.errors) - SHOWN} more errors (--json lists them)")
    if report.ok:
        return
    if report.lost_count and report.lost_count == report.chunks - report.healthy:
        print_line(
            "  no live node has the lost chunks: restart the nodes that held them "
            "(repair cannot make copies from nothing)"
        )
    elif op == "check":
        print_line(f"  run 'dhtfs repair {printable(root)}' to add the missing copies")
    else:
        print_line("  too few nodes could take a copy: add nodes or free space, then repair again")


def duration(seconds: float) -> str:
    """'30 days', '4 h', '90 s': a lease or an interval, roughly."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def timestamp(when: float) -> str:
    return datetime.fromtimestamp(when, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def pin_label(pin: Pin) -> str:
    """A pin's name as a person reads it (a root hash alone has none)."""
    name = printable(pin.name) if pin.name else "(no name: pinned by root hash)"
    return f"{name} [{pin.root}]"


def print_pin_renewal(pin: Pin) -> None:
    """What the renewal of a freshly pinned root found, on stderr."""
    size = "" if pin.stored_bytes is None else f", {format_size(pin.stored_bytes)} stored"
    stderr.print(
        f"pinned {pin_label(pin)}: {pin.leased}/{pin.chunks} chunks leased{size}, "
        f"fewest holders {pin.min_holders}",
        markup=False,
    )
    if pin.unleased:
        stderr.print(
            f"dhtfs: warning: {pin.unleased} chunk(s) are held by no node that answered; "
            "the pin renews them if they come back (dhtfs check ROOT)",
            markup=False,
        )


def print_pins(listed: PinList) -> None:
    """``dhtfs pins``: one line per pin (newest first), its reference below it."""
    print_line(
        f"{len(listed.pins)} pin(s); leases of {duration(listed.lease_ttl)}, renewed every "
        f"{duration(listed.renewal_interval)}"
    )
    for pin in listed.pins:
        size = "?" if pin.size is None else format_size(pin.size)
        renewed = "never" if pin.renewed_at is None else timestamp(pin.renewed_at)
        if pin.chunks is not None:
            renewed += (
                f": {pin.leased}/{pin.chunks} chunks leased, fewest holders {pin.min_holders}"
            )
        state = ""
        if pin.error:
            state = f"  LAST RENEWAL FAILED: {printable(pin.error)}"
        elif pin.unleased:
            state = f"  {pin.unleased} chunk(s) held by no node"
        print_line(
            f"{pin.origin:<9} {timestamp(pin.pinned_at)}  {pin.kind or '?':<9} {size:>10}  "
            f"{printable(pin.name) if pin.name else '(root hash only)'}"
        )
        print_line(f"          renewed {renewed}{state}")
        print_line(f"          {pin.reference or pin.root}")
