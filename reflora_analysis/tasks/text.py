r"""Tokenisation shared by the text tasks: a byte-level tokenizer built in code, and one
``encode`` that serves it and any Hugging Face tokenizer alike.

:class:`ByteTokenizer` needs no download: ids 0..3 are ``<pad>``, ``<bos>``, ``<eos>``,
``<sep>``; a UTF-8 byte ``b`` is id ``b + 4`` (vocabulary 260). The tiny random models of
``seq-cls`` and ``causal-lm`` use it by default; a ``model_path`` override brings the
checkpoint's own tokenizer (``AutoTokenizer``) instead.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

__all__ = ["ByteTokenizer", "encode_texts", "encode_ids", "ensure_pad_token"]

Text = Union[str, tuple[str, str]]


class ByteTokenizer:
    """UTF-8 bytes as tokens: ``id = byte + 4``; specials ``<pad>=0, <bos>=1, <eos>=2, <sep>=3``."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    sep_token_id = 3
    offset = 4
    vocab_size = 256 + offset

    def encode(self, text: Text, add_bos: bool = True) -> list[int]:
        """Ids of ``text`` (a sentence pair is joined by ``<sep>``), ``<bos>`` first if asked."""
        if isinstance(text, tuple):
            first, second = text
            ids = self.encode(first, add_bos) + [self.sep_token_id] + self.encode(second, add_bos=False)
            return ids
        ids = [b + self.offset for b in text.encode("utf-8")]
        return ([self.bos_token_id] if add_bos else []) + ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special ids are skipped, invalid UTF-8 replaced."""
        data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


def encode_ids(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of one string with either tokenizer kind (BOS handled by the tokenizer)."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text, add_bos=add_special_tokens)
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode_texts(tokenizer, texts: Sequence[Text], max_length: int) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)``, each ``(len(texts), L)`` long, right-padded and
    truncated to ``max_length`` tokens; ``L`` is the longest encoded length (<= max_length)."""
    if isinstance(tokenizer, ByteTokenizer):
        rows = [tokenizer.encode(t)[:max_length] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return ids, mask
    if texts and isinstance(texts[0], tuple):
        enc = tokenizer([t[0] for t in texts], [t[1] for t in texts], padding="longest",
                        truncation=True, max_length=max_length, return_tensors="pt")
    else:
        enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length,
                        return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def ensure_pad_token(tokenizer):
    """Give a Hugging Face tokenizer without a pad token one: its EOS, else SEP, else UNK
    (padding is always masked out, so which id pads does not change the loss)."""
    if isinstance(tokenizer, ByteTokenizer) or tokenizer.pad_token_id is not None:
        return tokenizer
    for name in ("eos_token", "sep_token", "unk_token"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            tokenizer.pad_token = token
            return tokenizer
    raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad, EOS, SEP or UNK token to pad with; "
                     "add one to the checkpoint's tokenizer")
