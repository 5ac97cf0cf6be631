"""A raw TCP file copy, as separate processes (for hosts in network namespaces).

    python -m bench.rawcopy receive PORT OUT     # prints {"listening": PORT}, then the result
    python -m bench.rawcopy send FILE HOST:PORT [HOST:PORT ...]

The receiver writes what it gets to OUT and fsyncs it, as a fetch does,
then prints {"bytes": n, "seconds": s}, timed from the connection's
accept to the fsync. The sender sends FILE with sendfile to every
address at once, one thread each (three receivers: what a publish that
places three copies has to move).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

MiB = 1 << 20


def receive(port: int, out: str) -> None:
    with socket.create_server(("0.0.0.0", port)) as listener:
        print(json.dumps({"listening": port}), flush=True)
        listener.settimeout(120)
        connection, _ = listener.accept()
    started = time.perf_counter()
    received = 0
    buffer = bytearray(MiB)
    view = memoryview(buffer)
    with connection, open(out, "wb") as handle:
        connection.settimeout(120)
        while n := connection.recv_into(view):
            handle.write(view[:n])
            received += n
        handle.flush()
        os.fsync(handle.fileno())
    print(json.dumps({"bytes": received, "seconds": time.perf_counter() - started}), flush=True)


def send(path: str, addresses: list[str]) -> None:
    def one(address: str) -> None:
        host, port = address.rsplit(":", 1)
        with (
            socket.create_connection((host, int(port)), timeout=120) as sender,
            open(path, "rb") as handle,
        ):
            sender.sendfile(handle)

    threads = [threading.Thread(target=one, args=(a,)) for a in addresses]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main() -> None:
    if len(sys.argv) >= 4 and sys.argv[1] == "receive":
        receive(int(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) >= 4 and sys.argv[1] == "send":
        send(sys.argv[2], sys.argv[3:])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
