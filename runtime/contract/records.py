"""Frozen dataclasses read from and written to JSON by their field types: the machinery under the manifest.

`Record.from_json` checks every field's type (an int is not a str, a bool is not an int), names what is missing or
unknown by its path in the document, then runs the record's own range checks (`problems`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from typing import Any

from runtime.contract.errors import UserError
from runtime.contract.graphspec import GraphSpec


class ManifestError(UserError):
    pass


class Record:
    """A frozen dataclass read from and written to JSON by its field types; `problems()` adds range checks."""

    if typing.TYPE_CHECKING:  # every subclass is a dataclass: this makes it a `DataclassInstance` to the checker
        __dataclass_fields__: typing.ClassVar[dict[str, dataclasses.Field[Any]]]

    @classmethod
    def from_json(cls, data: Any, where: str = "manifest"):
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: expected an object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if unknown := sorted(set(data) - set(fields)):
            raise ManifestError(f"{where}: unknown key(s) {', '.join(unknown)}")
        hints, values = typing.get_type_hints(cls), {}
        for name, f in fields.items():
            if name in data:
                values[name] = _load(hints[name], data[name], f"{where}.{name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ManifestError(f"{where}: missing key {name!r}")
        obj = cls(**values)
        if problems := list(obj.problems()):
            raise ManifestError(f"{where}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if problems[1:]
                                                               else ""))
        return obj

    def to_json(self) -> dict:
        return {f.name: _dump(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def problems(self) -> Iterator[str]:
        return iter(())


def _load(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _load(inner, value, where)
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.from_json(value, where)
    if tp is GraphSpec:
        try:
            return GraphSpec.from_json(value)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ManifestError(f"{where}: not a valid graph spec ({type(e).__name__}: {e})") from None
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise ManifestError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_load(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ManifestError(f"{where}: expected an object, got {type(value).__name__}")
        return {k: _load(args[1], v, f"{where}.{k}") for k, v in value.items()}
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str), bool: lambda v: isinstance(v, bool)}[tp]
    if not ok(value):
        raise ManifestError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r:.40}")
    return float(value) if tp is float else value


def _dump(value):
    if isinstance(value, (Record, GraphSpec)):
        return value.to_json()
    if isinstance(value, tuple):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value
