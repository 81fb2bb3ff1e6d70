"""The demo's synthetic data: seeded, split by a stable hash, and transformed as docs/demo.md says."""

from __future__ import annotations

import random

from server.demo.tasks import (
    MAX_INPUT_CHARS,
    TRANSFORMATIONS,
    decode_answer,
    encode_example,
    is_held_out,
    sample_input,
)
from server.engine.default_backbone import BOS_ID, EOS_ID


def test_sample_input_is_seeded() -> None:
    first = [sample_input(random.Random(7), held_out=False) for _ in range(3)]
    assert first == [sample_input(random.Random(7), held_out=False) for _ in range(3)]


def test_training_and_held_out_inputs_never_meet() -> None:
    rng = random.Random(0)
    training = {sample_input(rng, held_out=False) for _ in range(500)}
    held_out = {sample_input(rng, held_out=True) for _ in range(500)}
    assert not training & held_out
    assert all(is_held_out(text) for text in held_out) and not any(is_held_out(text) for text in training)
    assert all(0 < len(text) <= MAX_INPUT_CHARS for text in training | held_out)


def test_transformations_do_what_their_names_say() -> None:
    text = "Hello world 42!"
    assert TRANSFORMATIONS["echo"].apply(text) == text
    assert TRANSFORMATIONS["upper"].apply(text) == "HELLO WORLD 42!"
    assert TRANSFORMATIONS["reverse"].apply(text) == "!24 dlrow olleH"
    assert TRANSFORMATIONS["json"].apply(text) == '{"text": "Hello world 42!"}'


def test_only_echo_goes_without_an_instruction() -> None:
    assert [name for name, t in TRANSFORMATIONS.items() if not t.instructions] == ["echo"]


def test_example_layout_is_cue_bos_input_bos_answer_eos() -> None:
    ids, loss_start = encode_example("upper:", "ab", "AB")
    assert ids == [*b"upper:", BOS_ID, *b"ab", BOS_ID, *b"AB", EOS_ID]
    assert loss_start == len(b"upper:") + 3


def test_decode_answer_drops_the_separator_and_stops_at_eos() -> None:
    assert decode_answer([BOS_ID, *b"HI", EOS_ID, *b"junk"]) == "HI"
    assert decode_answer([BOS_ID, *"é".encode()]) == "é"
