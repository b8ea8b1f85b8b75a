"""lag (b) of BENCHMARKS.md: from an event's commit to its GraphQL subscription message arriving
at a client over graphql-transport-ws, while runs are started through the gateway.

The client (one subscriber, and the load: startRun at a steady rate) is a separate process, as
a dashboard or a program would be, so its work is not counted against the engine's event loop;
it prints one JSON line per finished run and, at the end, the lags it measured."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import websockets

from bench.report import summary, write
from bench.workloads import _settings, five_node_definition
from citadel.gateway import running_gateway
from citadel.stack import running_stack
from gateway.auth import issue_token

STREAM = "subscription { allRunEvents { runId type time } }"
START = 'mutation($i: JSON) { startRun(workflow: "five", input: $i) { runId } }'
DEPLOY = "mutation($d: JSON!) { deployWorkflow(definition: $d) { problems { message } } }"


async def subscription_lag(
    runs: int = 300, rate: float = 20.0, progress: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """Start `runs` runs at `rate` a second through the gateway; time every event of theirs from
    its commit timestamp to the moment its subscription message is received."""
    with tempfile.TemporaryDirectory(prefix="citadel-bench-") as home:
        settings = _settings(Path(home)).model_copy(update={"gateway_port": 0, "gateway_burst": 10**6})
        async with (
            running_stack(settings) as stack,
            running_gateway(settings, stack.engine, stack.projector) as gw,
        ):
            token = issue_token(gw.keys, "bench", "bench", ["admin"])
            client = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.gateway", gw.url, token, str(runs), str(rate),
                stdout=asyncio.subprocess.PIPE, limit=2**26,
            )  # fmt: skip
            assert client.stdout is not None
            samples: list[float] = []
            async for line in client.stdout:
                report = json.loads(line)
                if "finished" in report and progress:
                    progress(report["finished"], runs)
                samples = report.get("samples", samples)
            if await client.wait() != 0:
                raise RuntimeError(f"the benchmark's client failed (exit {client.returncode})")
    figures = {"events": len(samples), "commit_to_subscription_seconds": summary(samples)}
    path = write(
        "subscription-lag",
        {
            "workload": f"{runs} runs of the throughput benchmark's 5-node workflow, started at {rate:g}/s "
            "through the gateway's startRun; one allRunEvents subscriber (a separate client process)",
            "measured": "event timestamp (commit) -> subscription message received by the client",
            "live_source": "the engine in-process: events as saved by decide, and the outbox",
        },
        figures,
    )
    return {"figures": figures, "path": str(path)}


async def _client(url: str, token: str, runs: int, rate: float) -> None:
    """Deploy, subscribe, start the runs at `rate`; report progress and the lags on stdout."""
    headers = {"Authorization": f"Bearer {token}"}
    definition = {**five_node_definition(), "name": "five"}
    samples: list[float] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        answer = (await http.post("/graphql", json={"query": DEPLOY, "variables": {"d": definition}})).json()
        assert not answer["data"]["deployWorkflow"]["problems"], answer
        socket_url = url.replace("http://", "ws://") + "/graphql"
        async with websockets.connect(socket_url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
            await ws.send(json.dumps({"type": "connection_init", "payload": headers}))
            await ws.recv()
            await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": STREAM}}))
            finished = 0

            async def receive() -> None:
                nonlocal finished
                while finished < runs:
                    message = json.loads(await ws.recv())
                    received = time.time()
                    event = message["payload"]["data"]["allRunEvents"]
                    samples.append(received - dt.datetime.fromisoformat(event["time"]).timestamp())
                    if event["type"] in ("Completed", "Failed", "Cancelled"):
                        finished += 1
                        print(json.dumps({"finished": finished}), flush=True)

            receiving = asyncio.create_task(receive())
            began = time.perf_counter()
            for n in range(runs):
                await asyncio.sleep(max(0.0, began + n / rate - time.perf_counter()))
                await http.post("/graphql", json={"query": START, "variables": {"i": {"n": n}}})
            await receiving
    print(json.dumps({"samples": samples}), flush=True)


if __name__ == "__main__":
    asyncio.run(_client(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
