"""Specification of the engine's limits on JSON values: what passes can be encoded and stored."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.tasks import NodeOutcome
from schemas.values import MAX_DEPTH, MAX_INTEGER, MIN_INTEGER, ValueOutOfBounds, check_value, printable


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "path", "problem"),
    [
        (2**64, "output", "the integer 18446744073709551616 does not fit in 64 bits"),
        ({"a": [1, MAX_INTEGER + 1]}, "output.a[1]", "does not fit in 64 bits"),
        ({"big": 10**30}, "output.big", "1000000000...(31 digits) does not fit in 64 bits"),
        ({"x": math.nan}, "output.x", "nan is not a JSON number"),
        ([math.inf], "output[0]", "inf is not a JSON number"),
        ({"s": "a\ud800b"}, "output.s", "a lone surrogate at character 1 is not UTF-8"),
        ({1: "x"}, "output", "the key 1 is not a string"),
        ({"when": object()}, "output.when", "a object is not a JSON value"),
        (nested(MAX_DEPTH + 1), "output" + "[0]" * MAX_DEPTH, f"nested deeper than {MAX_DEPTH} levels"),
    ],
)
def test_a_value_past_a_limit_is_refused_naming_where_and_which(value: Any, path: str, problem: str) -> None:
    with pytest.raises(ValueOutOfBounds) as refused:
        check_value(value, "output")
    assert refused.value.path == path
    assert problem in refused.value.problem


def test_values_at_the_limits_pass() -> None:
    check_value({"ints": [MIN_INTEGER, MAX_INTEGER], "deep": nested(MAX_DEPTH - 1), "text": "héllo ✓"}, "v")


def test_a_hostile_depth_is_refused_without_exhausting_the_stack() -> None:
    with pytest.raises(ValueOutOfBounds, match="nested deeper than"):
        check_value(nested(200_000), "input")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(alphabet=st.characters(codec=None)),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=30,
)


@given(json_values)
def test_whatever_passes_can_be_encoded(value: Any) -> None:
    """Hostile values (huge integers, NaN, lone surrogates, nesting): the check refuses every
    one the encoder would refuse, so what it lets through is always recorded."""
    try:
        check_value(value, "v")
    except ValueOutOfBounds:
        return
    assert orjson.loads(orjson.dumps(value)) == value


def test_an_output_past_the_limits_fails_its_attempt_with_a_clear_error() -> None:
    outcome = NodeOutcome.success({"n": 2**64}, 3.0, "printed\ud800", "").recordable("total")

    assert not outcome.ok
    assert outcome.error_class == "ResultNotRecordable"
    assert outcome.error_message is not None
    assert outcome.error_message.startswith(
        "node 'total' returned a result the engine cannot record, at output.n: the integer"
    )
    assert outcome.stdout == "printed?"
    orjson.dumps(outcome.model_dump())


def test_printable_mends_lone_surrogates_and_keeps_the_rest() -> None:
    assert printable("ok \ud83d end ✓") == "ok ? end ✓"
