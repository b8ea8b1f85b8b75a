"""Specifications of the definition language: what `parse_definition` accepts and reports.

Every problem names where it is (the node and the field), and a document's problems are
all reported at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from schemas.definition import (
    DefinitionInvalid,
    Problem,
    RetryPolicy,
    WorkflowDefinition,
    definition_json_schema,
    parse_definition,
)

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


def python(
    node_id: str, *needs: str, code: str = "def main():\n    return 1\n", **config: Any
) -> dict[str, Any]:
    return {
        "id": node_id,
        "type": "python",
        "needs": list(needs),
        "config": {"code": code, **config},
    }


def transform(node_id: str, output: Any, *needs: str) -> dict[str, Any]:
    return {"id": node_id, "type": "transform", "needs": list(needs), "config": {"output": output}}


def document(*nodes: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"name": "orders", "nodes": list(nodes), **fields}


def problems_of(doc: Any) -> list[Problem]:
    with pytest.raises(DefinitionInvalid) as raised:
        parse_definition(doc)
    return raised.value.problems


def only_problem(doc: Any) -> Problem:
    (problem,) = problems_of(doc)
    return problem


GOOD_YAML = """
name: orders
version: 2
description: price an order and tell the customer
input:
  type: object
  required: [order_id]
  properties:
    order_id: {type: string}
nodes:
  - id: fetch
    type: python
    retry: {max_attempts: 3, retry_on: [TimeoutError]}
    config:
      inputs: {order_id: "input.order_id"}
      code: |
        def main(order_id):
            return {"amount": 120}
  - id: is_big
    type: condition
    needs: [fetch]
    config: {expression: "fetch.amount > 100"}
  - id: tell
    type: log
    needs: [is_big]
    when: "is_big.result"
    config: {message: "'big order ' + input.order_id", level: warning}
  - id: summary
    type: transform
    needs: [fetch, tell]
    config:
      output: {amount: "fetch.amount", told: "tell != null"}
outputs:
  amount: "summary.amount"
"""


# ---- accepted documents -------------------------------------------------------


def test_a_good_yaml_document_parses_into_a_definition() -> None:
    definition = parse_definition(GOOD_YAML)

    assert isinstance(definition, WorkflowDefinition)
    assert (definition.name, definition.version) == ("orders", 2)
    assert [n.id for n in definition.nodes] == ["fetch", "is_big", "tell", "summary"]
    assert definition.node("fetch").retry == RetryPolicy(max_attempts=3, retry_on=["TimeoutError"])
    assert definition.upstream("summary") == {"fetch", "is_big", "tell"}


def test_yaml_text_bytes_and_a_parsed_mapping_give_the_same_definition() -> None:
    from_text = parse_definition(GOOD_YAML)

    assert parse_definition(GOOD_YAML.encode()) == from_text
    assert parse_definition(yaml.safe_load(GOOD_YAML)) == from_text
    assert parse_definition(yaml.safe_load(GOOD_YAML)).digest() == from_text.digest()


def test_defaults_are_filled_in() -> None:
    definition = parse_definition(document(python("a")))

    assert definition.version == 1
    assert definition.input == {"type": "object"}
    assert definition.node("a").retry.max_attempts == 1
    assert definition.node("a").timeout_seconds == 60.0


def test_expressions_may_read_input_run_and_upstream_nodes() -> None:
    doc = document(
        python("a"),
        transform("b", {"x": "a.value", "who": "input.user", "run": "run.id", "n": "run.attempt"}, "a"),
        transform("c", "b.x", "b"),
        {"id": "d", "type": "log", "needs": ["c"], "config": {"message": "a.value"}},
        outputs={"x": "c", "first": "a"},
    )

    assert parse_definition(doc).node("c").needs == ["b"]


def test_the_digest_changes_with_the_content() -> None:
    one = parse_definition(document(python("a")))
    other = parse_definition(document(python("a", code="def main():\n    return 2\n")))

    assert one.digest() == parse_definition(document(python("a"))).digest()
    assert one.digest() != other.digest()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_shipped_example_is_a_valid_definition(path: Path) -> None:
    parse_definition(path.read_text(), source=path.name)


# ---- one problem, named where it is ---------------------------------------------


def test_an_unknown_node_type_is_named_with_the_known_types() -> None:
    problem = only_problem(document({"id": "run_it", "type": "shell"}))

    assert (problem.node, problem.location) == ("run_it", "nodes.run_it.type")
    assert "'shell'" in problem.message
    for known in ("condition", "log", "python", "transform"):
        assert known in problem.message


def test_a_cycle_is_named_with_its_path() -> None:
    problem = only_problem(document(python("a", "c"), python("b", "a"), python("c", "b")))

    assert problem.location == "nodes.a.needs"
    assert problem.node == "a"
    assert problem.message == "cycle: a -> c -> b -> a"


def test_a_node_needing_itself_is_named() -> None:
    problem = only_problem(document(python("a", "a")))

    assert (problem.node, problem.location) == ("a", "nodes.a.needs")
    assert "itself" in problem.message


def test_an_unknown_need_is_named() -> None:
    problem = only_problem(document(python("a"), python("b", "a", "ghost")))

    assert (problem.node, problem.location) == ("b", "nodes.b.needs")
    assert "'ghost'" in problem.message


@pytest.mark.parametrize(
    ("node", "location"),
    [
        (transform("t", "a.value +", "a"), "nodes.t.config.output"),
        (transform("t", {"total": "a.(value"}, "a"), "nodes.t.config.output.total"),
        (
            {"id": "t", "type": "condition", "needs": ["a"], "config": {"expression": "a >"}},
            "nodes.t.config.expression",
        ),
        (
            {"id": "t", "type": "log", "needs": ["a"], "config": {"message": "'unclosed"}},
            "nodes.t.config.message",
        ),
        (python("t", "a", inputs={"x": "a[0"}), "nodes.t.config.inputs.x"),
        ({**python("t", "a"), "when": "a ==="}, "nodes.t.when"),
    ],
    ids=["transform", "transform-field", "condition", "log", "python-input", "when"],
)
def test_an_expression_that_does_not_parse_is_named(node: dict[str, Any], location: str) -> None:
    problem = only_problem(document(python("a"), node))

    assert (problem.node, problem.location) == ("t", location)
    assert problem.message.startswith("expression does not parse")


def test_an_empty_expression_is_named() -> None:
    problem = only_problem(document(transform("t", "  ")))

    assert (problem.node, problem.location) == ("t", "nodes.t.config.output")
    assert "empty" in problem.message


def test_an_expression_referencing_a_name_that_does_not_exist_is_named() -> None:
    problem = only_problem(document(python("a"), transform("t", "a.value + nobody.value", "a")))

    assert (problem.node, problem.location) == ("t", "nodes.t.config.output")
    assert "'nobody'" in problem.message
    assert "'input'" in problem.message  # says what it could have been


def test_an_output_referencing_a_name_that_does_not_exist_is_named() -> None:
    problem = only_problem(document(python("a"), outputs={"total": "a + missing"}))

    assert (problem.node, problem.location) == (None, "outputs.total")
    assert "'missing'" in problem.message


def test_an_output_that_does_not_parse_is_named() -> None:
    problem = only_problem(document(python("a"), outputs={"total": "a +"}))

    assert problem.location == "outputs.total"
    assert problem.message.startswith("expression does not parse")


@pytest.mark.parametrize(
    "node",
    [
        transform("t", "b.value", "a"),
        {**python("t", "a"), "when": "b.ok"},
        python("t", "a", inputs={"x": "b"}),
    ],
    ids=["sibling-in-output", "sibling-in-when", "sibling-in-inputs"],
)
def test_referencing_a_node_that_is_not_upstream_says_to_add_it_to_needs(
    node: dict[str, Any],
) -> None:
    problem = only_problem(document(python("a"), python("b"), node))

    assert problem.node == "t"
    assert "'b'" in problem.message and "add it to needs" in problem.message


def test_referencing_a_node_upstream_through_another_is_fine() -> None:
    parse_definition(document(python("a"), python("b", "a"), transform("t", "a", "b")))


def test_referencing_a_downstream_node_says_to_add_it_to_needs() -> None:
    problem = only_problem(document(transform("a", "b"), python("b", "a")))

    assert (problem.node, problem.location) == ("a", "nodes.a.config.output")
    assert "add it to needs" in problem.message


def test_a_duplicate_node_id_is_named() -> None:
    problem = only_problem(document(python("a"), python("a")))

    assert (problem.node, problem.location) == ("a", "nodes.a.id")
    assert "duplicate" in problem.message


@pytest.mark.parametrize("node_id", ["input", "run", "true", "null", "in"])
def test_a_node_id_reserved_in_expressions_is_named(node_id: str) -> None:
    problem = only_problem(document(python(node_id)))

    assert (problem.node, problem.location) == (node_id, f"nodes.{node_id}.id")
    assert "reserved" in problem.message


def test_a_node_id_that_is_not_an_identifier_is_named() -> None:
    problem = problems_of(document(python("send-mail")))[0]

    assert problem.location == "nodes.send-mail.id"
    assert problem.node == "send-mail"


def test_a_python_syntax_error_is_named_with_its_line() -> None:
    code = "import math\n\ndef main(:\n    return math.pi\n"

    problem = only_problem(document(python("calc", code=code)))

    assert (problem.node, problem.location) == ("calc", "nodes.calc.config.code")
    assert "syntax error" in problem.message and "line 3" in problem.message


def test_python_code_without_main_is_named() -> None:
    problem = only_problem(document(python("calc", code="def run():\n    return 1\n")))

    assert (problem.node, problem.location) == ("calc", "nodes.calc.config.code")
    assert "'main'" in problem.message


def test_python_code_must_define_the_named_entrypoint() -> None:
    ok = python("calc", code="def handler():\n    return 1\n", entrypoint="handler")
    missing = python("calc", code="def main():\n    return 1\n", entrypoint="handler")

    parse_definition(document(ok))
    assert "'handler'" in only_problem(document(missing)).message


def test_an_unknown_config_field_is_named() -> None:
    problem = only_problem(document(python("calc", timeout=5)))

    assert (problem.node, problem.location) == ("calc", "nodes.calc.config.timeout")
    assert problem.message == "unknown field"


def test_a_missing_config_field_is_named() -> None:
    problem = only_problem(document({"id": "check", "type": "condition", "config": {}}))

    assert (problem.node, problem.location) == ("check", "nodes.check.config.expression")
    assert problem.message == "required field is missing"


def test_an_invalid_retry_policy_is_named() -> None:
    problem = only_problem(document(python("ok"), {**python("calc"), "retry": {"max_attempts": 0}}))

    assert (problem.node, problem.location) == ("calc", "nodes.calc.retry.max_attempts")


def test_an_unknown_top_level_field_is_named() -> None:
    problem = only_problem(document(python("a"), owner="ops"))

    assert (problem.node, problem.location, problem.message) == (None, "owner", "unknown field")


def test_an_unknown_node_field_is_named_once() -> None:
    problem = only_problem(document({**python("a"), "retries": 3}))

    assert (problem.node, problem.location, problem.message) == (
        "a",
        "nodes.a.retries",
        "unknown field",
    )


def test_reading_a_needed_node_that_has_its_own_problem_adds_no_false_problem() -> None:
    broken = {**python("fetch"), "retries": 3}

    problems = problems_of(document(python("start"), broken, transform("t", "fetch.value", "fetch")))

    assert [p.location for p in problems] == ["nodes.fetch.retries"]


def test_invalid_yaml_is_named_with_its_line() -> None:
    text = "name: orders\nnodes:\n  - id: a\n    type: [python\n"

    problem = only_problem(text)

    assert problem.location.startswith("line ")
    assert "not valid YAML" in problem.message


def test_an_invalid_yaml_indent_names_the_line_it_is_on() -> None:
    text = "name: orders\nnodes:\n  - id: a\n    type: python\n   config: {}\n"

    problem = only_problem(text)

    assert problem.location.startswith("line 5")


@pytest.mark.parametrize(
    ("schema", "location"),
    [
        ({"type": "objekt"}, "input.type"),
        ({"type": "object", "properties": {"email": {"type": 12}}}, "input.properties.email.type"),
        ({"type": "object", "required": "email"}, "input.required"),
    ],
    ids=["bad-type", "bad-property-type", "required-not-a-list"],
)
def test_an_invalid_input_json_schema_is_named(schema: dict[str, Any], location: str) -> None:
    problem = only_problem(document(python("a"), input=schema))

    assert problem.location == location
    assert "not a valid JSON Schema" in problem.message


@pytest.mark.parametrize(
    ("doc", "location"),
    [
        ([{"name": "orders"}], "document"),
        ("just a string", "document"),
        ({"name": "orders"}, "nodes"),
        ({"name": "orders", "nodes": []}, "nodes"),
        ({"nodes": [python("a")]}, "name"),
        ({"name": "Orders Flow", "nodes": [python("a")]}, "name"),
        ({"name": "orders", "nodes": ["a"]}, "nodes[0]"),
    ],
    ids=[
        "a-list",
        "a-scalar",
        "no-nodes",
        "empty-nodes",
        "no-name",
        "bad-name",
        "node-not-a-mapping",
    ],
)
def test_a_malformed_document_is_named(doc: Any, location: str) -> None:
    assert location in [p.location for p in problems_of(doc)]


# ---- all problems at once -------------------------------------------------------


def test_every_problem_of_a_document_is_reported_at_once() -> None:
    doc = {
        "name": "Bad Name",
        "owner": "ops",
        "input": {"type": "objekt"},
        "nodes": [
            python("start"),
            {"id": "shell", "type": "shell"},
            python("syntax", "start", code="def main(:\n"),
            python("nomain", "start", code="x = 1\n"),
            python("extra", "start", retries=2),
            python("lost", "start", "ghost"),
            transform("parse", "start +", "start"),
            transform("unknown", "nobody", "start"),
            transform("sibling", "lost", "start"),
            python("loop1", "loop2"),
            python("loop2", "loop1"),
            python("start"),
        ],
        "outputs": {"x": "nothing"},
    }

    problems = problems_of(doc)

    found = {(p.location, p.node) for p in problems}
    assert found >= {
        ("name", None),
        ("owner", None),
        ("input.type", None),
        ("nodes.shell.type", "shell"),
        ("nodes.syntax.config.code", "syntax"),
        ("nodes.nomain.config.code", "nomain"),
        ("nodes.extra.config.retries", "extra"),
        ("nodes.lost.needs", "lost"),
        ("nodes.parse.config.output", "parse"),
        ("nodes.unknown.config.output", "unknown"),
        ("nodes.sibling.config.output", "sibling"),
        ("nodes.loop1.needs", "loop1"),
        ("nodes.start.id", "start"),
        ("outputs.x", None),
    }


def test_the_error_message_lists_every_problem() -> None:
    with pytest.raises(DefinitionInvalid) as raised:
        parse_definition(document(python("a", "x"), python("b", "y")), source="orders.yaml")

    message = str(raised.value)
    assert message.startswith("orders.yaml has 2 problem(s):")
    assert "nodes.a.needs: needs unknown node 'x'" in message
    assert "nodes.b.needs: needs unknown node 'y'" in message


def test_the_same_problem_is_reported_once() -> None:
    problems = problems_of(document(python("a"), python("a"), python("a")))

    assert [(p.location, p.message) for p in problems] == [("nodes.a.id", "duplicate node id 'a'")]


# ---- retry policy -----------------------------------------------------------------


def test_constant_backoff_waits_the_same_before_every_attempt() -> None:
    policy = RetryPolicy(backoff="constant", delay_seconds=5, jitter=0)

    assert [policy.delay_before(n, seed="s") for n in (2, 3, 4)] == [5.0, 5.0, 5.0]


def test_exponential_backoff_multiplies_the_delay_and_stops_at_the_maximum() -> None:
    policy = RetryPolicy(delay_seconds=1, multiplier=3, max_delay_seconds=20, jitter=0)

    assert [policy.delay_before(n, seed="s") for n in (2, 3, 4, 5)] == [1.0, 3.0, 9.0, 20.0]


def test_jitter_is_deterministic_in_the_seed_and_within_bounds() -> None:
    policy = RetryPolicy(delay_seconds=10, jitter=0.3)
    delays = [policy.delay_before(2, seed=f"retry:{n}") for n in range(200)]

    assert delays == [policy.delay_before(2, seed=f"retry:{n}") for n in range(200)]
    assert all(7.0 <= d <= 13.0 for d in delays)
    assert len(set(delays)) > 100  # the seed spreads retries of many attempts apart


def test_jitter_never_exceeds_the_maximum_delay() -> None:
    policy = RetryPolicy(delay_seconds=100, max_delay_seconds=100, jitter=1)

    assert all(0 <= policy.delay_before(2, seed=str(n)) <= 100 for n in range(200))


def test_retry_on_limits_which_error_classes_retry() -> None:
    assert RetryPolicy().retries("AnyError")
    assert RetryPolicy(retry_on=["TimeoutError"]).retries("TimeoutError")
    assert not RetryPolicy(retry_on=["TimeoutError"]).retries("ValueError")


# ---- JSON Schema for editors --------------------------------------------------------


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    schema = definition_json_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_the_json_schema_accepts_a_good_document(validator: Draft202012Validator) -> None:
    assert list(validator.iter_errors(yaml.safe_load(GOOD_YAML))) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_the_json_schema_accepts_every_shipped_example(validator: Draft202012Validator, path: Path) -> None:
    assert list(validator.iter_errors(yaml.safe_load(path.read_text()))) == []


@pytest.mark.parametrize(
    ("doc", "complaint"),
    [
        (document({"id": "a", "type": "shell"}), "'shell' is not one of"),
        (document({**python("a"), "retries": 3}), "'retries' was unexpected"),
        (document(python("send-mail")), "does not match"),
        ({"name": "orders", "nodes": []}, "should be non-empty"),
        ({"nodes": [python("a")]}, "'name' is a required property"),
        (document({**python("a"), "retry": {"backoff": "linear"}}), "'linear' is not one of"),
    ],
    ids=["unknown-type", "unknown-field", "bad-id", "no-nodes", "no-name", "bad-backoff"],
)
def test_the_json_schema_rejects_a_bad_document(
    validator: Draft202012Validator, doc: dict[str, Any], complaint: str
) -> None:
    messages = [e.message for e in validator.iter_errors(doc)]

    assert any(complaint in m for m in messages), messages


@pytest.mark.parametrize(
    ("fields", "location", "words"),
    [
        ({"webhook": {"inputs": {"n": "body.n"}}}, "webhook.secret", "required field is missing"),
        ({"webhook": {"secret": "../etc/passwd"}}, "webhook.secret", "should match pattern"),
        (
            {"webhook": {"secret": "S", "inputs": {"n": "input.n"}}},
            "webhook.inputs",
            "may use only body, headers",
        ),
        ({"notify": [{"url": "ftp://x"}]}, "notify[0].url", "should match pattern"),
        (
            {"notify": [{"url": "https://x", "on": ["started"]}]},
            "notify[0].on[0]",
            "'completed', 'failed' or",
        ),
        (
            {"notify": [{"url": "https://x", "retry": {"max_attempts": 0}}]},
            "notify[0].retry.max_attempts",
            "greater than or equal to 1",
        ),
    ],
)
def test_a_bad_webhook_or_notify_target_is_named_by_its_place(
    fields: dict[str, Any], location: str, words: str
) -> None:
    document = {
        "name": "hooked",
        "nodes": [{"id": "a", "type": "transform", "config": {"output": "1"}}],
        **fields,
    }
    with pytest.raises(DefinitionInvalid) as caught:
        parse_definition(document)
    (problem,) = caught.value.problems
    assert problem.location == location and words in problem.message
