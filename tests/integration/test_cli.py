"""The real ``dhtfs`` command, run as subprocesses against a devnet."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from dhtfs_cli.devnet import find_free_ports

from tests.support.devnet import TIMEOUT, Devnet, running_devnet
from tests.support.processes import dhtfs_command, read_until, stop

NODES = 6


@pytest.fixture(scope="module")
def devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devnet]:
    with running_devnet(tmp_path_factory.mktemp("devnet"), NODES) as network:
        banner = network.banner
        assert banner[0].startswith(f"devnet: {NODES} node(s) on 127.0.0.1:{network.base_port}")
        # The commands to try, one per line, as a person reads them.
        assert [line.split(":")[0].strip() for line in banner[1:]] == [
            "publish",
            "fetch",
            "client",
            "status",
            "pins",
            "Ctrl-C stops the network.",
        ]
        yield network


def write(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert done.returncode == code, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("dhtfs: error: "), lines
    assert text in lines[0]
    assert "Traceback" not in done.stderr


def test_publish_on_one_node_fetch_on_another_and_as_client(devnet: Devnet, tmp_path: Path) -> None:
    data = write(tmp_path / "movie.bin", 3_000_000)
    published = devnet.run(
        "publish", str(tmp_path / "movie.bin"), "--data-dir", str(devnet.node_dir(0))
    )
    reference = published.stdout.strip().splitlines()[-1]
    assert reference.startswith("dhtfs:r1:")

    out = tmp_path / "copy.bin"
    fetched = devnet.run("fetch", reference, "-o", str(out), "--data-dir", str(devnet.node_dir(5)))
    assert out.read_bytes() == data
    assert fetched.stdout.strip().splitlines()[-1] == str(out)

    # Without a local node: a short-lived client through any node; no -o
    # means the published name in the current directory.
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    devnet.run("fetch", reference, "--bootstrap", f"127.0.0.1:{devnet.base_port + 3}", cwd=workdir)
    assert (workdir / "movie.bin").read_bytes() == data

    again = devnet.run(
        "fetch", reference, "-o", str(out), "--data-dir", str(devnet.node_dir(2)), check=False
    )
    # An existing output is bad input (exit 2), refused before any network work.
    assert_one_line_error(
        again, 2, "already exists; fetch to another path or overwrite it (--force)"
    )
    devnet.run("fetch", reference, "-o", str(out), "--force", "--data-dir", str(devnet.node_dir(2)))


def test_json_documents(devnet: Devnet, tmp_path: Path) -> None:
    write(tmp_path / "doc.bin", 700_000)
    published = json.loads(
        devnet.run(
            "publish", str(tmp_path / "doc.bin"), "--json", "--data-dir", str(devnet.node_dir(1))
        ).stdout
    )
    assert published["size"] == 700_000
    assert published["reference"].startswith("dhtfs:r1:")
    assert published["root_hash"].startswith("dhtfs:v1:")
    fetched = json.loads(
        devnet.run(
            "fetch",
            published["reference"],
            "-o",
            str(tmp_path / "doc.out"),
            "--json",
            "--bootstrap",
            f"127.0.0.1:{devnet.base_port}",
        ).stdout
    )
    assert fetched["size"] == 700_000
    assert fetched["name"] == "doc.bin"
    # check needs only the root hash, which cannot read the file.
    report = json.loads(
        devnet.run(
            "check", published["root_hash"], "--json", "--data-dir", str(devnet.node_dir(4))
        ).stdout
    )
    assert report["ok"] is True
    assert report["min_copies"] >= 3
    assert report["holders_are"] == "claimed"
    # --verify: one copy fetched, every other holder answers a PROVE over TCP.
    verified = json.loads(
        devnet.run(
            "check",
            published["root_hash"],
            "--verify",
            "--json",
            "--data-dir",
            str(devnet.node_dir(4)),
        ).stdout
    )
    assert verified["ok"] is True and verified["holders_are"] == "proven"
    assert verified["min_copies"] >= 3 and verified["failed_proofs"] == 0
    statuses = [
        json.loads(devnet.run("status", "--json", "--data-dir", str(devnet.node_dir(i))).stdout)
        for i in range(NODES)
    ]
    status = statuses[1]
    assert len(status["node_id"]) == 40
    assert status["address"] == f"127.0.0.1:{devnet.base_port + 1}"
    assert status["peers"]["known"] >= NODES - 1
    # The publishing node need not be among a chunk's closest, so count the
    # copies over the whole network: every chunk of this file on 3 nodes.
    chunks = published["data_chunks"] + published["manifest_chunks"]
    assert sum(s["store"]["chunks"] for s in statuses) >= 3 * chunks


def test_human_status_and_check(devnet: Devnet, tmp_path: Path) -> None:
    status = devnet.run("status", "--data-dir", str(devnet.node_dir(0)))
    assert "node " in status.stdout and "peers" in status.stdout
    write(tmp_path / "small.bin", 1000)
    published = json.loads(
        devnet.run(
            "publish", str(tmp_path / "small.bin"), "--json", "--data-dir", str(devnet.node_dir(0))
        ).stdout
    )
    checked = devnet.run("check", published["root_hash"], "--data-dir", str(devnet.node_dir(3)))
    assert checked.stdout.startswith("OK: ")


def test_errors_are_one_line_with_exit_codes(devnet: Devnet, tmp_path: Path) -> None:
    node = ["--data-dir", str(devnet.node_dir(0))]
    assert_one_line_error(
        devnet.run("fetch", "garbage", *node, check=False), 2, "not a dhtfs reference"
    )
    assert_one_line_error(devnet.run("fetch", "dhtfs:r1:abc", *node, check=False), 2, "truncated")
    unknown = "dhtfs:r1:" + "a" * 109
    assert_one_line_error(devnet.run("fetch", unknown, *node, check=False), 2, "checksum")
    from dht_dfs.core.ids import ChunkId
    from dht_dfs.core.refs import ReadReference

    never_published = str(ReadReference(ChunkId(os.urandom(32)), os.urandom(32)))
    assert_one_line_error(
        devnet.run("fetch", never_published, *node, check=False), 1, "no node has root"
    )
    # Input that cannot work is refused before any network work.
    unreachable = ["--bootstrap", "127.0.0.1:1"]
    assert_one_line_error(
        devnet.run("publish", str(tmp_path / "missing"), *unreachable, check=False),
        2,
        "cannot read",
    )
    # A directory publishes as a tree; a bad path inside one is refused at once.
    assert_one_line_error(
        devnet.run("ls", "garbage/sub", *unreachable, check=False), 2, "not a dhtfs reference"
    )
    assert_one_line_error(
        devnet.run("cat", f"{never_published}/../x", *unreachable, check=False),
        2,
        "'..' is not allowed",
    )
    assert_one_line_error(
        devnet.run(
            "fetch", never_published, "-o", str(tmp_path / "no" / "x"), *unreachable, check=False
        ),
        2,
        "does not exist",
    )
    empty = tmp_path / "no-node-here"
    assert_one_line_error(
        devnet.run("status", "--data-dir", str(empty), check=False), 1, "no dhtfs node is running"
    )
    # A bad setting is bad usage whichever layer finds it: Config.validate...
    sample = tmp_path / "sample"
    write(sample, 10)
    assert_one_line_error(
        devnet.run("publish", str(sample), "--replicas", "0", *unreachable, check=False),
        2,
        "replicas must be at least 1",
    )
    # ...or the node, when its port is taken (by node 0 of the devnet).
    taken = ["--port", str(devnet.base_port), "--host", "127.0.0.1"]
    assert_one_line_error(
        devnet.run("join", *taken, "--data-dir", str(tmp_path / "joiner"), check=False),
        2,
        "cannot listen on",
    )
    # A short-lived client gives up after a few attempts (a node would keep trying longer).
    assert_one_line_error(
        devnet.run("publish", str(sample), *unreachable, check=False),
        1,
        "no DHT node answered at 127.0.0.1:1 after 3 attempts",
    )


def test_devnet_outlives_a_killed_node_and_stops_the_rest_on_ctrl_c(tmp_path: Path) -> None:
    base = find_free_ports(3)
    restarted: subprocess.Popen[str] | None = None
    process = subprocess.Popen(
        [*dhtfs_command(), "devnet", "--nodes", "3", "--port", str(base), "--dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def status(index: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*dhtfs_command(), "status", "--json", "--data-dir", str(tmp_path / f"node-{index}")],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )

    try:
        assert process.stdout is not None
        read_until(process.stdout, "Ctrl-C stops the network", 90)
        pids = [json.loads(status(index).stdout)["pid"] for index in range(3)]
        # Node 1 is a child of the devnet this test started.
        os.kill(pids[1], signal.SIGKILL)
        assert process.stderr is not None
        lines = read_until(process.stderr, "node 1 exited", 60)
        assert "exited with code -9" in lines[-1]
        assert "2 node(s) still running" in lines[-1]
        assert f"--port {base + 1} --data-dir {tmp_path / 'node-1'}" in lines[-1]
        assert process.poll() is None
        for index in (0, 2):
            assert json.loads(status(index).stdout)["pid"] == pids[index]
        assert status(1).returncode == 1
        # The user restarts it with the command printed; the devnet's Ctrl-C
        # stops it too, as part of the network.
        restart = lines[-1].split("To restart it: dhtfs ", 1)[1].split()
        restarted = subprocess.Popen(
            [*dhtfs_command(), *restart], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        assert restarted.stdout is not None
        read_until(restarted.stdout, "listening on", 60)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0
        assert restarted.wait(timeout=30) == 0, "the restarted node stopped with the devnet"
    finally:
        stop([process], signal.SIGKILL)
        if restarted is not None:
            stop([restarted], signal.SIGKILL)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_too_few_nodes_for_the_replicas_is_a_warning(devnet: Devnet, tmp_path: Path) -> None:
    write(tmp_path / "wide.bin", 200_000)
    done = devnet.run(
        "publish",
        str(tmp_path / "wide.bin"),
        "--replicas",
        "7",
        "--bootstrap",
        f"127.0.0.1:{devnet.base_port}",
    )
    assert done.stdout.strip().splitlines()[-1].startswith("dhtfs:r1:")
    assert "dhtfs: warning:" in done.stderr and "fewer copies than wanted" in done.stderr


def test_published_names_reach_the_terminal_escaped(devnet: Devnet, tmp_path: Path) -> None:
    """A name is the publisher's choice: escape sequences in it are shown, not run,
    and a dotfile or option-like name needs an explicit -o."""
    node = ["--data-dir", str(devnet.node_dir(1))]
    data = write(tmp_path / "plain.bin", 1000)
    hostile = "clear\x1b[2J\u202etxt.exe"
    published = devnet.run("publish", str(tmp_path / "plain.bin"), "--name", hostile, *node)
    reference = published.stdout.strip().splitlines()[-1]
    downloads = tmp_path / "downloads"
    downloads.mkdir()

    fetched = devnet.run("fetch", reference, "-o", str(downloads), *node)
    assert (downloads / hostile).read_bytes() == data
    shown = fetched.stdout.strip().splitlines()[-1]
    assert shown == f"{downloads}/clear\\x1b[2J\\u202etxt.exe"
    again = devnet.run("fetch", reference, "-o", str(downloads), *node, check=False)
    assert_one_line_error(again, 2, "clear\\x1b[2J\\u202etxt.exe already exists")
    for done in (fetched, again):
        assert "\x1b" not in done.stdout + done.stderr
        assert "\u202e" not in done.stdout + done.stderr

    dotfile = devnet.run("publish", str(tmp_path / "plain.bin"), "--name", ".bashrc", *node)
    dot_reference = dotfile.stdout.strip().splitlines()[-1]
    refused = devnet.run("fetch", dot_reference, *node, check=False, cwd=downloads)
    assert_one_line_error(refused, 2, "'.bashrc' would be hidden; choose the output file with -o")
    assert not (downloads / ".bashrc").exists()


def test_publish_a_tree_then_ls_and_cat(devnet: Devnet, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub" / "deep").mkdir(parents=True)
    (tree / "empty").mkdir()
    (tree / "hello.txt").write_bytes(b"hello\n")
    big = write(tree / "sub" / "file.bin", 2_500_000)
    (tree / "link").symlink_to("sub/file.bin")
    os.mkfifo(tree / "pipe")
    published = devnet.run("publish", str(tree), "--data-dir", str(devnet.node_dir(0)))
    reference = published.stdout.strip().splitlines()[-1]
    assert reference.startswith("dhtfs:r1:")
    assert "skipped" in published.stderr and "pipe" in published.stderr

    other = ["--data-dir", str(devnet.node_dir(4))]
    listed = devnet.run("ls", reference, "-l", *other).stdout.splitlines()
    assert [line.split()[-1] for line in listed] == ["empty", "hello.txt", "sub/file.bin", "sub"]
    assert listed[2].startswith("l") and "link -> sub/file.bin" in listed[2]
    assert listed[3].startswith("d") and " 2500000 " in listed[3]
    assert devnet.run("ls", f"{reference}/sub", *other).stdout.split() == ["deep", "file.bin"]
    document = json.loads(devnet.run("ls", f"{reference}/hello.txt", "--json", *other).stdout)
    assert document["entries"][0]["size"] == 6 and document["entries"][0]["inline"]

    cat = subprocess.run(
        [*dhtfs_command(), "cat", f"{reference}/sub/file.bin", *other],
        capture_output=True, timeout=TIMEOUT, env=devnet.env, check=False,
    )  # fmt: skip
    assert cat.returncode == 0, cat.stderr
    assert cat.stdout == big
    assert_one_line_error(
        devnet.run("ls", f"{reference}/sub/nope/further", *other, check=False),
        2,
        "no 'sub/nope' in this tree",
    )
    assert_one_line_error(
        devnet.run("cat", f"{reference}/sub", *other, check=False), 2, "is a directory"
    )
    checked = devnet.run("check", reference, *other)
    assert checked.stdout.startswith("OK: ")

    # The whole tree, a subtree and one file, fetched on another node.
    fetched = devnet.run("fetch", reference, "-o", str(tmp_path / "got"), *other)
    assert fetched.stdout.strip() == str(tmp_path / "got")
    os.unlink(tree / "pipe")  # skipped when published
    diff = subprocess.run(
        ["diff", "-r", "--no-dereference", str(tree), str(tmp_path / "got")], check=False
    )
    assert diff.returncode == 0
    assert (tmp_path / "got" / "link").is_symlink()
    again = devnet.run("fetch", reference, "-o", str(tmp_path / "got"), *other, "--json")
    assert json.loads(again.stdout)["files_kept"] == 2  # hello.txt and sub/file.bin
    devnet.run("fetch", f"{reference}/sub", "-o", str(tmp_path / "sub"), *other)
    assert (tmp_path / "sub" / "file.bin").read_bytes() == big
    assert_one_line_error(
        devnet.run("fetch", f"{reference}/nope", *other, check=False), 2, "no 'nope'"
    )


def test_publish_from_stdin_and_fetch_to_stdout(devnet: Devnet, tmp_path: Path) -> None:
    data = os.urandom(3_000_000)
    published = subprocess.run(
        [*dhtfs_command(), "publish", "-", "--name", "blob.bin",
         "--data-dir", str(devnet.node_dir(0))],
        input=data, capture_output=True, timeout=TIMEOUT, env=devnet.env, check=False,
    )  # fmt: skip
    assert published.returncode == 0, published.stderr
    reference = published.stdout.decode().strip().splitlines()[-1]
    out = subprocess.run(
        [*dhtfs_command(), "fetch", reference, "-o", "-", "--data-dir", str(devnet.node_dir(3))],
        capture_output=True, timeout=TIMEOUT, env=devnet.env, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == data
    fetched = devnet.run(
        "fetch", reference, "-o", str(tmp_path), *["--data-dir", str(devnet.node_dir(4))]
    )
    assert Path(fetched.stdout.strip()) == tmp_path / "blob.bin"
    assert (tmp_path / "blob.bin").read_bytes() == data
    assert_one_line_error(
        devnet.run("publish", "-", "--data-dir", str(devnet.node_dir(0)), check=False),
        2,
        "needs --name",
    )


def test_version_full_help_and_bad_addresses_are_usage_errors(
    devnet: Devnet, tmp_path: Path
) -> None:
    version = devnet.run("--version").stdout.strip()
    assert version and version == devnet.run("version").stdout.strip()
    commands = devnet.run("--help").stdout.split("Commands:")[1]
    assert "..." not in commands, "every command's summary is whole"
    sample = tmp_path / "sample.bin"
    write(sample, 100)
    for bad in ("localhost", "localhost:99999", ":4000"):
        assert_one_line_error(
            devnet.run("publish", str(sample), "--bootstrap", bad, check=False),
            2,
            f"--bootstrap {bad!r}",
        )
    assert_one_line_error(
        devnet.run("join", "--port", "70000", "--data-dir", str(tmp_path / "n"), check=False),
        2,
        "--port 70000: a port is between 0 and 65535",
    )


def test_an_output_with_a_trailing_slash_is_a_directory(devnet: Devnet, tmp_path: Path) -> None:
    data = write(tmp_path / "a.bin", 5000)
    published = devnet.run(
        "publish", str(tmp_path / "a.bin"), "--data-dir", str(devnet.node_dir(0))
    )
    reference = published.stdout.strip().splitlines()[-1]
    target = tmp_path / "new" / "dir"
    fetched = devnet.run(
        "fetch", reference, "-o", f"{target}/", "--data-dir", str(devnet.node_dir(1))
    )
    assert fetched.stdout.strip() == str(target / "a.bin")
    assert (target / "a.bin").read_bytes() == data
    (tmp_path / "plain").write_text("a file")
    assert_one_line_error(
        devnet.run(
            "fetch", reference, "-o", f"{tmp_path / 'plain'}/", "--data-dir",
            str(devnet.node_dir(1)), check=False,
        ),
        2,
        "exists and is not a directory",
    )  # fmt: skip


def test_gateway_serves_a_file_to_a_plain_http_client_until_ctrl_c(
    devnet: Devnet, tmp_path: Path
) -> None:
    import urllib.request

    data = write(tmp_path / "page.txt", 3000)
    node = ["--data-dir", str(devnet.node_dir(2))]
    reference = devnet.run("publish", str(tmp_path / "page.txt"), *node).stdout.split()[-1]
    process = subprocess.Popen(
        [*dhtfs_command(), "gateway", "--port", "0", *node],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=devnet.env,
    )
    try:
        assert process.stdout is not None
        (url,) = read_until(process.stdout, "http://", 60)
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{url}{reference}", timeout=TIMEOUT) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            assert response.read() == data
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        stop([process], signal.SIGKILL)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        assert_one_line_error(
            devnet.run("gateway", "--port", port, *node, check=False), 2, "cannot listen on"
        )


def test_join_serves_metrics_and_status_shows_disk_and_quota(
    devnet: Devnet, tmp_path: Path
) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    home = tmp_path / "watched"
    bootstrap = f"127.0.0.1:{devnet.base_port}"
    options = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--max-storage", "1G"]
    process = subprocess.Popen(
        [*dhtfs_command(), "join", *options, "--data-dir", str(home), "--bootstrap", bootstrap],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=devnet.env,
    )
    try:
        assert process.stdout is not None
        lines = read_until(process.stdout, "/metrics", 60)
        url = lines[-1].removeprefix("metrics on ")
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
        assert families["dhtfs_store_quota_bytes"].samples[0].value == 1 << 30
        assert families["dhtfs_store_full"].samples[0].value == 0
        shown = devnet.run("status", "--data-dir", str(home)).stdout
        assert "of 1.0 GiB (0%)" in shown and " free" in shown and "FULL" not in shown
        assert f"metrics   port {url.rsplit(':', 1)[1].split('/')[0]}" in shown
        document = json.loads(devnet.run("status", "--json", "--data-dir", str(home)).stdout)
        assert document["store"]["full"] is False and document["store"]["disk_free"] > 0
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0
    finally:
        stop([process], signal.SIGKILL)


def test_a_reader_that_goes_away_is_not_an_error(devnet: Devnet, tmp_path: Path) -> None:
    tree = tmp_path / "many"
    tree.mkdir()
    for index in range(3000):  # a listing larger than a pipe's buffer
        (tree / f"file-{index:04d}.txt").write_text(f"{index}\n")
    node = ["--data-dir", str(devnet.node_dir(0))]
    reference = devnet.run("publish", str(tree), *node).stdout.split()[-1]
    command = " ".join([*dhtfs_command(), "ls", "-l", reference, *node])
    done = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {command} | head -1"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=devnet.env,
        check=False,
    )
    assert done.stdout.count("\n") == 1
    assert done.stderr == "", "no 'Broken pipe' error when head stops reading"
    assert done.returncode == 141
