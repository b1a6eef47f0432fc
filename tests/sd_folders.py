"""Tiny offline Stable Diffusion folder parts for tests, written as transformers writes them.

``write_clip_tokenizer(folder)`` writes a small byte-level BPE tokenizer in CLIP's format
(``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``) that
``transformers.CLIPTokenizer.from_pretrained(folder)`` loads: every byte has a symbol (so no text
is ever unknown), plus the merges that spell a few words whole.
"""

from __future__ import annotations

import json
import pathlib

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"

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


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character: printable Latin-1 bytes map to
    themselves, the others to code points from 256 up; in GPT-2's order (printable bytes first),
    which is the order of CLIP's first 256 tokens."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def bpe_merges(words) -> list[tuple[str, str]]:
    """Merges that build each word left to right, its last symbol carrying ``</w>``; in order of
    first use, without repeats."""
    byte_symbol = bytes_to_unicode()
    merges, seen = [], set()
    for word in words:
        symbols = [byte_symbol[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        merged = symbols[0]
        for symbol in symbols[1:]:
            if (merged, symbol) not in seen:
                seen.add((merged, symbol))
                merges.append((merged, symbol))
            merged += symbol
    return merges


def clip_vocab(merges) -> dict[str, int]:
    """CLIP's vocabulary order: the 256 byte symbols, their ``</w>`` forms, each merge's result,
    then the start and end tokens."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def _added_token(content):
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_clip_tokenizer(folder, pad_token=EOS, model_max_length=16, words=WORDS) -> pathlib.Path:
    """Write a CLIP tokenizer folder (as Stable Diffusion's ``tokenizer/``; SD 1.x pads with
    ``<|endoftext|>``, SD 2.x with ``"!"``) and return it."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = bpe_merges(words)
    vocab = clip_vocab(merges)
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the vocabulary")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {
        "bos_token": _added_token(BOS),
        "eos_token": _added_token(EOS),
        "pad_token": pad_token,  # a plain string in Stable Diffusion's folders
        "unk_token": _added_token(EOS),
    }
    config = {
        "add_prefix_space": False,
        **special,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": model_max_length,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    mapping = {
        k: v if isinstance(v, str) else {x: v[x] for x in v if x != "__type"} for k, v in special.items()
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(mapping, indent=2))
    return folder
