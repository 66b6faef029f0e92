"""One config object per job: dataclasses filled from a YAML file, then job flags, then ``--set``.

``python -m jobs.index --config my.yaml --collection C --out ROOT --set describe.local=how``
Precedence: dataclass defaults < YAML < flags < ``--set key.sub=value`` (values parsed as YAML).
Unknown keys are errors, so typos never pass silently.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, recursing into dataclass-typed fields."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(f'{where}{k}' for k in unknown)}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        typ = hints[key]
        if typing.get_origin(typ) in (typing.Union, types.UnionType):  # Optional[SomeConfig]
            typ = next((a for a in typing.get_args(typ) if dataclasses.is_dataclass(a)), typ)
        if dataclasses.is_dataclass(typ) and isinstance(value, dict):
            value = from_dict(typ, value, f"{where}{key}.")
        kwargs[key] = value
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        data = data.setdefault(p, {})
    data[parts[-1]] = value


def parse(cls: type[T], argv: list[str] | None, flags: dict[str, tuple[str, type, str]], description: str = "") -> T:
    """Parse ``argv`` into ``cls``. ``flags`` maps ``--flag`` to (dotted config key, type, help)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", help="YAML config file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any config key, e.g. --set describe.local=how (repeatable)")
    for flag, (key, typ, help_) in flags.items():
        ap.add_argument(flag, dest=key.replace(".", "__"), type=typ, default=None, help=help_)
    ns = ap.parse_args(argv)
    data: dict = {}
    if ns.config:
        with open(ns.config) as f:
            data = yaml.safe_load(f) or {}
    for key, _, _ in flags.values():
        value = getattr(ns, key.replace(".", "__"))
        if value is not None:
            _set_dotted(data, key, value)
    for item in ns.set:
        if "=" not in item:
            ap.error(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        _set_dotted(data, key, yaml.safe_load(value))
    try:
        return from_dict(cls, data)
    except (TypeError, ValueError) as e:
        ap.error(str(e))
        raise


def run_cli(main: typing.Callable[[], Any]) -> None:
    """Run a job's ``main`` from the command line: an error in the user's input (unreadable
    collection, a root made under other settings, a missing artifact) prints one line and exits 2
    instead of a traceback; anything else is a bug and keeps its traceback."""
    import sys

    from jobs.extract import ExtractionMismatch
    from storage.artifacts import ArtifactError
    from storage.collection import CollectionError

    try:
        main()
    except (CollectionError, ExtractionMismatch, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
