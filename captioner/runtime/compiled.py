"""An ahead-of-time compiled encoder for CPU batch jobs (`captioner caption --compile`).

torch.export + AOTInductor turn the prepared encoder (BatchNorm folded, bf16 weights: Encoder.prepare_inference)
into a shared library packaged with its frozen weights. Building it takes ~20 s and a C++ compiler, once per
model, torch version and CPU kind; the package is cached on disk (CAPTIONER_CACHE, else ~/.cache/captioner) and
loads in milliseconds, so every later job pays nothing. It encodes at one thread, as each caption worker runs
(its speed: docs/speed.md "Figures behind the code").

The package is compiled for one thread per process: its fused kernels fix their thread count at compile time
(its oneDNN convolutions follow torch's thread setting). Features differ from the eager network's by bf16
rounding (cosine >= 0.999); captions can differ in a word now and then (bench/agreement.py measures how often and
what it does to validation BLEU: README "Speed"), so compiling is opt-in.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import CaptionerError
from ..model.encoder import Encoder
from ..options import cache_root  # noqa: F401 - where every cache of ours lives; used here and re-exported

log = logging.getLogger("captioner")
FORMAT = "captioner-aoti/2"  # bump when what goes into the package changes (2: features and logits out)


def package_key(encoder: Encoder, size: tuple[int, int]) -> str:
    """What the compiled code depends on: the prepared weights, the encoder config, the input size, torch, the
    CPU's vector ISA."""
    h = hashlib.sha256()
    h.update(repr((FORMAT, torch.__version__, torch.backends.cpu.get_cpu_capability(), tuple(size),
                   sorted(encoder.cache_identity().items()))).encode())
    for name, tensor in sorted(encoder.net.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


class _Features(torch.nn.Module):
    """What gets compiled: normalised float images (B, 3, H, W) -> annotation vectors (B, L, D) and ImageNet logits,
    float32 (Encoder.forward_prepared; the logits cost little and dropping them trips inductor's freezing)."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder.forward_prepared(images)


@contextlib.contextmanager
def _quiet_torch():
    """torch's C++ build helpers warn "No CUDA runtime is found" on every CPU-only machine, and its package loader
    logs before raising on a damaged file: not news to a user (failures are raised as one CaptionerError)."""
    loggers = [logging.getLogger(name) for name in ("torch.utils.cpp_extension", "torch._inductor.package")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR + 10)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "g++"
    if not shutil.which(cxx):
        raise CaptionerError(f"--compile needs a C++ compiler ({cxx} not found; install g++, e.g. apt install g++, "
                             "or set CXX), or leave out --compile")
    return cxx


def build(encoder: Encoder, path: Path, size: tuple[int, int]) -> Path:
    """Export and compile `encoder` (prepared, on CPU) at one thread into the package `path`, atomically."""
    _compiler()
    if not encoder.prepared:
        raise CaptionerError("compile the encoder after Encoder.prepare_inference")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".tmp-", suffix=".pt2")  # aoti wants .pt2
        os.close(fd)
    except OSError as exc:  # read-only, full, or a file where the folder should be
        raise CaptionerError(f"cannot write the compiled encoder to {path.parent}: {exc.strerror or exc} "
                             "(set CAPTIONER_CACHE to a writable folder)") from None
    log.info("compiling the encoder for this CPU (once; ~20 s): %s", path)
    start, threads = time.perf_counter(), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        example = torch.zeros(8, 3, *size)
        batch = torch.export.Dim("batch", min=1, max=1024)
        with torch.no_grad(), _quiet_torch():
            program = torch.export.export(_Features(encoder).eval(), (example,), dynamic_shapes={"images": {0: batch}})
            torch._inductor.aoti_compile_and_package(program, package_path=tmp, inductor_configs={"freezing": True})
        os.chmod(tmp, 0o644)  # mkstemp made it private; it holds nothing secret
        os.replace(tmp, path)
    except OSError as exc:
        raise CaptionerError(f"cannot write the compiled encoder to {path.parent}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - export / inductor / compiler failures: one line, no traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CaptionerError(f"compiling the encoder failed ({type(exc).__name__}: {first}); "
                             "run without --compile") from None
    finally:
        torch.set_num_threads(threads)
        Path(tmp).unlink(missing_ok=True)
    log.info("compiled in %.1f s", time.perf_counter() - start)
    return path


class CompiledEncoder:
    """Callable like `Encoder.encode(x)[0]`, from a package file. The compiled model is loaded on first use (~10 ms)
    and never pickled: forked DataLoader workers use the copy their parent loaded, spawned ones load their own."""

    def __init__(self, path: Path, size: tuple[int, int]):
        self.path, self.size = Path(path), tuple(size)
        self._model: Any = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "size": self.size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["size"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, *self.size):  # compiled code does not check shapes
            raise CaptionerError(f"the compiled encoder takes (N, 3, {self.size[0]}, {self.size[1]}) images, "
                                 f"not {tuple(images.shape)}")
        if self._model is None:
            try:
                with _quiet_torch():
                    self._model = torch._inductor.aoti_load_package(str(self.path), run_single_threaded=True)
            except Exception as exc:  # noqa: BLE001 - a damaged or foreign package
                raise CaptionerError(f"cannot load the compiled encoder {self.path} ({type(exc).__name__}); "
                                     "delete it to rebuild, or run without --compile") from None
        with torch.no_grad():
            return self._model(images.contiguous())[0]


def compiled_encoder(encoder: Encoder, size: tuple[int, int], root: Path | None = None) -> CompiledEncoder:
    """The cached package for this encoder and (height, width) of its preprocessed images, built first if it is
    not there yet."""
    if next(encoder.net.parameters(), torch.empty(0)).device.type != "cpu":
        raise CaptionerError("--compile is for the CPU (on a GPU the eager encoder is already fast)")
    path = (root or cache_root()) / "aoti" / f"encoder-{package_key(encoder, size)}.pt2"
    if not path.is_file():
        build(encoder, path, size)
    return CompiledEncoder(path, size)
