"""Training data from a JSON Lines file: one `{"input": ..., "output": ...}` object a line.

An example is the input as the server would tokenize it (`tokenizer(text)`, its special tokens included), then
the output and the end-of-sequence token: the loss covers the output and the end. The output follows the input
directly, so a separator the task needs (a newline, " Answer:") belongs in the data.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from server.train.loop import Example

FIELDS = ("input", "output")


class DataError(ValueError):
    """A data file that cannot be trained on; the message names the file, the line and what was expected."""


@dataclass(frozen=True, slots=True)
class Pair:
    input: str
    output: str


def read_pairs(path: Path) -> list[Pair]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: expected a readable UTF-8 JSON Lines file; found {error}") from None
    pairs = [parse_line(path, number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not pairs:
        raise DataError(f'{path}: expected at least one {{"input", "output"}} object; found none')
    return pairs


def parse_line(path: Path, number: int, line: str) -> Pair:
    where = f"{path} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: expected a JSON object; found malformed JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object; found {type(record).__name__}")
    for name in FIELDS:
        if not isinstance(record.get(name), str):
            found = "nothing" if name not in record else type(record[name]).__name__
            raise DataError(f"{where}: expected a string field {name!r}; found {found}")
    if not record["output"]:
        raise DataError(f"{where}: expected a non-empty 'output'; found an empty string")
    return Pair(record["input"], record["output"])


def held_out_split(pairs: list[Pair], fraction: float, rng: random.Random) -> tuple[list[Pair], list[Pair]]:
    """(train, eval): a random `fraction` held out, at least one example on each side when there are two."""
    shuffled = rng.sample(pairs, len(pairs))
    num_eval = min(len(pairs) - 1, max(1, round(len(pairs) * fraction))) if len(pairs) > 1 else 0
    return shuffled[num_eval:], shuffled[:num_eval]


def encode(pair: Pair, tokenizer: PreTrainedTokenizerBase) -> Example:
    prompt = list(tokenizer(pair.input)["input_ids"])
    answer = list(tokenizer(pair.output, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        answer.append(tokenizer.eos_token_id)
    return [*prompt, *answer], len(prompt)
