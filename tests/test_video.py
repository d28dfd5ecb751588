"""captioner.media.video on tiny synthetic videos made with PyAV: 10 s, 10 fps, 64x48, a solid colour per 2 s."""

from __future__ import annotations

import csv
import json
import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from captioner.media import video as V
from captioner.errors import CaptionerError
from captioner.media.video import VideoError

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "white": (255, 255, 255)}
SCENES = list(COLOURS)  # one per 2 s
FPS, SECONDS = 10, 10
CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"


def make_video(path: Path, gop: int = 10, fps: int = FPS, seconds: int = SECONDS, options: dict | None = None) -> Path:
    with av.open(str(path), "w", options=options or {}) as out:
        stream = out.add_stream(CODEC, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.gop_size = gop
        if CODEC == "libx264":
            stream.codec_context.options = {"preset": "veryfast", "keyint_min": str(gop), "sc_threshold": "0"}
        for i in range(fps * seconds):
            rgb = np.zeros((48, 64, 3), np.uint8)
            rgb[:] = COLOURS[SCENES[i * len(SCENES) // (fps * seconds)]]
            rgb[20:28, 28:36] = 0  # a small black square, so the frames are not perfectly flat
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    return path


def colour_of(image: Image.Image) -> str:
    mean = np.asarray(image.convert("RGB"), np.float32).reshape(-1, 3).mean(0)
    return min(COLOURS, key=lambda c: float(np.abs(mean - np.array(COLOURS[c]) * 0.95).sum()))


def fake_captioner(frames: list[Image.Image]) -> list[str]:
    return [f"a {colour_of(f)} screen" for f in frames]


def truth(t: float) -> str:
    return SCENES[min(int(t // 2), len(SCENES) - 1)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("video") / "clip.mp4")


def full_decode(path: Path) -> list[tuple[float, str]]:
    with av.open(str(path)) as c:
        return [(float(f.time), colour_of(f.to_image())) for f in c.decode(video=0)]


def test_probe(clip):
    assert V.probe(clip) == pytest.approx(SECONDS, abs=0.15)


def test_every_second_segments(clip):
    calls = []
    res = V.tag_video(clip, fake_captioner, every=1.0, batch_size=4, progress=calls.append)
    assert res.times == pytest.approx([float(t) for t in range(SECONDS)], abs=1e-6)
    assert calls == [4, 8, 10]
    assert [s.caption for s in res.segments] == [f"a {c} screen" for c in SCENES]
    for seg, change in zip(res.segments[1:], (2, 4, 6, 8)):
        assert change <= seg.start < change + 1.0
    assert res.segments[0].start == 0.0 and res.segments[-1].end == pytest.approx(res.duration)
    assert all(a.end == b.start for a, b in zip(res.segments, res.segments[1:]))
    assert [s.frames for s in res.segments] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert res.segments[0].tags == ["screen"] and res.tags == ["screen"]  # colours are not tags (item 11)
    assert res.segments[0].tag_sources == [V.Tag("screen", "caption", 1.0)]
    assert json.loads(json.dumps(res.to_dict()))["segments"][1]["caption"] == "a green screen"


@pytest.mark.parametrize("gop,every", [(10, 2.5), (10, 3.0), (50, 3.0), (50, 0.7)])
def test_seek_path_matches_full_decode(tmp_path, monkeypatch, gop, every):
    path = make_video(tmp_path / f"gop{gop}.mp4", gop=gop)
    seeks = []
    real_seek = V._seek
    monkeypatch.setattr(V, "_seek", lambda c, s, t0, t, *damage: seeks.append(t) or real_seek(c, s, t0, t, *damage))
    frames = list(V.sample_frames(path, every=every))
    decoded = full_decode(path)
    targets = [k * every for k in range(int(SECONDS / every) + 1) if k * every <= decoded[-1][0]]
    expected = [next(d for d in decoded if d[0] >= t - 1e-6) for t in targets]
    assert [(f.time, colour_of(f.image)) for f in frames] == expected
    for f, t in zip(frames, targets):
        assert t - 1e-6 <= f.time < t + 1 / FPS and colour_of(f.image) == truth(f.time)
    if every > 1.5 and gop == 10:
        assert seeks, "sparse sampling with 1 s keyframes should seek"
    if every < 1.5:
        assert not seeks


def test_seek_overshoot_falls_back_to_forward_decoding(clip, monkeypatch):
    """A seek that lands after its target (imprecise index) must not skip the frame the target asks for."""
    seeks = []
    real_seek = V._seek

    def bad_seek(c, s, t0, t, *damage):
        seeks.append(t)
        return real_seek(c, s, t0, t + (1.05 if len(seeks) == 1 else 0.0), *damage)

    monkeypatch.setattr(V, "_seek", bad_seek)
    frames = list(V.sample_frames(clip, every=2.5))
    assert [f.time for f in frames] == pytest.approx([0.0, 2.5, 5.0, 7.5])
    assert seeks == [2.5, 0.0]  # the overshoot, then the fallback from the last decoded frame, then no more seeks


def test_max_frames_and_bad_every(clip):
    assert [f.time for f in V.sample_frames(clip, every=1.0, max_frames=3)] == pytest.approx([0, 1, 2])
    with pytest.raises(VideoError):
        list(V.sample_frames(clip, every=0))


def test_scene_changes(clip):
    frames = list(V.sample_frames(clip, every=0, scenes=True))
    assert len(frames) == len(SCENES)
    assert [colour_of(f.image) for f in frames] == SCENES
    for f, change in zip(frames, (0, 2, 4, 6, 8)):
        assert change - 1e-6 <= f.time <= change + 1 / FPS + 1e-6
    # `every` stays a floor: scene cuts on top of the 3 s grid
    times = [f.time for f in V.sample_frames(clip, every=3.0, scenes=True)]
    assert times == pytest.approx([0, 2, 3, 4, 6, 8, 9])


CUE = re.compile(r"(\d+)\n(\d\d):(\d\d):(\d\d)[,.](\d{3}) --> (\d\d):(\d\d):(\d\d)[,.](\d{3})\n(.+)\n?")
VTT_CUE = re.compile(r"(\d\d):(\d\d):(\d\d)\.(\d{3}) --> (\d\d):(\d\d):(\d\d)\.(\d{3})\n(.+)")


def _secs(h, m, s, ms) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def parse_srt(text: str) -> list[tuple[int, float, float, str]]:
    blocks = text.strip("\n").split("\n\n")
    cues = []
    for block in blocks:
        m = CUE.fullmatch(block)
        assert m, f"malformed SRT cue: {block!r}"
        g = m.groups()
        cues.append((int(g[0]), _secs(*g[1:5]), _secs(*g[5:9]), g[9]))
    return cues


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    header, *blocks = text.strip("\n").split("\n\n")
    assert header == "WEBVTT"
    cues = []
    for block in blocks:
        m = VTT_CUE.fullmatch(block)
        assert m, f"malformed VTT cue: {block!r}"
        g = m.groups()
        cues.append((_secs(*g[0:4]), _secs(*g[4:8]), g[8]))
    return cues


def _check_cues(cues, captions):
    assert [c[-1] for c in cues] == captions
    for (s, e, _), nxt in zip(cues, cues[1:] + [None]):
        assert e > s and (nxt is None or nxt[0] >= e - 1e-9)


def test_writers(clip, tmp_path):
    res = V.tag_video(clip, fake_captioner, every=1.0)
    captions = [s.caption for s in res.segments]
    V.write_results([res], tmp_path / "out.srt")
    srt = parse_srt((tmp_path / "out.srt").read_text())
    assert [c[0] for c in srt] == list(range(1, len(SCENES) + 1))
    _check_cues([c[1:] for c in srt], captions)
    assert srt[1][1] == 2.0 and srt[-1][2] == pytest.approx(res.duration, abs=1e-3)
    V.write_results([res], tmp_path / "out.vtt")
    _check_cues(parse_vtt((tmp_path / "out.vtt").read_text()), captions)
    V.write_results([res, res], tmp_path / "all.json")
    data = json.loads((tmp_path / "all.json").read_text())
    assert len(data["videos"]) == 2 and data["videos"][0]["segments"][0]["tags"] == ["screen"]
    V.write_results([res], tmp_path / "all.csv")
    rows = list(csv.DictReader((tmp_path / "all.csv").open()))
    assert [r["caption"] for r in rows] == captions and rows[0]["tags"] == "screen"
    assert (rows[0]["caption_tags"], rows[0]["imagenet_tags"]) == ("screen", "")
    assert float(rows[1]["start"]) == 2.0 and rows[0]["video"] == str(clip)
    # several videos + SRT: one file per video next to the output
    other = V.VideoResult("x/other.mp4", res.duration, res.times, res.captions, res.segments[:2], res.tags)
    written = V.write_results([res, other], tmp_path / "subs.vtt")
    assert [p.name for p in written] == ["subs.clip.vtt", "subs.other.vtt"]
    assert len(parse_vtt(written[1].read_text())) == 2
    twin = V.VideoResult("elsewhere/clip.mp4", res.duration, res.times, res.captions, res.segments, res.tags)
    written = V.write_results([res, twin], tmp_path / "subs.srt")
    assert [p.name for p in written] == ["subs.clip-1.srt", "subs.clip-2.srt"] and all(p.exists() for p in written)
    with pytest.raises(VideoError, match="unknown output format"):
        V.write_results([res], tmp_path / "out.txt")


def test_timestamps_and_degenerate_cues(tmp_path):
    assert V.format_timestamp(3723.4567, ",") == "01:02:03,457"
    assert V.format_timestamp(0, ".") == "00:00:00.000"
    segs = V.merge_segments([0.0, 1.0, 1.0], ["a cat", "", "a dog"], 1.0)
    V.write_srt(segs, tmp_path / "x.srt")
    cues = parse_srt((tmp_path / "x.srt").read_text())
    assert [c[0] for c in cues] == [1, 2, 3] and cues[1][3] == "(no caption)"
    assert all(e > s for _, s, e, _ in cues)


def test_merge_segments_similarity_and_majority():
    times = [0.0, 1.0, 2.0, 3.0, 4.0]
    caps = ["a dog on grass", "a dog on the grass", "a dog on the grass", "a cat on a sofa", "a cat on a sofa"]
    assert len(V.merge_segments(times, caps, 5.0)) == 3
    segs = V.merge_segments(times, caps, 5.0, similarity=0.6)
    assert [(s.start, s.end) for s in segs] == [(0.0, 3.0), (3.0, 5.0)]
    assert segs[0].caption == "a dog on the grass" and segs[0].frames == [0, 1, 2]
    tie = V.merge_segments([0.0, 1.0], ["a big dog", "a dog big"], 2.0, similarity=0.9)
    assert len(tie) == 1 and tie[0].caption == "a big dog"
    assert V.merge_segments([], [], 3.0) == []


def make_audio(path: Path, codec: str) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=16000)
        stream.layout = "mono"
        fmt = stream.codec_context.codec.audio_formats[0].name
        for i in range(10):
            samples = (np.sin(np.arange(1024) / 8.0) * (10000 if fmt.startswith("s16") else 0.3))
            arr = samples.astype(np.int16 if fmt.startswith("s16") else np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(arr, format=fmt.rstrip("p") + ("p" if fmt.endswith("p") else ""),
                                               layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 16000, i * 1024, Fraction(1, 16000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def _bad_inputs(tmp_path: Path, clip: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.mp4"
    empty.touch()
    truncated = tmp_path / "truncated.mp4"
    data = clip.read_bytes()
    truncated.write_bytes(data[: int(len(data) * 0.3)])
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    return {"missing": tmp_path / "missing.mp4", "empty": empty, "truncated": truncated, "text": text,
            "wav": make_audio(tmp_path / "tone.wav", "pcm_s16le"), "m4a": make_audio(tmp_path / "tone.m4a", "aac"),
            "directory": tmp_path}


@pytest.mark.parametrize("kind,message", [("missing", "no such file"), ("empty", "empty file"),
                                          ("truncated", "not a readable video"), ("text", "not a readable video"),
                                          ("wav", "no video stream"), ("m4a", "no video stream"),
                                          ("directory", "not a file")])
def test_bad_inputs(tmp_path, clip, kind, message):
    path = _bad_inputs(tmp_path, clip)[kind]
    for call in (lambda: V.probe(path), lambda: list(V.sample_frames(path)),
                 lambda: V.tag_video(path, fake_captioner)):
        with pytest.raises(VideoError) as info:
            call()
        msg = str(info.value)
        assert isinstance(info.value, CaptionerError) and "\n" not in msg
        assert str(path) in msg and message in msg


def test_unsupported_codec_and_empty_streams(tmp_path, clip):
    tag = {"libx264": b"avc1", "mpeg4": b"mp4v"}[CODEC]
    odd = tmp_path / "odd.mp4"
    odd.write_bytes(clip.read_bytes().replace(tag, b"zzzz"))
    with pytest.raises(VideoError, match="odd.mp4: unsupported video codec"):
        V.probe(odd)
    for ext in ("mp4", "mkv"):  # a video stream without a single frame
        path = tmp_path / f"noframes.{ext}"
        with av.open(str(path), "w") as out:
            stream = out.add_stream(CODEC, rate=FPS)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            out.start_encoding()
        with pytest.raises(VideoError, match=re.escape(str(path))):
            V.tag_video(path, fake_captioner)


@pytest.mark.parametrize("every,scenes", [(1.0, False), (2.5, False), (0, True)])
def test_truncated_faststart_mp4(tmp_path, every, scenes):
    """moov at the front: the file opens and the first seconds decode, then the data stops short of the
    stream's duration; that is reported as a VideoError, not a silently short result."""
    data = make_video(tmp_path / "fast.mp4", options={"movflags": "faststart"}).read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: data.find(b"mdat") + (len(data) - data.find(b"mdat")) // 2])
    assert V.probe(cut) == pytest.approx(SECONDS, abs=0.15)
    with pytest.raises(VideoError, match=r"cut\.mp4: .*video data ends at \d+\.\d s of 10\.0 s"):
        V.tag_video(cut, fake_captioner, every=every, scenes=scenes)


def test_frames_dir(clip, tmp_path):
    out = tmp_path / "frames"
    res = V.tag_video(clip, fake_captioner, every=2.5, frames_dir=out)
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{t:010.3f}.jpg" for t in res.times] == ["000000.000.jpg", "000002.500.jpg",
                                                               "000005.000.jpg", "000007.500.jpg"]
    with Image.open(out / "000002.500.jpg") as im:
        assert im.format == "JPEG" and im.size == (64, 48) and colour_of(im) == "green"
