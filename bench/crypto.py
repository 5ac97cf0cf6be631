"""Why chunks use AEGIS-256: decrypt, and check-then-open, per core.

Times, on 1 MiB buffers in one thread, AEGIS-256 (what dhtfs uses) against
XSalsa20-Poly1305 (PyNaCl's SecretBox), alone and together with the SHA-256
that every receiver computes over a chunk's ciphertext. Rounds alternate
between the ciphers; medians are reported.

    python -m bench.crypto [--rounds 9] [--mib 64]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections.abc import Callable

import nacl.bindings
import nacl.secret

from bench.common import MiB, median, save
from dht_dfs.core.crypto import decrypt_with_key, derive_chunk_key, encrypt_with_key


def rate(work: Callable[[], object], total_bytes: int) -> float:
    started = time.perf_counter()
    work()
    return total_bytes / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--mib", type=int, default=64, help="MiB processed per round")
    args = parser.parse_args()

    plain = os.urandom(MiB)
    key = derive_chunk_key(plain, bytes(32))
    aegis = encrypt_with_key(plain, key)
    box = nacl.secret.SecretBox(key)
    boxed = box.encrypt(plain, nacl.bindings.randombytes(24))
    count = args.mib
    total = count * MiB

    def aegis_open() -> None:
        for _ in range(count):
            decrypt_with_key(aegis, key)

    def box_open() -> None:
        for _ in range(count):
            box.decrypt(boxed)

    def aegis_check_open() -> None:
        for _ in range(count):
            hashlib.sha256(aegis).digest()
            decrypt_with_key(aegis, key)

    def box_check_open() -> None:
        for _ in range(count):
            hashlib.sha256(boxed).digest()
            box.decrypt(boxed)

    cases = {
        "aegis256 decrypt": aegis_open,
        "secretbox decrypt": box_open,
        "sha256 + aegis256": aegis_check_open,
        "sha256 + secretbox": box_check_open,
    }
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, work in cases.items():
            rates[name].append(rate(work, total))
    results = {name: round(median(values), 2) for name, values in rates.items()}
    for name, value in results.items():
        print(f"{name:>20}: {value:5.2f} GB/s")
    path = save("crypto", {"rounds": args.rounds, "mib": args.mib, "gb_per_s": results})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
