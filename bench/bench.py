"""Throughput / latency / memory benchmark of the shipped captioner on this machine's CPU (see bench/README.md).

    .venv/bin/python bench/bench.py --images 200 --json bench/results.json   [--quick] [--threads N]
        [--backends torch,onnx,onnx-int8,compiled] [--calibrate N [--calibrate-from FOLDER]]

The parent generates the inputs once (JPEG "photos", an H.264 video) and runs every stage in a fresh Python
process (so each stage's peak RSS is its own), then prints two Markdown tables: the encoder backends side by
side (`captioner caption` greedy / beam 3, the one-thread encoder, single-image latency), and every measurement
with its backend. Each table names the CPU."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

BACKENDS = ("torch", "onnx", "onnx-int8", "compiled", "auto")  # what --backends may name (issues 18, 26)
# what each forced backend runs, as Captioner.runtimes names it: ENCODER/DECODER. The default path (no flag) is the
# shipped bundle on ONNX Runtime (onnx/onnx, torch-free); `--backend onnx` is the same; auto (the default before
# issue 26) runs the shipped checkpoint with whatever its measurement picks on this CPU
RUNTIMES = {"torch": "torch/torch", "onnx": "onnx/onnx", "onnx-int8": "onnx-int8/onnx", "compiled": "compiled/torch",
            "auto": "auto"}
GOALS = {"caption_b1": 60.0, "caption_b3": 45.0, "speedup": 5.0, "latency_b3_p50_ms": 50.0,  # issue 18's, 2 cores
         "video_fps": 40.0}


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by all processes on this machine, by this process and its finished children)."""
    ticks = [int(v) for v in open("/proc/stat").readline().split()[1:9]]
    own = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), sum(u.ru_utime + u.ru_stime for u in own)


def adopt_orphans() -> None:
    """Linux: become the reaper of this process tree's orphans. The fork server that a stage's `captioner` process
    starts outlives it; without this its CPU time (its caption workers') was counted as other processes'."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def reap_orphans(wait_s: float = 10.0) -> None:
    """Collect the adopted orphans (after every stage has finished), so that their CPU time counts as ours."""
    deadline = time.time() + wait_s
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # none left
        if pid == 0:
            if time.time() > deadline:
                return
            time.sleep(0.05)


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """640x480 JPEGs: smooth colour noise + a gradient + random shapes + a little grain (varied per image)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        coarse = rng.integers(0, 256, (rng.integers(3, 9), rng.integers(4, 12), 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((640, 480), Image.BICUBIC)
        grad = np.linspace(0, rng.uniform(-80, 80), 640, dtype=np.float32)[None, :, None]
        arr = np.asarray(img, np.float32) + grad + rng.normal(0, 6, (480, 640, 1)).astype(np.float32)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(2, 9)):
            x0, y0 = int(rng.integers(-100, 600)), int(rng.integers(-100, 440))
            box = (x0, y0, x0 + int(rng.integers(30, 300)), y0 + int(rng.integers(30, 300)))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(map(int, rng.integers(0, 256, 3))))
        img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.5)))).save(folder / f"img{i:04d}.jpg", quality=90)


def make_video(path: Path, seconds: int, fps: int = 25, size: tuple[int, int] = (640, 360)) -> None:
    """H.264 (libx264): a colour gradient that changes every 10 s, a moving box and a moving disc."""
    import av

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for t in np.arange(seconds * fps) / fps:
            a, b = np.random.default_rng(int(t // 10)).integers(0, 256, (2, 3))
            mix = (xx / w)[..., None]
            frame = (a * (1 - mix) + b * mix + 20 * np.sin(t + yy / 40)[..., None]).clip(0, 255).astype(np.uint8)
            x, y = int((t * 90) % (w - 80)), int(h / 2 + 100 * np.sin(t))
            frame[max(0, y - 40):y + 40, x:x + 80] = (255 - a).astype(np.uint8)
            frame[((xx - (w - x)) ** 2 + (yy - h / 3) ** 2) < 900] = (20, 200, 60)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())


def run_cli(argv: list[str], out: str) -> tuple[float, float, str, str]:
    """Run `captioner ARGV -o OUT` in this process: (seconds in all, seconds in load_captioner, OUT's text, the
    runtimes that ran). pipeline.load.load_captioner is wrapped to time it, so that model loading (and the
    backend's set-up) can be excluded; imports happen before. The runtimes are the captioner's `runtimes`
    (ENCODER/DECODER, e.g. onnx/onnx)."""
    import captioner.pipeline.load as loading
    from captioner.cli.main import main

    spent, loaded, original = [], [], loading.load_captioner

    def load(*a, **kw):
        t = time.perf_counter()
        try:
            cap = original(*a, **kw)
            loaded.append(cap)
            return cap
        finally:
            spent.append(time.perf_counter() - t)
    loading.load_captioner = load
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        rc = main(["-q", *argv, "-o", f"{tmp}/{out}"])
        total = time.perf_counter() - t
        assert rc == 0, f"captioner {argv[0]} exited with {rc}"
        return total, spent[0], Path(f"{tmp}/{out}").read_text(), str(getattr(loaded[0], "runtimes", "?"))


def backend_flags(backend: str) -> list[str]:
    """The CLI flags that choose `backend` (one of BACKENDS, or auto: the default path)."""
    return ["--backend", "onnx", "--int8"] if backend == "onnx-int8" else ["--backend", backend]


def load_backend(backend: str):
    """The shipped (or CAPTIONER_MODEL) captioner with `backend` (default: the path with no flag, or one of
    BACKENDS), as the CLI loads it."""
    from captioner.pipeline.load import load_captioner

    if backend == "onnx-int8":
        return load_captioner(backend="onnx", int8=True)
    return load_captioner(backend=None if backend == "default" else backend)


def repeat(fn, reps: int, warmup: int) -> list[float]:
    """Seconds per call of fn() (perf_counter; gc off while timed), after `warmup` untimed calls."""
    return timeit.repeat(fn, repeat=warmup + reps, number=1)[warmup:]


def stage_encoder(args, data: Path) -> dict:
    import torch
    from captioner.model.encoder import cpu_has_fast_bf16
    from captioner.media.images import load_image
    from captioner.pipeline.captioner import ENCODE_CHUNK, Captioner

    cap = Captioner.load()  # its encoder is prepared for inference (BN folded, bf16 weights where fast)
    plain = plain_encoder(cap)
    x = cap.preprocess([load_image(p) for p in sorted(data.glob("*.jpg"))[:32]])
    out = {"bf16_autocast": cpu_has_fast_bf16(), "backend": "torch"}
    with torch.no_grad():
        for name, fn in (("fp32", lambda: plain(x)), ("autocast", lambda: plain.encode(x)),
                         ("fast", lambda: torch.cat([cap.encoder.encode(c)[0] for c in x.split(ENCODE_CHUNK)]))):
            out[name] = len(x) / float(np.median(repeat(fn, args.reps_enc, 2)))
    return out


def stage_caption(args, data: Path, beam: int, backend: str = "default") -> dict:
    """`captioner caption` with `backend` (default: no flag, the default path). The compiled package, the onnx
    export, auto's measurement and the int8 model were made before the stages ran (main)."""
    flags = [] if backend == "default" else backend_flags(backend)
    total, load, _, ran = run_cli(["caption", str(data), "--beam", str(beam), "--batch-size", "32", "--no-progress",
                                   *flags], "o.csv")
    n = len(list(data.glob("*.jpg")))
    return {"backend": ran, "images": n, "load_s": load, "total_s": total, "ips": n / (total - load),
            "ips_with_load": n / total}


def stage_latency(args, data: Path, backend: str = "default") -> dict:
    from captioner.media.images import load_image

    cap = load_backend(backend)
    img, out = load_image(sorted(data.glob("*.jpg"))[0]), {"backend": cap.runtimes}
    for beam in (1, 3):
        ms = 1000 * np.array(repeat(lambda: cap.caption([img], beam=beam), args.reps_lat, 5))
        out[f"b{beam}_p50"], out[f"b{beam}_p90"] = np.percentile(ms, 50), np.percentile(ms, 90)
    return out


def stage_video(args, video: Path, every: float) -> dict:
    total, load, out, ran = run_cli(["video", str(video), "--every", str(every)], "out.json")
    frames = len(json.loads(out)["videos"][0]["times"])
    return {"backend": ran, "frames": frames, "load_s": load, "total_s": total, "fps": frames / (total - load)}


def plain_encoder(cap):
    """The model's encoder as loaded from its package: fp32, BatchNorm unfolded, no preparation."""
    from captioner.model.encoder import Encoder, EncoderConfig

    return Encoder(EncoderConfig(**cap.config["encoder"])).eval()


def baseline_caption(cap, encoder, path: Path, k: int, max_len: int) -> str:
    """sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning caption.py, on this model: one image, fp32, k beams."""
    import torch
    import torch.nn.functional as F
    import torchvision.transforms.functional as TF

    img = Image.open(path).convert("RGB")
    img = TF.center_crop(img.resize([round(s * 256 / min(img.size)) for s in img.size], Image.BICUBIC), 224)
    image = TF.normalize(TF.to_tensor(img), [0.5] * 3, [0.5] * 3).unsqueeze(0)
    voc, dec = cap.vocab, cap.decoder
    vocab_size = len(voc.itos)
    with torch.no_grad():
        encoder_out, _ = encoder(image)  # fp32, NCHW, batch of 1
        a, keys, (h, c) = dec.prepare(encoder_out)
        a, keys, h, c = a.expand(k, *a.shape[1:]), keys.expand(k, *keys.shape[1:]), h.expand(k, -1), c.expand(k, -1)
        k_prev_words = torch.LongTensor([[voc.start]] * k)
        seqs, top_k_scores = k_prev_words, torch.zeros(k, 1)
        seqs_alpha = torch.ones(k, 1, a.shape[1])
        complete_seqs, complete_seqs_alpha, complete_seqs_scores = [], [], []
        step = 1
        while True:
            logits, (h, c), alpha = dec.step(k_prev_words.squeeze(1), a, keys, (h, c))
            scores = F.log_softmax(logits, dim=1)
            scores = top_k_scores.expand_as(scores) + scores
            top_k_scores, top_k_words = (scores[0] if step == 1 else scores.view(-1)).topk(k, 0, True, True)
            prev_word_inds = top_k_words // vocab_size
            next_word_inds = top_k_words % vocab_size
            seqs = torch.cat([seqs[prev_word_inds], next_word_inds.unsqueeze(1)], dim=1)
            seqs_alpha = torch.cat([seqs_alpha[prev_word_inds], alpha[prev_word_inds].unsqueeze(1)], dim=1)
            incomplete_inds = [ind for ind, next_word in enumerate(next_word_inds) if next_word != voc.end]
            complete_inds = list(set(range(len(next_word_inds))) - set(incomplete_inds))
            if step > max_len:  # out of steps: whatever is left counts as complete
                complete_inds, incomplete_inds = list(range(len(next_word_inds))), []
            if len(complete_inds) > 0:
                complete_seqs.extend(seqs[complete_inds].tolist())
                complete_seqs_alpha.extend(seqs_alpha[complete_inds].tolist())
                complete_seqs_scores.extend(top_k_scores[complete_inds])
            k -= len(complete_inds)
            if k == 0:
                break
            seqs, seqs_alpha = seqs[incomplete_inds], seqs_alpha[incomplete_inds]
            h, c = h[prev_word_inds[incomplete_inds]], c[prev_word_inds[incomplete_inds]]
            a, keys = a[prev_word_inds[incomplete_inds]], keys[prev_word_inds[incomplete_inds]]
            top_k_scores = top_k_scores[incomplete_inds].unsqueeze(1)
            k_prev_words = next_word_inds[incomplete_inds].unsqueeze(1)
            step += 1
    i = complete_seqs_scores.index(max(complete_seqs_scores))
    return " ".join(voc.itos[w] for w in complete_seqs[i] if w not in (voc.start, voc.end, voc.pad))


def stage_baseline(args, data: Path, beam: int) -> dict:
    from captioner.pipeline.captioner import Captioner

    cap, paths = Captioner.load(), sorted(data.glob("*.jpg"))
    enc = plain_encoder(cap)
    run = lambda: [baseline_caption(cap, enc, p, beam, cap.search_cfg.max_len) for p in paths]  # noqa: E731
    [baseline_caption(cap, enc, p, beam, cap.search_cfg.max_len) for p in paths[:3]]  # warm-up
    return {"backend": "torch (eager fp32, per image)", "images": len(paths), "ips": len(paths) / repeat(run, 1, 0)[0]}


def _encode_loop(cap, x, reps: int, barrier, results) -> None:
    import torch

    torch.set_num_threads(1)
    with torch.no_grad():
        barrier.wait()
        t = time.perf_counter()
        for _ in range(reps):
            cap.encode(x)
        results.put(time.perf_counter() - t)


def stage_ceiling(args, data: Path) -> dict:
    """CPU milliseconds per image of each step of `captioner caption` at one thread, as its workers run them
    (32 images: decode + resize + crop, encode, search), and the encoder's throughput when 2 one-thread
    processes run it side by side (they compete for the cores' shared resources). From the one-thread costs:
    the most `cores` one-thread workers could do with perfect scaling, perfect overlap and no other overhead
    (an upper bound: side by side, the encoder alone already loses some of it). The encode step and the bound
    are also given for each other backend of --backends (the same 32 images, each backend in its own Captioner)."""
    import torch
    from captioner.pipeline.batch import _Files, _split_transform
    from captioner.runtime.workers import context as worker_context
    from captioner.pipeline.captioner import Captioner

    from captioner.pipeline.batch import use_worker_jpeg_decoder

    torch.set_num_threads(1)
    cap, paths = Captioner.load(), sorted(data.glob("*.jpg"))[:32]
    use_worker_jpeg_decoder()
    files = _Files(paths, len(paths), *_split_transform(cap.transform))  # one batch, loaded as the workers do
    load = lambda: files[0][1]  # noqa: E731
    x, ms = load(), lambda fn: 1000 * float(np.median(repeat(fn, 5, 1))) / len(paths)  # noqa: E731
    cap.warm_up()
    out = {"backend": cap.backend, "decode_ms": ms(load), "encode_backend_ms": {}}
    with torch.no_grad():
        out["encode_ms"], feats = ms(lambda: cap.encode(x)), cap.encode(x)
        for name in args.backends:
            if name == "torch":
                out["encode_backend_ms"][name] = out["encode_ms"]
                continue
            other = load_backend(name)  # loaded at one thread: its onnxruntime session runs at one thread
            getattr(other, "use_one_thread", lambda: None)()  # the bundle's sessions, made anew at one thread
            other.warm_up()
            out["encode_backend_ms"][name] = ms(lambda: other.encode(x))  # noqa: B023 - called right here
            del other
        if "compiled" in out["encode_backend_ms"]:  # the key of the earlier results
            out["encode_compiled_ms"] = out["encode_backend_ms"]["compiled"]
        for b in (1, 3):
            cfg = cap.search_config(beam=b)
            out[f"search_b{b}_ms"] = ms(lambda: cap.caption_features(feats, cfg))
        if any(RUNTIMES[name].endswith("/onnx") for name in args.backends):  # the search with the onnx decoder
            from captioner.runtime.onnx_decoder import onnx_decoder

            torch_step, cap.step_decoder = cap.step_decoder, onnx_decoder(cap.decoder)
            for b in (1, 3):
                cfg = cap.search_config(beam=b)
                cap.caption_features(feats, cfg)  # its session is made on first use
                out[f"search_onnx_b{b}_ms"] = ms(lambda: cap.caption_features(feats, cfg))
            cap.step_decoder = torch_step
    cores, reps = os.cpu_count() or 1, 5
    ctx = worker_context()  # started as the caption workers are (from the fork server), the model sent to each
    barrier, results = ctx.Barrier(cores), ctx.Queue()
    procs = [ctx.Process(target=_encode_loop, args=(cap, x, reps, barrier, results)) for _ in range(cores)]
    for proc in procs:
        proc.start()
    spent = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    out["encode_side_by_side_ips"] = cores * reps * len(paths) / max(spent)
    for b in (1, 3):
        out[f"ceiling_b{b}_ips"] = 1000 * cores / (out["decode_ms"] + out["encode_ms"] + out[f"search_b{b}_ms"])
        for name, enc_ms in out["encode_backend_ms"].items():
            if name != "torch":  # ceiling_compiled_b1_ips, ceiling_onnx_b1_ips, ceiling_onnx-int8_b1_ips, ...
                search = out[f"search_onnx_b{b}_ms" if RUNTIMES[name].endswith("/onnx") else f"search_b{b}_ms"]
                out[f"ceiling_{name}_b{b}_ips"] = 1000 * cores / (out["decode_ms"] + enc_ms + search)
    return out


def stage_prepare(args, data: Path) -> dict:
    """The onnx backends' one-off steps, timed, in the bench's own cache (as --compile's build): the ONNX export,
    auto's measurement (so that no caption stage pays for them), and the int8 model: calibrated here on
    --calibrate N images (the generated ones, or --calibrate-from), else copied with its fp32 export from the
    user's cache when a valid calibrated one is there. Reports what auto picks and whether int8 is available."""
    import shutil

    from captioner.cli.backend import calibration_batches, spread
    from captioner.runtime.backends import choose
    from captioner.errors import CaptionerError
    from captioner.media.images import find_images
    from captioner.pipeline.captioner import Captioner
    from captioner.runtime.onnx_encoder import check_int8, export_path, onnx_encoder, problem, quantize, read_record

    cap = Captioner.load(prepare=False)
    cap.encoder.prepare_inference(cap.device, bf16=False)  # what the onnx export and auto's measurement take
    size, out = cap.input_size(), {"int8": False, "int8_source": None}
    user_fp32 = export_path(cap.encoder, size, Path(args.user_cache))
    if not args.calibrate and problem(user_fp32) is None:
        try:
            user_int8 = check_int8(user_fp32, cap.model_id)
        except CaptionerError:
            user_int8 = None
        if user_int8 is not None:
            dest = export_path(cap.encoder, size).parent
            dest.mkdir(parents=True, exist_ok=True)
            for model in (user_fp32, user_int8):
                for f in (model, model.with_suffix(".json")):
                    shutil.copy2(f, dest / f.name)
            out["int8_source"] = f"calibrated before ({(read_record(user_int8) or {}).get('calibration_images', '?')} " \
                                 f"images), copied from {user_int8.parent}"
    t = time.perf_counter()
    onnx = onnx_encoder(cap.encoder, size)
    out["export_s"], out["exported"] = time.perf_counter() - t, out["int8_source"] is None
    t = time.perf_counter()
    choice = choose(cap)
    out.update(auto=f"{choice.backend}/{choice.decoder}", auto_reason=choice.reason, auto_ms=choice.ms_per_image,
               auto_decoder_reason=choice.decoder_reason, auto_decoder_ms=choice.decoder_ms_per_step,
               measure_s=time.perf_counter() - t)
    if args.calibrate:
        source = Path(args.calibrate_from) if args.calibrate_from else data
        paths, _ = find_images([source], recursive=True)
        t = time.perf_counter()
        _, used = quantize(onnx.path, calibration_batches(cap, spread(paths, args.calibrate), 8), cap.model_id,
                           {"calibration_of": "bench/bench.py --calibrate", "calibration_inputs": [str(source)]})
        out.update(calibrate_s=time.perf_counter() - t, int8_source=f"calibrated here on {used} images of "
                   + (str(source) if args.calibrate_from else "the generated JPEGs"))
    try:
        check_int8(onnx.path, cap.model_id)
        out["int8"] = True
    except CaptionerError:
        out["int8_source"] = None
    return out


STAGES = {  # name -> (function, extra arguments); "large": run on the --large folder; caption_*, large_*,
    # latency: the default path (--backend auto); {backend}_b1 / _b3 and latency_{backend}: that backend
    "encoder": (stage_encoder, ()), "caption_b1": (stage_caption, (1,)), "caption_b3": (stage_caption, (3,)),
    **{f"{name}_b{b}": (stage_caption, (b, name)) for name in BACKENDS for b in (1, 3)},  # compiled_b1, onnx_b3, ...
    "large_b1": (stage_caption, (1,)), "large_b3": (stage_caption, (3,)),
    "large_compiled_b1": (stage_caption, (1, "compiled")), "large_compiled_b3": (stage_caption, (3, "compiled")),
    "latency": (stage_latency, ()), **{f"latency_{name}": (stage_latency, (name,)) for name in BACKENDS},
    "video_1": (stage_video, (1.0,)), "video_0.5": (stage_video, (0.5,)),
    "baseline_b1": (stage_baseline, (1,)), "baseline_b3": (stage_baseline, (3,)), "ceiling": (stage_ceiling, ()),
    "prepare": (stage_prepare, ())}
# a backend's stage that measures what the default-path stage already did when auto picked that backend
SAME_AS_DEFAULT = {**{f"{name}_b{b}": (f"caption_b{b}", name) for name in BACKENDS for b in (1, 3)},
                   **{f"latency_{name}": ("latency", name) for name in BACKENDS}}


def stage_order(args) -> list[str]:
    """The stages this run measures, in order (prepare and the compiled build come first, in main)."""
    order = ["encoder"]
    for b in (1, 3):
        order += [f"caption_b{b}"] + [f"{name}_b{b}" for name in args.backends]
    for b in (1, 3) if args.large else ():
        order += [f"large_b{b}"] + ([f"large_compiled_b{b}"] if "compiled" in args.backends else [])
    return order + ["latency"] + [f"latency_{name}" for name in args.backends] + [
        "video_1", "video_0.5", "baseline_b1", "baseline_b3", "ceiling"]


def build_compiled(args) -> dict:
    """`--compile`'s one-off step, timed in a fresh process: export + AOTInductor build of the encoder into
    CAPTIONER_CACHE (the bench's own temporary folder, so it is built from scratch on every run)."""
    code = "from captioner.model.checkpoint import Captioner; Captioner.load().compile_encoder()"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"building the compiled encoder failed:\n{proc.stderr[-3000:]}")
    return {"build_s": time.perf_counter() - t}


def child(args) -> None:
    if STAGES[args.stage][0] is stage_caption:  # as `captioner caption` does: the workers' fork server starts
        from captioner.pipeline.load import is_light  # before torch is imported (imports overlap)
        from captioner.runtime.workers import LIGHT_PRELOAD, start

        flags = STAGES[args.stage][1][1:]
        backend = flags[0] if flags else "default"  # the CLI's choice (cli/caption.py): a --model checkpoint's
        light = is_light(None, {"default": None, "onnx-int8": "onnx"}.get(backend, backend), backend == "onnx-int8")
        start(LIGHT_PRELOAD if light else None)  # workers need torch (their imports would be timed)
    import torch

    torch.set_num_threads(args.threads)
    res = STAGES[args.stage][0](args, Path(args.input), *STAGES[args.stage][1])
    res["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["workers_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps({k: float(v) if isinstance(v, (np.floating, float)) else v for k, v in res.items()}))


def run_stage(args, stage: str, inp: Path) -> dict:
    cmd = [sys.executable, __file__, "--stage", stage, "--input", str(inp), "--threads", str(args.threads),
           "--reps-enc", str(args.reps_enc), "--reps-lat", str(args.reps_lat), "--backends", ",".join(args.backends),
           "--calibrate", str(args.calibrate), "--user-cache", args.user_cache]
    cmd += ["--calibrate-from", str(args.calibrate_from)] if args.calibrate_from else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"stage {stage} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"  {stage}: done", file=sys.stderr)
    return json.loads(lines[-1][7:])


def one_off(r: dict, name: str) -> str:
    """The one-off step `name` needs before it runs (made before the stages, not counted in any img/s)."""
    prep = r.get("prepare", {})
    if name == "compiled" and "compile" in r:
        return f"build {r['compile']['build_s']:.0f} s"
    if name == "onnx":
        return f"export {prep['export_s']:.0f} s" if prep.get("exported") else "export copied from the user's cache"
    if name == "onnx-int8":
        took = f"{prep['calibrate_s']:.0f} s, " if "calibrate_s" in prep else ""
        return f"int8 model: {took}{prep.get('int8_source') or '?'}"
    return ""


def backend_table(r: dict, args) -> str:
    """The backends side by side: caption img/s, speed-up, one-thread encoder, upper bound, latency (beam 3)."""
    met = lambda good: "yes" if good else "NO"  # noqa: E731
    ce, default, prep = r["ceiling"], r["caption_b1"]["backend"], r.get("prepare", {})
    settings = r.get("settings", {})
    rows = []
    for name in args.backends:
        c1, c3, lat = r[f"{name}_b1"], r[f"{name}_b3"], r[f"latency_{name}"]
        x1, x3 = (c["ips"] / r[f"baseline_b{b}"]["ips"] for b, c in ((1, c1), (3, c3)))
        bound = [ce[f"ceiling_b{b}_ips"] if name == "torch" else ce[f"ceiling_{name}_b{b}_ips"] for b in (1, 3)]
        rows.append(f"| {name} ({RUNTIMES[name]}){' (the default path)' if RUNTIMES[name] == default else ''} "
                    f"| {c1['ips']:.1f} ({met(c1['ips'] >= GOALS['caption_b1'])}) "
                    f"| {c3['ips']:.1f} ({met(c3['ips'] >= GOALS['caption_b3'])}) "
                    f"| {x1:.1f}x / {x3:.1f}x ({met(min(x1, x3) >= GOALS['speedup'])}) "
                    f"| {ce['encode_backend_ms'][name]:.2f} | {bound[0]:.0f} / {bound[1]:.0f} "
                    f"| {lat['b3_p50']:.1f} / {lat['b3_p90']:.1f} ({met(lat['b3_p50'] <= GOALS['latency_b3_p50_ms'])}) "
                    f"| {c3['rss_mib']:.0f} + {c3['workers_rss_mib']:.0f} | {one_off(r, name)} |")
    measured = ", ".join(f"{k} {v:.1f}" for k, v in prep.get("auto_ms", {}).items())
    decoder = ", ".join(f"{k} {v:.2f}" for k, v in prep.get("auto_decoder_ms", {}).items())
    return "\n".join([
        f"CPU: {settings.get('cpu', '?')}; model: {settings.get('model', 'shipped')}; {args.threads} threads; "
        f"{r['caption_b1']['images']} JPEGs, batch 32, model load excluded. Backends (encoder/decoder) side by "
        f"side; the default (the shipped bundle) runs {default}; `--backend auto` runs {prep.get('auto', '?')} here "
        f"(encoder: {prep.get('auto_reason', '?')}: "
        f"{measured} ms/img at one thread, batches of 8; decoder: {prep.get('auto_decoder_reason', '?')}: "
        f"{decoder} ms per step of 24 rows)", "",
        f"| backend (encoder/decoder) | `captioner caption` greedy, img/s (>= {GOALS['caption_b1']:.0f}) "
        f"| beam 3, img/s (>= {GOALS['caption_b3']:.0f}) | speed-up over the per-image baseline, greedy / beam 3 "
        f"(>= {GOALS['speedup']:.0f}x) | encoder, one thread, ms/img | upper bound greedy / beam 3, img/s "
        f"| single image, beam 3, p50 / p90 ms (<= {GOALS['latency_b3_p50_ms']:.0f}) "
        "| peak RSS MiB, caption beam 3: main + workers | one-off step (not counted) |",
        "|---|---|---|---|---|---|---|---|---|", *rows])


def table(r: dict, args) -> str:
    met = lambda good: "yes" if good else "NO"  # noqa: E731
    enc, lat = r["encoder"], r["latency"]
    bf16 = "" if enc["bf16_autocast"] else " (no bf16 on this CPU: fp32)"
    default = f"default: {r['caption_b1']['backend']}"
    rows = [("encoder alone, batch 32, fp32 (as loaded from the package)", "torch", f"{enc['fp32']:.1f} img/s", "",
             "", enc["rss_mib"]),
            (f"encoder alone, batch 32, channels_last + bf16 autocast{bf16}", "torch", f"{enc['autocast']:.1f} img/s",
             "", "", enc["rss_mib"]),
            ("encoder alone, 32 images in chunks of 8, as `captioner` runs it (BatchNorm folded, bf16 weights where "
             "fast: `Encoder.prepare_inference`)", "torch", f"{enc['fast']:.1f} img/s", "", "", enc["rss_mib"])]
    build = f"; its one-off build took {r['compile']['build_s']:.0f} s (not counted)" if "compile" in r else ""
    for b in (1, 3):
        base, goal = r[f"baseline_b{b}"], GOALS[f"caption_b{b}"]
        rows.append((f"baseline per-image (tutorial style, fp32), beam {b}; runs: "
                     + " / ".join(f"{v:.1f}" for v in base["runs"]), "torch (eager fp32, per image)",
                     f"{base['ips']:.1f} img/s", "", "", base["rss_mib"]))
        variants = [("caption", "", "", default)]  # the default path, then each other backend
        variants += [(name, " " + " ".join(backend_flags(name)), f"; one-off: {one_off(r, name)} (not counted)"
                      if one_off(r, name) else "", name)
                     for name in args.backends if r[f"{name}_b{b}"] is not r[f"caption_b{b}"]]
        variants += [("large", "", "", default), ("large_compiled", " --compile", build, "compiled")]
        for key, flag, note, backend in variants:
            c = r.get(f"{key}_b{b}")
            if c is None:
                continue
            extra = (f" (incl.: {c['ips_with_load']:.1f}; whole process with imports: {c['process_ips']:.1f})"
                     if "process_ips" in c else "")
            rows += [(f"`captioner caption{flag}`, {c['images']} JPEGs, beam {b}, batch 32, excl. {c['load_s']:.1f} s "
                      f"model load{extra}{note}; runs: " + " / ".join(f"{v:.1f}" for v in c["runs"]), backend,
                      f"{c['ips']:.1f} img/s", f">= {goal:.0f}", met(c["ips"] >= goal),
                      f"{c['rss_mib']:.0f} + workers {c['workers_rss_mib']:.0f}"),
                     (f"speed-up over the baseline: the row above / baseline beam {b}", backend,
                      f"{c['ips'] / base['ips']:.1f}x", ">= 5x", met(c["ips"] / base["ips"] >= GOALS["speedup"]), "")]
    ce = r["ceiling"]
    rows.append((f"one thread, CPU ms per image: decode + resize + crop / encode / search beam 1 / beam 3; "
                 f"{os.cpu_count()} one-thread encoders side by side, img/s together (vs {os.cpu_count()} x one alone)",
                 ce.get("backend", "torch"),
                 f"{ce['decode_ms']:.2f} / {ce['encode_ms']:.2f} / {ce['search_b1_ms']:.2f} / {ce['search_b3_ms']:.2f} ms; "
                 f"{ce['encode_side_by_side_ips']:.0f} img/s (vs {1000 * os.cpu_count() / ce['encode_ms']:.0f})",
                 "", "", ce["rss_mib"]))
    if "search_onnx_b1_ms" in ce:
        rows.append(("one thread, CPU ms per image: search beam 1 / beam 3 (32 images)", "onnx decoder",
                     f"{ce['search_onnx_b1_ms']:.2f} / {ce['search_onnx_b3_ms']:.2f} ms", "", "", ce["rss_mib"]))
    others = [name for name in ce.get("encode_backend_ms", {}) if name != "torch"]
    for name in others:
        rows.append(("one thread, CPU ms per image: encode", name, f"{ce['encode_backend_ms'][name]:.2f} ms", "", "",
                     ce["rss_mib"]))
    for name in ["torch", *others]:
        key = "ceiling" if name == "torch" else f"ceiling_{name}"
        bound = [ce[f"{key}_b{b}_ips"] for b in (1, 3)]
        ratio = [bound[i] / r[f"baseline_b{b}"]["ips"] for i, b in enumerate((1, 3))]
        rows.append(("upper bound for `captioner caption` from the one-thread costs above, beam 1 / beam 3 (perfect "
                     "scaling and overlap, no other overhead), and its ratio to the baseline", name,
                     f"{bound[0]:.0f} / {bound[1]:.0f} img/s ({ratio[0]:.1f}x / {ratio[1]:.1f}x)", "", "", ""))
    for b in (1, 3):
        rows.append((f"single image 640x480 `cap.caption([img])`, beam {b}, p50 / p90 ({args.reps_lat} reps)",
                     f"auto: {lat.get('backend', '?')}", f"{lat[f'b{b}_p50']:.1f} / {lat[f'b{b}_p90']:.1f} ms",
                     f"<= {GOALS['latency_b3_p50_ms']:.0f} ms" if b == 3 else "", met(lat["b3_p50"] <= GOALS["latency_b3_p50_ms"]) if b == 3 else "",
                     lat["rss_mib"]))
    for name in args.backends:
        v = r[f"latency_{name}"]
        if v is not lat:
            rows.append((f"single image 640x480 `cap.caption([img])`, beam 3, p50 / p90 ({args.reps_lat} reps)", name,
                         f"{v['b3_p50']:.1f} / {v['b3_p90']:.1f} ms", f"<= {GOALS['latency_b3_p50_ms']:.0f} ms",
                         met(v["b3_p50"] <= GOALS["latency_b3_p50_ms"]), v["rss_mib"]))
    for every in ("1", "0.5"):
        v = r[f"video_{every}"]
        rows.append((f"`captioner video` {args.seconds} s 640x360 H.264, --every {every} ({v['frames']} frames, "
                     "decode + caption, beam 3, excl. load)", f"auto: {v.get('backend', '?')}",
                     f"{v['fps']:.1f} frames/s", f">= {GOALS['video_fps']:.0f}" if every == "1" else "",
                     met(v["fps"] >= GOALS["video_fps"]) if every == "1" else "", v["rss_mib"]))
    settings = r.get("settings", {})
    out = [f"CPU: {settings.get('cpu', '?')}; model: {settings.get('model', 'shipped')}; {args.threads} threads", "",
           "| measurement | backend | result | goal | met | peak RSS MiB |", "|---|---|---|---|---|---|"]
    out += [f"| {a} | {k} | {b} | {c} | {d} | {e if isinstance(e, str) else f'{e:.0f}'} |" for a, k, b, c, d, e in rows]
    return "\n".join(out)


def backend_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if name not in BACKENDS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown backend {bad[0]!r}: use {', '.join(BACKENDS)}")
    return list(dict.fromkeys(names))


def user_cache() -> str:
    """The user's captioner cache (compiled.cache_root, without importing torch here)."""
    env = os.environ.get("CAPTIONER_CACHE")
    return env or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "captioner")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="smoke run: few images, short video, few repetitions")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: cores)")
    p.add_argument("--runs", type=int, default=3, help="runs of each caption stage (median reported; default 3)")
    p.add_argument("--large", type=int, default=1000, help="also caption a folder of this many images (0: skip)")
    p.add_argument("--model", type=Path, default=None,
                   help="model file to measure (default: the shipped one); every stage gets it as CAPTIONER_MODEL")
    p.add_argument("--backends", type=backend_list, default=None, metavar="LIST",
                   help=f"encoder backends compared side by side, comma-separated, of {','.join(BACKENDS)} (default: "
                        "torch,onnx, plus onnx-int8 when a calibrated int8 model exists in the user's cache or "
                        "--calibrate is given, plus compiled unless --no-compiled)")
    p.add_argument("--no-compiled", dest="compiled", action="store_false",
                   help="leave compiled out of the default --backends (it builds the compiled encoder first: "
                        "~20-45 s, needs g++)")
    p.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="make the int8 model for onnx-int8 from N images first (default: use a calibrated one from "
                        "the user's cache, if any)")
    p.add_argument("--calibrate-from", type=Path, default=None, metavar="FOLDER",
                   help="real images to calibrate on (e.g. a dataset's training images; default: the generated JPEGs)")
    for flag, kw in (("--stage", {"choices": STAGES}), ("--input", {}), ("--reps-enc", {"type": int, "default": 10}),
                     ("--reps-lat", {"type": int, "default": 30}), ("--user-cache", {"default": ""})):
        p.add_argument(flag, help=argparse.SUPPRESS, **kw)  # internal: parent -> stage process
    args = p.parse_args()
    if args.stage:
        args.backends = args.backends or []
        return child(args)
    if args.quick:
        args.images, args.reps_enc, args.reps_lat, args.runs, args.large = min(args.images, 48), 3, 10, 1, 0
    args.seconds = 10 if args.quick else 60
    args.user_cache = user_cache()  # before CAPTIONER_CACHE names the bench's own
    requested = args.backends
    if requested is not None:
        args.compiled = "compiled" in requested
    if args.model:
        os.environ["CAPTIONER_MODEL"] = str(args.model.resolve())  # the stage processes inherit it
    adopt_orphans()
    (all0, own0), wall0 = cpu_seconds(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="captioner-bench-") as tmp:
        images, large, video = Path(tmp) / "images", Path(tmp) / "large", Path(tmp) / "video.mp4"
        make_images(images, args.images), make_video(video, args.seconds)
        if args.large:
            make_images(large, args.large, seed=1)
        os.environ["CAPTIONER_CACHE"] = f"{tmp}/cache"  # the stage processes inherit it
        results = {"compile": build_compiled(args)} if args.compiled else {}
        args.backends = []
        results["prepare"] = run_stage(args, "prepare", images)  # onnx export, auto's measurement, int8
        int8 = results["prepare"]["int8"]
        if requested is None:
            requested = ["torch", "onnx"] + (["onnx-int8"] if int8 else []) + (["compiled"] if args.compiled else [])
        elif "onnx-int8" in requested and not int8:
            sys.exit("onnx-int8: no calibrated int8 model for this model in the user's cache "
                     f"({args.user_cache}): give --calibrate N (or run `captioner calibrate FOLDER` first)")
        args.backends = requested
        print(f"inputs ready; backends {', '.join(args.backends)} (auto: {results['prepare']['auto']}); "
              f"load average {os.getloadavg()[0]:.2f}; running the stages", file=sys.stderr)
        for s in stage_order(args):  # caption and baseline stages vary most from run to run: the run with the median img/s of --runs
            same = SAME_AS_DEFAULT.get(s)
            if same and results.get(same[0], {}).get("backend") == RUNTIMES[same[1]]:
                results[s] = results[same[0]]  # auto ran this backend: the default path's stage is this one
                continue
            reps = args.runs if STAGES[s][0] in (stage_caption, stage_baseline) else 1
            inp = video if s.startswith("video") else large if s.startswith("large") else images
            runs = sorted((run_stage(args, s, inp) for _ in range(reps)), key=lambda r: r.get("ips", 0))
            results[s] = dict(runs[len(runs) // 2], runs=[r.get("ips") for r in runs])
        for b in (1, 3):  # the whole CLI process as a user runs it: start-up, imports and model load included
            cmd = [sys.executable, "-m", "captioner", "-q", "caption", str(images), "-o", f"{tmp}/b{b}.csv",
                   "--beam", str(b), "--no-progress"]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            seconds = repeat(lambda: subprocess.run(cmd, env=env, check=True), 1, 0)[0]
            results[f"caption_b{b}"]["process_ips"] = args.images / seconds
    reap_orphans()
    (all1, own1), wall = cpu_seconds(), time.perf_counter() - wall0
    other = max(0.0, (all1 - all0) - (own1 - own0))  # CPU time other processes took while this ran
    from captioner.cpu import describe

    results["settings"] = dict(vars(args), json=str(args.json), model=str(args.model or "shipped"), cpus=os.cpu_count(),
                               cpu=describe(), wall_s=wall, other_cpu_s=other,
                               calibrate_from=str(args.calibrate_from) if args.calibrate_from else None)
    print(f"other processes used {other:.1f} CPU-s of {wall * os.cpu_count():.0f} during the run"
          + (": NOT a quiet machine, rerun" if other > 0.05 * wall * os.cpu_count() else ""), file=sys.stderr)
    print(backend_table(results, args))
    print()
    print(table(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
