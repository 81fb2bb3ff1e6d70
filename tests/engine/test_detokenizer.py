"""Incremental decoding never splits a multi-byte character; stop sequences are found across tokens."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

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


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style vocabulary (Llama-2, Mistral, T5): a word-start token carries "▁", decoded as a space
    except at the very start of a text."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁hello": 3, "▁world": 4, "!": 5}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_word_start_token_after_the_input_keeps_its_space():
    tokenizer = metaspace_tokenizer()
    assert tokenizer.decode([4]) == "world"  # alone, SentencePiece drops the leading space
    decoder = IncrementalDecoder(tokenizer, context=[1, 3])  # the input "<s> hello"
    assert decoder.next_text([4]) == " world"
    assert decoder.next_text([4, 5]) == "!"


def test_pieces_read_each_candidate_in_context_special_tokens_shown():
    tokenizer = metaspace_tokenizer()
    decoder = IncrementalDecoder(tokenizer, context=[1, 3])
    assert decoder.pieces([4, 5, 2]) == [" world", "!", "</s>"]
    decoder.next_text([4])
    assert decoder.pieces([5]) == ["!"]


def test_the_context_is_never_emitted_even_when_it_ends_in_broken_bytes():
    """A prompt given as token ids (or a random model's output before it) may end mid-character; the new text holds
    none of it (tokenizers' DecodeStream, primed with the same ids, emits the context's broken bytes here)."""
    tokenizer = byte_tokenizer()
    context = [215, 20, 132]  # "\xd7", "\x14", "\x84": the context's text is "\ufffd\x14\ufffd"
    decoder = IncrementalDecoder(tokenizer, context)
    new = list("✓ok".encode())
    pieces = [decoder.next_text(new[: i + 1]) for i in range(len(new))]
    assert pieces == ["", "", "✓", "o", "k"]
