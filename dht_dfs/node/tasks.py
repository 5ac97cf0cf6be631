"""Ending tasks a node owns without losing the caller's own cancellation.

``contextlib.suppress(asyncio.CancelledError)`` around ``await task`` also
swallows a cancellation aimed at the awaiting task itself, so a caller that
cancels ``Node.stop`` would see it return normally. ``asyncio.wait`` never
raises what the awaited tasks raised, and still raises when the awaiting
task is cancelled.

Imports nothing from the rest of the package.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until each has ended; log what failed otherwise."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    for task in pending:
        # Retrieved here, so asyncio does not warn "exception never retrieved".
        if not task.cancelled() and (error := task.exception()) is not None:
            log.debug("task %s ended with %r while cancelled", task.get_name(), error)
