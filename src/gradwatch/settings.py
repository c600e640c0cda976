"""Typed, range-checked settings dataclasses and their loader from plain mappings (torch-free, numpy-free).

Every tunable of the server (limits, endpoints, detector thresholds) is a field of a
frozen dataclass declared with `setting(...)`: the default, a one-line doc and the
allowed range live together, so the schema documents itself and a bad value fails
at construction time, whether it came from YAML or from Python. The agent declares
its options (agent/config.py `AgentConfig`) with the same `setting(...)`, so both
sides have one schema each in one style; this module is shared like
`gradwatch.routing`, and the agent never imports the server for it.

`load_settings(cls, mapping, key="limits")` turns a parsed YAML mapping into an
instance; every problem is a `SettingError` (a ValueError) naming the dotted key.
Supported field types: bool, int, float, str, `tuple[str, ...]` (a YAML list of
strings) and nested Settings.

Every numeric setting is bounded on both sides: a field that declares no upper bound
gets DEFAULT_MAX_INT (integers: counts of reports, steps, layers, entries, which size
buffers) or DEFAULT_MAX_FLOAT (floats), so no value, from the YAML file or from an
agent's per-run settings (Hello.detector_settings), can make the server allocate
without limit. `bounds(field)` gives a field's effective (lower, upper) range.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["DEFAULT_MAX_FLOAT", "DEFAULT_MAX_INT", "SettingError", "Settings", "bounds", "load_settings", "setting"]

#: Upper bound of an integer setting that declares none: a window of this many float64 values is 800 kB.
DEFAULT_MAX_INT = 100_000
#: Upper bound of a float setting that declares none (seconds: about 31 years; factors: far beyond use).
DEFAULT_MAX_FLOAT = 1e9

T = TypeVar("T", bound="Settings")


class SettingError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range.

    `key` is the dotted path of the offending setting (e.g. "limits.max_runs").
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config key {key!r}: {problem}")
        self.key = key
        self.problem = problem


def setting(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    factory: Callable[[], Any] | None = None,
    repr: bool = True,
) -> Any:
    """A dataclass field with a default (or a `factory` for a mutable or composite one), a doc line and an
    optional numeric range; `repr=False` keeps a secret out of the dataclass's repr."""
    metadata = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if factory is not None:
        return dataclasses.field(default_factory=factory, repr=repr, metadata=metadata)
    return dataclasses.field(default=default, repr=repr, metadata=metadata)


class Settings:
    """Mixin for frozen settings dataclasses: checks declared ranges after init.

    Subclasses may override `_check()` for cross-field rules; raise SettingError
    with the field name as key.
    """

    def __post_init__(self) -> None:
        assert dataclasses.is_dataclass(self)
        for f in dataclasses.fields(self):
            _check_range(f, getattr(self, f.name))
        self._check()

    def _check(self) -> None:
        """Cross-field rules; the default has none."""

    @classmethod
    def describe(cls) -> dict[str, tuple[Any, str]]:
        """Field name -> (default, doc) for documentation and error messages."""
        out: dict[str, tuple[Any, str]] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            default = f.default if f.default is not dataclasses.MISSING else None
            out[f.name] = (default, f.metadata.get("doc", ""))
        return out


def bounds(f: dataclasses.Field[Any], hint: Any) -> tuple[float | None, float]:
    """The effective (lower, upper) bound of a numeric field of type `hint` (int or float); None: no lower.

    Exclusive bounds are reported as they are declared (`gt`/`lt` values)."""
    meta = f.metadata
    lower = meta.get("ge") if meta.get("ge") is not None else meta.get("gt")
    upper = meta.get("le") if meta.get("le") is not None else meta.get("lt")
    if upper is None:
        upper = DEFAULT_MAX_INT if hint is int else DEFAULT_MAX_FLOAT
    return lower, upper


def _check_range(f: dataclasses.Field[Any], value: Any) -> None:
    meta = f.metadata
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingError(f.name, f"must be a finite number, got {value!r}")
    bounds = (
        ("ge", lambda b: value >= b, "≥"),
        ("gt", lambda b: value > b, ">"),
        ("le", lambda b: value <= b, "≤"),
        ("lt", lambda b: value < b, "<"),
    )
    for name, ok, symbol in bounds:
        bound = meta.get(name)
        if bound is not None and not ok(bound):
            raise SettingError(f.name, f"must be {symbol} {bound}, got {value!r}")
    if meta.get("le") is None and meta.get("lt") is None:
        cap = DEFAULT_MAX_INT if isinstance(value, int) else DEFAULT_MAX_FLOAT
        if value > cap:
            raise SettingError(f.name, f"must be ≤ {cap}, got {value!r}")


def load_settings(cls: type[T], data: Any, key: str) -> T:
    """Build `cls` from a mapping, rejecting unknown keys and mistyped values.

    Nested Settings dataclasses are loaded recursively. Errors name the full
    dotted key, prefixed with `key`.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SettingError(key, f"must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        dotted = f"{key}.{name}" if key else str(name)
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise SettingError(dotted, f"unknown setting (known: {known})")
        kwargs[name] = _convert(hints[name], value, dotted)
    try:
        return cls(**kwargs)
    except SettingError as exc:
        dotted = f"{key}.{exc.key}" if key else exc.key
        raise SettingError(dotted, exc.problem) from None


def _convert(hint: Any, value: Any, dotted: str) -> Any:
    if typing.get_origin(hint) is tuple and typing.get_args(hint) == (str, Ellipsis):
        # A list of strings in YAML (e.g. URLs); stored as a tuple so the settings stay frozen.
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise SettingError(dotted, f"must be a list of strings, got {value!r}")
        return tuple(value)
    if isinstance(hint, type) and issubclass(hint, Settings):
        return load_settings(hint, value, dotted)
    if hint is bool:
        if not isinstance(value, bool):
            raise SettingError(dotted, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingError(dotted, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SettingError(dotted, f"must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise SettingError(dotted, f"must be a string, got {value!r}")
        return value
    raise SettingError(dotted, f"has an unsupported type {hint!r}")  # a bug in the schema, not the file
