"""Issue 25 item 10: a caption whose score is far below the usual range is flagged (`warning`), in the CLI's
stderr and rows and in the app's Batch table; a normal caption is not."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import picture

import captioner.lite.search as search  # LOW_SCORE and score_warning live there (issue 26)
from captioner.pipeline.batch import caption_files
from captioner.cli.main import main
from captioner.pipeline.captioner import Captioner

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    d = tmp_path_factory.mktemp("lowscore")
    for i in range(2):
        picture(i).save(d / f"p{i}.png")
    return sorted(d.iterdir())


def test_low_score_warning(two, tiny_model, monkeypatch):
    cap = Captioner.load(tiny_model)
    rows = caption_files(cap, two, beam=3, workers=0)
    low, high = sorted(rows, key=lambda r: r["score"])
    assert not any(r["warning"] for r in rows)  # the real threshold: no warning on these scores
    t = (low["score"] + high["score"]) / 2 if low["score"] < high["score"] else low["score"] + 1e-3
    monkeypatch.setattr(search, "LOW_SCORE", t, raising=False)
    rows = {r["path"]: r for r in caption_files(cap, two, beam=3, workers=0)}
    assert rows[low["path"]]["warning"] == f"low confidence (score {low['score']:.1f} below {t:g})"
    if low["score"] < high["score"]:
        assert not rows[high["path"]]["warning"]


def test_low_score_warning_cli(two, tiny_model, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(search, "LOW_SCORE", 0.0, raising=False)  # every log-prob is below 0: every row flagged
    out = tmp_path / "o.jsonl"
    assert main(["caption", *map(str, two), "-o", str(out), "--model", str(tiny_model), "--workers", "0",
                 "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["warning"].startswith("low confidence (score ") for r in rows)
    assert capsys.readouterr().err.count("warning: low confidence") == 2


def test_low_score_warning_app(two, tiny_model, monkeypatch):
    gr = pytest.importorskip("gradio")
    from captioner.app import ui

    toasts: list[str] = []
    monkeypatch.setattr(gr, "Warning", lambda message, *a, **k: toasts.append(message))
    monkeypatch.setattr(search, "LOW_SCORE", 0.0, raising=False)
    cap = Captioner.load(tiny_model)
    assert ui.caption_image_fn(cap)(str(two[0]), 3, 20, 1)[0]
    assert len(toasts) == 1 and toasts[0].startswith("Low confidence (score ")
    toasts.clear()
    rows = ui.caption_batch_fn(cap, ui.WorkDir())([str(p) for p in two], 3, progress=lambda *a, **k: None)[1]
    assert ui.BATCH_HEADERS[4] == "warning" and all(r[4].startswith("low confidence (score ") for r in rows)
    assert toasts == ["2 captions with low confidence (see the warning column)"]
    monkeypatch.setattr(search, "LOW_SCORE", -1e9)  # a normal caption: no warning
    toasts.clear()
    rows = ui.caption_batch_fn(cap, ui.WorkDir())([str(p) for p in two], 3, progress=lambda *a, **k: None)[1]
    assert not any(r[4] for r in rows) and not toasts
