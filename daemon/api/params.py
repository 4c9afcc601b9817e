"""RPC parameters from type annotations.

A method's parameters are its handler's signature: each parameter's annotation (with
`typing.Annotated[..., msgspec.Meta(...)]` for bounds and a `description`) is its type,
its validation and its documentation; a default makes it optional. `signature_params`
reads that once, at registration, into `Param`s (what `rpc_methods` lists and the quick
JSON type check uses) and a msgspec Struct (what validates values, bounds included).

`convert` is the one validation both front doors use: JSON-RPC on a method's params, gRPC
on its request (converted to the same Structs), so both refuse the same values with the
same message, which names the parameter and its bounds.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import msgspec

from daemon.errors import InvalidParams

S = TypeVar("S", bound=msgspec.Struct)

MAX_MESSAGE = 300  # characters of a validation message sent back


@dataclass(frozen=True)
class Param:
    """One parameter of an RPC method, as `rpc_methods` describes it.

    `types` are the JSON-level types the value may have (empty: any); the precise check
    (element types, bounds) is the method's Struct's.
    """

    name: str
    types: tuple[type, ...]
    required: bool = True
    description: str = ""

    @property
    def type_name(self) -> str:
        if not self.types:
            return "any"
        return "|".join("null" if t is type(None) else t.__name__ for t in self.types)

    def accepts(self, value: Any) -> bool:
        """Type check with JSON's view of numbers.

        bool is an int subclass in Python but not a number in JSON, so it only passes where
        bool is declared. An int passes where float is declared (JSON has one number type).
        """
        if not self.types:
            return True
        if isinstance(value, bool):
            return bool in self.types
        if isinstance(value, int) and float in self.types:
            return True
        return isinstance(value, self.types)


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a union (Annotated stripped), or the annotation alone."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        return [m for arg in get_args(annotation) for m in _members(arg)]
    return [annotation]


def json_types(annotation: Any) -> tuple[type, ...]:
    """The JSON-level types a value of `annotation` may have; () when any."""
    out: list[type] = []
    for member in _members(annotation):
        if member is Any or member is object:
            return ()
        origin = get_origin(member)
        if origin is Literal:
            found = [type(v) for v in get_args(member)]
        elif member is None or member is type(None):
            found = [type(None)]
        elif isinstance(member, type) and issubclass(member, msgspec.Struct):
            found = [dict]
        elif origin is not None:
            found = [list if origin is tuple else origin]  # a JSON array either way
        else:
            found = [list if member is tuple else member]
        out.extend(t for t in found if t not in out)
    return tuple(out)


def _metas(annotation: Any) -> list[msgspec.Meta]:
    """Every `msgspec.Meta` on `annotation`: its own first, then its union members'."""
    metas: list[msgspec.Meta] = []
    if get_origin(annotation) is Annotated:
        metas.extend(m for m in annotation.__metadata__ if isinstance(m, msgspec.Meta))
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            metas.extend(_metas(arg))
    return metas


def description_of(annotation: Any) -> str:
    return next((m.description for m in _metas(annotation) if m.description), "")


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def bounds_of(annotation: Any) -> str:
    """The bounds of `annotation` in words ("1 to 4096", "at most 256 characters"), or ""."""
    for meta in _metas(annotation):
        low = meta.ge if meta.ge is not None else meta.gt
        high = meta.le if meta.le is not None else meta.lt
        if low is not None or high is not None:
            if low is not None and high is not None:
                return f"{_number(low)} to {_number(high)}"
            return f"at least {_number(low)}" if low is not None else f"at most {_number(high)}"
        if meta.min_length is not None or meta.max_length is not None:
            kinds = {get_origin(m) or m for m in _members(annotation)}
            unit = "characters" if str in kinds else "items"
            low_n, high_n = meta.min_length, meta.max_length
            if low_n and high_n is not None:
                return f"{low_n} to {high_n} {unit}"
            if high_n is not None:
                return f"at most {high_n} {unit}"
            return f"at least {low_n} {unit}"
    return ""


_JSON_TYPES = (str, int, float, bool, type(None), dict, list)

_AT = re.compile(r" - at `\$\.([A-Za-z_][A-Za-z0-9_]*)(.*)`$")


def explain(struct: type[msgspec.Struct], error: msgspec.ValidationError) -> str:
    """`error` as a message that names the parameter and, when it broke them, its bounds:
    "max_tokens must be 1 to 4096 (Expected `int` >= 1 - at `$.max_tokens`)"."""
    text = str(error)
    where = _AT.search(text)
    if where is None:
        return text
    name, rest = where.group(1), where.group(2)
    annotation = typing.get_type_hints(struct, include_extras=True).get(name)
    bounds = bounds_of(annotation) if annotation is not None and not rest else ""
    return f"{name} must be {bounds} ({text})" if bounds else f"{name}: {text}"


def convert(struct: type[S], values: dict[str, Any]) -> S:
    """`values` validated into `struct` (strict types, bounds); `InvalidParams` naming the
    parameter otherwise."""
    try:
        return msgspec.convert(values, struct)
    except msgspec.ValidationError as exc:
        message = explain(struct, exc)
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + "..."
        raise InvalidParams(f"invalid params: {message}") from None


def signature_params(
    name: str, handler: Callable[..., Any]
) -> tuple[tuple[Param, ...], type[msgspec.Struct]]:
    """The parameters of `handler` as `Param`s, and the Struct that validates them.

    Every parameter needs an annotation of JSON values (a Struct counts as an object);
    *args, **kwargs and positional-only parameters are refused (JSON-RPC params are named,
    or positional in declaration order).
    """
    hints = typing.get_type_hints(handler, include_extras=True)
    params: list[Param] = []
    fields: list[tuple[Any, ...]] = []
    for p in inspect.signature(handler).parameters.values():
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise ValueError(f"{name}: parameter {p.name!r} must be a plain named parameter")
        if p.name not in hints:
            raise ValueError(f"{name}: parameter {p.name!r} has no type annotation")
        annotation = hints[p.name]
        unfit = [t.__name__ for t in json_types(annotation) if t not in _JSON_TYPES]
        if unfit:
            raise TypeError(f"{name}: parameter {p.name!r} is {unfit[0]}, not a JSON type")
        required = p.default is inspect.Parameter.empty
        params.append(Param(p.name, json_types(annotation), required, description_of(annotation)))
        fields.append((p.name, annotation) if required else (p.name, annotation, p.default))
    struct = msgspec.defstruct(
        f"{name}_params", fields, kw_only=True, forbid_unknown_fields=True, module=__name__
    )
    msgspec.json.Decoder(struct)  # a constraint msgspec cannot check fails here, not at a call
    return tuple(params), struct


def first_paragraph(handler: Callable[..., Any]) -> str:
    """A handler's docstring up to its first blank line, on one line."""
    doc = inspect.getdoc(handler) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())
