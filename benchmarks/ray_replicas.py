"""`python -m benchmarks.ray_replicas`: promptserve on Ray Serve on this machine: requests per second with 1 and
2 replicas, and how long a task registered on one replica takes to be servable on another.

Throughput: one local Ray cluster; the application (server/ray_serve.py, the built-in backbone, one torch thread
and one Ray CPU per replica) is deployed with 1, then 2 replicas (alternating, --repeats times each), the three
demo tasks registered through the proxy; every round sends the same seeded load through Ray's HTTP proxy at once:
--requests greedy requests spread over the tasks, --max-new-tokens each.

Registration -> servable: two single-replica applications, `/a` and `/b`, share one store directory, so a request
can be pinned to a replica (Ray's proxy cannot pin a replica of one deployment). Each of --registrations rounds
PUTs a new task id to `/a`; once the PUT returns, it POSTs a 1-token generation with that task to `/b` at once and
again on every 404, and records the time from the PUT's answer to `/b`'s first 200 (so it includes `/b`'s lookup
of the unknown id in the store, loading the task and one token) and how many 404s came first. `/b`'s time for a
1-token generation with a task it already holds is recorded beside it, for scale. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from server.demo import ADAPTER_CONFIG, ADAPTER_MODEL, DEMO_TASKS

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_replicas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64, help="requests per throughput round, sent at once")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--max-ongoing-requests", type=int, help="requests Ray hands a replica at once (default: ray_serve.py's)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="throughput rounds per replica count (alternating)")
    parser.add_argument("--registrations", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", choices=("throughput", "registration"), help="leave one measurement out")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def replica_args(store_dir: Path, num_replicas: int, max_ongoing_requests: int | None = None) -> dict[str, Any]:
    ongoing = {} if max_ongoing_requests is None else {"max_ongoing_requests": max_ongoing_requests}
    return {
        **ongoing,
        "num_replicas": num_replicas,
        "num_gpus": 0,
        "num_cpus": 1,
        "store_dir": str(store_dir),
        "device": "cpu",
        "demo_tasks": False,  # registered through the proxy: replicas racing to seed one empty store is not the point
        "self_check": False,
        "torch_threads": 1,
        "log_level": "warning",
    }


def demo_files(task: str) -> dict[str, tuple[str, bytes, str]]:
    directory = DEMO_TASKS[task]
    return {
        "adapter_config": (ADAPTER_CONFIG, (directory / ADAPTER_CONFIG).read_bytes(), "application/json"),
        "adapter_model": (ADAPTER_MODEL, (directory / ADAPTER_MODEL).read_bytes(), "application/octet-stream"),
    }


def seeded_load(num_requests: int, max_new_tokens: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    tasks = sorted(DEMO_TASKS)
    return [
        {
            "inputs": " ".join(rng.choices(WORDS, k=rng.randint(3, 8))),
            "task_id": tasks[i % len(tasks)],
            "parameters": {"max_new_tokens": max_new_tokens, "do_sample": False, "details": True},
        }
        for i in range(num_requests)
    ]


async def send_all(url: str, load: list[dict[str, Any]]) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=len(load))
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        start = time.perf_counter()
        responses = await asyncio.gather(*(client.post("/v1/generate", json=body) for body in load))
        elapsed = time.perf_counter() - start
    for response in responses:
        response.raise_for_status()
    tokens = sum(response.json()["details"]["generated_tokens"] for response in responses)
    replicas = sorted({response.headers["x-promptserve-replica"] for response in responses})
    return {
        "elapsed_s": elapsed,
        "requests_per_s": len(load) / elapsed,
        "output_tokens_per_s": tokens / elapsed,
        "output_tokens": tokens,
        "requests_per_replica": {r: sum(x.headers["x-promptserve-replica"] == r for x in responses) for r in replicas},
    }


def throughput(serve: Any, build_app: Any, url: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    load = seeded_load(args.requests, args.max_new_tokens, args.seed)
    runs: dict[str, list[dict[str, Any]]] = {"1": [], "2": []}
    for repeat in range(args.repeats):
        for num_replicas in (1, 2):
            store = root / f"store-{num_replicas}-{repeat}"
            app = build_app(replica_args(store, num_replicas, args.max_ongoing_requests))
            serve.run(app, name="promptserve", route_prefix="/")
            for task in DEMO_TASKS:
                httpx.put(f"{url}/v1/tasks/{task}", files=demo_files(task), timeout=60).raise_for_status()
            asyncio.run(send_all(url, load[: 4 * num_replicas]))  # warm-up: every replica loads the tasks
            result = asyncio.run(send_all(url, load))
            print(f"{num_replicas} replica(s), round {repeat}: {result['requests_per_s']:.2f} requests/s")
            runs[str(num_replicas)].append(result)
            serve.delete("promptserve")
    medians = {n: statistics.median(r["requests_per_s"] for r in rs) for n, rs in runs.items()}
    return {"runs": runs, "requests_per_s_median": medians, "two_over_one": medians["2"] / medians["1"]}


def registration(serve: Any, build_app: Any, url: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    store = root / "store-shared"
    for name in ("a", "b"):
        serve.run(build_app(replica_args(store, 1)), name=f"replica-{name}", route_prefix=f"/{name}")
    tasks = sorted(DEMO_TASKS)
    servable_ms, put_ms, known_ms, num_404 = [], [], [], []
    with httpx.Client(base_url=url, timeout=60) as client:
        client.put("/a/v1/tasks/known", files=demo_files(tasks[0])).raise_for_status()
        body = {"inputs": "hello", "parameters": {"max_new_tokens": 1}}
        client.post("/b/v1/generate", json={**body, "task_id": "known"}).raise_for_status()
        for i in range(args.registrations):
            task_id = f"reg-{args.seed}-{i:03d}"
            start = time.perf_counter()
            client.put(f"/a/v1/tasks/{task_id}", files=demo_files(tasks[i % len(tasks)])).raise_for_status()
            acknowledged = time.perf_counter()
            misses = 0
            while (response := client.post("/b/v1/generate", json={**body, "task_id": task_id})).status_code == 404:
                misses += 1
            response.raise_for_status()
            servable = time.perf_counter()
            client.post("/b/v1/generate", json={**body, "task_id": "known"}).raise_for_status()
            known_ms.append((time.perf_counter() - servable) * 1000)
            put_ms.append((acknowledged - start) * 1000)
            servable_ms.append((servable - acknowledged) * 1000)
            num_404.append(misses)
    for name in ("a", "b"):
        serve.delete(f"replica-{name}")
    return {
        "servable_ms": summary(servable_ms),
        "known_task_1_token_ms": summary(known_ms),
        "put_ms": summary(put_ms),
        "num_404_total": sum(num_404),
        "samples_servable_ms": servable_ms,
    }


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": statistics.median(ordered),
        "p99": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "max": ordered[-1],
        "n": len(ordered),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def machine() -> dict[str, Any]:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return {
        "cpu": cpu or platform.processor(),
        "logical_cpus": os.cpu_count(),
        "gpu": None,
        "load_average_1m_at_start": os.getloadavg()[0],  # other processes sharing these cores
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray  # the ray extra: pip install 'promptserve[ray]'
    from ray import serve

    from server.ray_serve import build_app

    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, logging_level="warning", log_to_driver=False)
    results: dict[str, Any] = {"machine": machine(), "settings": vars(args) | {"json": str(args.json)}}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory() as tmp:
            if args.skip != "throughput":
                results["throughput"] = throughput(serve, build_app, url, args, Path(tmp))
            if args.skip != "registration":
                results["registration"] = registration(serve, build_app, url, args, Path(tmp))
    finally:
        serve.shutdown()
        ray.shutdown()
    text = json.dumps(results, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
