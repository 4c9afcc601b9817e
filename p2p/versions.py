"""The gridmesh wire protocol's version, told in every hello (p2p.hello).

`MAJOR.MINOR`: a peer of another major version speaks protocols we cannot read, and is
refused with the reason (`node_peers` shows it); a peer of a newer minor version only added
what we may ignore (fields we do not know are skipped when decoding), and interoperates. A
hello without a version is from a node that predates this field: version 1.0.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

PROTOCOL_VERSION = "1.0"
VERSION_PATTERN = r"^[0-9]{1,4}\.[0-9]{1,4}$"
Version = Annotated[str, msgspec.Meta(pattern=VERSION_PATTERN, max_length=9)]


def parse(version: str) -> tuple[int, int]:
    """(major, minor) of a `MAJOR.MINOR` text; ValueError otherwise."""
    if not isinstance(version, str) or not re.fullmatch(VERSION_PATTERN, version):
        raise ValueError(f"not a MAJOR.MINOR version: {str(version)[:16]!r}")
    major, _, minor = version.partition(".")
    return int(major), int(minor)


def incompatibility(ours: str, theirs: str) -> str | None:
    """Why a peer speaking `theirs` cannot be served by us speaking `ours` (None: it can)."""
    if parse(ours)[0] == parse(theirs)[0]:
        return None
    return (
        f"speaks gridmesh protocol {theirs}, this node {ours}: incompatible major version "
        "(upgrade the older node)"
    )
