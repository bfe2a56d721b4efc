"""Data sources: image folders, HF datasets, TFDS, DreamBooth. All fixtures are built in tmp_path."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from shared.data.records import Record
from shared.data.sources import (
    Source,
    count_images,
    dreambooth_source,
    hf_dataset_source,
    image_folder_source,
    list_images,
    tfds_source,
)
from shared.errors import ConfigError, DataError

CAFE = "café ☕ 東京"


def _png(path, value: int = 0, size: int = 4) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return str(path)


def _write(path, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _jsonl(path, rows) -> None:
    _write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _listing(source, root) -> list[tuple[str, tuple[str, ...]]]:
    return [(os.path.relpath(r.image.path, root).replace(os.sep, "/"), r.captions) for r in source]


def _key(record: Record):
    """A comparable form of a record (arrays compared by content)."""
    image = record.image
    array = None if image.array is None else (image.array.dtype.str, image.array.tobytes())
    extras = {k: (v.name, v.path, v.data) for k, v in record.extras.items()}
    return (image.name, image.path, image.data, array, record.captions, extras, record.meta)


def _one_line(info: pytest.ExceptionInfo, *names: object) -> str:
    """The message of a user error: a single line that names each of `names`."""
    message = str(info.value)
    assert "\n" not in message, message
    for name in names:
        assert str(name) in message, (name, message)
    return message


def _pixel(record: Record) -> int:
    """The (uniform) value of a record's image, decoded from wherever it lives."""
    image = record.image
    if image.array is not None:
        return int(image.array[0, 0, 0])
    with Image.open(image.path if image.path else io.BytesIO(image.data)) as pil:
        return int(np.asarray(pil)[0, 0, 0])


# --- image folders ------------------------------------------------------------------------


def test_metadata_jsonl_with_list_and_non_ascii_captions(tmp_path):
    for i, name in enumerate(["train/a.png", "train/b.jpg", "c.png"]):
        _png(tmp_path / name, value=i)
    rows = [
        {"file_name": "train/b.jpg", "text": ["two", "deux"]},
        {"file_name": "c.png", "text": CAFE},
        {"file_name": "train/a.png", "text": "one", "extra": 1},
    ]
    _jsonl(tmp_path / "metadata.jsonl", rows)
    source = image_folder_source(tmp_path)
    assert isinstance(source, Source)
    assert _listing(source, tmp_path) == [
        ("c.png", (CAFE,)),
        ("train/a.png", ("one",)),
        ("train/b.jpg", ("two", "deux")),
    ]
    assert [_pixel(r) for r in source] == [2, 0, 1]
    assert source[-1].captions == ("two", "deux")
    with pytest.raises(IndexError):
        source[3]
    assert "3 images" in source.describe() and str(tmp_path) in source.describe()


def test_metadata_csv_and_custom_caption_column(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    _write(tmp_path / "metadata.csv", f'file_name,prompt\na.png,"{CAFE}, with comma"\nb.png,\n')
    source = image_folder_source(tmp_path, caption_column="prompt")
    assert _listing(source, tmp_path) == [("a.png", (f"{CAFE}, with comma",)), ("b.png", ())]


def test_nested_metadata_is_relative_to_its_folder_and_covers_its_subtree(tmp_path):
    _png(tmp_path / "sub/x.png")
    _png(tmp_path / "sub/deeper/y.png")
    _png(tmp_path / "sub/unlisted.png")
    _png(tmp_path / "free/z.png")
    _write(tmp_path / "free/z.txt", "first line\n\n  second line  \n")
    _png(tmp_path / "free/bare.png")
    rows = [
        {"file_name": "x.png", "text": "x"},
        {"file_name": "deeper/y.png", "text": "y1"},
        {"file_name": "deeper/y.png", "text": ["y2", "y3"]},
    ]
    _jsonl(tmp_path / "sub/metadata.jsonl", rows)
    source = image_folder_source(tmp_path)
    assert _listing(source, tmp_path) == [
        ("free/bare.png", ()),
        ("free/z.png", ("first line", "second line")),
        ("sub/deeper/y.png", ("y1", "y2", "y3")),
        ("sub/x.png", ("x",)),
    ]
    assert "1 images not named in metadata skipped" in source.describe()


def test_sidecars_and_junk_files(tmp_path):
    _png(tmp_path / "a.png")
    _write(tmp_path / "a.txt", CAFE + "\n")
    _png(tmp_path / "B.JPEG")
    for junk in [".DS_Store", "Thumbs.db", "notes.txt", "data.json", "._a.png"]:
        _write(tmp_path / junk, "junk")
    _png(tmp_path / ".hidden/h.png")
    _png(tmp_path / "__MACOSX/m.png")
    _jsonl(tmp_path / ".hidden/metadata.jsonl", [{"file_name": "nope.png", "text": "x"}])
    source = image_folder_source(tmp_path)
    assert _listing(source, tmp_path) == [("B.JPEG", ()), ("a.png", (CAFE,))]
    no_captions = image_folder_source(tmp_path, caption_column=None)
    assert [r.captions for r in no_captions] == [(), ()]
    flat = image_folder_source(tmp_path, recursive=False)
    assert len(flat) == 2


def test_listing_is_sorted_recursive_and_deterministic(tmp_path):
    for name in ["b.png", "a/z.png", "a.png", "a/b/c.webp", "top.GIF"]:
        _png(tmp_path / name)
    expected = ["a.png", "a/b/c.webp", "a/z.png", "b.png", "top.GIF"]
    assert [os.path.relpath(p, tmp_path) for p in list_images(tmp_path)] == expected
    assert [os.path.relpath(p, tmp_path) for p in list_images(tmp_path, recursive=False)] == [
        "a.png",
        "b.png",
        "top.GIF",
    ]
    first, second = image_folder_source(tmp_path), image_folder_source(tmp_path)
    assert [_key(r) for r in first] == [_key(r) for r in second]
    assert count_images(tmp_path) == 5
    assert count_images(tmp_path / "missing") == 0


def test_folder_errors_name_the_folder_and_flag(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"{empty}.* is empty") as info:
        image_folder_source(empty)
    _one_line(info, empty, "--train_data_dir")
    junk = tmp_path / "junk"
    for name in [".DS_Store", "notes.txt", "Thumbs.db"]:
        _write(junk / name, "x")
    with pytest.raises(DataError, match=rf"no images in {junk}.*\.DS_Store.*notes\.txt") as info:
        image_folder_source(junk)
    _one_line(info, "--train_data_dir", ".png")
    with pytest.raises(DataError, match="does not exist") as info:
        image_folder_source(tmp_path / "missing")
    _one_line(info, tmp_path / "missing", "--train_data_dir")
    with pytest.raises(DataError, match="--instance_data_dir"):
        image_folder_source(tmp_path / "missing", flag="--instance_data_dir")
    a_file = _png(tmp_path / "one.png")
    with pytest.raises(DataError, match="is a file, not a folder") as info:
        image_folder_source(a_file)
    _one_line(info, a_file, "--train_data_dir")
    with pytest.raises(DataError, match="no images"):
        list_images(junk, allow_empty=False)
    assert list_images(junk) == []


@pytest.mark.parametrize(
    ("name", "content", "error", "match"),
    [
        ("metadata.jsonl", '{"file_name": "a.png", "text": "ok"}\n{"file_name": "a.png",\n',
         DataError, r"metadata\.jsonl line 2: malformed JSON"),
        ("metadata.jsonl", '{"file_name": "a.png", "text": "a"}\n\n{"file_name": "gone.png"}\n',
         DataError, r"metadata\.jsonl line 3 names a missing image 'gone\.png'"),
        ("metadata.jsonl", '{"file_name": "a.png", "caption": "a"}\n',
         DataError, r"no caption column 'text'; its columns are \['caption', 'file_name'\]"
         r"\. Pass the right one with --caption_column"),
        ("metadata.jsonl", '{"file_name": "a.png", "text": 7}\n',
         DataError, r"line 1.*: expected a string, a list of strings or None, got int \(7\)"),
        ("sub/metadata.jsonl", '{"file_name": "../a.png", "text": "a"}\n',
         DataError, "relative to the metadata file"),
        ("metadata.jsonl", '["a.png", "text"]\n', DataError, "line 1: expected a JSON object"),
        ("metadata.csv", "file_name,text\na.png,fine\na.png,too,many\n",
         DataError, r"metadata\.csv line 3: 3 cells but the header has 2 columns"),
        ("metadata.csv", "name,text\na.png,x\n", DataError, r"no file name column 'file_name'"),
        ("metadata.parquet", "x", DataError, "convert it to metadata.jsonl"),
    ],
)  # fmt: skip
def test_malformed_metadata(tmp_path, name, content, error, match):
    _png(tmp_path / "a.png")
    _write(tmp_path / name, content)
    with pytest.raises(error, match=match) as info:
        image_folder_source(tmp_path)
    _one_line(info, tmp_path / name)


# --- HF datasets --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("datasets")


def _hf_dataset(hf, n: int = 5):
    images = [Image.fromarray(np.full((4, 4, 3), 10 * i, np.uint8)) for i in range(n)]
    captions = [[f"c{i}", f"alt{i}"] if i % 2 else CAFE + str(i) for i in range(n)]
    features = hf.Features({"image": hf.Image(), "text": hf.List(hf.Value("string"))})
    captions = [c if isinstance(c, list) else [c] for c in captions]
    return hf.Dataset.from_dict({"image": images, "text": captions}, features=features)


def test_hf_save_to_disk_folder(hf, tmp_path):
    _hf_dataset(hf).save_to_disk(tmp_path / "saved")
    source = hf_dataset_source(str(tmp_path / "saved"))
    assert len(source) == 5 and isinstance(source, Source)
    assert all(r.image.data is not None for r in source)  # encoded bytes, not decoded
    assert [_pixel(r) for r in source] == [0, 10, 20, 30, 40]
    assert [r.captions for r in source][:2] == [(CAFE + "0",), ("c1", "alt1")]
    hf.DatasetDict({"train": _hf_dataset(hf, 2), "test": _hf_dataset(hf, 3)}).save_to_disk(
        tmp_path / "dict"
    )
    assert len(hf_dataset_source(str(tmp_path / "dict"), split="test")) == 3
    with pytest.raises(ValueError, match=r"no split 'val'; its splits are \['test', 'train'\]"):
        hf_dataset_source(str(tmp_path / "dict"), split="val")


def test_hf_local_imagefolder_and_parquet(hf, tmp_path):
    folder = tmp_path / "folder"
    for i in range(3):
        _png(folder / f"{i}.png", value=i)
    _jsonl(
        folder / "metadata.jsonl", [{"file_name": f"{i}.png", "text": f"t{i}"} for i in range(3)]
    )
    cache = str(tmp_path / "cache")
    by_name = hf_dataset_source(str(folder), cache_dir=cache)
    by_dir = hf_dataset_source(train_data_dir=str(folder), cache_dir=cache)
    for source in (by_name, by_dir):
        assert [(os.path.basename(r.image.path), r.captions) for r in source] == [
            ("0.png", ("t0",)),
            ("1.png", ("t1",)),
            ("2.png", ("t2",)),
        ]
    _hf_dataset(hf).to_parquet(str(tmp_path / "pq/data/train-00000-of-00001.parquet"))
    parquet = hf_dataset_source(str(tmp_path / "pq"), cache_dir=cache)
    assert [_pixel(r) for r in parquet] == [0, 10, 20, 30, 40]
    assert parquet[1].captions == ("c1", "alt1")


def test_hf_columns_and_errors(hf, tmp_path):
    _hf_dataset(hf).save_to_disk(tmp_path / "saved")
    saved = str(tmp_path / "saved")
    with pytest.raises(DataError, match=r"--image_column 'img'.* columns are \['image', 'text'\]"):
        hf_dataset_source(saved, image_column="img")
    with pytest.raises(DataError, match=r"--caption_column 'caption'.*\['image', 'text'\]") as info:
        hf_dataset_source(saved, caption_column="caption")
    _one_line(info, "'caption'", "Pass the right one with --caption_column")
    with pytest.raises(DataError, match=r"--caption_column 'image'.* strings"):
        hf_dataset_source(saved, caption_column="image")
    assert hf_dataset_source(saved, caption_column=None)[1].captions == ()
    with pytest.raises(ConfigError, match=r"--dataset_name .* --train_data_dir"):
        hf_dataset_source()
    with pytest.raises(DataError, match="does not exist") as info:
        hf_dataset_source(train_data_dir=str(tmp_path / "missing"))
    _one_line(info, tmp_path / "missing", "--train_data_dir")
    with pytest.raises(DataError, match="does not exist") as info:
        hf_dataset_source(str(tmp_path / "missing"))
    _one_line(info, tmp_path / "missing", "--dataset_name")


def test_hf_max_train_samples_matches_diffusers_and_is_deterministic(hf, tmp_path):
    images, texts = [b"\x89PNG" + bytes([i]) for i in range(10)], [f"c{i}" for i in range(10)]
    hf.Dataset.from_dict({"image": images, "text": texts}).save_to_disk(tmp_path / "saved")
    saved = str(tmp_path / "saved")
    picked = [r.captions[0] for r in hf_dataset_source(saved, max_train_samples=4, seed=3)]
    again = [r.captions[0] for r in hf_dataset_source(saved, max_train_samples=4, seed=3)]
    assert picked != [r.captions[0] for r in hf_dataset_source(saved, max_train_samples=4, seed=4)]
    assert len(hf_dataset_source(saved, max_train_samples=50)) == 10
    # The shuffle's index table stays in memory, not in the user's folder.
    assert not [name for name in os.listdir(saved) if name.startswith("cache-")]
    reference = hf.load_from_disk(saved).shuffle(seed=3).select(range(4))["text"]  # as diffusers
    assert picked == again == list(reference)
    assert hf_dataset_source(saved)[2].image.data == b"\x89PNG\x02"  # binary column -> bytes


def test_hf_array_and_path_columns(hf, tmp_path):
    pixels = [np.full((4, 4, 3), 7 * i, np.uint8) for i in range(3)]
    paths = [_png(tmp_path / f"p{i}.png", value=i) for i in range(3)]
    features = hf.Features(
        {"a3": hf.Array3D((4, 4, 3), "uint8"), "nested": hf.List(hf.List(hf.List(hf.Value("uint8")))),
         "path": hf.Value("string")}
    )  # fmt: skip
    rows = {"a3": pixels, "nested": [p.tolist() for p in pixels], "path": paths}
    hf.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "saved")
    for column in ("a3", "nested"):
        source = hf_dataset_source(
            str(tmp_path / "saved"), image_column=column, caption_column=None
        )
        record = source[2]
        assert record.image.array.dtype == np.uint8 and record.image.array.shape == (4, 4, 3)
        assert _pixel(record) == 14
    by_path = hf_dataset_source(str(tmp_path / "saved"), image_column="path", caption_column=None)
    assert [r.image.path for r in by_path] == paths


# --- TensorFlow Datasets ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """A 5-example TFDS dataset in array_record format, built without TensorFlow or network.

    An Image feature fed encoded PNG bytes needs no TensorFlow (only array encoding does).
    `skip_registration` makes reading go through the prepared files, as for a real data_dir.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir = str(tmp_path_factory.mktemp("tfds"))

    class TinyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(4, 4, 3)),
                "pixels": tfds.features.Tensor(shape=(4, 4, 3), dtype=np.uint8),
                "caption": tfds.features.Text(),
                "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
                "label": tfds.features.ClassLabel(names=["cat", "dog"]),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(5), "test": self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                buffer = io.BytesIO()
                Image.fromarray(np.full((4, 4, 3), 50 * i, np.uint8)).save(buffer, format="PNG")
                pixels, captions = np.full((4, 4, 3), 50 * i, np.uint8), [f"a{i}", f"b{i}"]
                example = {"image": buffer.getvalue(), "pixels": pixels, "caption": f"{CAFE} {i}"}
                yield i, {**example, "captions": {"text": captions}, "label": i % 2}

    builder = TinyCaptions(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return data_dir


def test_tfds_records_round_trip(tiny_tfds):
    source = tfds_source("tiny_captions", data_dir=tiny_tfds, caption_key="caption")
    assert len(source) == 5 and isinstance(source, Source)
    records = list(source)
    assert all(r.image.data is not None for r in records)  # undecoded PNG bytes
    # TFDS shuffles examples on write; each record still pairs its own image and caption.
    by_caption = {r.captions: _pixel(r) for r in records}
    assert by_caption == {(f"{CAFE} {i}",): 50 * i for i in range(5)}
    assert [_key(r) for r in records] == [_key(r) for r in source]
    labels = tfds_source("tiny_captions", data_dir=tiny_tfds, caption_key="label")
    assert {r.captions for r in labels} == {("cat",), ("dog",)}
    nested = tfds_source(
        "tiny_captions", data_dir=tiny_tfds, split="test", caption_key="captions/text"
    )
    assert len(nested) == 2 and {r.captions for r in nested} == {("a0", "b0"), ("a1", "b1")}
    arrays = tfds_source(
        "tiny_captions", data_dir=tiny_tfds, image_key="pixels", caption_key="caption"
    )
    assert {r.captions: _pixel(r) for r in arrays} == by_caption
    assert arrays[0].image.array.shape == (4, 4, 3)
    assert "5 examples" in source.describe() and "tiny_captions" in source.describe()


def test_tfds_errors(tiny_tfds, tmp_path):
    with pytest.raises(ConfigError, match="--tfds_data_dir"):
        tfds_source("tiny_captions", data_dir=None)
    with pytest.raises(
        DataError, match=r"--tfds_data_dir .*missing does not exist.*array_record"
    ) as info:
        tfds_source("tiny_captions", data_dir=str(tmp_path / "missing"))
    _one_line(info, tmp_path / "missing")
    with pytest.raises(DataError, match=r"no dataset 'mnist'.*found \['tiny_captions'\]"):
        tfds_source("mnist", data_dir=tiny_tfds)
    with pytest.raises(DataError, match=r"no 'tiny_captions:2\.0\.0'.*holds \['1\.0\.0'\]"):
        tfds_source("tiny_captions:2.0.0", data_dir=tiny_tfds)
    with pytest.raises(DataError, match="--dataset_split") as info:
        tfds_source("tiny_captions", data_dir=tiny_tfds, split="validation")
    _one_line(info, "tiny_captions")
    with pytest.raises(DataError, match=r"--image_column 'img': no feature 'img'.*'image'"):
        tfds_source("tiny_captions", data_dir=tiny_tfds, image_key="img")


# --- DreamBooth ---------------------------------------------------------------------------


def _dreambooth_dirs(tmp_path, n_instance: int = 3, n_class: int = 5):
    instance = [_png(tmp_path / f"instance/{i}.jpg", value=i) for i in range(n_instance)]
    classes = [_png(tmp_path / f"class/{i:02d}.png", value=100 + i) for i in range(n_class)]
    return instance, classes


def test_dreambooth_lengths_and_cycling(tmp_path):
    instance, classes = _dreambooth_dirs(tmp_path)
    plain = dreambooth_source(tmp_path / "instance", instance_prompt="a photo of sks dog")
    assert len(plain) == 3
    assert [r.image.path for r in plain] == instance
    assert all(r.captions == ("a photo of sks dog",) and not r.extras and not r.meta for r in plain)
    prior = dreambooth_source(
        tmp_path / "instance",
        instance_prompt="a photo of sks dog",
        class_data_dir=tmp_path / "class",
        class_prompt="a photo of dog",
        with_prior_preservation=True,
    )
    assert len(prior) == 5
    assert [r.image.path for r in prior] == [instance[i % 3] for i in range(5)]
    assert [r.extras["class"].path for r in prior] == classes
    assert prior[4].meta == {"class_prompt": "a photo of dog"}
    capped = dreambooth_source(
        tmp_path / "instance",
        instance_prompt="p",
        class_data_dir=tmp_path / "class",
        class_prompt="c",
        with_prior_preservation=True,
        num_class_images=2,
    )
    assert [r.extras["class"].path for r in capped] == [classes[0], classes[1], classes[0]]
    assert "prior preservation with 2 class images" in capped.describe()


def test_dreambooth_errors(tmp_path):
    _dreambooth_dirs(tmp_path)
    instance = tmp_path / "instance"
    (tmp_path / "empty").mkdir()
    prior = {"instance_prompt": "p", "with_prior_preservation": True}
    with pytest.raises(ConfigError, match="--class_data_dir"):
        dreambooth_source(instance, class_prompt="c", **prior)
    with pytest.raises(ConfigError, match="--class_prompt"):
        dreambooth_source(instance, class_data_dir=tmp_path / "class", **prior)
    for class_dir in (tmp_path / "empty", tmp_path / "not_yet"):
        with pytest.raises(DataError, match="--num_class_images") as info:
            dreambooth_source(instance, class_data_dir=class_dir, class_prompt="c", **prior)
        _one_line(info, class_dir, "--class_data_dir")
        assert count_images(class_dir) == 0
    with pytest.raises(DataError, match="does not exist") as info:
        dreambooth_source(tmp_path / "nope", instance_prompt="p")
    _one_line(info, tmp_path / "nope", "--instance_data_dir")
    with pytest.raises(DataError, match=rf"{tmp_path / 'empty'}.* is empty") as info:
        dreambooth_source(tmp_path / "empty", instance_prompt="p")
    _one_line(info, "--instance_data_dir")
    with pytest.raises(ConfigError, match="--instance_prompt"):
        dreambooth_source(instance, instance_prompt="")
    with pytest.warns(UserWarning, match="ignored without --with_prior_preservation"):
        dreambooth_source(instance, instance_prompt="p", class_data_dir=tmp_path / "class")


# --- every source ---------------------------------------------------------------------------


def test_every_source_pickles_to_the_same_records(tmp_path, tiny_tfds, hf):
    _dreambooth_dirs(tmp_path)
    _write(tmp_path / "instance/0.txt", "sidecar")
    _hf_dataset(hf).save_to_disk(tmp_path / "saved")
    sources = [
        image_folder_source(tmp_path / "instance"),
        hf_dataset_source(str(tmp_path / "saved"), max_train_samples=3),
        tfds_source("tiny_captions", data_dir=tiny_tfds, caption_key="caption"),
        dreambooth_source(
            tmp_path / "instance",
            instance_prompt="p",
            class_data_dir=tmp_path / "class",
            class_prompt="c",
            with_prior_preservation=True,
        ),
    ]
    for source in sources:
        copy = pickle.loads(pickle.dumps(source))
        assert len(copy) == len(source) and copy.describe() == source.describe()
        assert [_key(r) for r in copy] == [_key(r) for r in source]
        assert len(pickle.dumps(source)) < 20_000, source.describe()  # no data copied to workers


def test_importing_sources_loads_no_heavy_package():
    code = (
        "import sys, shared.data.sources; "
        "heavy = {'datasets', 'tensorflow_datasets', 'tensorflow', 'jax', 'torch', 'pyarrow'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
