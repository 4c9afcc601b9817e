"""Who may use the OpenAI-compatible endpoint and how much: API keys, request rates, token
quotas and concurrent requests ([serving] in the config, README "Serving").

`Access.admit` turns a request's Authorization header into a `Principal` (or raises
`AccessError`, which carries OpenAI's error shape and HTTP status); the endpoint then
`reserve`s the tokens a request may use (prompt + max_tokens x n) before it starts,
`settle`s what it really used when it ends, and `release`s it. Pure and synchronous, with an
injected clock: the endpoint calls it from one trio task at a time.

Limits, per key (and for anonymous use, from the anonymous_* keys):
- requests_per_minute: a token bucket holding a minute's requests (a client may send that
  many at once, as OpenAI's limits allow) and refilling at requests_per_minute / 60 per
  second; so in any T seconds a key starts at most requests_per_minute x (1 + T / 60).
- tokens_per_day: a rolling window in the same form, a bucket holding a day's tokens and
  refilling continuously at tokens_per_day / 86400 per second; in any T seconds a key uses at
  most tokens_per_day x (1 + T / 86400), and never more than a day's tokens at once. A
  request reserves its most up front, so a quota is never overrun by requests in flight;
  the part it did not use goes back into the bucket when it settles.
- max_concurrent: requests admitted and not yet released.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daemon.serving.settings import ServingConfig

DAY_S = 86400.0
MAX_HEADER_KEY_CHARS = 1024  # a longer "key" is not one of ours: not even hashed


class AccessError(Exception):
    """A refused request, as OpenAI answers it: HTTP `status`, the error's `type`, `code`
    and `message`; `retry_after` (seconds) for a refusal that passes with time (the
    endpoint sends it as the Retry-After header, which the openai client honours)."""

    def __init__(
        self,
        status: int,
        type: str,
        code: str | None,
        message: str,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
        error = {"message": self.message, "type": self.type, "param": None, "code": self.code}
        return {"error": error}


def _missing() -> AccessError:
    return AccessError(
        401,
        "invalid_request_error",
        None,  # OpenAI's answer to a request without a key has no code
        "You didn't provide an API key. You need to provide your API key in an Authorization "
        "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). This endpoint's keys "
        "are in its node's config ([serving] api_keys; `gridmesh serve keygen` makes one).",
    )


def _masked(key: str) -> str:
    """A presented key as OpenAI shows a wrong one: enough to recognise, not to use."""
    if len(key) < 12:
        return "*" * len(key)
    return f"{key[:4]}{'*' * min(len(key) - 8, 24)}{key[-4:]}"


def _incorrect(key: str) -> AccessError:
    return AccessError(
        401,
        "invalid_request_error",
        "invalid_api_key",
        f"Incorrect API key provided: {_masked(key)}. Ask this node's operator for a key "
        "([serving] api_keys in its config).",
    )


def _seconds(wait: float) -> str:
    """A wait as OpenAI words it: 250ms, 1.5s, 1m8.7s, 2h3m4s."""
    if wait < 1:
        return f"{max(1, math.ceil(wait * 1000))}ms"
    if wait < 60:
        return f"{math.ceil(wait * 10) / 10:g}s"
    if wait < 3600:
        minutes, rest = divmod(math.ceil(wait * 10) / 10, 60)
        return f"{int(minutes)}m{round(rest, 1):g}s"
    hours, rest = divmod(math.ceil(wait), 3600)
    return f"{hours}h{rest // 60}m{rest % 60}s"


class Bucket:
    """A token bucket: holds up to `capacity`, refills at `per_s`. Tokens may be taken for
    good (`take`) or held (`hold`) until `settle` says how many of them were used; the level
    refills only up to the capacity less what is held, so that giving back the unused part
    of a hold never makes more available than a bucket charged only with what was used
    (in any T seconds, the tokens used are at most capacity + T x per_s). The level goes
    below zero when more was used than held: a debt that refilling pays first."""

    def __init__(self, capacity: float, per_s: float, now: float) -> None:
        self.capacity = capacity
        self.per_s = per_s
        self.level = capacity
        self.held = 0.0
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            room = self.capacity - self.held
            if self.level < room:
                self.level = min(room, self.level + (now - self.updated) * self.per_s)
            self.updated = now

    def _wait(self, amount: float) -> float:
        """Seconds until `amount` could be taken at the earliest (inf: more than the
        bucket holds; held tokens coming back sooner shorten it)."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, amount - self.level) / self.per_s

    def take(self, amount: float, now: float, *, hold: bool = False) -> float:
        """Take (or hold) `amount` and return 0.0, or take nothing and return the seconds
        until it could be taken (inf when it is more than the bucket holds)."""
        self._refill(now)
        if amount <= self.level:
            self.level -= amount
            if hold:
                self.held += amount
            return 0.0
        return self._wait(amount)

    def settle(self, held: float, used: float, now: float) -> None:
        """End a hold of `held` of which `used` was used: the rest goes back."""
        self._refill(now)
        self.held -= held
        self.level += held - used


@dataclass(frozen=True)
class Limits:
    """One principal's limits; None: no limit."""

    requests_per_minute: int | None = None
    tokens_per_day: int | None = None
    max_concurrent: int | None = None


class _Account:
    """The state one key (or anonymous use) shares across its requests."""

    def __init__(self, name: str, limits: Limits, now: float) -> None:
        self.name = name
        self.limits = limits
        rpm, tpd = limits.requests_per_minute, limits.tokens_per_day
        self.requests = Bucket(rpm, rpm / 60.0, now) if rpm else None
        self.tokens = Bucket(tpd, tpd / DAY_S, now) if tpd else None
        self.in_flight = 0


class Principal:
    """One admitted request of a key (`name`) or of anonymous use (`anonymous`): counted as
    in flight until `release()` (or the end of a `with` block)."""

    def __init__(self, account: _Account, clock: Callable[[], float], *, anonymous: bool):
        self.name = account.name
        self.anonymous = anonymous
        self._account = account
        self._clock = clock
        self.reserved = 0  # tokens reserved and not yet settled
        self.released = False

    @property
    def limits(self) -> Limits:
        return self._account.limits

    def reserve(self, tokens: int) -> None:
        """Reserve `tokens` (prompt + max_tokens x n) before the request runs; 429
        insufficient_quota when the key's quota has not that many left."""
        if tokens < 0:
            raise ValueError(f"cannot reserve {tokens} tokens")
        bucket = self._account.tokens
        if bucket is not None:
            wait = bucket.take(tokens, self._clock(), hold=True)
            if wait:
                raise self._over_quota(tokens, bucket, wait)
        self.reserved += tokens

    def settle(self, reserved: int, used: int) -> None:
        """End a reservation of `reserved` tokens of which `used` were used: the rest goes
        back into the quota (more used than reserved is charged too)."""
        if not 0 <= reserved <= self.reserved:
            raise ValueError(f"settling {reserved} tokens of {self.reserved} reserved")
        if used < 0:
            raise ValueError(f"used {used} tokens")
        self.reserved -= reserved
        if self._account.tokens is not None:
            self._account.tokens.settle(reserved, used, self._clock())

    def release(self) -> None:
        """The request is over (idempotent). Tokens still reserved are charged as used:
        settle first to give back what was not used."""
        if not self.released:
            self.released = True
            self._account.in_flight -= 1
            if self.reserved:
                self.settle(self.reserved, self.reserved)

    def __enter__(self) -> Principal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _over_quota(self, tokens: int, bucket: Bucket, wait: float) -> AccessError:
        quota = self._account.limits.tokens_per_day
        who = "anonymous use" if self.anonymous else f"key {self.name!r}"
        if math.isinf(wait):
            message = (
                f"You exceeded your current quota: this request needs {tokens} tokens (prompt "
                f"+ max_tokens x n), more than the {quota} tokens per day of {who}. Lower "
                "max_tokens or n."
            )
            return AccessError(429, "insufficient_quota", "insufficient_quota", message)
        left = max(0, math.floor(bucket.level))
        message = (
            f"You exceeded your current quota: {who} has {left} of its {quota} tokens per "
            f"day left and this request needs {tokens} (prompt + max_tokens x n). Please try "
            f"again in {_seconds(wait)}, or lower max_tokens or n."
        )
        return AccessError(
            429, "insufficient_quota", "insufficient_quota", message, retry_after=wait
        )


class Access:
    """The endpoint's gate: API keys from `settings` (their sha256 digests only: a `key`
    given in plaintext is hashed here), each with its limits."""

    def __init__(
        self, settings: ServingConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.clock = clock
        now = clock()
        self._keys: list[tuple[bytes, _Account]] = []
        for entry in settings.api_keys or ():
            limits = Limits(
                requests_per_minute=entry.requests_per_minute,
                tokens_per_day=entry.tokens_per_day,
                max_concurrent=entry.max_concurrent or settings.max_concurrent_per_key,
            )
            self._keys.append((entry.digest(), _Account(entry.name, limits, now)))
        anonymous = Limits(
            requests_per_minute=settings.anonymous_requests_per_minute,
            tokens_per_day=settings.anonymous_tokens_per_day,
            max_concurrent=settings.anonymous_max_concurrent,
        )
        self._anonymous = _Account("anonymous", anonymous, now)

    @property
    def keys_required(self) -> bool:
        """Whether every request must present a key ([serving] host beyond loopback, or
        require_keys)."""
        return self.settings.keys_required

    def admit(self, authorization: str | None, *, loopback: bool) -> Principal:
        """The principal of a request with this Authorization header (None: absent), from a
        loopback client or not. Anonymous use needs all of: keys not required, a loopback
        client, and no key presented (or no keys configured at all, where any header is
        ignored, as servers without keys do for the openai client's mandatory api_key).
        401 for a missing or wrong key; 429 over a rate or concurrency limit."""
        key = _bearer(authorization)
        anonymous_ok = loopback and not self.keys_required
        if anonymous_ok and (key is None or not self._keys):
            return self._start(self._anonymous, anonymous=True)
        if key is None:
            raise _missing()
        account = self._lookup(key)
        if account is None:
            raise _incorrect(key)
        return self._start(account, anonymous=False)

    def _lookup(self, key: str) -> _Account | None:
        """The account whose digest the key's is, comparing with every digest in constant
        time (the time taken says nothing about how close a guess was)."""
        if len(key) > MAX_HEADER_KEY_CHARS:
            return None
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        found = None
        for stored, account in self._keys:
            if hmac.compare_digest(stored, digest):
                found = account
        return found

    def _start(self, account: _Account, *, anonymous: bool) -> Principal:
        who = "anonymous use" if anonymous else f"key {account.name!r}"
        most = account.limits.max_concurrent
        if most is not None and account.in_flight >= most:
            message = (
                f"Too many concurrent requests for {who}: limit {most}. Please try again "
                "when one of them has finished."
            )
            raise AccessError(429, "requests", "rate_limit_exceeded", message, retry_after=1.0)
        if account.requests is not None:
            wait = account.requests.take(1, self.clock())
            if wait:
                rpm = account.limits.requests_per_minute
                used = rpm - max(0, math.floor(account.requests.level))
                message = (
                    f"Rate limit reached for {who} on requests per min (RPM): Limit {rpm}, "
                    f"Used {used}, Requested 1. Please try again in {_seconds(wait)}."
                )
                raise AccessError(429, "requests", "rate_limit_exceeded", message, retry_after=wait)
        account.in_flight += 1
        return Principal(account, self.clock, anonymous=anonymous)


def _bearer(authorization: str | None) -> str | None:
    """The key of `Authorization: Bearer <key>`; None when absent, empty or not Bearer."""
    if authorization is None:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None
