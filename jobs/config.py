"""One typed config object per job: dataclasses filled from a YAML file, then job flags, then ``--set``.

``python -m jobs.index --config my.yaml --collection C --out ROOT --set describe.local=how``
Precedence: dataclass defaults < YAML < flags < ``--set key.sub=value`` (values parsed as YAML).

Values are validated by pydantic against the dataclasses' type hints before any work starts:
types (``--set topk=abc`` is refused, ``asmk.params.binary=maybe`` too), ranges and finite numbers
(``--topk 0``, ``--center-crop 1.5``, ``codebook.k=-5``, any NaN or ±inf: :mod:`operators.constraints`),
``Literal`` choices (``--method``, ``--rerank``, ``describe.local``…), nested sections (``--set ray=5`` is refused),
required fields (a dataclass field without default) and unknown keys (typos never pass
silently). Every such mistake is a :class:`storage.errors.ConfigError`: one line, exit 2.
``--print-config`` prints the resolved config as YAML and exits.
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import dataclasses
import io
import os
import re
import signal
import sys
import threading
import types
import typing
from typing import Any, Callable, Literal, TypeVar

import yaml

from storage.errors import ConfigError, InputError, MachineError
from storage.fs import read_yaml
from storage.redaction import redact
from storage.validation import check_keys, dataclass_in, from_dict  # noqa: F401 - re-exported to jobs

T = TypeVar("T")
Flag = tuple[str, str]  # (dotted config key, help)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def choices(cls: type, key: str) -> list[str] | None:
    """The ``Literal`` choices of the (dotted) field ``key`` of ``cls``, if it has them."""
    typ: Any = cls
    for part in key.split("."):
        typ = typing.get_type_hints(dataclass_in(typ))[part]
    args = (
        [a for a in typing.get_args(typ) if a is not type(None)]
        if typing.get_origin(typ) in (typing.Union, types.UnionType)
        else [typ]
    )
    lit = [a for a in args if typing.get_origin(a) is Literal]
    return [str(c) for c in typing.get_args(lit[0])] if lit else None


def default_of(cls: type, key: str) -> Any:
    """The default of the (dotted) field ``key`` (``dataclasses.MISSING`` when required)."""
    obj: Any = cls
    for part in key.split("."):
        field = {f.name: f for f in dataclasses.fields(obj)}[part]
        if field.default is not dataclasses.MISSING:
            obj = field.default
        elif field.default_factory is not dataclasses.MISSING:
            obj = field.default_factory()
        else:
            return dataclasses.MISSING
    return obj


def flag_value(cls: type, key: str, raw: str) -> Any:
    """A flag's text as its field wants it: kept as text for ``str`` fields, split on commas for
    lists, else parsed as YAML (``10`` → 10, ``0.4`` → 0.4) and left to validation."""
    typ: Any = cls
    for part in key.split("."):
        typ = typing.get_type_hints(dataclass_in(typ))[part]
    args = (
        set(typing.get_args(typ)) - {type(None)} if typing.get_origin(typ) in (typing.Union, types.UnionType) else {typ}
    )
    if args == {str}:
        return raw
    if any(typing.get_origin(a) is list for a in args):
        return [v for v in raw.split(",") if v]
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = data.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:-1])} is not a section")
        data = nxt
    data[parts[-1]] = value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # argparse's own usage errors: one line, exit 2
        raise ConfigError(f"{self.prog}: {message}")

    def print_help(self, file: typing.IO[str] | None = None) -> None:
        super().print_help(file or report_stream())


class Reporting(io.TextIOBase):
    """``sys.stdout`` while :func:`run_cli` runs a job: whatever is printed (Ray's forwarded worker output,
    libraries' chatter) goes to stderr; :attr:`report` is the real stdout, kept for what the job reports
    (:func:`report_stream`: its JSON summary, ``--help``, ``--print-config``)."""

    def __init__(self, report: typing.TextIO) -> None:
        super().__init__()
        self.report = report

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def fileno(self) -> int:
        return sys.stderr.fileno()


def report_stream() -> typing.TextIO:
    """Where a job writes what it reports: the real stdout under :func:`run_cli`, else ``sys.stdout``."""
    return getattr(sys.stdout, "report", sys.stdout)


def plain(doc: str) -> str:
    """A docstring as the command line shows it: Sphinx roles and literals without their markup."""
    doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc or "")
    return re.sub(r"``([^`]+)``", r"\1", doc)


def example_key(cls: type) -> str:
    """``section.key=default`` of the first nested section of ``cls``: a ``--set`` example that the job takes."""
    for f in dataclasses.fields(cls):
        sub = dataclass_in(typing.get_type_hints(cls)[f.name])
        default = default_of(cls, f.name)
        if sub is not None and default is not None and default is not dataclasses.MISSING:
            inner = next(
                (
                    g
                    for g in dataclasses.fields(sub)
                    if isinstance(getattr(default, g.name), (int, float, str))
                    and not isinstance(getattr(default, g.name), bool)
                ),
                None,
            )
            if inner is not None:
                return f"{f.name}.{inner.name}={getattr(default, inner.name)}"
    return "KEY=VALUE"


def default_prog() -> str:
    """``python -m jobs.X`` when a job module runs as a script (argparse would say ``X.py``)."""
    path = os.path.abspath(sys.argv[0])
    if path.endswith(".py") and os.path.basename(os.path.dirname(path)) == "jobs":
        return f"python -m jobs.{os.path.basename(path)[:-3]}"
    return os.path.basename(sys.argv[0])


def parser(
    cls: type, flags: dict[str, Flag], description: str = "", prog: str | None = None
) -> argparse.ArgumentParser:
    """The job's argument parser: ``--config``, ``--set``, ``--print-config`` and its flags, each
    flag's help showing its default and choices (read from ``cls``)."""
    ap = _Parser(
        prog=prog or default_prog(),
        description=plain(description),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", metavar="FILE", help="YAML config file (any key of the job's config)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override any config key, e.g. --set {example_key(cls)} (repeatable; values parsed as YAML)",
    )
    ap.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    for flag, (key, help_) in flags.items():
        opts = choices(cls, key)
        default = default_of(cls, key)
        shown = "required" if default is dataclasses.MISSING else f"default: {default!r}"
        if opts:
            shown += f"; one of {', '.join(opts)}"
        metavar = "{" + ",".join(opts) + "}" if opts else key.split(".")[-1].upper()
        ap.add_argument(flag, dest=key.replace(".", "__"), default=None, metavar=metavar, help=f"{help_} ({shown})")
    return ap


def parse(
    cls: type[T], argv: list[str] | None, flags: dict[str, Flag], description: str = "", prog: str | None = None
) -> T:
    """Parse ``argv`` into a validated ``cls``; ``--print-config`` prints it and exits."""
    ap = parser(cls, flags, description, prog)
    ns = ap.parse_args(argv)
    data: dict = {}
    if ns.config:
        try:
            data = read_yaml(ns.config) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--config {ns.config}: {type(e).__name__}: {e}".splitlines()[0]) from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {ns.config}: a YAML mapping of config keys is expected")
    for key, _ in flags.values():
        value = getattr(ns, key.replace(".", "__"))
        if value is not None:
            set_dotted(data, key, flag_value(cls, key, value))
    for item in ns.set:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            set_dotted(data, key, yaml.safe_load(value))
        except yaml.YAMLError:
            raise ConfigError(f"--set {item}: the value is not valid YAML") from None
    cfg = from_dict(cls, data)
    if ns.print_config:
        print(yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False), end="", file=report_stream())
        raise SystemExit(0)
    return cfg


class Interrupted(BaseException):
    """The job was asked to stop (SIGINT / SIGTERM); like ``KeyboardInterrupt``, no ``except Exception`` catches it.
    Code that stops on it by itself (the service) calls :meth:`acknowledge`."""

    def __init__(self, signum: int, acknowledge: Callable[[], None] | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.acknowledge = acknowledge or (lambda: None)


class StopSignals:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread, and again every ``every`` seconds until
    the job acknowledges or ends: library code that swallows one interrupt cannot keep a stopped job running (it
    happened once in the suite: a SIGINT at the start of extraction, and the job ran to its end). ``pending`` is
    a signal that nothing acknowledged."""

    def __init__(self, every: float = 3.0) -> None:
        self.every, self.signum, self.saved = every, None, {}
        self.acknowledged = threading.Event()

    def __enter__(self) -> StopSignals:
        for s in (signal.SIGINT, signal.SIGTERM):
            self.saved[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self.acknowledged.set()
        for s, handler in self.saved.items():
            signal.signal(s, handler)

    @property
    def pending(self) -> int | None:
        return None if self.acknowledged.is_set() else self.signum

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            threading.Thread(target=self._redeliver, name="stop-signals", daemon=True).start()
        raise Interrupted(self.signum, self.acknowledged.set)

    def _redeliver(self) -> None:
        while not self.acknowledged.wait(self.every):
            _thread.interrupt_main(self.signum)  # nothing when the handler is SIG_IGN (the exit is under way)


def run_cli(main: Callable[[], Any]) -> None:
    """Run a job's ``main`` from the command line; every failure is one line on stderr:

    - a mistake in the user's input (:class:`storage.errors.InputError`, also raised inside a Ray task,
      or storage refusing the user's credentials) exits 2;
    - the machine failing the job (:class:`storage.errors.MachineError`, Ray dying under the job, a storage
      endpoint that cannot be reached) exits 1;
    - SIGINT / SIGTERM stop the job with exit 130 / 143 (what it committed stays; the same command resumes);
    - anything else is a bug and keeps its traceback.

    The embedded Ray is shut down before the exit in every case.
    """
    with StopSignals() as stop:
        try:
            with contextlib.redirect_stdout(Reporting(sys.stdout)):  # stdout: what the job reports, nothing else
                main()
        except KeyboardInterrupt:
            _exit(130, "interrupted (SIGINT); run the same command again to resume")
        except Interrupted as e:
            _exit(128 + e.signum, f"interrupted ({e}); run the same command again to resume")
        except Exception as e:  # noqa: BLE001 - known failures become one line; anything else is re-raised
            known = failure_line(e)
            if known is None:
                raise
            _exit(*known)
        if stop.pending:  # a signal that something inside the job swallowed: the job still stops as asked
            name = signal.Signals(stop.pending).name
            _exit(128 + stop.pending, f"interrupted ({name}); run the same command again to resume")


def failure_line(e: BaseException) -> tuple[int, str] | None:
    """(exit code, line) for a failure the command line explains in one line, None for a bug."""
    from cluster.ray_env import ray_failure
    from storage.fs import storage_failure

    cause = getattr(e, "cause", None)  # a RayTaskError is also an instance of its task's error
    for err in (cause, e) if isinstance(cause, BaseException) else (e,):
        if isinstance(err, InputError):
            return 2, input_message(err)
        if isinstance(err, MachineError):
            return 1, input_message(err)
        known = storage_failure(err)
        if known is not None:
            return known
    failure = ray_failure(e)
    return (1, failure) if failure else None


def _exit(code: int, line: str) -> typing.NoReturn:
    """Print ``error: line``, shut the embedded Ray down, exit with ``code``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not interrupt the shutdown
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"error: {line}", file=sys.stderr, flush=True)
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - exiting anyway; the reaper ends what is left
        pass
    sys.exit(code)


def input_message(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
