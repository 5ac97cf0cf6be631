"""Fixtures for the unit tests that run over the in-memory network."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from dht_dfs.core.config import Config, KiB
from tests.support.memnet import MemNet

MEMNET_CONFIG = Config(
    chunk_size=4 * KiB,
    manifest_fanout=4,
    replicas=3,
    ksize=20,
    transfer_window=4,
    workers=2,
    fsync=False,
    request_timeout=0.5,
    repair_interval=0,
    scrub_interval=0,
).validate()
"""Small chunks (a 40 KB file has a tree of manifest nodes), a short timeout."""


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2, thread_name_prefix="memnet-io") as pool:
        yield pool


@pytest.fixture
def net() -> Iterator[MemNet]:
    memnet = MemNet(MEMNET_CONFIG)
    try:
        yield memnet
    finally:
        memnet.close()
