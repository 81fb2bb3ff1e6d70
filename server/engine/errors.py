"""Typed engine errors; `server.api.errors` maps each one to an HTTP status."""

from prompt_store.errors import InvalidTask, TaskNotFound, TaskTooLarge


class EngineError(Exception):
    """Base class of errors raised by the engine."""


class UnsupportedBackbone(EngineError, ValueError):
    """A backbone the engine cannot serve as PEFT would run it; refused at start-up, naming what is served."""


class QueueFull(EngineError):
    """The waiting queue is at capacity; retry after `retry_after` seconds."""

    def __init__(self, num_waiting: int, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(f"the waiting queue is full ({num_waiting} requests waiting); retry later")


class InputTooLong(EngineError):
    """A request that cannot fit the batch limits even alone."""


class InvalidPrompt(EngineError, ValueError):
    """Bad generation input or parameters (expected vs found in the message)."""


class WrongKind(InvalidPrompt):
    """A task or backbone of another kind than the route serves (a classification task on /v1/generate, a
    generation task on /v1/classify, generation on an encoder)."""


class UnknownToken(InvalidPrompt):
    """A token id the backbone's embedding table has no row for (a tokenizer with more tokens than its model)."""


class NoChatTemplate(InvalidPrompt):
    """Chat messages for a backbone whose tokenizer has no chat template."""


class GenerationFailed(EngineError):
    """One request could not go on (e.g. its task drives the model to NaN); its batch mates are unaffected."""


class NonFiniteOutput(GenerationFailed):
    """A row's logits or head probabilities came out NaN or infinite: its task's values overflow the backbone."""


class UnservableTarget(GenerationFailed):
    """A LoRA / IA3 task targets a module the engine cannot adapt per token (the backbone has no such module, or also
    calls it on something other than the pass's tokens, as DeBERTa's relative positions): its own requests fail, and
    the registration probe refuses it (422)."""

    def __init__(self, module: str, keys: list[tuple[str, int]], found: str) -> None:
        self.module = module
        self.keys = keys
        self.found = found
        super().__init__(self.naming(", ".join(f"task {task_id!r} version {version}" for task_id, version in keys)))

    def naming(self, tasks: str) -> str:
        """The message with `tasks` as the ones targeting the module (a registration's probe ran its task under
        another id: the refusal names the task as uploaded)."""
        return (
            f"expected LoRA / IA3 target modules the engine applies to each token; found {tasks} targeting "
            f"{self.module!r}, {self.found}: not served"
        )


class EngineUnavailable(EngineError):
    """The engine is not ready yet, shutting down, or its loop failed."""


__all__ = [
    "EngineError",
    "EngineUnavailable",
    "GenerationFailed",
    "InputTooLong",
    "InvalidPrompt",
    "InvalidTask",
    "NoChatTemplate",
    "NonFiniteOutput",
    "QueueFull",
    "TaskNotFound",
    "TaskTooLarge",
    "UnknownToken",
    "UnservableTarget",
    "UnsupportedBackbone",
    "WrongKind",
    "first_line",
]


def first_line(error: BaseException, limit: int = 200) -> str:
    """An error's first line, short enough for a one-line message (a library's text may run on for paragraphs)."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
