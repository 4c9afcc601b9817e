"""A paid generation's receipts held back while its step's checks run (the shard client's
`payments` while a verifier checks the generation): the receipt of a step found wrong is
never acknowledged, the others are checked and acknowledged as before, in the order they
came."""

from __future__ import annotations

from typing import Any


class DeferredPayments:
    """A paid generation's receipt checks, held until the step's checks are done."""

    def __init__(self, paid: Any) -> None:
        self.paid = paid
        self.held: list[tuple[str, str, Any, bytes, bytes]] = []
        self.withheld = 0

    def __getattr__(self, name: str) -> Any:  # job_id, max_price_per_unit, opened, ...
        return getattr(self.paid, name)

    def check(
        self, peer_id: str, session_id: str, receipt: bytes | None, given: bytes, got: bytes
    ) -> str | None:
        self.held.append((peer_id, session_id, receipt, given, got))
        return None

    def release(self, withhold: set[str]) -> tuple[str, str] | None:
        """Check and acknowledge the held receipts except those of `withhold`'s peers; the
        first refused one's (peer, reason), or None."""
        held, self.held = self.held, []
        refused: tuple[str, str] | None = None
        for peer, session, receipt, given, got in held:
            if peer in withhold:
                self.withheld += 1
                continue
            why = self.paid.check(peer, session, receipt, given, got)
            if why is not None and refused is None:
                refused = (peer, why)
        return refused
