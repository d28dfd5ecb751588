"""The encoder in ONNX Runtime (`--backend onnx`, and what `--backend auto` picks where it is the faster one).

The prepared fp32 encoder (BatchNorm folded: Encoder.prepare_inference(bf16=False)) is exported once with
`torch.onnx.export` into the user cache (CAPTIONER_CACHE, else ~/.cache/captioner: compiled.cache_root) as
onnx/encoder-KEY.onnx, KEY naming what it depends on (the weights, the encoder config, the input size, torch,
onnxruntime). Beside it, encoder-KEY.json records the file's SHA-256: an export whose bytes no longer match (cut
short, overwritten) or whose record is missing is rebuilt, never run. Both are written to a temporary file and
renamed, under a lock, so that two processes never see half a file.

The graph gives the annotation vectors only (B, L, D): what `Captioner.encode` returns (a decoder with attributes
computes its class logits from the pooled features itself). Its features equal the torch network's to ~3e-5;
its speed against torch per CPU: docs/speed.md "Figures behind the code".

`--int8`: `quantize` makes encoder-KEY.int8-MODEL.onnx beside it (one per captioning model) by static quantization (QDQ, int8 weights per channel,
uint8 activations), calibrated on real images (`captioner calibrate FOLDER`); it is opt-in, and refused with one
clear error until it is calibrated. Everything here runs on the CPU execution provider.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from ..errors import CaptionerError
from ..lite.bundle import sha256_file
from ..lite.captioner import import_ort
from ..lite.captioner import make_session as lite_session
from ..model.encoder import Encoder
from .compiled import cache_root

log = logging.getLogger("captioner")
FORMAT = "captioner-onnx/1"  # bump when what goes into the export changes
INSTALL = "pip install onnxruntime onnx onnxscript"


def onnxruntime_version() -> str | None:
    """onnxruntime's version, or None when it is not installed (imports it)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)


def require_ort() -> Any:
    return import_ort(f"--backend onnx needs onnxruntime ({INSTALL}), or use --backend torch")


def export_key(encoder: Encoder, size: tuple[int, int]) -> str:
    """What the export depends on: the prepared fp32 weights, the encoder config, the input size, torch and
    onnxruntime (not the CPU: the file is portable, onnxruntime optimises it when it loads)."""
    h = hashlib.sha256()
    h.update(repr((FORMAT, torch.__version__, onnxruntime_version(), tuple(size),
                   sorted(encoder.cache_identity().items()))).encode())
    for name, tensor in sorted(encoder.net.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def export_path(encoder: Encoder, size: tuple[int, int], root: Path | None = None) -> Path:
    return (root or cache_root()) / "onnx" / f"encoder-{export_key(encoder, size)}.onnx"


def int8_path(fp32: Path, model: str) -> Path:
    """Where the int8 model of the fp32 export `fp32` calibrated for the captioning model `model` (its model_id)
    lives: beside it. One per model: models that share the ImageNet encoder (the shipped one, a UCM one) are
    calibrated on their own images, and one's calibration must not replace the other's."""
    tag = re.sub(r"[^0-9a-zA-Z]", "", model.rsplit("+", 1)[-1])[:16] or "model"
    return fp32.with_name(f"{fp32.stem}.int8-{tag}.onnx")


def _record_path(model: Path) -> Path:
    return model.with_suffix(".json")


def read_record(model: Path) -> dict[str, Any] | None:
    """The JSON record beside `model`, or None when it is missing or unreadable."""
    try:
        record = json.loads(_record_path(model).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def problem(model: Path) -> str | None:
    """Why `model` cannot be used as it is ('missing', 'damaged: ...', 'stale: ...'), or None when its bytes are
    the ones its record names and it was made by this format, torch and onnxruntime."""
    if not model.is_file():
        return "missing"
    record = read_record(model)
    if record is None:
        return "damaged: its record is missing or unreadable"
    if (record.get("format"), record.get("torch"), record.get("onnxruntime")) != \
            (FORMAT, torch.__version__, onnxruntime_version()):
        return "stale: made by another captioner, torch or onnxruntime version"
    try:
        size, digest = model.stat().st_size, sha256_file(model)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if size != record.get("bytes") or digest != record.get("sha256"):
        return "damaged: its bytes do not match its SHA-256"
    return None


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on PATH.lock while the export is checked and built (another process waits, then finds
    it built). Where fcntl is missing (Windows) the atomic renames alone keep files whole."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def cache_folder(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path.parent, prefix=".probe-")  # noqa: SIM115 - closed at once
        probe.close()
    except OSError as exc:  # read-only, full, or a file where the folder should be
        raise CaptionerError(f"cannot write ONNX models to {path.parent}: {exc.strerror or exc} "
                             "(set CAPTIONER_CACHE to a writable folder)") from None


def publish(write: Callable[[Path], None], path: Path, extra: dict[str, Any]) -> None:
    """write(tmp) makes the model in a temporary file beside `path`; it is renamed to `path`, then its record
    (SHA-256, size, versions, `extra`) is written the same way. A failure leaves no partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".tmp-", suffix=".onnx")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o644)  # mkstemp made it private; it holds nothing secret
        record = {"format": FORMAT, "torch": torch.__version__, "onnxruntime": onnxruntime_version(),
                  "bytes": tmp_path.stat().st_size, "sha256": sha256_file(tmp_path), **extra}
        _record_path(path).unlink(missing_ok=True)  # no record = not ready, until the new one is in place
        os.replace(tmp_path, path)
        rec_tmp = _record_path(path).with_name(path.stem + ".json.tmp")
        rec_tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(rec_tmp, _record_path(path))
    except OSError as exc:
        raise CaptionerError(f"cannot write ONNX models to {path.parent}: {exc.strerror or exc}") from None
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporter and the quantizer print their progress, log every graph pass at INFO and warn about what they
    decompose (onnxruntime's quantizer through the root logger): not news to a user (a failure is raised as one
    CaptionerError). Records below ERROR are dropped meanwhile, from every logger."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(before)


class _Features(torch.nn.Module):
    """What gets exported: normalised float images (B, 3, H, W) -> annotation vectors (B, L, D), float32."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_prepared(images)[0]


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def write_export(module: torch.nn.Module, example: tuple, tmp: Path, inputs: list[str], outputs: list[str],
                 dynamic: dict[str, dict[int, Any]], what: str) -> None:
    """torch.onnx.export (dynamo) of `module` (eval, no grad) on `example` into the file `tmp`, quietly; an exporter
    failure is one CaptionerError naming `what` (the encoder, the decoder)."""
    try:  # the exporter prints its progress and warns about what it decomposes: one line if it fails
        with torch.no_grad(), quiet():
            program = torch.onnx.export(module.eval(), example, dynamo=True, input_names=inputs, output_names=outputs,
                                        dynamic_shapes=dynamic, optimize=True)
            program.save(str(tmp), external_data=False)
    except ImportError as exc:
        raise CaptionerError(f"exporting to ONNX needs {exc.name or 'onnx and onnxscript'} ({INSTALL})") from None
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter failures: one line, no traceback
        raise CaptionerError(f"exporting the {what} to ONNX failed ({one_line(exc)}); use --backend torch") from None


def export(encoder: Encoder, path: Path, size: tuple[int, int]) -> Path:
    """Export the prepared fp32 `encoder` (on CPU) to `path` with a dynamic batch size, atomically."""
    if not encoder.prepared or encoder.weights_dtype != torch.float32:
        raise CaptionerError("export the encoder after Encoder.prepare_inference(bf16=False): fp32 weights")
    require_ort()
    cache_folder(path)
    log.info("exporting the encoder to ONNX (once; ~15 s): %s", path)
    start = time.perf_counter()

    def write(tmp: Path) -> None:
        batch = torch.export.Dim("batch", min=1, max=4096)
        write_export(_Features(encoder), (torch.zeros(2, 3, *size),), tmp, ["images"], ["features"],
                     {"images": {0: batch}}, "encoder")

    publish(write, path, {"input": [3, *size], "encoder": encoder.config.name})
    log.info("exported in %.1f s", time.perf_counter() - start)
    return path


def make_session(path: Path, threads: int, what: str) -> Any:
    """An onnxruntime CPU session for the model file `path` at `threads` intra-op threads (1: it runs on the
    calling thread, as each caption worker does): lite's, with this backend's advice in its errors."""
    return lite_session(path, threads, what, remedy="delete it to rebuild, or use --backend torch",
                        missing=f"--backend onnx needs onnxruntime ({INSTALL}), or use --backend torch")


class OnnxEncoder:
    """Callable like `Encoder.encode(x)[0]`: preprocessed images (N, 3, H, W) -> features (N, L, D), float32, from
    an ONNX file. Its InferenceSession runs at torch's thread count of the process that calls it (one per
    DataLoader worker), made on first use there; it is never pickled: a forked or spawned worker makes its own."""

    def __init__(self, path: Path, size: tuple[int, int], label: str = "onnx"):
        self.path, self.size, self.label = Path(path), tuple(size), label
        self._session: Any = None
        self._owner: tuple[int, int] | None = None  # (pid, threads) the session was made for

    def __getstate__(self) -> dict:
        return {"path": self.path, "size": self.size, "label": self.label}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["size"], state.get("label", "onnx"))

    def session(self) -> Any:
        owner = (os.getpid(), torch.get_num_threads())
        if self._session is None or self._owner != owner:
            self._session = make_session(self.path, owner[1], "encoder")
            self._owner = owner
        return self._session

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, *self.size):
            raise CaptionerError(f"the ONNX encoder takes (N, 3, {self.size[0]}, {self.size[1]}) images, "
                                 f"not {tuple(images.shape)}")
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session().run(None, {"images": x})[0])


def ensure_export(path: Path, make: Callable[[], Any], what: str) -> None:
    """Under the lock: `make()` the export at `path` when it is missing, or again (with a warning) when it is damaged
    or stale (`problem`)."""
    cache_folder(path)
    with locked(path):
        why = problem(path)
        if why is not None:
            if why != "missing":
                log.warning("the ONNX %s %s is %s: exporting it again", what, path, why)
            make()


def onnx_encoder(encoder: Encoder, size: tuple[int, int], root: Path | None = None,
                 int8: bool = False, model: str = "") -> OnnxEncoder:
    """The cached export of `encoder` (prepared fp32, on CPU) for (height, width) images, exported first when it
    is missing, stale or damaged; with int8, its int8 model calibrated for the captioning model `model` (its
    model_id; CaptionerError when there is none yet).
    The session is made once here, so that a file onnxruntime cannot load fails before any image is read."""
    if next(encoder.net.parameters(), torch.empty(0)).device.type != "cpu":
        raise CaptionerError("--backend onnx runs on the CPU (on a GPU use --backend torch)")
    require_ort()
    path = export_path(encoder, size, root)
    ensure_export(path, lambda: export(encoder, path, size), "encoder")
    if int8:
        path = check_int8(path, model)
    found = OnnxEncoder(path, size, "onnx-int8" if int8 else "onnx")
    found.session()
    return found


def check_int8(fp32: Path, model: str) -> Path:
    """The int8 model beside the fp32 export `fp32` for the captioning model `model`, or one CaptionerError that
    says how to make it."""
    path = int8_path(fp32, model)
    why = problem(path)
    if why == "missing":
        raise CaptionerError("--int8: no int8 encoder for this model yet; make one from real images with "
                             "`captioner calibrate FOLDER` (e.g. 200 training images; use --model as here)")
    if why is None and (read_record(path) or {}).get("source_sha256") != (read_record(fp32) or {}).get("sha256"):
        why = "stale: calibrated from another fp32 export"
    if why is not None:
        raise CaptionerError(f"--int8: the int8 encoder {path} is {why}; run `captioner calibrate FOLDER` again")
    return path


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over batches of preprocessed images."""

    def __init__(self, batches: Iterable[torch.Tensor]):
        self.batches, self.images = iter(batches), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        self.images += len(batch)
        return {"images": batch.to(torch.float32).contiguous().numpy()}

    def rewind(self) -> None:  # part of the protocol; MinMax calibration reads the data once
        pass


def quantize(fp32: Path, batches: Iterable[torch.Tensor], model: str,
             about: dict[str, Any] | None = None) -> tuple[Path, int]:
    """Static int8 quantization of the fp32 export `fp32` (QDQ; int8 weights per output channel, uint8
    activations with MinMax ranges), calibrated on `batches` of preprocessed images for the captioning model
    `model` (its model_id); written beside it, atomically. Returns the int8 model's path and the number of
    calibration images."""
    require_ort()
    try:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise CaptionerError(f"--int8 needs onnxruntime's quantization tools ({INSTALL}): {exc}") from None
    reader = _Batches(batches)
    path = int8_path(fp32, model)
    start = time.perf_counter()

    def write(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(dir=fp32.parent, prefix=".calibrate-") as work:
            pre = Path(work) / "pre.onnx"
            try:
                with quiet():
                    quant_pre_process(str(fp32), str(pre))  # shape inference + graph clean-up, as ORT advises
                    quantize_static(str(pre), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                    calibrate_method=CalibrationMethod.MinMax,
                                    calibration_providers=["CPUExecutionProvider"],
                                    extra_options={"CalibMaxIntermediateOutputs": 16})
            except CaptionerError:
                raise
            except OSError:
                raise
            except Exception as exc:  # noqa: BLE001 - quantizer failures: one line
                raise CaptionerError(f"int8 quantization failed ({one_line(exc)})") from None
        if reader.images == 0:
            raise CaptionerError("int8 calibration needs at least one readable image")
        extra["calibration_images"] = reader.images  # publish writes the record after this

    extra = {"source_sha256": (read_record(fp32) or {}).get("sha256"), "model": model, **(about or {})}
    with locked(path):
        publish(write, path, extra)
    log.debug("int8 encoder calibrated on %d images in %.1f s: %s", reader.images, time.perf_counter() - start, path)
    return path, reader.images
