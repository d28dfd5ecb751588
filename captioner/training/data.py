"""Caption datasets (Karpathy JSON, Flickr8k, COCO, CSV/JSONL), the feature cache and the
training dataset over cached features.

Flow: files -> `Item`s (image path, captions, split) -> encoder features cached on disk
(fp16 .npy, memory-mapped) -> `CaptionPairs` (feature row, encoded caption) for training.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import CaptionerError
from ..media.images import load_image
from ..runtime.workers import WORKER_TIMEOUT, loader_errors
from ..runtime.workers import context as worker_context
from ..runtime.workers import quiet_handover

log = logging.getLogger("captioner")
SPLITS = ("train", "val", "test")


@dataclass
class Item:
    image: Path
    captions: list[str]
    split: str  # train | val | test
    dataset: str


def hash_split(key: str, val_pct: int = 10, test_pct: int = 10) -> str:
    """Deterministic split from a stable key (md5, not Python's salted hash):
    bucket = md5(key) mod 100; < test_pct -> test, < test_pct+val_pct -> val, else train."""
    bucket = int(hashlib.md5(key.encode()).hexdigest(), 16) % 100
    return "test" if bucket < test_pct else "val" if bucket < test_pct + val_pct else "train"


def _keep_present(items: list[Item], name: str) -> list[Item]:
    present = [it for it in items if it.image.is_file()]
    if len(present) < len(items):
        log.info("%s: skipped %d of %d images whose file is missing", name, len(items) - len(present), len(items))
    return present


def read_karpathy(path: Path, image_root: Path | None = None, name: str = "karpathy") -> list[Item]:
    """Karpathy split JSON: images[].filename/filepath, split (restval counts as train), sentences[].raw."""
    data = json.loads(path.read_text())
    root = image_root or (path.parent / "images")
    items = []
    for im in data["images"]:
        split = {"restval": "train"}.get(im["split"], im["split"])
        folder = root / im["filepath"] if im.get("filepath") else root
        items.append(Item(folder / im["filename"], [s["raw"] for s in im["sentences"]], split, name))
    return items


def read_flickr8k(root: Path, name: str = "flickr8k") -> list[Item]:
    """Flickr8k.token.txt (name.jpg#k<TAB>caption) + Flickr_8k.{train,dev,test}Images.txt."""
    caps: dict[str, list[str]] = {}
    for line in (root / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        if "\t" in line:
            key, cap = line.split("\t", 1)
            caps.setdefault(key.split("#")[0], []).append(cap.strip())
    image_dir = next((root / d for d in ("images", "Flicker8k_Dataset", "Flickr8k_Dataset") if (root / d).is_dir()), root / "images")
    items = []
    for split, fname in (("train", "trainImages"), ("val", "devImages"), ("test", "testImages")):
        listing = root / f"Flickr_8k.{fname}.txt"
        for img in listing.read_text().split() if listing.is_file() else []:
            if img in caps:
                items.append(Item(image_dir / img, caps[img], split, name))
    return items


def read_coco(path: Path, image_root: Path | None = None, name: str = "coco") -> list[Item]:
    """COCO captions JSON. Split: `hash_split(str(image_id))` (10% test, 10% val)."""
    data = json.loads(path.read_text())
    caps: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        caps.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    root = image_root or (path.parent / "images")
    items = [Item(root / im["file_name"], caps[im["id"]], hash_split(str(im["id"])), name)
             for im in data["images"] if im["id"] in caps]
    return items


def read_table(path: Path, name: str = "table") -> list[Item]:
    """CSV (header with image,caption[,split]) or JSONL ({"image":..., "caption":...}). Paths are
    relative to the file. Without a split column: `hash_split(image path)`."""
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    grouped: dict[str, Item] = {}
    for row in rows:
        if "image" not in row or "caption" not in row:
            raise CaptionerError(f"{path}: every row needs 'image' and 'caption' fields")
        img = row["image"]
        if img not in grouped:
            grouped[img] = Item(path.parent / img, [], row.get("split") or hash_split(img), name)
        grouped[img].captions.append(row["caption"])
    return list(grouped.values())


READERS: dict[str, tuple[str, Callable[..., list[Item]]]] = {
    "karpathy": ("dataset.json", read_karpathy), "flickr8k": ("Flickr8k.token.txt", read_flickr8k),
    "coco": ("captions.json", read_coco), "table": ("", read_table)}


def load_dataset(spec: str) -> list[Item]:
    """`kind:path` (kind: karpathy | flickr8k | coco | table) or a bare path whose kind is
    detected from the files in it. Images whose file is missing are skipped and counted."""
    everything, name = _read_dataset(spec)
    items = _keep_present(everything, name)
    counts = Counter(it.split for it in items)
    log.info("%s: %s images", name, ", ".join(f"{counts[s]} {s}" for s in SPLITS))
    return items


def load_text_only(spec: str, split: str = "train") -> list[str]:
    """Captions of `split` entries whose image file is missing: text for the decoder's language
    (train.py --text-ratio). Only ever the training split, so no val/test caption leaks in."""
    everything, name = _read_dataset(spec)
    texts = [c for it in everything if it.split == split and not it.image.is_file() for c in it.captions]
    log.info("%s: %d %s captions without an image (text only)", name, len(texts), split)
    return texts


def _read_dataset(spec: str) -> tuple[list[Item], str]:
    kind, sep, loc = spec.partition(":")
    if not sep or kind not in READERS:
        kind, loc = "", spec
    path = Path(loc)
    if not path.exists():
        raise CaptionerError(f"dataset not found: {path}")
    if not kind:
        if path.is_dir():
            kind = next((k for k, (probe, _) in READERS.items() if probe and (path / probe).is_file()), "")
        elif path.suffix in (".csv", ".jsonl"):
            kind = "table"
        elif path.suffix == ".json":
            kind = "coco" if '"annotations"' in path.read_text()[:1_000_000] else "karpathy"
        if not kind:
            raise CaptionerError(f"cannot tell what dataset {path} is; name it as kind:path (kinds: {', '.join(READERS)})")
    probe, reader = READERS[kind]
    if path.is_dir() and kind in ("karpathy", "coco"):
        path = path / probe
    name = path.name if path.is_dir() else path.parent.name
    try:
        items = reader(path, name=name)
    except (KeyError, ValueError, OSError) as exc:
        raise CaptionerError(f"could not read {kind} dataset {path}: {type(exc).__name__}: {exc}") from None
    return items, f"{name} ({kind})"


# ---------------------------------------------------------------- feature cache --------
class _ImageFiles(Dataset):
    """Images `paths`, transformed; item i is global row `offset + i`, whose random view is seeded by that row
    (so a shard of the list gives the rows the whole list would)."""

    def __init__(self, paths: Sequence[Path], transform: Callable, seed: int, offset: int = 0):
        self.paths, self.transform, self.seed, self.offset = list(paths), transform, seed, offset

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):  # reproducible views; the caller's RNG is left alone
            torch.manual_seed(self.seed * 1_000_003 + self.offset + i)
            return self.transform(load_image(self.paths[i]))


DIGESTS = "digests.json"  # in the cache folder: each image's content digest, by absolute path, size and mtime


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def content_digests(paths: Sequence[Path], cache_dir: Path) -> list[str]:
    """Each file's content digest (BLAKE2b-128). Remembered in cache_dir/digests.json by path, size and mtime (ns),
    so a file unchanged since is only stat'ed (as make and rsync judge staleness); a copied, moved or re-provisioned
    dataset (new paths or mtimes, same bytes) is read once more, seconds, and finds its features under the same key."""
    index_file = Path(cache_dir) / DIGESTS
    try:
        known = json.loads(index_file.read_text())
    except (OSError, ValueError):  # none yet, or damaged: rebuilt
        known = {}
    known = known if isinstance(known, dict) else {}
    digests, changed = [], False
    for path in paths:
        st = os.stat(path)
        name, entry = os.path.abspath(path), [st.st_size, st.st_mtime_ns]
        old = known.get(name)
        if isinstance(old, list) and len(old) == 3 and old[:2] == entry:
            entry = old
        else:
            entry, changed = [*entry, _digest(path)], True
            known[name] = entry
        digests.append(entry[2])
    if changed:  # atomically: ranks under torchrun write it too (the last one wins; each is complete)
        with _written(index_file) as tmp:
            tmp.write_text(json.dumps(known))
    return digests


def cache_key(digests: Sequence[str], encoder_cfg: dict, view: int) -> str:
    """Key of one cached feature array: the encoder (config and precision), the view, and every file's content in
    order (content_digests). Paths and times are left out: a changed file gets new features, a moved one keeps them."""
    h = hashlib.sha1(json.dumps([encoder_cfg, view, list(digests)]).encode())
    return h.hexdigest()[:16]


def _legacy_key(paths: Sequence[Path], encoder_cfg: dict, view: int) -> str:
    """The key of caches written before content keys (path, size and mtime of each file)."""
    signatures = [[str(p), st.st_size, st.st_mtime_ns] for p, st in ((p, os.stat(p)) for p in paths)]
    return hashlib.sha1(json.dumps([encoder_cfg, view, signatures]).encode()).hexdigest()[:16]


def cache_features(paths: Sequence[Path], encoder, transform: Callable, cache_dir: Path, view: int = 0,
                   batch_size: int = 32, num_workers: int = 2, device: str = "cpu", rank: int = 0,
                   world: int = 1) -> np.ndarray:
    """Encode every image once and store (N, L, D) fp16 features as a .npy. Returns it memory-mapped read-only.

    Each file is written under a temporary name and renamed when complete. Under torchrun (world > 1, process
    group initialised) rank r encodes the r-th contiguous shard into its own file, kept if the job is restarted;
    rank 0 then concatenates the shards into the same file one process would have written."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    identity = encoder.cache_identity()
    key = cache_key(content_digests(paths, cache_dir), identity, view)
    target = cache_dir / f"feats-{key}.npy"
    if not target.is_file():  # a cache of an earlier version whose files are unchanged: renamed, not redone
        legacy = cache_dir / f"feats-{_legacy_key(paths, identity, view)}.npy"
        with contextlib.suppress(FileNotFoundError):  # none, or another rank renamed it first
            os.replace(legacy, target)
    if target.is_file():
        return np.load(target, mmap_mode="r")
    if world == 1:
        _encode(paths, 0, encoder, transform, target, view, batch_size, num_workers, device)
        return np.load(target, mmap_mode="r")
    import torch.distributed as dist

    bounds = [len(paths) * r // world for r in range(world + 1)]
    shards = [cache_dir / f"feats-{key}.shard{r}of{world}.npy" for r in range(world)]
    if not shards[rank].is_file() and bounds[rank] < bounds[rank + 1]:
        _encode(paths[bounds[rank]:bounds[rank + 1]], bounds[rank], encoder, transform, shards[rank], view,
                batch_size, num_workers, device)
    dist.barrier()
    if rank == 0 and not target.is_file():
        parts = [np.load(s, mmap_mode="r") for s, lo, hi in zip(shards, bounds, bounds[1:]) if lo < hi]
        with _written(target) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(paths), *parts[0].shape[1:]))
            row = 0
            for part in parts:
                out[row:row + len(part)] = part
                row += len(part)
            out.flush()
            del out, parts
        for s in shards:
            s.unlink(missing_ok=True)
    dist.barrier()
    return np.load(target, mmap_mode="r")


def _encode(paths: Sequence[Path], offset: int, encoder, transform: Callable, target: Path, view: int,
            batch_size: int, num_workers: int, device: str) -> None:
    """Encode `paths` (global rows offset...) into the .npy `target`: a temporary file, renamed when complete."""
    from tqdm import tqdm

    with warnings.catch_warnings():  # more workers than CPUs: said once, in one line (cli/main.py), not torch's way
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        loader = DataLoader(_ImageFiles(paths, transform, seed=view, offset=offset), batch_size=batch_size,
                            num_workers=num_workers, generator=torch.Generator().manual_seed(view),  # no global RNG draws
                            multiprocessing_context=worker_context() if num_workers else None,
                            worker_init_fn=quiet_handover,
                            timeout=WORKER_TIMEOUT if num_workers else 0)
        batches = iter(loader)  # torch checks the worker count again here
    out = None
    row = 0
    encoder.to(device)
    with _written(target) as tmp, loader_errors("image-loading worker", WORKER_TIMEOUT):
        for images in tqdm(batches, total=len(loader), desc=f"encoding view {view}", unit="batch", leave=False):
            feats = encoder.encode_cached(images.to(device))
            if out is None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(paths), *feats.shape[1:]))
            out[row:row + len(feats)] = feats.cpu().numpy().astype(np.float16)
            row += len(feats)
        assert out is not None, "no images to encode"
        out.flush()
        del out


@contextlib.contextmanager
def _written(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` for the block to write: renamed into place when the block completes, removed
    when it fails (an error, Ctrl-C or SIGTERM: a half-written cache file, as large as the cache, is no use)."""
    tmp = target.with_name(f"{target.stem}.tmp{os.getpid()}{target.suffix}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _publish(tmp, target)


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished cache file into place; one clear error if it vanished meanwhile (the cache folder
    cleaned or moved while this run wrote into it), not an OSError traceback."""
    try:
        os.replace(tmp, target)
    except FileNotFoundError:
        raise CaptionerError(f"feature cache file {tmp} disappeared while it was being written (was the cache folder "
                             f"{target.parent} cleaned or moved during the run?); run the command again") from None


class FileRows:
    """The rows of a memory-mapped cached .npy, each read with os.preadv when drawn. The kernel's page cache keeps
    what fits (shared between processes) but the pages are never mapped into this process, so its resident set
    does not grow with the cache (a memory map's touched pages count in the RSS)."""

    def __init__(self, array: np.memmap):
        self.path, self.offset = str(array.filename), int(array.offset)
        self.shape, self.dtype = tuple(array.shape), array.dtype
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        row = np.empty(self.shape[1:], self.dtype)
        if os.preadv(self._fd, [row], self.offset + i * self.row_bytes) != self.row_bytes:
            raise CaptionerError(f"{self.path}: truncated feature cache (row {i}); delete it to rebuild")
        return row

    def __getstate__(self) -> dict:  # a copy (DataLoader worker, spawn) opens its own descriptor
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


def _streamed(view: np.ndarray) -> np.ndarray | FileRows:
    """Rows read from the file where the view is a file-backed memory map (and the OS has preadv), else as is."""
    return FileRows(view) if isinstance(view, np.memmap) and view.filename and hasattr(os, "preadv") else view


def _in_ram(view: np.ndarray) -> np.ndarray:
    """A RAM copy of a view. A file-backed memory map is read from its file (np.load without mmap), so the copy
    is the only one counted in this process's RSS (copying from the map would map every page in as well)."""
    if isinstance(view, np.memmap) and view.filename:
        copy = np.load(view.filename)
        if copy.shape == view.shape and copy.dtype == view.dtype:
            return copy
    return np.array(view)


class CaptionPairs(Dataset):
    """Training items over cached features, each with a random cached view of its image (views are extra
    augmented crops/flips): per image, (view, all the image's captions) when `per_image` (the decoder then
    projects each image once for its ~5 captions), else per caption, (view, [caption])."""

    def __init__(self, views: list[np.ndarray], captions: list[list[list[int]]], seed: int = 0,
                 per_image: bool = True, in_ram: bool = True):
        # in RAM: one copy of every view (fp16); else each row is read from its cache file when drawn (FileRows).
        # The same draws either way: same batches.
        self.views = [torch.from_numpy(_in_ram(v)) for v in views] if in_ram else [_streamed(v) for v in views]
        self.streamed = any(isinstance(v, FileRows) for v in self.views)  # rows come from disk when drawn
        self.captions, self.per_image = captions, per_image
        self.pairs = [(i, c) for i, caps in enumerate(captions) for c in caps]
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.captions) if self.per_image else len(self.pairs)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, list[list[int]]]:
        if self.per_image:
            return self.view(idx), self.captions[idx]
        image, caption = self.pairs[idx]
        return self.view(image), [caption]

    def __getstate__(self) -> dict:  # a worker's copy: torch cannot send a Generator through a process pipe
        return {**self.__dict__, "gen": self.gen.get_state().numpy().tobytes()}

    def __setstate__(self, state: dict) -> None:
        gen = torch.Generator()
        gen.set_state(torch.frombuffer(bytearray(state["gen"]), dtype=torch.uint8))
        self.__dict__.update(state, gen=gen)

    def view(self, image: int) -> torch.Tensor:
        """One of the image's cached views, drawn with self.gen."""
        v = int(torch.randint(len(self.views), (1,), generator=self.gen)) if len(self.views) > 1 else 0
        row = self.views[v][image]
        if isinstance(row, torch.Tensor):
            return row
        return torch.from_numpy(row if isinstance(self.views[v], FileRows) else np.array(row))


class ImageViews(Dataset):
    """(image feature row, image index) for every image of a CaptionPairs once, a view drawn as it draws them
    (same features in RAM, same generator). Self-critical training samples its own captions, so it iterates
    over images, not captions."""

    def __init__(self, pairs: CaptionPairs):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs.views[0])

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        return self.pairs.view(idx), idx


class TextPairs(Dataset):
    """Captions without an image: (all-zero feature grid, [caption ids]). The decoder learns language from
    them; a blank grid is what it sees, so it learns too that real images are something else."""

    def __init__(self, captions: list[list[int]], feat_shape: tuple[int, ...]):
        self.captions, self.blank = captions, torch.zeros(feat_shape, dtype=torch.float16)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, list[list[int]]]:
        return self.blank, [self.captions[idx]]


def collate(batch: list[tuple[torch.Tensor, list[list[int]]]], pad: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(feature grid, captions) items -> features (N, L, D) float32, captions (B, T) padded with `pad`, and
    each caption's image row (B,), for Decoder.forward."""
    feats = torch.stack([f for f, _ in batch]).float()
    caps = [c for _, cs in batch for c in cs]
    index = torch.tensor([i for i, (_, cs) in enumerate(batch) for _ in cs], dtype=torch.long)
    out = torch.full((len(caps), max(len(c) for c in caps)), pad, dtype=torch.long)
    for i, c in enumerate(caps):
        out[i, : len(c)] = torch.tensor(c)
    return feats, out, index
