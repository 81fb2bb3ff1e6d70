"""Prompt embeddings from the network are loaded safely: tensors only (no pickle code runs), capped, checked."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

from server.engine.errors import InvalidPrompt
from server.engine.prompt_embeds import load_prompt_embeds, max_embeds_bytes

HIDDEN, MAX_TOKENS = 8, 16


def saved(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


class Payload:
    """What an attacker would send: unpickling it runs os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_load_prompt_embeds_returns_the_saved_tensor() -> None:
    tensor = torch.randn(3, HIDDEN)
    assert torch.equal(load_prompt_embeds(saved(tensor), HIDDEN, MAX_TOKENS), tensor)


def test_load_prompt_embeds_refuses_a_pickle_payload_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(InvalidPrompt, match=r"would run code to load \(refused, not run\)"):
        load_prompt_embeds(saved(Payload(marker)), HIDDEN, MAX_TOKENS)
    assert not marker.exists()


def test_load_prompt_embeds_refuses_a_tensor_with_a_payload_beside_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(InvalidPrompt):
        load_prompt_embeds(saved([torch.zeros(2, HIDDEN), Payload(marker)]), HIDDEN, MAX_TOKENS)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (torch.zeros(2, HIDDEN + 1), "shape"),
        (torch.zeros(1, 2, HIDDEN), "shape"),
        (torch.zeros(0, HIDDEN), "shape"),
        (torch.zeros(MAX_TOKENS + 1, HIDDEN), "shape"),
        (torch.zeros(2, HIDDEN, dtype=torch.int64), "float32"),
        (torch.full((2, HIDDEN), float("nan")), "finite"),
        (torch.tensor([[float("inf")] * HIDDEN]), "finite"),
        ({"embeds": torch.zeros(2, HIDDEN)}, "dense tensor"),
    ],
)
def test_load_prompt_embeds_refuses_what_does_not_fit_the_backbone(value: object, expected: str) -> None:
    with pytest.raises(InvalidPrompt, match=expected):
        load_prompt_embeds(saved(value), HIDDEN, MAX_TOKENS)


def test_load_prompt_embeds_refuses_a_body_over_the_cap_unread() -> None:
    with pytest.raises(InvalidPrompt, match="at most"):
        load_prompt_embeds(b"\0" * (max_embeds_bytes(MAX_TOKENS, HIDDEN) + 1), HIDDEN, MAX_TOKENS)


def test_load_prompt_embeds_refuses_bytes_that_are_no_archive() -> None:
    with pytest.raises(InvalidPrompt, match=r"torch\.save"):
        load_prompt_embeds(b"not a tensor", HIDDEN, MAX_TOKENS)


def test_the_payload_runs_when_loaded_without_weights_only(tmp_path: Path) -> None:
    """The refusal above is weights_only's doing: the same bytes, loaded unsafely, do run."""
    marker = tmp_path / "ran"
    torch.load(io.BytesIO(saved(Payload(marker))), weights_only=False)
    assert marker.exists()
