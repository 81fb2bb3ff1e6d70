"""Which positions of a step's packed stream are read out, and for which row: a generation row's last token is
sampled; a scoring row's positions give its candidate tokens' log-probabilities; a classification row's hidden
states feed its task's head (one token per row for a sequence head, every input token for a token head)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prompt_store.types import SEQ_CLS
from server.engine.request import Job, Sequence
from server.engine.scheduler import Chunk


@dataclass(frozen=True, slots=True)
class Classified:
    row: Sequence
    first: int  # its first hidden row in the step's hidden states
    count: int


@dataclass(slots=True)
class Readout:
    sampled: list[Sequence] = field(default_factory=list)  # logits rows 0 .. len - 1
    scored: list[tuple[Sequence, int]] = field(default_factory=list)  # (row, target index): the logits rows after
    classified: list[Classified] = field(default_factory=list)
    completed: list[Sequence] = field(default_factory=list)  # CLASSIFY and SCORE rows this step computes in full
    logit_index: list[int] = field(default_factory=list)  # stream positions, sampled then scored
    hidden_index: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, chunks: list[Chunk]) -> Readout:
        readout, scored_index = cls(), []
        offset = 0
        generate = Job.GENERATE  # most rows: their test first, once
        for chunk in chunks:
            row, job = chunk.row, chunk.row.request.job
            if job is generate:
                if chunk.is_last:
                    readout.sampled.append(row)
                    readout.logit_index.append(offset + chunk.num_tokens - 1)
                offset += chunk.num_tokens
                continue
            if job is Job.SCORE:
                for token in range(chunk.start, chunk.start + chunk.num_tokens):
                    target = token - row.scored_from
                    if 0 <= target < len(row.targets):
                        readout.scored.append((row, target))
                        scored_index.append(offset + token - chunk.start)
            elif job is Job.CLASSIFY and chunk.is_last:
                own = classified_tokens(row)
                readout.classified.append(Classified(row, len(readout.hidden_index), len(own)))
                readout.hidden_index += [offset + token - chunk.start for token in own]
            if chunk.is_last:
                readout.completed.append(row)
            offset += chunk.num_tokens
        readout.logit_index += scored_index
        return readout


def classified_tokens(row: Sequence) -> range:
    """The own tokens a classification row's head reads: a sequence head one (an encoder's first token, which is a
    prompt task's first virtual token as PEFT places them; a causal LM's last), a token head every input token."""
    if row.request.head_type == SEQ_CLS:
        first = row.request.kind.sequence_head_token(row)
        return range(first, first + 1)
    return range(row.num_embedded_tokens, row.num_embedded_tokens + row.request.num_input_tokens)
