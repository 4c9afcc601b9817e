"""Typed forms of the registry kinds' values: msgspec Structs derived from the schemas.

`registry.schemas` declares each kind's shape once (`Spec`: types, fields, bounds) and checks
values against it with error messages that name the field path. This module derives a msgspec
type from the same declarations — a Struct per object with known fields (closed ones forbid
unknown fields), `Meta` bounds on strings, lists and numbers, `Literal` enums — so that every
value the schema accepts also has a typed form, `typed_value(kind, value)`, for readers that
want attributes with guaranteed types instead of a dict. `schemas.validate_value` converts
every value it accepts, so the two can never disagree on a stored entry.

Field names that are not Python identifiers (`release-tag`, `from`) get attribute names with
`_` (`release_tag`, `from_`) and keep their names on the wire.
"""

from __future__ import annotations

import keyword
import re
from functools import cache
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta

from registry.specs import KINDS, MAX_LIST_ITEMS, MAX_STRING_LENGTH, SPECS, Spec


class TypedValueError(ValueError):
    """A value that has no typed form (it would fail `schemas.validate_value` too)."""


def _attr(name: str, taken: set[str]) -> str:
    attr = re.sub(r"\W", "_", name)
    if not attr or attr[0].isdigit() or keyword.iskeyword(attr):
        attr = f"f_{attr}" if not attr or attr[0].isdigit() else f"{attr}_"
    while attr in taken:
        attr += "_"
    taken.add(attr)
    return attr


def _type_of(spec: Spec, name: str) -> Any:
    options: list[Any] = []
    for kind in spec.types:
        if kind == "str":
            if spec.enum is not None:
                options.append(Literal[tuple(sorted(spec.enum))])  # type: ignore[misc]
                continue
            bounds: dict[str, Any] = {"max_length": spec.max_len or MAX_STRING_LENGTH}
            if spec.min_len is not None:
                bounds["min_length"] = spec.min_len
            if spec.pattern is not None:
                bounds["pattern"] = f"^(?:{spec.pattern.pattern})$"
            options.append(Annotated[str, Meta(**bounds)])
        elif kind == "int":  # msgspec's int is 64-bit (signed or unsigned), as msgpack's
            bounds = {}
            if spec.minimum is not None:
                bounds["ge"] = int(spec.minimum)
            if spec.maximum is not None:
                bounds["le"] = int(spec.maximum)
            options.append(Annotated[int, Meta(**bounds)] if bounds else int)
        elif kind == "number":
            bounds = {}
            if spec.minimum is not None:
                bounds["ge"] = float(spec.minimum)
            if spec.maximum is not None:
                bounds["le"] = float(spec.maximum)
            options.append(Annotated[float, Meta(**bounds)] if bounds else float)
        elif kind == "bool":
            options.append(bool)
        elif kind == "null":
            options.append(None)
        elif kind == "list":
            item = _type_of(spec.items, f"{name}Item") if spec.items is not None else Any
            bounds = {"max_length": spec.max_len or MAX_LIST_ITEMS}
            if spec.min_len is not None:
                bounds["min_length"] = spec.min_len
            options.append(Annotated[list[item], Meta(**bounds)])  # type: ignore[valid-type]
        elif kind == "dict":
            options.append(_object_type(spec, name))
        else:  # "any"
            return Any
    return options[0] if len(options) == 1 else Union[tuple(options)]  # noqa: UP007


def _object_type(spec: Spec, name: str) -> Any:
    if spec.fields is None:
        values = _type_of(spec.values, f"{name}Value") if spec.values is not None else Any
        return dict[str, values]  # type: ignore[valid-type]
    taken: set[str] = set()
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    rename: dict[str, str] = {}
    for field_name, sub in spec.fields.items():
        attr = _attr(field_name, taken)
        if attr != field_name:
            rename[attr] = field_name
        sub_type = _type_of(sub, f"{name}{attr[:1].upper()}{attr[1:]}")
        if sub.required:
            fields.append((attr, sub_type))
        else:
            fields.append((attr, Union[sub_type, None], None))  # noqa: UP007
    # required fields first, as a Struct needs them
    fields.sort(key=lambda f: len(f) == 3)
    return msgspec.defstruct(
        name,
        fields,
        rename=rename or None,
        forbid_unknown_fields=not spec.open,
        frozen=True,
        kw_only=True,
    )


@cache
def value_type(kind: str) -> Any:
    """The msgspec type of a kind's values (a Struct)."""
    return _type_of(SPECS[kind], kind.capitalize())


def typed_value(kind: str, value: Any) -> Any:
    """`value` as its kind's Struct; TypedValueError if it does not fit."""
    if kind not in KINDS:
        raise TypedValueError(f"unknown kind {str(kind)[:32]!r}")
    try:
        return msgspec.convert(value, value_type(kind), strict=True)
    except (msgspec.ValidationError, TypeError, ValueError, RecursionError) as exc:
        raise TypedValueError(str(exc)[:300]) from None
