"""A model bundle on disk (`captioner export-onnx`, training/bundle.py): model.json and the three ONNX files it names,
read and checked without torch."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CaptionerError
from .preprocess import Preprocessing
from .search import SearchConfig

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


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (what bundles and exports record and check)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        for role in FILES:
            entry = m["files"][role]
            path = folder / entry["file"]
            if not path.is_file():
                raise CaptionerError(f"model bundle {folder}: {entry['file']} is missing")
            if path.stat().st_size != entry["bytes"] or (verify and sha256_file(path) != entry["sha256"]):
                raise CaptionerError(f"model bundle {folder}: {entry['file']} is damaged (its bytes do not match "
                                     f"{MANIFEST}); export the bundle again")
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
