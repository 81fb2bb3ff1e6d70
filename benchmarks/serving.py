"""`promptserve bench`: load-test a running server, in the style of vLLM's benchmark_serving.

Requests arrive as a Poisson (or gamma) process at --request-rate, or as fast as --concurrency allows; each picks
a registered task (uniform or Zipf popularity) and a synthetic input, and streams POST /v1/generate_stream to time
the first token. With --register-during-run N, N new tasks are registered (PUT /v1/tasks/{id}) while the load runs,
and the time from registration to the first token of a request using the new task is reported.

Needs only httpx and httpx-sse (no torch): it can run on any machine that reaches the server, but only loopback
URLs are accepted unless --allow-remote is given. Never asserts: it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import random
import statistics
import string
import struct
import sys
import time
import uuid
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from httpx_sse import aconnect_sse

PERCENTILES = (50, 90, 99)


# ---- arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="promptserve bench", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    add("--allow-remote", action="store_true", help="accept a URL that is not loopback")
    add("--num-requests", type=int, default=200, help="requests to send (default: %(default)s)")
    add("--max-seconds", type=float, default=300.0, help="bound on the whole run; later requests are not sent, "
        "running ones are cancelled and counted as incomplete (default: %(default)s)")  # fmt: skip
    add("--request-rate", type=float, default=math.inf, help="requests/s (default: inf, all at once)")
    add("--burstiness", type=float, default=1.0, help="gamma shape of the arrivals; 1 is Poisson")
    add("--concurrency", type=int, help="at most this many requests in flight")
    add("--tasks", help="comma-separated task ids (default: every task of GET /v1/tasks)")
    add("--popularity", choices=("uniform", "zipf"), default="uniform")
    add("--zipf-s", type=float, default=1.1, help="Zipf exponent (default: %(default)s)")
    add("--bare-fraction", type=float, default=0.0, help="share of requests on the bare backbone (task_id null)")
    add("--input-chars", default="64:256", help="input length in characters, LOW:HIGH (default: %(default)s)")
    add("--max-new-tokens", default="64", help="N or LOW:HIGH (default: %(default)s)")
    add("--setup-tasks", type=int, default=0, metavar="N", help="first register N synthetic tasks and use them")
    add("--register-during-run", type=int, default=0, metavar="N", help="register N new tasks while loading")
    add("--register-method", choices=("prompt_tuning", "prefix_tuning", "both"), default="both")
    add("--register-virtual-tokens", type=int, default=16)
    add("--keep-registered", action="store_true", help="do not delete the tasks this run registered")
    add("--admin-token", default=os.environ.get("PROMPTSERVE_ADMIN_TOKEN"), help="for PUT/DELETE (env default)")
    add("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    add("--no-stream", dest="stream", action="store_false",
        help="POST /v1/generate (one response) instead of streaming: throughput only, no TTFT or TPOT")  # fmt: skip
    add("--seed", type=int, default=0)
    add("--json", help="write the results here")
    return parser.parse_args(argv)


def int_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---- one request


@dataclass(slots=True)
class RequestResult:
    task_id: str | None
    input_chars: int
    ok: bool = False
    error: str | None = None
    start: float = 0.0  # perf_counter when the request was sent
    ttft_s: float | None = None
    latency_s: float | None = None
    token_times: list[float] = field(default_factory=list)
    input_tokens: int | None = None
    generated_tokens: int = 0
    finish_reason: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (vLLM's TPOT)."""
        if self.latency_s is None or self.ttft_s is None or self.generated_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.generated_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


async def stream_generate(client: httpx.AsyncClient, body: dict[str, Any], result: RequestResult) -> RequestResult:
    result.start = time.perf_counter()
    try:
        async with aconnect_sse(client, "POST", "/v1/generate_stream", json=body) as source:
            if source.response.status_code != 200:
                await source.response.aread()
                result.error = f"HTTP {source.response.status_code}: {source.response.text[:200]}"
                return result
            async for event in source.aiter_sse():
                on_event(json.loads(event.data), result)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    if result.error is None and result.latency_s is None:
        result.error = "the stream ended without a final event"
    result.ok = result.error is None
    return result


async def plain_generate(client: httpx.AsyncClient, body: dict[str, Any], result: RequestResult) -> RequestResult:
    """POST /v1/generate: the whole answer in one response (--no-stream)."""
    result.start = time.perf_counter()
    try:
        response = await client.post("/v1/generate", json=body)
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {response.text[:200]}"
            return result
        on_event(response.json(), result)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.ok = result.error is None and result.latency_s is not None
    return result


def on_event(data: dict[str, Any], result: RequestResult) -> None:
    now = time.perf_counter() - result.start
    if "error" in data:
        result.error = f"{data.get('error_type')}: {data['error']}"
        return
    if data.get("token") is not None:
        result.token_times.append(now)
        result.ttft_s = result.ttft_s if result.ttft_s is not None else now
    if data.get("details") is not None or data.get("generated_text") is not None:
        result.latency_s = now
        details = data.get("details") or {}
        result.generated_tokens = details.get("generated_tokens", len(result.token_times))
        result.input_tokens = details.get("input_tokens")
        result.finish_reason = details.get("finish_reason")


# ---- synthetic inputs and tasks


WORDS = ["".join(random.Random(i).choices(string.ascii_lowercase, k=1 + i % 9)) for i in range(2000)]


def synthetic_text(rng: random.Random, num_chars: int) -> str:
    words: list[str] = []
    length = 0
    while length < num_chars:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:num_chars]


def task_picker(rng: random.Random, popularity: str, zipf_s: float, bare_fraction: float):
    def pick(task_ids: list[str]) -> str | None:
        if not task_ids or rng.random() < bare_fraction:
            return None
        if popularity == "uniform":
            return rng.choice(task_ids)
        weights = [1.0 / (rank + 1) ** zipf_s for rank in range(len(task_ids))]
        return rng.choices(task_ids, weights=weights)[0]

    return pick


def safetensors_bytes(name: str, rows: int, cols: int, rng: random.Random) -> bytes:
    """A float32 safetensors file written by hand (no torch needed on the benchmarking machine)."""
    cycle = array("f", (rng.gauss(0.0, 1.0) for _ in range(4096)))
    data = array("f", (cycle[i % len(cycle)] for i in range(rows * cols)))
    if sys.byteorder == "big":
        data.byteswap()  # safetensors is little-endian
    payload = data.tobytes()
    header = json.dumps({name: {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, len(payload)]}})
    header += " " * (-len(header) % 8)  # the data starts 8-aligned
    return struct.pack("<Q", len(header)) + header.encode() + payload


def synthetic_adapter(info: dict[str, Any], method: str, num_virtual: int, rng: random.Random) -> tuple[bytes, bytes]:
    """A PEFT prompt-learning adapter (config, model) that fits the server's backbone, as /info describes it."""
    layers, kv_dim = info["num_layers"], info["num_key_value_heads"] * info["head_dim"]
    config: dict[str, Any] = {
        "peft_type": "PROMPT_TUNING" if method == "prompt_tuning" else "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": num_virtual,
        "num_transformer_submodules": 1,
        "num_layers": layers,
        "base_model_name_or_path": info.get("model_id"),
        "inference_mode": True,
    }
    if method == "prompt_tuning":
        config.update(token_dim=info["hidden_size"], prompt_tuning_init="RANDOM")
        cols = info["hidden_size"]
    else:
        config.update(token_dim=kv_dim, num_attention_heads=info["num_key_value_heads"], prefix_projection=False)
        cols = layers * 2 * kv_dim
    return json.dumps(config).encode(), safetensors_bytes("prompt_embeddings", num_virtual, cols, rng)


# ---- registering during the run


@dataclass(slots=True)
class Registration:
    task_id: str
    method: str
    ok: bool = False
    error: str | None = None
    put_s: float | None = None  # PUT sent -> response
    first_token_s: float | None = None  # PUT sent -> first token of a request on the new task


async def register_and_probe(
    client: httpx.AsyncClient, registration: Registration, files: tuple[bytes, bytes], probe_body: dict[str, Any]
) -> Registration:
    started = time.perf_counter()
    parts = {
        "adapter_config": ("adapter_config.json", files[0], "application/json"),
        "adapter_model": ("adapter_model.safetensors", files[1], "application/octet-stream"),
    }
    try:
        response = await client.put(f"/v1/tasks/{registration.task_id}", files=parts)
    except httpx.HTTPError as exc:
        registration.error = f"{type(exc).__name__}: {exc}"
        return registration
    registration.put_s = time.perf_counter() - started
    if response.status_code not in (200, 201):
        registration.error = f"PUT HTTP {response.status_code}: {response.text[:200]}"
        return registration
    probe = await stream_generate(client, {**probe_body, "task_id": registration.task_id}, RequestResult(None, 0))
    if probe.ok and probe.ttft_s is not None:
        registration.first_token_s = probe.start - started + probe.ttft_s
        registration.ok = True
    else:
        registration.error = f"probe: {probe.error}"
    return registration


# ---- the run


@dataclass
class Run:
    args: argparse.Namespace
    client: httpx.AsyncClient
    info: dict[str, Any]
    task_ids: list[str]
    rng: random.Random
    results: list[RequestResult] = field(default_factory=list)
    registrations: list[Registration] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # task ids this run registered (deleted at the end)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def body(self, task_id: str | None, text: str) -> dict[str, Any]:
        low, high = int_range(self.args.max_new_tokens)
        parameters = {"max_new_tokens": self.rng.randint(low, high), "do_sample": False, "details": True}
        return {"inputs": text, "task_id": task_id, "parameters": parameters}

    def arrival_gaps(self) -> Iterator[float]:
        rate, shape = self.args.request_rate, self.args.burstiness
        while True:
            yield 0.0 if math.isinf(rate) else self.rng.gammavariate(shape, 1.0 / (rate * shape))

    def registration_points(self) -> list[int]:
        """Registration j goes out with request number points[j]: evenly spread over the requests."""
        n, total = self.args.register_during_run, self.args.num_requests
        return [min(total - 1, (j + 1) * total // (n + 1)) for j in range(n)]

    async def execute(self) -> float:
        pick = task_picker(self.rng, self.args.popularity, self.args.zipf_s, self.args.bare_fraction)
        limit = asyncio.Semaphore(self.args.concurrency or self.args.num_requests)
        points, pending, started = self.registration_points(), [], time.perf_counter()
        gaps = self.arrival_gaps()
        low, high = int_range(self.args.input_chars)
        for index in range(self.args.num_requests):
            await asyncio.sleep(next(gaps))
            if time.perf_counter() - started >= self.args.max_seconds:
                break
            await limit.acquire()
            text = synthetic_text(self.rng, self.rng.randint(low, high))
            task_id = pick(self.task_ids)
            result = RequestResult(task_id, len(text))
            self.results.append(result)
            pending.append(asyncio.create_task(self.limited(limit, self.body(task_id, text), result)))
            for _ in range(points.count(index)):
                pending.append(asyncio.create_task(self.register(len(self.registrations))))
        remaining = self.args.max_seconds - (time.perf_counter() - started)
        _, not_done = await asyncio.wait(pending, timeout=max(remaining, 0.0)) if pending else (set(), set())
        for task in not_done:
            task.cancel()
        await asyncio.gather(*not_done, return_exceptions=True)
        for result in self.results:
            if result.latency_s is None and result.error is None:
                result.error = "incomplete: still running at --max-seconds"
        return time.perf_counter() - started

    async def limited(self, limit: asyncio.Semaphore, body: dict[str, Any], result: RequestResult) -> None:
        try:
            await (stream_generate if self.args.stream else plain_generate)(self.client, body, result)
        finally:
            limit.release()

    def synthetic_task(self, number: int) -> tuple[str, str, tuple[bytes, bytes]]:
        method = self.args.register_method
        if method == "both":
            method = ("prompt_tuning", "prefix_tuning")[number % 2]
        task_id = f"bench-{self.run_id}-{number}"
        return task_id, method, synthetic_adapter(self.info, method, self.args.register_virtual_tokens, self.rng)

    async def setup_tasks(self) -> None:
        """--setup-tasks: register synthetic tasks before the clock starts; the run uses only those."""
        created = []
        for number in range(self.args.setup_tasks):
            task_id, _, (config, model) = self.synthetic_task(number)
            parts = {"adapter_config": ("adapter_config.json", config), "adapter_model": ("adapter.st", model)}
            (await self.client.put(f"/v1/tasks/{task_id}", files=parts)).raise_for_status()
            self.created.append(task_id)
            created.append(task_id)
        self.task_ids = created

    async def register(self, number: int) -> None:
        task_id, method, files = self.synthetic_task(self.args.setup_tasks + number)
        registration = Registration(task_id, method)
        self.registrations.append(registration)
        probe = self.body(task_id, synthetic_text(self.rng, int_range(self.args.input_chars)[0]))
        await register_and_probe(self.client, registration, files, probe)
        if registration.put_s is not None:
            self.created.append(task_id)
        if registration.ok:
            self.task_ids.append(task_id)  # later requests may pick it too

    async def cleanup(self) -> None:
        if not self.args.keep_registered:
            for task_id in self.created:
                await self.client.delete(f"/v1/tasks/{task_id}")


# ---- statistics and output


def distribution(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    stats = {"mean_ms": 1000 * statistics.fmean(ordered)}
    for p in PERCENTILES:
        rank = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
        stats[f"p{p}_ms"] = 1000 * ordered[rank]
    return stats


def summarize(run: Run, duration: float) -> dict[str, Any]:
    ok = [r for r in run.results if r.ok]
    failed = [r for r in run.results if not r.ok]
    num_out = sum(r.generated_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in failed:
        key = (r.error or "?").split(":")[0]
        errors[key] = errors.get(key, 0) + 1
    return {
        "url": run.args.url,
        "server": {key: run.info.get(key) for key in ("model_id", "device", "dtype", "max_batch_size", "num_tasks")},
        "arguments": {key: value for key, value in vars(run.args).items() if key != "admin_token"},
        "num_tasks_used": len({r.task_id for r in run.results if r.task_id is not None}),
        "num_bare_requests": sum(r.task_id is None for r in run.results),
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(failed),
        "not_sent": run.args.num_requests - len(run.results),  # --max-seconds came first
        "errors": errors,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": num_out / duration,
        "total_input_tokens": sum(r.input_tokens or 0 for r in ok),
        "total_output_tokens": num_out,
        "ttft": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot": distribution([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl": distribution([gap for r in ok for gap in r.itl_s]),
        "e2e_latency": distribution([r.latency_s for r in ok if r.latency_s is not None]),
        "registrations": summarize_registrations(run.registrations),
    }


def summarize_registrations(registrations: list[Registration]) -> dict[str, Any] | None:
    if not registrations:
        return None
    ok = [r for r in registrations if r.ok]
    return {
        "requested": len(registrations),
        "succeeded": len(ok),
        "put": distribution([r.put_s for r in ok if r.put_s is not None]),
        "registration_to_first_token": distribution([r.first_token_s for r in ok if r.first_token_s is not None]),
        "each": [asdict(r) for r in registrations],
    }


def print_summary(summary: dict[str, Any]) -> None:
    print(f"{' promptserve serving benchmark ':=^64}")
    server = summary["server"]
    rows = [
        ("Server", f"{summary['url']} ({server.get('model_id')} on {server.get('device')}, {server.get('dtype')})"),
        ("Successful requests", summary["completed"]),
        ("Failed or incomplete requests", f"{summary['failed']} {summary['errors'] or ''}"),
        ("Not sent (--max-seconds)", summary["not_sent"]),
        ("Tasks used", summary["num_tasks_used"]),
        ("Benchmark duration (s)", f"{summary['duration_s']:.2f}"),
        ("Total input tokens", summary["total_input_tokens"]),
        ("Total generated tokens", summary["total_output_tokens"]),
        ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{summary['output_token_throughput']:.2f}"),
    ]
    for label, value in rows:
        print(f"{label + ':':44}{value}")
    for key, title, short in (
        ("ttft", "Time to First Token", "TTFT"),
        ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
        ("itl", "Inter-token Latency", "ITL"),
        ("e2e_latency", "End-to-end Latency", "E2EL"),
    ):
        print(f"{' ' + title + ' ':-^64}")
        print_distribution(short, summary[key])
    registrations = summary["registrations"]
    if registrations:
        print(f"{' Tasks registered during the run ':-^64}")
        print(f"{'Registered / requested:':44}{registrations['succeeded']} / {registrations['requested']}")
        print_distribution("PUT", registrations["put"])
        print_distribution("register->1st token", registrations["registration_to_first_token"])
    print("=" * 64)


def print_distribution(short: str, stats: dict[str, float] | None) -> None:
    if stats is None:
        print(f"{short + ':':44}n/a")
        return
    for key, value in stats.items():
        name = key.removesuffix("_ms").replace("mean", "Mean").replace("p", "P")
        print(f"{f'{name} {short} (ms):':44}{value:.2f}")


# ---- main


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.admin_token}"} if args.admin_token else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=args.concurrency or 100)
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits, timeout=timeout) as client:
        info = (await client.get("/info")).raise_for_status().json()
        if args.tasks:
            task_ids = [t for t in args.tasks.split(",") if t]
        else:
            task_ids = [t["task_id"] for t in (await client.get("/v1/tasks")).raise_for_status().json()["tasks"]]
        run = Run(args, client, info, task_ids, random.Random(args.seed))
        try:
            if args.setup_tasks:
                await run.setup_tasks()
            duration = await run.execute()
        finally:
            await run.cleanup()
        return summarize(run, duration)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.allow_remote and not is_loopback(args.url):
        print(f"promptserve bench: {args.url} is not a loopback address; pass --allow-remote", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(run_bench(args))
    except httpx.HTTPError as exc:
        print(f"promptserve bench: cannot use the server at {args.url}: {exc}", file=sys.stderr)
        return 1
    print_summary(summary)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(summary, out, indent=2)
            out.write("\n")
        print(f"wrote {args.json}")
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
