"""Inputs at scale: WebDataset tar shards and path lists, beside plain files and folders (issue 28).

- A WebDataset shard (`.tar`, img2dataset's layout) holds samples: members that share a key, the member name
  up to the first dot of its base name (`00000/000000012.jpg`, `.json`, `.txt` -> key `00000/000000012`).
  Each sample with an image is one row; its `.json` and `.txt` are kept as text. A sample without an image,
  and a shard that cannot be read to its end, are error rows (TarProblem), never a failed run.
- A path list is `.txt` (one path per line), or `.csv` / `.parquet` with a `path` column (and an optional
  `key` column). Relative paths are relative to the list's own folder, so a list and its images can move
  together and every machine of a cluster reads the same files.

Tar members are read lazily, by offset (uncompressed tar only, as img2dataset writes), so a DataLoader worker
or a Ray actor gets a small picklable reference (TarImage), not the bytes. Imports only the standard library
and Pillow (pyarrow only for a .parquet list)."""

from __future__ import annotations

import csv
import glob
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from PIL import Image

from ..errors import CaptionerError
from .images import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    ImageError,
    display_name,
    find_images,
    load_image_bytes,
)

SHARD_SUFFIXES = (".tar",)
LIST_SUFFIXES = (".txt", ".csv", ".parquet")
_KEY = re.compile(r"^((?:.*/)?[^./][^/]*?)\.([^/]*)$")  # webdataset's base_plus_ext: key, extensions
_IMAGE_EXTS = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS)
PARQUET_HINT = "reading and writing Parquet needs pyarrow: pip install pyarrow"


@dataclass(frozen=True)
class TarImage:
    """One image inside an uncompressed tar shard, read by offset when it is loaded."""

    shard: str
    name: str
    offset: int
    size: int

    def __str__(self) -> str:  # the row's path: SHARD/MEMBER
        return f"{self.shard}/{self.name}"

    def load(self, max_pixels: int = MAX_PIXELS) -> Image.Image:
        try:
            with open(self.shard, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.size)
        except OSError as exc:
            raise ImageError(f"{self}: cannot read the shard ({exc.strerror or exc})") from None
        if len(data) != self.size:
            raise ImageError(f"{self}: the shard ends inside this member (truncated tar)")
        return load_image_bytes(data, str(self), max_pixels)


@dataclass(frozen=True)
class TarProblem:
    """A sample of a shard that cannot be captioned (no image in it, or the shard's damage): an error row."""

    shard: str
    name: str
    message: str

    def __str__(self) -> str:
        return f"{self.shard}/{self.name}" if self.name else self.shard

    def load(self, max_pixels: int = MAX_PIXELS) -> Image.Image:
        raise ImageError(f"{self}: {self.message}")


@dataclass(frozen=True)
class Meta:
    """What a row carries besides its caption: WebDataset key, the shard or path list it came from, and the
    sample's .json / .txt text."""

    key: str | None = None
    shard: str | None = None
    json: str | None = None
    txt: str | None = None


Item = Union[Path, TarImage, TarProblem]  # what caption_files takes: a file, or something with .load()


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def read_shard(shard: str | os.PathLike) -> tuple[list[Item], dict[str, Meta]]:
    """The samples of one WebDataset tar, in tar order: (items, {str(item): Meta}). Never raises for a damaged
    shard: what could be read is kept, and the damage is one TarProblem at the end."""
    shard = os.fsdecode(shard)
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    extra: dict[str, dict[str, str]] = {}
    problem = ""
    try:
        with tarfile.open(shard, "r:") as tar:  # "r:": uncompressed only (random access by offset)
            for m in tar:
                match = _KEY.match(m.name)
                if not m.isreg() or m.issparse() or not match:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                sample = samples.setdefault(key, {})
                if ext in ("json", "txt"):  # small: read now
                    f = tar.extractfile(m)
                    extra.setdefault(key, {})[ext] = _text(f.read() if f else b"")
                sample.setdefault(ext, m)
    except tarfile.ReadError as exc:
        compressed = open_magic(shard) in (b"\x1f\x8b", b"BZ", b"\xfd7")
        problem = ("compressed tar shards are not supported: use uncompressed .tar (img2dataset's default)"
                   if compressed else f"cannot read the shard to its end ({' '.join(str(exc).split()) or 'ReadError'})")
    except (OSError, EOFError) as exc:
        problem = f"cannot read the shard ({getattr(exc, 'strerror', None) or ' '.join(str(exc).split())})"
    items: list[Item] = []
    meta: dict[str, Meta] = {}
    for key, members in samples.items():
        image = next((m for ext, m in members.items() if ext.rsplit(".", 1)[-1] in _IMAGE_EXTS), None)
        if image is not None:
            item: Item = TarImage(shard, image.name, image.offset_data, image.size)
        else:
            item = TarProblem(shard, key, f"no image in this sample (members: {', '.join(sorted(members))})")
        items.append(item)
        meta[str(item)] = Meta(key, shard, extra.get(key, {}).get("json"), extra.get(key, {}).get("txt"))
    if problem:
        items.append(TarProblem(shard, "", problem))
        meta[shard] = Meta(None, shard)
    return items, meta


def open_magic(path: str) -> bytes:
    """The first bytes of a file that tell a compressed one ('' if unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(3)
    except OSError:
        return b""
    return head[:2] if head[:2] in (b"\x1f\x8b", b"BZ") else head


def read_path_list(path: str | os.PathLike) -> list[tuple[str, str | None]]:
    """(image path, key or None) for each entry of a .txt / .csv / .parquet list, in order. Relative paths are
    taken from the list's own folder. An unreadable list, or one without a `path` column, is a CaptionerError."""
    path = Path(os.fsdecode(path))
    base = path.parent
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
            rows = [(line, None) for line in lines if line.strip()]
        elif suffix == ".csv":
            with path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
                reader = csv.DictReader(f)
                if "path" not in (reader.fieldnames or []):
                    raise CaptionerError(f"{display_name(path)}: a path list needs a `path` column "
                                         f"(columns: {', '.join(reader.fieldnames or []) or 'none'})")
                has_key = "key" in (reader.fieldnames or [])
                rows = [(r["path"], (r["key"] or None) if has_key else None) for r in reader
                        if (r["path"] or "").strip()]
        else:
            rows = _parquet_list(path)
    except OSError as exc:
        raise CaptionerError(f"cannot read {display_name(path)}: {exc.strerror or exc}") from None
    return [(str(base / p) if not os.path.isabs(p) else p, key) for p, key in rows]


def read_list_input(path: str) -> list[tuple[str, str | None]]:
    """read_path_list for a list named as an input: also a CaptionerError when it names no existing file at all
    (a text file that is no path list, e.g. notes.txt caught by `captioner caption *`: one error, not a row per
    line)."""
    entries = read_path_list(path)
    if not entries:
        raise CaptionerError(f"{display_name(path)}: the path list is empty")
    if not any(os.path.lexists(p) for p, _ in entries):
        raise CaptionerError(f"{display_name(path)}: none of its {len(entries)} entries is an existing file "
                             "(not a path list?)")
    return entries


def _parquet_list(path: Path) -> list[tuple[str, str | None]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CaptionerError(PARQUET_HINT) from None
    try:
        names = pq.read_schema(path).names
        if "path" not in names:
            raise CaptionerError(f"{display_name(path)}: a path list needs a `path` column (columns: "
                                 f"{', '.join(names[:20]) or 'none'})")
        table = pq.read_table(path, columns=["path"] + (["key"] if "key" in names else []))
    except CaptionerError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors: not Parquet, damaged
        why = " ".join(str(exc).split())[:200]
        raise CaptionerError(f"cannot read {display_name(path)} as Parquet ({why})") from None
    paths = table.column("path").to_pylist()
    keys = table.column("key").to_pylist() if "key" in names else [None] * len(paths)
    return [(str(p), None if k is None else str(k)) for p, k in zip(paths, keys) if p]


def is_shard(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def is_path_list(name: str) -> bool:
    return name.lower().endswith(LIST_SUFFIXES)


def split_inputs(inputs: Sequence[str | os.PathLike], recursive: bool = False
                 ) -> tuple[list[str], list[str], list[str], list[tuple[str, str]]]:
    """(inputs for find_images, tar shards, path lists, [(input, error)]). A file or glob pattern ending in .tar
    is a shard, one ending in .txt/.csv/.parquet a path list; folders and everything else are left to
    find_images, unchanged (a folder's .tar files are not read: pass 'DIR/*.tar')."""
    rest: list[str] = []
    shards: list[str] = []
    lists: list[str] = []
    errors: list[tuple[str, str]] = []
    for raw in inputs:
        text = os.fsdecode(raw)
        if os.path.isdir(text) or not (is_shard(text) or is_path_list(text)):
            rest.append(text)
            continue
        to = shards if is_shard(text) else lists
        if os.path.lexists(text):
            to.append(text)
        elif any(c in text for c in "*?["):
            found = sorted(p for p in glob.glob(text, recursive=recursive) if os.path.isfile(p))
            if not found:
                errors.append((display_name(text), "no files match this pattern"))
            to += found
        else:
            errors.append((display_name(text), "no such file or folder"))
    return rest, list(dict.fromkeys(shards)), list(dict.fromkeys(lists)), errors


def read_lists(lists: Sequence[str], errors: list[tuple[str, str]]) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """[(list, its (path, key) entries)] for each path list that reads; one (input, error) in `errors` for each
    that does not."""
    read = []
    for lst in lists:
        try:
            read.append((lst, read_list_input(lst)))
        except CaptionerError as exc:
            errors.append((display_name(lst), str(exc).removeprefix(display_name(lst) + ": ")))
    return read


def gather(inputs: Sequence[str | os.PathLike], recursive: bool = False, skipped: list[Path] | None = None
           ) -> tuple[list[Item], list[tuple[str, str]], dict[str, Meta]]:
    """Everything `captioner caption` on one machine captions, in order: files and folders (find_images, sorted),
    then each path list's entries, then each shard's samples. Returns (items, [(input, error)], {str(item):
    Meta} for the items from shards and lists). An item named twice is captioned once."""
    rest, shards, lists, errors = split_inputs(inputs, recursive)
    items: list[Item] = []
    if rest:
        found, more = find_images(rest, recursive, skipped)
        items += found
        errors += more
    meta: dict[str, Meta] = {}
    for lst, entries in read_lists(lists, errors):
        for p, key in entries:
            items.append(Path(p))
            meta.setdefault(p, Meta(key, lst))
    for shard in shards:
        found_items, found_meta = read_shard(shard)
        if not found_items:
            errors.append((display_name(shard), "no samples in this shard"))
        items += found_items
        meta.update(found_meta)
    first: dict[str, Item] = {}
    for item in items:  # an item named twice is captioned once, where it first appears
        first.setdefault(str(item), item)
    return list(first.values()), errors, meta
