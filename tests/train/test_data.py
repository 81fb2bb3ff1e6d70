"""The data file: every refusal names the file, the line and what was expected; the split and the loss span."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from server.train.data import DataError, Pair, encode, held_out_split, read_pairs
from tests.fixtures import TinyBackbone


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_pairs_and_skips_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path, '{"input": "a", "output": "b"}\n\n{"input": "", "output": "c", "note": 1}\n')
    assert read_pairs(path) == [Pair("a", "b", f"{path} line 1"), Pair("", "c", f"{path} line 3")]


def test_json_line_separators_inside_strings_and_a_byte_order_mark_are_valid(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes('\ufeff{"input": "a\u2028b\u0085c", "output": "d"}\r\n{"input": "e", "output": "f"}\n'.encode())
    assert [(pair.input, pair.where) for pair in read_pairs(path)] == [
        ("a\u2028b\u0085c", f"{path} line 1"),
        ("e", f"{path} line 2"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"input": "a", "output": "b"}\n{"input": "a"\n', "line 2: expected a JSON object; found malformed"),
        ('{"input": "a", "output": "b"}\n\n[1, 2]\n', "line 3: expected a JSON object; found list"),
        ('{"output": "b"}\n', "line 1: expected a string field 'input'; found nothing"),
        ('{"input": "a", "output": 3}\n', "line 1: expected a string field 'output'; found int"),
        ('{"input": "a", "output": ""}\n', "line 1: expected a non-empty 'output'"),
        ("", 'expected at least one {"input", "output"} object; found none'),
        ("\n  \n", 'expected at least one {"input", "output"} object; found none'),
    ],
)
def test_refusals_name_the_line_and_what_was_expected(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(DataError) as error:
        read_pairs(path)
    assert str(error.value).startswith(str(path))
    assert message in str(error.value)


def test_an_unreadable_file_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "latin1.jsonl").write_bytes(b'{"input": "\xe9", "output": "b"}\n')
    with pytest.raises(DataError, match="expected a readable UTF-8 JSON Lines file"):
        read_pairs(tmp_path / "latin1.jsonl")
    with pytest.raises(DataError, match="expected a readable UTF-8 JSON Lines file"):
        read_pairs(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(("num_pairs", "num_eval"), [(1, 0), (2, 1), (10, 1), (100, 10), (101, 10), (1000, 50)])
def test_held_out_split_sizes(num_pairs: int, num_eval: int) -> None:
    pairs = [Pair(str(i), "x") for i in range(num_pairs)]
    train, held_out = held_out_split(pairs, 0.1, random.Random(0), most=50)
    assert len(held_out) == num_eval and len(train) == num_pairs - num_eval
    assert sorted(train + held_out, key=lambda pair: int(pair.input)) == pairs


def test_encode_puts_the_loss_on_the_output_and_the_end(tiny_llama: TinyBackbone) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama.path)
    ids, loss_start = encode(Pair("ab", "<s>C"), tokenizer, {tokenizer.eos_token_id})
    prompt = tokenizer("ab")["input_ids"]
    assert ids[:loss_start] == prompt
    assert ids[loss_start:] == [tokenizer.bos_token_id, ord("C"), tokenizer.eos_token_id]
