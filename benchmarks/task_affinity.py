"""`python -m benchmarks.task_affinity`: routing by task on Ray Serve: hit rate and throughput of 2 replicas whose KV
pools hold about 100 tasks each, under a Zipf workload over 1,000 tasks, with the task-affinity request router
(server/task_router.py) and with Ray's default router, side by side in one run.

One local Ray cluster; the application (server/ray_serve.py, the built-in backbone, one torch thread and one Ray CPU
per replica) is deployed with `task_affinity` on, then off (alternating, --repeats times each), on one store
directory holding --tasks copies of the `upper` demo task (one KV block each), registered through the proxy once.
Each replica's KV pool is sized to --resident tasks' blocks plus its rows' (--concurrency / 2 rows of the longest
request). Every round sends the same seeded requests through Ray's HTTP proxy, --concurrency at a time, inputs of
1 to 3 words, each naming its task in the `serve_multiplexed_model_id` header (what the router reads): task ranks
drawn from a Zipf law of exponent --zipf over a seeded shuffle of the ids; --warmup requests first (not counted),
then --requests measured. Hit rate: the replicas' promptserve_prompt_cache_hits_total over hits plus misses during
the measured requests (a miss computes the task's keys and values into the pool); throughput: measured requests
per second. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.ray_replicas import WORDS, demo_files, free_port, machine, replica_args
from server.demo import DEMO_TASKS

TASK_HEADER = "serve_multiplexed_model_id"
NUM_REPLICAS = 2
DEMO_TASK = "upper"  # prompt tuning, 8 virtual tokens: one KV block at the default block size
MAX_WORDS = 3  # short inputs: the rows' blocks are a small part of a pool sized for 100 tasks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.task_affinity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--resident", type=int, default=100, help="tasks each replica's KV pool holds")
    parser.add_argument("--zipf", type=float, default=1.0, help="the Zipf law's exponent over task ranks")
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per round")
    parser.add_argument("--warmup", type=int, default=500, help="requests before the measured ones")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument(
        "--imbalanced-threshold",
        type=int,
        help="the router's (default: ray_serve.py's): queued requests a holder may have over the least busy replica",
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds per router (alternating)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def zipf_load(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    task_ids = [f"task-{i:04d}" for i in range(args.tasks)]
    rng.shuffle(task_ids)  # rank r -> a task id, so popularity does not follow the ids' order
    weights = [1 / (rank + 1) ** args.zipf for rank in range(args.tasks)]
    chosen = rng.choices(task_ids, weights=weights, k=args.warmup + args.requests)
    words = (" ".join(rng.choices(WORDS, k=rng.randint(1, MAX_WORDS))) for _ in chosen)
    return [{"task_id": task_id, "inputs": text} for task_id, text in zip(chosen, words, strict=True)]


def pool_bytes(url: str, args: argparse.Namespace) -> int:
    """KV pool bytes for --resident one-block tasks and --concurrency / 2 rows (each replica's share) of the longest
    request, from the backbone's shape and dtype as /info reports them."""
    info = httpx.get(f"{url}/info", timeout=60).json()
    block_size = 8  # EngineConfig.kv_block_size's default
    element_bytes = 2 if info["dtype"] in ("bfloat16", "float16") else 4
    block_bytes = 2 * info["num_layers"] * block_size * info["num_key_value_heads"] * info["head_dim"] * element_bytes
    row_tokens = 2 + MAX_WORDS * (max(len(word) for word in WORDS) + 1) + args.max_new_tokens  # a token a byte
    rows = math.ceil(args.concurrency / NUM_REPLICAS)
    return (args.resident + rows * math.ceil(row_tokens / block_size)) * block_bytes


def app_args(store: Path, task_affinity: bool, kv_cache_bytes: int | None, threshold: int | None) -> dict[str, Any]:
    sized = {} if kv_cache_bytes is None else {"kv_cache_bytes": kv_cache_bytes}
    router = {} if threshold is None else {"imbalanced_threshold": threshold}
    return {**replica_args(store, NUM_REPLICAS), **sized, **router, "task_affinity": task_affinity,
            "metrics_port": 0, "host": "127.0.0.1"}  # fmt: skip


def register_tasks(url: str, num_tasks: int) -> float:
    files = demo_files(DEMO_TASK)
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(num_tasks):
            client.put(f"/v1/tasks/task-{i:04d}", files=files).raise_for_status()
    return time.perf_counter() - started


def metrics_ports(serve: Any, app_name: str) -> dict[str, int]:
    from server.ray_serve import DEPLOYMENT_NAME  # the engines (the application's own handle is its ingress)

    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app_name)
    ports: dict[str, int] = {}
    for _ in range(100):  # the handle picks a replica per call
        replica_id, port = handle.metrics_address.remote().result(timeout_s=60)
        ports[replica_id] = port
        if len(ports) == NUM_REPLICAS:
            return ports
    raise RuntimeError(f"expected {NUM_REPLICAS} replicas' metrics ports; found {ports}")


def cache_counts(ports: dict[str, int]) -> dict[str, dict[str, float]]:
    """Each replica's prompt cache hits and misses so far, and its KV pool's size in tokens."""
    counts: dict[str, dict[str, float]] = {}
    for replica_id, port in ports.items():
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=60).text
        samples = {s.name: s for family in text_string_to_metric_families(text) for s in family.samples}
        counts[replica_id] = {
            "hits": samples["promptserve_prompt_cache_hits_total"].value,
            "misses": samples["promptserve_prompt_cache_misses_total"].value,
            "kv_cache_tokens": float(samples["promptserve_info"].labels["kv_cache_tokens"]),
            "max_lora": float(samples["promptserve_lora_requests_info"].labels["max_lora"]),
        }
    return counts


async def send(url: str, load: list[dict[str, Any]], concurrency: int, max_new_tokens: int) -> dict[str, Any]:
    """Every request, `concurrency` at a time; requests/s and which replica served how many."""
    served: list[str] = []
    queue = iter(load)

    async def worker(client: httpx.AsyncClient) -> None:
        for request in queue:
            body = {"inputs": request["inputs"], "task_id": request["task_id"],
                    "parameters": {"max_new_tokens": max_new_tokens, "do_sample": False}}  # fmt: skip
            response = await client.post("/v1/generate", json=body, headers={TASK_HEADER: request["task_id"]})
            response.raise_for_status()
            served.append(response.headers["x-promptserve-replica"])

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "elapsed_s": elapsed,
        "requests_per_s": len(load) / elapsed,
        "requests_per_replica": {replica: served.count(replica) for replica in sorted(set(served))},
    }


def one_round(serve: Any, build_app: Any, url: str, store: Path, name: str, kv_bytes: int,
              load: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    # An application of its own per router: Ray's proxy keeps the router it made for an application's deployment
    # across redeployments, so a redeployed `task_affinity` would not take effect there.
    app = build_app(app_args(store, name == "task_affinity", kv_bytes, args.imbalanced_threshold))
    serve.run(app, name=name, route_prefix="/")
    try:
        ports = metrics_ports(serve, name)
        asyncio.run(send(url, load[: args.warmup], args.concurrency, args.max_new_tokens))
        before = cache_counts(ports)
        result = asyncio.run(send(url, load[args.warmup :], args.concurrency, args.max_new_tokens))
        after = cache_counts(ports)
    finally:
        serve.delete(name)
    hits = sum(after[r]["hits"] - before[r]["hits"] for r in ports)
    misses = sum(after[r]["misses"] - before[r]["misses"] for r in ports)
    pools = {r: {"kv_cache_tokens": after[r]["kv_cache_tokens"], "max_lora": after[r]["max_lora"]} for r in ports}
    return {**result, "hit_rate": hits / (hits + misses), "hits": hits, "misses": misses, "pools": pools}


def run(serve: Any, build_app: Any, url: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    store = root / "store"
    serve.run(build_app(app_args(store, True, None, None)), name="registration", route_prefix="/")
    registration_s = register_tasks(url, args.tasks)
    kv_bytes = pool_bytes(url, args)
    serve.delete("registration")
    print(f"registered {args.tasks} tasks in {registration_s:.1f} s; KV pools of {kv_bytes} bytes", flush=True)
    load = zipf_load(args)
    runs: dict[str, list[dict[str, Any]]] = {"task_affinity": [], "ray_default": []}
    for repeat in range(args.repeats):
        for name in runs:
            result = one_round(serve, build_app, url, store, name, kv_bytes, load, args)
            print(f"{name}, round {repeat}: hit rate {result['hit_rate']:.3f}, "
                  f"{result['requests_per_s']:.1f} requests/s", flush=True)  # fmt: skip
            runs[name].append(result)
    medians = {
        name: {key: statistics.median(r[key] for r in results) for key in ("hit_rate", "requests_per_s")}
        for name, results in runs.items()
    }
    top = sorted((1 / (rank + 1) ** args.zipf for rank in range(args.tasks)), reverse=True)
    share = {n: sum(top[:n]) / sum(top) for n in (args.resident, NUM_REPLICAS * args.resident)}
    return {"registration_s": registration_s, "kv_cache_bytes": kv_bytes, "runs": runs, "medians": medians,
            "zipf_share_of_top_tasks": share}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray  # the ray extra: pip install 'promptserve[ray]'
    from ray import serve

    from server.ray_serve import build_app

    assert DEMO_TASK in DEMO_TASKS
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, logging_level="warning", log_to_driver=False)
    results: dict[str, Any] = {"machine": machine(), "settings": vars(args) | {"json": str(args.json)}}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with tempfile.TemporaryDirectory() as tmp:
            results |= run(serve, build_app, f"http://127.0.0.1:{port}", args, Path(tmp))
    finally:
        serve.shutdown()
        ray.shutdown()
    results["load_average_1m_at_end"] = os.getloadavg()[0]
    text = json.dumps(results, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
