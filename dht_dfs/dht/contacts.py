"""The saved contact list: a node's routing table, kept across restarts.

Owns the file's format (JSON, never pickle: kademlia's ``save_state`` used
pickle, and loading it runs code), its limits, and reading and writing it.
A bad file or entry is skipped with a log line; a node then joins as if it
had none.

Must not import: asyncio, kademlia, or any ``dht`` module but ``values`` and ``codec``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from dht_dfs.core.errors import RemoteProtocolError
from dht_dfs.core.ids import NodeId
from dht_dfs.dht.codec import remote_error
from dht_dfs.dht.values import Contact

log = logging.getLogger(__name__)

STATE_FORMAT: Final = "dhtfs-dht-contacts/1"
MAX_STATE_FILE_SIZE: Final = 1024 * 1024
MAX_SAVED_CONTACTS: Final = 1000


def load_contacts(path: Path | None) -> list[Contact]:
    """The contacts saved at ``path``; empty if there is no usable file."""
    if path is None:
        return []
    try:
        if path.stat().st_size > MAX_STATE_FILE_SIZE:
            log.warning(
                "ignoring DHT contact file %s: larger than %d bytes", path, MAX_STATE_FILE_SIZE
            )
            return []
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable DHT contact file %s: %s", path, exc)
        return []
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        log.warning("ignoring DHT contact file %s: not %s", path, STATE_FORMAT)
        return []
    entries = document.get("contacts")
    contacts: list[Contact] = []
    for entry in entries[:MAX_SAVED_CONTACTS] if isinstance(entries, list) else []:
        try:
            if not isinstance(entry, dict):
                raise remote_error("contact entry is not an object")
            node_id = NodeId.from_hex(str(entry.get("node_id")))
            contacts.append(
                Contact.from_wire(
                    [
                        node_id.digest,
                        entry.get("host"),
                        entry.get("udp_port"),
                        entry.get("tcp_port"),
                    ]
                )
            )
        except (RemoteProtocolError, ValueError) as exc:
            log.warning("skipping a bad entry in %s: %s", path, exc)
    return contacts


def save_contacts(path: Path | None, own_id: NodeId, contacts: Sequence[Contact]) -> None:
    """Replace the file at ``path`` with these contacts (the first MAX_SAVED_CONTACTS).

    An empty list leaves the previous file: an isolated node should not forget
    its network.
    """
    if path is None or not contacts:
        return
    document = {
        "format": STATE_FORMAT,
        "node_id": own_id.hex(),
        "saved_at": int(time.time()),
        "contacts": [
            {
                "node_id": c.node_id.hex(),
                "host": c.host,
                "udp_port": c.udp_port,
                "tcp_port": c.tcp_port,
            }
            for c in contacts[:MAX_SAVED_CONTACTS]
        ],
    }
    # Written aside and renamed, so a crash mid-write leaves the old list whole.
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(json.dumps(document, indent=1) + "\n")
        os.replace(temporary, path)
    except OSError as exc:
        log.warning("cannot save DHT contacts to %s: %s", path, exc)
