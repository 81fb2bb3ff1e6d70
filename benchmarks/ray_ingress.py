"""`python -m benchmarks.ray_ingress`: what the Ray application's ingress hop costs: requests per second and
latency of 2 CPU replicas through Ray's HTTP proxy, with the ingress deployment in front of the engines (the
application as shipped, server/ray_serve.py) and without it (the engine replicas as Ray's HTTP ingress, as before
the ingress: this benchmark's own deployment of the same replica class), side by side in one run.

One local Ray cluster; each variant is deployed (the built-in backbone, one torch thread and one Ray CPU per engine
replica, the three demo tasks registered through the proxy), measured, and deleted, alternating, --repeats times
each. A round: --warmup requests, then --requests greedy /v1/generate requests of --max-new-tokens, one at a time
(latency: p50 and p99), then the same requests --concurrency at a time (requests per second and p50). Measures;
asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.ray_replicas import demo_files, free_port, machine, replica_args, seeded_load, summary
from server.demo import DEMO_TASKS

NUM_REPLICAS = 2
VARIANTS = ("ingress", "direct")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_ingress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="measured requests per round and concurrency")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="rounds per variant (alternating)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


async def send(url: str, load: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """Every request, `concurrency` at a time: requests per second and each request's latency."""
    latencies_ms: list[float] = []
    queue = iter(load)

    async def worker(client: httpx.AsyncClient) -> None:
        for body in queue:
            started = time.perf_counter()
            response = await client.post("/v1/generate", json=body)
            response.raise_for_status()
            latencies_ms.append((time.perf_counter() - started) * 1000)

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"requests_per_s": len(load) / elapsed, "latency_ms": summary(latencies_ms)}


def one_round(serve: Any, app: Any, name: str, url: str, load: list[dict[str, Any]],
              args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    serve.run(app, name=name, route_prefix="/")
    try:
        for task in DEMO_TASKS:
            httpx.put(f"{url}/v1/tasks/{task}", files=demo_files(task), timeout=60).raise_for_status()
        asyncio.run(send(url, load[: args.warmup], args.concurrency))  # every replica loads the tasks
        measured = load[args.warmup :]
        return {"one_at_a_time": asyncio.run(send(url, measured, 1)),
                "concurrent": asyncio.run(send(url, measured, args.concurrency))}  # fmt: skip
    finally:
        serve.delete(name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray  # the ray extra: pip install 'promptserve[ray]'
    from ray import serve

    from server.ray_serve import build_app

    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, logging_level="warning", log_to_driver=False)
    url = f"http://127.0.0.1:{port}"
    load = seeded_load(args.warmup + args.requests, args.max_new_tokens, args.seed)
    runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
    result: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with tempfile.TemporaryDirectory() as root:
            for repeat in range(args.repeats):
                for variant in VARIANTS:
                    replicas = replica_args(Path(root) / f"store-{variant}-{repeat}", NUM_REPLICAS)
                    app = build_app({**replicas, "ingress": variant == "ingress"})
                    # an application of its own per variant: Ray's proxy keeps what it made for an application
                    run = one_round(serve, app, f"{variant}-{repeat}", url, load, args)
                    runs[variant].append(run)
                    rate, p50 = run["concurrent"]["requests_per_s"], run["one_at_a_time"]["latency_ms"]["p50"]
                    print(f"{variant}, round {repeat}: {rate:.2f} requests/s, p50 {p50:.1f} ms one at a time")
    finally:
        serve.shutdown()
        ray.shutdown()
    result["load_average_1m_at_end"] = os.getloadavg()[0]
    result["runs"] = runs
    result["median"] = {
        variant: {
            "requests_per_s": statistics.median(r["concurrent"]["requests_per_s"] for r in rs),
            "p50_ms_concurrent": statistics.median(r["concurrent"]["latency_ms"]["p50"] for r in rs),
            "p50_ms_one_at_a_time": statistics.median(r["one_at_a_time"]["latency_ms"]["p50"] for r in rs),
        }
        for variant, rs in runs.items()
    }
    print(json.dumps(result["median"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
