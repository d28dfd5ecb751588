"""The `Captioner` facade: encoder + decoder + vocabulary + the runtime that runs them; images in, captions out.

Load once, caption many: `Captioner.load().caption([PIL images])` (also `from captioner import Captioner`).
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ..errors import CaptionerError
from ..lite.caption import Caption, caption_of  # noqa: F401 - Caption: the public type, re-exported
from ..lite.search import configure
from ..model.checkpoint import (
    build_decoder,
    default_model_path,
    load_checkpoint,
)
from ..model.decoder import Decoder
from ..model.encoder import Encoder, EncoderConfig, image_transform
from ..model.search import Hypothesis, SearchConfig, search
from ..model.vocab import Vocab

ENCODE_CHUNK = 8  # images per encoder forward on CPU


def check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CaptionerError(f"unknown device {device!r} (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CaptionerError(f"device {device!r} requested but CUDA is not available here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CaptionerError(f"device {device!r} requested but MPS is not available here")
    return dev


class Captioner:
    """Load once, caption many: `Captioner.load().caption([PIL images])`."""

    def __init__(self, encoder: Encoder, decoder: Decoder, vocab: Vocab, search_cfg: SearchConfig,
                 device: str | torch.device = "cpu", config: dict | None = None, prepare: bool = True):
        self.device = check_device(device)
        self.encoder = encoder.to(self.device).eval()
        if prepare:  # BatchNorm folded, bf16 weights where fast (Encoder.prepare_inference)
            self.encoder.prepare_inference(self.device)
        self.decoder = decoder.to(self.device).eval()
        self.step_decoder: Any = self.decoder  # what the search steps: the Decoder, or an OnnxDecoder (use_backend)
        self._warm = False
        self.compiled = None  # what encodes instead of self.encoder: a CompiledEncoder or an OnnxEncoder
        self.backend = "torch"  # the encoder backend that runs (backends.use_backend)
        self.decoder_backend = "torch"  # and the decoder's
        self.vocab, self.search_cfg, self.config = vocab, search_cfg, config or {}
        self.tuned_encoder: dict[str, torch.Tensor] = {}  # a fine-tuned encoder's stored weights (load sets them)
        self.repeat_mask = torch.tensor(vocab.content_mask(), device=self.device)  # for no_repeat_words
        self.transform = image_transform(encoder.config.name, encoder.config.resize)

    @classmethod
    def load(cls, path: Path | str | None = None, device: str = "cpu", prepare: bool = True,
             backend: str | None = None, int8: bool = False) -> "Captioner":
        """backend: auto, torch, onnx or compiled (backends.use_backend; int8: the calibrated int8 onnx model);
        None = the torch encoder, prepared unless prepare=False."""
        path = Path(path) if path else default_model_path()
        if path == default_model_path() and not path.is_file():
            if os.environ.get("CAPTIONER_MODEL"):
                raise CaptionerError(f"CAPTIONER_MODEL names a model file that does not exist: {path}")
            raise CaptionerError(f"the default model is missing from the package ({path}); reinstall, or pass --model")
        ckpt = load_checkpoint(path)
        try:
            decoder, vocab = build_decoder(ckpt)
            enc = ckpt["config"]["encoder"]
        except CaptionerError as exc:
            raise CaptionerError(f"{path}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a key missing, a value of the wrong type
            raise CaptionerError(f"{path} is not a valid captioner checkpoint (missing or malformed "
                                 f"{' '.join(str(exc).split())[:200] or 'entry'})") from None
        try:
            encoder = Encoder(EncoderConfig(**enc))
        except TypeError:
            raise CaptionerError(f"{path}: bad encoder config {enc}") from None
        if "encoder" in ckpt:  # fine-tuned encoder stages
            encoder.load_tuned(ckpt["encoder"], str(path))
        if encoder.dim != decoder.cfg.feat_dim:
            raise CaptionerError(f"{path}: encoder {enc['name']} gives {encoder.dim}-d features, decoder expects {decoder.cfg.feat_dim}")
        known = {f.name for f in fields(SearchConfig)}
        scfg = SearchConfig(**{k: v for k, v in ckpt["config"].get("search", {}).items() if k in known})
        cap = cls(encoder, decoder, vocab, scfg, device, ckpt["config"], prepare and backend is None)
        cap.tuned_encoder = dict(ckpt.get("encoder", {}))  # as stored (prepare_inference folds the live copies)
        if backend is not None:
            from ..runtime.backends import use_backend

            use_backend(cap, backend, int8)
        return cap

    @property
    def model_id(self) -> str:
        """A name for these weights that any copy of the model file shares: encoder name + the first 12 hex
        digits of the SHA-256 of the vocabulary, the decoder's weights and a fine-tuned encoder's tuned weights (what
        metadata and libraries record)."""
        if getattr(self, "_model_id", None) is None:
            import hashlib

            h = hashlib.sha256("\n".join(self.vocab.itos).encode())
            tuned = {f"encoder.{k}": v for k, v in self.tuned_encoder.items()}
            for name, t in sorted([*self.decoder.state_dict().items(), *tuned.items()]):
                h.update(name.encode())
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._model_id = f"{self.encoder.config.name}+{h.hexdigest()[:12]}"
        return self._model_id

    @property
    def runtimes(self) -> str:
        """ENCODER/DECODER: the backend that runs each network, e.g. 'torch/onnx' (the bench tables)."""
        return f"{self.backend}/{self.decoder_backend}"

    def search_config(self, **overrides: Any) -> SearchConfig:
        """The model's decoding settings with `overrides` (None = keep); each checked against the CLI's range for
        it: a bad value (beam=0) is a CaptionerError, never a silent greedy search."""
        return configure(self.search_cfg, **overrides)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(im) for im in images])

    @torch.no_grad()
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) -> annotation vectors (B, L, D), float32. On CPU the encoder runs
        on chunks of ENCODE_CHUNK images: small chunks keep the activations in cache (faster per image than big
        batches: docs/speed.md "Figures behind the code")."""
        batch = batch.to(self.device)
        chunks = batch.split(ENCODE_CHUNK) if self.device.type == "cpu" else (batch,)
        if self.compiled is not None:
            return torch.cat([self.compiled(chunk) for chunk in chunks])
        return torch.cat([self.encoder.encode(chunk)[0] for chunk in chunks])

    def input_size(self) -> tuple[int, int]:
        """(height, width) of the preprocessed images the encoder takes."""
        size = self.preprocess([Image.new("RGB", (320, 320))]).shape[-2:]
        return int(size[0]), int(size[1])

    def compile_encoder(self, root: Path | None = None) -> None:
        """Encode with the AOT-compiled encoder from here on (compiled.py: built once, ~20 s, then cached)."""
        from ..runtime.compiled import compiled_encoder

        self.compiled = compiled_encoder(self.encoder, self.input_size(), root)
        self.backend = "compiled"
        self._warm = False

    @torch.no_grad()
    def warm_up(self, threads: int | None = None) -> None:
        """Run the encoder once on a blank chunk: oneDNN compiles its kernels on first use (~0.1-0.3 s), and a
        compiled encoder loads. `threads`: the torch thread count the encoder will run at (oneDNN's kernels are
        made for one), e.g. 1 before forking one-thread workers."""
        if not self._warm:
            before = torch.get_num_threads()
            torch.set_num_threads(threads or before)
            try:
                self.encode(self.preprocess([Image.new("RGB", (320, 320))] * ENCODE_CHUNK))
            finally:
                torch.set_num_threads(before)
            self._warm = True

    @torch.no_grad()
    def caption_tensors(self, batch: torch.Tensor, cfg: SearchConfig | None = None) -> list[Caption]:
        """batch: preprocessed images (B, 3, H, W) -> one Caption each (encode, then search)."""
        return self.caption_features(self.encode(batch), cfg or self.search_cfg)

    @torch.no_grad()
    def caption_features(self, feats: torch.Tensor, cfg: SearchConfig | None = None) -> list[Caption]:
        cfg = cfg or self.search_cfg
        v = self.vocab
        hyps = search(self.step_decoder, feats.to(self.device).float(), cfg, (v.pad, v.start, v.end, v.unk), self.repeat_mask)
        return [self._caption(h) for h in hyps]

    @torch.no_grad()
    def imagenet_labels(self, feats: torch.Tensor, k: int = 3) -> list[list[tuple[str, float]]]:
        """Annotation vectors (B, L, D) -> each image's top-k ImageNet labels and probabilities: the classifier the
        decoder reads as attributes (a frozen copy of the encoder's own head) on the mean annotation vector.
        Class names come with torchvision (no download). An empty list per image for a model without it."""
        head = getattr(self.decoder, "classifier", None)
        if head is None or head.out_features != 1000 or k < 1:
            return [[] for _ in range(feats.shape[0])]
        if getattr(self, "_categories", None) is None:
            from ..model.encoder import imagenet_categories

            self._categories = imagenet_categories()
        probs, idx = torch.softmax(head(feats.to(self.device).float().mean(1)), 1).topk(k, 1)
        return [[(self._categories[j], round(p, 4)) for p, j in zip(ps, js)] for ps, js in zip(probs.tolist(), idx.tolist())]

    def caption(self, images: Sequence[Image.Image | str | os.PathLike], **search_overrides: Any) -> list[Caption]:
        """Captions for PIL images or image files (opened as the CLI opens them: EXIF orientation, any mode, the
        size limit; a bad file is one CaptionerError naming it). Options: beam, max_len, topk, length_penalty,
        no_repeat_ngram, no_repeat_words (the model's own when left out)."""
        if not images:
            return []
        if any(not isinstance(im, Image.Image) for im in images):
            from ..media.images import load_image

            images = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        return self.caption_tensors(self.preprocess(images), self.search_config(**search_overrides))

    def _caption(self, hyps: list[Hypothesis]) -> Caption:
        v = self.vocab
        return caption_of(hyps, v.itos, self.encoder.config.grid, (v.pad, v.start, v.end, v.unk))
