"""``dhtfs mount`` for real: a FUSE file system over a devnet, read by the kernel.

Each test mounts with the real command (a child process, as a user runs
it), reads through the mount with ordinary system calls, and unmounts with
Ctrl-C; the mount's own count of chunks fetched comes from its ``--json``
line at exit. Skipped, with the reason, where FUSE is not available.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dht_dfs.core.config import Config
from dht_dfs.core.crypto import seal_chunk
from tests.integration.test_cli import assert_one_line_error
from tests.support.devnet import Devnet, running_devnet
from tests.support.processes import dhtfs_command, read_until

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pyfuse3") is None
    or not os.path.exists("/dev/fuse")
    or shutil.which("fusermount3") is None,
    reason="FUSE is not available here (needs /dev/fuse, fuse3 and pyfuse3)",
)

CHUNK = Config().chunk_size
NO_CACHE = ("--cache-size", "0")
"""Every chunk a mount reads comes from the network, so its count means something."""
BIG = 5 * CHUNK + 12345
"""Not a whole number of chunks: the last one is short."""


@dataclass
class Published:
    devnet: Devnet
    source: Path
    reference: str


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    root = tmp_path_factory.mktemp("mount")
    source = root / "tree"
    (source / "docs" / "deep").mkdir(parents=True)
    (source / "big.bin").write_bytes(os.urandom(BIG))
    (source / "docs" / "readme.txt").write_text("hello through FUSE\n")
    (source / "docs" / "deep" / "empty").write_bytes(b"")
    (source / "docs" / "mid.bin").write_bytes(os.urandom(CHUNK + 1))
    private = source / "docs" / "private.txt"
    private.write_text("only for the owner\n")
    private.chmod(0o600)
    (source / "docs" / "link").symlink_to("readme.txt")
    with running_devnet(root / "net", 5) as devnet:
        done = devnet.run("publish", str(source), "--data-dir", str(devnet.node_dir(0)))
        yield Published(devnet, source, done.stdout.strip().splitlines()[-1])


@dataclass
class Mounted:
    path: Path
    process: subprocess.Popen[str]
    stats: dict[str, int] = field(default_factory=dict)
    stderr: str = ""


@contextmanager
def mounted(
    devnet: Devnet, target: str, mountpoint: Path, *options: str, node: int = 1
) -> Iterator[Mounted]:
    """``dhtfs mount TARGET MOUNTPOINT --json`` through a node; Ctrl-C at the end."""
    mountpoint.mkdir(exist_ok=True)
    command = [*dhtfs_command(), "mount", target, str(mountpoint), "--json"]
    command += ["--data-dir", str(devnet.node_dir(node)), *options]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=devnet.env
    )
    assert process.stdout is not None and process.stderr is not None
    mount = Mounted(mountpoint, process)
    try:
        read_until(process.stdout, '"mounted"', 60)
        yield mount
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        mount.stderr = err
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        for line in lines:
            if line.get("event") == "unmounted":
                mount.stats = line
    assert process.returncode == 0, mount.stderr
    assert not os.path.ismount(mountpoint), "Ctrl-C left the directory mounted"


def test_a_tree_reads_back_whole_with_its_sizes_modes_and_links(
    published: Published, tmp_path: Path
) -> None:
    with mounted(published.devnet, published.reference, tmp_path / "mnt") as mount:
        diff = subprocess.run(
            ["diff", "-r", "--no-dereference", str(published.source), str(mount.path)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert diff.returncode == 0, diff.stdout + diff.stderr
        cmp = subprocess.run(
            ["cmp", str(published.source / "big.bin"), str(mount.path / "big.bin")],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        assert cmp.returncode == 0
        for path in published.source.rglob("*"):
            seen = os.lstat(mount.path / path.relative_to(published.source))
            real = os.lstat(path)
            assert seen.st_mode & 0o170000 == real.st_mode & 0o170000, path
            if not path.is_symlink():
                # As published, less the write bits: the mount is read-only.
                want = real.st_mode & 0o555 | (0o500 if path.is_dir() else 0o400)
                assert seen.st_mode & 0o777 == want, path
                assert seen.st_mtime_ns == real.st_mtime_ns, path
            if path.is_file() and not path.is_symlink():
                assert seen.st_size == real.st_size, path
        assert os.readlink(mount.path / "docs" / "link") == "readme.txt"
        with pytest.raises(OSError) as refused:
            os.open(mount.path / "big.bin", os.O_WRONLY)
        assert refused.value.errno == errno.EROFS
    assert mount.stats["chunks_unavailable"] == 0


def test_listing_a_tree_fetches_no_file_chunk(published: Published, tmp_path: Path) -> None:
    with mounted(published.devnet, published.reference, tmp_path / "mnt", *NO_CACHE) as mount:
        listing = subprocess.run(
            ["ls", "-lR", str(mount.path)], capture_output=True, text=True, timeout=60, check=True
        )
        assert "big.bin" in listing.stdout and "readme.txt" in listing.stdout
        for path in mount.path.rglob("*"):
            os.lstat(path)
    assert mount.stats["chunks_fetched"] == 0, "ls -l fetched file chunks"
    assert mount.stats["directories_listed"] == 3


def test_random_reads_mmap_and_two_readers_match_the_source(
    published: Published, tmp_path: Path
) -> None:
    source = (published.source / "big.bin").read_bytes()
    shuffle = random.Random(20261202)
    with mounted(published.devnet, published.reference, tmp_path / "mnt", *NO_CACHE) as mount:
        path = mount.path / "big.bin"
        descriptor = os.open(path, os.O_RDONLY)
        try:
            for _ in range(300):
                offset = shuffle.randrange(0, BIG + 10)
                length = shuffle.choice([1, 7, 4095, 4097, 65537, CHUNK, CHUNK + 3, 3 * CHUNK])
                assert os.pread(descriptor, length, offset) == source[offset : offset + length]
        finally:
            os.close(descriptor)
        with (
            path.open("rb") as handle,
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view,
        ):
            assert view[CHUNK - 5 : 2 * CHUNK + 5] == source[CHUNK - 5 : 2 * CHUNK + 5]
            assert view[-100:] == source[-100:]
        results: list[bytes] = []

        def read_all(size: int) -> None:
            with path.open("rb", buffering=0) as handle:
                pieces = []
                while piece := handle.read(size):
                    pieces.append(piece)
            results.append(b"".join(pieces))

        readers = [threading.Thread(target=read_all, args=(size,)) for size in (4096, 1 << 20)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout=120)
        assert results == [source, source]
    # Every chunk came from the network once, however many reads wanted it.
    # Each chunk once, give or take one per reader: a read-ahead fetch a seek
    # cancelled just as it finished may be fetched again by the read that needs it.
    assert -(-BIG // CHUNK) <= mount.stats["chunks_fetched"] <= -(-BIG // CHUNK) + 2


def test_a_chunk_no_holder_has_is_eio_and_the_rest_keeps_working(
    published: Published, tmp_path: Path
) -> None:
    devnet = published.devnet
    victim = tmp_path / "victim.bin"
    victim.write_bytes(os.urandom(2 * CHUNK + 100))
    reference = devnet.run("publish", str(victim), "--data-dir", str(devnet.node_dir(0)))
    first = seal_chunk(victim.read_bytes()[:CHUNK]).chunk_id
    corrupted = 0
    for node in range(5):
        copy = devnet.node_dir(node) / "store" / "chunks" / first.hex()[:2] / first.hex()
        if copy.exists():
            data = bytearray(copy.read_bytes())
            data[100] ^= 0xFF
            copy.write_bytes(bytes(data))
            corrupted += 1
    assert corrupted == 3, "every copy of the chunk is made bad"
    target = reference.stdout.strip().splitlines()[-1]
    with mounted(devnet, target, tmp_path / "mnt", *NO_CACHE, "--read-timeout", "10") as mount:
        path = mount.path / "victim.bin"
        descriptor = os.open(path, os.O_RDONLY)
        try:
            started = time.monotonic()
            with pytest.raises(OSError) as failed:
                os.pread(descriptor, 4096, 0)
            assert failed.value.errno == errno.EIO
            assert time.monotonic() - started < 30, "a bad chunk must not hang a read"
            # Never wrong bytes; and the file's other chunks still read.
            assert (
                os.pread(descriptor, 1000, CHUNK + 50)
                == victim.read_bytes()[CHUNK + 50 : CHUNK + 1050]
            )
        finally:
            os.close(descriptor)
        assert path.stat().st_size == 2 * CHUNK + 100
    assert mount.stats["chunks_unavailable"] >= 1
    assert first.hex() in mount.stderr, "the log names the chunk"


def test_bad_mount_points_and_references_are_one_line_errors(
    published: Published, tmp_path: Path
) -> None:
    devnet = published.devnet
    node = ["--data-dir", str(devnet.node_dir(1))]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    for mountpoint, why in ((busy, "not empty"), (tmp_path / "missing", "no such directory")):
        done = devnet.run("mount", published.reference, str(mountpoint), *node, check=False)
        assert_one_line_error(done, 2, why)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(
        devnet.run("mount", "dhtfs:r1:nonsense", str(empty), *node, check=False), 2, "reference"
    )
    done = devnet.run("mount", f"{published.reference}/no/such", str(empty), *node, check=False)
    assert done.returncode == 2 and "no 'no'" in done.stderr
    assert not os.path.ismount(empty)


def test_ctrl_c_while_a_read_waits_on_the_network_unmounts_cleanly(
    published: Published, tmp_path: Path
) -> None:
    devnet = published.devnet
    nodes = [int((devnet.node_dir(i) / "node.lock").read_text()) for i in range(5)]
    with mounted(devnet, published.reference, tmp_path / "mnt", *NO_CACHE) as mount:
        os.lstat(mount.path / "docs" / "mid.bin")
        for pid in nodes:
            os.kill(pid, signal.SIGSTOP)  # every holder stalls
        try:
            reader = subprocess.Popen(
                ["dd", f"if={mount.path / 'docs' / 'mid.bin'}", "of=/dev/null", "bs=4k", "count=1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            # The open waits on the stalled network; Ctrl-C comes meanwhile.
            with pytest.raises(subprocess.TimeoutExpired):
                reader.wait(timeout=1)
            started = time.monotonic()
            mount.process.send_signal(signal.SIGINT)
            mount.process.wait(timeout=30)
            assert time.monotonic() - started < 20
            reader.wait(timeout=30)
        finally:
            for pid in nodes:
                os.kill(pid, signal.SIGCONT)
    # mounted() checked: exit 0 (no crash), and nothing left mounted.
    assert mount.stats


def test_a_killed_mount_leaves_no_dead_directory(published: Published, tmp_path: Path) -> None:
    devnet = published.devnet
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    command = [*dhtfs_command(), "mount", published.reference, str(mountpoint), "--json"]
    command += ["--data-dir", str(devnet.node_dir(1))]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert process.stdout is not None
    read_until(process.stdout, '"mounted"', 60)
    assert os.path.ismount(mountpoint)
    process.kill()  # a crash: no clean unmount
    process.wait(timeout=30)
    process.stdout.close()
    # fusermount3 (auto_unmount) notices the dead process and unmounts.
    deadline = time.monotonic() + 30
    while os.path.ismount(mountpoint):
        assert time.monotonic() < deadline, "a killed mount left a dead mount behind"
        time.sleep(0.05)
    # And the directory can be mounted again.
    with mounted(devnet, published.reference, mountpoint) as mount:
        assert (mount.path / "docs" / "readme.txt").read_text() == "hello through FUSE\n"


def test_a_holder_killed_during_a_read_does_not_fail_it(
    published: Published, tmp_path: Path
) -> None:
    # Last in this module: it leaves the devnet one node short.
    source = (published.source / "big.bin").read_bytes()
    with mounted(published.devnet, published.reference, tmp_path / "mnt", *NO_CACHE) as mount:
        with (mount.path / "big.bin").open("rb", buffering=0) as handle:
            start = handle.read(CHUNK)
            node_pid = int((published.devnet.node_dir(3) / "node.lock").read_text())
            os.kill(node_pid, signal.SIGKILL)
            rest = handle.read()
        assert start + rest == source
