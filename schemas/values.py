"""The engine's limits on JSON values, and the one check of a value against them.

A value that passes can be encoded (orjson), published (Kafka), stored (the event store) and
projected (ClickHouse's Int64 and Float64): integers within 64 bits, finite numbers, strings
without lone surrogates, nesting within `MAX_DEPTH`. The check walks the value iteratively,
so a hostile depth cannot exhaust the stack, and says where the first problem is.
"""

from __future__ import annotations

import math
from typing import Any

MAX_DEPTH = 64
MIN_INTEGER = -(2**63)
MAX_INTEGER = 2**63 - 1


class ValueOutOfBounds(ValueError):
    """A JSON value the engine cannot record: says where (`path`) and which limit."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def check_value(value: Any, where: str) -> None:
    """Raise ValueOutOfBounds at the first part of `value` past the engine's limits."""
    pending: list[tuple[Any, str, int]] = [(value, where, 0)]
    while pending:
        item, path, depth = pending.pop()
        if isinstance(item, bool) or item is None:
            continue
        if isinstance(item, int):
            if not MIN_INTEGER <= item <= MAX_INTEGER:
                raise ValueOutOfBounds(path, f"the integer {_shorten(item)} does not fit in 64 bits")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ValueOutOfBounds(path, f"{item} is not a JSON number")
        elif isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, (list, tuple, dict)):
            if depth >= MAX_DEPTH:
                raise ValueOutOfBounds(path, f"nested deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                for key, member in item.items():
                    if not isinstance(key, str):
                        raise ValueOutOfBounds(path, f"the key {key!r} is not a string")
                    _check_text(key, f"{path} (a key)")
                    pending.append((member, f"{path}.{key}", depth + 1))
            else:
                pending.extend((member, f"{path}[{index}]", depth + 1) for index, member in enumerate(item))
        else:
            raise ValueOutOfBounds(path, f"a {type(item).__name__} is not a JSON value")


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueOutOfBounds(path, f"a lone surrogate at character {exc.start} is not UTF-8") from None


def printable(text: str) -> str:
    """Text as it can be recorded: lone surrogates replaced (captured output may hold them)."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _shorten(number: int) -> str:
    digits = str(number)
    return digits if len(digits) <= 24 else f"{digits[:10]}...({len(digits)} digits)"
