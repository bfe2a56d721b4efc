"""shared.prompts: ClipTokenizer against transformers' CLIPTokenizer, caption rules, prompts."""

import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest
import transformers
from transformers import CLIPTokenizer

from shared import prompts
from shared.demo import write_tiny_clip_tokenizer
from shared.prompts import (
    ClipTokenizer,
    DreamBoothPrompts,
    PromptDataset,
    TokenizedText,
    normalize_caption_field,
    select_caption,
)

LONG = "a photo of a very fluffy ginger cat sitting on a wooden table " * 12  # > 77 tokens

STRINGS = [
    "a photo of sks cat",
    "a photo of a cat",
    "A PHOTO OF SKS CAT",
    "MiXeD CaSe Words",
    "",
    " ",
    "   leading and trailing spaces   ",
    "multiple    spaces\tand\ttabs\nand\nnewlines",
    "don't",
    "Don't stop, it's fine; we're here, they've gone, I'm sure you'll see what he'd do.",
    "the cat's toy",
    "'s 't 're",
    "hello!",
    "hello!!!",
    "wow?! really...",
    "x!y",
    "a-b_c/d\\e",
    "(parentheses) [brackets] {braces} <angles>",
    "## heading ## #",
    "#hashtag @mention $100 50% a&b a*b a+b=c ~tilde `tick` ^caret |pipe|",
    "\"double quotes\" and 'single quotes'",
    "numbers 0 1 2 3 4 5 6 7 8 9",
    "1234567890",
    "3.14159 and 2,718 and 1e-5",
    "2024-05-06 12:30:45",
    "4k 8k hdr 3d",
    "café ☕",
    "café ☕ 東京",
    "naïve résumé über straße",
    "e\u0301 (e + combining acute) vs \u00e9",
    "Ａｂｃ full-width ＡＢＣ",
    "Ελληνικά кириллица العربية עברית हिन्दी",
    "한국어 日本語のテキスト 中文",
    "emoji 😀🐱🐶🚀",
    "👨‍👩‍👧 family zwj sequence",
    "flag 🇫🇷 and skin tone 👍🏽",
    "non\u00a0breaking\u2003em space",
    "zero\u200bwidth",
    "<|startoftext|>",
    "<|endoftext|>",
    "a <|endoftext|> in the middle",
    "<|ENDOFTEXT|> upper case special",
    "<|startoftext|>a photo<|endoftext|>",
    "sks sks sks",
    "highly detailed, sharp focus, trending on artstation",
    "supercalifragilisticexpialidocious",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "a" * 300,
    LONG,
    "word " * 100,
    "!" * 80,
    "\u2028line separator\u2029paragraph separator",
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """Tokenizer folders in every layout a Stable Diffusion checkpoint may ship."""
    root = tmp_path_factory.mktemp("tokenizers")
    sd1 = write_tiny_clip_tokenizer(root / "sd1")
    sd2 = write_tiny_clip_tokenizer(root / "sd2", pad_token="!")
    # transformers 5 save_pretrained: tokenizer.json + a plain-string tokenizer_config.json.
    resaved = root / "resaved"
    CLIPTokenizer.from_pretrained(sd2).save_pretrained(resaved)
    assert (resaved / "tokenizer.json").is_file() and not (resaved / "vocab.json").exists()
    # Only the two vocabulary files: every special token and the max length take defaults.
    bare = root / "bare"
    bare.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(sd1 / name, bare / name)
    # transformers 4 style: tokenizer_config.json with added_tokens_decoder (wins over the map).
    decoder = root / "decoder"
    shutil.copytree(sd1, decoder)
    config = json.loads((decoder / "tokenizer_config.json").read_text())
    flags = {"lstrip": False, "rstrip": False, "single_word": False, "special": True}
    config["added_tokens_decoder"] = {
        "998": {"content": "<|startoftext|>", "normalized": True, **flags},
        "999": {"content": "<|endoftext|>", "normalized": False, **flags},
    }
    config["model_max_length"] = 64
    (decoder / "tokenizer_config.json").write_text(json.dumps(config))
    # A merge line starting with "#" (CLIP has "# #</w>"), and transformers' saved "no limit".
    hashes = root / "hashes"
    shutil.copytree(sd1, hashes)
    vocab = json.loads((hashes / "vocab.json").read_text())
    vocab["##</w>"] = len(vocab)
    (hashes / "vocab.json").write_text(json.dumps(vocab))
    with (hashes / "merges.txt").open("a") as merges:
        merges.write("# #</w>\n")
    config = json.loads((hashes / "tokenizer_config.json").read_text())
    config["model_max_length"] = 1000000000000000019884624838656
    (hashes / "tokenizer_config.json").write_text(json.dumps(config))
    return {
        "sd1": sd1,
        "sd2": sd2,
        "resaved": resaved,
        "bare": bare,
        "decoder": decoder,
        "hashes": hashes,
    }


HF_CLASSES = [CLIPTokenizer]
if transformers.CLIPTokenizerFast is not CLIPTokenizer:
    HF_CLASSES.append(transformers.CLIPTokenizerFast)


@pytest.mark.parametrize("hf_class", HF_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("layout", ["sd1", "sd2", "resaved", "bare", "decoder", "hashes"])
def test_ids_match_transformers(tokenizer_dirs, layout, hf_class):
    folder = tokenizer_dirs[layout]
    hf = hf_class.from_pretrained(folder)
    ours = ClipTokenizer.from_pretrained(folder)
    unlimited = layout in ("bare", "hashes")  # transformers has no limit there, we take 77
    max_length = 77 if unlimited else hf.model_max_length
    expected = hf(STRINGS, padding="max_length", max_length=max_length, truncation=True)
    got = ours(STRINGS, max_length=max_length)
    assert got.input_ids.dtype == np.int32 and got.attention_mask.dtype == np.int32
    assert got.input_ids.shape == (len(STRINGS), max_length)
    for i, text in enumerate(STRINGS):
        assert got.input_ids[i].tolist() == expected["input_ids"][i], text
        assert got.attention_mask[i].tolist() == expected["attention_mask"][i], text
        content = got.input_ids[i][got.attention_mask[i] == 1]
        assert ours.decode(content) == hf.decode(expected["input_ids"][i][: len(content)]), text
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.bos_token_id == hf.bos_token_id and ours.eos_token_id == hf.eos_token_id
    assert ours.vocab_size == len(hf)
    assert ours.model_max_length == (77 if unlimited else hf.model_max_length)
    if layout == "hashes":
        assert ours(["## heading"]).input_ids[0, 1] == ours.token_to_id("##</w>") == 1000


@pytest.mark.parametrize("layout", ["sd1", "sd2"])
def test_longest_padding_and_no_truncation_match_transformers(tokenizer_dirs, layout):
    hf = CLIPTokenizer.from_pretrained(tokenizer_dirs[layout])
    ours = ClipTokenizer.from_pretrained(tokenizer_dirs[layout])
    batch = ["a cat", "a photo of sks cat, café ☕", "hello!"]
    got = ours(batch, padding="longest")
    assert got.input_ids.tolist() == hf(batch, padding="longest")["input_ids"]
    assert got.attention_mask.tolist() == hf(batch, padding="longest")["attention_mask"]
    unlimited = ours([LONG, "a cat"], padding="longest", truncation=False)
    assert unlimited.input_ids[0].tolist() == hf(LONG)["input_ids"]
    assert unlimited.input_ids.shape[1] > 77


def test_pad_token_sd1_and_sd2(tokenizer_dirs):
    sd1 = ClipTokenizer.from_pretrained(tokenizer_dirs["sd1"])
    sd2 = ClipTokenizer.from_pretrained(tokenizer_dirs["sd2"])
    assert sd1.pad_token_id == sd1.eos_token_id == 999
    assert sd1.bos_token_id == 998
    assert sd2.pad_token_id == sd2.token_to_id("!") == 0
    for tok, pad in ((sd1, 999), (sd2, 0)):
        out = tok(["a cat"])
        n = int(out.attention_mask[0].sum())
        assert n == 4  # bos, a, cat, eos
        assert out.input_ids[0, 0] == 998 and out.input_ids[0, n - 1] == 999
        assert (out.input_ids[0, n:] == pad).all()
        assert (out.attention_mask[0, n:] == 0).all()
    # With SD2's special "!" every "!" is the bare-symbol id, never "!</w>".
    assert sd2(["hi!"], padding="longest").input_ids[0, -2] == 0
    assert sd1(["hi!"], padding="longest").input_ids[0, -2] == sd1.token_to_id("!</w>")


def test_max_length_override(tokenizer_dirs):
    hf = CLIPTokenizer.from_pretrained(tokenizer_dirs["sd1"])
    ours = ClipTokenizer.from_pretrained(tokenizer_dirs["sd1"])
    for max_length in (8, 20, 120):
        got = ours(STRINGS, max_length=max_length)
        expected = hf(STRINGS, padding="max_length", max_length=max_length, truncation=True)
        assert got.input_ids.shape == (len(STRINGS), max_length)
        assert got.input_ids.tolist() == expected["input_ids"]
        assert got.attention_mask.tolist() == expected["attention_mask"]
    with pytest.raises(ValueError, match="bos and eos"):
        ours(["a"], max_length=1)


def test_truncation_keeps_bos_eos_and_warns_once(tokenizer_dirs, caplog):
    ours = ClipTokenizer.from_pretrained(tokenizer_dirs["sd1"])
    long_prompts = ["first long " + LONG, "second " + LONG, "third " + LONG]
    with caplog.at_level(logging.WARNING, logger=prompts.__name__):
        out = ours(long_prompts)
        ours(long_prompts)
    assert (out.attention_mask == 1).all()
    assert (out.input_ids[:, 0] == ours.bos_token_id).all()
    assert (out.input_ids[:, -1] == ours.eos_token_id).all()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "first long" in warnings[0].getMessage() and "77" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=prompts.__name__):
        ours(["short"])
        ClipTokenizer.from_pretrained(tokenizer_dirs["sd1"])(long_prompts[:1])
    assert len(caplog.records) == 1  # the fresh instance warns for itself


def test_padding_modes_and_input_checks(tokenizer_dirs):
    ours = ClipTokenizer.from_pretrained(tokenizer_dirs["sd1"])
    same = ours(["a cat", "a dog"], padding="do_not_pad")
    assert same.input_ids.shape == (2, 4) and same.attention_mask.all()
    with pytest.raises(ValueError, match="do_not_pad"):
        ours(["a cat", "a photo of a cat"], padding="do_not_pad")
    with pytest.raises(ValueError, match="longer than max_length"):
        ours([LONG], truncation=False)
    with pytest.raises(ValueError, match="padding"):
        ours(["a"], padding="left")
    with pytest.raises(TypeError, match="not one str"):
        ours("a photo of a cat")
    with pytest.raises(TypeError, match="sequence of str"):
        ours(["a", None])
    empty = ours([])
    assert isinstance(empty, TokenizedText) and empty.input_ids.shape == (0, 77)


def test_loads_from_model_root(tokenizer_dirs, tmp_path):
    model_root = tmp_path / "model"
    shutil.copytree(tokenizer_dirs["sd2"], model_root / "tokenizer")
    (model_root / "model_index.json").write_text("{}")
    from_root = ClipTokenizer.from_pretrained(model_root)
    direct = ClipTokenizer.from_pretrained(tokenizer_dirs["sd2"], subfolder=None)
    assert from_root.name == str(model_root / "tokenizer")
    assert from_root(STRINGS).input_ids.tolist() == direct(STRINGS).input_ids.tolist()
    assert from_root.pad_token_id == 0
    with pytest.raises(FileNotFoundError):
        ClipTokenizer.from_pretrained(model_root, subfolder=None)


def test_missing_files_error_names_folder_and_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "vocab.json").write_text("{}")  # merges.txt missing: still not a tokenizer
    with pytest.raises(FileNotFoundError) as info:
        ClipTokenizer.from_pretrained(empty)
    message = str(info.value)
    assert str(empty) in message
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        assert name in message
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer"):
        ClipTokenizer.from_pretrained(tmp_path / "does" / "not" / "exist")


def test_hub_id_goes_through_snapshot_download(tokenizer_dirs, tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    shutil.copytree(tokenizer_dirs["sd1"], snapshot / "tokenizer")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    tok = ClipTokenizer.from_pretrained("someone/some-model", revision="v1", cache_dir="/c")
    assert calls == [
        (
            "someone/some-model",
            {"allow_patterns": ["tokenizer/*"], "revision": "v1", "cache_dir": "/c"},
        )
    ]
    assert tok.name == str(snapshot / "tokenizer")


def test_select_caption_train_is_uniform_and_reproducible():
    captions = ["a", "b", "c", "d"]
    draws = [select_caption(captions, train=True, rng=np.random.default_rng(0)) for _ in range(3)]
    assert len(set(draws)) == 1  # a fresh generator with the same seed picks the same
    rng = np.random.default_rng(1234)
    picks = [select_caption(captions, train=True, rng=rng) for _ in range(4000)]
    counts = {c: picks.count(c) for c in captions}
    assert all(900 < n < 1100 for n in counts.values()), counts
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    seq_a = [select_caption(captions, train=True, rng=rng_a) for _ in range(50)]
    seq_b = [select_caption(captions, train=True, rng=rng_b) for _ in range(50)]
    seq_c = [select_caption(captions, train=True, rng=np.random.default_rng(8)) for _ in range(50)]
    assert seq_a == seq_b
    assert seq_a != seq_c or len(set(seq_a)) == 1
    with pytest.raises(ValueError, match="rng"):
        select_caption(captions, train=True, rng=None)


def test_select_caption_eval_takes_first():
    rng = np.random.default_rng(0)
    assert all(select_caption(["x", "y", "z"], train=False, rng=rng) == "x" for _ in range(20))
    assert select_caption(["x", "y"], train=False, rng=None) == "x"
    assert select_caption(("only",), train=True, rng=None) == "only"


def test_empty_caption_rule():
    assert select_caption([], train=True, rng=None) == ""
    assert select_caption([], train=False, rng=None) == ""
    assert select_caption([None], train=False, rng=None) == ""
    assert select_caption(["  \t\n"], train=False, rng=None) == ""
    assert select_caption([None, "x"], train=False, rng=None) == ""
    rng = np.random.default_rng(3)
    picks = {select_caption(["a dog", None], train=True, rng=rng) for _ in range(100)}
    assert picks == {"a dog", ""}
    assert prompts.clean_caption(" a cat ") == " a cat "


def test_normalize_caption_field():
    assert normalize_caption_field("a cat", where="row 0") == ("a cat",)
    assert normalize_caption_field(["a", "b"], where="row 0") == ("a", "b")
    assert normalize_caption_field(("a",), where="row 0") == ("a",)
    assert normalize_caption_field(np.array(["a", "b"]), where="row 0") == ("a", "b")
    array = np.array(["a", None], dtype=object)
    assert normalize_caption_field(array, where="row 0") == ("a", "")
    assert normalize_caption_field(None, where="row 0") == ()
    assert normalize_caption_field([], where="row 0") == ()
    assert normalize_caption_field("   ", where="row 0") == ("",)
    assert normalize_caption_field(np.str_("np string"), where="row 0") == ("np string",)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"caption": "a cat"}, "got dict"),
        (3, "got int"),
        (b"bytes", "got bytes"),
        (["a", 5], "item 1 is a int"),
        (np.array([["a", "b"]]), "1-D"),
    ],
)
def test_normalize_caption_field_errors(value, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        normalize_caption_field(value, where="caption column 'caption', row 12")
    assert str(info.value).startswith("caption column 'caption', row 12: ")
    assert fragment in str(info.value)


def test_dreambooth_prompts():
    p = DreamBoothPrompts("a photo of sks dog", "a photo of a dog")
    assert p.with_prior_preservation
    assert not DreamBoothPrompts("a photo of sks dog").with_prior_preservation
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.instance_prompt = "x"
    for bad in ("", "   ", None, 3):
        with pytest.raises(ValueError, match="instance_prompt"):
            DreamBoothPrompts(bad)
    with pytest.raises(ValueError, match="class_prompt"):
        DreamBoothPrompts("a photo of sks dog", " ")
    with pytest.raises(ValueError, match="equals instance_prompt"):
        DreamBoothPrompts("a photo of sks dog", "a photo of sks dog ")


def test_prompt_dataset():
    ds = PromptDataset("a photo of a dog", 3)
    assert len(ds) == 3
    assert ds[2] == {"prompt": "a photo of a dog", "index": 2}
    assert [item["index"] for item in ds] == [0, 1, 2]
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds[-1]
    assert len(PromptDataset("x", 0)) == 0
    with pytest.raises(ValueError, match="num_samples"):
        PromptDataset("x", -1)
