"""The engine thread behind its asyncio face: streaming, abort on close, hot task changes, failure recovery."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prompt_store.errors import TaskNotFound
from prompt_store.registry import TaskStore
from server.engine.async_engine import AsyncEngine, Outbox, build_engine, deliver_all
from server.engine.config import EngineConfig
from server.engine.errors import EngineUnavailable, GenerationFailed
from server.engine.types import (
    EngineOutput,
    FinishReason,
    GenerateInput,
    RequestOutput,
    RowToken,
    SamplingParams,
    ScoreInput,
)
from tests.fixtures import TinyBackbone


@pytest.fixture
def engine(tiny_llama: TinyBackbone, tmp_path: Path) -> Iterator[AsyncEngine]:
    config = EngineConfig(model=str(tiny_llama.path), store_dir=str(tmp_path / "s"), device="cpu", poll_interval_s=0)
    engine = build_engine(config)
    for kind, adapter_dir in tiny_llama.adapters.items():
        engine.store.register_dir(kind, adapter_dir)
    yield engine
    engine.shutdown()


def generate(task_id: str | None, text: str = "hello", max_new_tokens: int = 8, **sampling) -> GenerateInput:
    return GenerateInput(text, (task_id,), sampling=SamplingParams(max_new_tokens=max_new_tokens, **sampling))


async def collect(engine: AsyncEngine, request: GenerateInput) -> list[RequestOutput]:
    return [output async for output in engine.generate(request)]


def wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        core = engine.engine
        if core.is_idle() and core.memory.num_task_refs() == 0:
            return True
        time.sleep(0.01)
    return False


def text_of(outputs: list[RequestOutput]) -> str:
    return outputs[-1].completion.generated_text


def test_generate_streams_each_token_then_the_completion(engine: AsyncEngine):
    outputs = asyncio.run(collect(engine, generate("prefix", max_new_tokens=6)))
    tokens = [output.token for output in outputs if output.token is not None]
    assert len(tokens) == 6 and outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    assert [t.id for t in tokens] == [t.id for t in outputs[-1].completion.tokens]


def test_unknown_task_raises_task_not_found(engine: AsyncEngine):
    with pytest.raises(TaskNotFound):
        asyncio.run(collect(engine, generate("no-such-task")))


def test_concurrent_requests_equal_their_sequential_results(engine: AsyncEngine):
    tasks = [record.task_id for record in engine.list_tasks()] + [None]
    requests = [generate(task, text=f"input {i} " * (i % 3 + 1), max_new_tokens=10) for i, task in enumerate(tasks)]
    sequential = [text_of(asyncio.run(collect(engine, request))) for request in requests]

    async def together() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(engine, request) for request in requests))

    assert [text_of(outputs) for outputs in asyncio.run(together())] == sequential
    assert wait_idle(engine)


def test_closing_the_stream_aborts_and_frees_the_row(engine: AsyncEngine):
    async def read_two_then_close() -> None:
        stream = engine.generate(generate("prefix", max_new_tokens=200))
        await anext(stream)
        await anext(stream)
        await stream.aclose()

    asyncio.run(read_two_then_close())
    assert wait_idle(engine)


def test_registered_task_is_servable_when_register_returns(engine: AsyncEngine, tiny_llama: TinyBackbone):
    adapter = tiny_llama.adapters["prompt_tuning"]
    record, created = engine.register_task(
        "fresh", (adapter / "adapter_config.json").read_bytes(), (adapter / "adapter_model.safetensors").read_bytes()
    )
    assert created and record.version == 1
    outputs = asyncio.run(collect(engine, generate("fresh", max_new_tokens=3)))
    assert outputs[-1].completion.task_id == "fresh"


def test_replaced_task_running_rows_keep_their_version(engine: AsyncEngine, tiny_llama: TinyBackbone):
    engine.store.register_dir("moving", tiny_llama.adapters["prefix"])

    async def scenario() -> tuple[list[RequestOutput], list[RequestOutput]]:
        stream = engine.generate(generate("moving", max_new_tokens=30))
        first = [await anext(stream)]
        await asyncio.to_thread(engine.store.register_dir, "moving", tiny_llama.adapters["prompt_tuning"])
        newer = await collect(engine, generate("moving", max_new_tokens=3))
        return first + [output async for output in stream], newer

    older, newer = asyncio.run(scenario())
    assert older[-1].completion.task_version == 1 and older[-1].completion.generated_tokens == 30
    assert newer[-1].completion.task_version == 2
    assert wait_idle(engine)
    assert ("moving", 1) not in engine.engine.memory.tasks  # retired once its last row left


def test_deleted_task_running_request_finishes(engine: AsyncEngine, tiny_llama: TinyBackbone):
    engine.store.register_dir("doomed", tiny_llama.adapters["prefix"])

    async def scenario() -> list[RequestOutput]:
        stream = engine.generate(generate("doomed", max_new_tokens=20))
        first = [await anext(stream)]
        await asyncio.to_thread(engine.delete_task, "doomed")
        return first + [output async for output in stream]

    outputs = asyncio.run(scenario())
    assert outputs[-1].completion.generated_tokens == 20
    with pytest.raises(TaskNotFound):
        asyncio.run(collect(engine, generate("doomed")))
    assert wait_idle(engine)


def test_step_failure_reaches_open_requests_and_engine_keeps_serving(engine: AsyncEngine, monkeypatch):
    runner = engine.engine.runner
    real_run = runner.run
    calls = {"n": 0}

    def flaky_run(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device error")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(runner, "run", flaky_run)
    with pytest.raises(EngineUnavailable, match="simulated device error"):
        asyncio.run(collect(engine, generate("prefix", max_new_tokens=5)))
    assert wait_idle(engine)
    assert asyncio.run(collect(engine, generate("prefix", max_new_tokens=2)))[-1].completion.generated_tokens == 2


def test_a_failing_inbox_command_does_not_stop_the_engine_thread(engine: AsyncEngine):
    def broken() -> None:
        raise RuntimeError("simulated bug in a command")

    engine.send(broken)
    assert asyncio.run(collect(engine, generate("prefix", max_new_tokens=2)))[-1].completion.generated_tokens == 2
    assert engine.is_ready()


def failing_once(monkeypatch: pytest.MonkeyPatch, target: object, name: str) -> None:
    real = getattr(target, name)
    calls = {"n": 0}

    def fails_first(*args: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError(f"simulated bug in Engine.{name}")
        return real(*args)

    monkeypatch.setattr(target, name, fails_first)


def test_a_request_whose_command_fails_gets_the_error_not_a_wait(engine: AsyncEngine, monkeypatch):
    failing_once(monkeypatch, engine.engine, "add")
    started = time.monotonic()
    with pytest.raises(GenerationFailed, match=r"simulated bug in Engine\.add"):
        asyncio.run(asyncio.wait_for(collect(engine, generate("prefix")), timeout=5))
    assert time.monotonic() - started < 1
    assert asyncio.run(collect(engine, generate("prefix", max_new_tokens=2)))[-1].completion.generated_tokens == 2
    assert wait_idle(engine)


def test_a_score_whose_command_fails_gets_the_error_not_a_wait(engine: AsyncEngine, monkeypatch):
    failing_once(monkeypatch, engine.engine, "add_all")
    with pytest.raises(GenerationFailed, match=r"simulated bug in Engine\.add_all"):
        asyncio.run(asyncio.wait_for(engine.score(ScoreInput("is it?", ("yes", "no"))), timeout=5))
    assert wait_idle(engine)


def test_a_request_that_reaches_a_stopped_engine_gets_an_error_within_a_second(engine: AsyncEngine, monkeypatch):
    """The engine stopped between the request's readiness check and its command (nobody will run the command)."""
    engine.shutdown()
    monkeypatch.setattr(engine, "is_ready", lambda: True)
    started = time.monotonic()
    with pytest.raises(EngineUnavailable, match="the engine stopped before it answered"):
        asyncio.run(asyncio.wait_for(collect(engine, generate("prefix")), timeout=5))
    assert time.monotonic() - started < 1


def test_polling_picks_up_a_task_written_by_another_process(tiny_llama: TinyBackbone, tmp_path: Path):
    store_dir = tmp_path / "shared-store"
    config = EngineConfig(model=str(tiny_llama.path), store_dir=str(store_dir), device="cpu", poll_interval_s=0.1)
    engine = build_engine(config)
    try:
        other = TaskStore(store_dir, engine.backbone.fingerprint)  # e.g. a training job or another replica
        other.register_dir("from-elsewhere", tiny_llama.adapters["prefix_projection"])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(r.task_id == "from-elsewhere" for r in engine.list_tasks()):
            time.sleep(0.05)
        outputs = asyncio.run(collect(engine, generate("from-elsewhere", max_new_tokens=2)))
        assert outputs[-1].completion.task_id == "from-elsewhere"
    finally:
        engine.shutdown()


def test_shutdown_fails_waiting_requests_and_refuses_new_ones(engine: AsyncEngine):
    engine.shutdown()
    assert not engine.is_ready()
    with pytest.raises(EngineUnavailable):
        asyncio.run(collect(engine, generate(None)))


def test_a_steps_outputs_reach_the_event_loop_in_one_hand_off(engine: AsyncEngine, monkeypatch):
    """Eight requests decoding together: one call_soon_threadsafe per step and loop, not one per request."""
    wake_ups: list[int] = []

    async def run() -> list[list[RequestOutput]]:
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counted(callback, *args):
            if callback is deliver_all:
                wake_ups.append(len(args[0]))
            return real(callback, *args)

        monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
        tasks = ("prefix", "prompt_tuning", None, "p_tuning_mlp") * 2
        return await asyncio.gather(*(collect(engine, generate(t, f"row {i}", 6)) for i, t in enumerate(tasks)))

    results = asyncio.run(run())
    assert all(outputs[-1].completion.generated_tokens == 6 for outputs in results)
    steps = engine.engine.num_steps
    assert len(wake_ups) <= steps and sum(wake_ups) == 8 * 6
    assert max(wake_ups) > 1


def test_an_output_for_a_closed_loop_raises_at_the_sink(engine: AsyncEngine):
    """The engine drops a request whose caller's loop has closed (see Engine.deliver): its sink says so at once."""
    loop = asyncio.new_event_loop()
    sink = engine.outbox.sink(loop, asyncio.Queue())
    loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        sink(EngineOutput("gone"))
    with pytest.raises(RuntimeError, match="closed"):
        sink.put_token("gone", 0, 5, -0.5, None, ())


def test_a_token_given_as_values_arrives_as_the_output_a_plain_sink_gets_in_order():
    """A one-row request's token reaches the outbox as values (the engine thread makes no output for it): the
    caller's loop gets the EngineOutput the engine makes for any other sink, in the order the engine gave them."""
    top = ((7, -0.25), (3, -1.5))

    async def delivered() -> list[EngineOutput]:
        outbox, events = Outbox(), asyncio.Queue[EngineOutput]()
        sink = outbox.sink(asyncio.get_running_loop(), events)
        sink(EngineOutput("r", (RowToken(0, 5, -0.5),)))
        sink.put_token("r", 0, 7, -0.25, None, top)
        sink.put_token("r", 0, 2, -0.75, FinishReason.EOS, ())
        sink(EngineOutput("r", error=failure))
        outbox.flush()
        await asyncio.sleep(0)  # the hand-off runs on this loop
        return [events.get_nowait() for _ in range(events.qsize())]

    failure = RuntimeError("after the tokens")
    assert asyncio.run(delivered()) == [
        EngineOutput("r", (RowToken(0, 5, -0.5),)),
        EngineOutput("r", (RowToken(0, 7, -0.25, None, top),), finished=False),
        EngineOutput("r", (RowToken(0, 2, -0.75, FinishReason.EOS),), finished=True),
        EngineOutput("r", error=failure),
    ]


def test_a_caller_cancelled_as_its_output_arrives_is_cancelled(engine: AsyncEngine) -> None:
    """The output and the caller's cancellation land in the same loop turn (a client leaves as a step delivers):
    the caller must still see the cancellation, or its abort is never sent and it waits for outputs forever.
    (Python 3.11's asyncio.wait_for returns the finished inner result and drops the cancellation.)"""

    async def main() -> bool:
        events: asyncio.Queue[EngineOutput] = asyncio.Queue()

        async def caller() -> None:
            while True:
                await engine.next_event(events)

        waiting = asyncio.ensure_future(caller())
        await asyncio.sleep(0)  # it waits inside next_event
        events.put_nowait(EngineOutput("r"))
        waiting.cancel()
        await asyncio.wait([waiting], timeout=2)
        return waiting.cancelled()

    assert asyncio.run(main())
