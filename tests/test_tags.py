"""Video tags are objects (issue 17 item 11): caption nouns by the vocabulary-derived word list in
assets/tagwords.txt, plus the encoder's ImageNet labels above a probability; JSON and CSV say which is which."""

from __future__ import annotations

import csv
import json
from importlib import resources

import pytest
import torch

from captioner.media import tags as T
from captioner.media import video as V
from captioner.cli.main import main
from captioner.media.tags import FrameCaption
from captioner.model.vocab import stopwords
from conftest import picture


def test_caption_tags_are_nouns():
    caps = ["a man in a red shirt is holding a game controller", "a young man wearing a red shirt playing a video game"]
    assert [t.tag for t in T.caption_tags(caps)] == ["man", "shirt", "game", "controller", "video"]
    assert T.caption_tags(caps)[0] == T.Tag("man", "caption", 1.0)
    for word in ("red", "white", "holding", "standing", "young", "dressed", "quickly", "stands", "front", "the", "2"):
        assert not T.is_noun(word), word
    for word in ("dog", "building", "bed", "family", "ceiling", "sled", "drink", "light", "night", "frisbee"):
        assert T.is_noun(word), word
    assert T.caption_tags(["a b c the of 42 red"]) == []
    stop = stopwords()
    assert 100 <= len(stop) <= 250 and {"a", "the", "of", "on", "with"} <= stop
    assert len(T.caption_tags([" ".join(f"w{i}x" for i in range(20))], k=5)) == 5


def test_word_list_sections():
    nouns, not_nouns = T._word_lists()
    assert nouns and all(w.endswith(("ing", "ed", "ly")) for w in nouns)  # exceptions to the suffix rule only
    assert not nouns & not_nouns and len(not_nouns) > 300
    assert "[not nouns]" in resources.files("captioner").joinpath("assets/tagwords.txt").read_text()


def test_imagenet_tags_threshold_and_order():
    frames = [[("tabby", 0.5), ("tiger cat", 0.2), ("lynx", 0.1)], [("tiger cat", 0.35), ("tabby", 0.2)], []]
    got = T.imagenet_tags(frames)
    assert [(t.tag, t.source) for t in got] == [("tabby", "imagenet"), ("tiger cat", "imagenet")]  # lynx < 0.3
    assert got[0].score == pytest.approx(0.7 / 3, abs=1e-3)
    assert T.imagenet_tags(frames, min_prob=0.6) == []
    both = T.tag(["a cat on a tabby rug"], [[("tabby", 0.9)]])  # a label already among the nouns: once
    assert [(t.tag, t.source) for t in both] == [("cat", "caption"), ("tabby", "caption"), ("rug", "caption")]


def test_tags_in_json_and_csv(tmp_path):
    clip = tmp_path / "clip.mp4"
    from test_video import make_video

    make_video(clip)
    fn = lambda frames: [FrameCaption("a man holding a red cup", [("espresso", 0.8), ("cup", 0.1)]) for _ in frames]  # noqa: E731
    res = V.tag_video(clip, fn, every=2.0)
    assert res.tags == ["man", "cup", "espresso"] and res.segments[0].tags == ["man", "cup", "espresso"]
    assert [t.source for t in res.segments[0].tag_sources] == ["caption", "caption", "imagenet"]
    assert res.labels[0] == [("espresso", 0.8), ("cup", 0.1)]
    V.write_results([res], tmp_path / "out.json")
    seg = json.loads((tmp_path / "out.json").read_text())["videos"][0]["segments"][0]
    assert seg["tags"] == ["man", "cup", "espresso"]
    assert seg["tag_sources"][2] == {"tag": "espresso", "source": "imagenet", "score": 0.8}
    V.write_results([res], tmp_path / "out.csv")
    row = next(csv.DictReader((tmp_path / "out.csv").open()))
    assert (row["tags"], row["caption_tags"], row["imagenet_tags"]) == ("man;cup;espresso", "man;cup", "espresso")
    plain = V.tag_video(clip, lambda frames: ["a red cup"] * len(frames), every=5.0)  # str captions still work
    assert plain.tags == ["cup"] and plain.labels == []


@pytest.fixture(scope="module")
def shipped():
    from captioner.pipeline.captioner import Captioner

    return Captioner.load()


def test_imagenet_labels_are_the_encoders_classifier(shipped):
    from slideshow import photos

    source, pics = photos()
    images = [*pics[:3], picture(1, (224, 224))]
    x = shipped.preprocess(images)
    labels = shipped.imagenet_labels(shipped.encode(x), k=3)
    from captioner.model.encoder import imagenet_categories

    _, logits = shipped.encoder.encode(x)
    probs, idx = torch.softmax(logits, 1).topk(3, 1)
    cats = imagenet_categories()
    for got, ps, js in zip(labels, probs, idx):
        assert [n for n, _ in got] == [cats[j] for j in js.tolist()]
        assert [p for _, p in got] == pytest.approx(ps.tolist(), abs=0.02)
        assert got == sorted(got, key=lambda x: -x[1]) and sum(p for _, p in got) <= 1.0001


def test_video_cli_marks_tag_sources(tmp_path, shipped):
    """`captioner video` with the shipped model: each tag has a source; on the shared photos the coffee
    photo gets its ImageNet label (espresso, p 0.95 on the photo itself)."""
    from slideshow import photos, still, write

    source, pics = photos()
    clip = write(tmp_path / "show.mp4", [(2, still(p)) for p in pics[:4]])
    rc = main(["-q", "video", str(clip), "--every", "2", "--no-progress", "-o", str(tmp_path / "out.json")])
    assert rc == 0
    video = json.loads((tmp_path / "out.json").read_text())["videos"][0]
    assert len(video["labels"]) == len(video["times"]) == 4 and all(len(f) == 3 for f in video["labels"])
    for seg in video["segments"]:
        assert [t["tag"] for t in seg["tag_sources"]] == seg["tags"]
        assert all(t["source"] in ("caption", "imagenet") for t in seg["tag_sources"])
        assert not {"red", "white", "black", "holding", "standing", "sitting", "young"} & set(seg["tags"])
    if source == "photos":  # astronaut, camera, chelsea, coffee
        assert "espresso" in video["segments"][-1]["tags"], video["segments"][-1]
        assert {"caption", "imagenet"} <= {t["source"] for t in video["tag_sources"]}
