"""Make the example photos shipped with the web app (captioner/assets/examples/) from the public-domain and
CC0 photos in ../shared/data/photos (scikit-image's sample photos; LICENSES.txt there lists them): each is
resized to at most 640 px on its longest side and saved as a JPEG (quality 85), and their licence lines are
copied to examples/LICENSES.txt. Deterministic; run again to rebuild them:

    python data/make_examples.py [PHOTOS_DIR [OUT_DIR]]
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "photos"
OUT = ROOT / "captioner" / "assets" / "examples"
SIDE, QUALITY = 640, 85
NAMES = ("astronaut", "chelsea", "coffee", "rocket", "camera")  # the photos of LICENSES.txt, in its order


def main(photos: Path = PHOTOS, out: Path = OUT) -> list[Path]:
    licences = (photos / "LICENSES.txt").read_text(encoding="utf-8").splitlines()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # the previous set, whatever it was
        if old.suffix.lower() in (".jpg", ".jpeg", ".png"):
            old.unlink()
    made, lines = [], []
    for name in NAMES:
        src = next(photos.glob(f"{name}.*"))
        line = next(x for x in licences if x.startswith(src.name + " "))
        with Image.open(src) as im:
            im = im.convert("RGB")  # camera.png is grey: a JPEG in RGB, as photos are uploaded
            im.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
            dst = out / f"{name}.jpg"
            im.save(dst, "JPEG", quality=QUALITY, optimize=True)
        lines.append(f"{dst.name}  (from {line.strip()})")
        made.append(dst)
    source = next((x for x in licences if x.startswith("Source:")), "")
    (out / "LICENSES.txt").write_text(
        "Example photos for the web app, made by data/make_examples.py from ../shared/data/photos: resized to at "
        f"most {SIDE} px on the longest side, JPEG quality {QUALITY}.\n{source}\n\n" + "\n".join(lines) + "\n",
        encoding="utf-8")
    return made


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:3]]
    for p in main(*args):
        print(p)
