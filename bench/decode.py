"""Decode + resize + crop, per image at one thread: the caption path against candidate speed-ups (issue 18).

What `captioner caption` runs per image in its loading workers (captioner/pipeline/batch.py): `_load` (decode), then the
model's per-image transform (torchvision v2: ToImage, Resize short side to 256 bicubic antialias (torch's native
uint8 kernel), CenterCrop 224); the float conversion and normalisation run once per batch (not timed here, the
same for every candidate). Candidates:

    before           the caption path before issue 18's change: PIL decodes every image (a JPEG whose short
                     side is at least 4x the resize target at 1/2..1/8 scale, `Image.draft`, >= 2x the target)
    current          the caption path now, as in a DataLoader worker: the same draft for large JPEGs, other
                     RGB / grey JPEGs decoded by torchvision's decode_jpeg straight into a tensor
    full decode      load_image, no draft (the reference for large JPEGs)
    draft to need    Image.draft('RGB', the size the Resize really produces): DCT scaling to the smallest 1/2,
                     1/4, 1/8 that stays >= that size (the caption path keeps >= 2x the target)
    draft 1/2 (below need)  forced 1/2 on a JPEG too small for it (640x480 -> 320x240, then upsampled): what
                     decoding fewer pixels would save, not a valid option (it throws detail away)
    tv decode_jpeg   torchvision.io.decode_jpeg (EXIF applied) for every JPEG, no draft
    YCbCr, RGB after  libjpeg leaves YCbCr, resize + crop in YCbCr, PIL converts the 224x224 crop to RGB
    reduce + resize  full decode, Image.reduce by short // 512 (>= 2x the target kept), then the torch resize
    PIL resize       the before decode, then PIL's bicubic resize and crop instead of torch's
    PIL resize gap 2 the same with reducing_gap=2.0
    PIL decode only  the before decode alone (no tensor, no resize): the floor for any PIL-decoding path
    pillow-simd      decode only, and the PIL resize candidate, in a throwaway venv holding pillow-simd
                     (--simd-python), if given

Timings: time.thread_time (CPU) and perf_counter (wall) around each image, every image once per repeat, candidates
interleaved within a repeat; per image the median of the repeats, then the mean over the set ("repeats": each
repeat's mean CPU ms, for the run-to-run noise). Output tensors: the normalised 224x224 tensor of each candidate
against the before path's (max abs diff; one grey level = 2/255 = 0.0078) and against the full decode's.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python bench/decode.py --repeats 5 --json /tmp/decode.json \\
        --simd-python /tmp/simd/bin/python

Sets: (a) the first --flickr images of ../shared/data/flickr8k/images (as stored there: short side <= 256, most
224x224), (b) --gen 640x480 JPEGs (q90, photo-like: smooth colour fields, a gradient, texture, shapes, grain,
blur) and (c) --big 4000x3000 JPEGs of the same kind, generated in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESIZE, CROP = 256, 224  # tf_efficientnet_lite0's transform (captioner.model.encoder.image_transform)


# ------------------------------------------------------------------------ test images ----
def make_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int) -> list[Path]:
    """n photo-like JPEGs (q90): a smooth colour field, a gradient, mid-frequency texture, shapes, grain, blur."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    out = []
    for i in range(n):
        coarse = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(4, 12)), 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize(size, Image.BICUBIC)
        texture = Image.fromarray(rng.integers(0, 256, (h // 20, w // 20), dtype=np.uint8)).resize(size, Image.BICUBIC)
        arr = np.asarray(img, np.float32)
        arr += np.linspace(0, rng.uniform(-80, 80), w, dtype=np.float32)[None, :, None]
        arr += (np.asarray(texture, np.float32)[..., None] - 128) * 0.25
        arr += rng.standard_normal((h, w, 1), dtype=np.float32) * 5
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 9))):
            x0, y0 = int(rng.integers(-w // 6, w)), int(rng.integers(-h // 6, h))
            box = (x0, y0, x0 + int(rng.integers(w // 20, w // 2)), y0 + int(rng.integers(h // 16, h // 2)))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(map(int, rng.integers(0, 256, 3))))
        path = folder / f"img{i:04d}.jpg"
        img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5)) * w / 640)).save(path, quality=90)
        out.append(path)
    return out


# ------------------------------------------------------------- pure-PIL candidates ------
def resized_size(w: int, h: int, side: int = RESIZE) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(side): the short side to `side`, the long one int(side * l / s)."""
    return (side, int(side * h / w)) if w <= h else (int(side * w / h), side)


def pil_decode(path: Path) -> Image.Image:
    """The current decode (captioner.pipeline.batch._load for these plain RGB JPEGs without EXIF), in PIL only."""
    im = Image.open(path)
    if im.format == "JPEG" and min(im.size) >= 4 * RESIZE:
        im.draft("RGB", (2 * RESIZE, 2 * RESIZE))
    im.load()
    return im if im.mode == "RGB" else im.convert("RGB")


def pil_resize_crop(im: Image.Image, gap: float | None = None) -> np.ndarray:
    """PIL bicubic resize to torchvision's size and its CenterCrop: a (224, 224, 3) uint8 array."""
    w, h = resized_size(*im.size)
    im = im.resize((w, h), Image.BICUBIC, reducing_gap=gap)
    left, top = int(round((w - CROP) / 2.0)), int(round((h - CROP) / 2.0))
    return np.asarray(im.crop((left, top, left + CROP, top + CROP)))


def time_pil(paths: list[Path], repeats: int) -> dict:
    """pil decode and pil decode + resize + crop, per image: {"decode": (cpu, wall), "resize": (cpu, wall)} ms
    lists, and the crops. Also the --pil-worker entry point (run by another interpreter: pillow-simd)."""
    cpu = {"decode": [[] for _ in paths], "resize": [[] for _ in paths]}
    wall = {"decode": [[] for _ in paths], "resize": [[] for _ in paths]}
    crops = []
    for r in range(repeats):
        for i, p in enumerate(paths):
            c0, w0 = time.thread_time(), time.perf_counter()
            pil_decode(p).close()
            cpu["decode"][i].append(time.thread_time() - c0)
            wall["decode"][i].append(time.perf_counter() - w0)
            c0, w0 = time.thread_time(), time.perf_counter()
            crop = pil_resize_crop(pil_decode(p))
            cpu["resize"][i].append(time.thread_time() - c0)
            wall["resize"][i].append(time.perf_counter() - w0)
            if r == 0:
                crops.append(crop)
    return {"cpu": cpu, "wall": wall, "crops": crops}


def pil_worker(list_file: str, out_file: str, repeats: int) -> None:
    import PIL

    paths = [Path(line) for line in Path(list_file).read_text().splitlines()]
    res = time_pil(paths, repeats)
    np.savez(out_file, crops=np.stack(res["crops"]), **{f"{k}_{s}": np.array(res[k][s]) for k in ("cpu", "wall")
                                                       for s in ("decode", "resize")})
    Path(out_file + ".version").write_text(PIL.__version__)


# ------------------------------------------------------------------ torch candidates ----
def candidates(include_below: bool) -> dict:
    """name -> fn(path) -> uint8 (3, 224, 224) tensor."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as F

    from captioner.pipeline import batch
    from captioner.pipeline.batch import _load, _split_transform
    from captioner.model.encoder import image_transform
    from captioner.media.images import MAX_PIXELS, load_image, to_rgb

    per_image, _, min_side = _split_transform(image_transform("efficientnet_lite0"))
    assert min_side == RESIZE
    batch._DECODERS[os.getpid()] = batch._make_jpeg_decoder()  # _load as it runs in a DataLoader worker

    def before_image(p):  # captioner.pipeline.batch._load before issue 18's decode change (PIL only)
        if stat.S_ISREG(os.stat(p).st_mode):
            with Image.open(p, formats=("JPEG",)) as im:
                w, h = im.size
                if min(w, h) >= 4 * min_side and w * h <= MAX_PIXELS:
                    im.draft("RGB", (2 * min_side, 2 * min_side))
                    im.load()
                    return to_rgb(im)
        return load_image(p)

    def before(p):
        return per_image(before_image(p))

    def current(p):
        return per_image(_load(p, min_side))

    def full(p):
        return per_image(load_image(p))

    def draft_to_need(p):
        with Image.open(p) as im:
            if im.format == "JPEG" and im.width * im.height <= MAX_PIXELS:
                im.draft("RGB", resized_size(*im.size))
            im.load()
            return per_image(to_rgb(im))

    def draft_half(p):
        with Image.open(p) as im:
            im.draft("RGB", (im.width // 2, im.height // 2))
            im.load()
            return per_image(to_rgb(im))

    def tv_decode(p):
        return per_image(decode_jpeg(read_file(str(p)), mode=ImageReadMode.RGB, apply_exif_orientation=True))

    def ycbcr_after(p):
        with Image.open(p) as im:
            if im.format == "JPEG" and im.mode == "RGB":
                im.draft("YCbCr", None)
            im.load()
            crop = per_image(F.to_image(im))
            if im.mode != "YCbCr":
                return crop
        rgb = Image.fromarray(crop.permute(1, 2, 0).numpy(), "YCbCr").convert("RGB")
        return F.to_image(rgb)

    def reduce_resize(p):
        im = load_image(p)
        k = min(im.size) // (2 * min_side)
        return per_image(im.reduce(k) if k >= 2 else im)

    def pil_resize(p, gap=None):
        return torch.from_numpy(pil_resize_crop(before_image(p), gap).copy()).permute(2, 0, 1)

    out = {"before": before, "current": current, "full decode": full, "draft to need": draft_to_need}
    if include_below:
        out["draft 1/2 (below need)"] = draft_half
    out.update({"tv decode_jpeg": tv_decode, "YCbCr, RGB after": ycbcr_after, "reduce + resize": reduce_resize,
                "PIL resize": pil_resize, "PIL resize gap 2": lambda p: pil_resize(p, 2.0)})
    return out


def normalise(x):
    return x.float().div(255).sub(0.5).div(0.5)  # ToDtype(scale=True) + Normalize(0.5, 0.5), as per batch


def diff(a, b) -> dict:
    d = (normalise(a) - normalise(b)).abs()
    return {"max_abs": round(float(d.max()), 5), "mean_grey_levels": round(float(d.mean()) * 255 / 2, 4),
            "share_changed": round(float((d > 1e-6).float().mean()), 4)}


def run_set(name: str, paths: list[Path], repeats: int, simd_python: str | None) -> dict:
    import torch

    cands = candidates(include_below=name.startswith("640"))
    for p in paths:  # the page cache, PIL's plugins, torch's kernels: warm before timing
        p.read_bytes()
    for fn in cands.values():
        fn(paths[0])
    cpu = {c: [[] for _ in paths] for c in cands}
    wall = {c: [[] for _ in paths] for c in cands}
    set_means = {c: [] for c in cands}
    outputs: dict[str, list] = {c: [] for c in cands}
    for r in range(repeats):
        for c, fn in cands.items():
            start = time.thread_time()
            for i, p in enumerate(paths):
                c0, w0 = time.thread_time(), time.perf_counter()
                x = fn(p)
                cpu[c][i].append(time.thread_time() - c0)
                wall[c][i].append(time.perf_counter() - w0)
                if r == 0:
                    outputs[c].append(x)
            set_means[c].append((time.thread_time() - start) / len(paths) * 1e3)
    stacked = {c: torch.stack(v) for c, v in outputs.items()}
    rows = {}
    for c in cands:
        rows[c] = {"cpu_ms": _mean_median(cpu[c]), "wall_ms": _mean_median(wall[c]),
                   "repeat_cpu_ms": [round(v, 3) for v in set_means[c]],
                   "vs_before": diff(stacked[c], stacked["before"]),
                   "vs_full_decode": diff(stacked[c], stacked["full decode"])}
    stock = time_pil(paths, repeats)
    rows["PIL decode only"] = {"cpu_ms": _mean_median(stock["cpu"]["decode"]),
                               "wall_ms": _mean_median(stock["wall"]["decode"])}
    if simd_python:
        with tempfile.TemporaryDirectory() as tmp:
            listing, out = Path(tmp, "paths.txt"), str(Path(tmp, "simd.npz"))
            listing.write_text("\n".join(map(str, paths)))
            subprocess.run([simd_python, __file__, "--pil-worker", str(listing), out, str(repeats)], check=True,
                           env={**os.environ, "PYTHONPATH": ""})
            res = np.load(out)
            version = Path(out + ".version").read_text()
            crops = torch.from_numpy(res["crops"]).permute(0, 3, 1, 2)
            rows[f"pillow-simd {version} decode only"] = {"cpu_ms": _mean_median(res["cpu_decode"]),
                                                          "wall_ms": _mean_median(res["wall_decode"])}
            rows[f"pillow-simd {version} (PIL resize)"] = {
                "cpu_ms": _mean_median(res["cpu_resize"]), "wall_ms": _mean_median(res["wall_resize"]),
                "vs_before": diff(crops, stacked["before"]), "vs_full_decode": diff(crops, stacked["full decode"]),
                "vs_stock_pil_resize": diff(crops, stacked["PIL resize"])}
    return {"images": len(paths), "sizes": image_sizes(paths), "rows": rows}


def image_sizes(paths: list[Path]) -> list[list[int]]:
    """The 5 most common [width, height, count]."""
    counts = Counter(Image.open(p).size for p in paths)
    return [[w, h, n] for (w, h), n in counts.most_common(5)]


def _mean_median(per_image: list[list[float]]) -> float:
    """ms: per image the median of its repeats, then the mean over the images."""
    return round(1e3 * statistics.fmean(statistics.median(v) for v in per_image), 3)


def table(results: dict) -> str:
    lines = ["| set | candidate | CPU ms/img | wall ms/img | CPU vs before | max abs diff vs before | "
             "vs full decode | repeats (CPU ms) |", "|---|---|---|---|---|---|---|---|"]
    for s, res in results["sets"].items():
        base = res["rows"]["before"]["cpu_ms"]
        for c, row in res["rows"].items():
            rel = f"{row['cpu_ms'] / base - 1:+.0%}" if c != "before" else ""
            d = row.get("vs_before", {}).get("max_abs", "")
            f = row.get("vs_full_decode", {}).get("max_abs", "")
            reps = " ".join(f"{v:.2f}" for v in row.get("repeat_cpu_ms", []))
            lines.append(f"| {s} | {c} | {row['cpu_ms']:.2f} | {row['wall_ms']:.2f} | {rel} | {d} | {f} | {reps} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--pil-worker":
        return pil_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flickr", type=int, default=200, help="Flickr8k images (0: skip the set)")
    p.add_argument("--flickr-dir", type=Path, default=ROOT.parent / "shared" / "data" / "flickr8k" / "images")
    p.add_argument("--gen", type=int, default=200, help="generated 640x480 JPEGs (0: skip)")
    p.add_argument("--big", type=int, default=4, help="generated 4000x3000 JPEGs (0: skip)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--simd-python", default=None, help="a Python whose PIL is pillow-simd (a throwaway venv)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    import PIL
    import torch
    import torchvision

    from captioner.cpu import describe

    torch.set_num_threads(1)
    results = {"cpu": describe(), "pillow": PIL.__version__, "torch": torch.__version__,
               "torchvision": torchvision.__version__, "repeats": args.repeats, "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        sets = {}
        if args.flickr:
            sets["Flickr8k"] = sorted(args.flickr_dir.glob("*.jpg"))[:args.flickr]
        if args.gen:
            sets["640x480"] = make_jpegs(Path(tmp, "640"), args.gen, (640, 480), seed=0)
        if args.big:
            sets["4000x3000"] = make_jpegs(Path(tmp, "12mp"), args.big, (4000, 3000), seed=1)
        for name, paths in sets.items():
            print(f"{name}: {len(paths)} images ...", file=sys.stderr)
            results["sets"][name] = run_set(name, paths, args.repeats, args.simd_python)
    print(f"{results['cpu']}; Pillow {results['pillow']}, torch {results['torch']}, torchvision "
          f"{results['torchvision']}; one thread, median of {args.repeats} repeats")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
