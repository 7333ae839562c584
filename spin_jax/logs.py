"""Logging set-up for the command line: the `spin_jax` logger to stderr, on process 0 only."""

from __future__ import annotations

import logging
import sys


class _FirstProcessOnly(logging.Filter):
    """Drops INFO records on every process but the first (warnings and errors pass everywhere).
    JAX is asked for the process index only if something already imported it."""

    def filter(self, record: logging.LogRecord) -> bool:
        jax = sys.modules.get("jax")
        return record.levelno >= logging.WARNING or jax is None or jax.process_index() == 0


def configure(level: int = logging.INFO) -> None:
    """Send `spin_jax.*` records to stderr as `[spin-jax] message` (idempotent)."""
    logger = logging.getLogger("spin_jax")
    if any(getattr(h, "_spin_jax", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[spin-jax] %(message)s"))
    handler.addFilter(_FirstProcessOnly())
    handler._spin_jax = True
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
