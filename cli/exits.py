"""Exit codes, and the one table from an error to the code a command exits with.

Every command ends through ``exit_code``: a mistyped reference and a bad
setting are usage errors whichever command meets them.
"""

from __future__ import annotations

from dht_dfs.core.errors import ConfigError, DhtfsError, InputError, InvalidReferenceError
from dht_dfs.node.results import HealthReport

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
"""Bad usage or input: fix the command line, not the network."""
EXIT_DEGRADED = 3
"""check/repair: some chunk has fewer than the wanted copies (a result, not an error)."""
EXIT_LOST = 4
"""check/repair: some chunk has no live copy at all (lost unless a holder comes back)."""
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
"""stdout's reader went away (as a shell reports a process ended by SIGPIPE)."""

EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (KeyboardInterrupt, EXIT_INTERRUPTED),
    (InputError, EXIT_USAGE),
    (ConfigError, EXIT_USAGE),
    (InvalidReferenceError, EXIT_USAGE),
    (DhtfsError, EXIT_ERROR),
)
"""First match wins; anything else (an OSError, a bug) is ``EXIT_ERROR``."""


def health_exit_code(report: HealthReport) -> int:
    """What check or repair exits with: lost beats degraded beats OK."""
    if report.lost_count:
        return EXIT_LOST
    return EXIT_OK if report.ok else EXIT_DEGRADED


def exit_code(error: BaseException) -> int:
    for kind, code in EXIT_CODES:
        if isinstance(error, kind):
            return code
    return EXIT_ERROR
