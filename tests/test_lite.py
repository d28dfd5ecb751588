"""The torch-free inference core (issue 26 phase 1, captioner/lite/): its preprocessing gives the torch transform's
numbers bit for bit, its NumPy search the torch search's hypotheses, a model bundle (`captioner export-onnx`) runs in
LiteCaptioner with the torch captioner's captions, and all of it works where `import torch` fails. Small inputs, one
thread, behaviour only."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.lite.images import to_rgb
from captioner.lite.preprocess import Preprocessing, axis_weights, preprocess, resize_uint8
from captioner.model.encoder import image_transform, preprocessing

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(glob.glob(str(ROOT / "captioner" / "assets" / "examples" / "*.jpg")))


# ------------------------------------------------------------------------------------------ preprocessing ------
def odd_images() -> list[tuple[str, Image.Image]]:
    """Generated images of odd sizes, aspect ratios and modes (what to_rgb turns into RGB first)."""
    rng = np.random.default_rng(0)
    found = []
    for w, h in [(1, 1), (3, 700), (700, 3), (223, 224), (225, 225), (257, 255), (1000, 333), (57, 91), (224, 224),
                 (64, 48), (1201, 899)]:
        found.append((f"rgb {w}x{h}", Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))))
    smooth = np.add.outer(np.arange(300), np.arange(410)).astype(np.float64)
    found.append(("L", Image.fromarray((smooth % 256).astype(np.uint8), "L")))
    rgba = rng.integers(0, 256, (190, 270, 4), dtype=np.uint8)
    found.append(("RGBA", Image.fromarray(rgba, "RGBA")))
    found.append(("P", Image.fromarray(rng.integers(0, 256, (150, 333, 3), dtype=np.uint8)).convert("P")))
    found.append(("I;16", Image.fromarray((smooth * 97).astype(np.uint16))))
    assert found[-1][1].mode == "I;16"
    return found


def torch_input(image: Image.Image, name: str, resize: str) -> np.ndarray:
    """Today's encoder input: the torch transform of the image as the loader gives it (RGB)."""
    return image_transform(name, resize)(to_rgb(image.copy())).numpy()


@pytest.mark.parametrize("resize", ["crop", "squash"])
def test_preprocessing_is_bit_identical_to_torchvision(resize):
    spec = preprocessing("efficientnet_lite0", resize)
    cases = [(Path(p).name, Image.open(p)) for p in EXAMPLES] + odd_images()
    assert len(cases) >= 20
    for label, image in cases:
        want = torch_input(image, "efficientnet_lite0", resize)
        got = preprocess([image.copy()], spec)[0]
        assert got.dtype == np.float32 and got.shape == want.shape, label
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (label, float(np.abs(got - want).max()))


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_lite2", "pixels"])
def test_preprocessing_of_the_other_encoders(name):
    """Other crop sizes, ImageNet mean/std, and the bilinear 56x56 of the test encoder (tiny models)."""
    spec = preprocessing(name, "crop")
    for label, image in odd_images()[:8]:
        want = torch_input(image, name, "crop")
        got = preprocess([image], spec)[0]
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (name, label)


def test_the_resize_is_torchs_uint8_kernel_not_pillows():
    """Pillow's own bicubic is 1 grey level off torch's on some values (its 22-bit weights round differently);
    resize_uint8 is torch's integer arithmetic: equal to torch's interpolate on uint8, where Pillow is not."""
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (300, 451, 3), dtype=np.uint8)
    want = torch.nn.functional.interpolate(torch.from_numpy(pixels).permute(2, 0, 1)[None], size=(256, 384),
                                           mode="bicubic", antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()
    ours = resize_uint8(pixels, 256, 384)
    pil = np.asarray(Image.fromarray(pixels).resize((384, 256), Image.BICUBIC))
    assert np.array_equal(ours, want)
    diff = np.abs(pil.astype(int) - want.astype(int))
    assert diff.max() == 1 and diff.any()  # why Pillow's resize is not used


def test_axis_weights_sum_to_one_at_their_precision():
    for n_in, n_out in [(451, 256), (256, 451), (5, 224), (4000, 341)]:
        first, weights, precision = axis_weights(n_in, n_out, "bicubic")
        assert 0 < precision <= 22 and weights.shape[0] == n_out and (first >= 0).all()
        assert np.abs(weights.sum(1) - (1 << precision)).max() <= weights.shape[1]  # rounding of each weight


def test_preprocessing_settings_round_trip():
    spec = preprocessing("resnet50", "squash")
    assert Preprocessing.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert preprocess([], spec).shape == (0, 3, 224, 224)
