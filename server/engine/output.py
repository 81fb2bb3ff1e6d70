"""Turns the engine's token events into what a caller gets, off the engine thread (as vLLM v1's output processor).

The engine thread appends token ids and knows only token-level endings (end of sequence, max_new_tokens). Each
request's OutputProcessor runs where its caller waits (the server's event loop): it decodes every row's tokens
incrementally, finds stop sequences (the engine is then told to stop that row, or to drop the request), and builds
the completion: the vote of an ensemble, each token's text, the members' answers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from server.engine.detokenizer import CONTEXT_TOKENS, IncrementalDecoder, find_stop
from server.engine.request import Request
from server.engine.types import (
    Alternative,
    Completion,
    EngineOutput,
    EnsembleMode,
    FinishReason,
    MemberResult,
    RequestOutput,
    RowToken,
    Token,
)


@dataclass(slots=True)
class RowText:
    """What one row has said so far, as text."""

    task_id: str | None
    task_version: int | None
    decoder: IncrementalDecoder
    token_ids: list[int] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None

    @property
    def mean_logprob(self) -> float:
        return sum(t.logprob for t in self.tokens) / len(self.tokens) if self.tokens else float("-inf")


@dataclass(frozen=True, slots=True)
class Processed:
    outputs: list[RequestOutput]  # for the caller, in order
    stopped_rows: list[int]  # rows that reached a stop sequence in this event: the engine may stop them
    is_finished: bool  # the caller has its completion (or error): the engine may drop the request


class OutputProcessor:
    def __init__(self, request: Request, tokenizer: PreTrainedTokenizerBase) -> None:
        self.request = request
        # a causal row's text continues its input; an encoder-decoder's starts the decoder's own sequence
        continues = request.kind.continues_input and request.input_embeds is None  # embeddings have no text
        context = request.input_ids[-CONTEXT_TOKENS:] if continues else []
        self.rows = [
            RowText(row.task_id, row.task_version, IncrementalDecoder(tokenizer, context)) for row in request.rows
        ]
        self.with_pieces = request.sampling.top_logprobs is not None
        self.is_finished = False

    def process(self, output: EngineOutput) -> Processed:
        if self.is_finished:  # tokens the engine made before it heard of a stop
            return Processed([], [], True)
        if output.error is not None:
            self.is_finished = True
            return Processed([RequestOutput(self.request.request_id, error=output.error)], [], True)
        stopped = [token.row for token in output.tokens if self.append(token)]
        return Processed(self.outputs(output.tokens), stopped, self.is_finished)

    def append(self, token: RowToken) -> bool:
        """Add one token to its row; True if it completed a stop sequence."""
        row = self.rows[token.row]
        if row.finish_reason is not None:
            return False
        row.token_ids.append(token.id)
        piece, top = self.pieces(row, token)
        if token.finish_reason is FinishReason.EOS:
            row.tokens.append(Token(token.id, "", token.logprob, top, piece))
            row.text += row.decoder.flush(row.token_ids)
            row.finish_reason = FinishReason.EOS
            return False
        new_text = row.decoder.next_text(row.token_ids)
        row.text += new_text
        row.tokens.append(Token(token.id, new_text, token.logprob, top, piece))
        stop_at = find_stop(row.text, self.request.sampling.stop, len(new_text)) if new_text else None
        if stop_at is not None:
            row.text, row.finish_reason = row.text[:stop_at], FinishReason.STOP
            return True
        if token.finish_reason is FinishReason.LENGTH:
            row.text += row.decoder.flush(row.token_ids)
            row.finish_reason = FinishReason.LENGTH
        return False

    def pieces(self, row: RowText, token: RowToken) -> tuple[str, tuple[Alternative, ...]]:
        """When log-probabilities are asked for: the chosen token and each alternative as text at this position
        (decoded after the same tokens, so the chosen one reads as it does among the alternatives)."""
        if not self.with_pieces:
            return "", ()
        ids = [token.id, *(i for i, _ in token.top)]
        chosen, *texts = row.decoder.pieces(ids)
        return chosen, tuple(Alternative(i, text, lp) for (i, lp), text in zip(token.top, texts, strict=True))

    def outputs(self, tokens: tuple[RowToken, ...]) -> list[RequestOutput]:
        """A streamed token (not for a vote: its answer is known only at the end), or the completion."""
        streams = self.request.ensemble is not EnsembleMode.VOTE
        last = self.rows[0].tokens[-1] if streams and self.rows[0].tokens else None
        if all(row.finish_reason is not None for row in self.rows):
            self.is_finished = True
            return [RequestOutput(self.request.request_id, token=last, completion=self.completion())]
        if streams and any(token.row == 0 for token in tokens) and last is not None:
            return [RequestOutput(self.request.request_id, token=last)]
        return []

    def completion(self) -> Completion:
        request = self.request
        answer = vote(self.rows) if request.ensemble is EnsembleMode.VOTE else self.rows[0]
        assert answer.finish_reason is not None
        task = (answer.task_id, answer.task_version)
        if request.ensemble is EnsembleMode.MEAN:
            task = (None, None)  # the answer comes from all members together
        members = None
        if request.ensemble is not None:
            members = tuple(MemberResult(row.task_id, row.task_version, row.text) for row in self.rows)
        started = request.first_scheduled_time or request.arrival_time
        return Completion(
            generated_text=answer.text,
            finish_reason=answer.finish_reason,
            generated_tokens=len(answer.token_ids),
            input_tokens=request.num_input_tokens,
            task_id=task[0],
            task_version=task[1],
            tokens=tuple(answer.tokens),
            members=members,
            queue_seconds=started - request.arrival_time,
            virtual_tokens=sum(row.num_virtual_tokens for row in request.rows),
        )


def vote(rows: list[RowText]) -> RowText:
    """The most frequent text wins; ties go to the higher mean token log-probability (Lester et al. 2021)."""
    counts = Counter(row.text for row in rows)
    return max(rows, key=lambda row: (counts[row.text], row.mean_logprob))
