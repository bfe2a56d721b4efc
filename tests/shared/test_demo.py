"""shared.demo: offline assets are deterministic, complete, loadable, and built once."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers import CLIPTokenizer

from shared import demo
from shared.prompts import ClipTokenizer


def _upright(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image)  # a loaded copy; the file is closed


def _exif(path: Path) -> dict[int, object]:
    with Image.open(path) as image:
        return dict(image.getexif())


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    first = demo.build_demo_assets(tmp_path_factory.mktemp("a") / "assets")
    demo.learn_bpe.cache_clear()  # learn the merges again, not from the cache
    second = demo.build_demo_assets(tmp_path_factory.mktemp("b") / "assets")
    return first, second


def test_build_is_deterministic(built):
    first, second = built
    hashes = _hashes(first.root)
    assert len(hashes) > 500
    assert hashes == _hashes(second.root)


def test_counts_and_sizes(built):
    assets = built[0]
    assert assets.root.is_absolute()
    instance = sorted(assets.instance_dir.glob("*.jpg"))
    assert [p.name for p in instance] == [f"{i:02d}.jpg" for i in range(5)]
    for path in instance:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert min(ImageOps.exif_transpose(image).size) == 64
    shapes = {_upright(p).size for p in instance}
    assert shapes == {(64, 64), (85, 64), (64, 85)}  # square, landscape and portrait crops
    classes = sorted(assets.class_dir.glob("*.jpg"))
    assert len(classes) == 8
    arrays = [np.asarray(_upright(p)) for p in classes]
    assert all(a.shape == (64, 64, 3) for a in arrays)
    assert len({a.tobytes() for a in arrays}) == 8  # eight different pictures
    captioned = sorted(assets.captioned_dir.glob("*.png"))
    assert len(captioned) == 8
    assert all(_upright(p).size == (64, 64) for p in captioned)
    digits = sorted(assets.digits_dir.glob("train/*/*.png"))
    assert len(digits) == 500
    assert sorted(p.name for p in (assets.digits_dir / "train").iterdir()) == [
        str(d) for d in range(10)
    ]
    with Image.open(digits[0]) as image:
        assert image.size == (32, 32) and image.mode == "L"
        assert np.asarray(image).max() > 200 and np.asarray(image).min() < 30


def test_digits_match_sklearn(tmp_path):
    from sklearn.datasets import load_digits

    train = demo.write_digits_folder(tmp_path, size=8, limit=30)
    digits = load_digits()
    files = sorted(train.glob("*/*.png"))
    assert len(files) == 30
    for path in files:
        index = int(path.stem)
        assert path.parent.name == str(digits.target[index])
        expected = np.round(digits.images[index] * 255 / 16)
        assert np.array_equal(np.asarray(_upright(path)), expected)  # size 8: no resampling


def test_tokenizer_loads_in_transformers(built):
    assets = built[0]
    hf = CLIPTokenizer.from_pretrained(assets.tokenizer_dir)
    ours = ClipTokenizer.from_pretrained(assets.root)  # the asset root doubles as a model root
    assert len(hf) == 1000 and ours.vocab_size == 1000
    assert hf.model_max_length == 77 and ours.model_max_length == 77
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (998, 999, 999)
    vocab = json.loads((assets.tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    by_id = sorted(vocab, key=vocab.get)
    assert sorted(vocab.values()) == list(range(1000))
    assert (
        by_id[0] == "!"
        and by_id[256] == "!</w>"
        and by_id[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    )
    assert by_id[:256] == list(demo.bytes_to_unicode().values())
    for prompt in (assets.instance_prompt, assets.class_prompt):
        ids = hf(prompt)["input_ids"]
        assert len(ids) == len(prompt.split()) + 2  # the corpus made each word one token
        assert ours([prompt], padding="longest").input_ids[0].tolist() == ids
        assert hf.decode(ids, skip_special_tokens=True) == prompt
    assert "sks</w>" in vocab


def test_tokenizer_vocab_size_argument(tmp_path):
    folder = demo.write_tiny_clip_tokenizer(tmp_path / "t600", vocab_size=600)
    hf = CLIPTokenizer.from_pretrained(folder)
    assert len(hf) == 600 and hf.eos_token_id == 599
    ours = ClipTokenizer.from_pretrained(folder)
    text = ["a photo of a golden retriever, café ☕"]
    assert (
        ours(text).input_ids.tolist() == hf(text, padding="max_length", max_length=77)["input_ids"]
    )
    with pytest.raises(ValueError, match="vocab_size"):
        demo.write_tiny_clip_tokenizer(tmp_path / "small", vocab_size=513)
    with pytest.raises(ValueError, match="corpus"):
        demo.write_tiny_clip_tokenizer(tmp_path / "huge", vocab_size=5000)


def test_tokenizer_bytes_do_not_depend_on_the_process(tmp_path):
    code = "import sys; from shared.demo import write_tiny_clip_tokenizer as w; w(sys.argv[1])"
    root = str(Path(__file__).resolve().parents[2])
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONPATH": root, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", code, str(tmp_path / seed)], env=env, check=True)
    assert _hashes(tmp_path / "1") == _hashes(tmp_path / "2")
    assert _hashes(tmp_path / "1") == _hashes(demo.write_tiny_clip_tokenizer(tmp_path / "here"))


def test_exif_rotated_instance_is_upright_after_transpose(built):
    path = built[0].instance_dir / f"{demo.EXIF_INSTANCE_INDEX:02d}.jpg"
    expected = np.asarray(demo.render_instance_image(demo.EXIF_INSTANCE_INDEX), dtype=np.float64)
    with Image.open(path) as stored:
        assert stored.getexif()[demo.EXIF_ORIENTATION_TAG] == 6
        assert stored.size == (64, 85)  # stored sideways
        upright = ImageOps.exif_transpose(stored)
    assert upright.size == (85, 64) == (expected.shape[1], expected.shape[0])
    pixels = np.asarray(upright, dtype=np.float64)
    assert np.abs(pixels - expected).mean() < 6  # JPEG noise only
    assert np.abs(pixels[::-1, ::-1] - expected).mean() > 20  # a wrong rotation is far off
    others = [p for p in built[0].instance_dir.glob("*.jpg") if p != path]
    assert all(demo.EXIF_ORIENTATION_TAG not in _exif(p) for p in others)


def test_captioned_metadata(built):
    folder = built[0].captioned_dir
    lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 8
    assert all(set(row) == {"file_name", "text"} for row in rows)
    assert sorted(row["file_name"] for row in rows) == sorted(p.name for p in folder.glob("*.png"))
    assert all(isinstance(row["text"], str) and row["text"].strip() for row in rows)
    assert len({row["text"] for row in rows}) == 8
    assert any("café ☕" in row["text"] for row in rows)
    assert any(not row["text"].isascii() for row in rows)


def test_rebuild_is_idempotent(built):
    assets = built[0]
    marker = assets.root / demo.MARKER_NAME
    before = {p: p.stat().st_mtime_ns for p in assets.root.rglob("*")}
    again = demo.build_demo_assets(assets.root)
    assert again == assets
    assert {p: p.stat().st_mtime_ns for p in assets.root.rglob("*")} == before
    assert json.loads(marker.read_text())["version"] == demo.DEMO_ASSETS_VERSION


def test_outdated_or_partial_build_is_replaced(tmp_path):
    root = tmp_path / "assets"
    demo.build_demo_assets(root, digits_limit=20)
    expected = _hashes(root)
    (root / demo.MARKER_NAME).write_text(json.dumps({"digits_limit": 20, "version": 0}))
    (root / "stale.txt").write_text("left over from an old version")
    assets = demo.build_demo_assets(root, digits_limit=20)
    assert _hashes(root) == expected
    assert len(list(assets.digits_dir.glob("train/*/*.png"))) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assets"]  # no temp folders left
    # Other parameters are another build, too.
    demo.build_demo_assets(root, digits_limit=30)
    assert len(list(assets.digits_dir.glob("train/*/*.png"))) == 30


def test_foreign_folder_is_not_replaced(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "precious.txt").write_text("do not delete")
    with pytest.raises(FileExistsError, match="refusing"):
        demo.build_demo_assets(root)
    assert (root / "precious.txt").read_text() == "do not delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken(directory, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "write_class_images", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        demo.build_demo_assets(tmp_path / "assets", digits_limit=10)
    assert list(tmp_path.iterdir()) == []


def test_demo_prompts(built):
    prompts = built[0].dreambooth_prompts
    assert prompts.instance_prompt == "a photo of sks cat"
    assert prompts.class_prompt == "a photo of a cat"


def test_shared_imports_stay_light():
    heavy = ["torch", "transformers", "jax", "flax", "skimage", "sklearn", "huggingface_hub"]
    code = (
        "import sys, shared.prompts, shared.demo; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == ""
