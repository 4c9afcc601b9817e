"""The typed forms of the kinds' values (msgspec Structs derived from the schemas): every
value the schema accepts has one, including the AIOS block and vDAG formats."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import msgspec
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.specs import substitute_self
from registry import kinds, schemas

SAMPLES = Path(__file__).resolve().parents[2] / "configs" / "samples"
PEER = "12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp"
VDAG: dict[str, Any] = {
    "vdagName": "llm-analyzer",
    "vdagVersion": {"version": "0.0.6", "release-tag": "stable"},
    "nodes": [
        {"nodeLabel": "gemma", "nodeType": "block", "manualBlockId": "gemma-block"},
        {"nodeLabel": "sub", "nodeType": "vdag", "vdagURI": "summarizer:1.0-stable"},
    ],
    "graph": {
        "input": [{"nodeLabel": "gemma", "inputNames": ["input_0"]}],
        "output": ["sub"],
        "connections": [{"from": "gemma", "to": "sub"}],
    },
}


def test_samples_and_aios_formats_have_typed_forms():
    for name in ("cluster", "component", "block"):
        doc = substitute_self(yaml.safe_load((SAMPLES / f"{name}.yaml").read_text()), PEER)
        schemas.validate_value(doc["kind"], doc["key"], doc["value"])
        typed = kinds.typed_value(doc["kind"], doc["value"])
        assert isinstance(typed, msgspec.Struct)
    block = kinds.typed_value(
        "blocks",
        substitute_self(yaml.safe_load((SAMPLES / "block.yaml").read_text())["value"], PEER),
    )
    assert (block.blockId, block.minInstances, block.layers) == ("llama-shard-0", 1, [0, 16])
    assert block.policyRulesSpec[0].policyRuleURI == "least-loaded:0.1.0"
    vdag = kinds.typed_value("vdags", VDAG)
    assert vdag.vdagVersion.release_tag == "stable"  # "release-tag" on the wire
    assert vdag.graph.connections[0].from_ == "gemma"  # "from" on the wire
    assert vdag.graph.output == ["sub"]
    assert msgspec.to_builtins(vdag)["vdagVersion"] == VDAG["vdagVersion"]


def test_announced_parameters_are_typed_and_other_parameters_kept_out():
    value = {
        "blockId": "b",
        "blockComponentURI": "m",
        "parameters": {"ms_per_layer": 2, "cache_tokens_free": 7, "gpu": "H100"},
    }
    typed = kinds.typed_value("blocks", value)
    assert typed.parameters.ms_per_layer == 2.0 and typed.parameters.cache_tokens_free == 7
    for bad in ({"ms_per_layer": "fast"}, {"cache_tokens_free": -1}, {"host": 3}):
        try:
            kinds.typed_value("blocks", {**value, "parameters": bad})
        except kinds.TypedValueError:
            continue
        raise AssertionError(f"{bad} has a typed form")


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(schemas.KINDS), values)
def test_random_values_have_a_typed_form_or_raise_typed_value_error(kind, value):
    with contextlib.suppress(kinds.TypedValueError):
        kinds.typed_value(kind, value)
    # whatever the schema accepts has a typed form (validate_value converts it)
    with contextlib.suppress(schemas.SchemaError):
        schemas.validate_value(kind, "k", value)
        kinds.typed_value(kind, value)
