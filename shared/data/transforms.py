"""Image decoding and the train-time pipeline, on PIL and numpy.

The pipeline is diffusers' torchvision one (`train_unconditional.py`, `train_text_to_image.py`,
`train_dreambooth.py`): ``Resize(resolution)`` -> ``CenterCrop`` or ``RandomCrop`` ->
``RandomHorizontalFlip``, then ``Normalize([0.5], [0.5])``. Every size and offset rule below is
torchvision's on PIL images, so a parity test can feed the same picture to both. The randomness
comes from a numpy ``Generator`` that the loader seeds per sample, not from torch's global RNG.

Images leave this module as uint8 (H, W, 3), or float32 in [0, 1] with
``preserve_input_precision``; ``normalize`` maps them to [-1, 1] (the backends do that on device).
"""

from __future__ import annotations

import dataclasses
import io
import logging

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.data.records import BadImageError, ImageRef

logger = logging.getLogger(__name__)

# Lower-cased torchvision `InterpolationMode` names (diffusers' `--image_interpolation_mode`) ->
# PIL filters, as torchvision's `pil_modes_mapping` has them. "nearest_exact" is PIL's NEAREST
# too: PIL's nearest filter already samples source pixel floor((x + 0.5) * scale), the
# pixel-centre rule that torch calls "nearest-exact"; the off-by-half legacy "nearest" exists only
# in torch's tensor interpolate, so on PIL inputs torchvision gives both names the same result.
INTERPOLATION_MODES: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

# Keys of the warnings already given in this process (see `warn_once`).
_warned: set[str] = set()


def warn_once(key: str, message: str) -> bool:
    """Logs `message` as a warning unless one with the same `key` was logged in this process.

    Returns whether it was logged. The loader also routes its workers' once-warnings through
    here, so a run shows each of them once, not once per worker.
    """
    if key in _warned:
        return False
    _warned.add(key)
    logger.warning(message, extra={"warn_once_key": key})
    return True


def interpolation_filter(name: str) -> Image.Resampling:
    """The PIL filter for a torchvision interpolation name (case-insensitive)."""
    try:
        return INTERPOLATION_MODES[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown --image_interpolation_mode {name!r}; valid modes: "
            + ", ".join(INTERPOLATION_MODES)
        ) from None


# ---------------------------------------------------------------------------------------------
# Decoding


def _decode(ref: ImageRef) -> Image.Image:
    """Opens a path or bytes ref, decodes every pixel, applies EXIF orientation. Native mode."""
    img = None
    try:
        img = Image.open(ref.path if ref.path is not None else io.BytesIO(ref.data))
        # Image.open only reads the header; load() decodes everything, so a truncated file fails
        # here rather than as a half-grey picture. ImageFile.LOAD_TRUNCATED_IMAGES stays off.
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        if getattr(img, "fp", None) is not None:  # multi-frame files keep theirs open
            frame = img.copy()
            img.close()
            img = frame
    except MemoryError:
        raise
    except Exception as e:
        if img is not None:
            img.close()
        reason = f"{type(e).__name__}: {e}"
        if isinstance(e, UnidentifiedImageError):  # its message shows a BytesIO's repr
            reason = "not an image file PIL can identify (corrupt, or not an image)"
        raise BadImageError(ref.name, reason) from e
    if img.width == 0 or img.height == 0:
        raise BadImageError(ref.name, f"zero-size image ({img.width}x{img.height})")
    return img


def _array_channels(ref: ImageRef) -> tuple[np.ndarray, float]:
    """A decoded array ref as (H, W, C) plus the value of full white for its dtype."""
    arr = np.asarray(ref.array)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise BadImageError(ref.name, f"array of shape {arr.shape} is not (H, W[, 1|2|3|4])")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise BadImageError(ref.name, f"zero-size image ({arr.shape[1]}x{arr.shape[0]})")
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8), 1.0
    if arr.dtype == np.uint8:
        return arr, 255.0
    if arr.dtype == np.uint16:
        return arr, 65535.0
    if arr.dtype.kind == "f":
        return arr, 1.0  # float images are in [0, 1], torchvision's convention
    raise BadImageError(ref.name, f"unsupported array dtype {arr.dtype}")


def _to_rgb_channels(arr: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (H, W, 3): grey repeated, alpha (2nd or 4th channel) dropped."""
    if arr.shape[2] in (1, 2):
        return np.repeat(arr[:, :, :1], 3, axis=2)
    return arr[:, :, :3]


def _sixteen_bit_values(img: Image.Image) -> np.ndarray:
    """16-bit grey modes as a float64 (H, W) array in [0, 65535].

    Mode "I" (32-bit int) is how PIL loads 16-bit PNG/TIFF data in some versions, so its values
    are taken as 16-bit too (clipped to that range).
    """
    return np.clip(np.asarray(img).astype(np.float64), 0, 65535)


def load_image(ref: ImageRef) -> Image.Image:
    """Decodes `ref` into an 8-bit RGB PIL image.

    Alpha is dropped without compositing and CMYK uses PIL's conversion, both as diffusers'
    ``image.convert("RGB")`` does. 16-bit grey (I;16, I;16B, I) is scaled by 1/257 with rounding,
    not clipped at 255 as PIL's own ``convert`` does; float ("F") images are taken to be in [0, 1].

    Raises:
      BadImageError: the image cannot be decoded (corrupt, truncated, not an image, zero-size).
    """
    if ref.array is not None:
        arr, white = _array_channels(ref)
        if white != 255.0:
            arr = np.rint(np.clip(arr.astype(np.float64) * (255.0 / white), 0, 255))
        return Image.fromarray(np.ascontiguousarray(_to_rgb_channels(arr.astype(np.uint8))))
    return _pil_to_rgb(_decode(ref), ref.name)


def _pil_to_rgb(img: Image.Image, name: str) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        # round(x / 257) in integers; 257 is odd, so there are no ties.
        grey = ((_sixteen_bit_values(img).astype(np.uint32) + 128) // 257).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    if img.mode == "F":
        grey = np.rint(np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0) * 255.0)
        return Image.fromarray(np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2))
    if img.mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")  # resolves palette transparency without PIL's warning
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadImageError(name, f"cannot convert mode {img.mode} to RGB: {e}") from e


def load_image_float(ref: ImageRef) -> np.ndarray:
    """Decodes `ref` keeping its precision: float32 (H, W, 3) in [0, 1].

    diffusers' ``--preserve_input_precision``: 16-bit images keep all 16 bits (x / 65535)
    instead of going through 8-bit RGB; grey is repeated to 3 channels, alpha is dropped.
    8-bit images come out as x / 255.

    Raises:
      BadImageError: as `load_image`.
    """
    if ref.array is not None:
        arr, white = _array_channels(ref)
        out = _to_rgb_channels(arr).astype(np.float64) / white
    else:
        img = _decode(ref)
        if img.mode in _SIXTEEN_BIT_MODES:
            grey = _sixteen_bit_values(img) / 65535.0
        elif img.mode == "F":
            grey = np.asarray(img, dtype=np.float64)
        else:
            rgb = np.asarray(_pil_to_rgb(img, ref.name), dtype=np.float32)
            return rgb / np.float32(255.0)
        out = np.repeat(grey[:, :, None], 3, axis=2)
    return np.ascontiguousarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Geometry (torchvision's rules)


def resized_shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(size)``: short side -> size, long side ->
    ``int(size * long / short)`` (truncated, not rounded)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def resize_shorter_side(
    img: Image.Image, size: int, interpolation: str = "bilinear"
) -> Image.Image:
    """torchvision's ``Resize(size, interpolation)`` on a PIL image (returned as is if no-op)."""
    new_size = resized_shorter_side_size(img.width, img.height, size)
    if new_size == img.size:
        return img
    return img.resize(new_size, interpolation_filter(interpolation))


def center_crop_offsets(height: int, width: int, crop: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``CenterCrop(crop)``: ``int(round((h - crop) / 2.0))``.

    Python's round halves to even, so an odd margin of 257 gives 128 and one of 259 gives 130.
    """
    if crop > height or crop > width:
        raise ValueError(f"crop {crop} larger than image {width}x{height}")
    return round((height - crop) / 2.0), round((width - crop) / 2.0)


def random_crop_offsets(
    height: int, width: int, crop: int, rng: np.random.Generator
) -> tuple[int, int]:
    """(top, left) of a ``RandomCrop(crop)``: each uniform over its valid range, top drawn first."""
    if crop > height or crop > width:
        raise ValueError(f"crop {crop} larger than image {width}x{height}")
    top = int(rng.integers(0, height - crop + 1))
    left = int(rng.integers(0, width - crop + 1))
    return top, left


def center_crop(x: np.ndarray, crop: int) -> np.ndarray:
    """Centre square crop of an (H, W, C) array, torchvision's offsets."""
    top, left = center_crop_offsets(x.shape[0], x.shape[1], crop)
    return x[top : top + crop, left : left + crop]


def random_crop(x: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """Random square crop of an (H, W, C) array; offsets from `rng`."""
    top, left = random_crop_offsets(x.shape[0], x.shape[1], crop, rng)
    return x[top : top + crop, left : left + crop]


def maybe_flip(x: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Horizontal flip of an (H, W, C) array with probability `p` (one draw from `rng`)."""
    return x[:, ::-1] if rng.random() < p else x


def _resize_float(x: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """`resize_shorter_side` for a float (H, W, 3) array: each channel as a PIL "F" image."""
    height, width = x.shape[:2]
    new_size = resized_shorter_side_size(width, height, size)
    if new_size == (width, height):
        return x
    resample = interpolation_filter(interpolation)
    planes = [
        np.asarray(Image.fromarray(np.ascontiguousarray(x[:, :, c])).resize(new_size, resample))
        for c in range(x.shape[2])
    ]
    return np.stack(planes, axis=2)


# ---------------------------------------------------------------------------------------------
# The pipeline

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # PIL's "L" weights (ITU-R 601-2)


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """load -> resize shorter side -> crop (centre or random) -> optional random flip.

    Attributes:
      resolution: output side; images are square (resolution, resolution).
      center_crop: centre crop (diffusers ``--center_crop``); else random crop.
      random_flip: horizontal flip with p=0.5 (diffusers ``--random_flip``).
      interpolation: a name of `INTERPOLATION_MODES` (``--image_interpolation_mode``).
      preserve_input_precision: output float32 in [0, 1] keeping 16-bit precision.
      channels: 3 (RGB) or 1 (grey, ITU-R 601-2 luma as PIL's ``convert("L")``), for a
        pixel-space UNet whose ``in_channels`` is 1.

    Randomness is drawn from the generator passed to `__call__` in a fixed order: crop top, crop
    left (random crop only), then the flip (random_flip only).
    """

    resolution: int
    center_crop: bool = dataclasses.field(default=False, kw_only=True)
    random_flip: bool = dataclasses.field(default=False, kw_only=True)
    interpolation: str = dataclasses.field(default="bilinear", kw_only=True)
    preserve_input_precision: bool = dataclasses.field(default=False, kw_only=True)
    channels: int = dataclasses.field(default=3, kw_only=True)

    def __post_init__(self):
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int):
            raise TypeError(f"resolution must be an int, got {self.resolution!r}")
        if self.resolution <= 0:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {self.channels!r}")
        interpolation_filter(self.interpolation)  # fail at construction, not in a worker

    def __call__(self, ref: ImageRef, rng: np.random.Generator) -> np.ndarray:
        """Returns uint8 (R, R, C), or float32 (R, R, C) in [0, 1] with preserve_input_precision.

        Raises:
          BadImageError: the image cannot be decoded.
        """
        size = self.resolution
        if self.preserve_input_precision:
            x = load_image_float(ref)
            self._warn_if_small(ref, x.shape[1], x.shape[0])
            if self.channels == 1:
                x = (x @ _LUMA)[:, :, None]
            x = np.clip(_resize_float(x, size, self.interpolation), 0.0, 1.0)
        else:
            img = load_image(ref)
            self._warn_if_small(ref, img.width, img.height)
            if self.channels == 1:
                img = img.convert("L")
            x = np.asarray(resize_shorter_side(img, size, self.interpolation))
            if x.ndim == 2:
                x = x[:, :, None]
        x = center_crop(x, size) if self.center_crop else random_crop(x, size, rng)
        if self.random_flip:
            x = maybe_flip(x, rng)
        return np.ascontiguousarray(x)

    def _warn_if_small(self, ref: ImageRef, width: int, height: int) -> None:
        if min(width, height) < self.resolution:
            warn_once(
                "upscale",
                f"image {ref.name} is {width}x{height}, smaller than --resolution="
                f"{self.resolution} on its short side, so it is upscaled; so will any other such "
                "image be (this warning is shown once)",
            )


def normalize(x: np.ndarray) -> np.ndarray:
    """Pixels -> float32 in [-1, 1], the ``Normalize([0.5], [0.5])`` step (backends do it on
    device; this is the reference). uint8: x / 127.5 - 1; float in [0, 1]: 2x - 1."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    if x.dtype.kind == "f":
        return x.astype(np.float32) * np.float32(2.0) - np.float32(1.0)
    raise TypeError(f"normalize expects uint8 or float pixels, got {x.dtype}")
