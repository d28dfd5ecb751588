"""Issue 28 on one machine: WebDataset tar shards and path lists in, Parquet out (resume, refusals, exit codes),
the Ray engine's planning and per-shard work without a cluster, and the one-line hints when Ray or pyarrow is
missing. The cluster itself: tests/test_ray.py."""

from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import jpeg_bytes, make_shards, picture_folder, write_shard

from captioner.cli.main import main
from captioner.media.shards import TarImage, TarProblem, gather, read_path_list, read_shard

pq = pytest.importorskip("pyarrow.parquet")
torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
FAST = ("--backend", "torch", "--workers", "0", "--batch-size", "4", "--no-progress")


def run(*argv: object) -> int:
    return main(["caption", *map(str, argv)])


def table(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """Two shards of 6 samples (the last one of each: no image) and a third sample kind: json only."""
    d = tmp_path_factory.mktemp("shards")
    make_shards(d, 2, 6, corrupt=1)
    return d


# ------------------------------------------------------------------------------- reading ------
def test_shard_samples_keep_key_json_and_txt_and_bad_samples_are_problems(tmp_path):
    shard = write_shard(tmp_path / "s.tar", [
        ("00/a", {"jpg": jpeg_bytes(1), "json": b'{"url": "u"}', "txt": b"a caption"}),
        ("00/b.x", {"png": b"..."}),  # key 00/b, extension x.png: an image member, bad bytes
        ("00/c", {"json": b"{}"}),  # no image
        ("00/d", {"webp": jpeg_bytes(2)}),  # wrong extension for its bytes: Pillow reads it anyway
    ])
    items, meta = read_shard(shard)
    assert [str(i) for i in items] == [f"{shard}/00/a.jpg", f"{shard}/00/b.x.png", f"{shard}/00/c", f"{shard}/00/d.webp"]
    assert isinstance(items[0], TarImage) and isinstance(items[2], TarProblem)
    a = meta[str(items[0])]
    assert (a.key, a.shard, a.json, a.txt) == ("00/a", str(shard), '{"url": "u"}', "a caption")
    assert items[0].load().size == (64, 48)
    with pytest.raises(Exception, match="no image in this sample"):
        items[2].load()
    # a shard cut short: what could be read is kept, the damage is one error item at the end
    cut = tmp_path / "cut.tar"
    data = shard.read_bytes()
    cut.write_bytes(data[:1200])
    items, _ = read_shard(cut)
    assert items and isinstance(items[-1], TarProblem) and str(items[-1]) == str(cut)
    gz = tmp_path / "gz.tar"
    gz.write_bytes(gzip.compress(data))
    items, _ = read_shard(gz)
    assert len(items) == 1 and "compressed tar shards are not supported" in items[0].message


def test_path_lists_txt_csv_parquet_relative_to_the_list(tmp_path):
    import pyarrow as pa

    (tmp_path / "imgs").mkdir()
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "a.txt").write_text("../imgs/x.jpg\n\n/abs/y.png\r\n")
    (tmp_path / "lists" / "b.csv").write_text("key,path,other\nk1,../imgs/x.jpg,1\nk2,z.jpg,2\n")
    pq.write_table(pa.table({"path": ["x.jpg", "/abs/q.jpg"], "key": ["p1", None]}), tmp_path / "lists" / "c.parquet")
    lists = tmp_path / "lists"
    assert read_path_list(lists / "a.txt") == [(str(lists / "../imgs/x.jpg"), None), ("/abs/y.png", None)]
    assert read_path_list(lists / "b.csv") == [(str(lists / "../imgs/x.jpg"), "k1"), (str(lists / "z.jpg"), "k2")]
    assert read_path_list(lists / "c.parquet") == [(str(lists / "x.jpg"), "p1"), ("/abs/q.jpg", None)]
    (lists / "bad.csv").write_text("file,key\nx.jpg,1\n")
    (tmp_path / "imgs" / "x.jpg").write_bytes(b"")
    (lists / "notes.txt").write_text("Holiday notes\nnot a path list at all\n")  # e.g. caught by `caption *`
    items, errors, _ = gather([lists / "bad.csv", lists / "a.txt", lists / "notes.txt"])
    assert errors == [(str(lists / "bad.csv"), "a path list needs a `path` column (columns: file, key)"),
                      (str(lists / "notes.txt"), "none of its 2 entries is an existing file (not a path list?)")]
    assert len(items) == 2  # a.txt: one entry exists, the other is an error row when captioned


# ------------------------------------------------------------------------ Parquet output ------
def test_parquet_from_shards_lists_and_files_one_row_each(shard_dir, good_folder, tiny_model, tmp_path, capsys):
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join([str(good_folder / "ok0.png"), str(good_folder / "ok1.png"), str(tmp_path / "gone.jpg")]))
    out = tmp_path / "out.parquet"
    code = run(good_folder / "ok4.png", lst, str(shard_dir / "*.tar"), "-o", out, "--model", tiny_model, *FAST)
    assert code == 3  # the missing file and the shards' bad samples are error rows
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"captioner: {shard_dir / '00000.tar'}/000000005.jpg: " in err
    rows = table(out)
    assert list(rows[0]) == ["path", "key", "shard", "caption", "score", "alternatives", "model", "error", "warning",
                             "json", "txt"]
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == 1 + 3 + 12
    by = {r["path"]: r for r in rows}
    first = by[f"{shard_dir / '00001.tar'}/000010000.jpg"]
    assert first["key"] == "000010000" and first["shard"] == str(shard_dir / "00001.tar") and first["caption"]
    assert json.loads(first["json"]) == {"key": "000010000", "n": 6} and first["txt"] == "alt text 6"
    assert first["model"].startswith("pixels+") and first["error"] is None and first["score"] < 0
    bad = by[f"{shard_dir / '00001.tar'}/000010005.jpg"]
    assert bad["error"] and bad["caption"] is None and bad["score"] is None and bad["key"] == "000010005"
    assert by[str(tmp_path / "gone.jpg")]["error"] == "file not found"
    assert by[str(tmp_path / "gone.jpg")]["shard"] == str(lst)
    assert by[str(good_folder / "ok4.png")]["shard"] is None
    assert not (tmp_path / "out.parquet.part.jsonl").exists()
    # the same images into CSV: same captions; tar members are SHARD/MEMBER paths
    out_csv = tmp_path / "out.csv"
    assert run(good_folder / "ok4.png", lst, str(shard_dir / "*.tar"), "-o", out_csv, "--model", tiny_model, *FAST) == 3
    with out_csv.open(newline="") as f:
        text_rows = list(csv.DictReader(f))
    assert [r["path"] for r in text_rows] == paths
    assert [r["caption"] or None for r in text_rows] == [r["caption"] for r in rows]
    # nothing left to do: --resume keeps every row, captions none again
    assert run(str(shard_dir / "*.tar"), "-o", out_csv, "--model", tiny_model, *FAST, "--resume") == 3
    with out_csv.open(newline="") as f:
        assert len(list(csv.DictReader(f))) == len(paths)


def test_parquet_refusals_and_overwrite(shard_dir, tiny_model, tmp_path, capsys):
    out = tmp_path / "out.parquet"
    shards = str(shard_dir / "*.tar")
    assert run(shards, "-o", out, "--model", tiny_model, *FAST) == 3
    assert run(shards, "-o", out, "--model", tiny_model, *FAST) == 2  # exists: --resume or --overwrite
    assert "exists: use --resume" in capsys.readouterr().err
    assert run(shards, "-o", out, "--model", tiny_model, *FAST, "--overwrite") == 3
    assert len(table(out)) == 12
    assert run(shards, "-o", tmp_path / "lib.sqlite", "--model", tiny_model, *FAST) == 2
    assert run(shards, "--write-metadata", "--model", tiny_model, *FAST) == 2
    assert "not to a .sqlite library or image metadata" in capsys.readouterr().err
    (tmp_path / "x.parquet").write_text("not parquet")
    assert run(shards, "-o", tmp_path / "x.parquet", "--model", tiny_model, *FAST, "--resume") == 1
    assert "is not a captions Parquet file" in capsys.readouterr().err


SLOW = ("import sys, time, captioner.pipeline.batch as b; load = b.load_image; "
        "b.load_image = lambda p, *a: (time.sleep(0.03), load(p, *a))[1]; from captioner.cli.main import main; sys.exit(main())")


@pytest.mark.timeout(240)
def test_parquet_resume_after_sigkill(tiny_model, tmp_path_factory, tmp_path):
    """A killed run leaves its journal (OUT.part.jsonl); --resume adds the rest: each image once, same captions."""
    many = picture_folder(tmp_path_factory, "many", [f"pic{i:03d}.{'jpg' if i % 3 else 'png'}" for i in range(60)])
    clean, out = tmp_path / "clean.parquet", tmp_path / "out.parquet"
    assert run(many, "-o", clean, "--model", tiny_model, *FAST) == 0
    argv = [str(many), "-o", str(out), "--model", str(tiny_model), *FAST]
    proc = subprocess.Popen([sys.executable, "-c", SLOW, "caption", *argv], env=ENV, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = tmp_path / "out.parquet.part.jsonl"
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if part.exists() and part.read_bytes().count(b"\n") >= 9:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, proc.stderr.read().decode()
    assert not out.exists() and 9 <= part.read_bytes().count(b"\n") < 60
    assert run(*argv) == 2  # the journal's rows are not thrown away silently
    assert run(*argv, "--resume") == 0
    assert not part.exists()
    assert table(out) == table(clean)


# ---------------------------------------------------------------- the Ray engine, no cluster ------
def test_plan_names_shards_chunks_lists_and_refuses_clashes(shard_dir, good_folder, tmp_path):
    from captioner.pipeline.distributed import plan
    from captioner.errors import UsageProblem

    lst = tmp_path / "part.txt"
    lst.write_text("\n".join(f"img{i}.jpg" for i in range(5)))
    for i in range(5):
        (tmp_path / f"img{i}.jpg").write_bytes(b"")
    shards, errors = plan([str(shard_dir / "*.tar"), lst, good_folder], shard_size=2)
    assert [s.name for s in shards] == ["00000", "00001", "part-00000", "part-00001", "part-00002", "images-00000",
                                        "images-00001", "images-00002"]
    assert shards[4].paths == (str(tmp_path / "img4.jpg"),) and not errors
    assert shards[2].digest() != shards[3].digest()
    other = tmp_path / "other"
    other.mkdir()
    (other / "00000.tar").write_bytes((shard_dir / "00000.tar").read_bytes())
    with pytest.raises(UsageProblem, match="would both be written to 00000.parquet"):
        plan([shard_dir / "00000.tar", other / "00000.tar"])


def test_caption_shard_writes_its_file_then_its_marker(shard_dir, tiny_model, tmp_path):
    from captioner.pipeline.batch import CaptionJob
    from captioner.pipeline.distributed import Shard, caption_shard, finished, marker, shard_file
    from captioner.pipeline.captioner import Captioner

    cap = Captioner.load(tiny_model, backend="torch")
    (tmp_path / "_done").mkdir()
    shard = Shard("00000", "tar", str(shard_dir / "00000.tar"))
    assert finished(tmp_path, shard) is None
    summary = caption_shard(cap, shard, tmp_path, CaptionJob(batch_size=4), alternatives=False)
    assert (summary["rows"], summary["failed"]) == (6, 1) and finished(tmp_path, shard) == summary
    assert marker(tmp_path, "00000").stat().st_mtime_ns >= shard_file(tmp_path, "00000").stat().st_mtime_ns
    assert len(table(shard_file(tmp_path, "00000"))) == 6
    chunk = Shard("images-00000", "paths", "", (str(shard_dir / "nope.jpg"),), (None,))
    caption_shard(cap, chunk, tmp_path, CaptionJob(), alternatives=False)
    assert finished(tmp_path, chunk) is not None
    assert finished(tmp_path, Shard("images-00000", "paths", "", (str(shard_dir / "other.jpg"),), (None,))) is None
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary file left


# ------------------------------------------------------------- without the extras, and usage ------
BLOCK = "import sys; sys.modules[{mod!r}] = None; from captioner.cli.main import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("mod,hint", [("ray", "pip install 'captioner[ray]'"), ("pyarrow", "pip install pyarrow")])
def test_without_ray_or_pyarrow_one_line_and_exit_1(mod, hint, shard_dir, tiny_model, tmp_path):
    """importing the module fails (None in sys.modules: ImportError), as on an install without it."""
    out = tmp_path / ("dir" if mod == "ray" else "out.parquet")
    argv = ["caption", str(shard_dir / "00000.tar"), "-o", str(out), "--model", str(tiny_model), *FAST]
    if mod == "ray":
        argv.append("--ray")
    res = subprocess.run([sys.executable, "-c", BLOCK.format(mod=mod), *argv], env=ENV, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("captioner: error: ") and hint in res.stderr
    assert "Traceback" not in res.stderr


def test_ray_usage_errors_before_anything_runs(shard_dir, tiny_model, tmp_path, capsys):
    tar = str(shard_dir / "00000.tar")
    assert run(tar, "--ray", "--model", tiny_model) == 2
    assert "--ray needs -o DIR" in capsys.readouterr().err
    assert run(tar, "--ray", "-o", tmp_path / "x.csv") == 2
    assert run(tar, "--ray", "-o", tmp_path / "d", "--sidecar") == 2
    assert run("--ray") == 2
    assert "required: PATH" in capsys.readouterr().err
    (tmp_path / "d" / "_done").mkdir(parents=True)
    (tmp_path / "d" / "_done" / "00000.json").write_text("{}")
    assert run(tar, "--ray", "-o", tmp_path / "d") == 2
    assert "use --resume to do only the unfinished ones" in capsys.readouterr().err


def test_ray_address_or_an_input():
    """`--ray a.tar b.tar`: argparse gives --ray the first word; an input goes back to the inputs."""
    from captioner.cli.caption import check_caption_args
    from captioner.cli.main import build_parser

    for argv, address, inputs in ((["--ray", "a.tar", "b.tar"], "", ["a.tar", "b.tar"]),
                                  (["a.tar", "--ray", "auto"], "auto", ["a.tar"]),
                                  (["--ray", "ray://head:10001", "a.tar"], "ray://head:10001", ["a.tar"]),
                                  (["--ray", "10.0.0.1:6379", "a.tar"], "10.0.0.1:6379", ["a.tar"]),
                                  (["a.tar", "--ray"], "", ["a.tar"])):
        args = build_parser().parse_args(["caption", *argv, "-o", "out"])
        check_caption_args(args)
        assert (args.ray, args.inputs) == (address, inputs), argv


def test_make_test_installs_the_ray_extra():
    """CI (`make test`) installs [ray], so the cluster tests run there (tests/test_ray.py)."""
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet -e '.[train,app,dev,ray]'" in makefile
    pyproject = (ROOT / "pyproject.toml").read_text()
    ray = pyproject.split("\nray = [", 1)[1].split("]\n", 1)[0]
    assert '"ray[data]>=2.60,<2.64"' in ray and '"pyarrow>=14"' in ray  # Parquet output needs pyarrow too
