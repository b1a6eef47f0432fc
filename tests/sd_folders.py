"""Tiny offline Stable Diffusion folder parts for tests, written as transformers writes them.

``write_clip_tokenizer(folder)`` writes a small byte-level BPE tokenizer in CLIP's format
(``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``) that
``transformers.CLIPTokenizer.from_pretrained(folder)`` loads: every byte has a symbol (so no text
is ever unknown), plus the merges that spell a few words whole.
"""

from __future__ import annotations

import pathlib

from minidiff.models.tokenizer import BOS, EOS, bpe_merges, bytes_to_unicode, clip_vocab  # noqa: F401
from minidiff.models.tokenizer import write_clip_tokenizer as _write

# Words spelled whole by the merges; sub-words of them ("re", "ci") then appear in other words too.
WORDS = (
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "and",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "triangle",
    "photo",
    "painting",
    "cat",
    "dog",
    "big",
    "small",
    "tree",
)


def write_clip_tokenizer(folder, pad_token=EOS, model_max_length=16, words=WORDS) -> pathlib.Path:
    """Write a CLIP tokenizer folder (as Stable Diffusion's ``tokenizer/``; SD 1.x pads with
    ``<|endoftext|>``, SD 2.x with ``"!"``) and return it."""
    return _write(folder, words, model_max_length=model_max_length, pad_token=pad_token)


def clip_text_config(tokenizer, hidden_size, intermediate_size, heads, layers=2, **extra) -> dict:
    """The keys of a small CLIPTextConfig over ``tokenizer`` (ours or transformers'): its vocabulary,
    special tokens and length, ``layers`` layers of the given sizes, then ``extra``."""
    # transformers' CLIPTokenizer counts the added tokens in len(), ours in vocab_size
    vocab_size = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def clip_vision_config(patch_size, hidden_size=32, intermediate_size=37, heads=4, layers=2, **extra) -> dict:
    """The keys of a small CLIPVisionConfig: 30x30 images cut in ``patch_size`` patches, then
    ``extra``."""
    return dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=30,
        patch_size=patch_size,
        **extra,
    )
