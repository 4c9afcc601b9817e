"""`[sandbox]` of the node's config: the pool's size, each call's deadline and size bounds,
each worker's limits, the operator's allow-list of packages, and which isolation layers to
use (README "Policies and the sandbox")."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

import msgspec

from daemon.sandbox.package import ImportName
from daemon.sections import Problem, Section

Layer = Literal["namespaces", "landlock", "seccomp"]
ALL_LAYERS: tuple[Layer, ...] = ("namespaces", "landlock", "seccomp")
Path = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=r"^/")]
MiB = 1 << 20


class SandboxConfig(Section):
    """[sandbox]: where policies and Python blocks run."""

    max_workers: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8
    spare_workers: Annotated[int, msgspec.Meta(ge=0, le=64)] = 1  # started, not yet bound
    workers_per_policy: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    call_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 2.0
    load_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 20.0
    max_request_bytes: Annotated[int, msgspec.Meta(ge=1024, le=256 * MiB)] = 4 * MiB
    max_reply_bytes: Annotated[int, msgspec.Meta(ge=1024, le=256 * MiB)] = 4 * MiB
    max_calls_per_worker: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    # each worker's limits (rlimits; the scratch folder is a tmpfs of this size where the
    # namespaces layer is on); a worker past its CPU seconds is killed and replaced
    cpu_s: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 60
    memory_mib: Annotated[int, msgspec.Meta(ge=128, le=1 << 20)] = 1024
    open_files: Annotated[int, msgspec.Meta(ge=16, le=65536)] = 64
    file_size_mib: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] = 16
    processes: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 64
    scratch_mib: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] = 32
    # top-level import names a policy's manifest may require (nothing is installed at run time)
    allowed_packages: Annotated[tuple[ImportName, ...], msgspec.Meta(max_length=256)] = ()
    # hidden from workers besides the node's home (which the daemon always hides)
    hidden_paths: Annotated[tuple[Path, ...], msgspec.Meta(max_length=64)] = ()
    # readable by workers besides Python's own folders, /usr and /lib (Landlock's allow-list)
    read_paths: Annotated[tuple[Path, ...], msgspec.Meta(max_length=64)] = ()
    layers: tuple[Layer, ...] = ALL_LAYERS  # the layers to try (rlimits always apply)
    required_layers: tuple[Layer, ...] = ()  # refuse every call where one of them is off
    # run untrusted policies even where no isolation layer is on (they can then reach the
    # network, the node's home and its keys): off unless the operator knows
    run_unisolated: bool = False

    def problems(self) -> Iterator[Problem]:
        if self.spare_workers > self.max_workers:
            yield (
                "spare_workers",
                f"must be at most max_workers ({self.max_workers})",
                ("max_workers",),
            )
        if self.workers_per_policy > self.max_workers:
            why = f"must be at most max_workers ({self.max_workers})"
            yield "workers_per_policy", why, ("max_workers",)
        for layer in self.required_layers:
            if layer not in self.layers:
                why = f"names {layer}, which `layers` does not try"
                yield "required_layers", why, ("layers",)
