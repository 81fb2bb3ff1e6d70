"""Prometheus metrics (the only module importing prometheus_client), named after vLLM's and TGI's.

Fed by the engine's step listener (batch shape, per-task cache events), by the routes (per-request timings and
token counts) and, at scrape time, by engine.stats() (queue gauges, prompt-cache counters, resident task versions).
One registry per app, never the global. Series labelled `task` take their values from TaskLabels (bounded). Every
series, the process_* ones included, carries `model_name` (the served model id, as vLLM labels its series) and,
under Ray, `replica`.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.api import task_labels
from server.api.task_labels import TaskLabels
from server.engine.interface import EngineClient
from server.engine.types import Completion, EngineStats, StepStats, TaskCacheEvents

PREFIX = "promptserve"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TOKEN_COUNT_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BY_REQUEST = f" ({task_labels.REQUEST_HELP})"  # a request's one label
BY_TASK = f" ({task_labels.TASK_HELP}; an ensemble's members count one by one)"

EngineProvider = Callable[[], "EngineClient | None"]
LabelsProvider = Callable[[], dict[str, str]]


class Metrics:
    def __init__(self, engine: EngineProvider, max_tasks: int, labels: LabelsProvider = dict) -> None:
        """`labels`: the labels every series carries (model_name; replica under Ray), read at each scrape."""
        disable_created_metrics()  # process-wide; the `_created` series only add noise to the exposition
        self.registry = CollectorRegistry()
        self.exported = CollectorRegistry()  # what /metrics serves: every series of `registry`, labelled
        self.exported.register(ConstantLabels(self.registry, labels))
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self.task_labels = TaskLabels(max_tasks)
        self.add_request_series()
        self.add_task_cache_series()
        self.batch_size = self._histogram("batch_size", "Rows in the batch at each engine step", BATCH_BUCKETS)
        self.batch_distinct_tasks = self._histogram(
            "batch_distinct_tasks", "Distinct tasks in the batch at each engine step", BATCH_BUCKETS
        )
        self.step_duration = self._histogram(
            "engine_step_duration_seconds", "Duration of one engine step", TOKEN_TIME_BUCKETS
        )
        self.task_registrations = self._counter(
            "task_registrations", "Task uploads accepted: created (new task) or replaced (new version)", ["result"]
        )
        self.task_deletions = self._counter("task_deletions", "Tasks deleted")
        self.registry.register(EngineCollector(engine, self.task_labels))

    def add_request_series(self) -> None:
        """Per request, recorded by the routes. A request counts once, under one `task` label (an ensemble under
        `_ensemble`), so summing over `task` gives the totals. Queue time and the size histograms stay global."""
        self.requests = self._counter(
            "requests",
            "Requests (generation, classification, scoring) by endpoint, task and outcome: success, an error_type, "
            "or cancelled" + BY_REQUEST,
            ["endpoint", "task", "outcome"],
        )
        self.e2e_latency = self._histogram(
            "e2e_request_latency_seconds", "Arrival to last output" + BY_REQUEST, LATENCY_BUCKETS, ["endpoint", "task"]
        )
        self.time_to_first_token = self._histogram(
            "time_to_first_token_seconds", "Arrival to first token, queue time included" + BY_REQUEST, LATENCY_BUCKETS,
            ["task"],
        )  # fmt: skip
        self.time_per_output_token = self._histogram(
            "time_per_output_token_seconds", "Mean time between a request's tokens after the first" + BY_REQUEST,
            TOKEN_TIME_BUCKETS, ["task"],
        )  # fmt: skip
        self.queue_time = self._histogram(
            "request_queue_time_seconds", "Submission to the first scheduling in the engine", LATENCY_BUCKETS
        )
        self.request_prompt_tokens = self._histogram(
            "request_prompt_tokens", "Input tokens of a request", TOKEN_COUNT_BUCKETS
        )
        self.request_generation_tokens = self._histogram(
            "request_generation_tokens", "Generated tokens of a request", TOKEN_COUNT_BUCKETS
        )
        self.prompt_tokens = self._counter("prompt_tokens", "Input tokens of finished requests" + BY_REQUEST, ["task"])
        self.generation_tokens = self._counter(
            "generation_tokens", "Tokens generated by finished requests" + BY_REQUEST, ["task"]
        )

    def add_task_cache_series(self) -> None:
        """Per task, from the engine's step events: an ensemble's members count one by one here, each being a row of
        its own. The engine's own probe tasks are left out (the prompt_cache_* totals include them)."""
        self.task_cache_hits = self._counter(
            "task_cache_hits", "Lookups of a task that found it on the device" + BY_TASK, ["task"]
        )
        self.task_cache_misses = self._counter(
            "task_cache_misses", "Lookups of a task that had to put it on the device (a load)" + BY_TASK, ["task"]
        )
        self.task_cache_evictions = self._counter(
            "task_cache_evictions", "Versions of a task no row held, evicted from the device for room" + BY_TASK,
            ["task"],
        )  # fmt: skip
        self.task_load_seconds = self._histogram(
            "task_load_seconds",
            "Time to put a task version on the device on a miss: materialise it, then compute or write its keys and "
            "values (or keep its input embeddings)" + BY_TASK,
            LOAD_BUCKETS,
            ["task"],
        )

    def _counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(f"{PREFIX}_{name}", documentation, labels, registry=self.registry)

    def _histogram(
        self, name: str, documentation: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> Histogram:
        return Histogram(f"{PREFIX}_{name}", documentation, labels, buckets=buckets, registry=self.registry)

    def on_step(self, step: StepStats) -> None:
        """The engine's step listener: runs on the engine thread, so it only observes (prometheus is thread-safe)."""
        self.batch_size.observe(step.batch_size)
        self.batch_distinct_tasks.observe(step.num_distinct_tasks)
        self.step_duration.observe(step.step_seconds)
        self.observe_cache_events(step.cache_events)

    def observe_cache_events(self, events: TaskCacheEvents) -> None:
        for task_id, _ in events.hits:
            self.task_cache_hits.labels(task=self.cache_label(task_id)).inc()
        for load in events.loads:
            task = self.cache_label(load.key[0])
            self.task_cache_misses.labels(task=task).inc()
            self.task_load_seconds.labels(task=task).observe(load.seconds)
        for task_id, _ in events.evictions:
            self.task_cache_evictions.labels(task=self.cache_label(task_id)).inc()

    def cache_label(self, task_id: str) -> str:
        """The task's label; its three cache counters start at zero together, so from the task's first event its hit
        ratio is defined and its eviction rate reads 0 rather than no data."""
        task = self.task_labels.of_task(task_id)
        for counter in (self.task_cache_hits, self.task_cache_misses, self.task_cache_evictions):
            counter.labels(task=task)
        return task

    def start_request(self, endpoint: str, task_ids: Sequence[str | None]) -> RequestTracker:
        """`task_ids`: the request's GenerateInput.task_ids (one entry, None for the bare backbone, or K members)."""
        return RequestTracker(self, endpoint, tuple(task_ids))

    def on_task_registered(self, created: bool) -> None:
        self.task_registrations.labels(result="created" if created else "replaced").inc()

    def on_task_deleted(self) -> None:
        self.task_deletions.inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.exported), CONTENT_TYPE_LATEST

    def serve(self, host: str, port: int) -> int:
        """The same exposition on a port of its own (a thread's HTTP server), for a scraper that must reach this
        process directly (a Ray replica behind the proxy); returns the port bound (0 picks a free one)."""
        server, _ = start_http_server(port, addr=host, registry=self.exported)
        return int(server.server_port)


class ConstantLabels(Collector):
    """Every series of `registry` with the constant labels added (prometheus_client has no constant labels)."""

    def __init__(self, registry: CollectorRegistry, labels: LabelsProvider) -> None:
        self.registry = registry
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        constant = {name: value for name, value in self.labels().items() if value}
        for family in self.registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labelled.add_sample(
                    sample.name, {**constant, **sample.labels}, sample.value, sample.timestamp, sample.exemplar
                )
            yield labelled


@dataclass
class RequestTracker:
    """The timings of one generation request, recorded as its outputs arrive."""

    metrics: Metrics
    endpoint: str
    task_ids: tuple[str | None, ...]
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    task: str | None = None  # the `task` label, fixed once known
    is_finished: bool = False

    def task_label(self) -> str:
        """Only a request that produced output may give its task a label of its own, so requests for ids that do not
        exist (404s) cannot take the limited slots: one that fails first, for a task without a label, is `_other`."""
        if self.task is None:
            is_served = self.first_token_at is not None
            self.task = self.metrics.task_labels.of_request(self.task_ids, admit=is_served)
        return self.task

    def on_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            ttft = self.metrics.time_to_first_token.labels(task=self.task_label())
            ttft.observe(self.first_token_at - self.started)

    def on_completion(self, completion: Completion) -> None:
        self.on_token()  # a vote ensemble streams nothing before its answer
        m, task = self.metrics, self.task_label()
        m.queue_time.observe(completion.queue_seconds)
        m.request_prompt_tokens.observe(completion.input_tokens)
        m.request_generation_tokens.observe(completion.generated_tokens)
        m.prompt_tokens.labels(task=task).inc(completion.input_tokens)
        m.generation_tokens.labels(task=task).inc(completion.generated_tokens)
        if completion.generated_tokens > 1 and self.first_token_at is not None:
            decode_seconds = time.perf_counter() - self.first_token_at
            tpot = decode_seconds / (completion.generated_tokens - 1)
            m.time_per_output_token.labels(task=task).observe(tpot)

    def on_answer(self, input_tokens: int) -> None:
        """A classification or scoring answer: served (its task may take a label), its input counted as prompt
        tokens; nothing generated."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.metrics.request_prompt_tokens.observe(input_tokens)
        self.metrics.prompt_tokens.labels(task=self.task_label()).inc(input_tokens)

    def finish(self, outcome: str) -> None:
        if self.is_finished:
            return
        self.is_finished = True
        labels = {"endpoint": self.endpoint, "task": self.task_label()}
        self.metrics.requests.labels(**labels, outcome=outcome).inc()
        self.metrics.e2e_latency.labels(**labels).observe(time.perf_counter() - self.started)


class EngineCollector(Collector):
    """Reads engine.stats() at scrape time: nothing to keep in sync, nothing before the model has loaded."""

    def __init__(self, engine: EngineProvider, labels: TaskLabels) -> None:
        self.engine = engine
        self.labels = labels

    def describe(self) -> list[Metric]:
        return []  # unchecked: the families exist only once the engine is up

    def collect(self) -> Iterator[Metric]:
        engine = self.engine()
        yield gauge(
            "ready", "1 once the model is loaded and the engine runs", int(engine is not None and engine.is_ready())
        )
        if engine is None:
            return
        yield engine_info(engine)
        stats = engine.stats()
        cache = stats.cache
        yield gauge("num_requests_running", "Requests in the running batch", stats.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be admitted", stats.num_waiting)
        yield gauge("registered_tasks", "Tasks registered in the store", stats.num_tasks)
        yield counter("engine_steps", "Engine steps run", stats.num_steps)
        yield gauge("kv_cache_used_bytes", "KV pool bytes in blocks held by rows or tasks", stats.kv_cache_used_bytes)
        yield gauge("kv_cache_capacity_bytes", "KV pool bytes, allocated at start", stats.kv_cache_capacity_bytes)
        yield counter("num_preemptions", "Requests preempted for memory and recomputed later", stats.num_preemptions)
        yield counter("prompt_cache_hits", "Task lookups that found the task's tensors on the device", cache.hits)
        yield counter("prompt_cache_misses", "Task lookups that put the task's tensors on the device", cache.misses)
        yield counter("prompt_cache_evictions", "Task versions evicted from the device", cache.evictions)
        yield gauge(
            "prompt_cache_resident_bytes",
            "Device bytes of resident tasks (KV blocks, embeddings)",
            cache.resident_bytes,
        )
        yield gauge("prompt_cache_entries", "Task versions resident on the device", cache.num_entries)
        yield gauge("prompt_cache_pinned_entries", "Resident task versions held by running rows", cache.num_pinned)
        yield gauge("adapter_cache_used_bytes", "Device bytes of resident LoRA and IA3 weights", cache.adapter_bytes)
        yield gauge(
            "adapter_cache_capacity_bytes", "Device bytes for LoRA and IA3 weights (adapter_cache_bytes)",
            cache.adapter_capacity_bytes,
        )  # fmt: skip
        yield gauge("adapter_cache_entries", "LoRA and IA3 task versions resident on the device", cache.num_adapters)
        host = stats.host_adapters
        yield counter("adapter_host_cache_hits", "LoRA and IA3 loads served from host memory (no read)", host.hits)
        yield counter("adapter_host_cache_misses", "LoRA and IA3 loads that read the store", host.misses)
        yield gauge("adapter_host_cache_used_bytes", "Host bytes of the LoRA and IA3 tasks parsed", host.num_bytes)
        yield gauge("adapter_host_cache_entries", "LoRA and IA3 task versions parsed in host memory", host.num_entries)
        yield gauge(
            "adapter_host_cache_capacity_entries", "LoRA and IA3 task versions host memory keeps (max_cpu_loras)",
            host.max_entries,
        )  # fmt: skip
        yield resident_task_versions(stats, self.labels)
        yield task_requests_info(stats)


def engine_info(engine: EngineClient) -> GaugeMetricFamily:
    """Always 1: what this server runs, in its labels (join on it: `* on(model_name) group_left(...)`)."""
    info = engine.info()
    family = GaugeMetricFamily(
        f"{PREFIX}_info",
        "The server's version, backbone, dtype, device and KV pool size (tokens), in its labels; always 1",
        labels=["version", "backbone", "model_type", "dtype", "device", "kv_cache_tokens"],
    )
    family.add_metric(
        [info.version, info.model_id, info.model_type, info.dtype, info.device, str(info.kv_cache_tokens)], 1
    )
    return family


def resident_task_versions(stats: EngineStats, labels: TaskLabels) -> GaugeMetricFamily:
    """Where each task version is held now. Residency gives no task a label of its own (the host tier holds tasks
    nobody has asked for yet); a task without one loses its version too, so `_other` has one series per tier."""
    family = GaugeMetricFamily(
        f"{PREFIX}_resident_task_versions",
        "Task versions held per tier: device (keys and values in the KV pool, or input embeddings) or host (parsed "
        "in CPU memory); a version in neither is only on disk (cold)"
        + f" ({task_labels.TASK_HELP}, its version _other too)",
        labels=["task", "version", "tier"],
    )
    held: Tally[tuple[str, str, str]] = Tally()
    for tier, keys in (("device", stats.cache.resident_tasks), ("host", stats.host_tasks)):
        for task_id, version in keys:
            task = labels.of_task(task_id, admit=False)
            held[task, task_labels.OTHER if task == task_labels.OTHER else str(version), tier] += 1
    for label_values, count in sorted(held.items()):
        family.add_metric(list(label_values), count)
    return family


def task_requests_info(stats: EngineStats) -> GaugeMetricFamily:
    """vLLM's `vllm:lora_requests_info` with task ids for adapters, the gauge the Gateway API Inference Extension's
    endpoint picker reads for adapter affinity: `running_lora_adapters` the tasks held on the device (the protocol's
    "loaded and ready to serve"; every running request's task among them), `waiting_lora_adapters` the waiting
    requests' tasks not held yet, `max_lora` about how many the device holds; comma-joined; the value is the time
    of the reading (the picker takes the series with the highest). One series, read at each scrape."""
    family = GaugeMetricFamily(
        f"{PREFIX}_lora_requests_info",
        "Tasks held on the device (running_lora_adapters), waiting requests' tasks not held yet "
        "(waiting_lora_adapters) and about how many tasks the device holds (max_lora); the value is the reading's "
        "Unix time",
        labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
    )
    held = dict.fromkeys([*stats.running_tasks, *sorted({task_id for task_id, _ in stats.cache.resident_tasks})])
    waiting = [task_id for task_id in dict.fromkeys(stats.waiting_tasks) if task_id not in held]
    family.add_metric([",".join(held), ",".join(waiting), str(stats.cache.max_resident_tasks)], time.time())
    return family


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", documentation, value=value)
