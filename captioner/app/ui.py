"""The Gradio web app: image, batch and video tabs around one shared `Captioner`.

Start it with `python app.py` (see `python app.py --help`). Every tab is also an API endpoint
(`/caption`, `/caption_batch`, `/caption_video`); from Python, with `pip install gradio_client`:

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/", analytics_enabled=False)  # no telemetry call to huggingface.co
    text, alternatives, attention = client.predict(handle_file("photo.jpg"), 3, 20, 3, api_name="/caption")

Nothing here leaves the machine: analytics are off, fonts are Gradio's bundled ones (no CDN), and
`share` is off unless asked for.
"""

from __future__ import annotations

import contextlib
import csv
import html
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ..errors import CaptionerError  # noqa: E402
from ..media.images import IMAGE_EXTENSIONS  # noqa: E402
from ..options import BEAM, DEFAULT_SCENE_THRESHOLD, EVERY, MAX_LEN, TOPK, Range  # noqa: E402

if TYPE_CHECKING:  # either engine (pipeline/load.py): the light one has no torch to import
    from ..pipeline.captioner import Captioner

MiB = 2**20
MAX_IMAGE_BYTES = 50 * MiB  # one image (image tab, each batch file)
MAX_UPLOAD = "500mb"  # any upload: videos and zip archives (Gradio's per-file limit)
MAX_ZIP_FILES = 2000
MAX_ZIP_BYTES = 512 * MiB  # uncompressed total of one archive
MAX_VIDEO_FRAMES = 600
OVERLAY_SIDE = 320  # longest side of the attention overlays
THUMB_SIDE = 160
GALLERY_LIMIT = 500  # thumbnails shown in the batch gallery (the table and files have every row)
EXAMPLES_DIR = Path(__file__).parents[1] / "assets" / "examples"

# Jet-like colour map: anchors at 0, .25, .5, .75, 1 (dark blue -> cyan -> yellow -> red).
_CMAP_X = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_CMAP_RGB = np.array([[0, 0, 128], [0, 160, 255], [120, 255, 120], [255, 200, 0], [200, 0, 0]], np.float32)

CSS = """
#caption textarea {font-size: 1.3rem; font-weight: 600;}
/* galleries grow with their content (Gradio's default keeps 450 px however few the items) */
#attention .grid-wrap.fixed-height, #batch-gallery .grid-wrap.fixed-height,
#video-frames .grid-wrap.fixed-height {min-height: 12rem;}
/* the attention maps all show (no inner scroll box), and no gallery's first row sits under its floating label */
#attention .grid-wrap.fixed-height {max-height: none !important; overflow-y: visible !important;}
#attention .grid-container, #batch-gallery .grid-container, #video-frames .grid-container {
  padding-top: 34px !important;}
/* the upload list: up to ~5 files in view, then a scroll bar that is always drawn (the count is in the label) */
#batch-files .file-preview-holder {max-height: 22rem !important; overflow-y: scroll !important;}
/* batch thumbnails and video frames: fixed cells (Gradio stretches a few items over the whole width), each
   image at most its own size (never upscaled, so never blurred), the whole caption below it */
#batch-gallery .grid-container, #video-frames .grid-container {
  grid-template-columns: repeat(auto-fill, 176px) !important; grid-template-rows: none !important;
  grid-auto-rows: auto !important; align-items: start;}
#batch-gallery .thumbnail-item, #video-frames .thumbnail-item {
  aspect-ratio: auto !important; height: auto !important; display: flex; flex-direction: column;
  align-items: center; padding: 4px;}
#batch-gallery .thumbnail-item > img, #video-frames .thumbnail-item > img {
  width: auto !important; height: auto !important; max-width: 100% !important; max-height: 160px !important;
  object-fit: contain !important; flex: none;}
#batch-gallery .caption-label, #video-frames .caption-label {
  position: static !important; max-width: 100% !important; width: 100%; white-space: normal !important;
  overflow: visible !important; text-overflow: clip !important; overflow-wrap: anywhere; border: none !important;
  background: none !important; padding: 4px 2px 0 !important; opacity: 1 !important; line-height: 1.3;}
"""


# ----------------------------------------------------------------------- attention -------
def colormap(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] (any shape) -> RGB float32 (..., 3) in [0, 255]."""
    v = np.clip(values, 0.0, 1.0)
    return np.stack([np.interp(v, _CMAP_X, _CMAP_RGB[:, c]) for c in range(3)], -1).astype(np.float32)


ATTENTION_SCALE = 3.0  # the absolute scale's top: this many times the uniform weight 1/L


def attention_levels(attention: np.ndarray, stretch: bool = False) -> np.ndarray:
    """One (g, g) map -> colour levels in [0, 1]. Absolute (default): the map normalised to sum 1, then 0 is
    weight 0 and 1 is ATTENTION_SCALE x uniform (1/L) or more, so a flat map looks flat (uniform is 1/3 of
    the way). stretch: each map from its own minimum to its own maximum (shows the shape of a flat map)."""
    att = np.asarray(attention, np.float32)
    if stretch:
        att = att - att.min()
        return att / att.max() if att.max() > 0 else att
    total = float(att.sum())
    att = att / total if total > 0 else np.full_like(att, 1.0 / att.size)
    return np.clip(att * att.size / ATTENTION_SCALE, 0.0, 1.0)


def attention_overlay(image: Image.Image, attention: np.ndarray, alpha: float = 0.55, stretch: bool = False
                      ) -> Image.Image:
    """Heat map of one (g, g) attention map over `image`: its levels (attention_levels) upsampled bicubic to the
    image size, colour-mapped and alpha-blended (more opaque where attention is high)."""
    rgb = np.asarray(image.convert("RGB"), np.float32)
    h, w = rgb.shape[:2]
    att = attention_levels(attention, stretch)
    up = np.asarray(Image.fromarray(att, mode="F").resize((w, h), Image.Resampling.BICUBIC), np.float32)
    up = np.clip(up, 0.0, 1.0)
    a = (alpha * (0.35 + 0.65 * up))[..., None]
    out = (1 - a) * rgb + a * colormap(up)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def colour_bar(stretch: bool = False) -> str:
    """HTML legend of the heat maps' colours, for the scale they are drawn on."""
    stops = ", ".join(f"rgb({r:.0f},{g:.0f},{b:.0f}) {x * 100:.0f}%" for x, (r, g, b) in zip(_CMAP_X, _CMAP_RGB))
    if stretch:
        ticks = [(0, "each map's minimum"), (100, "its maximum")]
        note = "Each map stretched to its own range: a flat map looks as sharp as a peaked one."
    else:
        ticks = [(100 * k / ATTENTION_SCALE, "0" if k == 0 else ("uniform" if k == 1 else f"{k:g}×"))
                 for k in range(int(ATTENTION_SCALE))] + [(100, f"≥ {ATTENTION_SCALE:g}× uniform")]
        note = ("Weight of each grid cell on one scale for every map: uniform is 1/(cells); "
                "a map that is all one colour did not look anywhere in particular.")
    labels = "".join(f'<span style="position:absolute;left:{x:.1f}%;transform:translateX(-{min(max(x, 0), 100):.0f}%);'
                     f'white-space:nowrap">{html.escape(t)}</span>' for x, t in ticks)
    return (f'<div class="attention-bar"><div style="height:12px;border-radius:3px;'
            f'background:linear-gradient(to right, {stops})"></div>'
            f'<div style="position:relative;height:1.3em;font-size:0.8rem">{labels}</div>'
            f'<div style="font-size:0.8rem;opacity:0.8">{html.escape(note)}</div></div>')


def log_probabilities(score: float, words: int, length_penalty: float) -> tuple[float, float]:
    """(log P(caption), its average per token) from a beam's ranking score = log P / (words + 1)**penalty
    (search.py; the + 1 is the end token). The average is comparable across caption lengths, the sum is not."""
    tokens = words + 1
    total = float(score) * tokens ** length_penalty
    return total, total / tokens


ATTENTION_LABEL = "Attention: where the model looked for each word"  # one line: a longer label covers the first row
ALTERNATIVE_HEADERS = ["caption", "log-prob", "per word"]
ALTERNATIVES_LABEL = ("Alternatives, best first (log-prob: natural log of the caption's probability, summed over "
                      "its words and the end token; per word: that sum / (words + 1), comparable across lengths)")


def _fit(image: Image.Image, side: int) -> Image.Image:
    image = image.convert("RGB")
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    return image


# -------------------------------------------------------------------------- helpers ------
class WorkDir:
    """Per-request output folders under one temporary root (removed at exit); folders older than
    `keep_s` are pruned when a new one is made. Gradio copies returned files into its own cache."""

    def __init__(self, keep_s: float = 3600.0):
        self._tmp = tempfile.TemporaryDirectory(prefix="captioner-ui-")
        self.root, self.keep_s = Path(self._tmp.name), keep_s

    def new(self, kind: str) -> Path:
        now = time.time()
        for old in self.root.iterdir():
            try:
                if now - old.stat().st_mtime > self.keep_s:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass
        return Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=self.root))


class StatusLog:
    """The last failure of each browser session, shown in the tab's status box: a gr.Error's toast fades
    after a few seconds, the box keeps the reason until the next run of that tab."""

    def __init__(self) -> None:
        self._last: dict[str, str] = {}

    @contextlib.contextmanager
    def reporting(self, request: gr.Request | None) -> Any:
        try:
            yield
        except gr.Error as exc:
            self._record(request, str(exc.message))
            raise
        except Exception:
            self._record(request, "unexpected error (details in the server log)")
            raise

    def _record(self, request: gr.Request | None, message: str) -> None:
        if request is not None and request.session_hash:
            self._last[request.session_hash] = message

    def show(self, request: gr.Request) -> str:
        """The status box's text after a failed run (and the /*_status API: the caller's last failure)."""
        message = self._last.pop(getattr(request, "session_hash", None) or "", None)
        return f"**Failed:** {message}" if message else ""


def user_error(message: str, title: str = "Error") -> gr.Error:
    """An error the user caused (shown in the page, no traceback in the server log)."""
    return gr.Error(message, title=title, print_exception=False)


def _mb(n: int) -> str:
    return f"{n / MiB:.1f} MB"


def _check_size(path: str | Path, limit: int = MAX_IMAGE_BYTES) -> None:
    size = Path(path).stat().st_size
    if size > limit:
        raise user_error(f"{html.escape(Path(path).name)} is too large ({_mb(size)}, limit {_mb(limit)})")


def _user_message(exc: BaseException, path: str | Path | None = None) -> str:
    """An error for the browser: the server-side upload folder replaced by the file's own name, HTML-escaped
    (gr.Error renders HTML, and file names inside archives are attacker-chosen)."""
    text = str(exc)
    if path is not None:
        text = text.replace(str(path), Path(path).name)
    return html.escape(text, quote=False)


def in_range(value: Any, limit: Range, label: str) -> int | float:
    """An input's value checked against the CLI's limit for it (cliargs): the sliders keep a browser inside
    them, this keeps API calls (gradio_client, curl) there too."""
    try:
        return limit.check(value)
    except ValueError as exc:
        raise user_error(f"{label}: {html.escape(str(exc))}", title="Invalid input") from None


def _mmss(t: float) -> str:
    return f"{int(t // 60):02d}:{t % 60:04.1f}"


def _file_list(files: Any) -> list[Path]:
    if not files:
        return []
    if isinstance(files, (str, Path)):
        files = [files]
    return [Path(f if isinstance(f, (str, Path)) else getattr(f, "name", f)) for f in files]


def raw_upload(image: gr.Image) -> gr.Image:
    """Make a type="filepath" gr.Image hand the uploaded file to the function untouched (its path), so
    that captioner.media.images decodes it: one loader for the CLI and the app, with its EXIF, mode, size and
    corrupt-file handling and clear messages (gr.Image would open it with PIL first and fail with a
    traceback). Patched on the instance: a gr.Image subclass would make Gradio write a .pyi stub
    next to this module at import time."""
    original = image.preprocess

    def preprocess(payload):  # noqa: ANN001, ANN202 - gr.Image's contract
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return str(payload.path)
        return original(payload)

    image.preprocess = preprocess
    return image


# ------------------------------------------------------------------------ the tabs -------
def caption_image_fn(cap: Captioner, max_image_bytes: int = MAX_IMAGE_BYTES) -> Callable:
    def caption(image: str | None, beam: float, max_len: float, topk: float, stretch: bool = False,
                warn: bool = True):
        """Caption one image. Returns the caption, a table of alternatives (caption, log-prob, per word) and one
        attention heat map per word (gallery items labelled with the word), on the absolute scale unless
        `stretch` (each map to its own range). warn=False: no toasts (a redraw of what was already said)."""
        from ..media.images import ImageError, load_image, size_warning

        beam, max_len, topk = (in_range(beam, BEAM, "Beam size"), in_range(max_len, MAX_LEN, "Max length"),
                               in_range(topk, TOPK, "Alternatives"))
        if not image:
            raise user_error("Upload an image first (or pick an example).")
        _check_size(image, max_image_bytes)
        try:
            pil = load_image(image)
        except ImageError as exc:
            raise user_error(_user_message(exc, image)) from None
        try:
            c = cap.caption([pil], beam=int(beam), max_len=int(max_len), topk=int(topk))[0]
        except CaptionerError as exc:
            raise user_error(_user_message(exc)) from None
        from ..lite.search import score_warning

        for w in (size_warning(pil), score_warning(c.score, cap.search_cfg.length_penalty)):
            if w and warn:  # as the CLI says it: a toast, the caption is still shown
                gr.Warning(w[0].upper() + w[1:] + ".")
        penalty = cap.search_cfg.length_penalty
        alternatives = [[text, *(round(v, 3) for v in log_probabilities(score, len(text.split()), penalty))]
                        for text, score in c.alternatives]
        small = _fit(pil, OVERLAY_SIDE)
        maps = [(attention_overlay(small, att, stretch=bool(stretch)), word) for word, att in zip(c.words, c.attention)]
        return c.text, alternatives, maps

    return caption


def upload_count(files: list[str] | None) -> str:
    """The line under the Batch upload list: how many files it holds (the list scrolls past ~5)."""
    n = len(files or [])
    if not n:
        return "No files yet: drop images or .zip archives above."
    more = " (scroll the list to see them all)" if n > 5 else ""
    return f"{n} file{'s' if n != 1 else ''} selected{more}."


BATCH_HEADERS = ["file", "caption", "score", "error", "warning"]


def caption_batch_fn(cap: Captioner, work: WorkDir, max_zip_files: int = MAX_ZIP_FILES,
                     max_zip_bytes: int = MAX_ZIP_BYTES, max_image_bytes: int = MAX_IMAGE_BYTES) -> Callable:
    def caption_batch(files: list[str] | None, beam: float, progress=gr.Progress()):
        """Caption many images; .zip archives are unpacked (safely) and their images captioned.
        Returns thumbnails (gallery), a table (file, caption, score, error, warning) and CSV, JSONL and SQLite files
        (the SQLite library, searchable with `captioner search`, names each photo as the table does)."""
        from ..media.images import ImageError, extract_zip, is_zip, to_rgb
        from ..media.library import LibraryWriter
        from ..pipeline.batch import caption_files

        beam = in_range(beam, BEAM, "Beam size")
        paths = _file_list(files)
        if not paths:
            raise user_error("Upload some images or a .zip of images first.")
        out = work.new("batch")
        with tempfile.TemporaryDirectory(prefix="unzip-", dir=out) as unzip_root:
            items: list[tuple[Path, str, str]] = []  # (path on disk, name shown, error found before decoding)
            for i, p in enumerate(paths):
                if is_zip(p):
                    dest = Path(unzip_root) / f"{i:04d}"
                    dest.mkdir()
                    try:
                        got = extract_zip(p, dest, max_files=max_zip_files, max_total_bytes=max_zip_bytes)
                    except ImageError as exc:  # an unreadable, empty or crowded archive is one error row
                        items.append((p, p.name, " ".join(str(exc).replace(str(p), p.name).split())))
                        continue
                    # its images are captioned; each member left out (unsafe, encrypted, nested zip) is a row
                    items += [(m or p, f"{p.name}/{shown}", why) for shown, m, why in got.entries]
                else:
                    size = p.stat().st_size
                    too_big = f"file too large ({_mb(size)}, limit {_mb(max_image_bytes)})"
                    items.append((p, p.name, too_big if size > max_image_bytes else ""))
            if not items:
                raise user_error("No images found in the upload (in archives, only image files are read).")
            todo = [p for p, _, pre in items if not pre]
            progress((0, len(todo)), desc="captioning", unit="images")
            done = iter(caption_files(cap, todo, beam=int(beam), topk=3,
                                      progress=lambda n: progress((n, len(todo)), desc="captioning", unit="images")))
            rows, thumbs, records, stamps, small, low = [], [], [], {}, 0, 0
            for path, name, pre in items:
                r = {"caption": "", "score": None, "alternatives": [], "error": pre} if pre else next(done)
                err = r.get("error") or ""
                score = r.get("score")
                score = None if score is None else round(float(score), 4)
                warning = "" if err else r.get("warning") or ""
                rows.append([name, r.get("caption") or "", score, err, warning])
                stamps[name if name not in stamps else f"{name} ({len(rows)})"] = path.stat()
                small += "pixels (under" in warning
                low += "low confidence" in warning
                records.append({"file": name, "caption": r.get("caption") or "", "score": score,
                                "alternatives": [[t, round(float(sc), 4)] for t, sc in r.get("alternatives") or []],
                                "error": err or None, "warning": warning or None})
                if not err and len(thumbs) < GALLERY_LIMIT:
                    try:
                        with Image.open(path) as im:
                            im.draft("RGB", (THUMB_SIDE * 2, THUMB_SIDE * 2))
                            thumbs.append((_fit(to_rgb(im), THUMB_SIDE), f"{name}: {r.get('caption')}"))
                    except Exception:  # noqa: BLE001 - a thumbnail is decoration, the row stays
                        pass
        csv_path, jsonl_path = out / "captions.csv", out / "captions.jsonl"
        with csv_path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(BATCH_HEADERS)
            w.writerows(["" if v is None else v for v in row] for row in rows)
        with jsonl_path.open("w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        library = LibraryWriter(out / "captions.sqlite", cap.model_id, stamps, alternatives=True)
        try:
            library([{**rec, "path": name, "error": rec["error"] or ""} for name, rec in zip(stamps, records)])
        finally:
            library.close()
        failed = sum(1 for r in rows if r[3])
        notes = [f"{failed} of {len(rows)} files failed (see the error column)" * bool(failed),
                 f"{small} images under 32 px: their captions are unreliable" * bool(small),
                 f"{low} captions with low confidence (see the warning column)" * bool(low)]
        if any(notes):  # the table says which; the toast says how many
            gr.Warning("; ".join(n for n in notes if n))
        return thumbs, rows, str(csv_path), str(jsonl_path), str(out / "captions.sqlite")

    return caption_batch


SEGMENT_HEADERS = ["start", "end", "caption", "tags"]


def caption_video_fn(cap: Captioner, work: WorkDir, max_frames: int = MAX_VIDEO_FRAMES) -> Callable:
    def caption_video(video: str | None, every: float, scenes: bool, beam: float, progress=gr.Progress()):
        """Sample frames every `every` seconds (and on scene changes), caption them, merge into segments.
        Returns the sampled frames (gallery, "mm:ss.s caption"), the segments table and SRT and VTT files."""
        from ..media.tags import describe, frame_captioner
        from ..media.video import VideoError, probe, tag_video, write_srt, write_vtt

        beam = in_range(beam, BEAM, "Beam size")
        every = in_range(float(every or 0), EVERY, "Sample every (seconds)")
        if not video:
            raise user_error("Upload a video first.")
        if every <= 0 and not scenes:
            raise user_error("The sampling interval must be > 0 seconds (or 0 with scene changes on).")
        out = work.new("video")
        frames_dir = out / "frames"
        try:
            duration = probe(video)
            total = min(max_frames, int(duration / every) + 1) if every > 0 and not scenes else None
            progress((0, total), desc="captioning frames", unit="frames")
            caption_fn = frame_captioner(cap, cap.search_config(beam=int(beam)))
            res = tag_video(video, caption_fn, every=every, scenes=bool(scenes), frames_dir=frames_dir,
                            max_frames=max_frames, scene_threshold=DEFAULT_SCENE_THRESHOLD,
                            progress=lambda n: progress((n, total), desc="captioning frames", unit="frames"))
        except VideoError as exc:
            raise user_error(_user_message(exc, video)) from None
        for w in res.warnings:  # a damaged file: captioned, but said
            gr.Warning(w[0].upper() + w[1:] + ".")
        if len(res.times) >= max_frames:
            gr.Warning(f"Stopped after {max_frames} frames (at {_mmss(res.times[-1])}); "
                       "sample less often to cover the whole video.")
        frames = sorted(frames_dir.glob("*.jpg"))
        gallery = [(str(f), f"{_mmss(t)} {c}") for f, t, c in zip(frames, res.times, res.captions)]
        rows = [[round(s.start, 2), round(s.end, 2), s.caption, describe(s.tag_sources)] for s in res.segments]
        stem = Path(video).stem or "video"
        srt, vtt = out / f"{stem}.srt", out / f"{stem}.vtt"
        write_srt(res.segments, srt)
        write_vtt(res.segments, vtt)
        return gallery, rows, str(srt), str(vtt)

    return caption_video


def example_images() -> list[str]:
    return sorted(str(p) for p in EXAMPLES_DIR.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def build_demo(cap: Captioner, *, max_image_bytes: int = MAX_IMAGE_BYTES, max_zip_files: int = MAX_ZIP_FILES,
               max_zip_bytes: int = MAX_ZIP_BYTES, max_video_frames: int = MAX_VIDEO_FRAMES) -> gr.Blocks:
    """The Blocks app around one loaded `Captioner` (shared by every tab and request)."""
    work, status = WorkDir(), StatusLog()
    beam0, len0 = cap.search_cfg.beam, cap.search_cfg.max_len
    beam_max, len_max = min(int(BEAM.hi), max(8, beam0)), min(int(MAX_LEN.hi), max(40, len0))
    enc = cap.config.get("encoder", {}).get("name", "?")

    with gr.Blocks(title="captioner", delete_cache=(3600, 3600)) as demo:
        demo.captioner_workdir = work  # keep the temporary root alive as long as the app
        gr.Markdown(f"## captioner\nOffline image and video captioning: {enc} encoder + attention LSTM decoder. "
                    "Everything runs on this machine.")
        with gr.Tab("Image", id="image"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=1):
                    image = raw_upload(gr.Image(type="filepath", image_mode=None, label="Image", height=340,
                                                sources=["upload", "webcam", "clipboard"], elem_id="image-input"))
                    with gr.Row():
                        beam = gr.Slider(1, beam_max, value=beam0, step=1, label="Beam size",
                                         info="1 = greedy")
                        max_len = gr.Slider(3, len_max, value=len0, step=1, label="Max length (words)")
                        topk = gr.Slider(1, 8, value=3, step=1, label="Alternatives", info="top-N beams")
                    run = gr.Button("Caption", variant="primary", elem_id="caption-button")
                    examples = example_images()
                    if examples:
                        gr.Examples(examples, inputs=image, label="Examples (public-domain and CC0 photos)",
                                    examples_per_page=8)
                with gr.Column(scale=1):
                    caption = gr.Textbox(label="Caption", interactive=False, elem_id="caption", lines=1)
                    alternatives = gr.Dataframe(headers=ALTERNATIVE_HEADERS, datatype=["str", "number", "number"],
                                                label=ALTERNATIVES_LABEL, interactive=False, elem_id="alternatives",
                                                wrap=True, column_widths=["70%", "15%", "15%"])
                    attention = gr.Gallery(label=ATTENTION_LABEL,
                                           elem_id="attention", columns=4, height="auto", object_fit="contain",
                                           preview=False)
                    stretch = gr.Checkbox(False, label="Stretch each map to its own range", elem_id="attention-stretch",
                                          info="off: one scale for all maps, so a flat map looks flat")
                    bar = gr.HTML(colour_bar(False), elem_id="attention-bar")
            image_status = gr.Markdown(elem_id="image-status")
            caption_one = caption_image_fn(cap, max_image_bytes)

            def image_fn(image: str | None, beam: float, max_len: float, topk: float, stretch: bool,
                         request: gr.Request):
                with status.reporting(request):
                    return caption_one(image, beam, max_len, topk, stretch)

            inputs = [image, beam, max_len, topk, stretch]
            _with_status(run.click(image_fn, inputs, [caption, alternatives, attention], api_name="caption"),
                         image_status, status, "caption_status", "Captioned.")

            def restretch(image: str | None, beam: float, max_len: float, topk: float, stretch: bool,
                          request: gr.Request):
                """The scale changed: redraw the maps if there is an image (the caption is the same)."""
                if not image:
                    return gr.skip(), gr.skip(), gr.skip()
                with status.reporting(request):
                    return caption_one(image, beam, max_len, topk, stretch, warn=False)

            stretch.change(lambda s: colour_bar(bool(s)), stretch, bar, api_name=False, queue=False)
            stretch.change(restretch, inputs, [caption, alternatives, attention], api_name=False)

        with gr.Tab("Batch", id="batch"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=1):
                    files = gr.File(file_count="multiple", label="Images and/or .zip archives of images",
                                    elem_id="batch-files")
                    count = gr.Markdown(upload_count(None), elem_id="batch-count")
                    bbeam = gr.Slider(1, beam_max, value=beam0, step=1, label="Beam size")
                    brun = gr.Button("Caption all", variant="primary", elem_id="batch-button")
                    csv_out = gr.File(label="CSV (file, caption, score, error)", elem_id="batch-csv",
                                      interactive=False, visible=False)
                    jsonl_out = gr.File(label="JSONL (with alternatives)", elem_id="batch-jsonl", interactive=False,
                                        visible=False)
                    sqlite_out = gr.File(label="SQLite library (search it with `captioner search`)",
                                         elem_id="batch-sqlite", interactive=False, visible=False)
                with gr.Column(scale=2):
                    thumbs = gr.Gallery(label="Thumbnails", elem_id="batch-gallery", columns=6, height="auto",
                                        object_fit="cover", preview=False)
                    table = gr.Dataframe(headers=BATCH_HEADERS, datatype=["str", "str", "number", "str", "str"],
                                         label="Captions", interactive=False, elem_id="batch-table", wrap=True,
                                         column_widths=["18%", "38%", "10%", "17%", "17%"])
            batch_status = gr.Markdown(elem_id="batch-status")
            caption_many = caption_batch_fn(cap, work, max_zip_files, max_zip_bytes, max_image_bytes)

            def batch_fn(files: list[str] | None, beam: float, request: gr.Request, progress=gr.Progress()):
                with status.reporting(request):
                    return caption_many(files, beam, progress)

            files.change(upload_count, files, count, api_visibility="private", queue=False)
            batch_run = brun.click(batch_fn, [files, bbeam], [thumbs, table, csv_out, jsonl_out, sqlite_out],
                                   api_name="caption_batch")
            _with_status(batch_run, batch_status, status, "caption_batch_status",
                         "Done: see the table (files that failed have an error).")
            # the download boxes stay hidden (an empty tab is not three empty boxes) until there are results
            batch_run.success(lambda: [gr.File(visible=True)] * 3, None, [csv_out, jsonl_out, sqlite_out],
                              api_visibility="private")

        with gr.Tab("Video", id="video"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=1):
                    video = gr.Video(label="Video", sources=["upload"], include_audio=True, height=280,
                                     elem_id="video-input")
                    with gr.Row():
                        every = gr.Number(value=1.0, minimum=EVERY.lo, maximum=EVERY.hi, label="Sample every (seconds)",
                                          step=0.5)
                        scenes = gr.Checkbox(value=False, label="Also sample on scene changes")
                    vbeam = gr.Slider(1, beam_max, value=beam0, step=1, label="Beam size")
                    vrun = gr.Button("Caption video", variant="primary", elem_id="video-button")
                    srt_out = gr.File(label="SRT subtitles", elem_id="video-srt", interactive=False)
                    vtt_out = gr.File(label="WebVTT subtitles", elem_id="video-vtt", interactive=False)
                with gr.Column(scale=2):
                    frames = gr.Gallery(label="Sampled frames", elem_id="video-frames", columns=5, height="auto",
                                        object_fit="contain", preview=False)
                    segments = gr.Dataframe(headers=SEGMENT_HEADERS, datatype=["number", "number", "str", "str"],
                                            label="Segments (seconds)", interactive=False, elem_id="video-segments",
                                            wrap=True, column_widths=["10%", "10%", "45%", "35%"])
            video_status = gr.Markdown(elem_id="video-status")
            caption_clip = caption_video_fn(cap, work, max_video_frames)

            def video_fn(video: str | None, every: float, scenes: bool, beam: float, request: gr.Request,
                         progress=gr.Progress()):
                with status.reporting(request):
                    return caption_clip(video, every, scenes, beam, progress)

            _with_status(vrun.click(video_fn, [video, every, scenes, vbeam], [frames, segments, srt_out, vtt_out],
                                    api_name="caption_video"), video_status, status, "caption_video_status", "Done.")
    demo.queue(default_concurrency_limit=2, max_size=64)
    return demo


def _with_status(event: Any, box: gr.Markdown, status: StatusLog, api_name: str, done: str) -> None:
    """After a tab's run: its status box says `done`, or why it failed (kept until the next run)."""
    event.success(lambda: done, None, box, api_visibility="private")
    event.failure(status.show, None, box, api_name=api_name, api_visibility="undocumented")


def theme() -> gr.themes.Base:
    """Gradio's default look with its bundled fonts (served by the app itself, never a CDN)."""
    return gr.themes.Default(font=[gr.themes.LocalFont("Source Sans Pro"), "system-ui", "sans-serif"],
                             font_mono=[gr.themes.LocalFont("IBM Plex Mono"), "monospace"])


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           **kwargs: Any):
    """demo.launch with this app's settings: theme, CSS, upload limit, no share unless asked. Unexpected
    errors (not our gr.Error messages, which always show) are detailed in the page only on a local-only
    server; otherwise the page says "Error" and the details stay in the server log."""
    local_only = host in ("127.0.0.1", "localhost", "::1") and not share
    opts: dict[str, Any] = dict(server_name=host, server_port=port, share=share, theme=theme(), css=CSS,
                                max_file_size=MAX_UPLOAD, footer_links=["api", "settings"], show_error=local_only,
                                ssr_mode=False, mcp_server=False)
    opts.update(kwargs)
    return demo.launch(**opts)
