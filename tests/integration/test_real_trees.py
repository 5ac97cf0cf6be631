"""Round trips of real trees nobody here wrote, through a 5-node devnet.

The standard library of the interpreter running the tests (without
site-packages, another project's files) and /usr/share/doc: thousands of
files, most under 4 KiB (inlined), symlinks (some dangling, some absolute),
deep directories. Each is published on one node and fetched on another;
the copy must match byte for byte (``diff -r --no-dereference``), with the
same kinds, link targets, modes and mtimes.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.devnet import Devnet, running_devnet

TREES = {
    "stdlib": Path(sysconfig.get_paths()["stdlib"]),
    "usr-share-doc": Path("/usr/share/doc"),
}
LEFT_OUT = ("site-packages", "dist-packages")
SLOW = 600


@pytest.fixture(scope="module")
def devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devnet]:
    with running_devnet(tmp_path_factory.mktemp("devnet"), 5) as network:
        yield network


def copy_of(source: Path, target: Path) -> Path:
    """``cp -a`` of the tree (so it cannot change under the test), without site-packages."""
    target.mkdir()
    names = [p.name for p in source.iterdir() if p.name not in LEFT_OUT]
    subprocess.run(["cp", "-a", "--", *names, str(target)], cwd=source, check=True)
    return target


def inventory(root: Path) -> dict[str, tuple[str, int, int | None, str | None]]:
    """Every path below ``root``: (kind, permission bits, mtime of files and dirs, link target)."""
    umask = os.umask(0)
    os.umask(umask)
    found: dict[str, tuple[str, int, int | None, str | None]] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            relative = os.path.relpath(path, root)
            if stat.S_ISLNK(info.st_mode):
                found[relative] = ("link", 0, None, os.readlink(path))
            else:
                kind = "dir" if stat.S_ISDIR(info.st_mode) else "file"
                mode = stat.S_IMODE(info.st_mode) & ~umask
                found[relative] = (kind, mode, info.st_mtime_ns, None)
    return found


@pytest.mark.parametrize("tree", sorted(TREES))
def test_a_real_tree_round_trips(devnet: Devnet, tmp_path: Path, tree: str) -> None:
    if not TREES[tree].is_dir():
        pytest.skip(f"{TREES[tree]} is not on this machine")
    source = copy_of(TREES[tree], tmp_path / tree)
    expected = inventory(source)
    kinds = [kind for kind, _, _, _ in expected.values()]
    assert kinds.count("file") > 1000, "a tree of thousands of files"

    published = devnet.run(
        "publish", str(source), "--json", "--data-dir", str(devnet.node_dir(0)), timeout=SLOW
    )
    document = json.loads(published.stdout)
    assert document["skipped"] == 0, document["skipped_notes"]
    assert document["files"] == kinds.count("file")
    assert document["symlinks"] == kinds.count("link")
    assert document["under_replicated"] == 0

    out = tmp_path / "fetched"
    fetched = devnet.run(
        "fetch", document["reference"], "-o", str(out), "--json",
        "--data-dir", str(devnet.node_dir(4)), timeout=SLOW,
    )  # fmt: skip
    assert json.loads(fetched.stdout)["files"] == kinds.count("file")
    diff = subprocess.run(
        ["diff", "-r", "--no-dereference", str(source), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert diff.returncode == 0, diff.stdout[:2000]
    got = inventory(out)
    assert got.keys() == expected.keys()
    differing = [path for path in expected if got[path] != expected[path]]
    assert not differing, [(p, expected[p], got[p]) for p in differing[:5]]
