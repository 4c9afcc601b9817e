"""The registry limits' config keys: parsed, checked, documented in configs/node.toml."""

from __future__ import annotations

import tomllib

import pytest

from daemon import config
from registry.replica import AUTHOR_MAX_BYTES, AUTHOR_MAX_ENTRIES, MAX_ENTRY_BYTES


def test_registry_limit_keys_parse_and_default_to_the_replicas_defaults():
    defaults = config.parse({}).registry
    assert (defaults.max_entry_bytes, defaults.author_max_entries, defaults.author_max_bytes) == (
        MAX_ENTRY_BYTES,
        AUTHOR_MAX_ENTRIES,
        AUTHOR_MAX_BYTES,
    )
    raw = {"max_entry_bytes": 8192, "author_max_entries": 50, "author_max_bytes": 1 << 20}
    parsed = config.parse({"registry": raw}).registry
    assert (parsed.max_entry_bytes, parsed.author_max_entries, parsed.author_max_bytes) == (
        8192,
        50,
        1 << 20,
    )


@pytest.mark.parametrize(
    "raw",
    [
        {"max_entry_bytes": 10},
        {"max_entry_bytes": 1 << 30},
        {"author_max_entries": 0},
        {"author_max_bytes": 1000},
        {"author_max_bytes": "4 MiB"},
    ],
)
def test_bad_registry_limits_are_refused(raw):
    with pytest.raises(config.ConfigError, match="registry"):
        config.parse({"registry": raw})


def test_node_toml_documents_the_limits_with_their_defaults():
    documented = tomllib.loads(config.template_text())["registry"]
    defaults = config.RegistryConfig()
    for key in ("max_entry_bytes", "author_max_entries", "author_max_bytes"):
        assert documented[key] == getattr(defaults, key), key
