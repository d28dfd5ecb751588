"""A synthetic captioning set: two coloured shapes at known positions, templated captions
("a red circle above a blue square"). Small, made on the fly, no pretrained encoder needed."""

from __future__ import annotations

import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = {"above": ((0.5, 0.25), (0.5, 0.75)), "below": ((0.5, 0.75), (0.5, 0.25)),
             "left of": ((0.25, 0.5), (0.75, 0.5)), "right of": ((0.75, 0.5), (0.25, 0.5))}
INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def draw(shape: str, colour: str, centre: tuple[float, float], draw_: ImageDraw.ImageDraw, size: int) -> None:
    cx, cy, r = centre[0] * size, centre[1] * size, size * 0.17
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw_.ellipse(box, fill=fill)
    elif shape == "square":
        draw_.rectangle(box, fill=fill)
    else:
        draw_.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def make_image(rng: random.Random, size: int = 112) -> tuple[Image.Image, list[str]]:
    (c1, c2), (s1, s2) = rng.sample(list(COLOURS), 2), (rng.choice(SHAPES), rng.choice(SHAPES))
    rel = rng.choice(list(RELATIONS))
    img = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(img)
    jitter = lambda p: (p[0] + rng.uniform(-0.06, 0.06), p[1] + rng.uniform(-0.06, 0.06))  # noqa: E731
    draw(s1, c1, jitter(RELATIONS[rel][0]), d, size)
    draw(s2, c2, jitter(RELATIONS[rel][1]), d, size)
    return img, [f"a {c1} {s1} {rel} a {c2} {s2}", f"a {c2} {s2} {INVERSE[rel]} a {c1} {s1}"]


def make_dataset(root: Path, n_train: int = 600, n_val: int = 60, n_test: int = 60, seed: int = 0,
                 blank: bool = False) -> Path:
    """Write images and a `captions.csv` (image,caption,split). blank=True: every image is
    an empty canvas (captions unchanged), the "features zeroed" control."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(n):
            img, caps = make_image(rng)
            if blank:
                img = Image.new("RGB", img.size, (245, 245, 245))
            name = f"{split}_{i:04d}.png"
            img.save(root / name)
            rows += [{"image": name, "caption": c, "split": split} for c in caps]
    path = root / "captions.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "split"])
        w.writeheader()
        w.writerows(rows)
    return path


def make_object_image(rng: random.Random, size: int = 112) -> tuple[Image.Image, str, str, tuple[float, float, float, float]]:
    """One coloured shape at a random place on a plain background of a random grey: the image, its colour, its
    shape, and its box (x0, y0, x1, y1) as fractions of the image side."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    grey = rng.randint(150, 250)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    r = 0.17
    cx, cy = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
    draw(shape, colour, (cx, cy), ImageDraw.Draw(img), size)
    return img, colour, shape, (cx - r, cy - r, cx + r, cy + r)


def make_object_dataset(root: Path, n_train: int = 600, n_val: int = 60, n_test: int = 60, seed: int = 0
                        ) -> tuple[Path, dict[str, tuple[float, float, float, float]]]:
    """Scenes of make_object_image captioned "a red circle" and "the red circle" (`captions.csv`), and each
    image's object box by file name."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows, boxes = [], {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(n):
            img, colour, shape, box = make_object_image(rng)
            name = f"{split}_{i:04d}.png"
            img.save(root / name)
            boxes[name] = box
            rows += [{"image": name, "caption": f"{art} {colour} {shape}", "split": split} for art in ("a", "the")]
    path = root / "captions.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "split"])
        w.writeheader()
        w.writerows(rows)
    return path, boxes
