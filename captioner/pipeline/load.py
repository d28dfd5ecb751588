"""Which captioner a command gets, without importing torch to decide: the light one (an ONNX model bundle run by
ONNX Runtime + NumPy, lite/) or the torch one (a checkpoint, pipeline/captioner.py) for the torch backends."""

from __future__ import annotations

import importlib.util
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import CaptionerError
from ..lite.bundle import MANIFEST

log = logging.getLogger("captioner")

TRAIN_EXTRA = "pip install 'captioner[train]'"
LIGHT_BACKEND = "onnx"  # what runs a bundle: ONNX Runtime, fp32, the same captions on every CPU
CHECKPOINT_BACKEND = "auto"  # what runs a checkpoint when no --backend is given (as before bundles)


def has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def require_torch(what: str) -> None:
    """One CaptionerError (exit 1) when torch is not installed: `what` needs it, and which extra brings it."""
    if not has_torch():
        raise CaptionerError(f"{what} needs torch, which the light install leaves out: {TRAIN_EXTRA}")


def default_model(backend: str | None = None, int8: bool = False) -> Path:
    """$CAPTIONER_MODEL if set; else the shipped bundle (assets/model/) without --backend or with onnx, the shipped
    checkpoint (assets/model.pt) for the torch backends and --int8."""
    if os.environ.get("CAPTIONER_MODEL"):
        return Path(os.environ["CAPTIONER_MODEL"])
    name = "model" if backend in (None, LIGHT_BACKEND) and not int8 else "model.pt"
    return Path(str(resources.files("captioner") / "assets" / name))


def _is_bundle(path: Path) -> bool:
    """A bundle folder (model.json); without torch any folder is read as one (its error says what is missing)."""
    return path.is_dir() and ((path / MANIFEST).is_file() or not has_torch())


def is_light(model: Path | str | None, backend: str | None = None, int8: bool = False) -> bool:
    """Whether this model and backend run on the light engine: a bundle folder is always light."""
    return _is_bundle(Path(model) if model else default_model(backend, int8))


def load_captioner(model: Path | str | None = None, device: str = "cpu", backend: str | None = None,
                   int8: bool = False, threads: int | None = None) -> Any:
    """A LiteCaptioner for a model bundle (the default model), else the torch Captioner for a checkpoint (.pt),
    which needs torch ([train]); backend None: onnx for a bundle, auto for a checkpoint. Every failure is one
    CaptionerError."""
    if not model and device != "cpu" and backend is None:
        backend = CHECKPOINT_BACKEND  # the shipped model on a GPU: its checkpoint, which torch runs there
    path = Path(model) if model else default_model(backend, int8)
    if _is_bundle(path):
        if backend not in (None, LIGHT_BACKEND) or int8:
            wanted = f"--backend {backend}" + (" --int8" if int8 else "")
            raise CaptionerError(f"{path} is an ONNX model bundle: it runs with --backend onnx (the default); "
                                 f"{wanted} needs a checkpoint (.pt): pass one with --model")
        if device != "cpu":
            raise CaptionerError(f"{path} is an ONNX model bundle, which runs on the CPU; --device {device} needs a "
                                 "checkpoint (.pt) and torch")
        from ..lite.captioner import LiteCaptioner
        from ..media.images import load_image

        cap = LiteCaptioner.load(path, threads=threads, loader=load_image)
        log.debug("model: the bundle %s (fp32, ONNX Runtime)", path)
        log.debug("runtimes: encoder onnx, decoder step onnx")
        return cap
    if not path.exists():
        if not model and not os.environ.get("CAPTIONER_MODEL"):
            raise CaptionerError(f"the default model is missing from the package ({path}); reinstall, or pass --model")
        raise CaptionerError(f"no model at {path} (a checkpoint .pt or a bundle folder from `captioner export-onnx`)")
    require_torch(f"{path.name} (a torch checkpoint)" if backend is None and not int8
                  else f"--backend {backend or LIGHT_BACKEND}{' --int8' if int8 else ''}")
    from .captioner import Captioner

    return Captioner.load(path, device, backend=backend or CHECKPOINT_BACKEND, int8=int8)


class Captioner:
    """The public front door (`from captioner import Captioner`): `Captioner.load()` gives the engine for the model,
    a LiteCaptioner for the shipped bundle (no torch) or the torch Captioner (pipeline/captioner.py) for a
    checkpoint or a torch backend; both take `.caption([paths or PIL images], beam=..., ...)`."""

    load = staticmethod(load_captioner)
