"""Images -> the encoder's input (B, 3, H, W) float32, in Pillow and NumPy: the same numbers as the torch path
(`model/encoder.py image_transform`: torchvision v2 ToImage, Resize with antialias, CenterCrop, ToDtype, Normalize).

Resizing is where the two could differ. torchvision resizes a uint8 image with torch's own uint8 kernel
(`_upsample_bicubic2d_aa` / `_upsample_bilinear2d_aa` on uint8, aten/src/ATen/native/cpu/UpSampleKernel.cpp):
Pillow's filters (support scaled by the reduction, Keys cubic a = -0.5) with the weights normalised in double, then
rounded to int16 at the largest precision the axis's biggest weight allows, each output an integer dot product
plus half an LSB, shifted and clamped to 0..255; the width first, then the height, each pass rounded to uint8.
Pillow's own resize computes the same filter with 22-bit int32 weights (and rounds them differently), so it lands
1 grey level off on 0.002-0.5% of the values. `resize_uint8` below computes torch's weights and integer sums
exactly, so the crops are bit-identical (tests/test_lite.py); the scaling and normalisation repeat torch's float32
operations, so the encoder input is too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .images import to_rgb

FILTERS = ("bicubic", "bilinear")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the encoder's input (model.json's "preprocessing")."""

    crop: int = 224  # the square the encoder takes
    resize: str = "crop"  # crop: short side to `short`, then the centre crop; squash: the whole image to crop x crop
    short: int = 256  # the short side before the centre crop (crop only)
    interpolation: str = "bicubic"  # bicubic | bilinear, antialiased
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.resize not in ("crop", "squash") or self.interpolation not in FILTERS or min(self.crop, self.short) < 1:
            raise ValueError(f"bad preprocessing settings: {self}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(int(d["crop"]), str(d["resize"]), int(d["short"]), str(d["interpolation"]),
                   tuple(float(x) for x in d["mean"]), tuple(float(x) for x in d["std"]))  # type: ignore[arg-type]


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution, a = -0.5 (Pillow's and torch's antialiased bicubic), in float64."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTER: dict[str, tuple[Callable[[np.ndarray], np.ndarray], int]] = {"bicubic": (_keys_cubic, 4),
                                                                       "bilinear": (_triangle, 2)}


def axis_weights(in_size: int, out_size: int, interpolation: str) -> tuple[np.ndarray, np.ndarray, int]:
    """One axis of torch's uint8 antialiased resize: per output index the first input index (out,), the integer
    weights (out, taps) (zero past each index's own taps) and their precision in bits. Every float operation is
    torch's, in its order (HelperInterpBase::_compute_indices_min_size_weights_aa, _compute_index_ranges_int16_weights)."""
    fn, interp = _FILTER[interpolation]
    scale = in_size / out_size
    support = interp * 0.5 * scale if scale >= 1.0 else interp * 0.5
    taps = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    i = np.arange(out_size, dtype=np.float64)
    center = scale * (i + 0.5)
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # static_cast<int64_t>: toward zero
    count = np.clip(np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first, 0, taps)
    j = np.arange(taps)
    inside = j[None, :] < count[:, None]
    w = np.where(inside, fn(((j[None, :] + first[:, None]) - center[:, None] + 0.5) * invscale), 0.0)
    total = np.zeros(out_size)
    for k in range(taps):  # summed tap by tap, as the C++ loop does (np.sum would pair them differently)
        total += w[:, k]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    normalised = w[total != 0.0]
    top = float(normalised.max()) if normalised.size else 0.0  # wt_max: over the rows torch normalised
    precision = 0
    while precision < 22 and int(0.5 + top * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = w * (1 << precision)
    weights = np.where(v < 0, np.trunc(-0.5 + v), np.trunc(0.5 + v)).astype(np.int32)
    return first, weights, precision


def _pass(pixels: np.ndarray, axis: int, out_size: int, interpolation: str,
          keep: tuple[int, int] | None = None) -> np.ndarray:
    """Resize uint8 `pixels` (H, W, C) along `axis` (1: width, 0: height) to out_size; uint8 out. keep=(a, b): only
    output indices a..b-1 (each output index depends on its own weights alone: the same values, less work)."""
    in_size = pixels.shape[axis]
    first, weights, precision = axis_weights(in_size, out_size, interpolation)
    if keep is not None:
        first, weights = first[keep[0]:keep[1]], weights[keep[0]:keep[1]]
        out_size = len(first)
    src = np.ascontiguousarray(np.moveaxis(pixels, axis, 0))  # the resized axis first, contiguous: (in, other, C)
    acc = np.full((out_size,) + src.shape[1:], 1 << (precision - 1), dtype=np.int32)
    term = np.empty_like(acc)
    for k in range(weights.shape[1]):
        w = weights[:, k]
        if not w.any():
            continue
        idx = np.minimum(first + k, in_size - 1)  # past an index's taps the weight is 0: any row will do
        np.multiply(src[idx], w.reshape((-1,) + (1,) * (src.ndim - 1)), out=term, casting="unsafe")
        acc += term
    out = np.clip(acc >> precision, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def resize_uint8(pixels: np.ndarray, height: int, width: int, interpolation: str = "bicubic") -> np.ndarray:
    """uint8 (H, W, C) -> (height, width, C), antialiased, bit-identical to torch's uint8 kernel: width first."""
    if interpolation not in FILTERS:
        raise ValueError(f"interpolation must be one of {FILTERS}, not {interpolation!r}")
    if pixels.shape[1] != width:
        pixels = _pass(pixels, 1, width, interpolation)
    if pixels.shape[0] != height:
        pixels = _pass(pixels, 0, height, interpolation)
    return pixels


def resized_size(height: int, width: int, spec: Preprocessing) -> tuple[int, int]:
    """(height, width) after the resize (torchvision's _compute_resized_output_size)."""
    if spec.resize == "squash":
        return spec.crop, spec.crop
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = spec.short, int(spec.short * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """torchvision's CenterCrop on (H, W, C): zero padding where the image is smaller, anchors by round()."""
    h, w = pixels.shape[:2]
    if size > h or size > w:
        top, left = max(size - h, 0) // 2, max(size - w, 0) // 2
        bottom, right = max(size - h + 1, 0) // 2, max(size - w + 1, 0) // 2
        pixels = np.pad(pixels, ((top, bottom), (left, right), (0, 0)))
        h, w = pixels.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return pixels[top:top + size, left:left + size]


def crop_uint8(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """One image (any mode: to_rgb first) -> its resized and cropped uint8 pixels (crop, crop, 3)."""
    if image.mode != "RGB":
        image = to_rgb(image)
    w, h = image.size
    height, width = resized_size(h, w, spec)
    if spec.crop > height or spec.crop > width:  # the crop pads: resize it all, then pad (center_crop)
        return center_crop(resize_uint8(np.asarray(image, dtype=np.uint8), height, width, spec.interpolation), spec.crop)
    top, left = int(round((height - spec.crop) / 2.0)), int(round((width - spec.crop) / 2.0))  # center_crop's anchors
    # Only the crop's columns and rows are computed, width first as torch does; the image is transposed by Pillow
    # (fast) so that the width pass runs along the first axis, where its gathers are contiguous rows.
    cols = np.asarray(image.transpose(Image.Transpose.TRANSPOSE), dtype=np.uint8)  # (W, H, 3)
    cols = _pass(cols, 0, width, spec.interpolation, (left, left + spec.crop)) if w != width \
        else cols[left:left + spec.crop]
    rows = _pass(cols, 1, height, spec.interpolation, (top, top + spec.crop)) if h != height \
        else cols[:, top:top + spec.crop]
    return np.ascontiguousarray(rows.transpose(1, 0, 2))  # (crop, crop, 3)


def normalise(crops: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W): torchvision's ToDtype(scale=True) then Normalize, in float32."""
    x = crops.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1.0 / 255)
    mean = np.asarray(spec.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - mean) / std)


def preprocess(images: Sequence[Image.Image], spec: Preprocessing) -> np.ndarray:
    """PIL images -> the encoder's input batch (B, 3, crop, crop) float32."""
    if not images:
        return np.zeros((0, 3, spec.crop, spec.crop), np.float32)
    return normalise(np.stack([crop_uint8(im, spec) for im in images]), spec)
