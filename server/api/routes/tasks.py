"""PUT, GET and DELETE /v1/tasks/{task_id}; GET /v1/tasks. Writes need the admin token when one is set."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from anyio import CapacityLimiter, to_thread
from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from server.api.errors import ApiError
from server.api.metrics import Metrics
from server.api.schemas import TASK_ID_PATTERN, TaskList, TaskOut
from server.api.settings import Settings
from server.api.state import get_engine, get_metrics, get_settings, require_admin, served_model_name
from server.api.uploads import UPLOAD_OPENAPI, read_adapter_upload
from server.engine.interface import EngineClient

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])
MAX_CONCURRENT_REGISTRATIONS = 4


def registrations(app: Any) -> CapacityLimiter:
    """The app's own limiter for registrations (created on first use, inside the event loop)."""
    if not hasattr(app.state, "registrations"):
        app.state.registrations = CapacityLimiter(MAX_CONCURRENT_REGISTRATIONS)
    limiter: CapacityLimiter = app.state.registrations
    return limiter


TaskIdPath = Annotated[str, Path(pattern=TASK_ID_PATTERN, description="the task's id")]


@router.put(
    "/{task_id}",
    response_model=TaskOut,
    status_code=201,
    dependencies=[Depends(require_admin)],  # no body parameter: the token is checked before the upload is read
    openapi_extra=UPLOAD_OPENAPI,
    responses={200: {"model": TaskOut, "description": "a new version replaced the task"}},
)
async def put_task(
    task_id: TaskIdPath,
    request: Request,
    engine: EngineClient = Depends(get_engine),
    settings: Settings = Depends(get_settings),
    metrics: Metrics = Depends(get_metrics),
) -> Response:
    refuse_backbone_name(task_id, served_model_name(settings, engine))
    upload = await read_adapter_upload(request, settings)
    register = partial(engine.register_task, task_id, upload.config, upload.model, upload.labels)
    # a registration waits for the engine to probe the task: it must not hold the threads other routes need
    record, created = await to_thread.run_sync(register, limiter=registrations(request.app))
    metrics.on_task_registered(created)
    return JSONResponse(TaskOut.of(record).model_dump(mode="json"), status_code=201 if created else 200)


def refuse_backbone_name(task_id: str, backbone: str) -> None:
    """`model` set to the backbone's id means the bare backbone on the OpenAI routes: no task may take that id."""
    if task_id == backbone:
        raise ApiError(
            409,
            "conflict",
            f"task_id: expected an id other than the served backbone's (model {backbone!r} on the OpenAI routes is the "
            f"bare backbone); found {task_id!r}",
        )


@router.get("", response_model=TaskList)
def list_tasks(engine: EngineClient = Depends(get_engine)) -> TaskList:
    return TaskList(tasks=[TaskOut.of(record) for record in engine.list_tasks()])


@router.get("/{task_id}", response_model=TaskOut)
def get_task(task_id: TaskIdPath, engine: EngineClient = Depends(get_engine)) -> TaskOut:
    return TaskOut.of(engine.get_task(task_id))


@router.delete("/{task_id}", status_code=204, response_class=Response, dependencies=[Depends(require_admin)])
async def delete_task(
    task_id: TaskIdPath, engine: EngineClient = Depends(get_engine), metrics: Metrics = Depends(get_metrics)
) -> Response:
    await run_in_threadpool(engine.delete_task, task_id)
    metrics.on_task_deleted()
    return Response(status_code=204)
