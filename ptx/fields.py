"""Types and ranges of config fields, declared once on the dataclasses and checked by one function.

A field declares its range beside its type: `steps: Annotated[int, Range(ge=1)] = 1000`. The spec loader
(`ptx.config`) and the CLI's option types both call `check_value`, so a bad value gets the same one-line
message wherever it enters. An `Enum` class in the annotation restricts a `str` field to its values; `SafeName`
marks names that become directory names.
"""

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from enum import Enum

from ptx.errors import PtxError, suggest


@dataclass(frozen=True)
class Range:
    """Bounds of a number: ge/le inclusive, gt/lt exclusive."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def describe(self) -> str:
        parts = [f"{op} {_number(v)}" for op, v in (("≥", self.ge), (">", self.gt), ("≤", self.le), ("<", self.lt))
                 if v is not None]
        return " and ".join(parts)

    def holds(self, v) -> bool:
        return not ((self.ge is not None and v < self.ge) or (self.gt is not None and v <= self.gt)
                    or (self.le is not None and v > self.le) or (self.lt is not None and v >= self.lt))


@dataclass(frozen=True)
class SafeName:
    """A name used as one path component: letters, digits, '.', '_', '-'; not '.' or '..'."""


SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_TYPE_WORDS = {int: "a whole number", float: "a finite number", str: "a string", bool: "true or false",
               tuple: "a list", dict: "a mapping"}


def split_annotation(annotation) -> tuple[object, tuple, bool]:
    """(base type, rules, None allowed) of a field annotation such as `Annotated[int, Range(ge=1)] | None`."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else annotation
    rules: tuple = ()
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extra = typing.get_args(annotation)
        rules = tuple(extra)
    return annotation, rules, optional


def expected(annotation, null: str | None = "null") -> str:
    """What a field takes, in words: 'a whole number ≥ 1', 'one of [...]', 'a list of strings'."""
    base, rules, optional = split_annotation(annotation)
    origin = typing.get_origin(base) or base
    enum = next((r for r in rules if isinstance(r, type) and issubclass(r, Enum)), None)
    if enum is not None:
        text = f"one of {[m.value for m in enum]}"
    else:
        text = _TYPE_WORDS.get(origin, getattr(origin, "__name__", str(origin)))
        if origin is tuple and typing.get_args(base):
            text = f"a list of {_TYPE_WORDS.get(typing.get_args(base)[0], 'values').removeprefix('a ')}s"
        for r in rules:
            if isinstance(r, Range):
                text += f" {r.describe()}"
            elif r is SafeName or isinstance(r, SafeName):
                text = "a name of letters, digits, '.', '_' or '-' (no path separators)"
    return text + (f" or {null}" if optional and null else "")


def check_value(value, annotation, where: str, null: str | None = "null"):
    """`value` checked (and normalised: lists -> tuples, ints -> floats) against a field annotation.

    Raises PtxError "WHERE: expected ..., found ..." on a wrong type, a value out of range, NaN or inf, an
    unknown enumeration value or an unsafe name. `null` names the missing value in messages (None: not offered).
    """
    base, rules, optional = split_annotation(annotation)
    if value is None:
        if optional:
            return None
        raise PtxError(f"{where}: expected {expected(annotation, null)}, found null")
    origin = typing.get_origin(base) or base
    found = f"{type(value).__name__} {_short(value)}"
    if origin is bool:
        if not isinstance(value, bool):
            raise PtxError(f"{where}: expected true or false, found {found}")
    elif origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PtxError(f"{where}: expected {expected(annotation, null)}, found {found}")
    elif origin is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PtxError(f"{where}: expected {expected(annotation, null)}, found {found}")
        if not math.isfinite(value):
            raise PtxError(f"{where}: expected {expected(annotation, null)}, found {value}")
        value = float(value)
    elif origin is str:
        if not isinstance(value, str):
            raise PtxError(f"{where}: expected {expected(annotation, null)}, found {found}")
    elif origin is tuple:
        if not isinstance(value, list | tuple):
            raise PtxError(f"{where}: expected {expected(annotation, null)}, found {found}")
        item = typing.get_args(base)[0] if typing.get_args(base) else None
        value = tuple(check_value(v, item, f"{where}[{i}]") if item is not None else v for i, v in enumerate(value))
    elif origin is dict:
        if not isinstance(value, dict):
            raise PtxError(f"{where}: expected {expected(annotation, null)}, found {found}")
    for rule in rules:
        if isinstance(rule, Range) and not rule.holds(value):
            raise PtxError(f"{where}: expected {expected(annotation, null)}, found {_short(value)}")
        if isinstance(rule, type) and issubclass(rule, Enum):
            allowed = [m.value for m in rule]
            if value not in allowed:
                raise PtxError(f"{where}: expected one of {allowed}, found {_short(value)}{suggest(value, allowed)}")
        if (rule is SafeName or isinstance(rule, SafeName)) and not SAFE_NAME.match(value):
            raise PtxError(f"{where}: expected {expected(annotation, null)}, found {_short(value)}")
    return value


def field_annotation(cls, name: str):
    """The declared annotation of one field of a dataclass."""
    return {f.name: f.type for f in dataclasses.fields(cls)}[name]


def field_default(cls, name: str):
    """The declared default of one field of a dataclass (the one place defaults live)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def check_fields(obj, where: str) -> list[str]:
    """Every field of a built dataclass checked against its annotation; the errors as strings."""
    errors = []
    for f in dataclasses.fields(obj):
        if dataclasses.is_dataclass(f.type):
            continue
        try:
            check_value(getattr(obj, f.name), f.type, f"{where}.{f.name}")
        except PtxError as exc:
            errors.append(str(exc))
    return errors


def _number(v) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
