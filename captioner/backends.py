"""Which encoder runs the images: `--backend auto|torch|onnx|compiled` (+ `--int8`), and `captioner info`.

- torch: the prepared network (BatchNorm folded; bf16 weights where the CPU has AMX / AVX512-BF16, or CUDA).
- onnx: the prepared fp32 network in ONNX Runtime (onnx_encoder.py); `--int8` its calibrated int8 model.
- compiled: AOTInductor (compiled.py; needs a C++ compiler, opt-in; `--compile` is the same).
- auto (the default): the faster of torch and onnx on this CPU, by measurement, not by assumption: batches of
  MEASURE_BATCH synthetic images through each at one thread (as every caption worker runs), best of
  MEASURE_ROUNDS. The result is kept in the cache (backend/choice-KEY.json, KEY = this CPU, the encoder's
  weights, input size, torch and onnxruntime), so it is measured once, not per run. Off the CPU, for a model
  without an encoder network (the tests' `pixels`), or without onnxruntime, auto is torch.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .compiled import cache_root
from .errors import CaptionerError

if TYPE_CHECKING:
    from .model import Captioner

log = logging.getLogger("captioner")
CHOICE_FORMAT = "captioner-backend/1"
MEASURE_BATCH, MEASURE_ROUNDS = 8, 3
MARGIN = 0.05  # onnx must be this much faster than torch to be chosen: closer than that is measurement noise


@dataclass
class Choice:
    """What `auto` picks, why, and the ms per image it measured per backend (empty when nothing was measured)."""

    backend: str
    reason: str
    ms_per_image: dict[str, float] = field(default_factory=dict)
    record: str = ""  # the JSON file that holds it


def cpu_identity() -> dict[str, Any]:
    from .cpu import describe

    return {"cpu": describe(), "kernels": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine()}


def _versions() -> dict[str, Any]:
    from .onnx_encoder import onnxruntime_version

    return {"torch": torch.__version__, "onnxruntime": onnxruntime_version()}


def choice_path(cap: "Captioner", root: Path | None = None) -> Path:
    """Where auto's measurement for this CPU, this encoder (prepared fp32) and these versions is kept."""
    from .onnx_encoder import export_key

    key = json.dumps([CHOICE_FORMAT, cpu_identity(), _versions(), export_key(cap.encoder, cap.input_size())])
    return (root or cache_root()) / "backend" / f"choice-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def _fixed_choice(cap: "Captioner") -> Choice | None:
    """auto's answer where there is nothing to measure, else None."""
    from .onnx_encoder import onnxruntime_version

    if cap.device.type != "cpu":
        return Choice("torch", f"on {cap.device.type} torch is the backend")
    if not any(True for _ in cap.encoder.net.parameters()):
        return Choice("torch", f"the {cap.encoder.config.name} encoder has no network to speed up")
    if onnxruntime_version() is None:
        return Choice("torch", "onnxruntime is not installed")
    return None


def known_choice(cap: "Captioner", root: Path | None = None) -> Choice | None:
    """auto's answer without measuring: fixed, or read from the cache; None when it has not been measured."""
    fixed = _fixed_choice(cap)
    if fixed is not None:
        return fixed
    path = choice_path(cap, root)
    try:
        record = json.loads(path.read_text())
        choice = Choice(str(record["backend"]), str(record["reason"]),
                        {str(k): float(v) for k, v in record["ms_per_image"].items()}, str(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return choice if choice.backend in ("torch", "onnx") else None


def measure(cap: "Captioner", onnx: Any) -> dict[str, float]:
    """ms per image of the torch-prepared copy of cap's fp32 encoder and of `onnx`, at one thread on batches of
    MEASURE_BATCH synthetic images, best of MEASURE_ROUNDS (after one warm-up each), rounds interleaved."""
    net = copy.deepcopy(cap.encoder).prepare_inference(cap.device)  # bf16 where fast: what torch would run
    x = torch.rand(MEASURE_BATCH, 3, *cap.input_size(), generator=torch.Generator().manual_seed(0)) * 2 - 1
    runs = {"torch": lambda: net.encode(x)[0], "onnx": lambda: onnx(x)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = {name: float("inf") for name in runs}
        for run in runs.values():
            run()  # oneDNN makes its kernels, onnxruntime its session
        for _ in range(MEASURE_ROUNDS):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {name: round(seconds / MEASURE_BATCH * 1000, 2) for name, seconds in best.items()}


def choose(cap: "Captioner", root: Path | None = None) -> Choice:
    """auto's backend for cap (its encoder prepared fp32): the cached answer, else measured now and cached. Where
    the export cannot be made (an unwritable cache, an encoder the exporter cannot handle) it is torch."""
    from .onnx_encoder import onnx_encoder

    known = known_choice(cap, root)
    if known is not None:
        return known
    log.info("measuring the encoder backends on this CPU (once)")
    try:
        onnx = onnx_encoder(cap.encoder, cap.input_size(), root)
    except CaptionerError as exc:
        log.warning("the onnx backend is not available (%s): using torch", exc)
        return Choice("torch", f"onnx not available: {exc}")
    ms = measure(cap, onnx)
    faster = ms["onnx"] < ms["torch"] * (1 - MARGIN)
    if faster:
        reason = "measured: onnx was the faster"
    elif ms["onnx"] < ms["torch"]:
        reason = f"measured: onnx was faster by less than {MARGIN:.0%}, torch kept"
    else:
        reason = "measured: torch was the faster"
    choice = Choice("onnx" if faster else "torch", reason, ms, str(choice_path(cap, root)))
    _save(choice, Path(choice.record))
    return choice


def _save(choice: Choice, path: Path) -> None:
    """Atomically; an unwritable cache only means measuring again next time."""
    record = {"format": CHOICE_FORMAT, **asdict(choice), **cpu_identity(), **_versions(),
              "batch": MEASURE_BATCH, "threads": 1,
              "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    record.pop("record")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot keep the backend measurement in %s (%s)", path.parent, exc.strerror or exc)


def use_backend(cap: "Captioner", backend: str, int8: bool = False, root: Path | None = None) -> str:
    """Prepare cap's encoder for `backend` (auto, torch, onnx, compiled) and encode with it from here on; int8:
    the calibrated int8 onnx model (auto + int8 = onnx). Returns the backend that runs ('onnx-int8' for int8).
    cap's encoder must not be prepared yet (Captioner.load(..., backend=...) does this)."""
    if backend not in ("auto", "torch", "onnx", "compiled"):
        raise CaptionerError(f"unknown backend {backend!r}: use auto, torch, onnx or compiled")
    if int8 and backend not in ("auto", "onnx"):
        raise CaptionerError("--int8 is for the onnx backend (leave out --backend, or --backend onnx)")
    if cap.encoder.prepared and cap.encoder.weights_dtype != torch.float32:
        raise CaptionerError("choose the backend before the encoder is prepared in bf16 (Captioner.load(backend=))")
    if backend in ("auto", "onnx"):
        cap.encoder.prepare_inference(cap.device, bf16=False)  # BatchNorm folded, fp32: what onnx exports
    if backend == "auto":
        backend = "onnx" if int8 else choose(cap, root).backend
    if backend == "onnx":
        from .onnx_encoder import onnx_encoder

        cap.compiled = onnx_encoder(cap.encoder, cap.input_size(), root, int8=int8)
        cap.backend = cap.compiled.label
    else:
        cap.encoder.prepare_inference(cap.device)  # bf16 weights where fast, as Captioner(prepare=True) does
        cap.backend = "torch"
        if backend == "compiled":
            cap.compile_encoder(root)
            cap.backend = "compiled"
    cap._warm = False
    return cap.backend


def info(model: Path | None, measure_now: bool = False, root: Path | None = None) -> list[str]:
    """`captioner info`: the lines it prints. Nothing here needs the network; a model that cannot be loaded is
    reported on its line, the others are printed all the same."""
    from . import __version__
    from .cpu import describe, has_fast_bf16, vector_isa
    from .model import Captioner, default_model_path
    from .onnx_encoder import check_int8, export_path, onnxruntime_version, read_record

    ort = onnxruntime_version()
    lines = [f"captioner {__version__}",
             f"cpu: {describe()}",
             f"vector ISA: {' '.join(vector_isa()) or 'none of AVX2, AVX-512, AVX512-BF16, AMX'} "
             f"(torch kernels: {torch.backends.cpu.get_cpu_capability()})",
             f"fast bf16: {'yes' if has_fast_bf16() else 'no'} (torch encodes in "
             f"{'bf16' if has_fast_bf16() else 'fp32'} on this CPU)",
             f"versions: torch {torch.__version__}, onnxruntime {ort or 'not installed'}, "
             f"python {platform.python_version()}",
             f"cache: {root or cache_root()}"]
    path = Path(model) if model else default_model_path()
    try:
        cap = Captioner.load(path, prepare=False)
        cap.encoder.prepare_inference(cap.device, bf16=False)
    except CaptionerError as exc:
        return lines + [f"model: {path} (cannot be loaded: {exc})", "backend (auto): unknown without a model"]
    lines.append(f"model: {path} ({cap.model_id})")
    choice = choose(cap, root) if measure_now else known_choice(cap, root)
    if choice is None:
        lines.append("backend (auto): not measured yet on this CPU for this model; the first `captioner caption` "
                     "or `video` measures it (once), or run `captioner info --measure`")
    else:
        ms = ", ".join(f"{name} {value:.1f} ms/img" for name, value in choice.ms_per_image.items())
        lines.append(f"backend (auto): {choice.backend} ({choice.reason}"
                     + (f"; one thread, batches of {MEASURE_BATCH}: {ms}" if ms else "") + ")"
                     + (f" [{choice.record}]" if choice.record else ""))
    if ort is not None and cap.device.type == "cpu" and any(True for _ in cap.encoder.net.parameters()):
        fp32 = export_path(cap.encoder, cap.input_size(), root)
        try:
            int8 = check_int8(fp32)
            lines.append(f"int8 (--int8): calibrated on {(read_record(int8) or {}).get('calibration_images', '?')} "
                         f"images [{int8}]")
        except CaptionerError:
            lines.append("int8 (--int8): not calibrated (captioner calibrate FOLDER)")
    return lines
