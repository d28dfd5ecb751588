"""A small labelled set for scene-cut detection, made with PyAV: slideshows of photos with hard cuts at
known times, cross-fades and a dip to black, slow pans and zooms (Ken Burns), and a cut from a wide shot
to a close-up of the same photo. Only the hard cuts are cuts; fades, pans and zooms must not be cut.

Photos: the CC0 / public-domain test photos in ../shared/data/photos when that folder exists, else
generated photo-like images (smooth colour fields, a gradient, shapes, grain), so nothing ever skips.
Used by tests/test_scenes.py and bench/scenes.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"
FPS = 10
SIZE = (160, 120)  # frame size; pictures are 3x this, so pans and zooms have room
BIG = (SIZE[0] * 3, SIZE[1] * 3)
CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in picture pixels


@dataclass
class Clip:
    name: str
    path: Path
    cuts: list[float]  # seconds: the first frame of each new shot
    duration: float


def _fit(img: Image.Image) -> Image.Image:
    """Centre-crop to 4:3 and resize to BIG."""
    img = img.convert("RGB")
    w, h = img.size
    cw, ch = min(w, h * 4 // 3), min(h, w * 3 // 4)
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch)).resize(BIG, Image.BICUBIC)


def generated(n: int, seed: int = 0) -> list[Image.Image]:
    """Photo-like pictures: smooth colour noise + a gradient + shapes + grain, a little blur."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (int(rng.integers(3, 7)), int(rng.integers(4, 9)), 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize(BIG, Image.BICUBIC)
        grad = np.linspace(0, rng.uniform(-80, 80), BIG[0], dtype=np.float32)[None, :, None]
        arr = np.asarray(img, np.float32) + grad + rng.normal(0, 6, (BIG[1], BIG[0], 1)).astype(np.float32)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = int(rng.integers(-60, BIG[0])), int(rng.integers(-60, BIG[1]))
            box = (x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200)))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(map(int, rng.integers(0, 256, 3))))
        out.append(img.filter(ImageFilter.GaussianBlur(1.0)))
    return out


def photos() -> tuple[str, list[Image.Image]]:
    """("photos", the shared test photos sorted by name), or ("generated", 6 pictures) when there are fewer
    than 4 of them."""
    files = sorted(p for p in PHOTOS.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")) if PHOTOS.is_dir() else []
    pics = []
    for p in files:
        with Image.open(p) as im:
            pics.append(_fit(im))
    return ("photos", pics) if len(pics) >= 4 else ("generated", generated(6))


def _view(pic: Image.Image, box: Box) -> np.ndarray:
    return np.asarray(pic.resize(SIZE, Image.BILINEAR, box=box), np.float32)


def _zoom(z: float, cx: float = 0.5, cy: float = 0.5) -> Box:
    """The box showing 1/z of the picture around (cx, cy) (fractions of the picture)."""
    w, h = BIG[0] / z, BIG[1] / z
    x0 = min(max(cx * BIG[0] - w / 2, 0), BIG[0] - w)
    y0 = min(max(cy * BIG[1] - h / 2, 0), BIG[1] - h)
    return (x0, y0, x0 + w, y0 + h)


def _lerp(a: Box, b: Box, u: float) -> Box:
    return tuple(x + (y - x) * u for x, y in zip(a, b))  # type: ignore[return-value]


Shot = Callable[[float], np.ndarray]  # u in [0, 1) through the shot -> RGB float frame


def still(pic: Image.Image, box: Box = _zoom(1.0)) -> Shot:
    frame = _view(pic, box)
    return lambda u: frame


def move(pic: Image.Image, a: Box, b: Box) -> Shot:
    """A slow pan / zoom from box a to box b over the shot."""
    return lambda u: _view(pic, _lerp(a, b, u))


def write(path: Path, shots: list[tuple[float, Shot]], fades: dict[int, tuple[float, str]] | None = None) -> Path:
    """Encode shots of the given lengths (seconds) back to back. fades[i] = (seconds, "cross" | "black"):
    the change from shot i to i+1 is a transition of that length ending where shot i+1 starts."""
    fades = fades or {}
    starts = np.cumsum([0.0] + [s for s, _ in shots])
    n = int(round(starts[-1] * FPS))
    with av.open(str(path), "w") as out:
        stream = out.add_stream(CODEC, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        for k in range(n):
            t = k / FPS
            i = int(np.searchsorted(starts, t + 1e-9, side="right") - 1)
            frame = shots[i][1]((t - starts[i]) / shots[i][0])
            nxt = i + 1 < len(shots) and i in fades and t >= starts[i + 1] - fades[i][0] - 1e-9
            if nxt:
                length, kind = fades[i]
                v = (t - (starts[i + 1] - length)) / length  # 0 -> 1 over the transition
                other = shots[i + 1][1](0.0)
                if kind == "cross":
                    frame = frame * (1 - v) + other * v
                else:  # dip to black: out over the first half, the next shot in over the second
                    frame = frame * max(0.0, 1 - 2 * v) + other * max(0.0, 2 * v - 1)
            rgb = np.clip(frame, 0, 255).astype(np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    return path


def labelled_set(folder: Path, pics: list[Image.Image] | None = None) -> list[Clip]:
    """The clips and their true cut times. Every shot is at least 3 s long."""
    p = pics or photos()[1]
    a, b, c, d = (p[i % len(p)] for i in range(4))
    e = p[4 % len(p)]
    folder.mkdir(parents=True, exist_ok=True)
    clips = []

    def add(name: str, shots: list[tuple[float, Shot]], cuts: list[float], fades=None) -> None:
        write(folder / f"{name}.mp4", shots, fades)
        clips.append(Clip(name, folder / f"{name}.mp4", cuts, float(sum(s for s, _ in shots))))

    # the case: a 4-photo slideshow, hard cuts at 5, 10 and 15 s
    add("slideshow", [(5, still(a)), (5, still(b)), (5, still(c)), (5, still(d))], [5.0, 10.0, 15.0])
    # Ken Burns: each photo slowly zooms or pans, hard cuts between them (off the 1 s grid)
    add("kenburns", [(4.3, move(a, _zoom(1.0), _zoom(1.3, 0.4, 0.4))), (4.8, move(b, _zoom(1.4), _zoom(1.0))),
                     (4.6, move(c, _zoom(1.3, 0.3), _zoom(1.3, 0.7))), (3.3, move(e, _zoom(1.0), _zoom(1.2)))],
        [4.3, 9.1, 13.7])
    # a 1 s cross-fade and a 1 s dip to black (not cuts), then a hard cut
    add("fades", [(5, still(a)), (5, still(b)), (4, still(c)), (4, still(d))], [14.0],
        fades={0: (1.0, "cross"), 1: (1.0, "black")})
    # slow pans across a whole photo (two thirds of its width in 8 s) and a slow zoom in, then cuts
    add("pans", [(8, move(c, _zoom(1.5, 0.0, 0.5), _zoom(1.5, 1.0, 0.5))),
                 (8, move(d, _zoom(1.5, 0.5, 0.0), _zoom(1.5, 0.5, 1.0))), (6, move(a, _zoom(1.0), _zoom(1.6)))],
        [8.0, 16.0])
    # a cut from a wide shot to a close-up of the same photo (same colours), and back
    add("closeup", [(4, still(b)), (4, still(b, _zoom(2.5, 0.5, 0.45))), (4, still(b))], [4.0, 8.0])
    return clips


def matches(found: list[float], cuts: list[float]) -> tuple[int, int]:
    """(true cuts found, detections that are a true cut): a detection at t finds cut c when
    c <= t <= c + one frame."""
    hit = lambda t, c: c - 1e-6 <= t <= c + 1 / FPS + 1e-6  # noqa: E731
    return sum(any(hit(t, c) for t in found) for c in cuts), sum(any(hit(t, c) for c in cuts) for t in found)


def frames(path: Path) -> Iterator[tuple[float, av.VideoFrame]]:
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            yield float(f.time), f
