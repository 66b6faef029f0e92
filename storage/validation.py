"""Configs rebuilt from dicts are validated, wherever the dict comes from (a command line, a root's
stored settings, a Ray task's arguments): unknown keys at any depth, types, ``Literal`` choices and the
ranges of :mod:`operators.constraints` are checked by pydantic, and a failure is one :class:`ConfigError`
line naming the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from storage.errors import ConfigError

T = TypeVar("T")


def dataclass_in(typ: Any) -> type | None:
    """The dataclass inside ``typ`` (itself, or the member of ``X | None``), else None."""
    if dataclasses.is_dataclass(typ):
        return typ
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(typ) if dataclasses.is_dataclass(a)), None)
    return None


def check_keys(cls: type, data: dict, where: str = "") -> None:
    """Unknown keys (at any depth of nested dataclass sections) are a :class:`ConfigError`."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[where + k for k in unknown]}; known under "
            f"{where.rstrip('.') or 'the top level'}: {names}"
        )
    for key, value in data.items():
        sub = dataclass_in(hints[key])
        if sub is not None and isinstance(value, dict):
            check_keys(sub, value, f"{where}{key}.")


def _explain(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "union[")))
        got = "" if err["type"] == "missing" else f" (got {err['input']!r})"
        parts.append(f"{loc or 'config'}: {err['msg']}{got}")
    more = f" (+{e.error_count() - 3} more)" if e.error_count() > 3 else ""
    return "; ".join(parts) + more


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Validate a nested dict into dataclass ``cls`` (types, choices, required fields, unknown keys)."""
    check_keys(cls, data)
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as e:
        raise ConfigError(_explain(e)) from None
