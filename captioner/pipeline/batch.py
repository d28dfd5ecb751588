"""`captioner caption PATH...`: caption many images in batches, to stdout, CSV, JSONL or a SQLite library
(library.py), and into the images' metadata (metadata.py).

Library use (the Gradio app): `caption_files(cap, paths, CaptionJob(beam=3), on_batch=..., progress=...)`
returns one dict per path, in order: {"path", "caption", "score", "alternatives", "error", "warning"}."""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import logging
import os
import stat
import sys
import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from PIL import Image

from ..errors import CaptionerError
from ..media.images import (
    MAX_PIXELS,
    clean_text,
    display_name,
    load_image,
    path_text,
    size_warning,
    to_rgb,
)
from ..runtime.workers import (  # noqa: F401
    LIGHT_PRELOAD,
    WORKER_TIMEOUT,
    pooled,
    usable_cpus,
    warn_if_more_than_cpus,
)

log = logging.getLogger("captioner")

if TYPE_CHECKING:  # torch, torchvision and tqdm are imported when captioning starts, not to parse arguments
    import torch

FIELDS = ("path", "caption", "score", "alternatives", "error", "warning")
FORMATS = ("csv", "jsonl")
Row = dict[str, Any]


@dataclass
class CaptionJob:
    beam: int | None = None  # decoding options: None keeps the model's default
    topk: int | None = None
    max_len: int | None = None
    length_penalty: float | None = None
    no_repeat_ngram: int | None = None
    no_repeat_words: bool | None = None
    batch_size: int = 32
    workers: int = 0  # processes that load and caption batches (0: in this process; workers.py)
    worker_timeout: float = WORKER_TIMEOUT  # seconds without a batch from the workers before it stops
    progress_bar: bool = False  # tqdm bar (images/s) on stderr
    max_pixels: int = MAX_PIXELS  # larger images are refused (JPEGs: decoded at reduced scale), images.load_image




def _make_jpeg_decoder() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """JPEG bytes (a uint8 tensor) -> RGB uint8 (3, H, W) tensor, EXIF orientation applied, by torchvision's
    decode_jpeg; None where torchvision has no image decoders (deprecated since 0.29, superseded by
    TorchCodec: then PIL decodes, at PIL's speed). libjpeg prints its warnings about damaged data that it can
    still decode ("Corrupt JPEG data: ...", no file name) on fd 2, where PIL's decoder stays silent: fd 2
    points at /dev/null during the call, which is why only a caption worker (a process of ours, with one
    thread) uses it (_jpeg_decoder)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)  # the deprecation note, on every call
    devnull = os.open(os.devnull, os.O_WRONLY)

    def decode(data: torch.Tensor) -> torch.Tensor:
        saved = os.dup(2)
        os.dup2(devnull, 2)
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return decode


_DECODERS: dict[int, Callable[[torch.Tensor], torch.Tensor] | None] = {}  # process id -> its JPEG decoder


def _jpeg_decoder() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """This process's torchvision JPEG decoder if it is a torch engine's caption worker, else None (PIL decodes).
    Keyed by process id: a forked worker does not inherit its parent's answer."""
    return _DECODERS.get(os.getpid())


def use_worker_jpeg_decoder() -> None:
    """Decode JPEGs in this process as a caption worker does (bench/bench.py's ceiling stage measures the
    workers' path in its own process). fd 2 points at /dev/null during each decode (_make_jpeg_decoder)."""
    _DECODERS[os.getpid()] = _make_jpeg_decoder()


def _load(path: Path, min_side: int, max_pixels: int = MAX_PIXELS) -> Image.Image | torch.Tensor:
    """What the per-image transform gets: load_image's RGB picture, or for a JPEG the same pixels faster.
    With a resize target (min_side > 0), a JPEG that PIL's header shows within the pixel limit is decoded
      - if its short side is at least 4x the target: by PIL at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
        scaling: a 12 MP photo decodes ~9x faster), never to less than 2x the target on either side, so the
        antialiased resize that follows keeps its quality (preprocessed pixels differ by 0.15 grey levels
        on average);
      - otherwise, in a torch engine's caption worker, if it is RGB or grey (not CMYK, not MPO): by torchvision's
        decode_jpeg straight into a uint8 (3, H, W) tensor, EXIF orientation applied: the pixels PIL gives,
        bit for bit, without PIL's copy into a tensor (docs/speed.md "Decode (issue 18)").
    Everything else, and any failure, goes through load_image (its checks and error messages)."""
    if min_side > 0:
        try:
            if stat.S_ISREG(os.stat(path).st_mode):
                with open(path, "rb") as f, Image.open(f, formats=("JPEG",)) as im:
                    w, h = im.size
                    if min(w, h) >= 4 * min_side:
                        im.draft("RGB", (2 * min_side, 2 * min_side))
                        if im.size[0] * im.size[1] <= max_pixels:
                            im.load()
                            return to_rgb(im)
                    elif w * h <= max_pixels:
                        decode = _jpeg_decoder()
                        if decode is not None and im.format == "JPEG" and im.mode in ("RGB", "L"):
                            import torch

                            f.seek(0)
                            return decode(torch.frombuffer(bytearray(f.read()), dtype=torch.uint8))
        except Exception:  # noqa: BLE001 - not a (good) JPEG: load_image says why
            pass
    return load_image(path, max_pixels)


def _split_transform(transform: Callable) -> tuple[Callable, Callable | None, int]:
    """(per-image part, per-batch part, resize target's short side or 0). The float conversion and
    normalisation (ToDtype onwards) run once per batch in the main process, on the stacked uint8 crops,
    normalising in place: bit-identical, cheaper than per image, and 4x less data to pass from the loading
    processes."""
    from torchvision.transforms import v2 as T

    steps = list(getattr(transform, "transforms", None) or [])
    sizes = [s.size for s in steps if isinstance(s, T.Resize) and s.size]
    min_side = min(sizes[0]) if sizes and isinstance(sizes[0], (list, tuple)) else int(sizes[0]) if sizes else 0
    cut = next((i for i, s in enumerate(steps) if isinstance(s, T.ToDtype)), None)
    if not cut or not all(isinstance(s, (T.ToDtype, T.Normalize)) for s in steps[cut:]):
        return transform, None, min_side
    tail = [T.Normalize(s.mean, s.std, inplace=True) if isinstance(s, T.Normalize) else s for s in steps[cut:]]
    return T.Compose(steps[:cut]), T.Compose(tail), min_side


class _Files:  # what the caption workers index (workers.pooled): batch b, loaded and maybe captioned
    """Batch b of `paths`: (indices, preprocessed images or what `finish` makes of them, [(index, error)],
    {index: warning} for images captioned with a warning, e.g. too small). `stack` joins the per-image results
    (torch.stack when None; the light engine's np.stack); `setup` runs first in each worker process."""

    def __init__(self, paths: Sequence[Path], batch_size: int, transform: Callable, per_batch: Callable | None,
                 min_side: int = 0, finish: Callable[[Any], Any] | None = None,
                 max_pixels: int = MAX_PIXELS, stack: Callable[[list], Any] | None = None,
                 setup: Callable[[], None] | None = None) -> None:
        self.paths, self.batch_size, self.transform, self.per_batch = paths, batch_size, transform, per_batch
        self.min_side, self.finish, self.max_pixels = min_side, finish, max_pixels
        self.stack, self.setup = stack, setup

    def setup_worker(self) -> None:
        if self.setup is not None:
            self.setup()

    def __len__(self) -> int:
        return -(-len(self.paths) // self.batch_size)

    def _one(self, i: int) -> tuple[torch.Tensor | None, str, str]:
        """(preprocessed image or None, error, warning)."""
        try:
            p = self.paths[i]  # a file, or an image inside a tar shard (media/shards.py: it loads itself)
            image = _load(p, self.min_side, self.max_pixels) if isinstance(p, Path) else p.load(self.max_pixels)
            return self.transform(image), "", size_warning(image)
        except Exception as exc:  # noqa: BLE001 - a bad file is a row with an error, the batch goes on
            msg = str(exc) if isinstance(exc, CaptionerError) else f"{type(exc).__name__}: {exc}"
            return None, " ".join(msg.split()).removeprefix(display_name(self.paths[i]) + ": "), ""

    def __getitem__(self, b: int) -> tuple[list[int], Any, list[tuple[int, str]], dict[int, str]]:
        if self.stack is None:
            import torch

            self.stack = torch.stack
        span = range(b * self.batch_size, min(len(self.paths), (b + 1) * self.batch_size))
        loaded = [(i, *self._one(i)) for i in span]
        warnings = {i: w for i, _, _, w in loaded if w}
        loaded = [(i, x, e) for i, x, e, _ in loaded]
        good = [(i, x) for i, x, _ in loaded if x is not None]
        x = self.stack([x for _, x in good]) if good else None
        if x is not None and self.per_batch is not None:
            x = self.per_batch(x)
        if x is not None and self.finish is not None:
            x = self.finish(x)
        return [i for i, _ in good], x, [(i, e) for i, x, e in loaded if x is None], warnings


@dataclass
class _Stages:
    """How one engine turns files into captions, split between the workers and this process."""

    per_image: Callable[[Any], Any]  # a loaded image -> its resized crop (in the workers)
    per_batch: Callable[[Any], Any] | None  # the stacked crops -> the encoder's input
    min_side: int  # the resize target's short side (JPEGs are decoded at reduced scale down to 2x it)
    stack: Callable[[list], Any] | None  # None: torch.stack
    setup: Callable[[], None]  # first thing in each worker: one thread, its own decoders
    preload: Sequence[str] | None  # what the fork server imports (None: workers.PRELOAD, with torch)
    on_cpu: bool


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)
    use_worker_jpeg_decoder()


def _stages(cap: Any) -> _Stages:
    """The light engine (LiteCaptioner: Pillow + NumPy preprocessing, no torch) or the torch one (its
    torchvision transform, split at ToDtype)."""
    from ..lite.captioner import LiteCaptioner

    if isinstance(cap, LiteCaptioner):
        import numpy as np

        from ..lite.preprocess import crop_uint8, normalise

        spec = cap.bundle.preprocessing
        return _Stages(partial(crop_uint8, spec=spec), partial(normalise, spec=spec),
                       spec.crop if spec.resize == "squash" else spec.short, np.stack, cap.use_one_thread,
                       LIGHT_PRELOAD, True)
    per_image, per_batch, min_side = _split_transform(cap.transform)
    return _Stages(per_image, per_batch, min_side, None, _one_torch_thread, None, cap.device.type == "cpu")


def caption_files(cap: Any, paths: Sequence[str | bytes | os.PathLike], job: CaptionJob | None = None,
                  on_batch: Callable[[list[Row]], None] | None = None,
                  progress: Callable[[int], None] | None = None, **overrides: Any) -> list[Row]:
    """Caption `paths` (a `Captioner`, batched encoder + beam search); one result dict per path, in order.
    on_batch(rows) runs after each batch (e.g. a writer), progress(images_done) too; overrides are
    CaptionJob fields (`beam=3`). `alternatives` holds every returned beam as [text, score], best first.

    With workers on CPU and more than one batch, each worker captions its own batches end to end (load,
    encode, search; one thread each) and this process only collects and writes. Workers start from the fork
    server (workers.py) and make their own runtime sessions; a job of one batch runs here, at once. A worker
    that returns no batch within job.worker_timeout stops the job with one CaptionerError. On CUDA the model
    stays here (docs/design.md "Worker processes")."""
    from tqdm import tqdm

    from ..lite.search import score_warning

    job = replace(job or CaptionJob(), **overrides)
    cfg = cap.search_config(beam=job.beam, topk=job.topk, max_len=job.max_len, length_penalty=job.length_penalty,
                            no_repeat_ngram=job.no_repeat_ngram, no_repeat_words=job.no_repeat_words)
    paths = [p if hasattr(p, "load") else Path(os.fsdecode(p)) for p in paths]  # str, PathLike or bytes (os.fsdecode:
    # any name, losslessly), or a shards.TarImage
    stages = _stages(cap)
    batches = -(-len(paths) // max(1, job.batch_size))
    workers = min(job.workers, batches) if stages.on_cpu and batches > 1 else 0  # one batch: here
    files = _Files(paths, max(1, job.batch_size), stages.per_image, stages.per_batch, stages.min_side,
                   partial(cap.caption_tensors, cfg=cfg) if workers else None, job.max_pixels, stages.stack,
                   stages.setup)
    warn_if_more_than_cpus(workers)
    results: list[Row] = []
    kept = lambda: f"{len(results)} images were captioned before it stopped (with -o they are kept: rerun with --resume)"  # noqa: E731
    with tqdm(total=len(paths), unit="img", file=sys.stderr, disable=not job.progress_bar, dynamic_ncols=True) as bar:
        for idx, x, failed, notes in pooled(files, len(files), workers, job.worker_timeout, "caption worker", kept,
                                            stages.preload):
            rows = {i: {"path": str(paths[i]), "caption": "", "score": None, "alternatives": [], "error": err,
                        "warning": ""} for i, err in failed}
            if x is not None:
                found = x if workers else cap.caption_tensors(x, cfg)
                for i, c in zip(idx, found):
                    rows[i] = {"path": str(paths[i]), "caption": c.text, "score": float(c.score),
                               "alternatives": [[t, float(s)] for t, s in c.alternatives], "error": "",
                               "warning": "; ".join(w for w in (notes.get(i, ""),
                                                                score_warning(c.score, cfg.length_penalty)) if w)}
            batch = [rows[i] for i in sorted(rows)]
            results += batch
            if on_batch:
                on_batch(batch)
            bar.update(len(batch))
            if progress:
                progress(len(results))
    return results


# ----------------------------------------------------------------------------- files ------
def _record(row: Row, alternatives: bool) -> Row:
    """A result dict as written: path as path_text (valid UTF-8, one line, lossless), scores rounded, alternatives
    only when asked for (topk > 1)."""
    score = row["score"]
    return {"path": path_text(row["path"]), "caption": row["caption"],
            "score": None if score is None else round(score, 4),
            "alternatives": [[t, round(s, 4)] for t, s in row["alternatives"]] if alternatives else [],
            "error": clean_text(row["error"]) or None, "warning": clean_text(row.get("warning") or "") or None}


def _dump(records: Sequence[Row], fmt: str, header: bool = False) -> str:
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(FIELDS)
    for r in records:
        w.writerow([_cell(r[k]) for k in FIELDS])
    return buf.getvalue()


def _cell(value: Any) -> Any:
    if isinstance(value, list):  # alternatives: a JSON list, or empty
        return json.dumps(value, ensure_ascii=False) if value else ""
    return "" if value is None else value


def _open(path: Path, mode: str) -> Any:
    try:
        return open(path, mode, encoding="utf-8", errors="surrogateescape", newline="")
    except OSError as exc:
        raise CaptionerError(f"cannot write {display_name(path)}: {exc.strerror or exc}") from None


def _write(f: Any, text: str) -> None:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def _write_error(path: Path, exc: OSError) -> str:
    """'cannot write OUT: No space left on device' (ENOSPC, EROFS, EACCES, EIO, ...)."""
    return f"cannot write {display_name(path)}: {exc.strerror or ' '.join(str(exc).split()) or 'I/O error'}"


def read_rows(path: Path, fmt: str, fix: bool = False) -> list[Row]:
    """The rows of an earlier, maybe killed, run. Text after the last newline is a row cut short by
    the kill: it is ignored, and with fix=True cut from the file so that appends start on a new line."""
    try:
        data = path.read_bytes() if path.exists() else b""
    except OSError as exc:
        raise CaptionerError(f"cannot read {display_name(path)}: {exc.strerror or exc}") from None
    keep = data[:data.rfind(b"\n") + 1]
    if fix and len(keep) < len(data):
        try:
            os.truncate(path, len(keep))
        except OSError as exc:
            raise CaptionerError(_write_error(path, exc)) from None
    lines = keep.decode("utf-8", "surrogateescape").split("\n")[:-1]
    bad = CaptionerError(f"cannot resume: {display_name(path)} is not a captions {fmt.upper()} file "
                         f"(fields {', '.join(FIELDS)}); remove it or drop --resume")
    if fmt == "csv":
        table = list(csv.reader(lines))
        if table and tuple(table[0]) != FIELDS:
            raise bad
        return [dict(zip(FIELDS, r)) for r in table[1:] if len(r) == len(FIELDS)]
    try:
        rows = [json.loads(line) for line in lines]
    except ValueError:
        raise bad from None
    if not all(isinstance(r, dict) and "path" in r for r in rows):
        raise bad
    return rows


class FileWriter:
    """Appends result rows to a CSV or JSONL file; flushed and fsync'd after every batch.

    A write that fails (disk full, read-only or vanished file system, I/O error) leaves the file as it
    was after the last complete batch (the half-written batch is cut off; a file this writer created and
    that got no row is removed) and raises a one-line CaptionerError saying what was kept."""

    def __init__(self, path: Path, fmt: str, append: bool, alternatives: bool) -> None:
        self.path, self.fmt, self.alternatives = path, fmt, alternatives
        self.created = not (append and path.exists())
        self.f = _open(path, "a" if append else "w")
        self.rows = self.good = 0
        self.good = self._size()  # the file's size after the last complete write
        if fmt == "csv" and self.good == 0:
            self._put(_dump([], fmt, header=True))

    def _size(self) -> int:
        try:
            return os.fstat(self.f.fileno()).st_size
        except OSError as exc:
            self._fail(exc)

    def _put(self, text: str) -> None:
        try:
            _write(self.f, text)
        except OSError as exc:
            self._fail(exc)
        self.good = self._size()

    def _fail(self, exc: OSError) -> None:
        with contextlib.suppress(OSError):
            self.f.close()  # may flush (part of) the failed batch once more: cut off below
        kept = self.rows > 0 or not self.created
        try:
            if kept:
                os.truncate(self.path, self.good)
            else:
                self.path.unlink(missing_ok=True)
            state = (f"{display_name(self.path)} keeps the {self.rows} rows written before; rerun with --resume "
                     "to caption the rest" if self.rows else "nothing was written")
        except OSError:
            state = f"{display_name(self.path)} may end with a partial row (ignored by --resume)"
        raise CaptionerError(f"{_write_error(self.path, exc)} ({state})") from None

    def __call__(self, rows: list[Row]) -> None:
        self._put(_dump([_record(r, self.alternatives) for r in rows], self.fmt))
        self.rows += len(rows)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # every row was already flushed and synced
            self.f.close()


def _parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(glob.escape(out.name) + ".rank*.part"))


def merge_parts(out: Path, fmt: str, parts: list[Path], order: Sequence[Path], keep_existing: bool) -> list[Row]:
    """Rank 0 under torchrun: the parts (and out's own rows if keep_existing) into out, in `order`, atomically."""
    position = {path_text(p): i for i, p in enumerate(order)}
    records: dict[str, Row] = {}
    for f in ([out] if keep_existing else []) + parts:
        for r in read_rows(f, fmt):
            records.setdefault(r["path"], r)
    merged = sorted(records.values(), key=lambda r: position.get(r["path"], len(position)))
    tmp = out.with_name(out.name + ".merge.tmp")
    try:
        with _open(tmp, "w") as f:
            _write(f, _dump(merged, fmt, header=True))
        os.replace(tmp, out)
    except OSError as exc:  # the parts stay: a rerun with --resume merges them
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise CaptionerError(_write_error(out, exc)) from None
    for f in _parts(out):
        f.unlink(missing_ok=True)
    return merged


# ------------------------------------------------------------------------------- CLI ------
