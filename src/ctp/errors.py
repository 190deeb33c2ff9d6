"""User-facing errors.

Anything a user can cause (a wrong path, an out-of-range setting, a prompt for
another model, a damaged file) is raised as :class:`CTPError`. The CLI prints
its message on one line and exits with status 2; library callers catch it like
any exception. Programming errors stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing


class CTPError(Exception):
    """A problem with the user's input, stated with its fix."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = _one_line(problem)
        self.fix = None if fix is None else _one_line(fix)
        super().__init__(self.problem if not self.fix else f"{self.problem} ({self.fix})")


def _one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (a key or path a user typed may hold them),
    so the message stays one line."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def require(condition: bool, problem: str, fix: str | None = None) -> None:
    """Raise :class:`CTPError` unless ``condition`` holds."""
    if not condition:
        raise CTPError(problem, fix)


def _matches(value, tp) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (ints are not bools; a float field takes an int)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and (not args or all(_matches(k, args[0]) and _matches(v, args[1])
                                                            for k, v in value.items()))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return isinstance(value, (tp, dict))  # a nested section the config builds (and checks) itself
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, (tp, str))  # the config converts the string and names the allowed values
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation this check does not know: the config's own checks decide


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    if tp in names:
        return names[tp]
    plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans", dict: "mappings"}
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} {plural.get(args[0], 'values')}"
    if origin in (list, tuple):
        return f"a list of {plural.get(args[0], 'values')}" if args else "a list"
    if origin is dict or tp is dict:
        return f"a mapping of {plural.get(typing.get_origin(args[1]) or args[1], 'values')}" if args else "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def check_types(cls: type, values: dict, where: str = "") -> None:
    """Raise :class:`CTPError` when a value does not fit its dataclass field's annotation.

    Configs call this before comparing values, so that a string or a list where a number
    belongs (a YAML ``1e-3`` is a string) is a one-line error, not a ``TypeError``.
    Unknown names are left to the caller.
    """
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name in hints and not _matches(value, hints[name]):
            want = _describe(hints[name])
            fix = f"pass {want}"
            if isinstance(value, str):
                try:
                    float(value)
                    fix = "write the number without quotes; YAML reads 1e-3 as text, so write 1.0e-3"
                except ValueError:
                    pass
            raise CTPError(f"{where}{name} must be {want}, got {value!r}", fix)


def check_field_types(obj, where: str = "") -> None:
    """:func:`check_types` on every field of the dataclass instance ``obj``."""
    check_types(type(obj), {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, where)
