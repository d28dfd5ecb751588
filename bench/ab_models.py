"""Two models' `captioner caption` speed, whole command, runs interleaved (A, B, A, B, ...) so that a noisy machine
slows both alike: the median img/s of each, start-up and model load included. For a release against the one before
it (issue 24's speed check):

    .venv/bin/python bench/ab_models.py --images DIR --models OLD NEW [--backend torch] [--beam 3] [--reps 5]

OLD / NEW: a bundle folder or a checkpoint (`git show REV:captioner/assets/model.pt > old.pt`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def run_once(images: Path, model: str, backend: str | None, beam: int, out: Path, env: dict[str, str]) -> float:
    cmd = [str(Path(sys.executable).parent / "captioner"), "caption", str(images), "--model", model,
           "--beam", str(beam), "-o", str(out), "--overwrite", "--quiet"]
    if backend:
        cmd += ["--backend", backend]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if res.returncode != 0:
        sys.exit(f"ab_models: {' '.join(cmd)} failed ({res.returncode}): {res.stderr[-500:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--models", nargs=2, required=True, metavar=("A", "B"))
    ap.add_argument("--backend", default=None, help="passed to captioner caption (default: its default path)")
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    n = sum(1 for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not n:
        sys.exit(f"ab_models: no images in {args.images}")
    from captioner.cpu import describe

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HOME": tmp, "CAPTIONER_CACHE": str(Path(tmp) / "cache")}  # nothing from earlier runs
        times: dict[str, list[float]] = {m: [] for m in args.models}
        for _ in range(args.reps):
            for i, model in enumerate(args.models):
                times[model].append(run_once(args.images, model, args.backend, args.beam, Path(tmp) / f"{i}.jsonl", env))
    print(f"CPU: {describe()}; {n} images, beam {args.beam}, backend {args.backend or 'default'}, "
          f"{args.reps} interleaved runs, whole command (start-up and model load included)")
    print("| model | img/s, median | runs |\n|---|---|---|")
    for model, ts in times.items():
        print(f"| {model} | {n / statistics.median(ts):.1f} | {' / '.join(f'{n / t:.1f}' for t in ts)} |")


if __name__ == "__main__":
    main()
