"""The option machinery every config is made of: fields with their help text, choices and bounds (`opt`), the
`Config` base that checks them and reports every problem at once, YAML and command-line parsing, and the one
loader (`load_config`) the CLI, `jobs/*.py` and the tests use.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from dataclasses import field
from typing import Any, ClassVar, TypeVar

import yaml

from distcls import DistclsError

C = TypeVar("C")

MAX_OBJECT_MB_HELP = (
    "largest image object read, in MB (bigger ones get a too_large error row; on S3 judged from the object's size "
    "before the GET); only regular files are read (no FIFOs, devices or sockets)"
)


class ConfigError(DistclsError):
    pass


def opt(
    default: Any = dataclasses.MISSING,
    help: str = "",
    choices: tuple | None = None,
    *,
    min: float | None = None,
    max: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    **kw,
) -> Any:
    """A config field with its CLI help text, its choices and its bounds (min <= value <= max, gt < value < lt;
    None passes): `Config` checks the choices and bounds of every field on construction."""
    bounds = {k: v for k, v in (("min", min), ("max", max), ("gt", gt), ("lt", lt)) if v is not None}
    meta = {"help": help, "choices": choices, "bounds": bounds}
    if default is dataclasses.MISSING:
        return field(metadata=meta, **kw)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def max_object_mb() -> Any:
    """The --max-object-mb field of every command that reads image objects."""
    return opt(256.0, gt=0, help=MAX_OBJECT_MB_HELP)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class Problems(list):
    """Collects validation problems; `raise_if_any` raises one ConfigError listing them all."""

    def check(self, ok: bool, name: str, value: Any, fix: str) -> None:
        if not ok:
            self.append(f"{flag(name)} {value!r}: {fix}")

    def raise_if_any(self, what: str) -> None:
        if self:
            raise ConfigError(f"{what}: invalid configuration: " + "; ".join(self))


class Config:
    """Base of the config dataclasses (one per command; fields are the flags and the YAML keys). Construction
    checks every field's choices and bounds (declared with `opt`), then `validate` (the rules a bound cannot
    state), and raises one ConfigError that names the command and lists every problem."""

    command: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        problems = Problems()
        check_fields(problems, self)
        self.validate(problems)
        problems.raise_if_any(self.command)

    def validate(self, p: Problems) -> None:
        """The checks between fields, or with a message of their own: one `p.check` each."""


def check_fields(p: Problems, cfg: Any) -> None:
    """The choices and bounds of every field of `cfg` (a None value passes the bounds)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        choices = f.metadata.get("choices")
        if choices:
            p.check(value in choices, f.name, value, f"must be one of {', '.join(map(str, choices))}")
        bounds = f.metadata.get("bounds")
        if bounds and value is not None and not within(value, bounds):
            whole = _base_type(_field_types(type(cfg))[f.name])[0] is int
            p.check(False, f.name, value, bounds_fix(bounds, whole))


def within(value: float, bounds: dict) -> bool:
    return (
        value >= bounds.get("min", value)
        and value <= bounds.get("max", value)
        and ("gt" not in bounds or value > bounds["gt"])
        and ("lt" not in bounds or value < bounds["lt"])
    )


def bounds_fix(bounds: dict, whole: bool) -> str:
    """What a value out of `bounds` must be: 'must be at least 1', 'must be positive', 'must be in (0, 1]'..."""
    low = bounds.get("min", bounds.get("gt"))
    high = bounds.get("max", bounds.get("lt"))
    if low is not None and high is not None:
        if whole and "min" in bounds and "max" in bounds:
            return f"must be between {low:g} and {high:g}"
        return f"must be in {'[' if 'min' in bounds else '('}{low:g}, {high:g}{']' if 'max' in bounds else ')'}"
    if "gt" in bounds:
        return "must be positive" if bounds["gt"] == 0 else f"must be more than {bounds['gt']:g}"
    if "min" in bounds:
        return "must be >= 0" if bounds["min"] == 0 else f"must be at least {bounds['min']:g}"
    return f"must be less than {bounds['lt']:g}" if "lt" in bounds else f"must be at most {bounds['max']:g}"


def check_required(problems: Problems, cfg: Any, *names: str) -> None:
    for name in names:
        problems.check(bool(getattr(cfg, name)), name, getattr(cfg, name), "is required")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for `X`, `X | None`, `Optional[X]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_value(tp: Any, raw: Any, name: str) -> Any:
    """Coerce a YAML or command-line value to a field's type."""
    inner, optional = _base_type(tp)
    if raw is None or (optional and isinstance(raw, str) and raw.lower() in ("none", "null", "")):
        return None
    try:
        if inner is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typing.get_origin(inner) in (tuple, list):
            item_type = typing.get_args(inner)[0]
            items = raw if isinstance(raw, (list, tuple)) else [x for x in str(raw).split(",") if x.strip()]
            return typing.get_origin(inner)(item_type(x) for x in items)
        if inner in (int, float, str):
            if inner is int and isinstance(raw, float) and not raw.is_integer():
                raise ValueError(raw)
            return inner(raw)
    except (TypeError, ValueError):
        expected = getattr(inner, "__name__", str(inner))
        raise ConfigError(f"config: {flag(name)} {raw!r}: expected {expected}") from None
    return raw


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per config field, the required ones first (the others in field order: a base class's come
    before its subclass's); defaults stay None so that YAML values are only overridden when given."""
    parser.add_argument("--config", metavar="FILE", help="YAML file with these options (flags override it)")
    types_ = _field_types(cls)
    for f in sorted(dataclasses.fields(cls), key=lambda f: not _is_required(cls, f.name)):
        if f.name in skip or not f.init:
            continue
        inner, _ = _base_type(types_[f.name])
        help_text = f.metadata.get("help", "")
        default = None if f.default is dataclasses.MISSING else f.default
        if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        if not _is_required(cls, f.name):
            help_text += f" (default: {default})"
        else:
            help_text += " (required)"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if inner is bool:  # --x/--no-x; a field named no_x is its own flag (--no-x), never --no-no-x
            kwargs["action"] = "store_true" if f.name.startswith("no_") else argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.name.upper()
            if f.metadata.get("choices"):
                kwargs["metavar"] = "{" + ",".join(map(str, f.metadata["choices"])) + "}"
        parser.add_argument(flag(f.name), **kwargs)


def read_yaml(path: str) -> dict:
    from distcls import storage

    text = storage.read_text(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"config: {path} is not valid YAML ({first}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def load_config(cls: type[C], config_path: str | None = None, overrides: dict | None = None) -> C:
    """YAML file (optional) + overrides (flags; None means 'not given') -> a validated config."""
    values: dict[str, Any] = {}
    source = "flags"
    if config_path:
        values.update(read_yaml(config_path))
        source = config_path
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    types_ = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"config: unknown option(s) {', '.join(unknown)} in {source}; valid ones: {', '.join(sorted(names))}")
    missing = [n for n in names if n not in values and _is_required(cls, n)]
    if missing:
        raise ConfigError(f"config: missing required option(s) {', '.join(flag(m) for m in sorted(missing))}")
    parsed = {k: parse_value(types_[k], v, k) for k, v in values.items()}
    return cls(**parsed)


def _is_required(cls: type, name: str) -> bool:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls) if f.init}
    return load_config(cls, getattr(args, "config", None), overrides)


def to_dict(cfg: Any) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def from_config(cls: type[C], source: Any, prefix: str = "", **changes: Any) -> C:
    """A `cls` config made of the fields of `source` (another config) that `cls` also has, then `changes`.
    With `prefix`, only `source`'s fields named prefix + a `cls` field count (a tool's serve_max_batch_size is
    serve's max_batch_size)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    shared = {
        f.name.removeprefix(prefix): getattr(source, f.name)
        for f in dataclasses.fields(source)
        if f.name.startswith(prefix) and f.name.removeprefix(prefix) in names
    }
    return cls(**{**shared, **changes})
