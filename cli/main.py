"""The ``dhtfs`` command: parses, calls the library, prints.

No logic of its own beyond translating: options become a ``Config`` and a
typed request, run in a session (the local node, or a short-lived client);
library errors become one line on stderr and the exit code of the one table
in ``exits`` (1 error, 2 usage, 3 check found missing copies, 4 lost chunks,
130 interrupted).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from dht_dfs import __version__
from dht_dfs.core.config import DEFAULT_PORT, Config, default_data_dir, format_size, parse_size
from dht_dfs.core.direntry import EntryKind
from dht_dfs.core.errors import DhtfsError, InputError
from dht_dfs.core.refs import ReadReference, parse_read_reference, parse_root_hash
from dht_dfs.dht.values import parse_address
from dht_dfs.node.node import Node
from dht_dfs.node.operations import (
    CheckRequest,
    FetchRequest,
    PinRequest,
    PinsRequest,
    PublishRequest,
    RepairRequest,
    StatusRequest,
    UnpinRequest,
    check_published_name,
    load_convergence_secret,
    parse_pin_target,
)
from dht_dfs.node.pins import Pin, PinList, Unpinned
from dht_dfs.node.results import (
    FetchSummary,
    HealthReport,
    NodeStatus,
    PublishSummary,
    ThrottledProgress,
)
from dht_dfs.node.session import open_network, open_session
from dht_dfs.transfer.browse import split_path

from . import devnet as devnet_module
from . import exits, output, streams

T = TypeVar("T")

app = typer.Typer(
    name="dhtfs",
    help="A peer-to-peer file store: encrypted chunks, located through a Kademlia DHT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _addresses(values: list[str] | None) -> list[str] | None:
    """``--bootstrap`` values, each checked as HOST:PORT before anything starts."""
    for value in values or []:
        try:
            parse_address(value)
        except ValueError as error:
            fail(InputError(f"--bootstrap {value!r}: {error}; give HOST:PORT, e.g. 127.0.0.1:4000"))
    return values


def _port(value: int) -> int:
    if not 0 <= value <= 65535:
        fail(InputError(f"--port {value}: a port is between 0 and 65535"))
    return value


def _optional_port(value: int | None) -> int | None:
    return None if value is None else _port(value)


def _show_version(value: bool) -> None:
    if value:
        output.print_line(__version__)
        raise typer.Exit(0)


DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        "-d",
        help="Node data dir: use the node running there [default: $DHTFS_DATA_DIR or ~/.dhtfs].",
        metavar="DIR",
        show_default=False,
    ),
]
Bootstrap = Annotated[
    list[str] | None,
    typer.Option(
        "--bootstrap",
        "-b",
        help="HOST:PORT of a node; without a local node, join briefly through it as a client.",
        metavar="HOST:PORT",
        show_default=False,
        callback=_addresses,
    ),
]
JoinThrough = Annotated[
    list[str] | None,
    typer.Option(
        "--bootstrap",
        "-b",
        help="HOST:PORT of a node already in the network (repeatable). Without it, the "
        "node rejoins through the contacts it saved, or starts a new network.",
        metavar="HOST:PORT",
        show_default=False,
        callback=_addresses,
    ),
]
NodeDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        "-d",
        help="This node's data dir [default: $DHTFS_DATA_DIR or ~/.dhtfs].",
        metavar="DIR",
        show_default=False,
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging.")]
Replicas = Annotated[int | None, typer.Option("--replicas", help="Copies of each chunk [3].")]
LeaseTtl = Annotated[
    float | None,
    typer.Option(
        "--lease-ttl",
        help="Seconds a lease on what this node publishes or pins lasts; renewed every "
        "third of it, and a chunk whose leases all ran out goes a third of it later "
        "[2592000: 30 days].",
        metavar="SECONDS",
        show_default=False,
    ),
]


def run(
    coroutine_factory: Callable[[], Coroutine[Any, Any, T]], *, interrupted: str = "interrupted"
) -> T:
    """Run a coroutine; map every failure to one line and an exit code.

    ``interrupted``: the line Ctrl-C leaves (a fetch says how to resume).
    """
    try:
        return asyncio.run(coroutine_factory())
    except KeyboardInterrupt:
        output.error(interrupted)
        raise typer.Exit(exits.EXIT_INTERRUPTED) from None
    except BaseException as error:
        fail(error)


def checked(parse: Callable[..., T], *args: Any) -> T:
    """Parse or check user input before any network work; failures exit as ``run``'s."""
    try:
        return parse(*args)
    except DhtfsError as error:
        fail(error)


def fail(error: BaseException) -> NoReturn:
    """One line on stderr, and the exit code ``exits.EXIT_CODES`` gives the error."""
    if isinstance(error, typer.Exit | SystemExit):
        raise error
    if isinstance(error, BrokenPipeError):
        # The reader went away (``dhtfs ls | head``): not an error to report.
        # stdout goes to /dev/null so the exit's own flush fails no more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        raise typer.Exit(exits.EXIT_BROKEN_PIPE) from None
    if isinstance(error, KeyboardInterrupt):
        output.error("interrupted")
    elif isinstance(error, DhtfsError):
        output.error(str(error))
    elif isinstance(error, OSError):
        output.error(
            f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
        )
    elif isinstance(error, Exception):  # a bug: still one line; the trace only with -vv
        logging.getLogger("dhtfs").debug("internal error", exc_info=error)
        output.error(f"internal error: {type(error).__name__}: {error} (run with -vv for details)")
    else:
        raise error
    raise typer.Exit(exits.exit_code(error)) from None


def _config(replicas: int | None = None, **changes: Any) -> Config:
    if replicas is not None:
        changes["replicas"] = replicas
    return checked(lambda: Config().replace(**changes).validate())


@app.command()
def join(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[
        int, typer.Option(help="UDP (DHT) and TCP (chunks) port.", callback=_port)
    ] = DEFAULT_PORT,
    bootstrap: JoinThrough = None,
    replicas: Replicas = None,
    max_storage: Annotated[
        str | None, typer.Option("--max-storage", help="Quota for stored chunks, e.g. 20G.")
    ] = None,
    max_guest_storage: Annotated[
        str | None,
        typer.Option(
            "--max-guest-storage",
            help="Bytes kept for chunks this node is not a rightful holder of, e.g. 1G [1G].",
        ),
    ] = None,
    advertise_host: Annotated[
        str | None, typer.Option(help="Address other nodes should use to reach this one.")
    ] = None,
    repair_interval: Annotated[
        float | None,
        typer.Option(help="Seconds between repair passes over stored chunks (0: never) [60]."),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (0: any "
            "free port) [off].",
            callback=_optional_port,
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Address for --metrics-port (127.0.0.1: this machine only).")
    ] = "127.0.0.1",
    lease_ttl: LeaseTtl = None,
    data_dir: NodeDir = None,
    json_output: Json = False,
    verbose: Verbose = 0,
) -> None:
    """Run a node until Ctrl-C, which hands its chunks off first."""
    output.setup_logging(verbose, default=logging.INFO)
    quota = None
    if max_storage is not None:
        quota = checked(parse_size, max_storage)
    changes: dict[str, Any] = {"max_storage": quota}
    if max_guest_storage is not None:
        changes["max_guest_bytes"] = checked(parse_size, max_guest_storage)
    if repair_interval is not None:
        changes["repair_interval"] = repair_interval
    if lease_ttl is not None:
        changes["lease_ttl"] = lease_ttl
    config = _config(replicas, **changes)
    directory = (data_dir or default_data_dir()).expanduser()

    async def serve() -> None:
        node = Node(
            directory,
            config,
            host=host,
            port=port,
            advertise_host=advertise_host,
            bootstrap=bootstrap or [],
            metrics=None if metrics_port is None else (metrics_host, metrics_port),
        )
        await node.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        status = node.status()
        if json_output:
            output.print_line(json.dumps({"event": "ready", **status.to_json()}))
        else:
            output.print_line(f"dhtfs node {status.node_id.hex()} listening on {status.address}")
            if status.metrics_port is not None:
                shown = f"[{metrics_host}]" if ":" in metrics_host else metrics_host
                output.print_line(f"metrics on http://{shown}:{status.metrics_port}/metrics")
        await stop.wait()
        logging.getLogger("dhtfs").info("stopping (handing off chunks first)")
        await node.stop(leave=True)

    run(serve)


@app.command()
def publish(
    file: Annotated[
        Path,
        typer.Argument(
            help="The file or directory to publish; - reads stdin to its end (give --name).",
            metavar="FILE|DIR|-",
            show_default=False,
        ),
    ],
    name: Annotated[str | None, typer.Option(help="Name to record instead of the file's.")] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="A directory: fail on an entry that cannot be published (special, "
            "unreadable or changing file) instead of skipping it with a warning.",
        ),
    ] = False,
    secret_file: Annotated[
        Path | None,
        typer.Option(
            "--secret-file",
            help="Private convergence secret: only publishers sharing this file dedup "
            "against each other, and nobody else can tell whether a known file is stored.",
        ),
    ] = None,
    data_dir: DataDir = None,
    bootstrap: Bootstrap = None,
    replicas: Replicas = None,
    json_output: Json = False,
    verbose: Verbose = 0,
) -> None:
    """Store a file or directory tree; prints its read reference.

    The reference is the last line of stdout.
    """
    output.setup_logging(verbose)
    config = _config(replicas)
    secret = None if secret_file is None else checked(load_convergence_secret, secret_file)
    if str(file) == "-":
        if not name:
            fail(InputError("publish - needs --name: the name a fetch writes the file as"))
        checked(check_published_name, name)
        stream_name: str = name
        stdin = checked(streams.stdin_for_publish)
        with output.progress_bar(f"publish {name}", enabled=not json_output) as on_event:

            async def from_stdin() -> PublishSummary:
                async with open_network(data_dir, bootstrap or [], config) as network:
                    published = await network.publish_stream(
                        stdin, name=stream_name, progress=ThrottledProgress(on_event),
                        convergence_secret=secret,
                    )  # fmt: skip
                summary = PublishSummary.of(published)
                if not bootstrap:
                    # Streamed from this process: the local node pins it, as it
                    # pins what it publishes itself. Stdin is spent, so a pin
                    # that fails must not cost the reference: warn, go on.
                    try:
                        async with open_session(data_dir, [], config) as session:
                            await session.run(
                                PinRequest(summary.root_hash, summary.reference, "published")
                            )
                    except DhtfsError as error:
                        output.stderr.print(
                            f"dhtfs: warning: published, but the node did not pin it ({error}); "
                            "run: dhtfs pin REF",
                            markup=False,
                        )
                return summary

            result = run(from_stdin)
    else:
        request = checked(
            PublishRequest(file, name=name, convergence_secret=secret, strict=strict).check_input
        )
        with output.progress_bar(f"publish {file.name}", enabled=not json_output) as on_event:

            async def go() -> PublishSummary:
                async with open_session(data_dir, bootstrap or [], config) as session:
                    return await session.run(request, on_event)

            result = run(go)
    if json_output:
        output.print_json(result.to_json())
        return
    tree = (
        f"{result.files} files, {result.directories} directories, {result.symlinks} symlinks"
        + (f", {result.skipped} skipped (see warnings)" if result.skipped else "")
        + "; "
        if result.is_tree
        else ""
    )
    output.stderr.print(
        f"published {format_size(result.size)} in {result.seconds:.2f} s "
        f"({tree}{result.data_chunks} chunks"
        + (f", {result.already_held} already stored: not sent" if result.already_held else "")
        + f"); root hash {result.root_hash}",
        markup=False,
    )
    for note in result.skipped_notes:
        output.stderr.print(f"dhtfs: warning: skipped {output.printable(note)}", markup=False)
    if result.under_replicated:
        output.stderr.print(
            f"dhtfs: warning: {result.under_replicated} chunk(s) have fewer copies than "
            "wanted (too few live nodes); nodes add copies when more join",
            markup=False,
        )
    if bootstrap:
        output.stderr.print(
            "dhtfs: note: published as a client, so no node pins it: its chunks stay "
            f"{output.duration(config.lease_ttl)} unless a node pins it (dhtfs pin REF)",
            markup=False,
        )
    output.print_line(str(result.reference))


@app.command()
def fetch(
    target: Annotated[
        str,
        typer.Argument(
            help="Read reference printed by publish, optionally followed by /PATH inside a "
            "directory.",
            metavar="REF[/PATH]",
            show_default=False,
        ),
    ],
    out: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            help="A file: the file to write, or a directory to write it into (DIR/ is made "
            "if missing). A tree: the directory to write it as (made if missing; an existing "
            "one is merged into). - writes a file to stdout. [default: ./NAME]",
            metavar="PATH",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite what is in the way (never a directory).")
    ] = False,
    verify_hash: Annotated[
        bool,
        typer.Option(
            "--verify-hash",
            help="Also recompute the whole file's SHA-256 (every chunk is verified anyway).",
        ),
    ] = False,
    data_dir: DataDir = None,
    bootstrap: Bootstrap = None,
    json_output: Json = False,
    verbose: Verbose = 0,
) -> None:
    """Fetch a file or directory tree, every chunk verified; resumable.

    Run the same command again after an interruption: what is there already
    is verified, and only the rest is fetched.
    """
    output.setup_logging(verbose)
    config = _config()
    reference, steps = _resolve_target(target)
    if out == "-":
        _to_stdout(reference, steps, data_dir, bootstrap, config)
        return
    request = checked(
        FetchRequest(
            reference,
            path=steps,
            output=None if out is None else checked(_output_path, out),
            overwrite=force,
            verify_hash=True if verify_hash else None,
        ).check_input
    )

    with output.progress_bar("fetch", enabled=not json_output) as on_event:

        async def go() -> FetchSummary:
            async with open_session(data_dir, bootstrap or [], config) as session:
                return await session.run(request, on_event)

        result = run(
            go,
            interrupted="interrupted; what was fetched is kept: run the same command "
            "again to resume",
        )
    if json_output:
        output.print_json(result.to_json())
        return
    tree = (
        f"{result.files} files, {result.directories} directories, {result.symlinks} symlinks"
        + (f", {result.files_kept} already there" if result.files_kept else "")
        + "; "
        if result.kind == "directory"
        else ""
    )
    output.stderr.print(
        f"fetched {format_size(result.size)} in {result.seconds:.2f} s "
        f"({tree}{output.rate(result.size, result.seconds)})"
        + (f", {result.chunks_resumed} chunks resumed" if result.chunks_resumed else ""),
        markup=False,
    )
    output.print_line(str(result.path))


def _output_path(text: str) -> Path:
    """``-o`` as a path; a trailing slash says it is a directory, made if missing."""
    path = Path(text)
    if text.endswith("/") or text.endswith(os.sep):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise InputError(f"-o {text}: {path} exists and is not a directory") from None
        except OSError as error:
            raise InputError(f"-o {text}: cannot make {path}: {error.strerror}") from None
    return path


TreePath = Annotated[
    str,
    typer.Argument(
        help="Read reference, optionally followed by /PATH inside a directory.",
        metavar="REF[/PATH]",
        show_default=False,
    ),
]


def _resolve_target(target: str) -> tuple[ReadReference, tuple[str, ...]]:
    text, steps = checked(split_path, target)
    return checked(parse_read_reference, text), steps


def _to_stdout(
    reference: ReadReference,
    steps: tuple[str, ...],
    data_dir: Path | None,
    bootstrap: list[str] | None,
    config: Config,
) -> None:
    """``cat`` and ``fetch -o -``: a file's bytes to stdout, as a client."""
    where = "/".join(steps) or str(reference)

    async def go() -> None:
        async with open_network(data_dir, bootstrap or [], config) as network:
            entry = (await network.resolve(reference, steps)).entry
            streams.check_streamable(entry, where)
            await streams.write_to_stdout(network, entry)

    run(go)


@app.command(name="ls")
def list_command(
    target: TreePath,
    long: Annotated[bool, typer.Option("-l", help="Kind, mode, size and mtime too.")] = False,
    data_dir: DataDir = None,
    bootstrap: Bootstrap = None,
    json_output: Json = False,
    verbose: Verbose = 0,
) -> None:
    """List a tree's directory (or a file's entry); no file chunk read.

    A missing path is bad input (exit 2), as a missing file to publish is.
    """
    output.setup_logging(verbose)
    config = _config()
    reference, steps = _resolve_target(target)

    async def go() -> None:
        async with open_network(data_dir, bootstrap or [], config) as network:
            entry = (await network.resolve(reference, steps)).entry
            if entry.kind is not EntryKind.DIRECTORY:
                if json_output:
                    output.print_json({"path": "/".join(steps), "entries": [
                        output.entry_json(entry)
                    ]})  # fmt: skip
                else:
                    output.print_line(output.entry_line(entry, long=long))
                return
            # JSON is one document: gathered first. Text streams as nodes arrive.
            gathered: list[dict[str, Any]] = []
            async for item in network.list_directory(entry):
                if json_output:
                    gathered.append(output.entry_json(item))
                else:
                    output.print_line(output.entry_line(item, long=long))
            if json_output:
                output.print_json({"path": "/".join(steps), "entries": gathered})

    run(go)


@app.command()
def cat(
    target: TreePath,
    data_dir: DataDir = None,
    bootstrap: Bootstrap = None,
    verbose: Verbose = 0,
) -> None:
    """Write a file to stdout, every chunk verified, in bounded memory."""
    output.setup_logging(verbose)
    config = _config()
    reference, steps = _resolve_target(target)
    _to_stdout(reference, steps, data_dir, bootstrap, config)


def _survey(
    op: str,
    root: str,
    *,
    data_dir: Path | None,
    bootstrap: list[str] | None,
    replicas: int | None,
    verify: bool,
    json_output: bool,
    verbose: int,
) -> None:
    output.setup_logging(verbose)
    root_hash = checked(parse_root_hash, root)
    config = _config(replicas)
    request = CheckRequest(root_hash, verify) if op == "check" else RepairRequest(root_hash, verify)

    with output.progress_bar(op, enabled=not json_output, unit="chunks") as on_event:

        async def go() -> HealthReport:
            async with open_session(data_dir, bootstrap or [], config) as session:
                return await session.run(request, on_event)

        report = run(go)
    if json_output:
        output.print_json(report.to_json())
    else:
        output.print_health(op, report, root)
    code = exits.health_exit_code(report)
    if code != exits.EXIT_OK:
        raise typer.Exit(code)


Verify = Annotated[
    bool,
    typer.Option(
        "--verify",
        help="Fetch one copy of each chunk and make every other holder prove its copy "
        "(a fresh challenge): only proven copies count, and repair replaces the rest.",
    ),
]

RootArgument = Annotated[
    str,
    typer.Argument(
        help="Root hash (dhtfs:v1:...) or read reference.", metavar="ROOT", show_default=False
    ),
]


def _survey_command(op: str, summary: str) -> None:
    """Register check or repair: the same options, a different operation."""

    def command(
        root: RootArgument,
        data_dir: DataDir = None,
        bootstrap: Bootstrap = None,
        replicas: Replicas = None,
        verify: Verify = False,
        json_output: Json = False,
        verbose: Verbose = 0,
    ) -> None:
        _survey(
            op,
            root,
            data_dir=data_dir,
            bootstrap=bootstrap,
            replicas=replicas,
            verify=verify,
            json_output=json_output,
            verbose=verbose,
        )

    command.__doc__ = summary
    app.command(name=op)(command)


_survey_command(
    "check",
    "Count live copies of every chunk; exit 3 if any has too few.\n\n"
    "Exit 4 if a chunk has no live copy at all.",
)
_survey_command(
    "repair",
    "Add copies until each chunk has enough; exit 3 if it cannot.\n\n"
    "Exit 4 if a chunk has no live copy at all.",
)


PinTarget = Annotated[
    str,
    typer.Argument(
        help="Read reference (dhtfs:r1:..., records the name) or root hash (dhtfs:v1:...).",
        metavar="REF",
        show_default=False,
    ),
]


@app.command()
def pin(
    target: PinTarget,
    data_dir: DataDir = None,
    json_output: Json = False,
    verbose: Verbose = 0,
) -> None:
    """Keep a file or tree stored: this node renews its leases."""
    output.setup_logging(verbose)
    root, reference = checked(parse_pin_target, target)

    async def go() -> Pin:
        async with open_session(data_dir, [], Config()) as session:
            return await session.run(PinRequest(root, reference))

    kept = run(go)
    if json_output:
        output.print_json(kept.to_json())
        return
    output.print_pin_renewal(kept)
    output.print_line(str(kept.reference or kept.root))


@app.command()
def unpin(
    target: PinTarget,
    data_dir: DataDir = None,
    json_output: Json = False,
    verbose: Verbose = 0,
) -> None:
    """Stop keeping a file or tree; it goes when its leases end."""
    output.setup_logging(verbose)
    root, _ = checked(parse_pin_target, target)

    async def go() -> Unpinned:
        async with open_session(data_dir, [], Config()) as session:
            return await session.run(UnpinRequest(root))

    done = run(go)
    if json_output:
        output.print_json(done.to_json())
        return
    output.stderr.print(
        f"unpinned {output.pin_label(done.pin)}; unless pinned elsewhere, its chunks go "
        f"after {output.timestamp(done.expires_by)} (plus the holders' grace period)",
        markup=False,
    )
    output.print_line(str(done.pin.root))


@app.command()
def pins(
    data_dir: DataDir = None,
    json_output: Json = False,
    verbose: Verbose = 0,
) -> None:
    """List what this node published and keeps alive."""
    output.setup_logging(verbose)

    async def go() -> PinList:
        async with open_session(data_dir, [], Config()) as session:
            return await session.run(PinsRequest())

    listed = run(go)
    if json_output:
        output.print_json(listed.to_json())
        return
    output.print_pins(listed)


@app.command()
def mount(
    target: Annotated[
        str,
        typer.Argument(
            help="Read reference, optionally followed by /PATH inside a tree.",
            metavar="REF[/PATH]",
            show_default=False,
        ),
    ],
    mountpoint: Annotated[
        Path, typer.Argument(help="An empty directory.", metavar="MOUNTPOINT", show_default=False)
    ],
    cache_size: Annotated[
        str,
        typer.Option(
            "--cache-size",
            help="Chunks kept on disk across mounts (DATA_DIR/mount-cache), least recently "
            "used out; 0: none.",
        ),
    ] = "1G",
    read_timeout: Annotated[
        float, typer.Option(help="Seconds a read waits for a chunk before it fails (EIO).")
    ] = 30.0,
    data_dir: DataDir = None,
    bootstrap: Bootstrap = None,
    json_output: Json = False,
    verbose: Verbose = 0,
) -> None:
    """Mount a file or tree read-only until Ctrl-C; lazy reads."""
    output.setup_logging(verbose)
    reference, steps = checked(_resolve_target, target)
    cache_bytes = checked(parse_size, cache_size)
    if not math.isfinite(read_timeout) or read_timeout <= 0:
        fail(InputError("--read-timeout must be a positive number of seconds"))
    try:
        from dht_dfs.fs import mount as fs_mount  # noqa: PLC0415  # pyfuse3: only here
    except ImportError:  # pragma: no cover - depends on the machine
        fail(
            InputError(
                "mount needs pyfuse3: pip install 'dhtfs[mount]' (Debian: fuse3 libfuse3-dev)"
            )
        )
    directory = (data_dir or default_data_dir()).expanduser()
    options = fs_mount.MountOptions(
        cache_dir=directory / "mount-cache" if cache_bytes else None,
        cache_bytes=cache_bytes,
        read_timeout=read_timeout,
    )
    checked(fs_mount.check_mountpoint, mountpoint)
    config = _config()

    def ready(path: Path) -> None:
        if json_output:
            output.print_line(json.dumps({"event": "mounted", "mountpoint": str(path)}))
        else:
            output.print_line(f"mounted on {path}; Ctrl-C or 'dhtfs umount {path}' unmounts")

    async def go() -> fs_mount.MountStats:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with open_network(data_dir, bootstrap or [], config) as network:
            return await fs_mount.serve_mount(
                network, reference, mountpoint, options, stop, path=steps, on_ready=ready
            )

    stats = run(go)
    if json_output:
        output.print_line(json.dumps({"event": "unmounted", **stats.to_json()}))
    else:
        output.stderr.print(
            f"unmounted: {stats.reads} reads, {format_size(stats.bytes_read)}; "
            f"{stats.chunks_fetched} chunks fetched, {stats.chunks_from_cache} from the cache"
            + (f", {stats.chunks_unavailable} unavailable" if stats.chunks_unavailable else ""),
            markup=False,
        )


@app.command()
def umount(
    mountpoint: Annotated[
        Path, typer.Argument(help="Where dhtfs mount mounted.", metavar="MOUNTPOINT")
    ],
    verbose: Verbose = 0,
) -> None:
    """Unmount what dhtfs mount mounted (as fusermount3 -u)."""
    output.setup_logging(verbose)
    from dht_dfs.fs.mount import unmount  # noqa: PLC0415

    checked(unmount, mountpoint.expanduser().absolute())


@app.command()
def gateway(
    host: Annotated[
        str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="TCP port for HTTP (0: any free one).", callback=_port)
    ] = 8080,
    data_dir: DataDir = None,
    bootstrap: Bootstrap = None,
    verbose: Verbose = 0,
) -> None:
    """Serve the network read-only over HTTP at /REFERENCE[/PATH].

    Runs until Ctrl-C; ranges, HEAD and ETags; prints its URL on stdout.
    """
    from dht_dfs.gateway import http  # noqa: PLC0415  # aiohttp: 0.2 s to import, paid by gateway alone

    output.setup_logging(verbose)
    config = _config()

    async def go() -> None:
        async with open_network(data_dir, bootstrap or [], config) as network:
            runner = await http.serve(network, host, port)
            try:
                loop = asyncio.get_running_loop()
                stop = asyncio.Event()
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(signum, stop.set)
                shown = f"[{host}]" if ":" in host else host
                output.print_line(f"http://{shown}:{http.bound_port(runner)}/")
                await stop.wait()
            finally:
                await runner.cleanup()

    run(go)


@app.command()
def status(
    data_dir: DataDir = None,
    json_output: Json = False,
    verbose: Verbose = 0,
) -> None:
    """Show the local node: id, address, peers, chunks and bytes stored."""
    output.setup_logging(verbose)

    async def go() -> NodeStatus:
        async with open_session(data_dir, [], Config()) as session:
            return await session.run(StatusRequest())

    result = run(go)
    if json_output:
        output.print_json(result.to_json())
        return
    quota = format_size(result.quota) if result.quota is not None else "no quota"
    output.print_line(f"node      {result.node_id.hex()}")
    output.print_line(
        f"address   {result.address}  (dhtfs {result.version}, pid "
        f"{result.pid}, up {result.uptime_s:.0f} s)"
    )
    output.print_line(f"data dir  {result.data_dir}")
    output.print_line(f"peers     {result.peers_known} known, {result.peers_connected} connected")
    used = (
        f"{format_size(result.bytes_stored)} of {quota} ({result.bytes_stored / result.quota:.0%})"
        if result.quota
        else f"{format_size(result.bytes_stored)} (no quota)"
    )
    output.print_line(f"stored    {result.chunks} chunks, {used}")
    output.print_line(
        f"disk      {format_size(result.disk_free)} free"
        + (
            "; FULL: new chunks are refused (raise --max-storage or free disk)"
            if result.full
            else ""
        )
    )
    if result.metrics_port is not None:
        output.print_line(f"metrics   port {result.metrics_port}")


@app.command()
def devnet(
    nodes: Annotated[int, typer.Option(help="How many nodes.")] = 5,
    port: Annotated[
        int, typer.Option(help="First port; nodes use PORT..PORT+N-1.", callback=_port)
    ] = DEFAULT_PORT,
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Data dirs go to DIR/node-0... [default: temp]")
    ] = None,
    replicas: Replicas = None,
    max_storage: Annotated[str | None, typer.Option("--max-storage")] = None,
    lease_ttl: LeaseTtl = None,
    verbose: Verbose = 0,
) -> None:
    """Run a whole network of NODES nodes on 127.0.0.1 until Ctrl-C."""
    output.setup_logging(verbose, default=logging.INFO)
    if nodes < 1:
        fail(InputError("a devnet needs at least one node"))
    if lease_ttl is not None:
        _config(lease_ttl=lease_ttl)  # a bad TTL fails here, not in every node
    run(
        lambda: devnet_module.run_devnet(
            nodes, port, directory, replicas, max_storage, lease_ttl=lease_ttl
        )
    )


@app.command()
def demo(
    nodes: Annotated[int, typer.Option(help="Nodes in the demo network.")] = 5,
    size: Annotated[str, typer.Option(help="Size of the sample file.")] = "64M",
    keep: Annotated[bool, typer.Option(help="Keep the demo's data dir.")] = False,
    port: Annotated[
        int | None,
        typer.Option(
            help="First port; nodes use PORT..PORT+N-1 [default: free ports].",
            callback=_optional_port,
        ),
    ] = None,
    verbose: Verbose = 0,
) -> None:
    """Run a local network, publish a sample file, fetch it elsewhere."""
    output.setup_logging(verbose)
    size_bytes = checked(parse_size, size)
    result = run(lambda: devnet_module.run_demo(nodes, size_bytes, keep=keep, port=port))
    if not result:
        raise typer.Exit(exits.EXIT_ERROR)


@app.command()
def version() -> None:
    """Print the dhtfs version."""
    output.print_line(__version__)


@app.callback()
def _options(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the dhtfs version and exit.",
            callback=_show_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """A peer-to-peer file store: encrypted chunks, located through a Kademlia DHT."""


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        output.error("interrupted")
        sys.exit(exits.EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
