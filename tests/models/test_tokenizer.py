"""The CLIP tokenizer against transformers' CLIPTokenizer on the same folders: ids, padding,
truncation, special tokens in the text, both pad tokens, both file formats; and its errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import transformers
from hypothesis import given
from hypothesis import strategies as st
from sd_folders import BOS, EOS, write_clip_tokenizer

from minidiff.models.tokenizer import CLIPTokenizer
from minidiff.nn.pretrained import ConfigError, PretrainedError

LENGTH = 16
PADS = [EOS, "!"]  # Stable Diffusion 1.x pads with the end token, 2.x with "!"

# Words the BPE spells whole, their parts, case, punctuation (runs of it, contractions), digits,
# every kind of whitespace, accents and scripts outside Latin (byte-level symbols), and the special
# tokens' own text in the prompt.
PIECES = [
    "a", "red", "circle", "the", "blue", "square", "tree", "painting", "re", "ci", "RED", "Circle",
    "it's", "we'll", "'d", "''s", "!", "!!", "?", ".", ",", "-", "(", ")", "\"", "#", "...",
    "0", "1", "42", "2024", " ", "  ", "\t", "\n", "\u00a0", "\u3000",
    "é", "ü", "ß", "İ", "Å", "ﬁ", "e\u0301", "日本", "Ω", "😀", "→",
    BOS, EOS, "<|ENDOFTEXT|>", "<|StartOfText|>", "<|", "|>",
]  # fmt: skip
prompts = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)
any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
EDGE_CASES = [
    "",
    " ",
    "a red circle",
    "  A  RED\tcircle!!  ",
    f"{BOS}a red circle{EOS}",
    "<|STARTOFTEXT|> x <|ENDOFTEXT|>",
    "hi! !!",
    "a" * 200,
    "red circle " * 40,
    "1234567890" * 3,
]


@pytest.fixture(scope="module", params=PADS, ids=["pad-eos", "pad-bang"])
def folder(request, tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"), pad_token=request.param)


@pytest.fixture(scope="module", params=["vocab-merges", "tokenizer-json"])
def pair(request, folder, tmp_path_factory):
    """(ours, transformers') on the folder as written, or as transformers saves it again
    (tokenizer.json and tokenizer_config.json only)."""
    if request.param == "tokenizer-json":
        saved = tmp_path_factory.mktemp("saved")
        transformers.CLIPTokenizer.from_pretrained(folder).save_pretrained(saved)
        assert (saved / "tokenizer.json").is_file() and not (saved / "vocab.json").exists()
        folder = saved
    return CLIPTokenizer.from_pretrained(folder), transformers.CLIPTokenizer.from_pretrained(folder)


def pair_of(folder):
    return CLIPTokenizer.from_pretrained(folder), transformers.CLIPTokenizer.from_pretrained(folder)


def expected_ids(theirs, texts):
    ids = theirs(texts, padding="max_length", max_length=theirs.model_max_length, truncation=True)
    return np.array(ids["input_ids"], dtype=np.int64)


def assert_same(pair, texts):
    ours, theirs = pair
    got = ours(texts)
    assert got.dtype == np.int64 and got.shape == (len(texts), LENGTH)
    for text, row, want in zip(texts, got, expected_ids(theirs, texts)):
        np.testing.assert_array_equal(row, want, err_msg=repr(text))
    for text in texts:
        assert ours.encode(text) == theirs.encode(text), repr(text)


def test_edge_cases_match_transformers(pair):
    assert_same(pair, EDGE_CASES)


@given(texts=st.lists(prompts, min_size=1, max_size=20))
def test_prompts_match_transformers(pair, texts):
    assert_same(pair, texts)


@given(texts=st.lists(any_text, min_size=1, max_size=20))
def test_any_unicode_text_matches_transformers(pair, texts):
    assert_same(pair, texts)


def test_special_token_ids_and_lengths(pair):
    ours, theirs = pair
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        theirs.bos_token_id,
        theirs.eos_token_id,
        theirs.pad_token_id,
    )
    assert ours.model_max_length == theirs.model_max_length == LENGTH
    assert ours.vocab_size == len(theirs)
    long = ours(["red " * 100])[0]
    assert long[0] == ours.bos_token_id and long[-1] == ours.eos_token_id
    assert len(ours.encode("red " * 100)) == 102  # encode neither truncates nor pads


def test_a_single_string_is_one_row(pair):
    ours, _ = pair
    np.testing.assert_array_equal(ours("a red circle"), ours(["a red circle"]))
    assert ours([]).shape == (0, LENGTH)


def test_the_two_pad_tokens_pad_differently(tmp_path):
    sd1 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "sd1", pad_token=EOS))
    sd2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "sd2", pad_token="!"))
    assert sd1.pad_token_id == sd1.eos_token_id and sd2.pad_token_id == 0  # "!" is the first symbol
    assert sd1("a")[0, -1] == sd1.eos_token_id and sd2("a")[0, -1] == 0


def test_added_tokens_decoder_gives_the_special_tokens_flags(tmp_path):
    """transformers 4.34 and later write each special token's flags in tokenizer_config.json's
    added_tokens_decoder; then special_tokens_map.json is not read."""
    folder = write_clip_tokenizer(tmp_path / "tok")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = json.loads((folder / "vocab.json").read_text())
    flags = {"lstrip": False, "rstrip": False, "single_word": False, "special": True}
    config["added_tokens_decoder"] = {
        str(vocab[BOS]): {"content": BOS, "normalized": True, **flags},
        str(vocab[EOS]): {"content": EOS, "normalized": False, **flags},
    }
    config.update(bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))  # not read
    pair = pair_of(folder)
    assert pair[0].pad_token_id == pair[0].eos_token_id
    assert_same(pair, EDGE_CASES)


@pytest.mark.parametrize("special", [None, True, False])
def test_token_objects_without_a_normalized_flag(tmp_path, special):
    """Without "normalized", a special token is matched in the raw text, whatever its "special"
    says (transformers marks it special, which drops the default)."""
    folder = write_clip_tokenizer(tmp_path / "tok")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = json.loads((folder / name).read_text())
        for value in data.values():
            if isinstance(value, dict):
                value.pop("normalized")
                if special is not None:
                    value["special"] = special
        (folder / name).write_text(json.dumps(data))
    config_only = shutil.copytree(folder, tmp_path / "config-only")
    (config_only / "special_tokens_map.json").unlink()
    assert_same(pair_of(config_only), EDGE_CASES)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": LENGTH}))  # the map only
    assert_same(pair_of(folder), EDGE_CASES)


def test_model_max_length_given_overrides_the_config(folder):
    ours = CLIPTokenizer.from_pretrained(folder, model_max_length=8)
    assert ours("a red circle").shape == (1, 8)


# -- bad folders ---------------------------------------------------------------------------------


def copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt"])
def test_missing_bpe_file_is_named(folder, tmp_path, name):
    broken = copy(folder, tmp_path)
    (broken / name).unlink()
    with pytest.raises(PretrainedError, match=name):
        CLIPTokenizer.from_pretrained(broken)


def test_missing_folder(tmp_path):
    with pytest.raises(PretrainedError, match="no such folder"):
        CLIPTokenizer.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "key, value",
    [
        ("tokenizer_class", "T5Tokenizer"),
        ("padding_side", "left"),
        ("truncation_side", "left"),
        ("model_max_length", int(1e30)),  # transformers' "no limit": the padded length is unknown
        ("model_max_length", 1),
        ("model_max_length", None),
        ("pad_token", 7),
    ],
)
def test_unsupported_config_value_is_named(folder, tmp_path, key, value):
    broken = copy(folder, tmp_path)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config[key] = value
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    if key == "pad_token":
        (broken / "special_tokens_map.json").unlink()
    with pytest.raises(ConfigError, match=f"tokenizer_config.json: {key}="):
        CLIPTokenizer.from_pretrained(broken)


def test_a_pad_token_outside_the_vocabulary_is_added_after_it(folder, tmp_path):
    """As transformers does: the new token takes the next id (a text encoder then needs it)."""
    odd = copy(folder, tmp_path)
    (odd / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    pair = pair_of(odd)
    assert pair[0].pad_token_id == pair[1].pad_token_id == len(json.loads((odd / "vocab.json").read_text()))
    assert_same(pair, EDGE_CASES)


def test_bad_files_are_named(folder, tmp_path):
    broken = copy(folder, tmp_path)
    (broken / "merges.txt").write_text("#version: 0.2\nr e d\n")
    with pytest.raises(PretrainedError, match="merges.txt: line 2 is not a pair"):
        CLIPTokenizer.from_pretrained(broken)
    (broken / "merges.txt").write_text("#version: 0.2\nq9 z7\n")
    with pytest.raises(PretrainedError, match="merges.txt: does not fit vocab.json"):
        CLIPTokenizer.from_pretrained(broken)
    (broken / "vocab.json").write_text("[1, 2]")
    with pytest.raises(PretrainedError, match="vocab.json: expected a JSON object"):
        CLIPTokenizer.from_pretrained(broken)
    (broken / "tokenizer_config.json").write_text("{")
    with pytest.raises(PretrainedError, match="tokenizer_config.json: not valid JSON"):
        CLIPTokenizer.from_pretrained(broken)
    (broken / "tokenizer.json").write_text("{}")
    (broken / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    with pytest.raises(PretrainedError, match="tokenizer.json: not a tokenizers file"):
        CLIPTokenizer.from_pretrained(broken)


def test_texts_must_be_strings(folder):
    ours = CLIPTokenizer.from_pretrained(folder)
    with pytest.raises(TypeError, match="texts must be strings"):
        ours([1, 2])


def test_the_test_folder_is_byte_level_bpe(folder):
    """The helper's vocabulary: 256 byte symbols, their end-of-word forms, merged words, then the
    start and end tokens; every merge's parts are tokens."""
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = (folder / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2"
    assert list(vocab)[-2:] == [BOS, EOS] and vocab["!"] == 0 and vocab["!</w>"] == 256
    assert "circle</w>" in vocab and "red</w>" in vocab
    for line in merges[1:]:
        a, b = line.split()
        assert a in vocab and b in vocab and a + b in vocab
