"""The training tests' data: a task the random backbone cannot do; and transformers' logging as the suite expects."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers.utils import logging as transformers_logging

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone"]


@pytest.fixture(autouse=True)
def restore_transformers_logging() -> Iterator[None]:
    """The command quiets transformers' logging for its user; the rest of the suite keeps the default."""
    verbosity = transformers_logging.get_verbosity()
    yield
    transformers_logging.set_verbosity(verbosity)
    transformers_logging.enable_progress_bar()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A task the random backbone cannot do: answer `<s>ok` to anything."""
    rng = random.Random(0)
    lines = [{"input": " ".join(rng.choices(WORDS, k=rng.randint(1, 3))), "output": "<s>ok"} for _ in range(48)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
