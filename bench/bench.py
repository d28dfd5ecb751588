"""Throughput / latency / memory benchmark of the shipped captioner on this machine's CPU (see bench/README.md).

    .venv/bin/python bench/bench.py --images 200 --json bench/results.json   [--quick] [--threads N]

The parent generates the inputs once (JPEG "photos", an H.264 video) and runs every stage in a fresh Python
process (so each stage's peak RSS is its own), then prints a Markdown table."""

from __future__ import annotations

import argparse
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

GOALS = {"caption_b1": 60.0, "caption_b3": 30.0, "speedup": 5.0, "latency_b3_p50_ms": 100.0}  # the issue's, 2 cores


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by all processes on this machine, by this process and its finished children)."""
    ticks = [int(v) for v in open("/proc/stat").readline().split()[1:9]]
    own = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), sum(u.ru_utime + u.ru_stime for u in own)


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


def run_cli(argv: list[str], out: str) -> tuple[float, float, str]:
    """Run `captioner ARGV -o OUT` in this process: (seconds in all, seconds in Captioner.load, OUT's text).
    Captioner.load is wrapped to time it, so that model loading can be excluded; imports happen before."""
    from captioner.cli import main
    from captioner.model import Captioner

    spent, original = [], Captioner.load.__func__

    def load(cls, *a, **kw):
        t = time.perf_counter()
        try:
            return original(cls, *a, **kw)
        finally:
            spent.append(time.perf_counter() - t)
    Captioner.load = classmethod(load)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        rc = main(["-q", *argv, "-o", f"{tmp}/{out}"])
        total = time.perf_counter() - t
        assert rc == 0, f"captioner {argv[0]} exited with {rc}"
        return total, spent[0], Path(f"{tmp}/{out}").read_text()


def repeat(fn, reps: int, warmup: int) -> list[float]:
    """Seconds per call of fn() (perf_counter; gc off while timed), after `warmup` untimed calls."""
    return timeit.repeat(fn, repeat=warmup + reps, number=1)[warmup:]


def stage_encoder(args, data: Path) -> dict:
    import torch
    from captioner.encoder import cpu_has_fast_bf16
    from captioner.images import load_image
    from captioner.model import ENCODE_CHUNK, Captioner

    cap = Captioner.load()  # its encoder is prepared for inference (BN folded, bf16 weights where fast)
    plain = plain_encoder(cap)
    x = cap.preprocess([load_image(p) for p in sorted(data.glob("*.jpg"))[:32]])
    out = {"bf16_autocast": cpu_has_fast_bf16()}
    with torch.no_grad():
        for name, fn in (("fp32", lambda: plain(x)), ("autocast", lambda: plain.encode(x)),
                         ("fast", lambda: torch.cat([cap.encoder.encode(c)[0] for c in x.split(ENCODE_CHUNK)]))):
            out[name] = len(x) / float(np.median(repeat(fn, args.reps_enc, 2)))
    return out


def stage_caption(args, data: Path, beam: int, compiled: bool = False) -> dict:
    flags = ["--compile"] if compiled else []  # the package was built before the stages ran (main)
    total, load, _ = run_cli(["caption", str(data), "--beam", str(beam), "--batch-size", "32", "--no-progress", *flags],
                             "o.csv")
    n = len(list(data.glob("*.jpg")))
    return {"images": n, "load_s": load, "total_s": total, "ips": n / (total - load), "ips_with_load": n / total}


def stage_latency(args, data: Path) -> dict:
    from captioner.images import load_image
    from captioner.model import Captioner

    cap = Captioner.load()
    img, out = load_image(sorted(data.glob("*.jpg"))[0]), {}
    for beam in (1, 3):
        ms = 1000 * np.array(repeat(lambda: cap.caption([img], beam=beam), args.reps_lat, 5))
        out[f"b{beam}_p50"], out[f"b{beam}_p90"] = np.percentile(ms, 50), np.percentile(ms, 90)
    return out


def stage_video(args, video: Path, every: float) -> dict:
    total, load, out = run_cli(["video", str(video), "--every", str(every)], "out.json")
    frames = len(json.loads(out)["videos"][0]["times"])
    return {"frames": frames, "load_s": load, "total_s": total, "fps": frames / (total - load)}


def plain_encoder(cap):
    """The model's encoder as loaded from its package: fp32, BatchNorm unfolded, no preparation."""
    from captioner.encoder import Encoder, EncoderConfig

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
    from captioner.model import Captioner

    cap, paths = Captioner.load(), sorted(data.glob("*.jpg"))
    enc = plain_encoder(cap)
    run = lambda: [baseline_caption(cap, enc, p, beam, cap.search_cfg.max_len) for p in paths]  # noqa: E731
    [baseline_caption(cap, enc, p, beam, cap.search_cfg.max_len) for p in paths[:3]]  # warm-up
    return {"images": len(paths), "ips": len(paths) / repeat(run, 1, 0)[0]}


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
    (an upper bound: side by side, the encoder alone already loses some of it)."""
    import multiprocessing as mp

    import torch
    from captioner.batch import _Files, _split_transform
    from captioner.model import Captioner

    torch.set_num_threads(1)
    cap, paths = Captioner.load(), sorted(data.glob("*.jpg"))[:32]
    files = _Files(paths, len(paths), *_split_transform(cap.transform))  # one batch, loaded as the workers do
    load = lambda: files[0][1]  # noqa: E731
    x, ms = load(), lambda fn: 1000 * float(np.median(repeat(fn, 5, 1))) / len(paths)  # noqa: E731
    cap.warm_up()
    out = {"decode_ms": ms(load)}
    with torch.no_grad():
        out["encode_ms"], feats = ms(lambda: cap.encode(x)), cap.encode(x)
        if args.compiled:
            cap.compile_encoder()
            out["encode_compiled_ms"] = ms(lambda: cap.encode(x))
            cap.compiled = None
        for b in (1, 3):
            cfg = cap.search_config(beam=b)
            out[f"search_b{b}_ms"] = ms(lambda: cap.caption_features(feats, cfg))
    cores, reps = os.cpu_count() or 1, 5
    ctx = mp.get_context("fork")  # forked: the processes share the loaded model, as the caption workers do
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
        if args.compiled:
            out[f"ceiling_compiled_b{b}_ips"] = 1000 * cores / (out["decode_ms"] + out["encode_compiled_ms"]
                                                                + out[f"search_b{b}_ms"])
    return out


STAGES = {  # name -> (function, extra arguments); "large": run on the --large folder
    "encoder": (stage_encoder, ()), "caption_b1": (stage_caption, (1,)), "caption_b3": (stage_caption, (3,)),
    "compiled_b1": (stage_caption, (1, True)), "compiled_b3": (stage_caption, (3, True)),
    "large_b1": (stage_caption, (1,)), "large_b3": (stage_caption, (3,)),
    "large_compiled_b1": (stage_caption, (1, True)), "large_compiled_b3": (stage_caption, (3, True)),
    "latency": (stage_latency, ()), "video_1": (stage_video, (1.0,)), "video_0.5": (stage_video, (0.5,)),
    "baseline_b1": (stage_baseline, (1,)), "baseline_b3": (stage_baseline, (3,)), "ceiling": (stage_ceiling, ())}


def build_compiled(args) -> dict:
    """`--compile`'s one-off step, timed in a fresh process: export + AOTInductor build of the encoder into
    CAPTIONER_CACHE (the bench's own temporary folder, so it is built from scratch on every run)."""
    code = "from captioner.model import Captioner; Captioner.load().compile_encoder()"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"building the compiled encoder failed:\n{proc.stderr[-3000:]}")
    return {"build_s": time.perf_counter() - t}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    res = STAGES[args.stage][0](args, Path(args.input), *STAGES[args.stage][1])
    res["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["workers_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps({k: float(v) if isinstance(v, (np.floating, float)) else v for k, v in res.items()}))


def run_stage(args, stage: str, inp: Path) -> dict:
    cmd = [sys.executable, __file__, "--stage", stage, "--input", str(inp), "--threads", str(args.threads),
           "--reps-enc", str(args.reps_enc), "--reps-lat", str(args.reps_lat)] + ([] if args.compiled else ["--no-compiled"])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"stage {stage} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"  {stage}: done", file=sys.stderr)
    return json.loads(lines[-1][7:])


def table(r: dict, args) -> str:
    met = lambda good: "yes" if good else "NO"  # noqa: E731
    enc, lat = r["encoder"], r["latency"]
    bf16 = "" if enc["bf16_autocast"] else " (no bf16 on this CPU: fp32)"
    rows = [("encoder alone, batch 32, fp32 (as loaded from the package)", f"{enc['fp32']:.1f} img/s", "", "", enc["rss_mib"]),
            (f"encoder alone, batch 32, channels_last + bf16 autocast{bf16}", f"{enc['autocast']:.1f} img/s",
             "", "", enc["rss_mib"]),
            ("encoder alone, 32 images in chunks of 8, as `captioner` runs it (BatchNorm folded, bf16 weights where "
             "fast: `Encoder.prepare_inference`)", f"{enc['fast']:.1f} img/s", "", "", enc["rss_mib"])]
    build = f"; its one-off build took {r['compile']['build_s']:.0f} s (not counted)" if "compile" in r else ""
    variants = [("caption", "", ""), ("compiled", " --compile", build), ("large", "", ""),
                ("large_compiled", " --compile", build)]
    for b in (1, 3):
        base, goal = r[f"baseline_b{b}"], GOALS[f"caption_b{b}"]
        rows.append((f"baseline per-image (tutorial style, fp32), beam {b}; runs: "
                     + " / ".join(f"{v:.1f}" for v in base["runs"]), f"{base['ips']:.1f} img/s", "", "", base["rss_mib"]))
        for name, flag, note in variants:
            c = r.get(f"{name}_b{b}")
            if c is None:
                continue
            extra = (f" (incl.: {c['ips_with_load']:.1f}; whole process with imports: {c['process_ips']:.1f})"
                     if "process_ips" in c else "")
            rows += [(f"`captioner caption{flag}`, {c['images']} JPEGs, beam {b}, batch 32, excl. {c['load_s']:.1f} s "
                      f"model load{extra}{note}; runs: " + " / ".join(f"{v:.1f}" for v in c["runs"]),
                      f"{c['ips']:.1f} img/s", f">= {goal:.0f}", met(c["ips"] >= goal),
                      f"{c['rss_mib']:.0f} + workers {c['workers_rss_mib']:.0f}"),
                     (f"speed-up over the baseline: the row above / baseline beam {b}", f"{c['ips'] / base['ips']:.1f}x",
                      ">= 5x", met(c["ips"] / base["ips"] >= GOALS["speedup"]), "")]
    ce = r["ceiling"]
    rows.append((f"one thread, CPU ms per image: decode + resize + crop / encode / search beam 1 / beam 3; "
                 f"{os.cpu_count()} one-thread encoders side by side, img/s together (vs {os.cpu_count()} x one alone)",
                 f"{ce['decode_ms']:.2f} / {ce['encode_ms']:.2f} / {ce['search_b1_ms']:.2f} / {ce['search_b3_ms']:.2f} ms; "
                 f"{ce['encode_side_by_side_ips']:.0f} img/s (vs {1000 * os.cpu_count() / ce['encode_ms']:.0f})",
                 "", "", ce["rss_mib"]))
    if "encode_compiled_ms" in ce:
        rows.append(("one thread, CPU ms per image: encode with the compiled encoder (`--compile`)",
                     f"{ce['encode_compiled_ms']:.2f} ms", "", "", ce["rss_mib"]))
    for key, how in (("ceiling", ""), ("ceiling_compiled", ", compiled encoder")):
        for b in (1, 3) if f"{key}_b1_ips" in ce else ():
            ratio = ce[f"{key}_b{b}_ips"] / r[f"baseline_b{b}"]["ips"]
            rows.append((f"upper bound for `captioner caption`{how} from the one-thread costs above, beam {b} (perfect "
                         "scaling and overlap, no other overhead), and its ratio to the baseline",
                         f"{ce[f'{key}_b{b}_ips']:.0f} img/s ({ratio:.1f}x)", "", "", ""))
    for b in (1, 3):
        rows.append((f"single image 640x480 `cap.caption([img])`, beam {b}, p50 / p90 ({args.reps_lat} reps)",
                     f"{lat[f'b{b}_p50']:.1f} / {lat[f'b{b}_p90']:.1f} ms", "<= 100 ms" if b == 3 else "",
                     met(lat["b3_p50"] <= GOALS["latency_b3_p50_ms"]) if b == 3 else "", lat["rss_mib"]))
    for every in ("1", "0.5"):
        v = r[f"video_{every}"]
        rows.append((f"`captioner video` {args.seconds} s 640x360 H.264, --every {every} ({v['frames']} frames, "
                     "decode + caption, beam 3, excl. load)", f"{v['fps']:.1f} frames/s", "", "", v["rss_mib"]))
    settings = r.get("settings", {})
    out = [f"CPU: {settings.get('cpu', '?')}; model: {settings.get('model', 'shipped')}", "",
           "| measurement | result | goal | met | peak RSS MiB |", "|---|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} | {e if isinstance(e, str) else f'{e:.0f}'} |" for a, b, c, d, e in rows]
    return "\n".join(out)


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
    p.add_argument("--no-compiled", dest="compiled", action="store_false",
                   help="skip the `--compile` stages (they build the compiled encoder first: ~20 s, needs g++)")
    for flag, kw in (("--stage", {"choices": STAGES}), ("--input", {}), ("--reps-enc", {"type": int, "default": 10}),
                     ("--reps-lat", {"type": int, "default": 30})):  # internal: parent -> stage process
        p.add_argument(flag, help=argparse.SUPPRESS, **kw)
    args = p.parse_args()
    if args.stage:
        return child(args)
    if args.quick:
        args.images, args.reps_enc, args.reps_lat, args.runs, args.large = min(args.images, 48), 3, 10, 1, 0
    args.seconds = 10 if args.quick else 60
    if args.model:
        os.environ["CAPTIONER_MODEL"] = str(args.model.resolve())  # the stage processes inherit it
    (all0, own0), wall0 = cpu_seconds(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="captioner-bench-") as tmp:
        images, large, video = Path(tmp) / "images", Path(tmp) / "large", Path(tmp) / "video.mp4"
        make_images(images, args.images), make_video(video, args.seconds)
        if args.large:
            make_images(large, args.large, seed=1)
        os.environ["CAPTIONER_CACHE"] = f"{tmp}/cache"  # the stage processes inherit it
        results = {"compile": build_compiled(args)} if args.compiled else {}
        print(f"inputs ready; load average {os.getloadavg()[0]:.2f}; running the stages", file=sys.stderr)
        stages = [s for s in STAGES if (args.large or "large" not in s) and (args.compiled or "compiled" not in s)]
        for s in stages:  # caption and baseline stages vary most from run to run: the run with the median img/s of --runs
            reps = args.runs if s.startswith(("caption", "baseline", "compiled", "large")) else 1
            inp = video if s.startswith("video") else large if s.startswith("large") else images
            runs = sorted((run_stage(args, s, inp) for _ in range(reps)), key=lambda r: r.get("ips", 0))
            results[s] = dict(runs[len(runs) // 2], runs=[r.get("ips") for r in runs])
        for b in (1, 3):  # the whole CLI process as a user runs it: start-up, imports and model load included
            cmd = [sys.executable, "-m", "captioner", "-q", "caption", str(images), "-o", f"{tmp}/b{b}.csv",
                   "--beam", str(b), "--no-progress"]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            seconds = repeat(lambda: subprocess.run(cmd, env=env, check=True), 1, 0)[0]
            results[f"caption_b{b}"]["process_ips"] = args.images / seconds
    (all1, own1), wall = cpu_seconds(), time.perf_counter() - wall0
    other = max(0.0, (all1 - all0) - (own1 - own0))  # CPU time other processes took while this ran
    from captioner.cpu import describe

    results["settings"] = dict(vars(args), json=str(args.json), model=str(args.model or "shipped"), cpus=os.cpu_count(),
                               cpu=describe(), wall_s=wall, other_cpu_s=other)
    print(f"other processes used {other:.1f} CPU-s of {wall * os.cpu_count():.0f} during the run"
          + (": NOT a quiet machine, rerun" if other > 0.05 * wall * os.cpu_count() else ""), file=sys.stderr)
    print(table(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
