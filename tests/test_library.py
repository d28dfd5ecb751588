"""`captioner caption DIR -o library.sqlite` and `captioner search` (captioner.media.library): columns, BM25
ranking, --resume re-captioning changed photos and dropping deleted ones, refusing other files, FTS5 check,
exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from pathlib import Path

import pytest
from conftest import picture

from captioner.media import library
from captioner.cli.main import main
from captioner.media.library import LibraryWriter, match_expression, search
from captioner.pipeline.captioner import Captioner

CAPTIONS = {  # photo -> (caption, alternatives)
    "beach_dog.jpg": ("a dog running on the beach", ["a brown dog on the sand"]),
    "beach_dogs.jpg": ("two dogs playing on a sandy beach", []),
    "couch_dog.jpg": ("a dog sleeping on a couch", []),
    "beach_cat.jpg": ("a cat sitting on the beach", []),
    "pizza.jpg": ("a pizza on a wooden table", []),
    "maybe_pizza.jpg": ("a plate of food on a table", ["a pizza on a plate"]),
    "street.jpg": ("a red bus on a city street", []),
}


def run(*argv: object) -> int:
    return main([*map(str, argv)])


def rows_of(lib: Path) -> dict[str, dict]:
    with contextlib.closing(sqlite3.connect(lib)) as con:
        con.row_factory = sqlite3.Row
        return {Path(r["path"]).name: dict(r) for r in con.execute("SELECT * FROM photos")}


@pytest.fixture
def made_library(tmp_path) -> Path:
    """A library with known captions (written as the caption command writes them)."""
    d = tmp_path / "photos"
    d.mkdir()
    rows = []
    for i, (name, (caption, alts)) in enumerate(CAPTIONS.items()):
        picture(i).save(d / name)
        rows.append({"path": str(d / name), "caption": caption, "score": -1.0 - i / 10, "error": "",
                     "alternatives": [[caption, -1.0 - i / 10]] + [[a, -2.0] for a in alts]})
    stamps = {r["path"]: os.stat(r["path"]) for r in rows}
    writer = LibraryWriter(tmp_path / "lib.sqlite", "test-model", stamps, alternatives=True)
    writer(rows[:4])
    writer(rows[4:])
    writer.close()
    return tmp_path / "lib.sqlite"


def names(found: list[dict]) -> list[str]:
    return [Path(r["path"]).name for r in found]


def test_search_ranks_the_right_photos_first(made_library, capsys):
    assert set(names(search(made_library, "dog on the beach")[:2])) == {"beach_dog.jpg", "beach_dogs.jpg"}
    found = names(search(made_library, "dog on the beach"))
    assert found.index("couch_dog.jpg") > 1 and found.index("beach_cat.jpg") > 1  # one of the two words
    assert names(search(made_library, "pizza")) == ["pizza.jpg", "maybe_pizza.jpg"]  # caption before alternative
    assert "couch_dog.jpg" in names(search(made_library, "Dogs!"))  # stemmed, case and punctuation ignored
    assert search(made_library, "giraffe") == []
    assert run("search", made_library, "dog on the beach", "--limit", 2, "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed) == 2 and set(printed[0]) == {"path", "caption", "score", "alternatives", "rank"}
    assert printed[0]["rank"] <= printed[1]["rank"] and printed[0]["caption"] in {c for c, _ in CAPTIONS.values()}
    assert run("search", made_library, "pizza") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t") for line in lines] == [
        [str(made_library.parent / "photos" / "pizza.jpg"), "a pizza on a wooden table"],
        [str(made_library.parent / "photos" / "maybe_pizza.jpg"), "a plate of food on a table"]]
    assert run("search", made_library, "giraffe") == 0
    out = capsys.readouterr()
    assert out.out == "" and "nothing" in out.err and "matches 'giraffe'" in out.err


def test_query_syntax_is_plain_words(made_library):
    assert match_expression('dog AND "beach" OR -cat*') == '"dog" OR "beach" OR "cat"'  # and, or: function words
    assert match_expression("on the") == '"on" OR "the"'  # nothing but function words: those
    assert names(search(made_library, 'NEAR(bus "street")'))[0] == "street.jpg"  # no FTS5 syntax error


def test_caption_writes_library_and_resume_follows_changes(tiny_model, tmp_path, capsys):
    d = tmp_path / "photos"
    d.mkdir()
    for i in range(5):
        picture(i).save(d / f"p{i}.{'png' if i % 2 else 'jpg'}")
    lib = tmp_path / "lib.sqlite"
    assert run("caption", d, "-o", lib, "--model", tiny_model, "--workers", 0, "--batch-size", 2, "--beam", 3,
               "--topk", 2, "--no-progress") == 0
    first = rows_of(lib)
    assert sorted(first) == [f"p{i}.{'png' if i % 2 else 'jpg'}" for i in range(5)]
    model = Captioner.load(tiny_model).model_id
    for name, r in first.items():
        st = (d / name).stat()
        assert (r["size"], r["mtime_ns"], r["mtime"]) == (st.st_size, st.st_mtime_ns, st.st_mtime)
        assert r["caption"] and r["score"] < 0 and r["model"] == model and r["time"] and r["error"] is None
        assert [a[0] for a in json.loads(r["alternatives"])][0] == r["caption"]
    picture(9, (80, 60)).save(d / "p1.png")  # changed: new size and mtime
    os.utime(d / "p1.png", ns=(first["p1.png"]["mtime_ns"] + 10**9,) * 2)
    (d / "p3.png").unlink()  # deleted
    picture(7).save(d / "p5.jpg")  # new
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    assert run("caption", d, "-o", lib, "--model", tiny_model, "--workers", 0, "--resume", "--no-progress") == 3
    second = rows_of(lib)
    assert sorted(second) == ["broken.jpg", "p0.jpg", "p1.png", "p2.jpg", "p4.jpg", "p5.jpg"]
    for name in ("p0.jpg", "p2.jpg", "p4.jpg"):
        assert second[name] == first[name]  # untouched rows: not captioned again
    assert second["p1.png"]["id"] != first["p1.png"]["id"] and second["p1.png"]["size"] == (d / "p1.png").stat().st_size
    assert second["p5.jpg"]["caption"] and second["broken.jpg"]["error"] and not second["broken.jpg"]["caption"]
    assert "broken.jpg" in capsys.readouterr().err
    assert run("caption", d, "-o", lib, "--model", tiny_model, "--workers", 0, "--resume", "--no-progress") == 3
    assert rows_of(lib) == second  # nothing left to do; the broken file is still reported
    word = second["p5.jpg"]["caption"].split()[-1]
    assert run("search", lib, word, "--json") == 0
    assert str(d / "p5.jpg") in [r["path"] for r in json.loads(capsys.readouterr().out)]
    assert run("caption", d / "p0.jpg", "-o", lib, "--model", tiny_model, "--workers", 0, "--no-progress") == 2
    assert run("caption", d / "p0.jpg", "-o", lib, "--model", tiny_model, "--workers", 0, "--overwrite", "--no-progress") == 0
    assert list(rows_of(lib)) == ["p0.jpg"]  # --overwrite starts afresh, as for CSV/JSONL


def test_other_files_are_refused_and_left_alone(good_folder, tiny_model, tmp_path, capsys):
    text = tmp_path / "notes.sqlite"
    text.write_text("my notes, not a database\n")
    other = tmp_path / "catalog.db"
    with contextlib.closing(sqlite3.connect(other)) as con, con:
        con.execute("CREATE TABLE photos (path TEXT)")
    before = {p: p.read_bytes() for p in (text, other)}
    for target in (text, other):
        for resume in (["--overwrite"], ["--resume"]):  # even --overwrite leaves them alone
            assert run("caption", good_folder, "-o", target, *resume, "--model", tiny_model, "--no-progress") == 1
            err = capsys.readouterr().err
            assert "is not a captioner library" in err and err.count("\n") == 1 and "Traceback" not in err
        assert run("search", target, "dog") == 1
        assert "is not a captioner library" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before
    assert run("search", tmp_path / "missing.sqlite", "dog") == 1
    assert "no library at" in capsys.readouterr().err and not (tmp_path / "missing.sqlite").exists()


def test_usage_errors(made_library, good_folder, tiny_model, tmp_path, capsys):
    assert run("search", made_library, "?!", "--limit", 3) == 2
    assert "no words" in capsys.readouterr().err
    assert run("search", made_library, "dog", "--limit", 0) == 2
    assert run("caption", good_folder, "-o", tmp_path / "lib.sqlit", "--model", tiny_model) == 2
    assert ".sqlite" in capsys.readouterr().err


def test_without_fts5_one_clear_error(made_library, monkeypatch, capsys):
    real = sqlite3.connect

    class NoFts5:
        def execute(self, sql, *args):
            raise sqlite3.OperationalError("no such module: fts5")

    monkeypatch.setattr(library.sqlite3, "connect", lambda path, **kw: NoFts5() if path == ":memory:" else real(path))
    assert run("search", made_library, "dog") == 1
    err = capsys.readouterr().err
    assert "FTS5" in err and err.count("\n") == 1 and "Traceback" not in err


def test_every_flag_of_caption_and_search_has_help():
    import argparse

    from captioner.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("caption", "search"):
        for action in sub.choices[command]._actions:
            assert action.help and action.help != argparse.SUPPRESS, (command, action.dest)
