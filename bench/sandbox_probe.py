"""One side of `citadel bench sandbox`: time python attempts that return at once, from a checkout.

Run as `python -m bench.sandbox_probe ROOT COUNT` or as a script: ROOT is the checkout whose
`nodes` package is measured (this one, or another commit's, for a side-by-side comparison).
Prints one JSON line: the milliseconds of each attempt, in order.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def measure(count: int) -> list[float]:
    from nodes.python import PythonExecutor
    from schemas.tasks import NodeTask

    executor = PythonExecutor(max_concurrency=1)
    await executor.start()

    def task(i: int) -> NodeTask:
        return NodeTask(
            run_id="bench",
            tenant="bench",
            workflow="sandbox",
            node_id="n",
            node_type="python",
            attempt=1,
            attempt_id=f"bench:n:{i}",
            config={"code": "def main(x):\n    return x + 1\n"},
            inputs={"x": i},
            timeout_seconds=10,
        )

    try:
        for i in range(50):  # warm the zygote's spare children
            await executor.execute(task(i))
        samples = []
        for i in range(count):
            began = time.perf_counter()
            outcome = await executor.execute(task(i))
            samples.append((time.perf_counter() - began) * 1000)
            if not (outcome.ok and outcome.output == i + 1):
                raise SystemExit(f"attempt {i} failed: {outcome}")
        return samples
    finally:
        await executor.stop()


if __name__ == "__main__":
    root, count = sys.argv[1], int(sys.argv[2])
    sys.path.insert(0, root)
    print(json.dumps(asyncio.run(measure(count))))
