"""Cost of one proof of possession: tagging a chunk (prover and verifier each pay it).

    python -m bench.proof [--size 1048576] [--rounds 200]

Prints the median time to tag one chunk (BLAKE2b-256 keyed by a fresh
nonce over id || bytes) and the rate, against SHA-256 of the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time

from dht_dfs.core.ids import ChunkId
from dht_dfs.core.proofs import PROOF_NONCE_SIZE, proof_tag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=1024 * 1024)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    data = os.urandom(args.size)
    chunk_id = ChunkId.of(data)
    tags, hashes = [], []
    for _ in range(args.rounds):
        nonce = os.urandom(PROOF_NONCE_SIZE)
        started = time.perf_counter()
        proof_tag(nonce, chunk_id, data)
        tags.append(time.perf_counter() - started)
        started = time.perf_counter()
        hashlib.sha256(data).digest()
        hashes.append(time.perf_counter() - started)
    tag, sha = statistics.median(tags), statistics.median(hashes)
    mib = args.size / (1024 * 1024)
    print(f"proof tag of {args.size} bytes: {tag * 1e3:.3f} ms median ({mib / tag:.0f} MiB/s)")
    print(f"sha256 of the same:        {sha * 1e3:.3f} ms median ({mib / sha:.0f} MiB/s)")


if __name__ == "__main__":
    main()
