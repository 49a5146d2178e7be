"""The bundle's tokenizer through the `tokenizers` library directly (no transformers on the device)."""

from __future__ import annotations

from typing import Sequence

from .errors import BundleError
from .manifest import TokenizerEntry


class BundleTokenizer:
    def __init__(self, data: bytes, entry: TokenizerEntry):
        """`data`: the bytes of the bundle's tokenizer file, as checked against the manifest."""
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises its own exception type for unreadable files
            raise BundleError(f"cannot read the bundle's tokenizer {entry.file}: {e}") from None
        self.bos_id, self.eos_id, self.pad_id = entry.bos_id, entry.eos_id, entry.pad_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # no special tokens: the models were trained and validated on raw token streams (no BOS)
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
