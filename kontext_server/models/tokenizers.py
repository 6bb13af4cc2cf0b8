"""Tokenizers built offline (no hub): real transformers classes (CLIPTokenizer, T5Tokenizer) with tiny vocabularies.
Used by `tiny` and `synthetic-full`, whose prompts need token ids, not meaning."""
from __future__ import annotations

import string


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable-unicode table (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _bytes_to_unicode().values():  # every byte alone and at a word's end: any text encodes
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    # A few merges so common words are single tokens, as with a real BPE vocabulary.
    merges = []
    for word in ("the", "a", "car", "red", "cat", "make", "photo", "of"):
        piece = word[0]
        for i, ch in enumerate(word[1:], start=1):
            nxt = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append((piece, nxt))
            piece = piece + nxt
            vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += ([("▁" + c, -3.0) for c in string.ascii_lowercase]
               + [(c, -4.0) for c in string.ascii_letters + string.digits])
    pieces += [("▁" + w, -1.0) for w in ("the", "a", "car", "red", "cat", "make", "photo", "of", "blue", "dog")]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
