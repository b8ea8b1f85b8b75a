"""The workflow definition language: YAML or JSON documents validated into `WorkflowDefinition`.

`parse_definition` reports every problem of a document at once, each naming where it is
(node id and field), so a user fixes a definition in one pass.
"""

from __future__ import annotations

import ast
import datetime as dt
import hashlib
import re
import zoneinfo
from collections.abc import Iterable
from functools import cached_property
from typing import Annotated, Any, Literal

import orjson
import yaml
from croniter import croniter
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.expressions import BUILTINS, ExpressionError, references

NODE_ID = r"^[A-Za-z_][A-Za-z0-9_]*$"
WORKFLOW_NAME = r"^[a-z0-9][a-z0-9_.-]*$"
TOPIC_NAME = r"^[A-Za-z0-9._-]+$"
# The engine's own topics: a definition neither triggers on them nor publishes to them.
RESERVED_TOPIC_PREFIX = "citadel."
# What a trigger's expressions see: the Kafka message (topic, partition, offset, timestamp, key,
# headers, value).
MESSAGE = "message"
# CEL words a node id may not take, since node ids are expression variables.
RESERVED_IDS = frozenset(
    {
        *BUILTINS,
        "true",
        "false",
        "null",
        "in",
        "as",
        "break",
        "const",
        "continue",
        "else",
        "for",
        "function",
        "if",
        "import",
        "let",
        "loop",
        "package",
        "namespace",
        "return",
        "var",
        "void",
        "while",
        # a map item's step sees the item and its position under these names
        "item",
        "index",
    }
)
ITEM, INDEX = "item", "index"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def retryable_status(status: int) -> bool:
    """Whether an HTTP answer is worth asking again: 429 or a 5xx. Another 4xx is the caller's
    mistake, which no retry mends (the http node and outgoing webhooks alike)."""
    return status == 429 or status >= 500


class RetryPolicy(Strict):
    """How a failed node attempt is retried."""

    max_attempts: int = Field(default=1, ge=1, le=100)
    backoff: Literal["constant", "exponential"] = "exponential"
    delay_seconds: float = Field(default=1.0, ge=0, le=86_400)
    multiplier: float = Field(default=2.0, ge=1, le=10)
    max_delay_seconds: float = Field(default=300.0, ge=0, le=86_400)
    jitter: float = Field(default=0.2, ge=0, le=1, description="± fraction of the delay")
    retry_on: list[str] | None = Field(
        default=None, description="error classes that retry; every error when absent"
    )

    def retries(self, error_class: str) -> bool:
        return self.retry_on is None or error_class in self.retry_on

    def delay_before(self, attempt: int, seed: str) -> float:
        """Seconds to wait before `attempt` (2, 3, ...); jitter is deterministic in `seed`."""
        failures = attempt - 1
        base = self.delay_seconds
        if self.backoff == "exponential":
            base = self.delay_seconds * self.multiplier ** (failures - 1)
        base = min(base, self.max_delay_seconds)
        digest = hashlib.blake2b(seed.encode(), digest_size=8).digest()
        unit = int.from_bytes(digest, "big") / 2**64 * 2 - 1  # in [-1, 1)
        return max(0.0, min(base * (1 + self.jitter * unit), self.max_delay_seconds))


class TransformConfig(Strict):
    """Maps the context to a new value: one expression, or a {field: expression} object."""

    output: str | dict[str, str]


class ConditionConfig(Strict):
    """Evaluates a boolean expression; its output is {"result": bool}."""

    expression: str


class LogConfig(Strict):
    """Writes a message (a string expression) to the run's history and the engine log."""

    message: str
    level: Literal["debug", "info", "warning", "error"] = "info"


class PythonConfig(Strict):
    """Runs `entrypoint(**inputs)` from `code` in a sandboxed child process."""

    code: str
    entrypoint: str = Field(default="main", pattern=NODE_ID)
    inputs: dict[str, str] = Field(default_factory=dict, description="name: expression")
    network: bool = Field(default=False, description="ask for network access (if the deployment allows)")


class JavaScriptConfig(Strict):
    """Runs `entrypoint(inputs)` from `code` in a V8 isolate with memory and time limits."""

    code: str
    entrypoint: str = Field(default="main", pattern=NODE_ID)
    inputs: dict[str, str] = Field(default_factory=dict, description="name: expression")


class HttpRetryConfig(Strict):
    """The http node's own retries of one attempt (connection errors, 5xx, 429)."""

    max_attempts: int = Field(default=3, ge=1, le=20)
    delay_seconds: float = Field(default=0.2, ge=0, le=3600)
    multiplier: float = Field(default=2.0, ge=1, le=10)
    max_delay_seconds: float = Field(default=10.0, ge=0, le=3600)
    jitter: float = Field(default=0.2, ge=0, le=1)


class HttpConfig(Strict):
    """Calls an HTTP endpoint; `inputs` may supply `url`, `query` and `json` from expressions."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"] = "GET"
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict, description="values may use {{secret:NAME}}")
    query: dict[str, str | int | float | bool] = Field(default_factory=dict)
    json_body: Any = Field(default=None, alias="json")
    body: str | None = None
    timeout_seconds: float | None = Field(default=None, gt=0, le=3600)
    retry: HttpRetryConfig = Field(default_factory=HttpRetryConfig)
    secrets: list[str] = Field(default_factory=list, description="names of the secrets it may use")
    inputs: dict[str, str] = Field(default_factory=dict, description="name: expression")


class WaitConfig(Strict):
    """Waits for `seconds`, or `until` a time (an expression giving an RFC 3339 time); durable."""

    seconds: float | None = Field(default=None, ge=0, le=366 * 86_400)
    until: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> WaitConfig:
        if (self.seconds is None) == (self.until is None):
            raise ValueError("give exactly one of seconds and until")
        return self


class ApprovalConfig(Strict):
    """Waits for a Signal command for this node; its payload becomes the node's output."""

    expires_after_seconds: float | None = Field(default=None, gt=0, le=366 * 86_400)
    on_timeout: Literal["fail", "continue"] = Field(
        default="fail", description="continue: succeed with timed_out=true, for a timeout branch"
    )


def _user_topic(topic: str) -> str:
    if topic.startswith(RESERVED_TOPIC_PREFIX):
        raise ValueError(f"topics starting with {RESERVED_TOPIC_PREFIX!r} belong to the engine")
    return topic


UserTopic = Annotated[str, Field(pattern=TOPIC_NAME, max_length=249), AfterValidator(_user_topic)]


class KafkaConfig(Strict):
    """Publishes one message to a user topic; `key`, `headers` and `value` are expressions (the
    value is sent as JSON, a string key and string header values as their text, other values as
    JSON). The message carries the attempt id in the `citadel-attempt-id` header, so a consumer
    can drop the copies an at-least-once retry may publish. The output is {topic, partition,
    offset}. The topic is a name, not an expression, so it is known (and checked) at deploy time."""

    topic: UserTopic
    key: str | None = None
    headers: dict[str, str] = Field(default_factory=dict, description="name: expression")
    value: str


class Step(Strict):
    """A step the engine runs on a node's behalf: a map's per-item node, or a compensation."""

    type: Literal["python", "javascript", "http", "transform"]
    config: dict[str, Any] = Field(default_factory=dict)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout_seconds: float = Field(default=60.0, gt=0, le=86_400)


class MapConfig(Strict):
    """Runs `node` once per element of the list `items`, at most `concurrency` at a time; the
    output is the list of the items' outputs, in the order of `items`. The step's expressions
    see `item` and `index` besides the upstream nodes."""

    items: str = Field(description="expression giving a list")
    concurrency: int = Field(default=10, ge=1, le=1000)
    node: Step


class SubworkflowConfig(Strict):
    """Starts a run of a deployed workflow and waits for it; the child's outputs become this
    node's output, and cancelling or failing this run cancels the child."""

    workflow: str = Field(pattern=WORKFLOW_NAME, max_length=128)
    version: int | None = Field(default=None, ge=1, description="the latest when absent")
    inputs: dict[str, str] = Field(default_factory=dict, description="child input field: expression")


NODE_CONFIGS: dict[str, type[Strict]] = {
    "transform": TransformConfig,
    "condition": ConditionConfig,
    "log": LogConfig,
    "python": PythonConfig,
    "javascript": JavaScriptConfig,
    "http": HttpConfig,
    "wait": WaitConfig,
    "approval": ApprovalConfig,
    "map": MapConfig,
    "subworkflow": SubworkflowConfig,
    "kafka": KafkaConfig,
}
# Node types decided in the decide step itself (pure expressions, no hop to an executor).
INLINE_TYPES = frozenset({"transform", "condition", "log"})
# Node types the engine itself completes later, on a timer or a signal (no executor).
CONTROL_TYPES = frozenset({"wait", "approval", "map", "subworkflow"})
ENGINE_TYPES = INLINE_TYPES | CONTROL_TYPES


class ErrorHandler(Strict):
    """Route a node's final failure to another node, which must list it in `needs`."""

    handler: str = Field(pattern=NODE_ID)


class Node(Strict):
    id: str = Field(pattern=NODE_ID, max_length=64)
    type: str
    needs: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout_seconds: float = Field(default=60.0, gt=0, le=86_400)
    when: str | None = None
    on_error: Literal["fail", "continue"] | ErrorHandler = Field(
        default="fail",
        description="after the last attempt fails: fail the run, continue (dependents see the "
        "node as {error_class, message}), or {handler: NODE} (that node runs, other dependents "
        "are skipped)",
    )
    compensate: Step | None = Field(
        default=None,
        description="undoes this node's effect: run, in reverse completion order, when the run "
        "fails after this node succeeded (saga); its expressions see this node's output",
    )
    description: str = ""

    def typed_config(self) -> Any:
        return NODE_CONFIGS[self.type].model_validate(self.config)

    def expressions(self) -> Iterable[tuple[str, str, frozenset[str]]]:
        """(field path, expression, names it may read besides the upstream nodes) for every
        expression this node holds."""
        if self.when is not None:
            yield "when", self.when, frozenset()
        for field, source in _config_expressions(self.type, self.config):
            yield field, source, frozenset()
        if self.type == "map":
            step = self.config["node"]
            yield "config.items", self.config["items"], frozenset()
            for field, source in _config_expressions(step["type"], step.get("config", {})):
                yield f"config.node.{field}", source, frozenset({ITEM, INDEX})
        if self.compensate is not None:
            for field, source in _config_expressions(self.compensate.type, self.compensate.config):
                yield f"compensate.{field}", source, frozenset({self.id})

    def step(self, node_id: str, step: Step) -> Node:
        """The node that runs `step` on this node's behalf (validated already, so not again)."""
        return Node.model_construct(
            id=node_id,
            type=step.type,
            needs=[],
            config=step.config,
            retry=step.retry,
            timeout_seconds=step.timeout_seconds,
            when=None,
            on_error="fail",
            compensate=None,
            description="",
        )


def _config_expressions(node_type: str, config: dict[str, Any]) -> Iterable[tuple[str, str]]:
    """(field path under the node, expression) for the expressions of a node type's config."""
    if node_type == "transform":
        output = config.get("output")
        if isinstance(output, str):
            yield "config.output", output
        elif isinstance(output, dict):
            for name, source in output.items():
                yield f"config.output.{name}", source
    elif node_type == "condition":
        yield "config.expression", config["expression"]
    elif node_type == "log":
        yield "config.message", config["message"]
    elif node_type == "wait":
        if config.get("until") is not None:
            yield "config.until", config["until"]
    elif node_type in ("approval", "map"):
        return
    elif node_type == "kafka":
        if config.get("key") is not None:
            yield "config.key", config["key"]
        for name, source in config.get("headers", {}).items():
            yield f"config.headers.{name}", source
        yield "config.value", config["value"]
    else:
        for name, source in config.get("inputs", {}).items():
            yield f"config.inputs.{name}", source


class KafkaTrigger(Strict):
    """Starts one run of the (deployed) workflow per message on `topic` that passes `filter`.

    The expressions see `message`: {topic, partition, offset, timestamp (ms), key (text or null),
    headers ({name: text}), value (the value parsed as JSON)}. `input` maps the message to the
    run's input: a {field: expression} object, or one expression giving the whole input object.
    Of a workflow's triggers on one topic, the first whose filter holds starts the run.
    """

    topic: UserTopic
    filter: str | None = Field(default=None, description="expression; the message starts a run when true")
    input: str | dict[str, str] = Field(
        default_factory=dict, description="{field: expression}, or one expression giving the object"
    )

    def expressions(self) -> Iterable[tuple[str, str]]:
        """(field path under the trigger, expression) for every expression of this trigger."""
        if self.filter is not None:
            yield "filter", self.filter
        if isinstance(self.input, str):
            yield "input", self.input
        else:
            for name, source in self.input.items():
                yield f"input.{name}", source


class WorkflowDefinition(Strict):
    name: str = Field(pattern=WORKFLOW_NAME, max_length=128)
    version: int = Field(default=1, ge=1)
    description: str = ""
    input: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object"}, description="JSON Schema of the run input"
    )
    nodes: list[Node] = Field(min_length=1)
    outputs: dict[str, str] = Field(default_factory=dict)
    triggers: list[KafkaTrigger] = Field(default_factory=list, description="Kafka topics that start runs")
    # Triggers and outputs: what starts runs besides a caller, and whom a run's end is told.
    schedules: list[Schedule] = Field(default_factory=list, max_length=100)
    webhook: Webhook | None = None
    notify: list[Notify] = Field(default_factory=list, max_length=20)

    def node(self, node_id: str) -> Node:
        return self._by_id()[node_id]

    def _by_id(self) -> dict[str, Node]:
        return {n.id: n for n in self.nodes}

    def upstream(self, node_id: str) -> set[str]:
        """Every node `node_id` transitively needs."""
        by_id = self._by_id()
        seen: set[str] = set()
        stack = list(by_id[node_id].needs)
        while stack:
            current = stack.pop()
            if current not in seen and current in by_id:
                seen.add(current)
                stack.extend(by_id[current].needs)
        return seen

    @cached_property
    def document(self) -> dict[str, Any]:
        """The normalised JSON document of this definition (defaults filled in)."""
        return self.model_dump(mode="json")

    @cached_property
    def _digest(self) -> str:
        return hashlib.sha256(orjson.dumps(self.document, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def digest(self) -> str:
        return self._digest


# ---- triggers and outputs: schedules, the incoming webhook, outgoing notifications ----------

SECRET_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"  # as nodes/secrets.py reads them
# What a schedule's `inputs` expressions see: {name, due_at (RFC 3339, UTC), workflow}.
SCHEDULE = "schedule"
# What a webhook's `inputs` expressions see: the JSON request body and the request headers.
BODY, HEADERS = "body", "headers"
_INTERVAL = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?$")


def interval_seconds(value: float | str) -> float:
    """Seconds of an interval given as a number of seconds or as text like "15m", "1h30m", "2d"."""
    if isinstance(value, int | float):
        return float(value)
    match = _INTERVAL.match(value.strip())
    if not value.strip() or match is None:
        raise ValueError(f"{value!r} is not an interval: give seconds, or e.g. '90s', '15m', '1h30m', '2d'")
    days, hours, minutes, seconds = (float(part or 0) for part in match.groups())
    return days * 86_400 + hours * 3600 + minutes * 60 + seconds


def _only_names(mapping: dict[str, str], allowed: frozenset[str]) -> dict[str, str]:
    for name, source in mapping.items():
        try:
            unknown = references(source) - allowed
        except ExpressionError as exc:
            raise ValueError(f"{name}: expression does not parse: {exc}") from None
        if unknown:
            known = ", ".join(sorted(allowed))
            raise ValueError(f"{name}: references {', '.join(sorted(unknown))}; it may use only {known}")
    return mapping


class Schedule(Strict):
    """Starts a run at each due time: of a 5-field `cron` expression in `timezone`, or `every`
    fixed interval (counted from 1970-01-01 UTC, so '15m' fires at :00, :15, :30, :45)."""

    name: str | None = Field(default=None, pattern=NODE_ID, max_length=64, description="default: its index")
    cron: str | None = Field(default=None, description="minute hour day-of-month month day-of-week")
    timezone: str = Field(default="UTC", description="IANA name the cron expression is read in")
    every: float | str | None = Field(default=None, description="seconds, or text like '15m', '1h30m'")
    input: dict[str, Any] = Field(default_factory=dict, description="the run input: a constant object")
    inputs: dict[str, str] = Field(
        default_factory=dict,
        description="input field: expression over `schedule` ({name, due_at, workflow}); over `input`",
    )
    catch_up: Literal["skip", "once", "all"] = Field(
        default="skip",
        description="due times missed while no engine ran: skip them, start one run for the latest, "
        "or start one run for each (the latest max_catch_up)",
    )
    max_catch_up: int = Field(default=100, ge=1, le=10_000)

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None and (len(value.split()) != 5 or not croniter.is_valid(value)):
            raise ValueError(
                f"{value!r} is not a 5-field cron expression (minute hour day-of-month month day-of-week)"
            )
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (e.g. 'Europe/Berlin', 'UTC')") from None
        return value

    @field_validator("every")
    @classmethod
    def _every(cls, value: float | str | None) -> float | str | None:
        if value is not None and not 1 <= interval_seconds(value) <= 366 * 86_400:
            raise ValueError("the interval must be between 1 second and 366 days")
        return value

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, value: dict[str, str]) -> dict[str, str]:
        return _only_names(value, frozenset({SCHEDULE}))

    @model_validator(mode="after")
    def _one_of(self) -> Schedule:
        if (self.cron is None) == (self.every is None):
            raise ValueError("give exactly one of cron and every")
        return self

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)

    @property
    def interval(self) -> dt.timedelta | None:
        return None if self.every is None else dt.timedelta(seconds=interval_seconds(self.every))

    def timing(self) -> tuple[str | None, str, float | None]:
        """What decides the due times: two schedules with the same timing share them."""
        interval = self.interval
        return self.cron, self.timezone, None if interval is None else interval.total_seconds()


class Webhook(Strict):
    """`POST /hooks/{tenant}/{workflow}` starts a run, signed with HMAC-SHA256 by `secret`."""

    secret: str = Field(pattern=SECRET_NAME, description="name of the engine secret that signs requests")
    inputs: dict[str, str] = Field(
        default_factory=dict,
        description="input field: expression over `body` and `headers`; the body is the input when empty",
    )
    tolerance_seconds: float = Field(default=300.0, gt=0, le=86_400, description="replay window")

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, value: dict[str, str]) -> dict[str, str]:
        return _only_names(value, frozenset({BODY, HEADERS}))


RunEnd = Literal["completed", "failed", "cancelled"]
RUN_ENDS: tuple[RunEnd, ...] = ("completed", "failed", "cancelled")


class Notify(Strict):
    """POSTs a signed JSON summary of the run to `url` when it ends as one of `on`."""

    url: str = Field(pattern=r"^https?://", max_length=2048)
    on: list[RunEnd] = Field(default_factory=lambda: list(RUN_ENDS), min_length=1)
    secret: str | None = Field(
        default=None, pattern=SECRET_NAME, description="name of the engine secret that signs the body"
    )
    retry: RetryPolicy = Field(
        default_factory=lambda: RetryPolicy(max_attempts=5, delay_seconds=2.0, max_delay_seconds=600.0)
    )
    timeout_seconds: float = Field(default=10.0, gt=0, le=300)

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, value: Any) -> Any:
        # YAML 1.1 (PyYAML) reads a bare `on:` key as the boolean true.
        if isinstance(value, dict) and True in value and "on" not in value:
            value = {("on" if key is True else key): item for key, item in value.items()}
        return value


class Problem(Strict):
    """One thing wrong with a definition, and where."""

    location: str
    message: str
    node: str | None = None

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class DefinitionInvalid(Exception):
    """A definition has problems; `problems` lists all of them."""

    def __init__(self, problems: list[Problem], source: str = "definition") -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n{lines}")


def load_document(text: str, source: str = "definition") -> Any:
    """Parse YAML (a superset of JSON) text; a syntax error names the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "document"
        problem = getattr(exc, "problem", None) or str(exc)
        raise DefinitionInvalid(
            [Problem(location=where, message=f"not valid YAML: {problem}")], source
        ) from None


def parse_definition(document: Any, source: str = "definition") -> WorkflowDefinition:
    """Validate a definition document (text or parsed) and return it, or raise DefinitionInvalid."""
    if isinstance(document, str | bytes):
        document = load_document(document.decode() if isinstance(document, bytes) else document, source)
    if not isinstance(document, dict):
        problem = Problem(location="document", message="must be a mapping with name and nodes")
        raise DefinitionInvalid([problem], source)

    problems: list[Problem] = []
    raw_nodes = document.get("nodes")
    nodes: list[Node] = []
    if isinstance(raw_nodes, list):
        for index, raw in enumerate(raw_nodes):
            node = _parse_node(index, raw, problems)
            if node is not None:
                nodes.append(node)
    header = {k: v for k, v in document.items() if k != "nodes"}
    try:
        definition = WorkflowDefinition.model_validate(
            {**header, "nodes": raw_nodes if not isinstance(raw_nodes, list) else nodes or raw_nodes}
        )
    except ValidationError as exc:
        # Node problems were reported node by node above.
        problems.extend(
            _problems_from(exc, prefix="", skip_nodes=isinstance(raw_nodes, list) and bool(raw_nodes))
        )
        definition = None
    if isinstance(raw_nodes, list) and not raw_nodes:
        problems.append(Problem(location="nodes", message="a workflow needs at least one node"))

    problems.extend(_check_input_schema(document.get("input")))
    if nodes:
        declared = {
            raw["id"] for raw in raw_nodes or [] if isinstance(raw, dict) and isinstance(raw.get("id"), str)
        }
        problems.extend(_check_graph(nodes, declared, document.get("outputs")))
    if isinstance(document.get("triggers"), list):
        problems.extend(_check_triggers(document["triggers"]))
    if problems or definition is None:
        raise DefinitionInvalid(_unique(problems), source)
    return definition


def _parse_node(index: int, raw: Any, problems: list[Problem]) -> Node | None:
    node_name = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
    where = f"nodes.{node_name}" if node_name else f"nodes[{index}]"
    if not isinstance(raw, dict):
        problems.append(Problem(location=where, message="must be a mapping with id and type"))
        return None
    try:
        node = Node.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_problems_from(exc, prefix=where, node=node_name))
        return None
    if node.type not in NODE_CONFIGS:
        known = ", ".join(sorted(NODE_CONFIGS))
        problems.append(
            Problem(
                location=f"{where}.type",
                node=node.id,
                message=f"unknown node type {node.type!r}; known types: {known}",
            )
        )
        return None
    found = _check_config(f"{where}.config", node.id, node.type, node.config)
    if node.type == "map" and not found:
        step = node.typed_config().node
        found += _check_config(f"{where}.config.node.config", node.id, step.type, step.config)
    if node.compensate is not None:
        step = node.compensate
        found += _check_config(f"{where}.compensate.config", node.id, step.type, step.config)
    problems.extend(found)
    return None if found else node


def _check_config(where: str, node_id: str, node_type: str, config: dict[str, Any]) -> list[Problem]:
    """Problems of the config of a node or a step of a known type."""
    try:
        model = NODE_CONFIGS[node_type].model_validate(config)
    except ValidationError as exc:
        return _problems_from(exc, prefix=where, node=node_id)
    if not isinstance(model, PythonConfig):
        return []
    try:
        tree = ast.parse(model.code, filename=f"<node {node_id}>")
    except SyntaxError as exc:
        return [
            Problem(
                location=f"{where}.code",
                node=node_id,
                message=f"Python syntax error at line {exc.lineno}: {exc.msg}",
            )
        ]
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    if model.entrypoint not in defined:
        return [
            Problem(
                location=f"{where}.code",
                node=node_id,
                message=f"defines no function {model.entrypoint!r} to call",
            )
        ]
    return []


def _check_input_schema(schema: Any) -> list[Problem]:
    if schema is None or not isinstance(schema, dict):
        return []
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        path = ".".join(str(p) for p in exc.absolute_path)
        return [
            Problem(
                location="input" + (f".{path}" if path else ""),
                message=f"not a valid JSON Schema: {exc.message}",
            )
        ]
    return []


def _check_triggers(raw_triggers: list[Any]) -> list[Problem]:
    """Problems of the triggers' expressions (their fields are checked with the header)."""
    problems = []
    for index, raw in enumerate(raw_triggers):
        try:
            trigger = KafkaTrigger.model_validate(raw)
        except ValidationError:
            continue
        for field, source in trigger.expressions():
            location = f"triggers[{index}].{field}"
            try:
                names = references(source)
            except ExpressionError as exc:
                problems.append(Problem(location=location, message=f"expression does not parse: {exc}"))
                continue
            problems.extend(
                Problem(location=location, message=f"references {name!r}; a trigger sees only 'message'")
                for name in sorted(names - {MESSAGE})
            )
    return problems


def _check_graph(nodes: list[Node], declared: set[str], outputs: Any) -> list[Problem]:
    """Checks across nodes; `declared` also holds the ids of nodes that failed their own checks."""
    problems: list[Problem] = []
    by_id: dict[str, Node] = {}
    for node in nodes:
        if node.id in by_id:
            problems.append(
                Problem(
                    location=f"nodes.{node.id}.id", node=node.id, message=f"duplicate node id {node.id!r}"
                )
            )
        if node.id in RESERVED_IDS:
            problems.append(
                Problem(
                    location=f"nodes.{node.id}.id",
                    node=node.id,
                    message=f"{node.id!r} is reserved in expressions; rename the node",
                )
            )
        by_id[node.id] = node
    for node in nodes:
        for need in node.needs:
            if need == node.id:
                problems.append(
                    Problem(
                        location=f"nodes.{node.id}.needs", node=node.id, message="a node cannot need itself"
                    )
                )
            elif need not in declared:
                problems.append(
                    Problem(
                        location=f"nodes.{node.id}.needs",
                        node=node.id,
                        message=f"needs unknown node {need!r}",
                    )
                )
    for node in nodes:
        if isinstance(node.on_error, ErrorHandler):
            handler = node.on_error.handler
            if handler not in declared:
                problems.append(
                    Problem(
                        location=f"nodes.{node.id}.on_error.handler",
                        node=node.id,
                        message=f"handler {handler!r} is not a node",
                    )
                )
            elif handler in by_id and node.id not in by_id[handler].needs:
                problems.append(
                    Problem(
                        location=f"nodes.{node.id}.on_error.handler",
                        node=node.id,
                        message=f"handler {handler!r} must list {node.id!r} in its needs",
                    )
                )
    cycle = _find_cycle(by_id)
    if cycle:
        problems.append(
            Problem(location=f"nodes.{cycle[0]}.needs", node=cycle[0], message="cycle: " + " -> ".join(cycle))
        )
    for node in nodes:
        upstream = _upstream(by_id, node.id)
        for field, source, extra in node.expressions():
            problems.extend(
                _check_expression(
                    f"nodes.{node.id}.{field}", source, upstream | extra, declared | extra, node.id, by_id
                )
            )
    if isinstance(outputs, dict):
        for name, source in outputs.items():
            if isinstance(source, str):
                problems.extend(_check_expression(f"outputs.{name}", source, declared, declared, None, by_id))
    return problems


def _check_expression(
    location: str,
    source: str,
    visible: set[str],
    declared: set[str],
    node_id: str | None,
    by_id: dict[str, Node],
) -> list[Problem]:
    """Problems of one expression; a node with problems of its own is not judged for upstream."""
    try:
        names = references(source)
    except ExpressionError as exc:
        return [Problem(location=location, node=node_id, message=f"expression does not parse: {exc}")]
    problems = []
    for name in sorted(names - BUILTINS):
        if name not in declared:
            problems.append(
                Problem(
                    location=location,
                    node=node_id,
                    message=f"references {name!r}, which is not 'input', 'run' or a node",
                )
            )
        elif name not in visible and name in by_id:
            problems.append(
                Problem(
                    location=location,
                    node=node_id,
                    message=f"references node {name!r}, which is not upstream; add it to needs",
                )
            )
    return problems


def _upstream(by_id: dict[str, Node], node_id: str) -> set[str]:
    seen: set[str] = set()
    stack = [n for n in by_id[node_id].needs if n in by_id]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(n for n in by_id[current].needs if n in by_id)
    seen.discard(node_id)
    return seen


def _find_cycle(by_id: dict[str, Node]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    path: list[str] = []

    def visit(node_id: str) -> list[str] | None:
        state[node_id] = 1
        path.append(node_id)
        for need in by_id[node_id].needs:
            if need not in by_id or need == node_id:
                continue
            if state.get(need) == 1:
                return [*path[path.index(need) :], need]
            if need not in state:
                found = visit(need)
                if found:
                    return found
        path.pop()
        state[node_id] = 2
        return None

    for node_id in by_id:
        if node_id not in state:
            found = visit(node_id)
            if found:
                return found
    return None


def _problems_from(
    exc: ValidationError, prefix: str, node: str | None = None, skip_nodes: bool = False
) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        if skip_nodes and loc and loc[0] == "nodes":
            continue  # already reported per node
        path = ""
        for part in error["loc"]:  # a list item is named by its index: schedules[0].cron
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        location = f"{prefix}.{path}" if prefix and path else (prefix or path or "document")
        message = error["msg"]
        if error["type"] == "value_error":
            message = str(error.get("ctx", {}).get("error", message))
        elif error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] == "missing":
            message = "required field is missing"
        problems.append(Problem(location=location, node=node, message=message))
    return problems


def _unique(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[str, str]] = set()
    result = []
    for p in problems:
        if (p.location, p.message) not in seen:
            seen.add((p.location, p.message))
            result.append(p)
    return result


def definition_json_schema() -> dict[str, Any]:
    """JSON Schema of a definition document, for editors."""
    schema = WorkflowDefinition.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Citadel workflow definition"
    schema["$defs"]["Node"]["properties"]["type"]["enum"] = sorted(NODE_CONFIGS)
    return schema
