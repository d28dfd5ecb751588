"""`captioner caption` (captioner.pipeline.batch) on a tiny random-weight model: formats, broken files, exit codes,
top-k, resume after SIGKILL, and a 2-process torchrun run merged in order."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import picture, picture_folder

from captioner.pipeline.batch import CaptionJob, caption_files, read_rows
from captioner.cli.main import main
from captioner.pipeline.captioner import Captioner

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
BROKEN = ("empty.jpg", "fake.png", "truncated.jpg")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """12 good images in mixed formats and modes, 3 broken ones, and a text file to be ignored."""
    d = tmp_path_factory.mktemp("mixed")
    for i in range(8):
        picture(i).save(d / f"good{i:02d}.{['png', 'jpg', 'webp', 'bmp'][i % 4]}")
    picture(8).convert("L").save(d / "grey.png")
    rgba = picture(9).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "alpha.png")
    picture(10, (300, 200)).save(d / "large.jpeg", quality=90)
    picture(11).convert("P").save(d / "palette.gif")
    (d / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    picture(12).save(buf, "JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "fake.png").write_text("this is not a picture\n")
    (d / "notes.txt").write_text("folder expansion must skip me\n")
    return d


def run(*argv: object) -> int:
    return main(["caption", *map(str, argv), "--no-progress"])


def read(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def check_rows(rows: list[dict], folder: Path) -> None:
    expected = sorted(str(p) for p in folder.iterdir() if p.name != "notes.txt")
    assert [r["path"] for r in rows] == expected  # one row per image, sorted, notes.txt skipped
    for r in rows:
        if Path(r["path"]).name in BROKEN:
            assert r["error"] and not r["caption"] and r["score"] in ("", None)
        else:
            assert r["caption"] and not r["error"] and float(r["score"]) < 0


def test_csv_and_jsonl_with_broken_files(folder, tiny_model, tmp_path, capsys):
    out_csv, out_jsonl = tmp_path / "out.csv", tmp_path / "out.jsonl"
    assert run(folder, "-o", out_csv, "--model", tiny_model, "--workers", 0, "--batch-size", 4) == 3
    err = capsys.readouterr().err
    for name in BROKEN:
        assert f"captioner: {folder / name}: " in err
    assert "Traceback" not in err
    rows = read(out_csv)
    check_rows(rows, folder)
    assert list(rows[0]) == ["path", "caption", "score", "alternatives", "error", "warning"]
    assert all(r["alternatives"] == "" for r in rows)  # --topk 1: column left empty
    # JSONL with 2 loader processes: the same captions; an existing output is replaced with --overwrite
    out_jsonl.write_text('{"path": "stale"}\n')
    assert run(folder, "-o", out_jsonl, "--model", tiny_model, "--workers", 2, "--batch-size", 5, "--overwrite") == 3
    records = read(out_jsonl)
    check_rows(records, folder)
    assert [(r["caption"], r["error"] or "") for r in records] == [(r["caption"], r["error"]) for r in rows]
    assert all(r["score"] is None for r in records if r["error"])


def test_all_good_exit_0_and_stdout_mode(good_folder, tiny_model, tmp_path, capsys):
    assert run(good_folder, "-o", tmp_path / "ok.jsonl", "--model", tiny_model, "--workers", 0) == 0
    captions = {r["path"]: r["caption"] for r in read(tmp_path / "ok.jsonl")}
    capsys.readouterr()
    assert run(str(good_folder / "ok*.png"), "--model", tiny_model, "--workers", 0) == 0  # a glob, stdout
    lines = capsys.readouterr().out.splitlines()
    assert [tuple(line.split("\t")) for line in lines] == list(captions.items())


def test_missing_input_counts_as_failure(good_folder, tiny_model, tmp_path, capsys):
    out = tmp_path / "out.csv"
    assert run(good_folder, tmp_path / "nothing.jpg", "-o", out, "--model", tiny_model, "--workers", 0) == 3
    assert f"captioner: {tmp_path / 'nothing.jpg'}: no such file or folder" in capsys.readouterr().err
    assert len(read(out)) == 5


def test_usage_and_model_errors(good_folder, tiny_model, tmp_path, capsys):
    assert run(good_folder, "-o", tmp_path / "out.txt", "--model", tiny_model) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and "out.txt" not in os.listdir(tmp_path) and ".csv, .jsonl, .parquet or .sqlite" in err
    assert run(good_folder, "--resume", "--model", tiny_model) == 2  # --resume needs -o
    capsys.readouterr()
    assert run(good_folder, "-o", tmp_path / "out.csv", "--model", tmp_path / "missing.pt") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.pt" in err and "Traceback" not in err
    assert not (tmp_path / "out.csv").exists()


def test_recursive_and_resume_in_process(tiny_model, tmp_path, capsys):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    picture(1).save(d / "a.png")
    picture(2).save(d / "sub" / "b.jpg")
    out = tmp_path / "out.jsonl"
    assert run(d, "-o", out, "--model", tiny_model, "--workers", 0) == 0
    first = read(out)
    assert [r["path"] for r in first] == [str(d / "a.png")]
    out.write_bytes(out.read_bytes() + b'{"path": "half a ro')  # a partial last line, as left by a kill
    assert run(d, "-r", "-o", out, "--model", tiny_model, "--workers", 0, "--resume") == 0
    rows = read(out)
    assert rows[0] == first[0] and [r["path"] for r in rows] == [str(d / "a.png"), str(d / "sub" / "b.jpg")]
    assert run(d, "-r", "-o", out, "--model", tiny_model, "--resume") == 0 and read(out) == rows  # nothing left
    capsys.readouterr()
    (tmp_path / "other.csv").write_text("name,size\nx,1\n")
    assert run(d, "-o", tmp_path / "other.csv", "--model", tiny_model, "--resume") == 1
    assert "cannot resume" in capsys.readouterr().err


def test_topk_alternatives(good_folder, tiny_model, tmp_path):
    assert run(good_folder, "-o", tmp_path / "k.csv", "--model", tiny_model, "--workers", 0, "--beam", 3, "--topk", 3) == 0
    for r in read(tmp_path / "k.csv"):
        alts = json.loads(r["alternatives"])
        assert len(alts) == 3 and alts[0] == [r["caption"], float(r["score"])]
        assert [s for _, s in alts] == sorted((s for _, s in alts), reverse=True)


def test_caption_files_api(folder, tiny_model):
    """What the Gradio app calls: a list of paths in, one dict per path out, in order."""
    cap = Captioner.load(tiny_model)
    paths = sorted(folder.iterdir())
    batches, done = [], []
    res = caption_files(cap, paths, CaptionJob(batch_size=4), on_batch=batches.append, progress=done.append, beam=2)
    assert [r["path"] for r in res] == [str(p) for p in paths] and len(batches) == 4 and done[-1] == len(paths)
    assert sum(batches, []) == res
    notes = res[[p.name for p in paths].index("notes.txt")]
    assert notes["error"] and notes["caption"] == "" and notes["score"] is None
    good = res[[p.name for p in paths].index("grey.png")]
    assert good["caption"] and not good["error"] and len(good["alternatives"]) >= 1


@pytest.mark.parametrize("which", ["tiny", "shipped"])
def test_captioning_in_workers_matches_in_process(folder, tiny_model, which):
    """workers > 0 on CPU: the loading processes also encode and search (one thread each); captions,
    scores and errors equal those of captioning in this process."""
    cap = Captioner.load(tiny_model if which == "tiny" else None)
    paths = sorted(folder.iterdir())
    here = caption_files(cap, paths, CaptionJob(batch_size=4, workers=0), beam=2)
    there = caption_files(cap, paths, CaptionJob(batch_size=4, workers=2), beam=2)
    assert [r["path"] for r in there] == [r["path"] for r in here]
    assert [r["error"] for r in there] == [r["error"] for r in here]
    assert [r["caption"] for r in there] == [r["caption"] for r in here]
    for a, b in zip(here, there):
        assert (a["score"] is None and b["score"] is None) or abs(a["score"] - b["score"]) < 1e-3


# ------------------------------------------------------------------- separate processes ------
def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "captioner", "caption", *map(str, args), "--no-progress"]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# the killed run: the real CLI, with image loading slowed down so that the kill lands mid-run
SLOW = ("import sys, time, captioner.pipeline.batch as b; load = b.load_image; "
        "b.load_image = lambda p, *a: (time.sleep(0.03), load(p, *a))[1]; from captioner.cli.main import main; sys.exit(main())")


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    return picture_folder(tmp_path_factory, "many", [f"pic{i:03d}.{'jpg' if i % 3 else 'png'}" for i in range(60)])


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_resume_after_sigkill(many, tiny_model, tmp_path, fmt):
    clean, out = tmp_path / f"clean.{fmt}", tmp_path / f"out.{fmt}"
    assert run(many, "-o", clean, "--model", tiny_model, "--workers", 0, "--batch-size", 4) == 0
    args = [many, "-o", out, "--model", tiny_model, "--workers", 0, "--batch-size", 4]
    proc = subprocess.Popen([sys.executable, "-c", SLOW, *cli(*args)[3:]], env=ENV, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= 9:  # a few batches written
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
    data = out.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    out.write_bytes(data[: start + (len(data) - start) // 2])  # the last row cut in half, as by a kill mid-write
    before = len(read_rows(out, fmt))  # complete rows only
    assert 4 <= before < 60
    done = subprocess.run(cli(*args, "--resume"), env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert read(out) == read(clean)  # each image once, in order, same captions as a clean run


def test_torchrun_two_processes(folder, tiny_model, tmp_path):
    pytest.importorskip("torch.distributed")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    single, merged = tmp_path / "single.jsonl", tmp_path / "merged.jsonl"
    assert run(folder, "-o", single, "--model", tiny_model, "--workers", 0, "--batch-size", 4) == 3
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           *cli(folder, "-o", merged, "--model", tiny_model, "--workers", 0, "--batch-size", 4)[1:]]
    done = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0  # rank 0 exits 3 (broken inputs); torchrun reports that as a failure
    assert merged.exists(), done.stderr[-3000:]
    assert read(merged) == read(single)  # identical rows in identical order
    assert not list(tmp_path.glob("merged.jsonl.rank*.part"))


def test_skipped_files_counted_by_type_and_small_images_warned(tiny_model, tmp_path, capsys):
    """Item 8: files a folder holds that are not images are counted by type in the summary line and listed
    with -v; an image under 32 px on a side is captioned with a warning in its row."""
    d = tmp_path / "mixed"
    d.mkdir()
    picture(1).save(d / "a.png")
    picture(2, (40, 20)).save(d / "small.png")  # 20 px high
    for name in ("b.heic", "c.svg", "d.svg", "notes.txt", "README"):
        (d / name).write_bytes(b"not read")
    out = tmp_path / "out.csv"
    assert run(d, "-o", out, "--model", tiny_model, "--workers", 0) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == ("captioner: 2 captioned (1 with a warning), 0 failed, "
                       "5 skipped (2 .svg, 1 .heic, 1 .txt, 1 no extension); -v lists them")
    assert err[:-1] == [f"captioner: {d / 'small.png'}: warning: only 40x20 pixels (under 32 on a side): "
                        "the caption is unreliable"]
    rows = {Path(r["path"]).name: r for r in read(out)}
    assert rows["small.png"]["caption"] and rows["small.png"]["warning"].startswith("only 40x20")
    assert rows["a.png"]["warning"] == "" and list(rows["a.png"])[-1] == "warning"
    assert run(d, "--model", tiny_model, "--workers", 0, "-v") == 0  # stdout mode: the list on stderr
    captured = capsys.readouterr()
    listed = [line for line in captured.err.splitlines() if line.startswith("captioner: skipped ")]
    assert listed == [f"captioner: skipped {d / n} (not an image file by its extension)"
                      for n in ("README", "b.heic", "c.svg", "d.svg", "notes.txt")]
    assert len(captured.out.splitlines()) == 2  # captions only on stdout
    assert run(d, "--model", tiny_model, "--workers", 0, "-q") == 0
    assert "captioned (" not in capsys.readouterr().err  # -q: no summary line
