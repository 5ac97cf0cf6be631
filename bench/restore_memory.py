"""Peak memory of publishing to and restoring from a local store, by file size.

Each publish and each restore runs in a fresh child process; its peak RSS
(ru_maxrss) is what the table shows. A flat column across sizes means memory
does not grow with the file.

    python -m bench.restore_memory                  # 64 MiB, 256 MiB, 1 GiB
    python -m bench.restore_memory --sizes 16,64    # sizes in MiB
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import MiB, make_file, save


def child(action: str, store_dir: str, path: str, token: str) -> None:
    from dht_dfs.core.config import Config
    from dht_dfs.core.refs import parse_read_reference
    from dht_dfs.store.chunks import ChunkStore
    from dht_dfs.transfer.local import publish_to_store, restore_from_store

    config = Config()
    with ChunkStore(Path(store_dir)) as store:
        if action == "publish":
            result = asyncio.run(publish_to_store(Path(path), store, config))
            out = {"token": str(result.reference), "seconds": result.seconds}
        else:
            restored = asyncio.run(
                restore_from_store(parse_read_reference(token), store, config, Path(path))
            )
            out = {"seconds": restored.seconds}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def run_child(*args: str) -> dict[str, float | str]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.restore_memory", "--child", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 * MiB):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256,1024", help="file sizes in MiB")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="dhtfs-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for size_mib in (int(s) for s in args.sizes.split(",")):
            source = make_file(scratch / f"in-{size_mib}.bin", size_mib * MiB)
            store_dir = scratch / f"store-{size_mib}"
            out = scratch / f"out-{size_mib}.bin"
            published = run_child("publish", str(store_dir), str(source), "-")
            restored = run_child("restore", str(store_dir), str(out), str(published["token"]))
            identical = sha256_of(out) == sha256_of(source)
            rows.append(
                {
                    "size_mib": size_mib,
                    "publish_peak_rss_mb": round(float(published["peak_rss_mb"]), 1),
                    "restore_peak_rss_mb": round(float(restored["peak_rss_mb"]), 1),
                    "publish_mb_s": round(size_mib * MiB / 1e6 / float(published["seconds"]), 1),
                    "restore_mb_s": round(size_mib * MiB / 1e6 / float(restored["seconds"]), 1),
                    "identical": identical,
                }
            )
            shutil.rmtree(store_dir)
            out.unlink()
            source.unlink()
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    header = (
        f"{'size':>9} {'publish RSS':>12} {'restore RSS':>12} {'publish':>10} {'restore':>10}  ok"
    )
    print(header)
    for row in rows:
        print(
            f"{row['size_mib']:>5} MiB {row['publish_peak_rss_mb']:>9.1f} MB "
            f"{row['restore_peak_rss_mb']:>9.1f} MB {row['publish_mb_s']:>6.0f} MB/s "
            f"{row['restore_mb_s']:>6.0f} MB/s  {row['identical']}"
        )
    print("results:", save("restore_memory", {"rows": rows}))


if __name__ == "__main__":
    main()
