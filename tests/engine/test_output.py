"""Text is made off the engine thread: the output processor decodes token events, finds stop sequences, votes."""

from __future__ import annotations

import pytest

from server.engine.default_backbone import EOS_ID, byte_tokenizer
from server.engine.model_runner import own_token_ids
from server.engine.output import OutputProcessor
from server.engine.request import Request, Sequence
from server.engine.types import EngineOutput, EnsembleMode, FinishReason, RowToken, SamplingParams
from tests.engine.harness import Harness, token_ids


def make_request(num_rows: int = 1, ensemble: EnsembleMode | None = None, stop: tuple[str, ...] = ()) -> Request:
    request = Request("r", [1, 2], SamplingParams(stop=stop), max_new_tokens=16, sink=lambda e: None, ensemble=ensemble)
    request.rows = [Sequence(request, None, i) for i in range(num_rows)]
    return request


def event(*tokens: tuple[int, str | int], finished: bool = False) -> EngineOutput:
    """(row, character or token id) pairs; characters are byte tokens."""
    return EngineOutput(
        "r", tuple(RowToken(row, ord(t) if isinstance(t, str) else t, -0.5) for row, t in tokens), finished
    )


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_tokens_stream_as_text_and_a_stop_sequence_ends_the_row_before_the_engine_does(tokenizer):
    processor = OutputProcessor(make_request(stop=("lo",)), tokenizer)
    first = processor.process(event((0, "h")))
    assert [o.token.text for o in first.outputs] == ["h"] and not first.is_finished
    processor.process(event((0, "e")))
    processor.process(event((0, "l")))
    stopped = processor.process(event((0, "o")))
    assert stopped.stopped_rows == [0] and stopped.is_finished
    completion = stopped.outputs[-1].completion
    assert completion.generated_text == "he" and completion.finish_reason is FinishReason.STOP
    assert processor.process(event((0, "!"))).outputs == []  # made before the engine heard of the stop


def test_a_vote_streams_nothing_and_answers_once_every_member_has_finished(tokenizer):
    processor = OutputProcessor(make_request(3, EnsembleMode.VOTE, stop=("!",)), tokenizer)
    assert processor.process(event((0, "a"), (1, "b"), (2, "a"))).outputs == []
    end = RowToken(2, EOS_ID, -0.1, FinishReason.EOS)
    early = processor.process(EngineOutput("r", (*event((0, "!"), (1, "c")).tokens, end)))
    assert early.stopped_rows == [0] and early.outputs == [] and not early.is_finished
    done = processor.process(EngineOutput("r", (RowToken(1, ord("d"), -0.1, FinishReason.LENGTH),)))
    completion = done.outputs[-1].completion
    assert done.is_finished and completion.generated_text == "a"  # "a" twice, "bcd" once
    assert [m.generated_text for m in completion.members] == ["a", "bcd", "a"]


def test_an_engine_error_reaches_the_caller(tokenizer):
    processor = OutputProcessor(make_request(), tokenizer)
    processed = processor.process(EngineOutput("r", error=RuntimeError("boom")))
    assert processed.is_finished and isinstance(processed.outputs[-1].error, RuntimeError)


def test_the_engine_stops_a_row_its_text_stopped(harness: Harness):
    free = harness.alone("abc", "prefix", max_new_tokens=20)
    stop = free.generated_text[2:4]
    request = harness.request("abc", "prefix", max_new_tokens=20, stop=(stop,))
    stopped = harness.run(request)[0]
    assert stopped.finish_reason is FinishReason.STOP and token_ids(stopped) == token_ids(free)[: len(stopped.tokens)]
    # the engine heard of it a step later at most, and freed the row
    assert len(request.rows[0].output_ids) <= len(stopped.tokens) + 1 and harness.is_idle()


def test_own_token_ids_of_a_chunk_that_ends_among_the_embedded_virtual_tokens():
    request = Request("r", list(range(100, 130)), SamplingParams(), max_new_tokens=4, sink=lambda e: None)
    row = Sequence(request, None)
    row_with_prompt = type(
        "Row", (), {"num_embedded_tokens": 20, "request": request, "output_ids": [7, 8], "fed_targets": []}
    )()
    assert own_token_ids(row_with_prompt, 0, 5) == [0] * 5
    assert own_token_ids(row_with_prompt, 18, 4) == [0, 0, 100, 101]
    assert own_token_ids(row_with_prompt, 49, 3) == [129, 7, 8]
    assert own_token_ids(row, 0, 2) == [100, 101]
