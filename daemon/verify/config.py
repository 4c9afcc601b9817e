"""`[verify]` of the node's config: whether this node, as a requester, spot-checks the providers
it routes through, and how (README "Verified work"; the rules are `policy.VerifyConfig`'s)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

import msgspec

from daemon.sections import Problem, Section
from daemon.verify.policy import VerifyConfig

Share = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=365 * 86_400)]


class VerifySection(Section):
    """[verify]: spot checks by redundancy, canaries, probation and exclusion."""

    enabled: bool = False
    rate: Share = 0.02
    probation_rate: Share = 0.10
    canary_rate: Share = 0.0
    audit_history: bool = False
    speculate: bool = True
    gather_s: Annotated[float, msgspec.Meta(ge=0.0, le=10.0)] = 0.0
    graduate_after: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 20
    exclude_after: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 2
    failure_window_s: Seconds = 3600.0
    backoff_s: Seconds = 600.0
    max_backoff_s: Seconds = 86_400.0

    def problems(self) -> Iterator[Problem]:
        if self.max_backoff_s < self.backoff_s:
            yield ("max_backoff_s", f"must be at least backoff_s ({self.backoff_s})", ())

    def policy(self) -> VerifyConfig:
        """The verifier's rules from this section."""
        return VerifyConfig(
            **{name: getattr(self, name) for name in VerifyConfig.__struct_fields__}
        )
