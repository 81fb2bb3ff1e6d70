"""PEFT served over HTTP the way it can be today: one adapter per batch (the baseline of `benchmarks.http_compare`).

`python -m benchmarks.peft_server --backbone DIR --tasks DIR --port N` loads every adapter under --tasks into one
PeftModel per method over a shared base (benchmarks.peft_baseline.PeftServer) and answers the part of
promptserve's API that `promptserve bench` uses: GET /info, GET /v1/tasks, POST /v1/generate and
POST /v1/generate_stream (one final event). A worker thread takes the task of the oldest waiting request and
runs one greedy `generate` of every waiting request of that task (up to --max-batch-size); then the next task.
No continuous batching, no mixing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from benchmarks.peft_baseline import PeftServer
from benchmarks.workload import PREFIX, PROMPT, TaskSpec


class Parameters(BaseModel):
    max_new_tokens: int = 64


class GenerateBody(BaseModel):
    inputs: str
    task_id: str
    parameters: Parameters = Parameters()


@dataclass(eq=False)
class Pending:
    body: GenerateBody
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.done = self.loop.create_future()


class PerTaskBatcher:
    """The worker: per-task batches, oldest task first."""

    def __init__(self, peft: PeftServer, max_batch_size: int) -> None:
        self.peft = peft
        self.max_batch_size = max_batch_size
        self.inbox: queue.SimpleQueue[Pending] = queue.SimpleQueue()
        self.waiting: list[Pending] = []
        threading.Thread(target=self.run, daemon=True).start()

    def run(self) -> None:
        while True:
            if not self.waiting:
                self.waiting.append(self.inbox.get())
            while not self.inbox.empty():
                self.waiting.append(self.inbox.get_nowait())
            task_id = self.waiting[0].body.task_id
            batch = [p for p in self.waiting if p.body.task_id == task_id][: self.max_batch_size]
            self.waiting = [p for p in self.waiting if p not in batch]
            max_new = max(p.body.parameters.max_new_tokens for p in batch)
            encoded = self.peft.encode([p.body.inputs for p in batch])
            generated = self.peft.generate(task_id, encoded, max_new)
            for pending, ids in zip(batch, generated, strict=True):
                ids = ids[: pending.body.parameters.max_new_tokens]
                pending.loop.call_soon_threadsafe(pending.done.set_result, ids)


def create_app(peft: PeftServer, tasks: list[TaskSpec], max_batch_size: int) -> FastAPI:
    app = FastAPI(title="PEFT per-task batches")
    batcher = PerTaskBatcher(peft, max_batch_size)

    @app.get("/info")
    def info() -> dict[str, object]:
        return {"model_id": "peft-baseline", "max_batch_size": max_batch_size}

    @app.get("/v1/tasks")
    def list_tasks() -> dict[str, object]:
        return {"tasks": [{"task_id": task.task_id} for task in tasks]}

    @app.post("/v1/generate")
    async def generate(body: GenerateBody) -> dict[str, object]:
        pending = Pending(body, asyncio.get_running_loop())
        batcher.inbox.put(pending)
        ids = await pending.done
        return {"generated_text": "", "details": {"generated_tokens": len(ids), "finish_reason": "length"}}

    @app.post("/v1/generate_stream")
    async def generate_stream(body: GenerateBody) -> StreamingResponse:
        pending = Pending(body, asyncio.get_running_loop())
        batcher.inbox.put(pending)

        async def events() -> AsyncIterator[str]:
            ids = await pending.done
            final = {"generated_text": "", "details": {"generated_tokens": len(ids), "finish_reason": "length"}}
            yield f"data: {json.dumps(final)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def load_tasks(tasks_dir: Path) -> list[TaskSpec]:
    tasks = []
    for adapter_dir in sorted(p for p in tasks_dir.iterdir() if (p / "adapter_config.json").is_file()):
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        method = PREFIX if config["peft_type"] == "PREFIX_TUNING" else PROMPT
        tasks.append(TaskSpec(adapter_dir.name, method, config["num_virtual_tokens"], adapter_dir))
    return tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peft_server", description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", type=Path, required=True)
    parser.add_argument("--tasks", type=Path, required=True, help="a directory of PEFT adapter directories")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = load_tasks(args.tasks)
    app = create_app(PeftServer(args.backbone, tasks, args.device, args.dtype), tasks, args.max_batch_size)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
