"""Incremental decoding never splits a multi-byte character; stop sequences are found across tokens."""

from __future__ import annotations

from server.engine.default_backbone import byte_tokenizer
from server.engine.detokenizer import IncrementalDecoder, find_stop


def stream(text: str) -> list[str]:
    tokenizer = byte_tokenizer()
    ids = list(text.encode("utf-8"))  # the byte tokenizer's ids are the bytes
    decoder = IncrementalDecoder(tokenizer)
    return [decoder.next_text(ids[: i + 1]) for i in range(len(ids))]


def test_next_text_withholds_incomplete_multibyte_characters():
    pieces = stream("a✓b")
    assert pieces == ["a", "", "", "✓", "b"]


def test_next_text_pieces_join_to_the_full_text():
    text = "héllo wörld ✓ 🙂"
    assert "".join(stream(text)) == text


def test_flush_returns_withheld_bytes():
    tokenizer = byte_tokenizer()
    ids = list("✓".encode())[:2]
    decoder = IncrementalDecoder(tokenizer)
    assert decoder.next_text(ids[:1]) == "" and decoder.next_text(ids) == ""
    assert decoder.flush(ids) == "\ufffd"


def test_find_stop_spanning_old_and_new_text():
    assert find_stop("hello wor", ("o wo",), num_new_chars=2) == 4


def test_find_stop_picks_the_earliest_sequence():
    assert find_stop("abcdef", ("ef", "cd"), num_new_chars=6) == 2


def test_find_stop_ignores_matches_entirely_in_old_text():
    assert find_stop("stop and more", ("stop",), num_new_chars=3) is None
