"""Scene cuts at the default threshold on the labelled set of tests/slideshow.py (photos with hard cuts at
known times, a cross-fade, a dip to black, slow pans and zooms): every true cut is found at its first
frame or the one after, and nothing else is cut (issue 17 item 10; bench/scenes.py has the full table)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from captioner.media import video as V
from captioner.options import DEFAULT_SCENE_THRESHOLD
from slideshow import FPS, SIZE, Clip, frames, labelled_set, matches, photos


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    return photos()[1]


@pytest.fixture(scope="module")
def clips(tmp_path_factory, pictures) -> dict[str, Clip]:
    return {c.name: c for c in labelled_set(tmp_path_factory.mktemp("scenes"), pictures)}


def test_defaults_agree():
    import inspect

    from captioner.cli.main import build_parser

    assert inspect.signature(V.sample_frames).parameters["scene_threshold"].default == DEFAULT_SCENE_THRESHOLD
    assert inspect.signature(V.tag_video).parameters["scene_threshold"].default == DEFAULT_SCENE_THRESHOLD
    args = build_parser().parse_args(["video", "x.mp4", "--scenes"])
    assert args.scene_threshold == DEFAULT_SCENE_THRESHOLD


@pytest.mark.parametrize("name", ["slideshow", "kenburns", "fades", "pans", "closeup"])
def test_default_threshold_finds_every_cut_and_nothing_else(clips, name):
    clip = clips[name]
    found = [f.time for f in V.sample_frames(clip.path, every=0, scenes=True)]
    assert found[0] == 0.0
    hits, right = matches(found[1:], clip.cuts)
    assert hits == len(clip.cuts), f"{name}: cuts at {clip.cuts}, found {found[1:]}"
    assert right == len(found) - 1 == len(clip.cuts), f"{name}: false cuts among {found[1:]} (true: {clip.cuts})"


def test_measure_separates_cuts_from_fades_and_pans(clips):
    """The largest frame-to-frame change that is not a cut and the smallest cut, on either side of the
    default with room to spare."""
    cut, other = [], []
    for clip in clips.values():
        sigs = [(t, V.signature(f)) for t, f in frames(clip.path)]
        for (t, s), (_, before) in zip(sigs[1:], sigs):
            (cut if any(abs(t - c) < 1e-6 for c in clip.cuts) else other).append(V.scene_change(before, s))
    assert len(cut) == sum(len(c.cuts) for c in clips.values())
    assert max(other) < 0.8 * DEFAULT_SCENE_THRESHOLD < 1.2 * DEFAULT_SCENE_THRESHOLD < min(cut)


def test_issue_slideshow_every_2_with_scenes(clips, pictures):
    """The issue's case: `--every 2 --scenes` on a 4-photo slideshow with cuts at 5, 10 and 15 s gives the
    segments 0-5 / 5-10 / 10-15 / 15-20 (it gave 0-6 / 6-10 / 10-16 / 16-20 at the old 0.3)."""
    thumbs = [np.asarray(p.resize(SIZE), np.float32) for p in pictures[:4]]

    def which(frames_: list[Image.Image]) -> list[str]:
        return [f"photo {min(range(4), key=lambda i: float(np.abs(np.asarray(f, np.float32) - thumbs[i]).mean()))}"
                for f in frames_]

    clip = clips["slideshow"]
    res = V.tag_video(clip.path, which, every=2.0, scenes=True)
    assert res.times == pytest.approx([0, 2, 4, 5, 6, 8, 10, 12, 14, 15, 16, 18])
    assert [s.caption for s in res.segments] == ["photo 0", "photo 1", "photo 2", "photo 3"]
    assert [(s.start, s.end) for s in res.segments] == [(0, 5), (5, 10), (10, 15), (15, pytest.approx(20, abs=0.1))]


def test_grid_plus_cuts_only(clips):
    """Pans and zooms add no samples to the --every grid; the cuts off the grid do."""
    clip = clips["kenburns"]
    times = [f.time for f in V.sample_frames(clip.path, every=2.0, scenes=True)]
    grid = [float(k) for k in range(0, int(clip.duration) + 1, 2)]
    assert times == pytest.approx(sorted(grid + clip.cuts))


def test_labelled_set_is_what_it_says(clips):
    """Every clip decodes to its whole length and each cut time is a frame time."""
    for clip in clips.values():
        decoded = [t for t, _ in frames(clip.path)]
        assert decoded[-1] == pytest.approx(clip.duration - 1 / FPS)
        assert all(any(abs(t - c) < 1e-6 for t in decoded) for c in clip.cuts)
