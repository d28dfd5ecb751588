"""Scene-cut detection on a labelled set (tests/slideshow.py: hard cuts at known times, a cross-fade, a dip to
black, slow pans and zooms, a wide-to-close-up cut of the same photo): precision and recall over a grid of
thresholds, for the measure `captioner video --scenes` uses and two others, on the shared photos and on
generated pictures. A detection finds a cut when it is the cut's first frame or the one after.

    .venv/bin/python bench/scenes.py            # the tables (about 20 s on one core)

Measures (all on consecutive decoded frames, sampling with --every 0 so only cuts are kept):
  previous  mean |difference| of 16x16 RGB thumbnails, against the frame just before (captioner.media.video, now)
  kept      the same, against the last frame kept (captioner.media.video before issue 17)
  histogram half the L1 distance of 8x4-bin hue-saturation histograms of 64x48 thumbnails, against the frame before
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from captioner.media import video as V  # noqa: E402
from captioner.options import DEFAULT_SCENE_THRESHOLD  # noqa: E402
from slideshow import Clip, frames, generated, labelled_set, matches, photos  # noqa: E402

THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35)


def hs_histogram(frame) -> np.ndarray:
    hsv = np.asarray(frame.to_image().resize((64, 48)).convert("HSV"), np.int32)
    idx = (hsv[..., 0] * 8 // 256) * 4 + hsv[..., 1] * 4 // 256
    return np.bincount(idx.ravel(), minlength=32) / idx.size


def detect_previous(clip: Clip, threshold: float) -> list[float]:
    """What captioner.media.video samples with --every 0 --scenes: the first frame, then each cut."""
    return [f.time for f in V.sample_frames(clip.path, every=0, scenes=True, scene_threshold=threshold)][1:]


def simulate(sigs: list[tuple[float, np.ndarray]], dist: Callable, threshold: float, kept: bool) -> list[float]:
    found, ref = [], sigs[0][1]
    for (t, s), (_, before) in zip(sigs[1:], sigs):
        if dist(ref if kept else before, s) > threshold:
            found.append(t)
            ref = s
    return found


def evaluate(clips: list[Clip]) -> dict[str, dict[float, tuple[float, float, int]]]:
    """measure -> threshold -> (precision, recall, false cuts)."""
    thumbs = {c.name: [(t, V.signature(f)) for t, f in frames(c.path)] for c in clips}
    hists = {c.name: [(t, hs_histogram(f)) for t, f in frames(c.path)] for c in clips}
    half_l1 = lambda a, b: float(np.abs(a - b).sum() / 2)  # noqa: E731
    detectors = {
        "previous": lambda c, th: detect_previous(c, th),
        "kept": lambda c, th: simulate(thumbs[c.name], V.scene_change, th, kept=True),
        "histogram": lambda c, th: simulate(hists[c.name], half_l1, th, kept=False),
    }
    table: dict[str, dict[float, tuple[float, float, int]]] = {}
    for name, detect in detectors.items():
        table[name] = {}
        for th in THRESHOLDS:
            true = found = hits = right = 0
            for c in clips:
                got = detect(c, th)
                h, r = matches(got, c.cuts)
                true, found, hits, right = true + len(c.cuts), found + len(got), hits + h, right + r
            table[name][th] = (right / found if found else 1.0, hits / true, found - right)
    return table


def margins(clips: list[Clip]) -> tuple[float, float]:
    """(largest frame-to-frame change that is not a cut, smallest one at a cut) for the shipped measure."""
    cut, other = [], []
    for c in clips:
        sigs = [(t, V.signature(f)) for t, f in frames(c.path)]
        for (t, s), (_, before) in zip(sigs[1:], sigs):
            (cut if any(abs(t - x) < 1e-6 for x in c.cuts) else other).append(V.scene_change(before, s))
    return max(other), min(cut)


def main() -> None:
    torch.set_num_threads(1)
    named, pics = photos()
    sets = [(f"{named} ({'../shared/data/photos' if named == 'photos' else 'generated pictures'})", pics)]
    if named == "photos":
        sets.append(("generated pictures", generated(6)))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, p) in enumerate(sets):
            clips = labelled_set(Path(tmp) / str(i), p)
            n = sum(len(c.cuts) for c in clips)
            print(f"\n{label}: {len(clips)} clips, {sum(c.duration for c in clips):.0f} s, {n} cuts "
                  "(plus a cross-fade, a dip to black and 7 slow pans or zooms, which are not cuts)\n")
            table = evaluate(clips)
            print("| threshold | " + " | ".join(f"{m} P / R (false cuts)" for m in table) + " |")
            print("|---:|" + "---|" * len(table))
            for th in THRESHOLDS:
                mark = " (default)" if th == DEFAULT_SCENE_THRESHOLD else ""
                print(f"| {th:g}{mark} | " + " | ".join(f"{table[m][th][0]:.2f} / {table[m][th][1]:.2f} "
                                                        f"({table[m][th][2]})" for m in table) + " |")
            lo, hi = margins(clips)
            print(f"\nprevious: largest change that is not a cut {lo:.3f}, smallest cut {hi:.3f}")


if __name__ == "__main__":
    main()
