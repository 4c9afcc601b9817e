"""Job specs: gridmesh's own fields and OpenGrid's job.yaml, with the field named in every
refusal."""

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from daemon.payments.job_spec import JobSpecError, parse_job_spec, usd_to_units

OPENGRID = """
apiVersion: opengrid/v1
kind: Job
name: summarise
resources: {gpu: 1, vram_gb: 24, cpu_cores: 4}
billing:
  max_price_per_hour_usd: 2.5
  deadline_s: 5400
  payment: stream
"""


def test_opengrid_job_yaml_is_accepted_and_its_hourly_price_becomes_the_deposit():
    spec = parse_job_spec(yaml.safe_load(OPENGRID), default_max_price_per_unit=7)
    assert spec.name == "summarise"
    assert spec.deadline_s == 5400
    assert spec.deposit == 3_750_000  # 2.5 USD/h x 1.5 h, 6 decimals
    assert spec.max_price_per_unit == 7  # from the config's default
    assert spec.provider_filter() == "gpus >= 1 AND vram_gb >= 24 AND cpu_cores >= 4"


def test_gridmesh_fields():
    spec = parse_job_spec(
        {
            "name": "j",
            "model": "tiny",
            "billing": {"deposit": 1_000_000, "max_price_per_unit": 3, "deadline_s": 600},
        }
    )
    assert (spec.deposit, spec.max_price_per_unit, spec.deadline_s, spec.model) == (
        1_000_000,
        3,
        600,
        "tiny",
    )
    assert spec.provider_filter() == ""


def test_usd_never_rounds_up():
    assert usd_to_units(0.1) == 100_000
    assert usd_to_units(1e-7) == 0
    assert usd_to_units(0.0000019) == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"image": "ubuntu"}, "`image` does not apply"),
        ({"entrypoint": ["run"]}, "`entrypoint` does not apply"),
        ({"inputs": []}, "`inputs` does not apply"),
        ({"outputs": []}, "`outputs` does not apply"),
        ({"billing": {"deadline_s": 60, "deposit": 5, "verifier": "quorum"}}, "billing.verifier"),
        ({"billing": {"deadline_s": 60, "deposit": 5, "redundancy": 3}}, "billing.redundancy"),
        ({"billing": {"deadline_s": 60, "deposit": 5, "payment": "milestone"}}, "billing.payment"),
        ({"kind": "Pod"}, "`kind` must be Job"),
        ({"colour": "red"}, "unknown field colour"),
        ({"resources": {"gpu": 1, "tpu": 2}}, "unknown field resources.tpu"),
        ({"resources": {"gpu": 1.5}}, "resources.gpu"),
        ({"resources": {"vram_gb": -1}}, "resources.vram_gb"),
        ({"resources": {"vram_gb": "lots"}}, "resources.vram_gb"),
        ({"billing": {"deposit": 5}}, "billing.deadline_s"),
        ({"billing": {"deadline_s": 0, "deposit": 5}}, "billing.deadline_s"),
        ({"billing": {"deadline_s": True, "deposit": 5}}, "billing.deadline_s"),
        ({"billing": {"deadline_s": 60}}, "exactly one of billing.deposit"),
        ({"billing": {"deadline_s": 60, "deposit": 5, "deposit_usd": 1}}, "exactly one"),
        ({"billing": {"deadline_s": 60, "deposit": 0}}, "billing.deposit"),
        ({"billing": {"deadline_s": 60, "deposit_usd": float("nan")}}, "billing.deposit_usd"),
        ({"billing": {"deadline_s": 60, "deposit_usd": 1e-9}}, "comes to 0"),
        ({"billing": {"deadline_s": 60, "deposit": 5, "max_price_per_unit": -1}}, "max_price"),
        ({"billing": "cheap"}, "`billing` is required"),
        ({"name": ""}, "`name`"),
        ({"model": 5}, "`model`"),
    ],
)
def test_bad_specs_name_the_field(change, field):
    raw = {"name": "j", "billing": {"deadline_s": 60, "deposit": 5}, **change}
    with pytest.raises(JobSpecError, match=field.replace(".", r"\.").replace("`", "`?")):
        parse_job_spec(raw, default_max_price_per_unit=1)


def test_a_max_price_is_required_somewhere():
    raw = {"billing": {"deadline_s": 60, "deposit": 5}}
    with pytest.raises(JobSpecError, match=r"max_price_per_unit.*\[market\]"):
        parse_job_spec(raw)
    assert parse_job_spec(raw, default_max_price_per_unit=0).max_price_per_unit == 0


def test_not_a_map():
    with pytest.raises(JobSpecError, match="a map of fields"):
        parse_job_spec(["kind", "Job"])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)


@given(
    st.dictionaries(
        st.sampled_from(["name", "model", "kind", "resources", "billing", "image", "x"]),
        json_values,
        max_size=5,
    )
)
def test_any_document_is_a_spec_or_a_job_spec_error(raw):
    try:
        spec = parse_job_spec(raw, default_max_price_per_unit=1)
    except JobSpecError:
        return
    assert spec.deposit >= 1 and spec.deadline_s >= 1
