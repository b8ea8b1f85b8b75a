"""Start, signal and cancel Citadel runs from a program that only speaks Kafka (no Citadel imports).

    python examples/kafka_client.py --bootstrap 127.0.0.1:9092 start default.orders '{"order": "A-1"}'
    python examples/kafka_client.py --bootstrap 127.0.0.1:9092 signal RUN_ID approve '{"ok": true}'
    python examples/kafka_client.py --bootstrap 127.0.0.1:9092 cancel RUN_ID --reason "customer called"

With `citadel up` in embedded mode, the broker's address is `bootstrap` in `.citadel/engine.json`.
Each command prints the run id. See docs/commands.md for the envelope.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import uuid
from typing import Any

from aiokafka import AIOKafkaProducer

COMMANDS = "citadel.commands"


def command(kind: str, run_id: str, payload: dict[str, Any], tenant: str) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),  # unique per command: the engine applies a command id once
        "type": kind,
        "run_id": run_id,
        "tenant": tenant,
        "time": dt.datetime.now(dt.UTC).isoformat(),
        "schema_version": 1,
        "payload": payload,
    }


async def publish(bootstrap: str, message: dict[str, Any], topic: str = COMMANDS) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        # Keyed by run id: a run's commands share a partition, so they arrive in order.
        await producer.send_and_wait(topic, json.dumps(message).encode(), key=message["run_id"].encode())
    finally:
        await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", required=True, help="host:port of a Kafka broker")
    parser.add_argument("--topic", default=COMMANDS, help="the engine's commands topic")
    parser.add_argument("--tenant", default="default")
    verbs = parser.add_subparsers(dest="verb", required=True)
    start = verbs.add_parser("start", help="start a run of a deployed workflow (TENANT.NAME)")
    start.add_argument("workflow")
    start.add_argument("input", nargs="?", default="{}", help="the run input, a JSON object")
    start.add_argument(
        "--run-id", default=None, help="choose the run id (a UUID): starting it twice is a no-op"
    )
    signal = verbs.add_parser("signal", help="answer an approval node that is waiting")
    signal.add_argument("run_id")
    signal.add_argument("node")
    signal.add_argument("payload", nargs="?", default="null", help="JSON for the node's output")
    cancel = verbs.add_parser("cancel", help="cancel a running run")
    cancel.add_argument("run_id")
    cancel.add_argument("--reason", default="cancelled by user")
    args = parser.parse_args()

    if args.verb == "start":
        run_id = args.run_id or str(uuid.uuid4())
        payload = {"workflow": args.workflow, "input": json.loads(args.input)}
        message = command("StartRun", run_id, payload, args.tenant)
    elif args.verb == "signal":
        payload = {"node_id": args.node, "payload": json.loads(args.payload)}
        message = command("Signal", args.run_id, payload, args.tenant)
    else:
        message = command("CancelRun", args.run_id, {"reason": args.reason}, args.tenant)
    asyncio.run(publish(args.bootstrap, message, args.topic))
    print(message["run_id"])


if __name__ == "__main__":
    main()
