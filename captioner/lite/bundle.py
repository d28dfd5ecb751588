"""A model bundle on disk (`captioner export-onnx`, training/bundle.py): model.json and the three ONNX files it names,
read and checked without torch."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CaptionerError
from ..options import cache_root
from .preprocess import Preprocessing
from .search import SearchConfig
from .weights import Sources, build_data, sha256_file

log = logging.getLogger("captioner")

BUNDLE_FORMAT = "captioner-bundle/1"
MANIFEST = "model.json"
FILES = {"encoder": "encoder.onnx", "decoder_init": "decoder_init.onnx", "decoder_step": "decoder_step.onnx"}


@dataclass
class Bundle:
    """model.json, read: what LiteCaptioner needs besides the three sessions."""

    folder: Path
    model_id: str
    itos: list[str]
    specials: tuple[int, int, int, int]
    content_mask: np.ndarray  # (V,) bool: the words no_repeat_words never repeats
    preprocessing: Preprocessing
    input: tuple[int, int, int]  # (3, H, W) the encoder takes
    grid: int
    cell: str
    search: SearchConfig
    imagenet_categories: list[str]
    manifest: dict[str, Any]

    def path(self, role: str) -> Path:
        return self.folder / self.manifest["files"][role]["file"]


def _check(folder: Path, entry: dict[str, Any], verify: bool) -> None:
    path = folder / entry["file"]
    if not path.is_file():
        raise CaptionerError(f"model bundle {folder}: {entry['file']} is missing")
    if path.stat().st_size != entry["bytes"] or (verify and sha256_file(path) != entry["sha256"]):
        raise CaptionerError(f"model bundle {folder}: {entry['file']} is damaged (its bytes do not match "
                             f"{MANIFEST}); export the bundle again")


def rebuild_weights(folder: Path, manifest: dict[str, Any], missing: list[dict[str, Any]]) -> Path:
    """Write the `missing` data files from their recipes (lite/weights.py): into the bundle's folder, or where that
    is read-only into the user cache with a copy of the graphs. Returns the folder that now holds the whole bundle.
    (The shipped bundle tracks no data files: this runs on first use, and again after an update whose model.json
    no longer matches the data files left from before.)"""
    for data in missing:
        if not data.get("rebuildable"):
            raise CaptionerError(f"model bundle {folder}: {data['file']} is missing (and cannot be rebuilt: its "
                                 "model.json names no source for some of its tensors); export the bundle again")
    cached = cache_root() / "bundles" / f"{manifest['model_id']}-{manifest['files']['encoder']['sha256'][:12]}"
    try:  # rebuilt before, in the cache (the bundle's own folder is read-only)
        if (cached / MANIFEST).read_bytes() == (folder / MANIFEST).read_bytes():
            for data in missing:
                _check(cached, data, verify=True)
            return cached
    except (OSError, CaptionerError):
        pass
    described = manifest.get("sources", {})
    checkpoint = described.get("checkpoint", {}).get("file")
    sources = Sources((folder / checkpoint) if checkpoint else None,
                      {name: d["sha256"] for name, d in described.items()})
    built = {}
    for data in missing:
        raw = build_data(data["tensors"], sources.tensor)
        if len(raw) != data["bytes"] or hashlib.sha256(raw).hexdigest() != data["sha256"]:
            raise CaptionerError(f"model bundle {folder}: {data['file']} rebuilt from its sources does not match "
                                 f"{MANIFEST}; export the bundle again")
        built[data["file"]] = raw
    log.info("model bundle %s: weights rebuilt from %s (once)", folder, ", ".join(sorted(described)))
    try:
        _write_all(folder, built)
        return folder
    except OSError:
        pass
    try:
        cached.mkdir(parents=True, exist_ok=True)
        _write_all(cached, built | {name: (folder / name).read_bytes()
                                    for name in [*(manifest["files"][role]["file"] for role in FILES), MANIFEST]})
    except OSError as exc:
        raise CaptionerError(f"model bundle {folder}: cannot write its weights there nor into {cached}: "
                             f"{exc.strerror or exc} (set CAPTIONER_CACHE to a writable folder)") from None
    return cached


def _write_all(folder: Path, files: dict[str, bytes]) -> None:
    """Each file written beside its name and renamed: a reader never sees half a file."""
    for name, raw in files.items():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            os.chmod(tmp, 0o644)
            os.replace(tmp, folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def read_bundle(folder: Path | str, verify: bool = True) -> Bundle:
    """The bundle in `folder`; one CaptionerError naming what is wrong (no model.json, another format, a file
    missing or, with `verify`, whose bytes are not the ones model.json records)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        what = "does not exist" if not folder.exists() else f"has no {MANIFEST} (make one with `captioner export-onnx`)"
        raise CaptionerError(f"model bundle {folder} {what}")
    try:
        m = json.loads(manifest_path.read_text(encoding="utf-8"))
        if m.get("format") != BUNDLE_FORMAT:
            raise CaptionerError(f"{manifest_path}: format {m.get('format')!r}, this captioner reads {BUNDLE_FORMAT!r}")
        missing = []  # data files to rebuild from their sources
        for role in FILES:
            entry = m["files"][role]
            _check(folder, entry, verify)
            data = entry.get("data")
            if data:
                try:
                    _check(folder, data, verify)
                except CaptionerError:  # absent, or left from another version of the bundle (after a git pull)
                    if (folder / data["file"]).is_file() and not data.get("rebuildable"):
                        raise
                    missing.append(data)
        if missing:
            folder = rebuild_weights(folder, m, missing)
        enc, dec = m["encoder"], m["decoder"]
        mask = np.asarray(m["content_mask"], dtype=bool)
        if len(mask) != len(m["vocab"]) or dec["vocab_size"] != len(m["vocab"]):
            raise CaptionerError(f"{manifest_path}: the vocabulary, its mask and the decoder disagree in size")
        search = SearchConfig(**{k: v for k, v in m.get("search", {}).items() if k in SearchConfig.__dataclass_fields__})
        spec = Preprocessing.from_dict(enc["preprocessing"])
        return Bundle(folder, str(m["model_id"]), list(m["vocab"]), tuple(m["specials"]), mask, spec,  # type: ignore[arg-type]
                      tuple(enc["input"]), int(enc["grid"]), str(dec["cell"]), search,  # type: ignore[arg-type]
                      list(m.get("imagenet_categories", [])), m)
    except CaptionerError:
        raise
    except OSError as exc:
        raise CaptionerError(f"cannot read model bundle {folder}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, a key missing, a value of the wrong type
        raise CaptionerError(f"{manifest_path} is not a valid model bundle manifest "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
