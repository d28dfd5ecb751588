"""Turning user files into RGB PIL images, robustly: odd modes, EXIF rotation, broken or hostile
files, folders, glob patterns and zip archives. Every user-facing failure is one ImageError line."""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import threading
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import IO, TYPE_CHECKING

from PIL import Image

from ..errors import CaptionerError
from ..lite.images import _high_depth_to_l, to_rgb  # noqa: F401 - the one conversion, re-exported here

if TYPE_CHECKING:  # torch is not imported to parse the CLI's arguments
    import torch

PathLike = str | os.PathLike[str]
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")  # PIL decoders we accept (JPEG covers MPO)
MIN_SIDE = 32  # pixels: a smaller image is captioned, with a warning (the encoder sees mostly upsampling)
MAX_PIXELS = 64 * 2**20  # 8192 x 8192; larger headers are refused before any pixel is allocated (a larger JPEG
_BOMB_LOCK = threading.Lock()  # is decoded at reduced scale instead; --max-pixels changes the limit)
_SNIFF = ((0, b"8BPS", "Photoshop PSD"), (4, b"ftyp", "HEIC/AVIF"), (0, b"%PDF", "PDF"), (0, b"PK\x03\x04", "zip archive"))


class ImageError(CaptionerError):
    """A file that cannot be turned into an image (missing, unreadable, corrupt, unsupported, too big)."""


def display_name(path: object) -> str:
    """A printable one-line name, whatever bytes the file system gave us (surrogate escapes -> U+FFFD)."""
    text = os.fsencode(path).decode("utf-8", "replace") if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    return " ".join(text.splitlines()) or "<unnamed>"


_ESCAPE = re.compile(r"[\\\x00-\x1f\x7f\udc80-\udcff]")
_UNESCAPE = re.compile(r"\\(\\|x[0-9a-fA-F]{2})")


def path_text(path: object) -> str:
    """A file name as one line of valid UTF-8, losslessly (the `path` written to CSV, JSONL, SQLite and stdout):
    a backslash becomes `\\\\`, a byte that is not UTF-8 or is a control character (tab, newline, ...)
    `\\xNN`; any other name is unchanged. path_from_text undoes it (also Python's codecs.escape_decode)."""
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)

    def escape(m: re.Match) -> str:
        c = m.group()
        return "\\\\" if c == "\\" else f"\\x{ord(c) & 0xFF:02x}"
    return _ESCAPE.sub(escape, text)


def path_from_text(text: str) -> str:
    """The file name (a str as os.fsdecode gives it) that path_text wrote as `text`."""
    raw, pos = bytearray(), 0
    for m in _UNESCAPE.finditer(text):
        raw += text[pos:m.start()].encode("utf-8", "surrogateescape")
        raw += b"\\" if m.group(1) == "\\" else bytes([int(m.group(1)[1:], 16)])
        pos = m.end()
    raw += text[pos:].encode("utf-8", "surrogateescape")
    return os.fsdecode(bytes(raw))


def clean_text(text: str) -> str:
    """Text that may hold surrogate escapes (a message quoting a file name) as valid UTF-8 (U+FFFD)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ------------------------------------------------------------------------- decoding -------
def _decode(fp: IO[bytes], name: str, max_pixels: int) -> Image.Image:
    head = fp.read(16)
    if not head:
        raise ImageError(f"{name}: empty file (0 bytes)")
    fp.seek(0)
    Image.init()  # registers every PIL plugin (a no-op after the first call); open() needs it for formats=
    try:
        with _BOMB_LOCK:  # PIL's own limit (~179 MP) would refuse before --max-pixels and JPEG scaling apply;
            bomb, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # ours is checked on the header below
            try:
                img = Image.open(fp, formats=FORMATS)
            finally:
                Image.MAX_IMAGE_PIXELS = bomb
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: image too large (more than {max_pixels // 2**20} megapixels)") from None
    except Exception:
        kind = next((k for off, magic, k in _SNIFF if head[off:off + len(magic)] == magic), None)
        what = f"unsupported format ({kind})" if kind else "not an image or unsupported format"
        raise ImageError(f"{name}: {what}; supported: {', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}") from None
    with img:
        w, h = img.size
        if w * h > max_pixels and img.format == "JPEG":  # decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling)
            scale = next((s for s in (2, 4, 8) if -(-w // s) * -(-h // s) <= max_pixels), None)
            if scale:
                img.draft(img.mode, (-(-w // scale), -(-h // scale)))
        if img.size[0] * img.size[1] > max_pixels:
            how = ("even at 1/8 scale" if img.format == "JPEG" else
                   "refused unread: it could be a decompression bomb")
            raise ImageError(f"{name}: image too large ({w}x{h} pixels, {w * h / 2**20:.0f} megapixels; limit "
                             f"{max_pixels / 2**20:g}, {how}; --max-pixels raises the limit)")
        if w < 1 or h < 1:
            raise ImageError(f"{name}: image has zero size ({w}x{h})")
        try:
            img.load()
            return to_rgb(img)
        except Exception as exc:
            raise ImageError(f"{name}: corrupt or truncated {img.format} image ({_one_line(exc)})") from None


def load_image(path: PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open, fully decode and convert one file to RGB; any failure is an ImageError naming the file."""
    name = display_name(path)
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # a folder, or a pipe/device that open() could block on forever
            raise ImageError(f"{name}: " + ("is a folder, not an image file" if stat.S_ISDIR(mode) else "not a regular file"))
        fp = open(path, "rb")
    except FileNotFoundError:
        raise ImageError(f"{name}: " + ("broken symbolic link" if os.path.islink(path) else "file not found")) from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except (OSError, ValueError) as exc:
        raise ImageError(f"{name}: cannot open ({getattr(exc, 'strerror', None) or _one_line(exc)})") from None
    with fp:
        try:
            return _decode(fp, name, max_pixels)
        except OSError as exc:  # an I/O error while reading (the decoder's own errors are handled inside)
            raise ImageError(f"{name}: read error ({exc.strerror or _one_line(exc)})") from None


def size_warning(image: Image.Image | torch.Tensor, min_side: int = MIN_SIDE) -> str:
    """'' for a normal image (PIL, or a (C, H, W) tensor); a one-line warning for one smaller than min_side
    pixels on a side."""
    w, h = image.size if isinstance(image, Image.Image) else (int(image.shape[-1]), int(image.shape[-2]))
    if min(w, h) >= min_side:
        return ""
    return f"only {w}x{h} pixels (under {min_side} on a side): the caption is unreliable"


def load_image_bytes(data: bytes, name: str = "<upload>", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Like load_image, for bytes already in memory (uploads)."""
    return _decode(io.BytesIO(data), display_name(name), max_pixels)


# ---------------------------------------------------------------------- finding files -------
def _walk(root: Path, max_depth: float, errors: list[tuple[str, str]]) -> Iterator[Path]:
    """Files under root, each real folder visited once (symlink loops end), hidden entries skipped."""
    seen: set[str] = set()
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            real = os.path.realpath(folder)
            if real in seen:
                continue
            seen.add(real)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            errors.append((display_name(folder), f"cannot read folder: {exc.strerror or _one_line(exc)}"))
            continue
        for e in entries:
            try:
                if e.name.startswith("."):
                    continue
                if e.is_dir() and depth < max_depth:  # linked folders go last: real paths win over link paths
                    stack.insert(0 if e.is_symlink() else len(stack), (Path(e.path), depth + 1))
                elif e.is_file() or (e.is_symlink() and not e.is_dir()):  # a broken link: reported by
                    yield Path(e.path)  # load_image, not silently skipped
            except OSError:  # a link loop (is_dir/is_file raise ELOOP): reported by load_image too
                if e.is_symlink():
                    yield Path(e.path)


def _match(parts: Sequence[str], pats: Sequence[str]) -> bool:
    if not pats:
        return not parts
    if pats[0] == "**":
        return any(_match(parts[i:], pats[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pats[0]) and _match(parts[1:], pats[1:])


def _glob(pattern: str, recursive: bool, errors: list[tuple[str, str]]) -> list[Path]:
    parts = Path(pattern).parts
    n = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
    root, pats = Path(*parts[:n]) if n else Path("."), [p if recursive else p.replace("**", "*") for p in parts[n:]]
    if not os.path.isdir(root):
        return []
    depth = float("inf") if "**" in pats else len(pats) - 1
    return [p for p in _walk(root, depth, errors) if _match(p.relative_to(root).parts, pats)]


def find_images(inputs: Sequence[PathLike], recursive: bool = False,
                skipped: list[Path] | None = None) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders (image extensions only; subfolders if recursive) and glob patterns
    (`*`, `?`, `[...]`, `**` if recursive). A file named explicitly is kept whatever its extension.
    Hidden files and folders are skipped; symlinked folders are followed, each real folder once.
    Returns (paths sorted by string, de-duplicated; [(input, error)] for inputs that gave nothing).
    `skipped`, when given, receives the files a folder or pattern held that are not images by their
    extension (e.g. .heic, .svg, .txt), sorted."""
    found: set[Path] = set()
    others: set[Path] = set()
    errors: list[tuple[str, str]] = []

    def keep(p: Path) -> bool:
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            return True
        others.add(p)
        return False

    for raw in inputs:
        text = os.fsdecode(raw)
        if os.path.isdir(text):
            found.update(p for p in _walk(Path(text), float("inf") if recursive else 0, errors) if keep(p))
        elif os.path.lexists(text):
            found.add(Path(text))
        elif any(c in text for c in "*?["):
            matches = [p for p in _glob(text, recursive, errors) if keep(p)]
            if not matches:
                errors.append((display_name(text), "no image files match this pattern"))
            found.update(matches)
        else:
            errors.append((display_name(text), "no such file or folder"))
    if skipped is not None:
        skipped += sorted(others - found, key=str)
    return sorted(found, key=str), errors


def skipped_summary(skipped: Sequence[Path]) -> str:
    """'3 skipped (2 .heic, 1 .svg)': counts by extension, most common first."""
    counts: dict[str, int] = {}
    for p in skipped:
        kind = p.suffix.lower() or "no extension"
        counts[kind] = counts.get(kind, 0) + 1
    kinds = sorted(counts, key=lambda k: (-counts[k], k))
    return f"{len(skipped)} skipped ({', '.join(f'{counts[k]} {k}' for k in kinds)})" if skipped else "0 skipped"


# ---------------------------------------------------------------------------- archives -------
def is_zip(path: PathLike) -> bool:
    """True for a file that starts like a zip archive (also a damaged one, so that it is reported as a damaged
    zip, not as an unsupported image), not for an image with a zip appended."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")
    except (OSError, ValueError):
        return False


def _unsafe(info: zipfile.ZipInfo) -> str:
    """Why a member must not be written ('' when it is safe)."""
    member, kind = info.filename, stat.S_IFMT(info.external_attr >> 16)
    parts = member.replace("\\", "/").split("/")
    if member.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", member) or ".." in parts or "\0" in member:
        return "unsafe path"
    if kind == stat.S_IFLNK:
        return "symbolic link"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "special file"
    return ""


def _macos_extra(parts: Sequence[str]) -> bool:
    """macOS Finder's resource-fork copies (__MACOSX/..., ._name): not photos, skipped silently."""
    return parts[0] == "__MACOSX" or parts[-1].startswith("._")


def _unique(parts: list[str], taken: set[tuple[str, ...]]) -> tuple[str, ...]:
    """parts, or with ' (2)', ' (3)', ... before the suffix when a member of that name was already planned."""
    key, n = tuple(parts), 1
    while key in taken:
        n += 1
        p = Path(parts[-1])
        key = (*parts[:-1], f"{p.stem} ({n}){p.suffix}")
    taken.add(key)
    return key


@dataclass
class ZipContents:
    """What extract_zip got from an archive, in the archive's order: (name inside it, '/'-separated, a duplicate
    name with ' (2)'; its path on disk, or None; '' or why it was not extracted: unsafe, encrypted, nested archive,
    damaged, over the size limit)."""
    entries: list[tuple[str, Path | None, str]] = field(default_factory=list)

    @property
    def images(self) -> list[tuple[Path, str]]:
        return [(p, shown) for shown, p, why in self.entries if p is not None and not why]

    @property
    def problems(self) -> list[tuple[str, str]]:
        return [(shown, why) for shown, _, why in self.entries if why]


def _open_zip(zip_path: PathLike, name: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as exc:
        try:  # a zip cut short loses its central directory at the end
            with open(zip_path, "rb") as f:
                starts_like_zip = f.read(4) == b"PK\x03\x04"
        except OSError:
            starts_like_zip = False
        if starts_like_zip and "not a zip file" in str(exc):
            raise ImageError(f"{name}: damaged zip (truncated: its table of contents is missing)") from None
        raise ImageError(f"{name}: damaged zip ({_one_line(exc)})") from None
    except Exception as exc:
        raise ImageError(f"{name}: not a readable zip archive ({_one_line(exc)})") from None


def extract_zip(zip_path: PathLike, dest: Path, max_files: int = 2000,
                max_total_bytes: int = 512 * 2**20) -> ZipContents:
    """Extract the image members of a zip into dest (keeping their subfolders), skipping the unsafe ones.
    Members with an unsafe path, links and special files, encrypted members, nested archives (never opened),
    members that do not fit in max_total_bytes (declared by the headers, or as actually decompressed: headers can
    lie) and damaged ones are not written and are listed in `problems`; macOS's __MACOSX/ and ._* files and
    non-images are skipped silently. The whole archive is refused (ImageError, nothing written) when it is not a
    readable zip, holds more than max_files members, or holds nothing to caption (empty, only nested archives,
    only encrypted images, no images): one line saying which."""
    name, dest = display_name(zip_path), Path(dest)
    limit = f"{max_total_bytes / 2**20:g} MiB"
    zf = _open_zip(zip_path, name)
    found: list[tuple[int, str, Path | None, str]] = []  # (archive position, name, path, problem)
    with zf:
        try:
            infos = zf.infolist()
        except Exception as exc:  # noqa: BLE001 - defensive: infolist is read at open
            raise ImageError(f"{name}: damaged zip ({_one_line(exc)})") from None
        if len(infos) > max_files:
            raise ImageError(f"{name}: refused, {len(infos)} members in archive (limit {max_files})")
        plan: list[tuple[int, tuple[str, ...], zipfile.ZipInfo]] = []
        taken: set[tuple[str, ...]] = set()
        nested, encrypted, files = [], 0, 0
        for i, info in enumerate(infos):
            shown = display_name(info.filename)
            why = _unsafe(info)
            if why:
                found.append((i, shown, None, f"refused, {why}: not extracted"))
                continue
            parts = [p for p in info.filename.replace("\\", "/").split("/") if p not in ("", ".")]
            if info.is_dir() or not parts or _macos_extra(parts):
                continue
            files += 1
            suffix = Path(parts[-1]).suffix.lower()
            if suffix == ".zip":
                nested.append((i, shown))
            elif suffix in IMAGE_EXTENSIONS:
                if info.flag_bits & 0x1:
                    encrypted += 1
                    found.append((i, shown, None, "encrypted (password-protected): not extracted"))
                else:
                    plan.append((i, _unique(parts, taken), info))
        if not plan and len(found) == encrypted:  # nothing to caption, nothing unsafe to report
            if encrypted:
                raise ImageError(f"{name}: encrypted zip (password-protected): unzip it with its password first")
            if nested:
                raise ImageError(f"{name}: holds only zip archives ({', '.join(n for _, n in nested[:3])}"
                                 f"{', ...' if len(nested) > 3 else ''}); archives inside archives are not "
                                 "opened: unzip it and upload those")
            raise ImageError(f"{name}: " + ("empty zip archive (no files in it)" if not files else
                                            f"no images in this zip archive ({files} other files)"))
        found += [(i, n, None, "zip archive inside a zip: not opened (unzip it and upload it)") for i, n in nested]
        root, budget = os.path.realpath(dest), max_total_bytes
        for i, parts, info in plan:
            shown = "/".join(parts)
            if info.file_size > budget:
                found.append((i, shown, None, f"refused, the archive's images would expand beyond {limit} "
                                              "(possible zip bomb): not extracted"))
                continue
            target = dest.joinpath(*parts)
            made: list[Path] = []
            try:
                if not os.path.realpath(target).startswith(root + os.sep):  # e.g. a symlink already in dest
                    raise ImageError(f"refused, it would be written outside {display_name(dest)}")
                for d in reversed([d for d in [target.parent, *target.parent.parents] if not d.exists()]):
                    d.mkdir()
                    made.append(d)
                with zf.open(info) as src, open(target, "xb") as dst:
                    made.append(target)
                    while chunk := src.read(1 << 20):
                        budget -= len(chunk)
                        if budget < 0:
                            raise ImageError(f"refused, expands beyond {limit} (zip bomb)")
                        dst.write(chunk)
            except Exception as exc:
                for p in reversed(made):
                    with contextlib.suppress(OSError):
                        p.unlink() if p == target else p.rmdir()
                why = str(exc) if isinstance(exc, ImageError) else f"cannot extract ({_one_line(exc)})"
                found.append((i, shown, None, why))
                continue
            found.append((i, shown, target, ""))
    return ZipContents([e[1:] for e in sorted(found, key=lambda e: e[0])])


def safe_extract_zip(zip_path: PathLike, dest: Path, max_files: int = 2000,
                     max_total_bytes: int = 512 * 2**20) -> list[Path]:
    """extract_zip, all or nothing: the image paths, sorted; any problem refuses the whole archive (ImageError
    naming the first one, nothing left behind in dest)."""
    name, dest = display_name(zip_path), Path(dest)
    before = set(dest.rglob("*"))
    got = extract_zip(zip_path, dest, max_files, max_total_bytes)
    if got.problems:
        for p in sorted(set(dest.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
        member, why = got.problems[0]
        raise ImageError(f"{name}: {why.replace(': not extracted', '')} ({member!r} in archive)")
    return sorted((p for p, _ in got.images), key=str)
