"""Issue 25: a new user's second round of bad inputs (outputs replaced, odd file names, damaged models,
noisy -v, options that do not go together, search queries, huge photos, videos, zips, the app)."""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import picture

from captioner.cli.main import main

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def run(*argv: object) -> int:
    return main(["caption", *map(str, argv), "--no-progress"])


def stored_paths(out: Path) -> list[str]:
    if out.suffix == ".sqlite":
        with sqlite3.connect(out) as con:
            return sorted(r[0] for r in con.execute("SELECT path FROM photos"))
    if out.suffix == ".jsonl":
        return sorted(json.loads(line)["path"] for line in out.read_text(encoding="utf-8").splitlines())
    with out.open(newline="", encoding="utf-8") as f:
        return sorted(r["path"] for r in csv.DictReader(f))


# ------------------------------------------------------------------ item 1: existing outputs ------
@pytest.mark.parametrize("fmt", ["csv", "jsonl", "sqlite"])
def test_existing_output_is_never_replaced_silently(good_folder, tiny_model, tmp_path, capsys, fmt):
    out = tmp_path / f"lib.{fmt}"
    assert run(good_folder, "-o", out, "--model", tiny_model, "--workers", 0) == 0
    before = out.read_bytes()
    one = tmp_path / "one"
    one.mkdir()
    picture(1).save(one / "x.png")
    capsys.readouterr()
    assert run(one, "-o", out, "--model", tiny_model, "--workers", 0) == 2  # refused, nothing run
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"captioner: error: {out} exists: use --resume to add to it or --overwrite to replace it"]
    assert out.read_bytes() == before
    assert run(one, "-o", out, "--model", tiny_model, "--resume", "--overwrite") == 2
    assert run(one, "-o", out, "--model", tiny_model, "--workers", 0, "--overwrite") == 0
    assert stored_paths(out) == [str(one / "x.png")]
    out.write_bytes(b"")  # an empty file holds nothing to lose
    assert run(one, "-o", out, "--model", tiny_model, "--workers", 0) == 0


# ------------------------------------------------------------- item 2: names that are not UTF-8 ------
ODD = (b"x\xff.png", b"tab\there.png", b"new\nline.png", b"back\\slash.png", "caf\u00e9.png".encode())


@pytest.fixture()
def odd_folder(tmp_path) -> Path:
    d = tmp_path / "odd"
    d.mkdir()
    for i, name in enumerate(ODD):
        picture(i).save(os.fsdecode(os.path.join(os.fsencode(d), name)), "PNG")
    return d


def ids(out: Path) -> object:
    """What a resume that captioned nothing leaves unchanged: the file, or the library's row ids."""
    if out.suffix != ".sqlite":
        return out.read_bytes()
    with sqlite3.connect(out) as con:
        return sorted(con.execute("SELECT id, path FROM photos"))


def odd_names(d: Path) -> list[str]:
    return sorted(str(d / os.fsdecode(n)) for n in ODD)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "sqlite"])
def test_names_that_are_not_utf8_round_trip_and_resume(odd_folder, tiny_model, tmp_path, capsys, fmt):
    from captioner.media.images import path_from_text, path_text

    out = tmp_path / f"out.{fmt}"
    assert run(odd_folder, "-o", out, "--model", tiny_model, "--workers", 0) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "5 captioned" in err
    if fmt != "sqlite":
        out.read_bytes().decode("utf-8")  # strictly valid UTF-8: any reader can read it
    stored = stored_paths(out)
    assert sorted(path_from_text(p) for p in stored) == odd_names(odd_folder)  # lossless
    assert sorted(stored) == sorted(path_text(p) for p in odd_names(odd_folder))
    assert all("\n" not in p and "\t" not in p for p in stored)
    before = ids(out)
    assert run(odd_folder, "-o", out, "--model", tiny_model, "--workers", 0, "--resume") == 0
    assert ids(out) == before  # every odd name was matched: nothing captioned again


def test_names_that_are_not_utf8_on_stdout(odd_folder, tiny_model, capsys):
    from captioner.media.images import path_from_text

    assert run(odd_folder, "--model", tiny_model, "--workers", 0) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(ODD) and all(line.count("\t") == 1 for line in lines)
    assert sorted(path_from_text(line.split("\t")[0]) for line in lines) == odd_names(odd_folder)


# ------------------------------------------------------------------ item 4: damaged checkpoints ------
def test_checkpoint_with_nan_weights_is_one_line(good_folder, tiny_model, tmp_path, capsys):
    ckpt = torch.load(tiny_model, weights_only=True)
    weight = next(k for k, v in ckpt["decoder"].items() if v.is_floating_point() and v.numel() > 64)
    ckpt["decoder"][weight].view(-1)[ckpt["decoder"][weight].numel() // 2:][:32] = float("nan")  # bytes overwritten
    bad = tmp_path / "nan.pt"
    torch.save(ckpt, bad)
    assert run(good_folder, "--model", bad, "--workers", 0) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged" in err[0] and weight in err[0] and "Traceback" not in err[0]


def test_no_hypothesis_left_is_an_error_not_an_index_error(tiny_model):
    from captioner.errors import CaptionerError
    from captioner.pipeline.captioner import Captioner

    with pytest.raises(CaptionerError, match="damaged"):
        Captioner.load(tiny_model)._caption([])


# ------------------------------------------------------------------------- item 5: -v is for people ------
def cli(*argv: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captioner", *map(str, argv)], capture_output=True, text=True,
                          cwd=ROOT, timeout=240)


def test_verbose_keeps_third_party_debug_logs_out(tiny_model, tmp_path):
    picture(1).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    one = cli("-v", "caption", tmp_path, "--model", tiny_model, "--workers", 0, "--no-progress")
    assert one.returncode == 0
    assert "Importing" not in one.stderr and "PIL" not in one.stderr
    assert one.stderr.splitlines()[0].startswith("captioner: skipped ")  # -v's own detail is still there
    assert len(one.stderr.splitlines()) == 3 and one.stderr.splitlines()[1].startswith("runtimes: encoder ")
    two = cli("-vv", "caption", tmp_path, "--model", tiny_model, "--workers", 0, "--no-progress")
    assert two.returncode == 0 and "Importing" in two.stderr  # -vv: everything, for bug reports


def test_more_workers_than_cpus_is_one_line(tiny_model, tmp_path):
    """Bad input #21 of docs/bad-inputs-round2.md: torch's multi-line DataLoader warning, said twice, became one
    line of ours; the captions are all there."""
    from captioner.pipeline.batch import usable_cpus

    n = usable_cpus() + 1
    for i in range(n):
        picture(i).save(tmp_path / f"{i}.png")
    run = cli("caption", tmp_path, "--model", tiny_model, "--backend", "torch", "--batch-size", 1, "--workers", n,
              "--no-progress")
    assert run.returncode == 0 and len(run.stdout.splitlines()) == n
    lines = run.stderr.splitlines()
    assert "UserWarning" not in run.stderr and "DataLoader" not in run.stderr, run.stderr
    assert [line for line in lines if "warning:" in line] == [
        f"captioner: warning: {n} workers on {n - 1} CPU{'s' if n > 2 else ''}: each worker runs one thread, "
        f"so more than {n - 1} is usually slower"], lines


def test_cache_with_more_workers_than_cpus_is_one_line(tmp_path):
    """The same for `captioner cache --workers N` (its DataLoader's warning was still torch's)."""
    from synth import make_dataset

    from captioner.runtime.workers import usable_cpus

    data = make_dataset(tmp_path / "shapes", n_train=12, n_val=4, n_test=4)
    n = usable_cpus() + 1
    run = cli("cache", "--data", data, "--encoder", "pixels", "--workers", n, "--cache-dir", tmp_path / "cache",
              "--no-progress")
    assert run.returncode == 0, run.stderr
    assert "UserWarning" not in run.stderr and "DataLoader" not in run.stderr, run.stderr
    assert [line for line in run.stderr.splitlines() if "warning:" in line] == [
        f"captioner: warning: {n} workers on {n - 1} CPU{'s' if n > 2 else ''}: each worker runs one thread, "
        f"so more than {n - 1} is usually slower"], run.stderr


# ---------------------------------------------------------- item 6: options that do not go together ------
def test_topk_above_beam_and_sidecar_with_write_metadata_are_usage_errors(good_folder, tiny_model, tmp_path, capsys):
    missing = tmp_path / "no-model.pt"  # checked before anything loads: the model is never looked at
    assert run(good_folder, "--topk", 5, "--beam", 3, "--model", missing) == 2
    assert "--topk 5 is more than --beam 3" in capsys.readouterr().err
    assert run(good_folder, "--sidecar", "--write-metadata", "--model", missing) == 2
    assert "use one" in capsys.readouterr().err
    assert run(good_folder, "--topk", 5, "--model", tiny_model, "--workers", 0) == 2  # the tiny model's beam: 3
    err = capsys.readouterr()
    assert err.err.strip() == "captioner: error: --topk 5 is more than the model's beam (3): add --beam 5 or more"
    assert err.out == ""
    assert run(good_folder, "--topk", 3, "--model", tiny_model, "--workers", 0) == 0


# ---------------------------------------------------------------- item 7: search queries and ranking ------
@pytest.fixture()
def dog_library(tmp_path) -> Path:
    from captioner.media.library import LibraryWriter

    captions = {"hotdog.jpg": "a hot dog on a plate", "eating.jpg": "a man eating a hot dog",
                "grass.jpg": "a black and white dog running through the grass with a ball in its mouth",
                "brown.jpg": "a brown dog", "teddy.jpg": "a teddy bear on a bed", "bear.jpg": "a brown bear in the water",
                "beach.jpg": "a dog on the beach", "beach2.jpg": "a man on the beach with a dog"}
    rows = [{"path": str(tmp_path / name), "caption": c, "score": -1.0, "alternatives": [], "error": ""}
            for name, c in captions.items()]
    writer = LibraryWriter(tmp_path / "lib.sqlite", "m", {}, alternatives=False)
    writer(rows)
    writer.close()
    return tmp_path / "lib.sqlite"


def test_search_ranks_whole_words_above_compounds_and_phrases_first(dog_library):
    from captioner.media.library import search

    def names(query: str) -> list[str]:
        return [Path(r["path"]).name for r in search(dog_library, query)]

    found = names("dog")
    assert set(found[:4]) == {"grass.jpg", "brown.jpg", "beach.jpg", "beach2.jpg"}  # dogs before hot dogs
    assert set(found[4:]) == {"hotdog.jpg", "eating.jpg"}
    assert set(names("hot dog")[:2]) == {"hotdog.jpg", "eating.jpg"}  # named in the query: no penalty
    assert names("bear")[0] == "bear.jpg"
    assert names("dog on the beach")[0] == "beach.jpg"  # the phrase itself first


def test_search_query_may_start_with_a_dash(dog_library, capsys):
    assert main(["search", str(dog_library), "-dog"]) == 0
    first = capsys.readouterr().out.splitlines()
    assert len(first) == 6 and "hot dog" not in first[0]
    assert main(["search", str(dog_library), "-dog", "--limit", "2", "--json"]) == 0  # options after it still count
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert main(["search", str(dog_library), "--", "-view"]) == 0  # a -- is accepted too
    assert "matches '-view'" in capsys.readouterr().err
    assert main(["search", str(dog_library)]) == 2


def test_video_tags_keep_compound_nouns_whole():
    from captioner.media.tags import caption_tags

    tags = [t.tag for t in caption_tags(["a man talking on a cell phone", "a man holding a cell phone"])]
    assert tags == ["man", "cell phone"]


# ------------------------------------------------------------------------ item 8: huge photos ------
def test_big_jpeg_is_decoded_smaller_and_big_png_refused_unless_raised(tiny_model, tmp_path, capsys):
    from captioner.media.images import load_image

    d = tmp_path / "big"
    d.mkdir()
    picture(3, (1600, 1000)).save(d / "big.jpg", quality=80)  # 1.53 megapixels
    picture(4, (1600, 1000)).save(d / "big.png", compress_level=1)
    img = load_image(d / "big.jpg", max_pixels=2**20)
    assert img.size == (800, 500)  # 1/2 scale: within the limit
    assert run(d, "--max-pixels", 1, "--model", tiny_model, "--workers", 0) == 3
    out = capsys.readouterr()
    assert out.out.startswith(f"{d / 'big.jpg'}\t")
    assert "big.png: image too large (1600x1000 pixels, 2 megapixels; limit 1, refused unread" in out.err
    assert "--max-pixels raises the limit" in out.err and "Traceback" not in out.err
    assert run(d, "--max-pixels", 2, "--model", tiny_model, "--workers", 0) == 0
    assert run(d, "--max-pixels", 0.5, "--model", tiny_model) == 2


# ------------------------------------------------------------------------------- item 9: video ------
def test_a_bad_video_fails_before_the_model_loads(tmp_path, capsys):
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(2000))
    assert main(["video", str(bad), "--model", str(tmp_path / "missing.pt"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "clip.mp4" in err[0] and "model" not in err[0]  # the model was never looked at


# ------------------------------------------------------------------------------- item 10: the app ------
def test_app_warns_about_tiny_images_and_counts_failures(tiny_model, tmp_path, monkeypatch):
    gr = pytest.importorskip("gradio")
    from captioner.app import ui
    from captioner.pipeline.captioner import Captioner

    toasts: list[str] = []
    monkeypatch.setattr(gr, "Warning", lambda message, *a, **k: toasts.append(message))
    monkeypatch.setattr("captioner.lite.search.LOW_SCORE", -1e9)  # the tiny model's scores are not the shipped one's
    cap = Captioner.load(tiny_model)
    from PIL import Image

    Image.new("RGB", (10, 10), "white").save(tmp_path / "tiny.png")
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    picture(1).save(tmp_path / "ok.png")
    text = ui.caption_image_fn(cap)(str(tmp_path / "tiny.png"), 3, 20, 3)[0]
    assert text and toasts == ["Only 10x10 pixels (under 32 on a side): the caption is unreliable."]
    toasts.clear()
    rows = ui.caption_batch_fn(cap, ui.WorkDir())([str(tmp_path / n) for n in ("tiny.png", "bad.png", "ok.png")], 3,
                                                  progress=lambda *a, **k: None)[1]
    assert len(rows) == 3
    assert toasts == ["1 of 3 files failed (see the error column); 1 images under 32 px: their captions are unreliable"]
