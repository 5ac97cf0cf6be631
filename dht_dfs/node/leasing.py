"""A node's two lease duties: renew what it pins, and collect what nobody leases.

- Renewal (``renew_all``): every ``Config.lease_renewal_interval`` (a third
  of ``lease_ttl``), each pin's chunks get a fresh lease of ``lease_ttl`` on
  every node holding them (``transfer.leases``), so two renewals can fail
  before any lease runs out. The first round runs as soon as the node has
  rejoined: after a long stop its pins are renewed at once.
- Collection (``collect``): chunks whose last lease ran out more than
  ``Config.lease_grace`` ago are deleted from this node's store. The first
  pass waits a renewal interval plus the grace after the node starts, so a
  node back from a long stop gives every pinner one round to renew before
  it deletes anything they still want.

Nothing here deletes a chunk on a peer's word: a chunk goes only when this
node's own record of its leases says they are over.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass

from dht_dfs.core.config import Config
from dht_dfs.core.errors import DhtfsError, InputError
from dht_dfs.core.refs import RootHash
from dht_dfs.node.pins import Pin, PinCatalogue
from dht_dfs.store.chunks import ChunkStore
from dht_dfs.transfer.network import Network, RenewalReport

log = logging.getLogger(__name__)

_MAX_COLLECT_INTERVAL = 600.0
"""Seconds between collection passes at most, however long the grace period."""


@dataclass
class LeaseTotals:
    """What renewal and collection did since the node started (for metrics)."""

    renewals: int = 0
    """Pins renewed (one per pin per round)."""
    renewal_failures: int = 0
    chunks_renewed: int = 0
    chunks_unleased: int = 0
    """Chunks of a pin that no holder said it holds, summed over renewals."""
    chunks_collected: int = 0
    bytes_collected: int = 0


class LeaseKeeper:
    """Renews one node's pins and collects its store's unleased chunks."""

    def __init__(
        self, network: Network, store: ChunkStore, pins: PinCatalogue, config: Config
    ) -> None:
        self._network = network
        self._store = store
        self._pins = pins
        self._config = config
        self.totals = LeaseTotals()

    def pin_count(self) -> int:
        return self._pins.count()

    @property
    def lease_seconds(self) -> int:
        return math.ceil(self._config.lease_ttl)

    async def renew(self, pin: Pin) -> Pin:
        """Renew one pin's leases now; the pin as recorded afterwards.

        Raises what the walk raises (the root cannot be found, say); the
        failure is recorded in the catalogue too.
        """
        try:
            report = await self._network.renew_leases(pin.root, self.lease_seconds)
        except DhtfsError as error:
            self.totals.renewal_failures += 1
            await asyncio.to_thread(self._pins.renewed, pin.root, error=str(error)[:500])
            raise
        return await self.record(pin.root, report)

    async def record(self, root: RootHash, report: RenewalReport) -> Pin:
        """Count a renewal and keep its outcome in the catalogue; the pin as kept."""
        self.totals.renewals += 1
        self.totals.chunks_renewed += report.leased
        self.totals.chunks_unleased += report.unleased_count
        if report.unleased_count:
            log.warning(
                "renewing %s: %d of %d chunk(s) are held by no node that answered",
                root,
                report.unleased_count,
                report.chunks,
            )
        await asyncio.to_thread(
            self._pins.renewed,
            root,
            renewed_at=time.time(),
            chunks=report.chunks,
            stored_bytes=report.bytes,
            leased=report.leased,
            unleased=report.unleased_count,
            min_holders=report.min_holders,
            error=None,
        )
        renewed = await asyncio.to_thread(self._pins.get, root)
        if renewed is None:
            raise InputError(f"{root} was unpinned while its leases were renewed")
        return renewed

    async def renew_all(self) -> int:
        """Renew every pin once; how many renewed without error."""
        done = 0
        for pin in await asyncio.to_thread(self._pins.all):
            try:
                await self.renew(pin)
            except DhtfsError as error:
                log.warning("renewing the leases of %s failed: %s", pin.root, error)
                continue
            done += 1
        return done

    async def collect(self) -> tuple[int, int]:
        """Delete the chunks whose leases ran out over a grace period ago; (chunks, bytes)."""
        before = time.time() - self._config.lease_grace
        chunks, size = await asyncio.to_thread(self._store.collect, before)
        self.totals.chunks_collected += chunks
        self.totals.bytes_collected += size
        return chunks, size

    # --- the loops a running node owns ---------------------------------------------------

    async def run_renewals(self, ready: asyncio.Event) -> None:
        """Renew every pin once the node is back in its network, then every interval."""
        await ready.wait()
        interval = self._config.lease_renewal_interval
        loop = asyncio.get_running_loop()
        while True:
            # A fixed rate, not a pause after each round: a slow round (a lost
            # root waits out its lookups) must not push every lease later.
            due = loop.time() + interval * random.uniform(0.9, 1.0)
            try:
                await self.renew_all()
            except Exception:
                # A bug must not end renewals (and so every pin) for good.
                log.exception("lease renewal round failed unexpectedly")
            late = loop.time() - due
            if late > 0:
                log.warning("a lease renewal round overran its interval by %.0f s", late)
            await asyncio.sleep(max(0.0, due - loop.time()))

    async def run_collection(self) -> None:
        """Collect unleased chunks, starting one renewal round plus the grace after start."""
        config = self._config
        await asyncio.sleep(config.lease_renewal_interval + config.lease_grace)
        interval = min(_MAX_COLLECT_INTERVAL, config.lease_grace / 2)
        while True:
            try:
                await self.collect()
            except Exception:
                log.exception("collecting unleased chunks failed")
            await asyncio.sleep(interval)


__all__ = ["LeaseKeeper", "LeaseTotals"]
