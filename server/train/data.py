"""Training data from a JSON Lines file: one `{"input": ..., "output": ...}` object a line.

An example is the input as the server tokenizes a request (server.engine.intake.prompt_ids), then the output and
the end-of-sequence token: the loss covers the output and the end. The output follows the input directly, so a
separator the task needs (a newline, " Answer:") belongs in the data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from server.engine.errors import InvalidPrompt
from server.engine.intake import prompt_ids
from server.train.loop import Example

FIELDS = ("input", "output")


class DataError(ValueError):
    """A data file that cannot be trained on; the message names the file, the line and what was expected."""


@dataclass(frozen=True, slots=True)
class Pair:
    input: str
    output: str
    where: str = ""  # "FILE line N", for messages


def read_pairs(path: Path) -> list[Pair]:
    try:  # utf-8-sig: a byte-order mark is not part of the first line
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: expected a readable UTF-8 JSON Lines file; found {error}") from None
    lines = text.split("\n")  # not splitlines(): JSON strings may hold U+2028, U+0085 and friends raw
    pairs = [parse_line(f"{path} line {number}", line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not pairs:
        raise DataError(f'{path}: expected at least one {{"input", "output"}} object; found none')
    return pairs


def parse_line(where: str, line: str) -> Pair:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else "nested too deeply"
        raise DataError(f"{where}: expected a JSON object; found malformed JSON ({reason})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object; found {type(record).__name__}")
    for name in FIELDS:
        if not isinstance(record.get(name), str):
            found = "nothing" if name not in record else type(record[name]).__name__
            raise DataError(f"{where}: expected a string field {name!r}; found {found}")
    if not record["output"]:
        raise DataError(f"{where}: expected a non-empty 'output'; found an empty string")
    return Pair(record["input"], record["output"], where)


def held_out_split(pairs: list[Pair], fraction: float, rng: random.Random, most: int) -> tuple[list[Pair], list[Pair]]:
    """(train, eval): a random `fraction` held out (at most `most`), at least one on each side when there are two."""
    shuffled = rng.sample(pairs, len(pairs))
    num_eval = min(len(pairs) - 1, most, max(1, round(len(pairs) * fraction))) if len(pairs) > 1 else 0
    return shuffled[num_eval:], shuffled[:num_eval]


def end_token(tokenizer: PreTrainedTokenizerBase, eos_token_ids: Collection[int]) -> int | None:
    """The token an output ends with: the tokenizer's end of sequence if the server stops at it, else one it does."""
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in eos_token_ids:
        return int(tokenizer.eos_token_id)
    return min(eos_token_ids, default=None)


def encode(pair: Pair, tokenizer: PreTrainedTokenizerBase, eos_token_ids: Collection[int]) -> Example:
    prompt = input_ids(pair, tokenizer)
    end = end_token(tokenizer, eos_token_ids)
    answer = [*output_ids(pair, tokenizer, eos_token_ids), *([] if end is None else [end])]
    return [*prompt, *answer], len(prompt)


def input_ids(pair: Pair, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    try:
        return prompt_ids(tokenizer, pair.input)
    except InvalidPrompt as error:
        raise DataError(f"{pair.where}: {error}") from None


def output_ids(pair: Pair, tokenizer: PreTrainedTokenizerBase, eos_token_ids: Collection[int]) -> list[int]:
    """The output's ids; an end-of-sequence token inside it would teach the task to stop there."""
    ids = list(tokenizer(pair.output, add_special_tokens=False)["input_ids"])
    inside = [tokenizer.decode([token]) for token in ids if token in eos_token_ids]
    if inside:
        raise DataError(
            f"{pair.where}: expected an output without the end-of-sequence token (it is added after the output); "
            f"found {inside[0]!r} in it"
        )
    return ids
