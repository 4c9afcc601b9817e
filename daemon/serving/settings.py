"""[serving]: the OpenAI-compatible endpoint's settings (README "Serving"): whether it runs,
where it listens, its API keys and their limits, and local tokenizer directories.

A section of the settings tree (daemon.settings.Config.serving), kept beside the code it
configures.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterator
from typing import Annotated

import msgspec

from daemon.sections import Port, Problem, Section

MIN_KEY_CHARS = 20  # a plaintext `key` shorter than this is refused (`gridmesh serve keygen`)

Name = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$",
        description="a key name (1..64 letters, digits, _ . @ -, starting with a letter or digit)",
    ),
]
Sha256 = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[0-9a-fA-F]{64}$",
        description="a sha256 digest (64 hex digits; `gridmesh serve keygen` prints one)",
    ),
]
Secret = Annotated[str, msgspec.Meta(max_length=512)]
PerMinute = Annotated[int, msgspec.Meta(ge=1, le=10_000_000)]
PerDay = Annotated[int, msgspec.Meta(ge=1, le=(1 << 53))]
Concurrent = Annotated[int, msgspec.Meta(ge=1, le=65536)]


class ApiKey(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One `[[serving.api_keys]]` entry. Give `key_sha256` (the digest of the key, what
    `gridmesh serve keygen` prints) rather than `key` (the key itself, hashed when the daemon
    starts): a config file is copied, backed up and shown around, and a digest in it lets no
    one call the endpoint. sha256 is enough for a random key of 32 bytes (a slow password
    hash would only cost time on every request); a short `key` is refused. A limit that is
    unset is no limit."""

    name: Name
    key_sha256: Sha256 | None = None
    key: Secret | None = None
    requests_per_minute: PerMinute | None = None
    tokens_per_day: PerDay | None = None
    max_concurrent: Concurrent | None = None

    def digest(self) -> bytes:
        """The sha256 of the key (32 bytes)."""
        if self.key_sha256 is not None:
            return bytes.fromhex(self.key_sha256)
        return hashlib.sha256((self.key or "").encode()).digest()


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the endpoint on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_error(host: str) -> str | None:
    """Why `host` cannot be listened on, or None."""
    if host == "localhost":
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return (
            f"{host!r} is not an IP address to listen on (use 127.0.0.1, the default; ::1; "
            "0.0.0.0 for every interface; or one address of this machine)"
        )
    return None


class ServingConfig(Section):
    """[serving]: the OpenAI-compatible HTTP endpoint (`gridmesh serve --openai`). Off by
    default; on loopback unless `host` says otherwise, and then only with API keys."""

    openai: bool = False
    host: Annotated[str, msgspec.Meta(min_length=1, max_length=253)] = "127.0.0.1"
    port: Port = 0
    # keys even on loopback (a client on this machine must present one too)
    require_keys: bool = False
    # unset: no keys (anonymous use on loopback only)
    api_keys: Annotated[tuple[ApiKey, ...], msgspec.Meta(max_length=4096)] | None = None
    # model id -> a local checkpoint directory with its tokenizer files, for a model this
    # node holds no shard of (one it serves uses its shard's directory)
    model_dirs: Annotated[dict[str, str], msgspec.Meta(max_length=1024)] | None = None
    # requests waiting for a place in a generation batch; beyond it: 429
    max_queue: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 256
    # one request's body (a 10 MiB prompt is refused with 413)
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1 << 30)] = 4 * 1024 * 1024
    # the concurrent requests of a key that sets no max_concurrent of its own (unset: none)
    max_concurrent_per_key: Concurrent | None = None
    # limits of anonymous use (loopback, no keys required and none presented); unset: none
    anonymous_requests_per_minute: PerMinute | None = None
    anonymous_tokens_per_day: PerDay | None = None
    anonymous_max_concurrent: Concurrent | None = None

    @property
    def keys_required(self) -> bool:
        """Whether every request must present a valid API key."""
        return self.require_keys or not is_loopback(self.host)

    def problems(self) -> Iterator[Problem]:
        if problem := host_error(self.host):
            yield "host", problem, ()
        keys = self.api_keys or ()
        if not keys and not is_loopback(self.host):
            why = (
                f"is {self.host!r}, beyond loopback: set api_keys too (anyone who can reach "
                "the port could use this node; `gridmesh serve keygen` makes a key), or "
                "listen on 127.0.0.1"
            )
            yield "host", why, ("api_keys",)
        elif not keys and self.require_keys:
            why = "is true but api_keys is empty: add a key (`gridmesh serve keygen`)"
            yield "require_keys", why, ("api_keys",)
        seen: dict[str, int] = {}
        digests: dict[bytes, int] = {}
        for index, entry in enumerate(keys):
            where = f"api_keys[{index}]"
            if entry.name in seen:
                why = (
                    f"{entry.name!r} is also api_keys[{seen[entry.name]}]'s name: names are unique"
                )
                yield f"{where}.name", why, ()
            seen.setdefault(entry.name, index)
            if (entry.key is None) == (entry.key_sha256 is None):
                why = "needs exactly one of key_sha256 (preferred: `gridmesh serve keygen`) or key"
                yield where, why, ()
                continue
            if entry.key is not None and len(entry.key) < MIN_KEY_CHARS:
                why = (
                    f"is {len(entry.key)} characters: a key has at least {MIN_KEY_CHARS} "
                    "(`gridmesh serve keygen` makes a random one)"
                )
                yield f"{where}.key", why, ()
            digest = entry.digest()
            if digest in digests:
                why = f"is the same key as api_keys[{digests[digest]}]'s"
                yield f"{where}.{'key' if entry.key else 'key_sha256'}", why, ()
            digests.setdefault(digest, index)
        for model, path in (self.model_dirs or {}).items():
            if not model or not path:
                yield f"model_dirs.{model or '(empty)'}", "needs a model id and a directory", ()
