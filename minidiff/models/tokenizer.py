"""CLIP's tokenizer, on the ``tokenizers`` library: text -> the token ids CLIPTextModel reads.

CLIP tokenizes with byte-level BPE: the text is NFC-normalized, each run of whitespace becomes one
space, and it is lowercased; a regex splits it into words (the start and end tokens, English
contractions, runs of letters, single digits, runs of other symbols), each word's bytes become
printable symbols (GPT-2's byte map) and the BPE merges join them, the word's last symbol
carrying the end-of-word mark ``</w>``. A prompt becomes ``<|startoftext|> ids <|endoftext|>``,
truncated to ``model_max_length`` (the end token kept last) and padded to it with the pad token
(Stable Diffusion 1.x pads with ``<|endoftext|>``, 2.x with ``!``), as transformers'
``CLIPTokenizer(texts, padding="max_length", truncation=True)`` gives.

A tokenizer folder holds ``vocab.json`` and ``merges.txt`` (the BPE, built here as transformers
builds it) or ``tokenizer.json`` (the whole pipeline, loaded as written), and
``tokenizer_config.json`` / ``special_tokens_map.json`` naming the special tokens and
``model_max_length``. The special tokens are matched in the text before BPE, with the flags
transformers gives them: a token the files spell as an object keeps its own flags (whether it is
matched in the normalized text), a token spelled as a plain string is matched in the raw text.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from ..nn.pretrained import PretrainedError, config_error

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The named special tokens in the order transformers adds them: where two name the same text,
# the later one's flags win.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
DEFAULT_TOKENS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
END_OF_WORD = "</w>"
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")


def clip_bpe(vocab: dict, merges: list, unk_token: str = EOS):
    """CLIP's pipeline as a ``tokenizers.Tokenizer`` over the given BPE vocabulary and merges."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD,
            fuse_unk=False,
            unk_token=unk_token,
        )
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


class CLIPTokenizer:
    """``tokenizer(texts)`` -> int64 ids (N, model_max_length); ``encode(text)`` -> the ids of one
    text with its start and end tokens, neither truncated nor padded.

    ``backend`` is a ``tokenizers.Tokenizer`` holding the BPE and the special tokens; the other
    arguments are the special tokens' texts and the padded length.
    """

    def __init__(self, backend, model_max_length=77, bos_token=BOS, eos_token=EOS, pad_token=EOS):
        if model_max_length < 2:
            raise ValueError(f"CLIPTokenizer: model_max_length must be at least 2, got {model_max_length}")
        self.backend = backend
        self.model_max_length = int(model_max_length)
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_token_id = self._id(bos_token, "bos_token")
        self.eos_token_id = self._id(eos_token, "eos_token")
        self.pad_token_id = self._id(pad_token, "pad_token")

    def _id(self, token, name):
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"CLIPTokenizer: {name} {token!r} is not in the vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_pretrained(cls, folder, model_max_length=None):
        """The tokenizer in ``folder`` (Stable Diffusion's ``tokenizer/``): ``tokenizer.json``, or
        ``vocab.json`` + ``merges.txt``, with the special tokens and ``model_max_length`` of
        ``tokenizer_config.json`` and ``special_tokens_map.json`` (``model_max_length`` given
        here takes precedence)."""
        folder = pathlib.Path(folder)
        if not folder.is_dir():
            raise PretrainedError(f"{folder}: no such folder")
        config = _read_json(folder / "tokenizer_config.json")
        source = folder / "tokenizer_config.json"
        tokenizer_class = config.get("tokenizer_class", "CLIPTokenizer")
        if tokenizer_class not in TOKENIZER_CLASSES:
            raise config_error(source, "tokenizer_class", tokenizer_class, " or ".join(TOKENIZER_CLASSES))
        for key in ("padding_side", "truncation_side"):
            if config.get(key, "right") != "right":
                raise config_error(source, key, config[key], "'right'")

        tokens, added = _special_tokens(folder, config)
        unk = tokens.get("unk_token")
        backend = _backend(folder, unk_token=unk.content if unk is not None else EOS)
        backend.add_special_tokens(added)
        backend.add_special_tokens([t for t in (tokens.get(k) for k in SPECIAL_TOKENS) if t is not None])

        if model_max_length is None:
            model_max_length = config.get("model_max_length")
            if not isinstance(model_max_length, int) or isinstance(model_max_length, bool):
                raise config_error(source, "model_max_length", model_max_length, "an integer (77 in CLIP)")
            if not 2 <= model_max_length <= 1 << 20:  # transformers writes 1e30 for "no limit"
                raise config_error(source, "model_max_length", model_max_length, "a length from 2 to 2**20")
        return cls(
            backend,
            model_max_length,
            **{k: tokens[k].content for k in ("bos_token", "eos_token", "pad_token")},
        )

    # -- encoding ------------------------------------------------------------------------------
    def _pieces(self, texts) -> list[list[int]]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def encode(self, text: str) -> list[int]:
        """``[bos] + ids + [eos]`` for one text, at its full length."""
        _check_texts([text])
        return [self.bos_token_id, *self._pieces([text])[0], self.eos_token_id]

    def __call__(self, texts) -> np.ndarray:
        """int64 ids (N, model_max_length) of a text or a list of texts: ``[bos] + ids + [eos]``,
        the ids cut so the end token stays within the length, then the pad token."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        _check_texts(texts)
        length = self.model_max_length
        out = np.full((len(texts), length), self.pad_token_id, dtype=np.int64)
        for row, ids in zip(out, self._pieces(texts)):
            ids = [self.bos_token_id, *ids[: length - 2], self.eos_token_id]
            row[: len(ids)] = ids
        return out

    def __repr__(self):
        return (
            f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
            f"pad_token={self.pad_token!r})"
        )


def _check_texts(texts):
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"CLIPTokenizer: texts must be strings, got {type(text).__name__}")


def _read_json(path, required=False):
    if not path.is_file():
        if required:
            raise PretrainedError(f"{path}: missing")
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise PretrainedError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _added_token(value, source, key):
    """An AddedToken from a file's value: a string, or an object with ``content`` and its own
    flags. Special tokens are matched in the raw text unless the object says ``normalized``."""
    from tokenizers import AddedToken

    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in TOKEN_FLAGS if k in value}
        return AddedToken(value["content"], special=True, **{"normalized": False, **flags})
    raise config_error(source, key, value, "a token: a string or an object with 'content'")


def _special_tokens(folder, config):
    """(the named special tokens as AddedTokens, the other added tokens), read as transformers
    reads them: ``added_tokens_decoder`` in tokenizer_config.json, if present, gives the tokens'
    flags; otherwise special_tokens_map.json's values replace the config's, and the flags of a
    token that tokenizer.json already adds are those it has there."""
    config_file, map_file = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
    values = {k: (config[k], config_file) for k in SPECIAL_TOKENS if config.get(k) is not None}
    known = {}  # content -> the AddedToken the files define for it
    decoder = config.get("added_tokens_decoder")
    if decoder is not None:
        if not isinstance(decoder, dict):
            raise config_error(config_file, "added_tokens_decoder", decoder, "an object: id -> token")
        for token_id, value in sorted(decoder.items(), key=lambda item: int(item[0])):
            token = _added_token(value, config_file, f"added_tokens_decoder[{token_id}]")
            known[token.content] = token
    else:
        special_map = _read_json(map_file)
        values.update(
            {k: (special_map[k], map_file) for k in SPECIAL_TOKENS if special_map.get(k) is not None}
        )
        fast = _read_json(folder / "tokenizer.json")
        for value in fast.get("added_tokens") or []:
            token = _added_token(value, folder / "tokenizer.json", "added_tokens")
            known[token.content] = token
    tokens = {}
    for key in SPECIAL_TOKENS:
        value, source = values.get(key, (DEFAULT_TOKENS.get(key), config_file))
        if value is None:
            continue
        if isinstance(value, str) and value in known:
            tokens[key] = known[value]
        else:
            tokens[key] = _added_token(value, source, key)
    added = [t for t in known.values() if decoder is not None]
    return tokens, added


def _backend(folder, unk_token):
    """The ``tokenizers.Tokenizer`` of the folder's tokenizer.json, or CLIP's pipeline over its
    vocab.json and merges.txt; without truncation or padding (done by CLIPTokenizer)."""
    from tokenizers import Tokenizer

    fast = folder / "tokenizer.json"
    if fast.is_file():
        try:
            backend = Tokenizer.from_file(str(fast))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise PretrainedError(f"{fast}: not a tokenizers file ({e})") from None
    else:
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        for path in (vocab_file, merges_file):
            if not path.is_file():
                raise PretrainedError(
                    f"{path}: missing (a CLIP tokenizer folder holds vocab.json and merges.txt, "
                    "or tokenizer.json)"
                )
        vocab = _read_json(vocab_file, required=True)
        if not all(isinstance(i, int) for i in vocab.values()):
            raise PretrainedError(f"{vocab_file}: expected an object token -> integer id")
        merges = []
        lines = merges_file.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if (number == 1 and line.startswith("#version")) or not line.strip():
                continue
            pair = line.split()
            if len(pair) != 2:
                raise PretrainedError(f"{merges_file}: line {number} is not a pair of tokens: {line!r}")
            merges.append(tuple(pair))
        try:
            backend = clip_bpe(vocab, merges, unk_token=unk_token)
        except Exception as e:  # a merge whose parts are not in the vocabulary
            raise PretrainedError(f"{merges_file}: does not fit vocab.json ({e})") from None
    backend.no_truncation()
    backend.no_padding()
    return backend


# -- writing a tokenizer folder ----------------------------------------------------------------


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


def _apply_merges(symbols: list[str], ranks: dict) -> list[str]:
    """BPE on one word: merge the adjacent pair of lowest rank until no pair has a rank."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def bpe_merges(words) -> list[tuple[str, str]]:
    """Merges that spell each of ``words`` as one token, its last symbol carrying ``</w>``: first
    the merges that build each word left to right, in order of first use, without repeats; then,
    for a word that an earlier word's merges split otherwise (the "re" of "red" inside "green"),
    merges of what those leave, each ranked after every merge before it."""
    byte_symbol = bytes_to_unicode()
    spelled = []
    for word in words:
        symbols = [byte_symbol[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        spelled.append(symbols)
    merges, seen = [], set()
    for symbols in spelled:
        merged = symbols[0]
        for symbol in symbols[1:]:
            if (merged, symbol) not in seen:
                seen.add((merged, symbol))
                merges.append((merged, symbol))
            merged += symbol
    ranks = {pair: i for i, pair in enumerate(merges)}
    for symbols in spelled:
        pieces = _apply_merges(symbols, ranks)
        while len(pieces) > 1:  # a merge ranked last applies after the ones that made the pieces
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            pieces = _apply_merges(symbols, ranks)
    return merges


def clip_vocab(merges) -> dict[str, int]:
    """CLIP's vocabulary order: the 256 byte symbols, their ``</w>`` forms, each merge's result,
    then the start and end tokens."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def _token_entry(content):
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_clip_tokenizer(folder, words, model_max_length=77, pad_token=EOS) -> pathlib.Path:
    """Write a CLIP tokenizer folder for a small vocabulary (Stable Diffusion's ``tokenizer/``,
    as transformers writes it: ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
    ``special_tokens_map.json``) and return it. Every byte has a symbol, so no text is unknown;
    the merges spell each of ``words`` as one token. ``CLIPTokenizer.from_pretrained`` and
    transformers' ``CLIPTokenizer.from_pretrained`` load it."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = bpe_merges(words)
    vocab = clip_vocab(merges)
    if pad_token not in vocab:
        raise ValueError(f"write_clip_tokenizer: pad_token {pad_token!r} is not in the vocabulary")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {
        "bos_token": _token_entry(BOS),
        "eos_token": _token_entry(EOS),
        "pad_token": pad_token,  # a plain string in Stable Diffusion's folders
        "unk_token": _token_entry(EOS),
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
