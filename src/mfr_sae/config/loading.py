"""Configs from and to YAML files, `--set section.field=value` overrides, and the `--help` text of every
field (from the docstrings under the fields)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from collections.abc import Iterable
from contextlib import suppress
from functools import cache
from itertools import pairwise
from pathlib import Path
from types import UnionType
from typing import Any

import yaml

from mfr_sae.architecture import option_default, option_types
from mfr_sae.architectures import option_fields
from mfr_sae.config.fields import SAEConfig
from mfr_sae.config.run import RunConfig
from mfr_sae.errors import ConfigError
from mfr_sae.files import atomic_write_text

# ---------------------------------------------------------------- dicts, YAML and overrides


def sections() -> dict[str, type]:
    """Section name -> its dataclass, in file order."""
    return {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}  # type: ignore[misc]


def from_dict(raw: Any, source: str = "config") -> RunConfig:
    """Build a RunConfig from nested dicts; unknown sections or fields are errors."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    cfg, known = RunConfig(), sections()
    for section, values in raw.items():
        if section not in known:
            raise ConfigError(f"{source}: unknown section {section!r} (known: {', '.join(known)})")
        if not isinstance(values, dict | None):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        for name, value in (values or {}).items():
            set_field(cfg, f"{section}.{name}", value, source)
    return cfg


def set_field(cfg: RunConfig, dotted: str, value: Any, source: str = "--set") -> None:
    """Set `section.field` on cfg, converting value to the field's type (`sae.<architecture>_<option>`: an
    architecture's option, kept in cfg.sae.options)."""
    section, _, name = dotted.partition(".")
    known = sections()
    if section not in known or not name:
        raise ConfigError(f"{source}: unknown key {dotted!r} (sections: {', '.join(known)})")
    hints = settable_fields(known[section])
    if name not in hints:
        raise ConfigError(f"{source}: unknown key {dotted!r} (fields of {section}: {', '.join(hints)})")
    try:
        if name in (options := option_fields()):
            owner, field_ = options[name]
            cfg.sae.options[name] = _coerce(value, option_types(owner)[field_.name])
        else:
            setattr(getattr(cfg, section), name, _coerce(value, hints[name]))
    except _Mismatch as err:
        bad, tp = err.args
        raise ConfigError(f"{source}: {dotted}={bad!r} is not a valid {_type_name(tp)}") from None


def settable_fields(cls: type) -> dict[str, Any]:
    """The keys of a section -> their types: its fields, and for `sae` every registered architecture's options
    (in place of `options`, which holds them)."""
    if cls is not SAEConfig:
        return field_types(cls)
    own = {name: tp for name, tp in field_types(cls).items() if name != "options"}
    return own | {key: option_types(owner)[f.name] for key, (owner, f) in option_fields().items()}


def parse_override(text: str) -> tuple[str, Any]:
    """`section.field=value` -> (key, value parsed as YAML)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"--set {text!r}: expected section.field=value")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a YAML config (or the defaults when path is None), apply overrides, validate."""
    cfg = RunConfig() if path is None else from_dict(_read_yaml(Path(path)), str(path))
    for text in overrides:
        set_field(cfg, *parse_override(text))
    return cfg.validate()


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)  # 0-based; shown 1-based, as editors count
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None


def save_config(cfg: RunConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# Fields added since runs were first saved, with the value that a run saved before them behaved as: a saved
# run's config holds every field of its day, so one it lacks must not take today's default (a resume would
# change the run's setting halfway).
FIELDS_BEFORE_THEY_EXISTED = {
    "mfr": {"idle_window": 0, "twin_guard": 1.0, "idle_to_live": False, "confirm_cosine": 1.0}
}


def load_run_config(path: Path) -> RunConfig:
    """A run folder's saved config.yaml, read as the run was trained (FIELDS_BEFORE_THEY_EXISTED)."""
    raw = _read_yaml(path)
    if isinstance(raw, dict):
        for section, fields in FIELDS_BEFORE_THEY_EXISTED.items():
            if isinstance(raw.get(section), dict):
                raw[section] = {**fields, **raw[section]}
    return from_dict(raw, str(path)).validate()


class _Mismatch(ValueError):
    """args: (a value that does not fit, its type): the field's value, or the first bad item of a list."""


def _coerce(value: Any, tp: Any) -> Any:
    """value as a tp (of a union, the first type that fits), else _Mismatch. Numbers are also read from text,
    since YAML 1.1 reads `1e-3` and `2e6` as strings; a float that is a whole number fits an int."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is UnionType:
        for option in args:
            try:
                return _coerce(value, option)
            except _Mismatch as err:
                if err.args[0] is not value:  # a list with an item that does not fit: name the item
                    raise
    elif origin is list and isinstance(value, list):
        return [_coerce(item, args[0]) for item in value]
    elif origin is dict and isinstance(value, dict):
        return value
    elif isinstance(value, bool) or tp is bool:  # bool is an int subclass: bool fields take bools, no others do
        if tp is bool and isinstance(value, bool):
            return value
    elif tp is str and isinstance(value, str):
        return value
    elif tp is float and isinstance(value, (int, float, str)):
        with suppress(ValueError):
            return float(value)
    elif tp is int and isinstance(value, (int, float, str)):
        with suppress(ValueError):
            number = float(value.replace("_", "")) if isinstance(value, str) else value
            if isinstance(number, int) or number.is_integer():
                return int(number)
    raise _Mismatch(value, tp)


def _type_name(tp: Any) -> str:
    return str(tp) if typing.get_origin(tp) else tp.__name__


# ---------------------------------------------------------------- help text from docstrings


@cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> its type (the annotations, which `from __future__ import annotations` keeps as text)."""
    return typing.get_type_hints(cls)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (its docstring), on one line."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    return {
        node.target.id: " ".join(doc.value.value.split())
        for node, doc in pairwise(body)
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and isinstance(doc, ast.Expr)
        and isinstance(doc.value, ast.Constant)
        and isinstance(doc.value.value, str)
    }


def help_text() -> str:
    """Every config field with its type, default and docstring, for --help (the architectures' options under
    `sae`, documented by their Options' docstrings)."""
    lines = ["config fields (YAML sections, or --set section.field=value):"]
    defaults = RunConfig()
    for section, cls in sections().items():
        lines.append(f"  {section}:")
        docs = field_docs(cls)
        for name, tp in field_types(cls).items():
            if cls is SAEConfig and name == "options":
                continue
            default = getattr(getattr(defaults, section), name)
            lines.append(f"    {section}.{name} ({_type_name(tp)}, default {default!r})")
            if name in docs:
                lines.append(f"        {docs[name]}")
    for key, (owner, f) in option_fields().items():
        lines.append(f"    sae.{key} ({_type_name(option_types(owner)[f.name])}, default {option_default(f)!r})")
        if f.name in (docs := field_docs(owner.Options)):
            lines.append(f"        {owner.name}: {docs[f.name]}")
    return "\n".join(lines)
