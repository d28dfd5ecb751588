"""Throughput / latency / memory benchmark of the shipped captioner on this machine (CPU).

    .venv/bin/python bench/bench.py --images 200 --json bench/results.json   [--quick] [--threads 2]

Every stage runs in its own fresh Python process (so its peak RSS is its own); the parent generates the
synthetic inputs once (JPEG "photos", an H.264 video), runs the stages and prints a Markdown table.
Stages: encoder alone, `captioner caption` (the real CLI, in-process, DataLoader workers = default),
single-image latency (`cap.caption([img])`), `captioner video`, and a per-image tutorial-style baseline
(sgrvinod caption.py: fp32 encoder one image at a time + Python-bookkeeping beam search)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

GOALS = {"caption_b1": 60.0, "caption_b3": 30.0, "speedup_b1": 5.0, "speedup_b3": 5.0, "latency_b3_p50": 100.0}


# ----------------------------------------------------------------------------- inputs -----
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
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.5)))).save(folder / f"img{i:04d}.jpg", quality=90)


def make_video(path: Path, seconds: int, fps: int = 25, size: tuple[int, int] = (640, 360)) -> None:
    """H.264 (libx264): a colour gradient that changes every 10 s, a moving box and a moving disc."""
    import av

    w, h = size
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for n in range(seconds * fps):
            t = n / fps
            a, b = rng.__class__(np.random.PCG64(int(t // 10))).integers(0, 256, (2, 3))
            mix = (xx / w)[..., None]
            frame = (a * (1 - mix) + b * mix + 20 * np.sin(t + yy / 40)[..., None]).clip(0, 255).astype(np.uint8)
            x, y = int((t * 90) % (w - 80)), int(h / 2 + 100 * np.sin(t))
            frame[max(0, y - 40):y + 40, x:x + 80] = (255 - a).astype(np.uint8)
            frame[((xx - (w - x)) ** 2 + (yy - h / 3) ** 2) < 900] = (20, 200, 60)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


# ----------------------------------------------------------------------------- stages -----
def timed_load():
    """Wrap Captioner.load to record how long model loading takes inside the CLI (so it can be excluded)."""
    from captioner.model import Captioner

    spent, original = [], Captioner.load.__func__

    def load(cls, *a, **kw):
        t = time.perf_counter()
        try:
            return original(cls, *a, **kw)
        finally:
            spent.append(time.perf_counter() - t)
    Captioner.load = classmethod(load)
    return spent


def stage_encoder(args, data: Path) -> dict:
    import torch
    from captioner.encoder import cpu_has_fast_bf16
    from captioner.images import load_image
    from captioner.model import Captioner

    cap = Captioner.load()
    x = cap.preprocess([load_image(p) for p in sorted(data.glob("*.jpg"))[:32]])
    out = {"bf16_autocast": cpu_has_fast_bf16()}
    for name, fn in (("fp32", lambda: cap.encoder(x)), ("fast", lambda: cap.encoder.encode(x))):
        with torch.no_grad():
            for _ in range(2):
                fn()
            times = []
            for _ in range(args.reps_enc):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        out[name] = 32 / float(np.median(times))
    return out


def stage_caption(args, data: Path, beam: int) -> dict:
    from captioner.cli import main

    spent = timed_load()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        rc = main(["-q", "caption", str(data), "-o", f"{tmp}/out.csv", "--beam", str(beam), "--batch-size", "32",
                   "--no-progress"])
        total = time.perf_counter() - t
    assert rc == 0, f"captioner caption exited with {rc}"
    n = len(list(data.glob("*.jpg")))
    return {"images": n, "load_s": spent[0], "total_s": total, "ips": n / (total - spent[0]), "ips_with_load": n / total}


def stage_latency(args, data: Path) -> dict:
    from captioner.images import load_image
    from captioner.model import Captioner

    cap = Captioner.load()
    img = load_image(sorted(data.glob("*.jpg"))[0])
    out = {}
    for beam in (1, 3):
        for _ in range(5):
            cap.caption([img], beam=beam)
        times = []
        for _ in range(args.reps_lat):
            t = time.perf_counter()
            cap.caption([img], beam=beam)
            times.append(1000 * (time.perf_counter() - t))
        out[f"b{beam}_p50"], out[f"b{beam}_p90"] = np.percentile(times, 50), np.percentile(times, 90)
    return out


def stage_video(args, video: Path, every: float) -> dict:
    from captioner.cli import main

    spent = timed_load()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        rc = main(["-q", "video", str(video), "--every", str(every), "-o", f"{tmp}/out.json"])
        total = time.perf_counter() - t
        frames = len(json.loads(Path(f"{tmp}/out.json").read_text())["videos"][0]["times"])
    assert rc == 0, f"captioner video exited with {rc}"
    return {"frames": frames, "load_s": spent[0], "total_s": total, "fps": frames / (total - spent[0])}


def baseline_caption(cap, path: Path, k: int, max_len: int) -> str:
    """sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning caption.py, on this model: one image, fp32, k beams."""
    import torch
    import torch.nn.functional as F
    import torchvision.transforms.functional as TF

    img = Image.open(path).convert("RGB")
    w, h = img.size
    img = img.resize((round(w * 256 / min(w, h)), round(h * 256 / min(w, h))), Image.BICUBIC)
    img = TF.center_crop(img, 224)
    image = TF.normalize(TF.to_tensor(img), [0.5] * 3, [0.5] * 3).unsqueeze(0)
    voc, dec = cap.vocab, cap.decoder
    vocab_size = len(voc.itos)
    with torch.no_grad():
        encoder_out, _ = cap.encoder(image)  # fp32, NCHW, batch of 1
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
            if step == 1:
                top_k_scores, top_k_words = scores[0].topk(k, 0, True, True)
            else:
                top_k_scores, top_k_words = scores.view(-1).topk(k, 0, True, True)
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

    cap = Captioner.load()
    paths = sorted(data.glob("*.jpg"))
    for p in paths[:3]:
        baseline_caption(cap, p, beam, cap.search_cfg.max_len)
    t = time.perf_counter()
    for p in paths:
        baseline_caption(cap, p, beam, cap.search_cfg.max_len)
    return {"images": len(paths), "ips": len(paths) / (time.perf_counter() - t)}


STAGES = {  # name -> (function, extra arguments)
    "encoder": (stage_encoder, ()), "caption_b1": (stage_caption, (1,)), "caption_b3": (stage_caption, (3,)),
    "latency": (stage_latency, ()), "video_1": (stage_video, (1.0,)), "video_0.5": (stage_video, (0.5,)),
    "baseline_b1": (stage_baseline, (1,)), "baseline_b3": (stage_baseline, (3,)),
}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    fn, extra = STAGES[args.stage]
    res = fn(args, Path(args.input), *extra)
    res["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["workers_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps({k: float(v) if isinstance(v, (np.floating, float)) else v for k, v in res.items()}))


def run_stage(args, stage: str, inp: Path) -> dict:
    cmd = [sys.executable, __file__, "--stage", stage, "--input", str(inp), "--threads", str(args.threads),
           "--reps-enc", str(args.reps_enc), "--reps-lat", str(args.reps_lat)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"stage {stage} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"  {stage}: done", file=sys.stderr)
    return json.loads(lines[-1][7:])


def table(r: dict, args) -> str:
    ok = lambda v, key, lower=False: "" if key not in GOALS else ("yes" if (v <= GOALS[key] if lower else v >= GOALS[key]) else "NO")  # noqa: E731
    rows = [
        ("encoder, batch 32, fp32", f"{r['encoder']['fp32']:.1f} img/s", "", "", r["encoder"]["rss_mib"]),
        ("encoder, batch 32, channels_last + bf16 autocast" + ("" if r["encoder"]["bf16_autocast"] else " (no bf16 here: fp32)"),
         f"{r['encoder']['fast']:.1f} img/s", "", "", r["encoder"]["rss_mib"]),
    ]
    for b in (1, 3):
        c, base = r[f"caption_b{b}"], r[f"baseline_b{b}"]
        rows.append((f"`captioner caption` {c['images']} JPEGs, beam {b}, batch 32 (excl. {c['load_s']:.1f} s load; "
                     f"incl.: {c['ips_with_load']:.1f})", f"{c['ips']:.1f} img/s", f">= {GOALS[f'caption_b{b}']:.0f}",
                     ok(c["ips"], f"caption_b{b}"), f"{c['rss_mib']:.0f} + workers {c['workers_rss_mib']:.0f}"))
        rows.append((f"baseline per-image (tutorial style, fp32), beam {b}", f"{base['ips']:.1f} img/s", "", "", base["rss_mib"]))
        rows.append((f"speed-up batched / baseline, beam {b}", f"{c['ips'] / base['ips']:.1f}x", ">= 5x",
                     ok(c["ips"] / base["ips"], f"speedup_b{b}"), ""))
    lat = r["latency"]
    for b in (1, 3):
        rows.append((f"single image 640x480 `cap.caption([img])`, beam {b}, p50 / p90 ({args.reps_lat} reps)",
                     f"{lat[f'b{b}_p50']:.1f} / {lat[f'b{b}_p90']:.1f} ms", "<= 100 ms" if b == 3 else "",
                     ok(lat["b3_p50"], "latency_b3_p50", True) if b == 3 else "", lat["rss_mib"]))
    for every in ("1", "0.5"):
        v = r[f"video_{every}"]
        rows.append((f"`captioner video` {args.seconds} s 640x360 H.264, --every {every} ({v['frames']} frames, "
                     "decode + caption, beam 3, excl. load)", f"{v['fps']:.1f} frames/s", "", "", v["rss_mib"]))
    out = ["| measurement | result | goal | met | peak RSS MiB |", "|---|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} | {e if isinstance(e, str) else f'{e:.0f}'} |" for a, b, c, d, e in rows]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="smoke run: few images, short video, few repetitions")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: cores)")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--reps-enc", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--reps-lat", type=int, default=30, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage:
        return child(args)
    if args.quick:
        args.images, args.reps_enc, args.reps_lat = min(args.images, 48), 3, 10
    args.seconds = 10 if args.quick else 60
    with tempfile.TemporaryDirectory(prefix="captioner-bench-") as tmp:
        images, video = Path(tmp) / "images", Path(tmp) / "video.mp4"
        t = time.perf_counter()
        make_images(images, args.images)
        make_video(video, args.seconds)
        print(f"inputs: {args.images} JPEGs + {args.seconds} s video in {time.perf_counter() - t:.1f} s; "
              f"{args.threads} torch threads, load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
        results = {s: run_stage(args, s, video if s.startswith("video") else images) for s in STAGES}
    results["settings"] = {"images": args.images, "video_seconds": args.seconds, "threads": args.threads,
                           "cpus": os.cpu_count(), "quick": args.quick, "load_average_after": os.getloadavg()[0]}
    print(table(results, args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
