"""py-libp2p's loggers: they do not propagate, and warn on every odd stream."""

from __future__ import annotations

import logging


def quiet_libp2p_logs(level: int = logging.ERROR) -> None:
    """py-libp2p's loggers don't propagate and warn on every odd stream: give them our handler."""
    root = logging.getLogger("libp2p")
    root.handlers.clear()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)  # some libp2p modules set their own, lower levels
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
