"""The demo's synthetic world: input texts, the transformations the backbone learns, and the demo tasks.

Every example is `[task cue] <s> input <s> output </s>`. In pre-training the cue is an instruction phrase
("upper:"); in prompt learning it is the task's virtual tokens and nothing else. The answer opens with `<s>`
(the byte tokenizer's segment separator, which decodes to nothing): a causal model cannot otherwise know
where a raw input ends.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from server.engine.default_backbone import BOS_ID, EOS_ID

MAX_INPUT_CHARS = 32
HELD_OUT_BUCKETS = 10  # one input in ten (by a stable hash) is never trained on: evaluation draws only those

WORD_TEXT = """
the a an and or but if then so not no yes all any some many few more most this that these those it its he she
we they you i me us them my your our their his her who what when where why how which there here time year day
week night morning way man woman child people world life hand part place case point home work school house
room city country water fire light sound music book story word name number line game team friend family mother
father brother sister dog cat bird fish tree flower river sea sun moon star rain snow wind road car train boat
plane door window table chair bed cup bread apple cake milk tea coffee red blue green yellow black white big
small long short old new young good bad happy sad fast slow hot cold warm early late hard easy high low open
close go come run walk talk sing read write play see look hear say tell ask give take make find keep hold turn
stop start help try love like want need know think hello thanks please sorry welcome prompt model token batch
server task tune frozen serve
"""
WORDS = tuple(WORD_TEXT.split())
PUNCTUATION = ("", "", "", ".", "!", "?", ",")


@dataclass(frozen=True, slots=True)
class Transformation:
    name: str
    apply: Callable[[str], str]
    instructions: tuple[str, ...]  # pre-training cues; empty: the bare backbone's default behaviour


def to_json(text: str) -> str:
    return json.dumps({"text": text}, ensure_ascii=False)


TRANSFORMATIONS: dict[str, Transformation] = {
    "echo": Transformation("echo", lambda text: text, ()),
    "upper": Transformation("upper", str.upper, ("upper:", "uppercase:", "in capitals:")),
    "reverse": Transformation("reverse", lambda text: text[::-1], ("reverse:", "backwards:", "mirror:")),
    "json": Transformation("json", to_json, ("json:", "as json:", "wrap in json:")),
}


@dataclass(frozen=True, slots=True)
class DemoTask:
    task_id: str
    transformation: str
    method: str  # prompt_tuning | p_tuning | prefix_tuning
    num_virtual_tokens: int


DEMO_TASK_SPECS: tuple[DemoTask, ...] = (
    DemoTask("upper", "upper", "prompt_tuning", 8),
    DemoTask("reverse", "reverse", "prefix_tuning", 8),
    DemoTask("json", "json", "p_tuning", 8),
)


def is_held_out(text: str) -> bool:
    return zlib.crc32(text.encode("utf-8")) % HELD_OUT_BUCKETS == 0


def random_word_text(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 5))]
    if rng.random() < 0.3:
        words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice(PUNCTUATION)


def random_char_text(rng: random.Random) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789" + ("ABCDEFGHIJKLMNOPQRSTUVWXYZ-_ " if rng.random() < 0.5 else "")
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16)))


def sample_input(rng: random.Random, held_out: bool) -> str:
    """A text of at most MAX_INPUT_CHARS on the requested side of the train / held-out split."""
    while True:
        text = random_word_text(rng) if rng.random() < 0.7 else random_char_text(rng)
        if 0 < len(text) <= MAX_INPUT_CHARS and is_held_out(text) == held_out:
            return text


def encode_bytes(text: str) -> list[int]:
    """Byte-tokenizer ids without specials (they equal the UTF-8 bytes)."""
    return list(text.encode("utf-8"))


def encode_example(cue: str, text: str, answer: str) -> tuple[list[int], int]:
    """Token ids of `cue <s> text <s> answer </s>` and the index of the first id the loss covers (the 2nd <s>)."""
    prompt = [*encode_bytes(cue), BOS_ID, *encode_bytes(text)]
    return [*prompt, BOS_ID, *encode_bytes(answer), EOS_ID], len(prompt)


def decode_answer(token_ids: list[int]) -> str:
    """Generated ids -> text, dropping the opening <s> and stopping at </s> (as the server's detokenizer does)."""
    if EOS_ID in token_ids:
        token_ids = token_ids[: token_ids.index(EOS_ID)]
    return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")
