"""Local image folders are decoded before step 1: bad files left out, or the run stopped early."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from shared import config as C
from shared.data import build_source, loader, verify
from shared.data.sources import image_folder_source
from shared.errors import DataError

VERIFY_LOGGER = "shared.data.verify"


def _image(path, i: int, *, size: int = 32) -> str:
    """A noisy image (so JPEGs have real entropy-coded data to cut), seeded by `i`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def _truncate(path: str, keep: float = 0.5) -> str:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    return path


def _folder(root, n: int, *, ext: str = "jpg", captions: bool = False) -> list[str]:
    paths = [_image(root / f"{i:02d}.{ext}", i) for i in range(n)]
    if captions:
        rows = [{"file_name": f"{i:02d}.{ext}", "text": f"image {i}"} for i in range(n)]
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def _text2image(tmp_path, folder, **values):
    base = {
        "pretrained_model_name_or_path": "m",
        "resolution": 32,
        "train_data_dir": str(folder),
        "output_dir": str(tmp_path / "out"),
    }
    return C.build("text2image", "torch", {**base, **values})


def _dreambooth(tmp_path, instance, klass=None, **values):
    base = {
        "pretrained_model_name_or_path": "m",
        "resolution": 32,
        "instance_data_dir": str(instance),
        "instance_prompt": "a photo of sks dog",
        "output_dir": str(tmp_path / "out"),
    }
    if klass is not None:
        base |= {"with_prior_preservation": True, "class_data_dir": str(klass)}
        base |= {"class_prompt": "a photo of dog"}
    return C.build("dreambooth", "torch", {**base, **values})


@pytest.fixture
def decodes(monkeypatch):
    """The paths `verify.check_image` decodes, in call order (threads included)."""
    seen: list[str] = []
    real = verify.check_image

    def counting(path):
        seen.append(path)
        return real(path)

    monkeypatch.setattr(verify, "check_image", counting)
    return seen


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == VERIFY_LOGGER and r.levelno >= 30]


# --- one image ----------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["jpg", "png"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_check_image_finds_truncated_files(tmp_path, ext, keep):
    good = _image(tmp_path / f"good.{ext}", 1, size=256)
    assert verify.check_image(good) is None
    bad = _truncate(_image(tmp_path / f"bad.{ext}", 2, size=256), keep)
    reason = verify.check_image(bad)
    assert reason is not None and "\n" not in reason
    if ext == "jpg":  # the 1/8-scale draft decode still reads the whole stream
        assert "truncated" in reason


def test_check_image_jpeg_missing_only_its_end_marker(tmp_path):
    path = _image(tmp_path / "a.jpg", 3, size=256)
    with open(path, "rb") as f:
        data = f.read()
    assert data.endswith(b"\xff\xd9")
    with open(path, "wb") as f:
        f.write(data[:-2])
    assert "truncated" in verify.check_image(path)


def test_check_images_names_non_images_and_vanished_files(tmp_path):
    fake = tmp_path / "notes.jpg"
    fake.write_text("not a picture")
    good = _image(tmp_path / "ok.png", 0)
    checks = verify.check_images([good, str(fake), str(tmp_path / "gone.png")], workers=2)
    assert (checks.checked, checks.decoded, checks.cached) == (3, 2, 0)
    assert set(checks.bad) == {str(fake), str(tmp_path / "gone.png")}
    assert "not an image file" in checks.bad[str(fake)]
    assert "cannot read the file" in checks.bad[str(tmp_path / "gone.png")]


@pytest.mark.parametrize(
    ("n_bad", "total", "expected"),
    [
        (1, 10, 0.1),
        (1, 3, 0.34),
        (2, 9, 0.23),
        (999, 1000, 0.999),
        (999_999, 10**6, 0.999999),
        (10**7 - 1, 10**7, None),
        (10, 10, None),
    ],
)
def test_fraction_needed(n_bad, total, expected):
    assert verify.fraction_needed(n_bad, total) == expected
    if expected is not None:  # the loader's rule: stop when bad > fraction * total
        assert not n_bad > expected * total


# --- image folders ------------------------------------------------------------------------


def test_bad_file_is_left_out_and_captions_stay_aligned(tmp_path, caplog):
    paths = _folder(tmp_path / "imgs", 10, captions=True)
    _truncate(paths[4])
    cfg = _text2image(tmp_path, tmp_path / "imgs", max_bad_image_fraction=0.2)
    with caplog.at_level(logging.INFO, logger=VERIFY_LOGGER):
        source = build_source(cfg)
    assert len(source) == 9
    assert [r.image.path for r in source] == paths[:4] + paths[5:]
    assert [r.captions for r in source] == [(f"image {i}",) for i in range(10) if i != 4]
    assert "1 unreadable image excluded (9 used)" in source.describe()
    (warning,) = _warnings(caplog)  # listed once, in one warning
    assert paths[4] in warning and "truncated" in warning.lower()


def test_default_fraction_stops_before_any_loader(tmp_path, monkeypatch):
    paths = _folder(tmp_path / "dog", 10)
    _truncate(paths[7])
    made = []
    monkeypatch.setattr(loader.Loader, "__init__", lambda self, *a, **k: made.append(a))
    with pytest.raises(DataError) as info:
        build_source(_dreambooth(tmp_path, tmp_path / "dog"))
    summary, *listed = str(info.value).split("\n")
    assert summary.startswith(f"1 of the 10 images in {tmp_path / 'dog'} (--instance_data_dir)")
    assert "--max_bad_image_fraction=0.05" in summary
    assert "--max_bad_image_fraction 0.1 to train on the other 9" in summary
    assert len(listed) == 1 and paths[7] in listed[0] and "truncated" in listed[0].lower()
    assert made == []
    # The suggested value, and the README's 0.2, both train on the other nine.
    for fraction in (0.1, 0.2):
        cfg = _dreambooth(tmp_path, tmp_path / "dog", max_bad_image_fraction=fraction)
        source = build_source(cfg)
        assert [r.image.path for r in source] == paths[:7] + paths[8:], fraction


def test_a_folder_of_only_bad_images(tmp_path):
    for path in _folder(tmp_path / "imgs", 3, ext="png"):
        _truncate(path)
    with pytest.raises(DataError, match=r"^none of the 3 images in .*imgs \(--train_data_dir\)"):
        build_source(_text2image(tmp_path, tmp_path / "imgs", max_bad_image_fraction=0.9))


def test_verify_false_reads_nothing(tmp_path, decodes):
    paths = _folder(tmp_path / "imgs", 10)
    _truncate(paths[0])
    assert len(build_source(_text2image(tmp_path, tmp_path / "imgs"), verify=False)) == 10
    assert decodes == []
    assert not (tmp_path / "out").exists()


def test_cache_decodes_only_new_or_changed_files(tmp_path, decodes):
    paths = _folder(tmp_path / "imgs", 10)
    _truncate(paths[2])
    cfg = _text2image(tmp_path, tmp_path / "imgs", max_bad_image_fraction=0.2)
    assert len(build_source(cfg)) == 9
    assert sorted(decodes) == paths
    cache = tmp_path / "out" / ".twindiff" / "image-check.json"
    entries = json.loads(cache.read_text())["files"]
    assert entries[paths[0]]["ok"] is True and entries[paths[0]]["mtime_ns"] > 0
    assert entries[paths[2]]["ok"] is False and "truncated" in entries[paths[2]]["reason"].lower()

    decodes.clear()
    assert len(build_source(cfg)) == 9
    assert decodes == [paths[2]]  # bad results are not trusted: a repaired file is noticed
    checks = verify.check_images(paths, cache_file=str(cache))
    assert (checks.checked, checks.decoded, checks.cached) == (10, 1, 9)

    decodes.clear()
    _image(tmp_path / "imgs" / "05.jpg", 50)  # rewritten: new size and mtime
    stat = os.stat(paths[6])
    os.utime(paths[6], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: same size
    _image(tmp_path / "imgs" / "10.jpg", 10)  # a new file
    _truncate(paths[8])  # broken since the last run
    source = build_source(cfg)
    assert sorted(decodes) == sorted(
        [paths[2], paths[5], paths[6], paths[8], paths[8][:-6] + "10.jpg"]
    )
    assert len(source) == 9 and paths[8] not in [r.image.path for r in source]


def test_damaged_cache_warns_once_and_checks_again(tmp_path, decodes, caplog):
    _folder(tmp_path / "imgs", 4)
    cache = tmp_path / "out" / ".twindiff" / "image-check.json"
    cache.parent.mkdir(parents=True)
    cache.write_text('{"version": 1, "files": {"/x": {"ok": tr')
    cfg = _text2image(tmp_path, tmp_path / "imgs")
    assert len(build_source(cfg)) == 4 and len(decodes) == 4
    (warning,) = _warnings(caplog)
    assert str(cache) in warning and "checked again" in warning
    assert len(json.loads(cache.read_text())["files"]) == 4  # rewritten whole


def test_unwritable_cache_never_fails_the_run(tmp_path, decodes, caplog):
    _folder(tmp_path / "imgs", 4)
    (tmp_path / "out").write_text("a file where the output folder should be")
    cfg = _text2image(tmp_path, tmp_path / "imgs")
    for _ in range(2):
        caplog.clear()
        assert len(build_source(cfg)) == 4
        assert len(_warnings(caplog)) == 1  # one per build, for both the read and the write
    assert len(decodes) == 8


def test_max_train_samples_checks_only_the_chosen_images(tmp_path, decodes):
    paths = _folder(tmp_path / "imgs", 10)
    chosen = np.random.default_rng(0).permutation(10)[:4]  # SubsetSource's selection, seed 0
    outside = next(i for i in range(10) if i not in chosen)
    _truncate(paths[outside])
    cfg = _text2image(tmp_path, tmp_path / "imgs", max_train_samples=4, seed=0)
    source = build_source(cfg)
    assert sorted(decodes) == sorted(paths[i] for i in chosen)
    assert [r.image.path for r in source] == [paths[i] for i in chosen]

    _truncate(paths[chosen[1]])
    cfg = _text2image(
        tmp_path, tmp_path / "imgs", max_train_samples=4, seed=0, max_bad_image_fraction=0.3
    )
    source = build_source(cfg)
    assert [r.image.path for r in source] == [paths[i] for i in chosen if i != chosen[1]]
    assert "first 4 after a seeded shuffle; 1 unreadable image excluded (3 used)" in (
        source.describe()
    )


def test_progress_bar_for_more_than_256_images(tmp_path, capsys):
    root = tmp_path / "many"
    root.mkdir()
    tiny = Image.new("RGB", (2, 2), (9, 9, 9))
    for i in range(verify.PROGRESS_MIN_IMAGES + 1):
        tiny.save(root / f"{i:04d}.png")
    source = verify.verify_source(image_folder_source(root), max_bad_fraction=0.05)
    assert len(source) == 257
    assert "257/257" in capsys.readouterr().err
    small = image_folder_source(_folder_root(tmp_path / "few", 3))
    verify.verify_source(small, max_bad_fraction=0.05)
    assert "checking images" not in capsys.readouterr().err


def _folder_root(root, n):
    _folder(root, n, ext="png")
    return root


# --- DreamBooth ---------------------------------------------------------------------------


def test_dreambooth_bad_class_image_keeps_the_cycling(tmp_path, caplog):
    instance = _folder(tmp_path / "instance", 4)
    classes = _folder(tmp_path / "class", 6, ext="png")
    _truncate(classes[3])
    cfg = _dreambooth(tmp_path, tmp_path / "instance", tmp_path / "class")
    with pytest.raises(DataError, match=r"^1 of the 6 images in .*class \(--class_data_dir\)"):
        build_source(cfg)
    cfg = _dreambooth(
        tmp_path, tmp_path / "instance", tmp_path / "class", max_bad_image_fraction=0.2
    )
    source = build_source(cfg)
    kept = classes[:3] + classes[4:]
    assert len(source) == 5  # max(4 instance, 5 readable class images)
    assert [r.image.path for r in source] == [instance[i % 4] for i in range(5)]
    assert [r.extras["class"].path for r in source] == kept
    assert "prior preservation with 5 class images" in source.describe()
    assert "1 unreadable image excluded (9 used)" in source.describe()


def test_dreambooth_fraction_is_per_folder(tmp_path):
    instance = _folder(tmp_path / "instance", 10)
    _folder(tmp_path / "class", 40, ext="png")
    _truncate(instance[0])
    # 1 of 50 images overall is 2%, but 1 of the 10 photos of the subject is 10%.
    cfg = _dreambooth(tmp_path, tmp_path / "instance", tmp_path / "class")
    with pytest.raises(DataError, match=r"^1 of the 10 images in .* \(--instance_data_dir\)"):
        build_source(cfg)


def test_dreambooth_class_images_beyond_num_class_images_are_not_read(tmp_path, decodes):
    _folder(tmp_path / "instance", 2)
    classes = _folder(tmp_path / "class", 5, ext="png")
    _truncate(classes[4])
    cfg = _dreambooth(tmp_path, tmp_path / "instance", tmp_path / "class", num_class_images=3)
    source = build_source(cfg)
    assert [r.extras["class"].path for r in source] == classes[:3]
    assert classes[4] not in decodes and len(decodes) == 5
