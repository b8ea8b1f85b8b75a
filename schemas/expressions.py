"""The expression language of definitions: CEL (Common Expression Language), compiled once, never `eval`.

An expression sees `input` (the run's input), `run` (id, workflow, workflow_version,
tenant, and `attempt`: the attempt number of the node being scheduled, 0 elsewhere), and one
variable per completed node, named by the node id and holding that node's output (null when
it was skipped).
"""

from __future__ import annotations

import datetime as dt
from functools import lru_cache
from typing import Any

import cel

INPUT = "input"
RUN = "run"
BUILTINS = frozenset({INPUT, RUN})


class ExpressionError(Exception):
    """An expression did not parse, or failed while it was evaluated."""


@lru_cache(maxsize=4096)
def compile_expression(source: str) -> Any:
    """Parse `source` once; raise ExpressionError with the parser's message if it is not CEL."""
    if not isinstance(source, str) or not source.strip():
        raise ExpressionError("expression is empty")
    try:
        return cel.compile(source)
    except ValueError as exc:
        raise ExpressionError(_first_line_of_parse_error(str(exc))) from None


def references(source: str) -> set[str]:
    """The top-level variable names an expression reads (`input`, node ids, unknowns)."""
    return set(compile_expression(source).references()["variables"])


def evaluate(source: str, context: dict[str, Any]) -> Any:
    """Evaluate `source` against `context` and return a JSON-compatible value."""
    program = compile_expression(source)
    try:
        value = program.execute(context)
    except Exception as exc:
        raise ExpressionError(f"{type(exc).__name__}: {exc}") from None
    return _to_json(value)


def evaluate_mapping(mapping: dict[str, str], context: dict[str, Any]) -> dict[str, Any]:
    """Evaluate every expression of a {name: expression} mapping."""
    result: dict[str, Any] = {}
    for name, source in mapping.items():
        try:
            result[name] = evaluate(source, context)
        except ExpressionError as exc:
            raise ExpressionError(f"{name}: {exc}") from None
    return result


def _to_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _first_line_of_parse_error(message: str) -> str:
    # The CEL parser repeats the source with a caret; keep the error and its position.
    for line in message.splitlines():
        if "ERROR:" in line:
            return line.split("ERROR:", 1)[1].strip().replace("<input>:", "at ")
    return message.splitlines()[0] if message else "does not parse"
