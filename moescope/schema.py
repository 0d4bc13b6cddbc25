"""The shape of the JSON files moescope reads, checked once where a file comes in.

Profiles, plans, accuracy files and checkpoint indexes are files anyone can edit. Checking their
shape at the boundary turns a wrong type, a missing field or a number out of range into one line
that names the file and the field (`prof/profile.json: layers[2].top_k: expected an integer >= 1,
got "x"`), instead of a KeyError or TypeError deep inside the code that uses them.

A shape is written with plain values:

    int, str, bool, dict     a JSON value of that type (int excludes true / false)
    Count(low)               an integer >= low
    Number(low)              a finite number (integer or float) >= low (or any finite number)
    [shape]                  a list whose items all have `shape`
    NonEmpty([shape])        the same, with at least one item
    {"key": shape, ...}      an object with at least these keys (others are allowed)
    Maybe(shape)             a key that may be missing or null
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moescope.errors import MoescopeError


@dataclass(frozen=True)
class Count:
    low: int = 0


@dataclass(frozen=True)
class Number:
    low: float = -math.inf


@dataclass(frozen=True)
class NonEmpty:
    items: list


@dataclass(frozen=True)
class Maybe:
    shape: Any


NAMES = {int: "an integer", str: "a string", bool: "true or false", dict: "an object"}


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _problem(value: Any, shape: Any, path: str) -> str | None:
    """What is wrong with `value` as `shape` ("FIELD: expected ..., got ..."), None when it fits."""
    if isinstance(shape, Maybe):
        return None if value is None else _problem(value, shape.shape, path)
    if isinstance(shape, NonEmpty):
        if isinstance(value, list) and not value:
            return f"{path}: expected a non-empty list"
        return _problem(value, shape.items, path)
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{path}: expected a list, got {_got(value)}"
        return next(filter(None, (_problem(v, shape[0], f"{path}[{i}]") for i, v in enumerate(value))), None)
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{path}: expected an object, got {_got(value)}"
        for key, inner in shape.items():
            where = f"{path}.{key}" if path else key
            if key not in value and not isinstance(inner, Maybe):
                return f"{where}: missing"
            problem = _problem(value.get(key), inner, where)
            if problem:
                return problem
        return None
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(shape, Count):
        fits = is_int and value >= shape.low
        return None if fits else f"{path}: expected an integer >= {shape.low}, got {_got(value)}"
    if isinstance(shape, Number):
        fits = (is_int or isinstance(value, float) and math.isfinite(value)) and value >= shape.low
        bound = f" >= {shape.low:g}" if shape.low > -math.inf else ""
        return None if fits else f"{path}: expected a finite number{bound}, got {_got(value)}"
    fits = is_int if shape is int else isinstance(value, shape)
    return None if fits else f"{path}: expected {NAMES[shape]}, got {_got(value)}"


def check(value: Any, shape: Any, where: str, fix: str) -> Any:
    """`value` itself when it has `shape`; else a MoescopeError "WHERE: FIELD: problem; FIX"."""
    problem = _problem(value, shape, "")
    if problem:
        raise MoescopeError(f"{where}: {problem.lstrip(': ')}; {fix}")
    return value
