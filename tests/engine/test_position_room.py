"""What the positions leave for new tokens, per backbone kind, and the refusals that say expected and found."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from server.engine.errors import InputTooLong
from server.engine.kinds.causal import Causal
from server.engine.kinds.encoder_decoder import EncoderDecoder
from server.engine.kinds.seq2seq import Seq2Seq

BART_LIKE = EncoderDecoder(Seq2Seq(decoder_start_id=2, num_decoder_layers=2, relative_bias=None, positions=None,
                                   cross_attentions=frozenset()))  # fmt: skip


def task(num_virtual_tokens: int, is_prefix: bool = False) -> Any:
    """A task as the room's arithmetic reads it: its virtual tokens and whether they are a prefix."""
    method = SimpleNamespace(is_prefix=is_prefix)
    return SimpleNamespace(record=SimpleNamespace(num_virtual_tokens=num_virtual_tokens, method=method))


def test_a_causal_input_leaving_no_room_says_what_fits_and_what_came():
    assert Causal().new_token_room(256, 10, 247, [task(8)]) == 1
    with pytest.raises(InputTooLong) as refused:
        Causal().new_token_room(256, 10, 248, [task(8)])
    assert str(refused.value) == (
        "expected at most 247 input tokens (the backbone's 256 positions less 8 virtual tokens and 1 new token); "
        "found 248"
    )
    assert Causal().positions_taken(200, [task(8), None]) == "the 200 input tokens and 8 virtual tokens"


def test_an_encoder_input_past_its_positions_says_what_fits_and_what_came():
    assert BART_LIKE.new_token_room(16, 4, 12, [task(4)]) == 4
    with pytest.raises(InputTooLong) as refused:
        BART_LIKE.new_token_room(16, 4, 13, [task(4)])
    assert str(refused.value) == (
        "expected at most 12 input tokens (the encoder's 16 positions less 4 virtual tokens); found 13"
    )
    assert BART_LIKE.positions_taken(13, [task(4), task(3, is_prefix=True)]) == "the decoder's 3 virtual tokens"
