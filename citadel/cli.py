"""The `citadel` command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal as signals
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer
from aiokafka import AIOKafkaProducer
from jsonschema import Draft202012Validator
from opentelemetry.sdk.trace.export import SpanExporter
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from citadel.runs import RunReport, follow, start_command
from citadel.settings import Settings
from citadel.stack import (
    announce,
    kafka_settings,
    running_engine,
    running_stack,
    withdraw,
)
from citadel.telemetry import exporting_traces, setup_logging, span_exporter
from schemas.definition import DefinitionInvalid, definition_json_schema, parse_definition
from schemas.envelope import Envelope, command_json_schema
from streams.kafka import KafkaSettings, send_command
from streams.watch import CommandRejected

log = logging.getLogger("citadel.cli")

app = typer.Typer(
    help="Citadel: an event-sourced workflow automation engine.\n\n"
    "With no configuration everything runs embedded: a bundled Kafka-compatible broker, "
    "SQLite under ./.citadel/. Set CITADEL_KAFKA and CITADEL_EVENT_STORE for production.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
out = Console()
err = Console(stderr=True)

EXIT_FAILED, EXIT_INVALID, EXIT_TIMEOUT = 1, 2, 3


def _load(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        err.print(f"[red]cannot read {path}: {exc.strerror}[/red]")
        raise typer.Exit(EXIT_INVALID) from None
    try:
        return parse_definition(text, source=str(path)).model_dump(mode="json")
    except DefinitionInvalid as exc:
        err.print(f"[red]{path} is not a valid workflow definition ({len(exc.problems)} problem(s)):[/red]")
        for problem in exc.problems:
            err.print(f"  [bold]{problem.location}[/bold]: {problem.message}")
        raise typer.Exit(EXIT_INVALID) from None


@app.command()
def validate(files: Annotated[list[Path], typer.Argument(help="definition files (YAML or JSON)")]) -> None:
    """Check workflow definitions and report every problem, naming node and field."""
    failed = False
    for path in files:
        try:
            _load(path)
            out.print(f"[green]ok[/green] {path}")
        except typer.Exit:
            failed = True
    if failed:
        raise typer.Exit(EXIT_INVALID)


@app.command()
def schema(
    commands: Annotated[bool, typer.Option("--commands", help="the command envelope instead")] = False,
) -> None:
    """Print the JSON Schema of workflow definitions (for editors), or of commands."""
    document = command_json_schema() if commands else definition_json_schema()
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


@app.command()
def deploy(
    file: Annotated[Path, typer.Argument(help="workflow definition (YAML or JSON)")],
    tenant: Annotated[str, typer.Option(help="the tenant whose workflow it is")] = "default",
) -> None:
    """Validate a definition and deploy it to the event store as the gateway does (the tenant's
    NAME is stored as TENANT.NAME); running engines take up its triggers within a second."""
    from aggregates.store import RunStore
    from aggregates.workflow import VersionConflict
    from gateway.auth import TENANT
    from gateway.tenancy import scoped_definition

    if not TENANT.match(tenant):
        err.print("[red]a tenant is lower-case letters, digits, - and _[/red]")
        raise typer.Exit(EXIT_INVALID)
    definition = _load(file)
    try:
        scoped = parse_definition(scoped_definition(tenant, definition), source=str(file))
    except DefinitionInvalid as exc:  # the scoped name can outgrow the length limit
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_INVALID) from None
    store = RunStore(Settings.from_env().event_store)
    try:
        created = store.deploy(scoped)
    except VersionConflict as exc:
        err.print(f"[red]{str(exc).replace(scoped.name, definition['name'])}[/red]")
        raise typer.Exit(EXIT_INVALID) from None
    finally:
        store.close()
    state = "deployed (new)" if created else "already deployed (unchanged)"
    out.print(f"workflow {definition['name']!r} of tenant {tenant!r}: version {scoped.version} {state}")


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="workflow definition (YAML or JSON)")],
    input: Annotated[str, typer.Option("--input", "-i", help="run input as a JSON object")] = "{}",
    tenant: Annotated[str, typer.Option(help="tenant the run belongs to")] = "default",
    timeout: Annotated[float, typer.Option(help="give up waiting after this many seconds")] = 600.0,
    json_output: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Run a workflow to completion and print its outputs and a per-node summary.

    Submits to a running `citadel up` in this directory if there is one; otherwise starts
    the embedded engine for the duration of the run. Exits 1 if the run failed.
    """
    definition = _load(file)
    try:
        run_input = json.loads(input)
    except json.JSONDecodeError as exc:
        err.print(f"[red]--input is not JSON: {exc}[/red]")
        raise typer.Exit(EXIT_INVALID) from None
    if not isinstance(run_input, dict):
        err.print("[red]--input must be a JSON object[/red]")
        raise typer.Exit(EXIT_INVALID)
    problems = list(Draft202012Validator(definition["input"]).iter_errors(run_input))
    if problems:
        err.print(f"[red]--input does not match the input schema of {definition['name']!r}:[/red]")
        for problem in problems:
            where = "".join(f".{p}" for p in problem.absolute_path)
            err.print(f"  [bold]input{where}[/bold]: {problem.message}")
        raise typer.Exit(EXIT_INVALID)
    _run_and_report(start_command(definition, run_input, tenant), "run", timeout, json_output)


def _run_and_report(command: Envelope, what: str, timeout: float, json_output: bool) -> None:
    """Submit a StartRun, follow the run to its end, print it; exit 1 failed, 2 rejected, 3 timeout."""
    settings = Settings.from_env()
    setup_logging(settings, serving=False)
    try:
        report = asyncio.run(asyncio.wait_for(_run(settings, command), timeout))
    except TimeoutError:
        err.print(f"[red]run {command.run_id} did not finish within {timeout:g}s[/red]")
        raise typer.Exit(EXIT_TIMEOUT) from None
    except CommandRejected as exc:
        err.print(f"[red]the engine rejected the {what}: {exc}[/red]")
        raise typer.Exit(EXIT_INVALID) from None
    _print_report(report, json_output)
    if report.status != "completed":
        raise typer.Exit(EXIT_FAILED)


async def _run(settings: Settings, command: Envelope) -> RunReport:
    engine = running_engine(settings)
    if engine is not None:
        await _send_command(engine.kafka, command)
        if engine.gateway is not None:
            err.print(f"watch it live: {engine.gateway}/#run={command.run_id}", soft_wrap=True)
        return await _follow_with_progress(engine.kafka, command)
    with err.status("starting the embedded engine…"):
        stack_cm = running_stack(settings)
        stack = await stack_cm.__aenter__()
    try:
        await stack.engine.submit(command)
        return await _follow_with_progress(stack.kafka, command)
    finally:
        await stack_cm.__aexit__(None, None, None)


def _progress() -> Progress:
    """The one progress bar of the CLI, on stderr, gone when done."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


async def _follow_with_progress(kafka: KafkaSettings, command: Envelope) -> RunReport:
    progress = _progress()
    with progress:
        bar = progress.add_task(f"run {command.run_id[:8]}", total=None)

        def update(report: RunReport, event: Envelope) -> None:
            node = event.payload.get("node_id")
            what = f"{event.type} {node}" if node else event.type
            progress.update(
                bar,
                total=len(report.nodes) or None,
                completed=report.done,
                description=f"run {command.run_id[:8]}: {what}",
            )

        return await follow(kafka, command.run_id, command.id, on_event=update)


def _print_report(report: RunReport, as_json: bool) -> None:
    if as_json:
        nodes = {
            n.node_id: {
                "status": n.status,
                "attempts": n.attempts,
                "duration_ms": n.duration_ms,
                "error": n.error,
            }
            for n in report.nodes.values()
        }
        sys.stdout.write(
            json.dumps(
                {
                    "run_id": report.run_id,
                    "status": report.status,
                    "outputs": report.outputs,
                    "error": report.error,
                    "nodes": nodes,
                },
                indent=2,
            )
            + "\n"
        )
        return
    table = Table(title=f"run {report.run_id}")
    for column in ("node", "status", "attempts", "duration", "error"):
        table.add_column(column)
    colours = {"succeeded": "green", "failed": "red", "skipped": "yellow"}
    for node in report.nodes.values():
        duration = f"{node.duration_ms:.1f} ms" if node.duration_ms is not None else "-"
        colour = colours.get(node.status, "white")
        table.add_row(
            node.node_id,
            f"[{colour}]{node.status}[/{colour}]",
            str(node.attempts),
            duration,
            node.error or "",
        )
    out.print(table)
    if report.status == "completed":
        out.print("[green]completed[/green]; outputs:")
        out.print_json(json.dumps(report.outputs))
    else:
        out.print(f"[red]{report.status}[/red]: {report.error}")


@app.command("signal")
def send_signal(
    run_id: Annotated[str, typer.Argument(help="the run")],
    node: Annotated[str, typer.Argument(help="the approval node waiting for the signal")],
    payload: Annotated[str, typer.Option(help="JSON payload for the node's output")] = "null",
    tenant: Annotated[str, typer.Option(help="tenant the run belongs to")] = "default",
) -> None:
    """Answer an approval node of a running run (needs a running `citadel up`)."""
    try:
        value = json.loads(payload)
    except json.JSONDecodeError as exc:
        err.print(f"[red]--payload is not JSON: {exc}[/red]")
        raise typer.Exit(EXIT_INVALID) from None
    _publish(Envelope.new("Signal", run_id, {"node_id": node, "payload": value}, tenant=tenant))
    out.print(f"signal sent to node {node!r} of run {run_id}")


@app.command()
def cancel(
    run_id: Annotated[str, typer.Argument(help="the run")],
    reason: Annotated[str, typer.Option(help="why, for the run's history")] = "cancelled by user",
    tenant: Annotated[str, typer.Option(help="tenant the run belongs to")] = "default",
) -> None:
    """Cancel a running run: nothing more is scheduled (needs a running `citadel up`)."""
    _publish(Envelope.new("CancelRun", run_id, {"reason": reason}, tenant=tenant))
    out.print(f"cancel sent for run {run_id}")


def _publish(command: Envelope) -> None:
    settings = Settings.from_env()
    if settings.embedded:
        engine = running_engine(settings)
        kafka = None if engine is None else engine.kafka
    else:
        kafka = kafka_settings(settings, settings.kafka or "")
    if kafka is None:
        err.print(f"[red]no running engine: start one with `citadel up` (home {settings.home})[/red]")
        raise typer.Exit(EXIT_INVALID)
    asyncio.run(_send_command(kafka, command))


async def _send_command(kafka: KafkaSettings, command: Envelope) -> None:
    """Publish one command to `citadel.commands`, as any Kafka client could."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    try:
        await send_command(producer, kafka, command)
    finally:
        await producer.stop()


@app.command()
def up() -> None:
    """Start the whole engine in this process (embedded by default). Ctrl-C stops it cleanly."""
    settings = Settings.from_env()
    setup_logging(settings, serving=True)
    with contextlib.suppress(KeyboardInterrupt), exporting_traces(_span_exporter(settings)):
        asyncio.run(_serve(settings, announce_self=True))


@app.command()
def worker(
    projector: Annotated[
        bool | None,
        typer.Option(
            "--projector/--no-projector",
            help="run a projector in this process too; default: when CITADEL_CLICKHOUSE is set "
            "(with --no-projector, run `citadel projector` processes instead)",
        ),
    ] = None,
) -> None:
    """Run a production worker against CITADEL_KAFKA and CITADEL_EVENT_STORE."""
    _serve_in_production("worker", lambda settings: _serve(settings, announce_self=False, project=projector))


@app.command("projector")
def projector_command() -> None:
    """Run the projector in a process of its own: run events from CITADEL_KAFKA into
    CITADEL_CLICKHOUSE (chDB under CITADEL_HOME when unset).

    Projectors in one group (CITADEL_PROJECTOR_GROUP) share the partitions of citadel.run-events;
    each writes a batch, then commits it, so a projector killed at any point loses nothing and
    a restarted one duplicates nothing. Ctrl-C or SIGTERM stops it after its batch in hand.
    """
    _serve_in_production("projector", _serve_projector)


@app.command("gateway")
def gateway_command() -> None:
    """Run the GraphQL gateway in a process of its own, beside production workers.

    Commands go to CITADEL_KAFKA's `citadel.commands`, live events come from `citadel.run-events`,
    runs and workflows are read from CITADEL_EVENT_STORE, analytics from CITADEL_CLICKHOUSE.
    """
    _serve_in_production("gateway", _serve_gateway)


def _serve_in_production(command: str, serve: Callable[[Settings], Coroutine[Any, Any, None]]) -> None:
    """A production process: it needs the workers' broker and store; logs and traces as set."""
    settings = Settings.from_env()
    if settings.embedded:
        usually = (
            "CITADEL_CLICKHOUSE=http://..."
            if command == "projector"
            else "CITADEL_EVENT_STORE=postgresql://..."
        )
        err.print(
            f"[red]citadel {command} needs CITADEL_KAFKA (bootstrap servers) and usually "
            f"{usually}; for a local engine use `citadel up`[/red]"
        )
        raise typer.Exit(EXIT_INVALID)
    setup_logging(settings, serving=True)
    with exporting_traces(_span_exporter(settings)):
        asyncio.run(serve(settings))


def _stopped_by_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM: a serving command's cue to stop cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signals.SIGINT, signals.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _serve_gateway(settings: Settings) -> None:
    from citadel.gateway import standalone_gateway

    stop = _stopped_by_signals()
    async with standalone_gateway(settings) as gateway:
        out.print(f"[green]Citadel gateway is up[/green]: {gateway.url}/graphql", soft_wrap=True)
        await stop.wait()


async def _serve_projector(settings: Settings) -> None:
    from citadel.projector import running_projector
    from streams.kafka import RUN_EVENTS, ensure_topics

    stop = _stopped_by_signals()
    assert settings.kafka is not None
    kafka = kafka_settings(settings, settings.kafka)
    await ensure_topics(kafka, (RUN_EVENTS,))
    async with running_projector(settings, kafka) as running:
        out.print(
            f"[green]Citadel projector is up[/green]: {kafka.topic(RUN_EVENTS)} → "
            f"{_redact(settings.clickhouse_url)} (group {settings.projector_group})",
            soft_wrap=True,
        )
        metrics = running.projector.metrics
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 30)
            log.info(
                "projector: %d events written, %d duplicates dropped, %d messages behind",
                metrics.events,
                metrics.duplicates,
                metrics.lag_messages,
            )
        out.print("stopping…")


def _span_exporter(settings: Settings) -> SpanExporter | None:
    try:
        return span_exporter(settings.traces)
    except ValueError as exc:
        err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(EXIT_INVALID) from None


async def _serve(settings: Settings, announce_self: bool, project: bool | None = None) -> None:
    from citadel.gateway import running_gateway  # FastAPI and Strawberry: only for a serving process

    stop = _stopped_by_signals()
    with err.status("starting the engine…") if err.is_terminal else contextlib.nullcontext():
        stack_cm = running_stack(settings, keep_broker=announce_self, project=project)
        stack = await stack_cm.__aenter__()
    try:
        async with contextlib.AsyncExitStack() as serving:
            gateway = None
            if settings.gateway_port:
                gateway = await serving.enter_async_context(
                    running_gateway(settings, stack.engine, stack.projector)
                )
            if announce_self:
                announce(stack, gateway.url if gateway is not None else None)

            # The banner is the command's output, on stdout: stderr carries only log lines.
            def banner(line: str) -> None:
                out.print(line, soft_wrap=True)  # a URL or token stays on one line

            mode = "embedded broker" if stack.broker else "Kafka"
            banner(
                f"[green]Citadel is up[/green] ({mode} at {stack.kafka.bootstrap}; "
                f"event store {_redact(settings.event_store)})"
            )
            program = "citadel" if shutil.which("citadel") else os.path.relpath(sys.argv[0])
            banner(f"  run a workflow:  {program} run examples/linear.yaml --input '{{\"n\": 5}}'")
            if gateway is not None:
                banner(f"  GraphQL:         {gateway.url}/graphql (subscriptions: graphql-transport-ws)")
                banner(f"  health, metrics: {gateway.url}/ready, {gateway.url}/metrics")
                if gateway.development_token:
                    banner("  development token (admin of tenant 'default', 7 days; see `citadel token`):")
                    banner(f"    Authorization: Bearer {gateway.development_token}")
                    dashboard = f"{gateway.url}/?token={gateway.development_token}"
                    banner(f"  dashboard:       {dashboard}")
                else:
                    banner(f"  dashboard:       {gateway.url}/ (asks for a bearer token)")
            banner("  stop:            Ctrl-C")
            await stop.wait()
            out.print("stopping…")
    finally:
        if announce_self:
            withdraw(settings)
        with contextlib.suppress(Exception):
            await stack_cm.__aexit__(None, None, None)


@app.command()
def token(
    tenant: Annotated[str, typer.Option(help="the tenant the token may see")] = "default",
    role: Annotated[list[str], typer.Option(help="admin, editor or viewer (repeatable)")] = ["viewer"],  # noqa: B006
    subject: Annotated[str, typer.Option(help="who the token names")] = "cli",
    hours: Annotated[float, typer.Option(help="lifetime")] = 12.0,
) -> None:
    """Print a gateway bearer token signed with CITADEL_JWT_SECRET (embedded: the development secret)."""
    import datetime as dt

    from citadel.gateway import token_keys
    from gateway.auth import ROLES, TENANT, issue_token

    settings = Settings.from_env()
    unknown = [r for r in role if r not in ROLES]
    if unknown or not TENANT.match(tenant):
        err.print(f"[red]roles are {', '.join(ROLES)}; a tenant is lower-case letters, digits, - and _[/red]")
        raise typer.Exit(EXIT_INVALID)
    try:
        keys = token_keys(settings)
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_INVALID) from None
    if keys.secret is None:
        err.print(
            "[red]RS256 tokens are signed by your identity provider; this command signs HS256 only[/red]"
        )
        raise typer.Exit(EXIT_INVALID)
    sys.stdout.write(issue_token(keys, subject, tenant, role, lifetime=dt.timedelta(hours=hours)) + "\n")


BENCHMARKS = (
    "chain40",
    "long10",
    "throughput",
    "sandbox",
    "replay",
    "timetravel",
    "lag",
    "subscription-lag",
)


@app.command()
def bench(
    name: Annotated[str, typer.Argument(help=f"one of {', '.join(BENCHMARKS)} (see BENCHMARKS.md)")],
    runs: Annotated[int, typer.Option(help="throughput, lag: how many runs to start")] = 10_000,
    repeats: Annotated[int, typer.Option(help="chain40, long10: how many timed runs")] = 5,
    events: Annotated[int, typer.Option(help="replay: events in the store; timetravel: in the run")] = 0,
    against: Annotated[
        Path | None,
        typer.Option(help="sandbox: another checkout (e.g. a git worktree) measured in turn with this one"),
    ] = None,
) -> None:
    """Run a benchmark on the embedded stack; print a table and write bench/results/NAME.json."""
    if name not in BENCHMARKS:
        err.print(f"[red]unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}[/red]")
        raise typer.Exit(EXIT_INVALID)
    # Logs and traces as `citadel up` has them, so their cost is part of what is measured.
    settings = Settings.from_env()
    setup_logging(settings, serving=True)
    with exporting_traces(_span_exporter(settings)):
        result = _bench(name, runs, repeats, events, against)
    table = Table(title=f"{name} ({result['path']})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in _flatten(result["figures"]):
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    out.print(table)


def _bench(name: str, runs: int, repeats: int, events: int, against: Path | None) -> dict[str, Any]:
    from bench import workloads

    if name == "chain40":
        with err.status(f"chain40: {repeats} timed runs of 40 python nodes…"):
            return asyncio.run(workloads.chain40(repeats=repeats))
    elif name == "long10":
        with err.status(f"long10: {repeats} timed runs of 10 fib(33) nodes, each beside a plain loop…"):
            return asyncio.run(workloads.long10(repeats=repeats))
    elif name == "sandbox":
        sides = f", in turn with {against}" if against is not None else ""
        with err.status(f"sandbox: 3 rounds of 1,000 sandboxed python attempts{sides}, then in-process…"):
            return asyncio.run(workloads.sandbox(against=against))
    elif name == "subscription-lag":
        from bench.gateway import subscription_lag

        progress = _progress()
        with progress:
            bar = progress.add_task("subscription-lag: runs finished", total=runs)
            return asyncio.run(
                subscription_lag(
                    runs=runs if runs != 10_000 else 300,
                    progress=lambda done, total: progress.update(bar, completed=done, total=total),
                )
            )
    elif name in ("replay", "timetravel", "lag"):
        return _projection_bench(name, runs, events)
    else:
        progress = _progress()
        with progress:
            bar = progress.add_task("throughput: runs finished", total=runs)
            return asyncio.run(
                workloads.throughput(
                    runs=runs, progress=lambda done, total: progress.update(bar, completed=done)
                )
            )


def _projection_bench(name: str, runs: int, events: int) -> dict[str, Any]:
    from bench import projections

    if name == "timetravel":
        with err.status(f"timetravel: a run of {events or 10_000:,} events at random versions…"):
            return projections.timetravel(events=events or 10_000)
    progress = _progress()
    with progress:
        bar = progress.add_task(name, total=None)
        if name == "replay":

            def step(what: str, done: int, total: int) -> None:
                progress.update(bar, description=f"replay: {what}", completed=done, total=total)

            return projections.replay(events=events or 1_000_000, progress=step)
        return asyncio.run(
            projections.lag(
                runs=runs, progress=lambda done, total: progress.update(bar, completed=done, total=total)
            )
        )


def _flatten(figures: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in figures.items():
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _redact(url: str) -> str:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


# ---- replay and time travel ------------------------------------------------

replay_app = typer.Typer(help="Rebuild what is derived from the event store.", no_args_is_help=True)
runs_app = typer.Typer(help="Read runs from the event store: their history, their state at any version.")
app.add_typer(replay_app, name="replay")
app.add_typer(runs_app, name="runs", no_args_is_help=True)


@replay_app.command("projections")
def replay_projections(
    batch: Annotated[int, typer.Option(help="events per ClickHouse write")] = 50_000,
) -> None:
    """Rebuild every ClickHouse projection from the event store's notification log.

    Fresh tables are filled beside the live ones and swapped in atomically, so a dashboard
    sees the old tables or the new ones, never a half-built one. In embedded mode chDB's data
    directory belongs to one process: stop `citadel up` first.
    """
    from aggregates.store import RunStore
    from citadel.projector import open_projections
    from projections.clickhouse import ClickHouseUnavailable
    from projections.rebuild import rebuild
    from streams.history import event_count, history

    settings = Settings.from_env()
    setup_logging(settings, serving=False)
    try:
        connection = open_projections(settings)
    except ClickHouseUnavailable as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_INVALID) from None
    store = RunStore(settings.event_store)
    try:
        started = time.perf_counter()
        with _progress() as progress:
            bar = progress.add_task("replaying run events", total=event_count(store) or None)
            total = rebuild(
                connection.client,
                history(store),
                batch_size=batch,
                progress=lambda done: progress.update(bar, completed=done),
            )
        elapsed = time.perf_counter() - started
    finally:
        store.close()
        connection.close()
    rate = total / elapsed if elapsed else 0.0
    out.print(
        f"rebuilt the projections from {total:,} run events in {elapsed:.1f} s ({rate:,.0f} events/s); "
        f"swapped in at {_redact(settings.clickhouse_url)}"
    )


@runs_app.command("history")
def runs_history(
    run_id: Annotated[str, typer.Argument(help="the run")],
    json_output: Annotated[bool, typer.Option("--json", help="every event in full, as JSON lines")] = False,
) -> None:
    """Print a run's events, in order, one readable line each."""
    from streams.history import describe, run_history

    events = _with_store(lambda store: run_history(store, run_id))
    if json_output:
        for event in events:
            sys.stdout.write(event.model_dump_json() + "\n")
        return
    table = Table(title=f"run {run_id} ({events[0].tenant})")
    for column in ("version", "time", "event", "details"):
        table.add_column(column)
    for event in events:
        when = event.time.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        table.add_row(str(event.version), when, event.type, describe(event))
    out.print(table)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="the run")],
    at: Annotated[int | None, typer.Option("--at", min=1, help="the run's state at this version")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the state as JSON")] = False,
) -> None:
    """Print a run's state: now, or as it was at any version of its history (time travel)."""
    from streams.history import run_state

    state = _with_store(lambda store: run_state(store, run_id, at))
    if json_output:
        sys.stdout.write(json.dumps(state, indent=2, default=str) + "\n")
        return
    out.print(
        f"run {state['run_id']} ({state['tenant']}): workflow {state['workflow']} "
        f"v{state['workflow_version']}, [bold]{state['status']}[/bold] at version {state['version']}"
        + (f" of {state['latest_version']}" if state["version"] != state["latest_version"] else "")
    )
    table = Table()
    for column in ("node", "status", "attempt", "error"):
        table.add_column(column)
    for node_id, node in state["nodes"].items():
        error = f"{node['error_class']}: {node['error']}" if node.get("error_class") else ""
        error = error.strip().split("\n", 1)[0]
        table.add_row(node_id, node["status"], str(node["attempt"]), error)
    out.print(table)
    if state["error"]:
        out.print(f"[red]{state['error']}[/red]")
    if state["outputs"] is not None:
        out.print("outputs:")
        out.print_json(json.dumps(state["outputs"], default=str))


@runs_app.command("rerun")
def runs_rerun(
    run_id: Annotated[str, typer.Argument(help="the run to rerun")],
    from_node: Annotated[str, typer.Option("--from", help="the node to execute again, and all after it")],
    definition: Annotated[
        str, typer.Option(help="original: the run's own definition; current: the workflow's latest")
    ] = "original",
    tenant: Annotated[str, typer.Option(help="tenant the run belongs to")] = "default",
    timeout: Annotated[float, typer.Option(help="give up waiting after this many seconds")] = 600.0,
    json_output: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Start a new run, linked to RUN, that reuses the outputs of the nodes upstream of --from
    and executes --from and everything after it; print it as `citadel run` does."""
    if definition not in ("original", "current"):
        err.print(f"[red]--definition must be original or current, not {definition!r}[/red]")
        raise typer.Exit(EXIT_INVALID)
    rerun = {"run_id": run_id, "from_node": from_node, "definition": definition}
    command = Envelope.new("StartRun", str(uuid.uuid4()), {"rerun": rerun}, tenant=tenant)
    _run_and_report(command, "rerun", timeout, json_output)


def _with_store(read: Any) -> Any:
    """Run `read(store)` on the configured event store; a missing run or version exits 2."""
    from aggregates.store import RunStore

    store = RunStore(Settings.from_env().event_store)
    try:
        return read(store)
    except (KeyError, ValueError) as exc:
        err.print(f"[red]{exc.args[0] if exc.args else exc}[/red]")
        raise typer.Exit(EXIT_INVALID) from None
    finally:
        store.close()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
