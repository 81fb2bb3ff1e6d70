"""What /v1/completions does with its prompts beyond generating after them (vLLM's extensions): prompts given as
token ids, the prompt echoed, the prompt's own log-probabilities (computed as engine requests in the same mixed
batch as the completions), and `max_tokens: 0`, which answers with the echo alone."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass

from prompt_store.types import TaskRecord
from server.api.errors import ApiError
from server.api.openai_generation import Choice, gather_all, naming_prompt
from server.api.openai_schemas import CompletionLogprobs, CompletionRequest, PromptLogprobs, prompt_logprobs_of
from server.api.settings import Settings
from server.engine.interface import EngineClient
from server.engine.prompt_embeds import max_embeds_bytes
from server.engine.types import Completion, FinishReason, PromptScoreInput, PromptToken

Scored = tuple[PromptToken | None, ...]  # a prompt's tokens' log-probabilities (the first: None)


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str  # what echo shows: the prompt, or its token ids' text
    token_ids: tuple[int, ...] | None  # given as ids, or tokenized because the request needs them
    is_ids: bool = False  # given as token ids (used as they are)
    first_text: str = ""  # the first token's text, when its log-probabilities are asked for
    embeds: bytes | None = None  # given as embeddings: a torch.save'd tensor, loaded (safely) by the engine

    @property
    def generation_input(self) -> str | tuple[int, ...] | bytes:
        """What its choices generate after: embeddings, ids (given, or tokenized to be scored), or its text."""
        if self.embeds is not None:
            return self.embeds
        return self.token_ids if self.token_ids is not None else self.text


def needs_ids(body: CompletionRequest, new_tokens: int) -> bool:
    """Text prompts are tokenized here when the answer needs their tokens: to score them, or to count them with
    no completion to count them."""
    return body.scores_prompt or new_tokens == 0


def prepare_prompts(body: CompletionRequest, new_tokens: int, engine: EngineClient, settings: Settings) -> list[Prompt]:
    """Blocking (tokenizer work): each prompt's echo text and token ids."""
    if body.prompt_embeds is not None:
        return [Prompt("", None, embeds=decoded_embeds(text, engine, settings)) for text in body.embeds]
    with_ids = needs_ids(body, new_tokens)
    prompts = []
    for prompt in body.prompts:
        if isinstance(prompt, str):
            ids = tuple(engine.tokenize(prompt, body.add_special_tokens)) if with_ids else None
            prompts.append(Prompt(prompt, ids))
        else:
            text = engine.detokenize(list(prompt)) if body.echo else ""  # also checks the ids
            prompts.append(Prompt(text, tuple(prompt), is_ids=True))
    if body.scores_prompt:
        prompts = [with_first_text(prompt, engine) for prompt in prompts]
    return prompts


def decoded_embeds(text: str, engine: EngineClient, settings: Settings) -> bytes:
    """prompt_embeds' base64, decoded once it is known to be enabled and small enough to be a prompt's."""
    if not settings.enable_prompt_embeds:
        raise ApiError(400, "validation", "prompt_embeds: expected a server started with --enable-prompt-embeds "
                       "(PROMPTSERVE_ENABLE_PROMPT_EMBEDS); this one is not", param="prompt_embeds")  # fmt: skip
    limit = max_embeds_bytes(settings.engine.max_input_tokens, engine.info().hidden_size)
    if len(text) > (limit + 2) // 3 * 4:
        raise ApiError(413, "too_large", f"prompt_embeds: expected at most {limit} bytes; found {len(text) * 3 // 4}",
                       param="prompt_embeds")  # fmt: skip
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ApiError(400, "validation", f"prompt_embeds: expected base64; {exc}", param="prompt_embeds") from None


def with_first_text(prompt: Prompt, engine: EngineClient) -> Prompt:
    if not prompt.token_ids:
        raise ApiError(400, "validation", "prompt: expected at least one token to score; found none", param="prompt")
    first = engine.detokenize([prompt.token_ids[0]])
    return Prompt(prompt.text, prompt.token_ids, prompt.is_ids, first)


def scoring_task(choices: Sequence[Choice]) -> str | None:
    """The one task the prompts are scored under: an ensemble's prompts have no single log-probability."""
    task_ids = choices[0].request.task_ids if choices else (None,)
    if len(task_ids) != 1:
        raise ApiError(
            400,
            "validation",
            "task_ids: expected one task (model) when the prompt's log-probabilities are asked for (echo with "
            f"logprobs, prompt_logprobs); found an ensemble of {len(task_ids)}",
            param="task_ids",
        )
    return task_ids[0]


async def score_prompts(engine: EngineClient, prompts: list[Prompt], task_id: str | None, top: int) -> list[Scored]:
    """Each prompt's token log-probabilities, as engine requests running beside the completions."""
    works = []
    for i, prompt in enumerate(prompts):
        assert prompt.token_ids is not None, "prepare_prompts tokenizes the prompts it scores"
        works.append(naming_prompt(engine.prompt_logprobs(PromptScoreInput(prompt.token_ids, task_id, top)), i,
                                   len(prompts)))  # fmt: skip
    return await gather_all(works)


def echo_only(prompt: Prompt, tasks: list[TaskRecord]) -> Completion:
    """`max_tokens: 0`: no completion, the prompt's tokens counted (and its tasks' virtual tokens, apart)."""
    num_tokens = len(prompt.token_ids or ())
    first = tasks[0] if len(tasks) == 1 else None
    return Completion("", FinishReason.LENGTH, 0, num_tokens, first.task_id if first else None,
                      first.version if first else None,
                      virtual_tokens=sum(task.num_virtual_tokens for task in tasks))  # fmt: skip


def choice_logprobs(
    body: CompletionRequest, prompt: Prompt, scored: Scored | None, result: Completion
) -> CompletionLogprobs | None:
    """The completion's tokens' log-probabilities, after the echoed prompt's."""
    if body.logprobs is None:
        return None
    echo = prompt.text if body.echo else ""
    generated = CompletionLogprobs.of(list(result.tokens), len(echo))
    if not body.echo or scored is None:
        return generated
    return CompletionLogprobs.of_prompt(scored, prompt.first_text, body.logprobs, echo).then(generated)


def choice_prompt_logprobs(body: CompletionRequest, scored: Scored | None) -> PromptLogprobs | None:
    if body.prompt_logprobs is None or scored is None:
        return None
    return prompt_logprobs_of(scored, body.prompt_logprobs)
