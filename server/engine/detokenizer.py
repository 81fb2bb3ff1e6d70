"""Incremental detokenization that never splits a multi-byte character (TGI's decode_token scheme)."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"


@dataclass(slots=True)
class IncrementalDecoder:
    tokenizer: PreTrainedTokenizerBase
    prefix_offset: int = 0
    read_offset: int = 0

    def next_text(self, token_ids: list[int]) -> str:
        """Text added by the last token of `token_ids`; empty while a character is still incomplete."""
        prefix_text = self._decode(token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(token_ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(token_ids)
        return full_text[len(prefix_text) :]

    def flush(self, token_ids: list[int]) -> str:
        """Whatever text is still withheld (an incomplete character at the end decodes as U+FFFD)."""
        prefix_text = self._decode(token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(token_ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(token_ids)
        return full_text[len(prefix_text) :]

    def _decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True)) if token_ids else ""


def find_stop(text: str, stop: tuple[str, ...], num_new_chars: int) -> int | None:
    """Index where the earliest stop sequence starts, looking only where the new text could complete one."""
    best: int | None = None
    for sequence in stop:
        start = max(0, len(text) - num_new_chars - len(sequence) + 1)
        index = text.find(sequence, start)
        if index != -1 and (best is None or index < best):
            best = index
    return best
