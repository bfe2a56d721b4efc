"""shared.data's config -> source/loader wiring, for every kind of source."""

import json

import numpy as np
import pytest
from PIL import Image

from shared import config as C
from shared.data import build_loader, build_source, build_transform


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    # build_source remembers image checks under the default, relative --output_dir.
    monkeypatch.chdir(tmp_path)


def make_folder(root, n, *, captions=True):
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (40 + i, 32), (i * 20, 0, 0)).save(root / f"{i:02d}.png")
        rows.append({"file_name": f"{i:02d}.png", "text": f"image number {i}"})
    if captions:
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def t2i(**values):
    base = {"pretrained_model_name_or_path": "m", "resolution": 32}
    return C.build("text2image", "torch", {**base, **values})


def test_text2image_folder_has_captions_and_max_train_samples(tmp_path):
    folder = make_folder(tmp_path / "imgs", 10)
    source = build_source(t2i(train_data_dir=str(folder)))
    assert len(source) == 10 and source[3].captions == ("image number 3",)
    subset = build_source(t2i(train_data_dir=str(folder), max_train_samples=4, seed=1))
    expected = np.random.default_rng(1).permutation(10)[:4]  # datasets' shuffle(seed).select
    assert [r.captions[0] for r in (subset[i] for i in range(4))] == [
        f"image number {i}" for i in expected
    ]
    assert "first 4" in subset.describe()


def test_unconditional_ignores_captions(tmp_path):
    folder = make_folder(tmp_path / "imgs", 4)
    cfg = C.build("unconditional", "torch", {"train_data_dir": str(folder)})
    assert build_source(cfg)[0].captions == ()


def test_dataset_name_routes_to_datasets_and_tfds(tmp_path):
    from datasets import Dataset

    images = [Image.new("RGB", (8, 8), (i, i, i)) for i in range(3)]
    Dataset.from_dict({"image": images, "text": ["a", "b", "c"]}).save_to_disk(tmp_path / "ds")
    source = build_source(t2i(dataset_name=str(tmp_path / "ds")))
    assert len(source) == 3 and source[1].captions == ("b",)
    with pytest.raises(ValueError, match="--tfds_data_dir"):
        build_source(t2i(dataset_name="tfds:mnist"))


def test_dreambooth_prior_preservation(tmp_path):
    instance, klass = (
        make_folder(tmp_path / "i", 3, captions=False),
        make_folder(tmp_path / "c", 5, captions=False),
    )
    cfg = C.build(
        "dreambooth",
        "torch",
        {"pretrained_model_name_or_path": "m", "instance_data_dir": str(instance),
         "instance_prompt": "sks", "with_prior_preservation": True, "class_data_dir": str(klass),
         "class_prompt": "dog", "num_class_images": 4, "resolution": 32},
    )  # fmt: skip
    source = build_source(cfg)
    assert len(source) == 4  # max(3 instance, 4 class images used)
    assert source[3].meta == {"class_prompt": "dog"} and "class" in source[3].extras


def test_loader_follows_config(tmp_path):
    folder = make_folder(tmp_path / "imgs", 8)
    cfg = t2i(
        train_data_dir=str(folder), center_crop=True, image_interpolation_mode="bicubic", seed=3
    )
    transform = build_transform(cfg)
    assert (transform.resolution, transform.center_crop, transform.interpolation) == (
        32,
        True,
        "bicubic",
    )
    with build_loader(cfg, build_source(cfg), batch_size=4) as loader:
        batch = next(loader)
    assert batch["pixel_values"].shape == (4, 32, 32, 3) and batch["pixel_values"].dtype == np.uint8
    order = np.random.default_rng([3, 0]).permutation(8)[:4]  # seed 3, epoch 0
    assert batch["index"].tolist() == order.tolist()
