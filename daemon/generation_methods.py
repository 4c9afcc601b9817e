"""The generation_list JSON-RPC method: this node's recent generations with their routes.

Read-only (daemon.shards.recent): which peer serves which layer range for each running or
recent generation, its failovers and what failed, tokens, time to first token, tokens per
second. Behind the RPC cookie as every method; the parameters are bounded by their types.
"""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta

from daemon.api.generation import MAX_MODEL_CHARS
from daemon.api.jsonrpc import Dispatcher
from daemon.shards.recent import MAX_GENERATIONS, STATES, RecentGenerations

Limit = Annotated[
    int, Meta(ge=1, le=MAX_GENERATIONS, description=f"at most this many (1..{MAX_GENERATIONS})")
]
ModelName = Annotated[
    str, Meta(min_length=1, max_length=MAX_MODEL_CHARS, description="only this model's")
]
State = Annotated[str, Meta(pattern=f"^({'|'.join(STATES)})$", description=" | ".join(STATES))]


def register_generation_methods(dispatcher: Dispatcher, record: RecentGenerations) -> None:
    async def generation_list(
        limit: Limit = 16, model: ModelName | None = None, state: State | None = None
    ) -> dict[str, Any]:
        """This node's recent generations, newest first: route ([{peer, start, end}], live
        while running), failovers and what failed, tokens, ttft_s, tokens_per_s."""
        return {
            "generations": record.list(limit, model=model, state=state),
            "kept": len(record),
            "max_kept": record.cap,
        }

    dispatcher.register("generation_list", generation_list)
