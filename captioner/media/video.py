"""Video tagging: sample frames by stream timestamps (seeking when sampling is sparse, optionally on scene
changes), caption them in batches with an injected `caption_fn`, merge consecutive frames whose captions
agree into timestamped segments, tag them with objects (captioner.media.tags: caption nouns and ImageNet labels)
and write SRT / VTT / JSON / CSV.

Times are seconds from the start of the video stream (its `start_time` is subtracted).

Seek rule: frames are decoded forward, and the decoder seeks (to the keyframe at or before the next target)
only when the next target lies more than `gap` seconds past the last decoded frame, where `gap` is the
largest of SEEK_GAP (1.5 s), the keyframe spacing seen while decoding, and target - keyframe for any seek
that landed no further than where decoding already was. So dense sampling never seeks, sparse sampling seeks
only when that skips at least a keyframe interval of decoding, and a seek that overshoots its target (a bad
index) switches to plain forward decoding, so the frame picked is always the first one at or after each target.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Callable, Iterator, Sequence

import av
import numpy as np
from PIL import Image

from ..errors import CaptionerError
from ..model.vocab import tokenize
from ..options import DEFAULT_SCENE_THRESHOLD
from .tags import FrameCaption, Labels, Tag, tag

SEEK_GAP = 1.5  # seconds: never seek over less than this
EPS = 1e-6
_AV_ERRORS = (av.error.FFmpegError, OSError, ValueError, EOFError, UnicodeDecodeError)


class VideoError(CaptionerError):
    """A video that cannot be read: missing, empty, truncated, corrupt, no video stream, unsupported codec."""


@dataclass
class Frame:
    time: float
    image: Image.Image


CaptionFn = Callable[[list[Image.Image]], Sequence["str | FrameCaption"]]


@dataclass
class Segment:
    start: float
    end: float
    caption: str
    tags: list[str]  # every tag (tag_sources' names, in order)
    frames: list[int]  # indices into the sampled frames
    tag_sources: list[Tag] = field(default_factory=list)  # each tag with its source (caption / imagenet), score


@dataclass
class VideoResult:
    path: str
    duration: float
    times: list[float]
    captions: list[str]
    segments: list[Segment]
    tags: list[str]
    tag_sources: list[Tag] = field(default_factory=list)
    labels: list[Labels] = field(default_factory=list)  # per sampled frame; empty without a classifier
    warnings: list[str] = field(default_factory=list)  # e.g. a damaged file's count of undecodable packets

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def _open(path: str | Path) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    """Open `path` and its first video stream; every failure becomes a one-line VideoError naming the file."""
    p = Path(path)
    if not p.exists():
        raise VideoError(f"{p}: no such file")
    if not p.is_file():
        raise VideoError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise VideoError(f"{p}: empty file (0 bytes)")
    why = lambda exc: getattr(exc, "strerror", None) or str(exc) or type(exc).__name__  # noqa: E731
    try:
        container = av.open(str(p))
    except _AV_ERRORS as exc:
        raise VideoError(f"{p}: not a readable video (truncated, corrupt or unknown format: {why(exc)})") from exc
    try:
        if not container.streams.video:
            raise VideoError(f"{p}: {_no_video(container)}")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise VideoError(f"{p}: unsupported video codec")
        stream.thread_type = "AUTO"
        yield container, stream
    except _AV_ERRORS as exc:
        raise VideoError(f"{p}: cannot decode video (truncated, corrupt or unsupported codec: {why(exc)})") from exc
    finally:
        container.close()


def _no_video(container: av.container.InputContainer) -> str:
    """Why a container that opened has no video stream: audio only, other streams only, or none readable."""
    streams = list(container.streams)
    if not streams:
        return ("no video stream: no readable stream at all (the container's index is corrupt, or the video "
                "track has no frames)")
    kinds = sorted({s.type for s in streams})
    if kinds == ["audio"]:
        return "no video stream (audio only: " + ", ".join(sorted({s.codec_context.name for s in streams
                                                                   if s.codec_context})) + ")"
    return f"no video stream (only {', '.join(kinds)} streams)"


@dataclass
class Damage:
    """What a damaged file cost while decoding: packets the decoder refused (skipped) and frames it decoded but
    flagged as corrupt (errors concealed)."""
    bad_packets: int = 0
    corrupt_frames: int = 0

    def warning(self) -> str:
        if not (self.bad_packets or self.corrupt_frames):
            return ""
        return (f"damaged video: {self.bad_packets} undecodable packets skipped, {self.corrupt_frames} frames "
                "decoded with errors; captions near them may be wrong")


def _decode(container: av.container.InputContainer, stream, t0: float,
            damage: Damage | None = None) -> Iterator[tuple[float, av.VideoFrame]]:
    """(time, frame) from the current position; frames without a timestamp are skipped, and so are packets the
    decoder refuses as invalid data (a lightly corrupt file): counted in `damage`."""
    damage = damage if damage is not None else Damage()
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.error.InvalidDataError:
            damage.bad_packets += 1
            continue
        for frame in frames:
            damage.corrupt_frames += bool(frame.is_corrupt)
            if frame.time is not None:
                yield frame.time - t0, frame


def _seek(container: av.container.InputContainer, stream, t0: float, t: float,
          damage: Damage | None = None) -> Iterator[tuple[float, av.VideoFrame]]:
    container.seek(max(0, int((t + t0) / stream.time_base)), stream=stream, backward=True, any_frame=False)
    return _decode(container, stream, t0, damage)


def _span(stream) -> tuple[float, float | None]:
    """(start offset, duration) of the stream in seconds; duration None when the stream does not say."""
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    return start, float(stream.duration * stream.time_base) if stream.duration else None


def probe(path: str | Path) -> float:
    """Duration in seconds, after checking that the file has a decodable video stream."""
    with _open(path) as (container, stream):
        t0, duration = _span(stream)
        frames = _decode(container, stream, t0)
        first = next(frames, None)
        if first is None:
            raise VideoError(f"{path}: no decodable video frames")
        duration = duration or (container.duration or 0) / av.time_base
        if not duration:  # no metadata: decode to the end
            duration = max(t for t, _ in chain([first], frames)) + 1 / float(stream.average_rate or 25)
    if duration <= 0:
        raise VideoError(f"{path}: zero duration")
    return duration


def signature(frame: av.VideoFrame) -> np.ndarray:
    """A frame's colour signature: its 16x16 RGB thumbnail, 0-1."""
    return frame.to_ndarray(width=16, height=16, format="rgb24").astype(np.float32) / 255


def scene_change(a: np.ndarray, b: np.ndarray) -> float:
    """How much two consecutive frames differ: mean absolute difference of their signatures, 0-1."""
    return float(np.abs(a - b).mean())


def _pick(container, stream, every: float, scenes: bool, threshold: float,
          damage: Damage | None = None) -> Iterator[tuple[float, av.VideoFrame]]:
    t0, end = _span(stream)
    frames = _decode(container, stream, t0, damage)
    target, last, gap, key, prev = 0.0, 0.0, (math.inf if scenes else SEEK_GAP), None, None
    while True:
        if target - last > gap:  # seeking skips at least one keyframe interval of decoding
            frames, key = _seek(container, stream, t0, target, damage), None
            first = next(frames, None)
            if first is None:  # nothing at or after the target: the end (or, before `end`, a truncated file)
                last = max(last, target)
                break
            if first[0] > target + EPS:  # overshot: the index is not precise, decode forward from `last`
                gap, frames = math.inf, _seek(container, stream, t0, last, damage)
            else:
                if first[0] <= last:  # landed where we already were: keyframes are at least this far apart
                    gap = max(gap, target - first[0])
                frames = chain([first], frames)
        for t, frame in frames:
            last = t
            if frame.key_frame:
                gap, key = (gap if key is None else max(gap, t - key)), t
            sig = signature(frame) if scenes else None  # scenes never seek: every frame is compared with the last
            cut = scenes and (prev is None or scene_change(prev, sig) > threshold)
            prev = sig
            if cut or t >= target - EPS:  # next target: the first grid point after t
                target = (math.floor((t + EPS) / every) + 1) * every if every > 0 else math.inf
                yield t, frame
                break
        else:
            break
    if end is not None and last < end - 1.0 - 1 / float(stream.average_rate or 25):
        raise EOFError(f"video data ends at {last:.1f} s of {end:.1f} s")


def sample_frames(path: str | Path, every: float = 1.0, scenes: bool = False,
                  scene_threshold: float = DEFAULT_SCENE_THRESHOLD, max_frames: int | None = None,
                  damage: Damage | None = None) -> Iterator[Frame]:
    """The first frame at or after each of 0, every, 2*every, ... (stream timestamps), plus, with `scenes`,
    each frame whose colour signature differs from the frame just before it by more than `scene_threshold`
    (`scene_change`: mean absolute difference of 16x16 RGB thumbnails, 0-1): hard cuts, while fades, pans
    and zooms change little from one frame to the next. every <= 0 (with scenes) samples cuts only.
    `damage`, when given, counts the packets skipped and frames flagged corrupt on the way."""
    if every <= 0 and not scenes:
        raise VideoError("every must be > 0 seconds (or 0 together with scenes)")
    with _open(path) as (container, stream):
        picks = _pick(container, stream, every, scenes, scene_threshold, damage)
        for t, frame in islice(picks, max_frames):
            yield Frame(t, frame.to_image())


def merge_segments(times: Sequence[float], captions: Sequence[str], duration: float,
                   similarity: float = 1.0, labels: Sequence[Labels] = ()) -> list[Segment]:
    """Merge consecutive frames whose caption equals (similarity 1.0) or has token Jaccard >= similarity
    with the segment's first caption. A segment runs to the next segment's first frame (the last to
    `duration`); its caption is the most common one in it (ties: earliest); its tags come from its
    frames' captions and `labels` (per frame ImageNet labels, optional)."""
    def same(a: str, b: str) -> bool:
        if similarity >= 1.0:
            return a == b
        sa, sb = set(tokenize(a)), set(tokenize(b))
        return len(sa & sb) / len(sa | sb) >= similarity if sa | sb else True

    groups: list[list[int]] = []
    for i, caption in enumerate(captions):
        if groups and same(captions[groups[-1][0]], caption):
            groups[-1].append(i)
        else:
            groups.append([i])
    ends = [times[g[0]] for g in groups[1:]] + [max(duration, times[-1]) if times else duration]
    segments = []
    for g, end in zip(groups, ends):
        caps = [captions[i] for i in g]
        tags = tag(caps, [labels[i] for i in g] if labels else [])
        segments.append(Segment(times[g[0]], end, Counter(caps).most_common(1)[0][0], [t.tag for t in tags], g, tags))
    return segments


def tag_video(path: str | Path, caption_fn: CaptionFn, every: float = 1.0, scenes: bool = False,
              batch_size: int = 16, similarity: float = 1.0, frames_dir: Path | None = None,
              max_frames: int | None = None, progress: Callable[[int], None] | None = None,
              scene_threshold: float = DEFAULT_SCENE_THRESHOLD) -> VideoResult:
    """Sample, caption in batches, merge into segments and tag. `progress(n)` gets the number of frames
    captioned so far after each batch. With `frames_dir`, each sampled frame is saved as `SSSSSS.mmm.jpg`."""
    duration = probe(path)
    if frames_dir is not None:
        Path(frames_dir).mkdir(parents=True, exist_ok=True)
    times: list[float] = []
    captions: list[str] = []
    labels: list[Labels] = []
    damage = Damage()
    frames = sample_frames(path, every, scenes, scene_threshold, max_frames, damage)
    while batch := list(islice(frames, max(1, batch_size))):
        out = [o if isinstance(o, FrameCaption) else FrameCaption(o) for o in caption_fn([f.image for f in batch])]
        if len(out) != len(batch):
            raise VideoError(f"{path}: captioner returned {len(out)} captions for {len(batch)} frames")
        for f in batch if frames_dir is not None else ():
            f.image.save(Path(frames_dir) / f"{max(0.0, f.time):010.3f}.jpg", quality=90)
        times += [f.time for f in batch]
        captions += [o.text for o in out]
        labels += [o.labels for o in out]
        if progress is not None:
            progress(len(times))
    if not times:
        raise VideoError(f"{path}: no frames sampled")
    duration = max(duration, times[-1])
    labels = labels if any(labels) else []
    segments = merge_segments(times, captions, duration, similarity, labels)
    tags = tag(captions, labels)
    return VideoResult(str(path), duration, times, captions, segments, [t.tag for t in tags], tags, labels,
                       [w for w in [damage.warning()] if w])


def format_timestamp(seconds: float, sep: str = ",") -> str:
    """HH:MM:SS<sep>mmm (SRT: ',', VTT: '.')."""
    ms = max(0, round(seconds * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def _cues(segments: Sequence[Segment], sep: str) -> Iterator[str]:
    """One cue per segment, text = the caption on one line (tags are in JSON/CSV); end > start always."""
    for seg in segments:
        start = max(0.0, seg.start)
        end = max(seg.end, start + 0.001)
        text = " ".join(seg.caption.split()).replace("-->", "->") or "(no caption)"
        yield f"{format_timestamp(start, sep)} --> {format_timestamp(end, sep)}\n{text}\n"


def write_srt(segments: Sequence[Segment], path: str | Path) -> None:
    cues = [f"{i}\n{cue}" for i, cue in enumerate(_cues(segments, ","), 1)]
    Path(path).write_text("\n".join(cues), encoding="utf-8")


def write_vtt(segments: Sequence[Segment], path: str | Path) -> None:
    Path(path).write_text("\n".join(["WEBVTT\n", *_cues(segments, ".")]), encoding="utf-8")


def write_json(results: Sequence[VideoResult], path: str | Path) -> None:
    Path(path).write_text(json.dumps({"videos": [r.to_dict() for r in results]}, indent=2), encoding="utf-8")


def write_csv(results: Sequence[VideoResult], path: str | Path) -> None:
    """One row per segment: video, start, end, caption, tags (all, ';'-separated), then the same tags by
    source: caption_tags (nouns of the captions) and imagenet_tags (the encoder's ImageNet labels)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["video", "start", "end", "caption", "tags", "caption_tags", "imagenet_tags"])
        for r in results:
            for s in r.segments:
                by = {src: ";".join(t.tag for t in s.tag_sources if t.source == src) for src in ("caption", "imagenet")}
                w.writerow([r.path, f"{s.start:.3f}", f"{s.end:.3f}", s.caption, ";".join(s.tags), by["caption"],
                            by["imagenet"]])


def write_results(results: Sequence[VideoResult], path: str | Path) -> list[Path]:
    """Write by suffix (.json, .csv: all videos in one file; .srt, .vtt: subtitles are per video, so with
    several videos one file per video is written next to `path` as `<out-stem>.<video-stem><suffix>`).
    Returns the paths written."""
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in (".json", ".csv", ".srt", ".vtt"):
        raise VideoError(f"{out}: unknown output format {suffix or '(no suffix)'!r}; use .srt, .vtt, .json or .csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".json", ".csv"):
        (write_json if suffix == ".json" else write_csv)(results, out)
        return [out]
    writer = write_srt if suffix == ".srt" else write_vtt
    if len(results) == 1:  # one video: exactly `path`
        writer(results[0].segments, out)
        return [out]
    stems = [Path(r.path).stem for r in results]
    written = [out.with_name(f"{out.stem}.{stem}{'' if stems.count(stem) == 1 else f'-{i}'}{out.suffix}")
               for i, stem in enumerate(stems, 1)]
    for r, target in zip(results, written):
        writer(r.segments, target)
    return written
