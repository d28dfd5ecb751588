"""`LiteCaptioner`: a model bundle (`captioner export-onnx`) run by ONNX Runtime, NumPy and Pillow: no torch.

    from captioner.lite.captioner import LiteCaptioner
    cap = LiteCaptioner.load("bundle/")                 # threads=N: the encoder's intra-op threads
    print(cap.caption(["photo.jpg"])[0].text)           # or PIL images; beam=, max_len=, topk=, ...

The same steps as the torch Captioner (pipeline/captioner.py) and the same Caption back: preprocessing
(preprocess.py, bit-identical), the encoder, `Decoder.prepare` and `Decoder.step` in ONNX Runtime, the search in NumPy
(search.py). Sessions are made in the process that uses them (a forked or spawned worker makes its own, never one
inherited with its thread pool: docs/design.md "Worker processes"); onnxruntime is imported on first use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from ..errors import CaptionerError
from .bundle import Bundle, read_bundle
from .caption import Caption, caption_of
from .images import open_image
from .preprocess import preprocess
from .search import SearchConfig, State, configure, search

ENCODE_CHUNK = 8  # images per encoder run (small chunks keep the activations in cache, as the torch path does)
INSTALL = "pip install onnxruntime"


def import_ort(missing: str = f"the light captioner needs onnxruntime ({INSTALL})") -> Any:
    """onnxruntime, its notes silenced; without it, one CaptionerError: `missing`."""
    try:
        import onnxruntime
    except ImportError:
        raise CaptionerError(missing) from None
    onnxruntime.set_default_logger_severity(3)  # its notes about unused initializers are not the user's business
    return onnxruntime


def make_session(path: Path, threads: int, what: str, remedy: str = "export the bundle again",
                 missing: str | None = None) -> Any:
    """An ONNX Runtime CPU session for `path` at `threads` intra-op threads (0: onnxruntime's default, one per
    physical core; 1: on the calling thread); a file it cannot load is one CaptionerError naming `what` and the
    `remedy`; without onnxruntime, `missing` (import_ort)."""
    ort = import_ort(missing) if missing else import_ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads != 1:  # idle pool threads must not spin while the search runs on the same cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise CaptionerError(f"cannot load the ONNX {what} {path} ({type(exc).__name__}: {first}); {remedy}") from None


class LiteCaptioner:
    """Load once, caption many: `LiteCaptioner.load(folder).caption([PIL images or paths])`."""

    def __init__(self, bundle: Bundle, threads: int | None = None, step_threads: int = 1,
                 loader: Callable[[Any], Image.Image] | None = None):
        self.bundle = bundle
        self.threads = 0 if threads is None else int(threads)  # the encoder's; 0 = onnxruntime's default
        self.step_threads = int(step_threads)  # decoder_init and decoder_step: too small to share (onnx_decoder.py)
        self.loader = loader or open_image  # path -> RGB image (the CLI passes media/images.py's load_image)
        self.search_cfg: SearchConfig = bundle.search
        self.itos = bundle.itos
        self.repeat_mask = bundle.content_mask
        self._sessions: dict[str, Any] = {}
        self._pid: int | None = None

    @classmethod
    def load(cls, folder: Path | str, threads: int | None = None, step_threads: int = 1,
             loader: Callable[[Any], Image.Image] | None = None, verify: bool = True) -> "LiteCaptioner":
        """The bundle in `folder`, checked (`verify`: each file's SHA-256 against model.json) and its three sessions
        made, so that a file ONNX Runtime cannot load fails here, before any image is read."""
        cap = cls(read_bundle(folder, verify), threads, step_threads, loader)
        for role in ("encoder", "decoder_init", "decoder_step"):
            cap.session(role)
        return cap

    def __getstate__(self) -> dict:  # sessions never travel to another process: each makes its own
        return {k: v for k, v in self.__dict__.items() if k not in ("_sessions", "_pid")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._sessions, self._pid = {}, None

    def session(self, role: str) -> Any:
        if self._pid != os.getpid():
            self._sessions, self._pid = {}, os.getpid()
        if role not in self._sessions:
            threads = self.threads if role == "encoder" else self.step_threads
            self._sessions[role] = make_session(self.bundle.path(role), threads, role.replace("_", " "))
        return self._sessions[role]

    @property
    def model_id(self) -> str:
        return self.bundle.model_id

    @property
    def runtimes(self) -> str:
        return "onnx/onnx"

    @property
    def config(self) -> dict[str, Any]:
        """What the app and `info` show of the model (the torch Captioner's checkpoint config has the same keys)."""
        return {"encoder": dict(self.bundle.manifest["encoder"]), "decoder": dict(self.bundle.manifest["decoder"])}

    def warm_up(self, threads: int | None = None) -> None:
        """Run the encoder once on a blank chunk (ONNX Runtime plans its kernels on the first run); `threads`: the
        torch Captioner's argument, unused here (each session has its own count)."""
        self.encode(np.zeros((ENCODE_CHUNK, 3, *self.input_size()), np.float32))

    def use_one_thread(self) -> None:
        """In a caption worker: every session at one thread (the workers share the cores), made anew here."""
        self.threads, self._sessions, self._pid = 1, {}, None

    def search_config(self, **overrides: Any) -> SearchConfig:
        """The model's decoding settings with `overrides` (None = keep), checked as the CLI checks them."""
        return configure(self.search_cfg, **overrides)

    def input_size(self) -> tuple[int, int]:
        return int(self.bundle.input[1]), int(self.bundle.input[2])

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        return preprocess(images, self.bundle.preprocessing)

    def encode(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed images (B, 3, H, W) -> annotation vectors (B, L, D) float32, ENCODE_CHUNK images a run."""
        expected = (3, *self.input_size())
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise CaptionerError(f"the encoder takes (N, {', '.join(map(str, expected))}) images, not {tuple(batch.shape)}")
        session = self.session("encoder")
        chunks = [session.run(None, {"images": np.ascontiguousarray(batch[i:i + ENCODE_CHUNK], dtype=np.float32)})[0]
                  for i in range(0, len(batch), ENCODE_CHUNK)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.bundle.grid ** 2, 0), np.float32)

    def prepare(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray, State, np.ndarray | None]:
        """Features -> annotations, attention keys, (h0, c0), and the ImageNet probabilities (None without them)."""
        out = self.session("decoder_init").run(None, {"features": np.ascontiguousarray(feats, dtype=np.float32)})
        return out[0], out[1], (out[2], out[3]), (out[4] if len(out) > 4 else None)

    def step(self, words: np.ndarray, a: np.ndarray, keys: np.ndarray, state: State
             ) -> tuple[np.ndarray, State, np.ndarray]:
        """One decoder step (search.py's `step`): previous words (N,) -> logits (N, V), new state, attention (N, L)."""
        h, c = state
        out = self.session("decoder_step").run(None, {"words": words.astype(np.int64, copy=False), "a": a,
                                                      "keys": keys, "h": h, "c": c})
        if self.bundle.cell == "lstm":
            return out[0], (out[1], out[2]), out[3]
        return out[0], (out[1], c), out[2]

    def caption_features(self, feats: np.ndarray, cfg: SearchConfig | None = None) -> list[Caption]:
        cfg = cfg or self.search_cfg
        if len(feats) == 0:
            return []
        a, keys, state, _ = self.prepare(feats)
        hyps = search(self.step, a, keys, state, cfg, self.bundle.specials, self.repeat_mask)
        return [caption_of(h, self.itos, self.bundle.grid, self.bundle.specials) for h in hyps]

    def caption_batch(self, batch: np.ndarray, cfg: SearchConfig | None = None) -> list[Caption]:
        """Preprocessed images (B, 3, H, W) -> one Caption each (encode, then search)."""
        return self.caption_features(self.encode(batch), cfg)

    caption_tensors = caption_batch  # the torch Captioner's name for it (pipeline/batch.py calls either)

    def caption(self, images: Sequence[Image.Image | str | os.PathLike], **search_overrides: Any) -> list[Caption]:
        """Captions for PIL images (any mode) or image files (read by `loader`). Options: beam, max_len, min_len,
        topk, length_penalty, no_repeat_ngram, no_repeat_words, suppress_unk (the model's own when left out)."""
        if not images:
            return []
        cfg = self.search_config(**search_overrides)  # a bad option fails before any image is read
        pictures = [im if isinstance(im, Image.Image) else self.loader(im) for im in images]
        return self.caption_batch(self.preprocess(pictures), cfg)

    def imagenet_labels(self, feats: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
        """Annotation vectors (B, L, D) -> each image's top-k ImageNet labels and probabilities (the classifier the
        decoder reads as attributes); an empty list per image for a model without it."""
        probs = self.prepare(feats)[3] if self.bundle.imagenet_categories and k >= 1 else None
        if probs is None:
            return [[] for _ in range(len(feats))]
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.bundle.imagenet_categories[j], round(float(p[j]), 4)) for j in row] for p, row in zip(probs, top)]
