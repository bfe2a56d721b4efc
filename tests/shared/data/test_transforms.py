"""shared.data.transforms against hand-computed references (torchvision's rules, PIL's modes)."""

import io
import logging

import numpy as np
import pytest
from PIL import Image, ImageFile

from shared.data import transforms
from shared.data.records import BadImageError, ImageRef
from shared.data.transforms import (
    ImageTransform,
    center_crop,
    center_crop_offsets,
    interpolation_filter,
    load_image,
    load_image_float,
    maybe_flip,
    normalize,
    random_crop_offsets,
    resize_shorter_side,
    resized_shorter_side_size,
)


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def ref(img: Image.Image, fmt: str = "PNG", name: str = "test.img", **kwargs) -> ImageRef:
    return ImageRef(name, data=encode(img, fmt, **kwargs))


def rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def grey3(values) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.uint8)[..., None], 3, axis=-1)


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(transforms, "_warned", set())


# -- modes ----------------------------------------------------------------------------------------


def test_l_and_1_become_grey_rgb():
    assert np.array_equal(rgb(load_image(ref(Image.new("L", (2, 1), 77)))), grey3([[77, 77]]))
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    assert np.array_equal(rgb(load_image(ref(bilevel))), grey3([[0, 255]]))


def test_alpha_is_dropped_without_compositing():
    # diffusers' image.convert("RGB"): a fully transparent pixel keeps its colour.
    assert np.array_equal(rgb(load_image(ref(Image.new("LA", (1, 1), (77, 0))))), grey3([[77]]))
    out = rgb(load_image(ref(Image.new("RGBA", (1, 1), (10, 20, 30, 0)))))
    assert out.tolist() == [[[10, 20, 30]]]


def palette_image(transparency: int | None) -> Image.Image:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 200, 50] + [0] * 762)
    img.putpixel((1, 0), 1)
    if transparency is not None:
        img.info["transparency"] = transparency
    return img


@pytest.mark.parametrize("transparency", [None, 1])
def test_palette_with_and_without_transparency(transparency):
    data = encode(palette_image(transparency))
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P" and ("transparency" in opened.info) == (transparency is not None)
    out = rgb(load_image(ImageRef("p.png", data=data)))
    assert out.tolist() == [[[255, 0, 0], [0, 200, 50]]]


def test_cmyk_uses_pils_conversion():
    img = Image.new("CMYK", (2, 1))
    img.putpixel((0, 0), (0, 255, 0, 0))
    img.putpixel((1, 0), (128, 0, 0, 128))
    # R = (255 - C) * (255 - K) / 255: 127 * 127 / 255 = 63.25 -> 63.
    assert rgb(load_image(ref(img, "TIFF"))).tolist() == [[[255, 0, 255], [63, 127, 127]]]


SIXTEEN_BIT = [0, 128, 129, 257, 385, 386, 1000, 65535]
SIXTEEN_BIT_TO_8 = [0, 0, 1, 1, 1, 2, 4, 255]  # round(x / 257), not PIL's clip at 255


@pytest.mark.parametrize(
    ("dtype", "fmt", "mode"),
    [("<u2", "PNG", "I;16"), (">u2", "TIFF", "I;16B"), ("<i4", "TIFF", "I")],
)
def test_sixteen_bit_is_scaled_not_clipped(dtype, fmt, mode):
    data = encode(Image.fromarray(np.array([SIXTEEN_BIT], dtype=dtype)), fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    out = rgb(load_image(ImageRef("deep.img", data=data)))
    assert np.array_equal(out, grey3([SIXTEEN_BIT_TO_8]))
    # PIL's own convert would saturate: 1000 -> 255.
    assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[0, 6, 0] == 255


def test_float_images_are_taken_in_0_1():
    data = encode(Image.fromarray(np.array([[0.0, 0.5, 1.0, 1.5, -0.2]], np.float32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    out = rgb(load_image(ImageRef("f.tif", data=data)))
    assert np.array_equal(out, grey3([[0, 128, 255, 255, 0]]))  # rint(127.5) = 128


def test_array_refs():
    grey16 = np.array([[0, 1000, 65535]], np.uint16)
    assert np.array_equal(rgb(load_image(ImageRef("a", array=grey16))), grey3([[0, 4, 255]]))
    rgba = np.array([[[1, 2, 3, 0]]], np.uint8)
    assert rgb(load_image(ImageRef("b", array=rgba))).tolist() == [[[1, 2, 3]]]
    floats = np.array([[[0.0, 0.5, 1.0]]], np.float64)
    assert rgb(load_image(ImageRef("c", array=floats))).tolist() == [[[0, 128, 255]]]
    with pytest.raises(BadImageError, match="zero-size"):
        load_image(ImageRef("empty", array=np.zeros((0, 4, 3), np.uint8)))
    with pytest.raises(BadImageError, match="dtype"):
        load_image(ImageRef("weird", array=np.zeros((2, 2), np.int64)))


def test_high_precision_keeps_sixteen_bits():
    values = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16
    data = encode(Image.fromarray(values))
    out = load_image_float(ImageRef("deep.png", data=data))
    assert out.dtype == np.float32 and out.shape == (64, 64, 3)
    expected = (values / 65535.0).astype(np.float32)
    assert np.array_equal(out, np.repeat(expected[..., None], 3, axis=-1))
    # Through the whole pipeline (no resize needed): all 4096 levels survive, not 256.
    t = ImageTransform(64, center_crop=True, preserve_input_precision=True)
    x = t(ImageRef("deep.png", data=data), np.random.default_rng(0))
    assert x.dtype == np.float32 and np.array_equal(x[..., 0], expected)
    assert len(np.unique(x)) == 4096


def test_high_precision_eight_bit_and_channels():
    img = Image.new("RGBA", (1, 1), (51, 102, 255, 0))
    assert np.allclose(load_image_float(ref(img)), [[[0.2, 0.4, 1.0]]])
    la = np.array([[[0.25, 0.9]]], np.float32)  # grey + alpha: grey repeated, alpha dropped
    assert np.array_equal(load_image_float(ImageRef("la", array=la)), [[[0.25, 0.25, 0.25]]])
    rgb16 = np.array([[[0, 32768, 65535]]], np.uint16)
    assert np.allclose(load_image_float(ImageRef("rgb16", array=rgb16)), [[[0, 32768 / 65535, 1]]])


def test_high_precision_resize_stays_in_range():
    # A hard edge makes lanczos overshoot below 0 and above 1; the output is clipped.
    values = np.zeros((60, 45), np.uint16)
    values[:, 20:] = 65535
    values[30:, :] = np.arange(45, dtype=np.uint16) * 1000
    t = ImageTransform(32, center_crop=True, interpolation="lanczos", preserve_input_precision=True)
    x = t(ImageRef("edge.png", data=encode(Image.fromarray(values))), np.random.default_rng(0))
    assert x.shape == (32, 32, 3) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    off_8bit_grid = np.abs(x * 255 - np.rint(x * 255)) > 0.01
    assert off_8bit_grid.mean() > 0.5  # an 8-bit pipeline would put every value on k / 255


# -- EXIF and broken files ------------------------------------------------------------------------


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (4, 2), (0, 0, 255))
    img.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: display rotated 90 degrees clockwise
    out = rgb(load_image(ref(img, exif=exif.tobytes())))
    assert out.shape == (4, 2, 3)  # (H, W, 3): now 2 wide, 4 tall
    assert out[0, 1].tolist() == [255, 0, 0]  # the top-left pixel went to the top-right
    plain = rgb(load_image(ref(img)))
    assert plain.shape == (2, 4, 3) and plain[0, 0].tolist() == [255, 0, 0]


def noise_image(size=(64, 48)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), np.uint8))


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("cut.jpg", encode(noise_image(), "JPEG", quality=90)[:3000]),  # of ~3400 bytes
        ("cut.png", encode(noise_image())[:2000]),  # of ~9300
        ("noise.bin", np.random.default_rng(1).integers(0, 256, 500, np.uint8).tobytes()),
        ("empty.jpg", b""),
    ],
)
def test_broken_files_raise_bad_image_error(name, data):
    with pytest.raises(BadImageError) as info:
        load_image(ImageRef(name, data=data))
    assert info.value.name == name and name in str(info.value)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_broken_file_on_disk_and_missing_path(tmp_path):
    path = tmp_path / "half.jpg"
    data = encode(noise_image(), "JPEG")
    path.write_bytes(data[: len(data) // 2])
    for p in (path, tmp_path / "missing.png"):
        with pytest.raises(BadImageError, match=p.name):
            load_image(ImageRef(str(p), path=str(p)))
    with pytest.raises(BadImageError, match=path.name):
        ImageTransform(8)(ImageRef(str(path), path=str(path)), np.random.default_rng(0))


# -- geometry ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "target", "expected"),
    [
        ((300, 451), 512, (512, 769)),  # 512 * 451 / 300 = 769.71 -> int() truncates to 769
        ((451, 300), 512, (769, 512)),
        ((640, 427), 512, (767, 512)),  # 767.45
        ((1000, 1000), 512, (512, 512)),
        ((7, 3), 5, (11, 5)),  # 11.67 -> 11
    ],
)
def test_resize_size_rule(size, target, expected):
    assert resized_shorter_side_size(*size, target) == expected
    assert resize_shorter_side(Image.new("RGB", size), target).size == expected


def test_resize_is_a_no_op_at_the_right_size():
    img = Image.new("RGB", (512, 700))
    assert resize_shorter_side(img, 512, "lanczos") is img


@pytest.mark.parametrize(
    ("height", "width", "crop", "expected"),
    [
        ((769, 512, 512, (128, 0))),  # 257 / 2 = 128.5 rounds half to even -> 128
        ((771, 512, 512, (130, 0))),  # 129.5 -> 130
        ((512, 767, 512, (0, 128))),  # 127.5 -> 128
        ((10, 9, 4, (3, 2))),  # 3.0, 2.5 -> 2
        ((5, 5, 5, (0, 0))),
    ],
)
def test_center_crop_offsets_match_torchvision(height, width, crop, expected):
    assert center_crop_offsets(height, width, crop) == expected
    x = np.arange(height * width).reshape(height, width, 1)
    top, left = expected
    assert np.array_equal(center_crop(x, crop), x[top : top + crop, left : left + crop])


def test_crop_larger_than_image_is_an_error():
    with pytest.raises(ValueError, match="larger"):
        center_crop_offsets(4, 8, 5)


def test_random_crop_and_flip_are_deterministic_per_seed():
    offsets = [random_crop_offsets(10, 7, 5, np.random.default_rng(s)) for s in range(200)]
    assert offsets == [random_crop_offsets(10, 7, 5, np.random.default_rng(s)) for s in range(200)]
    assert {t for t, _ in offsets} == set(range(6)) and {left for _, left in offsets} == {0, 1, 2}
    x = np.arange(12).reshape(2, 6, 1)
    flips = [maybe_flip(x, np.random.default_rng(s))[0, 0, 0] == 5 for s in range(200)]
    assert 60 < sum(flips) < 140
    for s in range(20):
        a = maybe_flip(x, np.random.default_rng(s))
        assert np.array_equal(a, x[:, ::-1] if flips[s] else x)


def test_pipeline_matches_hand_steps():
    img = noise_image((13, 9))
    data = ImageRef("n.png", data=encode(img))
    t = ImageTransform(6, random_flip=True, interpolation="bicubic")
    out = t(data, np.random.default_rng(5))
    # By hand: resize 13x9 -> (int(6 * 13 / 9), 6) = (8, 6); crop top, left; flip.
    rng = np.random.default_rng(5)
    resized = np.asarray(img.resize((8, 6), Image.Resampling.BICUBIC))
    top, left = int(rng.integers(0, 1)), int(rng.integers(0, 3))
    expected = resized[top : top + 6, left : left + 6]
    if rng.random() < 0.5:
        expected = expected[:, ::-1]
    assert out.dtype == np.uint8 and out.shape == (6, 6, 3)
    assert np.array_equal(out, expected)
    centred = ImageTransform(6, center_crop=True, interpolation="bicubic")(data, rng)
    assert np.array_equal(centred, resized[:, 1:7])  # round(2 / 2) = 1


def test_one_channel_gives_pils_grey_after_the_same_crop_and_flip():
    img = noise_image((13, 9))
    data = ImageRef("n.png", data=encode(img))
    rgb_out = ImageTransform(6, random_flip=True)(data, np.random.default_rng(5))
    grey_out = ImageTransform(6, random_flip=True, channels=1)(data, np.random.default_rng(5))
    assert grey_out.shape == (6, 6, 1) and grey_out.dtype == np.uint8
    # Same draws, same geometry: the grey image is the luma of the resized RGB one, to rounding
    # (PIL converts before resizing here, after in the RGB path).
    luma = rgb_out.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(grey_out[..., 0] - luma).max() <= 2.0
    precise = ImageTransform(6, random_flip=True, channels=1, preserve_input_precision=True)
    out = precise(data, np.random.default_rng(5))
    assert out.shape == (6, 6, 1) and out.dtype == np.float32
    assert np.abs(out[..., 0] * 255 - luma).max() <= 2.0
    with pytest.raises(ValueError, match="channels must be 1"):
        ImageTransform(6, channels=4)


def test_upscale_warns_once_naming_the_first_image(caplog, fresh_warnings):
    t = ImageTransform(32)
    small = [ImageRef(f"small{i}.png", data=encode(noise_image((20, 16)))) for i in range(3)]
    large = ImageRef("large.png", data=encode(noise_image((40, 40))))
    with caplog.at_level(logging.WARNING, logger="shared.data.transforms"):
        t(large, np.random.default_rng(0))
        assert not caplog.records
        for r in small:
            assert t(r, np.random.default_rng(0)).shape == (32, 32, 3)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "small0.png" in message and "32" in message and "small1" not in message


# -- interpolation, normalize ---------------------------------------------------------------------


def test_interpolation_names():
    assert interpolation_filter("bilinear") == Image.Resampling.BILINEAR
    assert interpolation_filter("LANCZOS") == Image.Resampling.LANCZOS
    assert interpolation_filter("nearest_exact") == interpolation_filter("nearest")
    with pytest.raises(ValueError) as info:
        interpolation_filter("cubic")
    for name in ("nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos"):
        assert name in str(info.value)
    assert "--image_interpolation_mode" in str(info.value)
    with pytest.raises(ValueError, match="bilinear"):
        ImageTransform(8, interpolation="trilinear")


def test_nearest_samples_pixel_centres():
    # torch's "nearest-exact" upscaling 2 -> 3 reads floor((i + 0.5) * 2 / 3) = 0, 1, 1; the
    # legacy "nearest" would read floor(i * 2 / 3) = 0, 0, 1.
    img = Image.fromarray(np.array([[0, 255]], np.uint8))
    assert np.asarray(img.resize((3, 1), interpolation_filter("nearest_exact"))).tolist() == [
        [0, 255, 255]
    ]


def test_modes_differ():
    img = noise_image((40, 30))
    outs = {m: np.asarray(resize_shorter_side(img, 12, m)) for m in transforms.INTERPOLATION_MODES}
    distinct = {outs[m].tobytes() for m in outs}
    assert len(distinct) == len(outs) - 1  # only nearest and nearest_exact agree


def test_normalize():
    x = normalize(np.array([0, 128, 255], np.uint8))
    assert x.dtype == np.float32
    assert np.allclose(x, [-1.0, 128 / 127.5 - 1.0, 1.0], atol=1e-7)
    y = normalize(np.array([0.0, 0.25, 1.0], np.float32))
    assert y.dtype == np.float32 and np.array_equal(y, [-1.0, -0.5, 1.0])
    with pytest.raises(TypeError):
        normalize(np.array([1], np.int16))


def test_resolution_is_validated():
    with pytest.raises(ValueError):
        ImageTransform(0)
    with pytest.raises(TypeError):
        ImageTransform(8.0)
