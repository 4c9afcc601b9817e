"""How the daemon runs one vDAG step on one instance of its block (the executor's `Runner`).

Two kinds of block:
- a **Python block** (daemon.vdags.pyblocks), announced by the daemons serving it
  (daemon.vdags.protocol): each such daemon is an instance; the step is one request over the
  block protocol (or a direct call when the instance is this daemon);
- a **model** (a model id that shard servers announce, a `blocks` spec with a ``model``, or a
  server's announcement key): the step is a generation through the model's shard chain
  (daemon.shards), the route chosen and failed hops recovered by the shard client. Its one
  instance is ``"chain"``. Input: text (a string, or ``{"text"|"prompt": ...}``) or token
  ids (a list, or ``{"token_ids": [...]}``); output ``{"text", "token_ids"}``; the node's
  ``modelParameters`` give ``max_tokens`` (32), ``temperature`` (0: greedy) and ``seed``.
"""

from __future__ import annotations

import collections
from typing import Any

import trio

from daemon.api.generation import MAX_NEW_TOKENS, MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS
from daemon.shards.jobs import ShardServiceError
from daemon.vdags.executor import AttemptFailed, RunContext
from daemon.vdags.protocol import BlockCall, BlockReply, ProtocolError, python_instances
from daemon.vdags.streams import BlockStreams
from p2p.network import NetworkError
from registry.blocks import announcements
from scheduler.vdag import PlanStep

CHAIN = "chain"
# failures of the instance, not of the block's code: another instance may do
RETRYABLE = frozenset({"timeout", "crashed", "too_large", "busy", "unknown_block", "closed"})


def remaining_s() -> float:
    left = trio.current_effective_deadline() - trio.current_time()
    return 3600.0 if left == float("inf") else max(left, 0.001)


class DaemonRunner:
    """Runs steps on this network's servers. `local` answers calls to this daemon's own
    Python blocks (libp2p does not dial itself)."""

    def __init__(self, peer_id: str, net: Any, replica: Any, shards: Any, local: Any) -> None:
        self.peer_id = peer_id
        self.net = net
        self.replica = replica
        self.shards = shards
        self.local = local
        self.reported: dict[tuple[str, str], int] = {}  # (block, peer) -> load it reported
        self.inflight: collections.Counter[tuple[str, str]] = collections.Counter()
        self._seen: tuple[Any, dict[str, tuple[list[str], str | None]]] = (None, {})
        self.streams = BlockStreams(net, lambda reason: local.metrics.reject("vdag", reason))

    # -- which instances ------------------------------------------------------------------

    def _stamp(self) -> tuple[Any, int]:
        # the replica's count of changes to its entries (no public name for it yet)
        return self.replica.changes, len(self.replica.entries)

    def _lookup(self, block_id: str) -> tuple[list[str], str | None]:
        """(Python-block instances, model) of `block_id`, read again only after the registry
        changed: each step would otherwise scan every entry."""
        stamp = self._stamp()
        if self._seen[0] != stamp or stamp[0] is None:
            self._seen = (stamp, {})
        found = self._seen[1].get(block_id)
        if found is None:
            peers = [
                i.peer_id
                for i in python_instances(self.replica.entries.of_kind("blocks"), block_id)
            ]
            found = (peers, None if peers else self._model_of(block_id))
            if len(self._seen[1]) >= 1024:
                self._seen[1].clear()
            self._seen[1][block_id] = found
        return found

    def _model_of(self, block_id: str) -> str | None:
        if self.shards.announced(block_id):
            return block_id
        entry = self.replica.entries.get(("blocks", block_id))
        value = entry.value if entry is not None else None
        model = value.get("model") if isinstance(value, dict) else None
        if isinstance(model, str) and self.shards.announced(model):
            return model
        return None

    def model_of(self, block_id: str) -> str | None:
        """The model whose shard chain `block_id` names, or None."""
        return self._lookup(block_id)[1]

    def candidates(self, step: PlanStep) -> list[str]:
        peers, model = self._lookup(step.block_id or "")
        if peers:
            return list(peers)
        return [CHAIN] if model is not None else []

    def served_blocks(self) -> list[str]:
        """Python blocks some daemon announces serving, and models that servers announce."""
        found: set[str] = set()
        for entry in self.replica.entries.of_kind("blocks"):
            params = entry.value.get("parameters") if isinstance(entry.value, dict) else None
            if entry.kind == "blocks" and isinstance(params, dict):
                block = params.get("instanceOf")
                if isinstance(block, str) and self._lookup(block)[0]:
                    found.add(block)
        for model in {a.model for a in announcements(list(self.replica.entries.of_kind("blocks")))}:
            if self._lookup(model)[1] is not None:
                found.add(model)
        return sorted(found)

    def load(self, step: PlanStep, instance: str) -> float:
        key = (step.block_id or "", instance)
        return float(self.reported.get(key, 0) + self.inflight[key])

    # -- running ----------------------------------------------------------------------------

    async def call(self, step: PlanStep, instance: str, value: Any, ctx: RunContext) -> Any:
        if instance == CHAIN:
            return await self._generate(step, value)
        key = (step.block_id or "", instance)
        self.inflight[key] += 1
        try:
            reply = await self._block_call(step, instance, value, ctx)
        finally:
            self.inflight[key] -= 1
        self.reported[key] = reply.load
        if not reply.ok:
            raise AttemptFailed(
                f"block {step.block_id!r} on {instance[-12:]}: {reply.message}",
                retryable=reply.kind in RETRYABLE,
                reason=reply.kind or "failed",
            )
        return reply.output

    async def _block_call(
        self, step: PlanStep, instance: str, value: Any, ctx: RunContext
    ) -> BlockReply:
        call = BlockCall(
            block=step.block_id or "",
            input=value,
            timeout_s=min(remaining_s(), 3600.0),
            context=ctx.for_step(step),
        )
        if instance == self.peer_id:
            return await self.local.run_block(call)
        try:
            return await self.streams.call(instance, call)
        except NetworkError as exc:
            raise AttemptFailed(
                f"block {step.block_id!r} on {instance[-12:]} cannot be reached: {exc}",
                retryable=True,
                reason="unreachable",
            ) from None
        except ProtocolError as exc:
            raise AttemptFailed(
                f"block {step.block_id!r} on {instance[-12:]} answered badly: {exc}",
                retryable=True,
                reason="bad_reply",
            ) from None

    async def _generate(self, step: PlanStep, value: Any) -> dict[str, Any]:
        model = self.model_of(step.block_id or "")
        if model is None:
            raise AttemptFailed(
                f"no server announces model {step.block_id!r} now",
                retryable=False,
                reason="no_instance",
            )
        params = step.model_parameters
        max_tokens = _int(params, "max_tokens", 32, 1, MAX_NEW_TOKENS)
        temperature = params.get("temperature", 0.0)
        seed = params.get("seed")
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
            raise AttemptFailed("modelParameters.temperature must be a number", retryable=False)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise AttemptFailed("modelParameters.seed must be an integer", retryable=False)
        ids = await self._prompt_ids(model, value)
        try:
            job = self.shards.new_job("vdag")
        except ShardServiceError as exc:
            raise AttemptFailed(f"model {model}: {exc}", retryable=False, reason="busy") from None
        try:
            with job.scope:
                await self.shards.generate(
                    job, model, ids, max_tokens, temperature=float(temperature), seed=seed
                )
        finally:
            self.shards.drop_job(job.id)
        if job.error:
            raise AttemptFailed(f"model {model}: {job.error}", retryable=False, reason="model")
        return {"text": job.text, "token_ids": list(job.tokens)}

    async def _prompt_ids(self, model: str, value: Any) -> list[int]:
        if isinstance(value, dict):
            for name in ("token_ids", "text", "prompt"):
                if name in value:
                    value = value[name]
                    break
        if (
            isinstance(value, list)
            and 0 < len(value) <= MAX_PROMPT_TOKENS
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
        ):
            return list(value)
        if isinstance(value, str) and 0 < len(value) <= MAX_PROMPT_CHARS:
            try:
                return await self.shards.encode_prompt(model, value)
            except ShardServiceError as exc:
                raise AttemptFailed(f"model {model}: {exc}", retryable=False) from None
        raise AttemptFailed(
            "a model node takes text (a string, or {text}) or token ids (a list of ints, or "
            f"{{token_ids}}), at most {MAX_PROMPT_TOKENS} tokens; got {type(value).__name__}",
            retryable=False,
            reason="input",
        )


def _int(params: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise AttemptFailed(
            f"modelParameters.{name} must be an integer in {low}..{high}",
            retryable=False,
            reason="input",
        )
    return value
