"""Typed operations: what a CLI command asks of the network, and what it gets back.

Each request and result is a frozen dataclass with ``to_json``/``from_json``;
the JSON documents are the ones ``dhtfs ... --json`` prints, and the lines
the control socket carries. ``run_operation`` runs one request against any
``Network``: a node's own, or a short-lived client's, so both produce the
very same documents.

A request checks its user input (``check_input``) before any network work,
so a missing file fails at once, not after joining the network.

Must not import: node.py, control.py, session.py, the CLI.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Self

from dht_dfs.core.crypto import secret_from_file_content
from dht_dfs.core.direntry import name_problem
from dht_dfs.core.errors import ControlError, InputError
from dht_dfs.core.refs import (
    READ_PREFIX,
    ReadReference,
    RootHash,
    parse_read_reference,
    parse_root_hash,
)
from dht_dfs.node.pins import Pin, PinList, Unpinned
from dht_dfs.node.results import (
    Document,
    Event,
    FetchSummary,
    FileFound,
    HealthReport,
    NodeStatus,
    OnEvent,
    PublishSummary,
    ThrottledProgress,
)
from dht_dfs.transfer.network import Network

# --- requests ----------------------------------------------------------------------


def check_published_name(name: str) -> None:
    """Refuse a ``--name`` no directory could hold ("a/b", "..", a NUL, too long)."""
    problem = name_problem(name.encode("utf-8", "surrogateescape"))
    if problem is not None:
        raise InputError(f"--name {name!r} {problem}: give a plain file name")


def _absolute(path: Path) -> Path:
    # A node runs in a directory of its own: it must get paths that do not
    # depend on the caller's working directory.
    return path.expanduser().resolve()


def load_convergence_secret(path: Path) -> bytes:
    """The private convergence secret a file holds (``publish --secret-file``)."""
    try:
        return secret_from_file_content(path.expanduser().read_bytes())
    except (OSError, ValueError) as error:
        raise InputError(f"cannot use secret file {path}: {error}") from None


@dataclass(frozen=True, slots=True)
class PublishRequest:
    """Encrypt and store one file."""

    op: ClassVar[str] = "publish"
    path: Path
    name: str | None = None
    """Name to record instead of the file's."""
    convergence_secret: bytes | None = None
    """A private convergence secret instead of the network-wide one."""
    strict: bool = False
    """A tree: fail on an entry that cannot be published, instead of skipping it."""

    def check_input(self) -> PublishRequest:
        """The request with an absolute path, once the file or directory is known readable.

        Raises ``InputError`` for a missing, unreadable or special file.
        """
        if self.name is not None:
            check_published_name(self.name)
        path = _absolute(self.path)
        if path.is_dir():
            if not os.access(path, os.R_OK | os.X_OK):
                raise InputError(f"cannot read directory {self.path}: permission denied")
            return replace(self, path=path)
        try:
            # Non-blocking: opening a fifo to read would wait for a writer.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as error:
            raise InputError(f"cannot read {self.path}: {error.strerror or error}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InputError(f"{self.path} is not a regular file")
        finally:
            os.close(fd)
        return replace(self, path=path)

    def to_json(self) -> Document:
        secret = self.convergence_secret
        return {
            "op": self.op,
            "path": str(self.path),
            "name": self.name,
            "convergence_secret": secret.hex() if secret is not None else None,
            "strict": self.strict,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> PublishRequest:
        name, secret = document.get("name"), document.get("convergence_secret")
        return cls(
            path=Path(_text(document, "path")),
            name=None if name is None else str(name),
            convergence_secret=None if not secret else bytes.fromhex(str(secret)),
            strict=_flag(document, "strict"),
        )

    @staticmethod
    def result_from_json(document: Mapping[str, Any]) -> PublishSummary:
        return PublishSummary.from_json(document)


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """Fetch, verify and decrypt a file, or a directory tree, or one path inside a tree."""

    op: ClassVar[str] = "fetch"
    reference: ReadReference
    path: tuple[str, ...] = ()
    """Steps below the reference (a directory's root) to what is fetched."""
    output: Path | None = None
    """A file, or a directory: for a file, the one to write the published name into; for a
    tree, the one to write (or merge) it into. None: the name in ``directory``."""
    directory: Path | None = None
    """Where the published name goes without ``output``: the caller's working directory."""
    overwrite: bool = False
    verify_hash: bool | None = None
    """Also recompute the whole file's SHA-256 [the config's ``verify_file_hash``]."""

    def check_input(self) -> FetchRequest:
        """The request with absolute paths, once the output is known to be writable.

        Raises ``InputError`` when the output's directory is missing or not
        writable, or the output is an existing file and ``overwrite`` is off.
        What the reference names (file or tree, and its name) is known only
        once its root is fetched; the fetch itself refuses what is in the way.
        """
        if self.output is None:
            given = Path.cwd() if self.directory is None else self.directory
            output = None
            directory = _absolute(given)
        else:
            given = self.output
            output = _absolute(given)
            directory = output if output.is_dir() else output.parent
        if not directory.is_dir():
            raise InputError(f"cannot write {given}: directory {directory} does not exist")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise InputError(f"cannot write {given}: directory {directory} is not writable")
        if output is not None and not output.is_dir() and output.exists() and not self.overwrite:
            raise InputError(
                f"{output} already exists; fetch to another path or overwrite it (--force)"
            )
        return replace(self, output=output, directory=directory)

    def to_json(self) -> Document:
        return {
            "op": self.op,
            "reference": str(self.reference),
            "path": list(self.path),
            "output": None if self.output is None else str(self.output),
            "directory": None if self.directory is None else str(self.directory),
            "overwrite": self.overwrite,
            "verify_hash": self.verify_hash,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> FetchRequest:
        output, verify = document.get("output"), document.get("verify_hash")
        directory = document.get("directory")
        steps = document.get("path", [])
        if not isinstance(steps, list) or not all(isinstance(step, str) for step in steps):
            raise TypeError("path must be a list of names")
        return cls(
            reference=parse_read_reference(_text(document, "reference")),
            path=tuple(steps),
            output=Path(str(output)) if output else None,
            directory=Path(str(directory)) if directory else None,
            overwrite=bool(document.get("overwrite", False)),
            verify_hash=None if verify is None else bool(verify),
        )

    @staticmethod
    def result_from_json(document: Mapping[str, Any]) -> FetchSummary:
        return FetchSummary.from_json(document)


@dataclass(frozen=True, slots=True)
class _SurveyRequest:
    """What check and repair share: a file's root hash, and whether to demand proofs."""

    op: ClassVar[str]
    root: RootHash
    verify: bool = False
    """Count only holders that prove their copy (a fresh challenge), not those that say HAVE."""

    def check_input(self) -> Self:
        return self

    def to_json(self) -> Document:
        return {"op": self.op, "root": str(self.root), "verify": self.verify}

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Self:
        return cls(parse_root_hash(_text(document, "root")), _flag(document, "verify"))

    @staticmethod
    def result_from_json(document: Mapping[str, Any]) -> HealthReport:
        return HealthReport.from_json(document)


@dataclass(frozen=True, slots=True)
class CheckRequest(_SurveyRequest):
    """Count live copies of every chunk of a file (the root hash is enough)."""

    op: ClassVar[str] = "check"


@dataclass(frozen=True, slots=True)
class RepairRequest(_SurveyRequest):
    """Copy every chunk of a file until it has enough live copies.

    With ``verify``, holders that fail their proof are replaced too.
    """

    op: ClassVar[str] = "repair"


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """The running node's status (only a node answers it, not a client)."""

    op: ClassVar[str] = "status"

    def check_input(self) -> StatusRequest:
        return self

    def to_json(self) -> Document:
        return {"op": self.op}

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> StatusRequest:
        return cls()

    @staticmethod
    def result_from_json(document: Mapping[str, Any]) -> NodeStatus:
        return NodeStatus.from_json(document)


def parse_pin_target(text: str) -> tuple[RootHash, ReadReference | None]:
    """A read reference (root and key) or a root hash (root alone) to pin."""
    root = parse_root_hash(text)
    if "".join(text.split()).lower().startswith(READ_PREFIX):
        return root, parse_read_reference(text)
    return root, None


@dataclass(frozen=True, slots=True)
class PinRequest:
    """Keep a file's or tree's chunks alive: this node renews their leases from now on.

    Only a node answers it (a short-lived client cannot renew anything).
    """

    op: ClassVar[str] = "pin"
    root: RootHash
    reference: ReadReference | None = None
    """Given, the pin records the name, kind and size (it can read them)."""
    origin: str = "pinned"
    """"published" when a publish through this node asks (``publish -``)."""

    def check_input(self) -> PinRequest:
        if self.origin not in ("pinned", "published"):
            raise InputError(f"a pin's origin is 'pinned' or 'published', not {self.origin!r}")
        return self

    def to_json(self) -> Document:
        target = self.reference if self.reference is not None else self.root
        return {"op": self.op, "target": str(target), "origin": self.origin}

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> PinRequest:
        root, reference = parse_pin_target(_text(document, "target"))
        return cls(root, reference, str(document.get("origin", "pinned")))

    @staticmethod
    def result_from_json(document: Mapping[str, Any]) -> Pin:
        return Pin.from_json(document)


@dataclass(frozen=True, slots=True)
class UnpinRequest:
    """Stop renewing a root's leases; its chunks go once the leases run out."""

    op: ClassVar[str] = "unpin"
    root: RootHash

    def check_input(self) -> UnpinRequest:
        return self

    def to_json(self) -> Document:
        return {"op": self.op, "root": str(self.root)}

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> UnpinRequest:
        return cls(parse_root_hash(_text(document, "root")))

    @staticmethod
    def result_from_json(document: Mapping[str, Any]) -> Unpinned:
        return Unpinned.from_json(document)


@dataclass(frozen=True, slots=True)
class PinsRequest:
    """Every pin of the node: what it published and what it keeps alive."""

    op: ClassVar[str] = "pins"

    def check_input(self) -> PinsRequest:
        return self

    def to_json(self) -> Document:
        return {"op": self.op}

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> PinsRequest:
        return cls()

    @staticmethod
    def result_from_json(document: Mapping[str, Any]) -> PinList:
        return PinList.from_json(document)


NetworkRequest = PublishRequest | FetchRequest | CheckRequest | RepairRequest
NodeRequest = StatusRequest | PinRequest | UnpinRequest | PinsRequest
"""Requests only a running node answers: they read or change its own state."""
Request = NetworkRequest | NodeRequest

_REQUESTS: dict[str, type[Request]] = {
    kind.op: kind
    for kind in (
        PublishRequest,
        FetchRequest,
        CheckRequest,
        RepairRequest,
        StatusRequest,
        PinRequest,
        UnpinRequest,
        PinsRequest,
    )
}


def _text(document: Mapping[str, Any], key: str) -> str:
    value = document[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string")
    return value


def _flag(document: Mapping[str, Any], key: str) -> bool:
    """An optional boolean (absent: false, so older callers keep working)."""
    value = document.get(key, False)
    if not isinstance(value, bool):
        raise TypeError(f"{key} must be true or false")
    return value


def request_from_json(document: Any) -> Request:
    """Decode a control request.

    Raises ``ControlError("bad request: ...")`` for a malformed one, and the
    library's own error for a value that does not parse (a reference, say).
    """
    if not isinstance(document, dict):
        raise ControlError("bad request: a control request is a JSON object")
    op = document.get("op")
    kind = _REQUESTS.get(op) if isinstance(op, str) else None
    if kind is None:
        raise ControlError(f"unknown operation {op!r}")
    try:
        return kind.from_json(document)
    except KeyError as error:
        raise ControlError(f"bad request: {op} needs {error}") from None
    except (TypeError, ValueError) as error:
        raise ControlError(f"bad request: {error}") from None


# --- running -----------------------------------------------------------------------


async def run_operation(
    network: Network, request: NetworkRequest, on_event: OnEvent | None = None
) -> PublishSummary | FetchSummary | HealthReport:
    """Run one request against a network; progress goes to ``on_event``."""
    emit: OnEvent = on_event if on_event is not None else _ignore
    progress = ThrottledProgress(emit)
    if isinstance(request, PublishRequest):
        published = await network.publish(
            request.path,
            name=request.name,
            progress=progress,
            convergence_secret=request.convergence_secret,
            strict=request.strict,
        )
        return PublishSummary.of(published)
    if isinstance(request, FetchRequest):

        def on_found(name: str, size: int, target: Path) -> None:
            emit(FileFound(name, size, target))

        fetched = await network.fetch(
            request.reference,
            path=request.path,
            output=request.output,
            directory=request.directory,
            overwrite=request.overwrite,
            progress=progress,
            on_found=on_found,
            verify_hash=request.verify_hash,
        )
        return FetchSummary.of(fetched)
    if isinstance(request, CheckRequest):
        checked = await network.check(request.root, progress=progress, verify=request.verify)
        return HealthReport.of(checked)
    repaired = await network.repair(request.root, progress=progress, verify=request.verify)
    return HealthReport.of(repaired)


def _ignore(event: Event) -> None:
    pass
