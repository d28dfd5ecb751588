"""Draw the example images shipped with the web app (captioner/assets/examples/).

They are made here from nothing but PIL and numpy, so they carry no third-party rights:
CC0. Deterministic (fixed seed); run again to rebuild them:

    python data/make_examples.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

W, H = 480, 360
OUT = Path(__file__).resolve().parents[1] / "captioner" / "assets" / "examples"


def _vertical_gradient(top: tuple[int, int, int], bottom: tuple[int, int, int], h: int, w: int = W) -> np.ndarray:
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    col = (1 - t) * np.array(top, np.float32) + t * np.array(bottom, np.float32)
    return np.repeat(col, w, axis=1)


def _noise(rng: np.random.Generator, h: int, w: int, amp: float) -> np.ndarray:
    return rng.normal(0.0, amp, (h, w, 1)).astype(np.float32)


def landscape(rng: np.random.Generator) -> Image.Image:
    """Blue sky, a yellow sun, green hills and grass."""
    horizon = int(H * 0.62)
    img = np.zeros((H, W, 3), np.float32)
    img[:horizon] = _vertical_gradient((70, 130, 210), (175, 210, 240), horizon)
    img[horizon:] = _vertical_gradient((90, 165, 60), (40, 105, 30), H - horizon) + _noise(rng, H - horizon, W, 9)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse((340, 40, 410, 110), fill=(255, 220, 60))
    for cx, cy, rx, ry in ((90, 70, 60, 18), (160, 95, 45, 14)):  # clouds
        d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=(245, 248, 252))
    d.polygon([(0, horizon), (120, horizon - 55), (260, horizon)], fill=(70, 140, 55))
    d.polygon([(180, horizon), (330, horizon - 75), (480, horizon - 10), (480, horizon)], fill=(60, 125, 50))
    return im.filter(ImageFilter.GaussianBlur(0.6))


def ball_on_grass(rng: np.random.Generator) -> Image.Image:
    """A red ball with a highlight and a shadow on a green field."""
    img = _vertical_gradient((120, 185, 80), (50, 120, 40), H) + _noise(rng, H, W, 12)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse((170, 255, 330, 285), fill=(35, 80, 25))  # shadow
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    cx, cy, r = 250.0, 190.0, 75.0
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    shade = np.clip(1.0 - np.sqrt((xx - cx + 25) ** 2 + (yy - cy + 25) ** 2) / (2.2 * r), 0.25, 1.0)
    ball = np.stack([215 * shade + 30, 25 * shade, 25 * shade], -1)
    arr = np.asarray(im).astype(np.float32)
    mask = (dist <= r)[..., None]
    arr = np.where(mask, ball, arr)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.5))


def shapes(rng: np.random.Generator) -> Image.Image:
    """A red circle above a blue square, and a yellow triangle, on a light background."""
    im = Image.new("RGB", (W, H), (236, 236, 230))
    d = ImageDraw.Draw(im)
    d.ellipse((90, 30, 210, 150), fill=(210, 40, 40))
    d.rectangle((90, 190, 210, 310), fill=(40, 80, 200))
    d.polygon([(280, 300), (420, 300), (350, 170)], fill=(240, 200, 30))
    return im


def beach(rng: np.random.Generator) -> Image.Image:
    """Sky, sea with waves, and sand."""
    img = np.zeros((H, W, 3), np.float32)
    sea, sand = int(H * 0.45), int(H * 0.72)
    img[:sea] = _vertical_gradient((95, 160, 225), (190, 220, 245), sea)
    yy = np.arange(sand - sea, dtype=np.float32)[:, None]
    xx = np.arange(W, dtype=np.float32)[None, :]
    waves = 10 * np.sin(xx / 17.0 + yy / 3.0)[..., None]
    img[sea:sand] = _vertical_gradient((30, 90, 160), (60, 150, 190), sand - sea) + waves
    img[sand:] = _vertical_gradient((235, 215, 160), (215, 190, 130), H - sand) + _noise(rng, H - sand, W, 7)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


EXAMPLES = {"landscape.jpg": landscape, "red_ball.jpg": ball_on_grass, "shapes.png": shapes, "beach.jpg": beach}


def main(out: Path = OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = []
    for name, draw in EXAMPLES.items():
        path = out / name
        im = draw(rng)
        if path.suffix == ".png":
            im.save(path, optimize=True)
        else:
            im.save(path, quality=85, optimize=True)
        assert path.stat().st_size < 100_000, f"{path} is too big"
        written.append(path)
        print(f"{path} ({path.stat().st_size // 1024} KB)")
    return written


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
