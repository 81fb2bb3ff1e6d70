"""Typed errors of the prompt store; the API maps them to HTTP statuses in one place."""


class StoreError(Exception):
    """Base class of every prompt-store error."""


class InvalidTask(StoreError, ValueError):
    """An adapter or task id that cannot be served: the message says what was expected and what was found."""


class TaskTooLarge(InvalidTask):
    """An upload over the configured size or virtual-token limits."""


class TaskNotFound(StoreError, KeyError):
    """No task (or no such version) with this id is registered."""

    def __init__(self, task_id: str, version: int | None = None) -> None:
        self.task_id = task_id
        self.version = version
        what = f"task {task_id!r}" if version is None else f"version {version} of task {task_id!r}"
        super().__init__(f"{what} is not registered")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class StoreUnavailable(StoreError):
    """The store's backend cannot be reached or refused the request (an S3 endpoint down, a missing bucket)."""


class LookupThrottled(StoreUnavailable):
    """A task id this process does not know could not be looked up in the shared store: the lookups' rate limit
    (prompt_store/lookups.py) is spent. Retryable: the id may exist."""
