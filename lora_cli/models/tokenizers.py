"""A byte-level tokenizer for the built-in ``gpt`` model: nothing to download.

Token ids 0..255 are the UTF-8 bytes of the text; 256 is end-of-sequence, which also
pads batches (padded positions never count in the loss). Any text round-trips.
"""

from __future__ import annotations


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus one end-of-sequence token."""

    eos_id: int = 256
    pad_id: int = 256
    vocab_size: int = 257
    bos_ids: tuple[int, ...] = ()   # no beginning-of-sequence token

    def encode(self, text: str, *, eos: bool = False) -> list[int]:
        """The UTF-8 bytes of ``text``, followed by ``eos_id`` when ``eos`` is true."""
        ids = list(text.encode("utf-8"))
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_pair(self, prompt: str, completion: str) -> tuple[list[int], list[int], bool]:
        """(prompt ids, completion ids, exact): bytes never merge across the boundary."""
        return self.encode(prompt), self.encode(completion), True

    def decode(self, ids) -> str:
        """Text from token ids; special ids are dropped, invalid UTF-8 is replaced."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")
