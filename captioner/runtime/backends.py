"""Which runtime runs the networks: `--backend auto|torch|onnx|compiled` (+ `--int8`), and `captioner info`.

- torch: the prepared encoder (BatchNorm folded; bf16 weights where the CPU has AMX / AVX512-BF16, or CUDA) and
  the torch decoder.
- onnx: the prepared fp32 encoder in ONNX Runtime (onnx_encoder.py; `--int8` its calibrated int8 model) and the
  decoder's step in ONNX Runtime (onnx_decoder.py).
- compiled: the encoder built by AOTInductor (compiled.py; needs a C++ compiler, opt-in; `--compile` is the same),
  the torch decoder.
- auto (the default): for each network, the faster of torch and onnx on this CPU, by measurement, not by
  assumption. The encoder: batches of MEASURE_BATCH synthetic images; the decoder: steps of MEASURE_BATCH x 3
  rows (beam 3); both at one thread (as every caption worker runs), timed in the thread's own CPU time (which a
  busy or oversubscribed machine does not inflate the way it does wall time), best of MEASURE_ROUNDS with the
  two runtimes interleaved; onnx must win by MARGIN. The answer is kept in the cache (backend/choice-KEY.json,
  KEY = this CPU, the networks' weights, input size, torch and onnxruntime), so it is measured once, not per run.
  Off the CPU, or without onnxruntime, auto is torch; so is each network too small to pay for its export (the
  tests' `pixels` encoder has no network, their decoders are tiny).
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
from typing import Any, Callable

import torch

from ..errors import CaptionerError
from .compiled import cache_root

# What these functions read and wire: the pipeline's Captioner (its encoder, decoder, device, input size and
# model id; use_backend sets its runtimes). Not imported: the runtime sits below the facade that uses it.
Captioner = Any

log = logging.getLogger("captioner")
CHOICE_FORMAT = "captioner-backend/2"
MEASURE_BATCH, MEASURE_ROUNDS, MEASURE_STEPS = 8, 5, 4  # images per batch, rounds, decoder steps per round
MARGIN = 0.05  # onnx must be this much faster than torch to be chosen: closer than that is measurement noise
MIN_DECODER_PARAMS = 1_000_000  # below this the decoder's export (~5 s) costs more than onnx would ever save


@dataclass
class Choice:
    """What `auto` picks per network, why, and what it measured (empty when nothing was measured): the encoder in
    ms per image, the decoder in ms per step of MEASURE_BATCH x 3 rows."""

    backend: str  # the encoder's
    reason: str
    ms_per_image: dict[str, float] = field(default_factory=dict)
    decoder: str = "torch"
    decoder_reason: str = ""
    decoder_ms_per_step: dict[str, float] = field(default_factory=dict)
    record: str = ""  # the JSON file that holds it


def cpu_identity() -> dict[str, Any]:
    from ..cpu import describe

    return {"cpu": describe(), "kernels": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine()}


def _versions() -> dict[str, Any]:
    from .onnx_encoder import onnxruntime_version

    return {"torch": torch.__version__, "onnxruntime": onnxruntime_version()}


def choice_path(cap: Captioner, root: Path | None = None) -> Path:
    """Where auto's measurement for this CPU, these networks (encoder prepared fp32) and versions is kept."""
    from .onnx_decoder import export_key as decoder_key
    from .onnx_encoder import export_key

    key = json.dumps([CHOICE_FORMAT, cpu_identity(), _versions(), export_key(cap.encoder, cap.input_size()),
                      decoder_key(cap.decoder)])
    return (root or cache_root()) / "backend" / f"choice-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def _fixed(cap: Captioner) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """auto's (backend, reason) for the encoder and for the decoder where there is nothing to measure, else None."""
    from .onnx_encoder import onnxruntime_version

    if cap.device.type != "cpu":
        both = ("torch", f"on {cap.device.type} torch is the backend")
        return both, both
    if onnxruntime_version() is None:
        both = ("torch", "onnxruntime is not installed")
        return both, both
    encoder = None
    if not any(True for _ in cap.encoder.net.parameters()):
        encoder = ("torch", f"the {cap.encoder.config.name} encoder has no network to speed up")
    decoder = None
    params = sum(p.numel() for p in cap.decoder.parameters())
    if params < MIN_DECODER_PARAMS:
        decoder = ("torch", f"the decoder ({params:,} parameters) is too small to pay for its export")
    return encoder, decoder


def known_choice(cap: Captioner, root: Path | None = None) -> Choice | None:
    """auto's answer without measuring: fixed, or read from the cache; None when it has not been measured."""
    encoder, decoder = _fixed(cap)
    if encoder is not None and decoder is not None:
        return Choice(encoder[0], encoder[1], decoder=decoder[0], decoder_reason=decoder[1])
    path = choice_path(cap, root)
    try:
        record = json.loads(path.read_text())
        choice = Choice(str(record["backend"]), str(record["reason"]),
                        {str(k): float(v) for k, v in record["ms_per_image"].items()},
                        str(record["decoder"]), str(record["decoder_reason"]),
                        {str(k): float(v) for k, v in record["decoder_ms_per_step"].items()}, str(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    ok = choice.backend in ("torch", "onnx") and choice.decoder in ("torch", "onnx")
    return choice if ok else None


def _best_of(runs: dict[str, Callable[[], Any]], repeat: int = 1) -> dict[str, float]:
    """Seconds of this thread's CPU time per call of each run, best of MEASURE_ROUNDS rounds (each run `repeat`
    times per round, after one warm-up each), the runs interleaved within every round, at one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = {name: float("inf") for name in runs}
        for run in runs.values():
            run()  # oneDNN makes its kernels, onnxruntime its session
        for _ in range(MEASURE_ROUNDS):
            for name, run in runs.items():
                start = time.thread_time()
                for _ in range(repeat):
                    run()
                best[name] = min(best[name], (time.thread_time() - start) / repeat)
    finally:
        torch.set_num_threads(threads)
    return best


def measure(cap: Captioner, onnx: Any) -> dict[str, float]:
    """ms per image of the torch-prepared copy of cap's fp32 encoder and of the onnx encoder `onnx`, on batches of
    MEASURE_BATCH synthetic images (_best_of)."""
    net = copy.deepcopy(cap.encoder).prepare_inference(cap.device)  # bf16 where fast: what torch would run
    x = torch.rand(MEASURE_BATCH, 3, *cap.input_size(), generator=torch.Generator().manual_seed(0)) * 2 - 1
    best = _best_of({"torch": lambda: net.encode(x)[0], "onnx": lambda: onnx(x)})
    return {name: round(seconds / MEASURE_BATCH * 1000, 2) for name, seconds in best.items()}


@torch.no_grad()
def measure_decoder(cap: Captioner, onnx: Any) -> dict[str, float]:
    """ms per step of MEASURE_BATCH x 3 rows (beam 3) for the torch decoder and for the onnx step `onnx`, on
    synthetic annotation vectors of the encoder's grid (_best_of, MEASURE_STEPS steps per round)."""
    cfg, grid = cap.decoder.cfg, cap.encoder.config.grid
    gen = torch.Generator().manual_seed(0)
    feats = torch.rand(MEASURE_BATCH * 3, grid * grid, cfg.feat_dim, generator=gen)
    a, keys, state = cap.decoder.prepare(feats)
    words = torch.randint(4, cfg.vocab_size, (MEASURE_BATCH * 3,), generator=gen)
    runs = {name: (lambda d=d: d.step(words, a, keys, state)) for name, d in (("torch", cap.decoder), ("onnx", onnx))}
    best = _best_of(runs, MEASURE_STEPS)
    return {name: round(seconds * 1000, 3) for name, seconds in best.items()}


def _verdict(ms: dict[str, float]) -> tuple[str, str]:
    if ms["onnx"] < ms["torch"] * (1 - MARGIN):
        return "onnx", "measured: onnx was the faster"
    if ms["onnx"] < ms["torch"]:
        return "torch", f"measured: onnx was faster by less than {MARGIN:.0%}, torch kept"
    return "torch", "measured: torch was the faster"


def choose(cap: Captioner, root: Path | None = None) -> Choice:
    """auto's backends for cap (its encoder prepared fp32): the cached answer, else measured now and cached. A
    network whose export cannot be made (an unwritable cache, a graph the exporter cannot handle) stays torch."""
    from .onnx_decoder import onnx_decoder
    from .onnx_encoder import onnx_encoder

    known = known_choice(cap, root)
    if known is not None:
        return known
    fixed_encoder, fixed_decoder = _fixed(cap)
    log.info("measuring the torch and onnx backends on this CPU (once)")
    verdicts, measured = [], []
    for fixed, export, timer in ((fixed_encoder, lambda: onnx_encoder(cap.encoder, cap.input_size(), root), measure),
                                 (fixed_decoder, lambda: onnx_decoder(cap.decoder, root), measure_decoder)):
        if fixed is not None:
            verdicts.append(fixed)
            measured.append({})
            continue
        try:
            onnx = export()
        except CaptionerError as exc:
            log.warning("the onnx backend is not available (%s): using torch", exc)
            verdicts.append(("torch", f"onnx not available: {exc}"))
            measured.append({})
            continue
        ms = timer(cap, onnx)
        verdicts.append(_verdict(ms))
        measured.append(ms)
    (encoder, reason), (decoder, decoder_reason) = verdicts
    choice = Choice(encoder, reason, measured[0], decoder, decoder_reason, measured[1], str(choice_path(cap, root)))
    _save(choice, Path(choice.record))
    return choice


def _save(choice: Choice, path: Path) -> None:
    """Atomically; an unwritable cache only means measuring again next time."""
    record = {"format": CHOICE_FORMAT, **asdict(choice), **cpu_identity(), **_versions(),
              "batch": MEASURE_BATCH, "decoder_rows": MEASURE_BATCH * 3, "threads": 1, "timer": "thread CPU time",
              "rounds": MEASURE_ROUNDS,
              "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    record.pop("record")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot keep the backend measurement in %s (%s)", path.parent, exc.strerror or exc)


def use_backend(cap: Captioner, backend: str, int8: bool = False, root: Path | None = None) -> str:
    """Prepare cap's networks for `backend` (auto, torch, onnx, compiled) and run them so from here on; int8: the
    calibrated int8 onnx encoder (auto + int8 = the int8 encoder, the decoder as auto chooses). Returns the
    encoder's backend ('onnx-int8' for int8); cap.decoder_backend is the decoder's. cap's encoder must not be
    prepared yet (Captioner.load(..., backend=...) does this)."""
    if backend not in ("auto", "torch", "onnx", "compiled"):
        raise CaptionerError(f"unknown backend {backend!r}: use auto, torch, onnx or compiled")
    if int8 and backend not in ("auto", "onnx"):
        raise CaptionerError("--int8 is for the onnx backend (leave out --backend, or --backend onnx)")
    if cap.encoder.prepared and cap.encoder.weights_dtype != torch.float32:
        raise CaptionerError("choose the backend before the encoder is prepared in bf16 (Captioner.load(backend=))")
    if backend in ("auto", "onnx"):
        cap.encoder.prepare_inference(cap.device, bf16=False)  # BatchNorm folded, fp32: what onnx exports
    decoder = "torch"
    if backend == "auto":
        choice = choose(cap, root)
        backend, decoder = ("onnx" if int8 else choice.backend), choice.decoder
    elif backend == "onnx":
        decoder = "onnx"
    if backend == "onnx":
        from .onnx_encoder import onnx_encoder

        cap.compiled = onnx_encoder(cap.encoder, cap.input_size(), root, int8=int8, model=cap.model_id)
        cap.backend = cap.compiled.label
    else:
        cap.encoder.prepare_inference(cap.device)  # bf16 weights where fast, as Captioner(prepare=True) does
        cap.backend = "torch"
        if backend == "compiled":
            cap.compile_encoder(root)
            cap.backend = "compiled"
    if decoder == "onnx":
        from .onnx_decoder import onnx_decoder

        cap.step_decoder = onnx_decoder(cap.decoder, root)
    else:
        cap.step_decoder = cap.decoder
    cap.decoder_backend = decoder
    cap._warm = False
    log.debug("runtimes: encoder %s, decoder step %s", cap.backend, decoder)
    return cap.backend
