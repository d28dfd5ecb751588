"""The decoder's step in ONNX Runtime (`--backend onnx`, and what `--backend auto` picks where it is faster).

Greedy and beam search (search.py) call `Decoder.step` once per word for every unfinished row: small matrix
products at a few rows, where torch's MKL sgemm takes a slow generic path on some CPUs (AMD) and onnxruntime's
MLAS, its weights packed once per session, does not (the measurements: docs/speed.md "Figures behind the code").

Only the step is exported: `Decoder.prepare` (once per batch) stays in torch. `OnnxDecoder` stands in for the
Decoder in model/search.py: `cfg` and `prepare` are the torch decoder's, `step` runs the export, and `numpy_step` runs
it on the NumPy arrays that the search (lite/search.py) holds. The file is onnx/decoder-KEY.onnx in the cache, KEY naming the decoder's weights and config, torch and
onnxruntime; it is made, checked (SHA-256 record) and rebuilt exactly as the encoder's export (onnx_encoder.py).
The step's outputs equal torch's to ~4e-6 (fp32; summation order differs).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CaptionerError
from ..model.decoder import Decoder, State
from .compiled import cache_root
from .onnx_encoder import (
    FORMAT,
    cache_folder,
    ensure_export,
    make_session,
    onnxruntime_version,
    publish,
    require_ort,
    write_export,
)

log = logging.getLogger("captioner")


def export_key(decoder: Decoder) -> str:
    """What the export depends on: the decoder's config and weights, torch and onnxruntime."""
    h = hashlib.sha256()
    h.update(repr((FORMAT, "decoder-step", torch.__version__, onnxruntime_version(),
                   sorted(decoder.cfg.to_dict().items()))).encode())
    for name, tensor in sorted(decoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def export_path(decoder: Decoder, root: Path | None = None) -> Path:
    return (root or cache_root()) / "onnx" / f"decoder-{export_key(decoder)}.onnx"


class _Step(torch.nn.Module):
    """What gets exported: (words, a, keys, h, c) -> (logits, h, c, alpha); a GRU's c is not an output."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, words: torch.Tensor, a: torch.Tensor, keys: torch.Tensor, h: torch.Tensor,
                c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, (h, c), alpha = self.decoder.step(words, a, keys, (h, c))
        return (logits, h, c, alpha) if self.decoder.cfg.cell == "lstm" else (logits, h, alpha)


def _outputs(decoder: Decoder) -> list[str]:
    return ["logits", "h_next", "c_next", "alpha"] if decoder.cfg.cell == "lstm" else ["logits", "h_next", "alpha"]


def export(decoder: Decoder, path: Path) -> Path:
    """Export `decoder`'s step (eval mode, on CPU) to `path` with a dynamic number of rows, atomically."""
    require_ort()
    cache_folder(path)
    log.info("exporting the decoder step to ONNX (once; ~5 s): %s", path)
    start = time.perf_counter()
    cfg = decoder.cfg
    d, locations, rows = cfg.feat_proj or cfg.feat_dim, 4, 3
    example = (torch.zeros(rows, dtype=torch.long), torch.zeros(rows, locations, d),
               torch.zeros(rows, locations, cfg.attn_dim), torch.zeros(rows, cfg.hidden_dim),
               torch.zeros(rows, cfg.hidden_dim))
    names = ["words", "a", "keys", "h", "c"]
    n, grid = torch.export.Dim("rows", min=1, max=1 << 20), torch.export.Dim("locations", min=1, max=4096)
    dynamic = {"words": {0: n}, "a": {0: n, 1: grid}, "keys": {0: n, 1: grid}, "h": {0: n}, "c": {0: n}}

    def write(tmp: Path) -> None:
        write_export(_Step(decoder), example, tmp, names, _outputs(decoder), dynamic, "decoder")

    publish(write, path, {"decoder": cfg.to_dict()})
    log.info("exported in %.1f s", time.perf_counter() - start)
    return path


class OnnxDecoder:
    """Stands in for `decoder` in search.py: `cfg` and `prepare` are the torch decoder's; `step` runs the ONNX
    export. Its session runs at one thread whatever torch's count: a step's operations are too small to share
    (at 2 threads a single image's beam-3 search took 4x longer, handing each tiny operation to the pool). It is
    made on first use in each process (one per DataLoader worker), and never pickled."""

    label = "onnx"

    def __init__(self, decoder: Decoder, path: Path):
        self.decoder, self.path = decoder, Path(path)
        self.cfg = decoder.cfg
        self._session: Any = None
        self._pid: int | None = None  # the process the session was made in

    def __getstate__(self) -> dict:
        return {"decoder": self.decoder, "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["decoder"], state["path"])

    def session(self) -> Any:
        if self._session is None or self._pid != os.getpid():
            self._session = make_session(self.path, 1, "decoder")
            self._pid = os.getpid()
        return self._session

    def prepare(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, State]:
        return self.decoder.prepare(feats)

    def step(self, words: torch.Tensor, a: torch.Tensor, keys: torch.Tensor, state: State
             ) -> tuple[torch.Tensor, State, torch.Tensor]:
        h, c = state
        feed = {"words": words, "a": a, "keys": keys, "h": h, "c": c}
        out = self.session().run(None, {k: v.detach().contiguous().numpy() for k, v in feed.items()})
        out = [torch.from_numpy(x) for x in out]
        if self.cfg.cell == "lstm":
            return out[0], (out[1], out[2]), out[3]
        return out[0], (out[1], c), out[2]

    def numpy_step(self, words: np.ndarray, a: np.ndarray, keys: np.ndarray, state: tuple[np.ndarray, np.ndarray]
                   ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], np.ndarray]:
        """`step` on the arrays the search (lite/search.py) holds: no torch tensors in between."""
        h, c = state
        out = self.session().run(None, {"words": words.astype(np.int64, copy=False), "a": a, "keys": keys,
                                        "h": h, "c": c})
        if self.cfg.cell == "lstm":
            return out[0], (out[1], out[2]), out[3]
        return out[0], (out[1], c), out[2]


def onnx_decoder(decoder: Decoder, root: Path | None = None) -> OnnxDecoder:
    """The cached export of `decoder`'s step (on CPU, eval), exported first when it is missing, stale or damaged;
    its session is made here, so that a file onnxruntime cannot load fails before any image is read."""
    if next(decoder.parameters()).device.type != "cpu":
        raise CaptionerError("--backend onnx runs on the CPU (on a GPU use --backend torch)")
    require_ort()
    decoder.eval()
    path = export_path(decoder, root)
    ensure_export(path, lambda: export(decoder, path), "decoder")
    found = OnnxDecoder(decoder, path)
    found.session()
    return found
