"""Metrics: our pure-Python BLEU must equal coco-caption's; nltk's is close by design."""

import random

import pytest

from captioner.errors import CaptionerError
from captioner.training.metrics import CiderD, coco_bleu, format_scores, nltk_bleu, score_captions
from captioner.model.vocab import tokenize

WORDS = "a the dog cat man woman on in with red ball grass street sitting running is".split()
REAL = [  # (hypothesis, references) written like COCO captions
    ("A dog runs across the grass with a red ball.",
     ["A brown dog running on the grass with a ball.", "A dog plays with a red ball in a park.",
      "The dog is chasing a red ball across the lawn."]),
    ("a man riding a bike down the street",
     ["A man rides his bicycle down a city street.", "A person riding a bike on the street.",
      "A cyclist going down the road in traffic.", "Man on a bicycle riding down the street."]),
    ("two cats sleeping on a couch",
     ["Two cats are asleep on a sofa.", "A pair of cats sleeping on the couch together."]),
    ("a plate of food",  # short: no 4-gram matches
     ["A white plate topped with rice and vegetables.", "A plate with food on a wooden table.",
      "Food on a plate next to a fork."]),
    ("pizza",  # one-word, almost empty hypothesis
     ["A large pizza sitting on top of a table.", "A pizza with cheese and tomatoes."]),
    ("a woman holding an umbrella in the rain on a busy city street at night",
     ["A woman with an umbrella walks in the rain.", "A person holding an umbrella on a rainy street.",
      "A lady walking down a wet street at night holding an umbrella."]),
]


def corpus() -> tuple[list[list[str]], list[list[list[str]]]]:
    """20 deterministic (hypothesis, references) pairs as token lists."""
    rng = random.Random(0)
    sent = lambda lo, hi: [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    hyps = [tokenize(h) for h, _ in REAL] + [sent(1, 15) for _ in range(14)]
    refs = [[tokenize(r) for r in rs] for _, rs in REAL]
    refs += [[sent(3, 14) for _ in range(rng.randint(2, 5))] for _ in range(14)]
    return hyps, refs


def test_coco_bleu_matches_pycocoevalcap():
    bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu")
    hyps, refs = corpus()
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    expected, _ = bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)
    ours = coco_bleu(hyps, refs)
    assert 0.05 < ours[3] < ours[0] < 1  # the corpus is non-trivial
    assert ours == pytest.approx(expected, abs=1e-6, rel=0)
    assert coco_bleu(hyps, refs, n=2) == pytest.approx(expected[:2], abs=1e-6, rel=0)


def test_identical_is_one_and_disjoint_is_zero():
    hyps, refs = corpus()
    perfect = [rs[0] for rs in refs]
    assert coco_bleu(perfect, refs) == pytest.approx([1.0] * 4)
    assert nltk_bleu([h for h in perfect if len(h) >= 4], [rs for h, rs in zip(perfect, refs) if len(h) >= 4]) \
        == pytest.approx([1.0] * 4)
    disjoint = [["zebra"] * len(h) for h in hyps]
    assert max(coco_bleu(disjoint, refs)) < 1e-6
    assert nltk_bleu(disjoint, refs) == [0.0] * 4


def test_nltk_bleu_close_to_coco_on_long_sentences():
    # On sentences of >= 4 words nltk and coco count the same clipped n-grams, the same
    # closest reference lengths and the same brevity penalty; they differ only by coco's
    # 1e-9/1e-15 epsilons. A hypothesis shorter than k words differs: nltk still counts
    # one k-gram guess for it (denominator max(1, .)), so nltk's BLEU-k is lower.
    hyps, refs = corpus()
    long = [(h, rs) for h, rs in zip(hyps, refs) if len(h) >= 6]
    lh, lr = [h for h, _ in long], [rs for _, rs in long]
    assert nltk_bleu(lh, lr) == pytest.approx(coco_bleu(lh, lr), abs=1e-3)
    assert nltk_bleu(hyps, refs)[3] < coco_bleu(hyps, refs)[3]  # short hyps in the full corpus
    assert nltk_bleu(lh, lr, n=1) == pytest.approx(coco_bleu(lh, lr, n=1), abs=1e-3)


@pytest.mark.filterwarnings("error")  # nltk's zero-overlap warning is silenced
def test_score_captions_keys_and_cider():
    pytest.importorskip("pycocoevalcap")
    refs = [rs for _, rs in REAL] + [["A bowl of fruit on a table.", "Apples and bananas in a bowl."]]
    perfect = [rs[0] for rs in refs]
    shuffled = perfect[1:] + perfect[:1]
    good, bad = score_captions(perfect, refs), score_captions(shuffled, refs)
    keys = [f"BLEU-{k}" for k in range(1, 5)] + [f"nltk-BLEU-{k}" for k in range(1, 5)] + ["CIDEr-D", "ROUGE-L"]
    assert list(good) == keys and all(isinstance(v, float) for v in good.values())
    assert good["CIDEr-D"] > bad["CIDEr-D"] and good["ROUGE-L"] > bad["ROUGE-L"]
    assert good["BLEU-4"] == pytest.approx(1.0) and good["ROUGE-L"] == pytest.approx(1.0)
    line = format_scores(good)
    assert line.startswith("BLEU-1 1.000 BLEU-2 1.000") and "coco-caption compatible" in line and "CIDEr-D" in line


def test_score_captions_errors():
    with pytest.raises(CaptionerError):
        score_captions(["a dog"], [["a dog"], ["a cat"]])
    with pytest.raises(CaptionerError):
        score_captions(["a dog", "a cat"], [["a dog"], []])
    with pytest.raises(CaptionerError):
        score_captions([], [])


def test_cider_d_with_fixed_idf_equals_pycocoevalcap_per_image():
    """CiderD(refs).score(h, i) is coco-caption's CIDEr-D of h for image i of the corpus refs: the same
    idf, clipping, length penalty (in bigrams) and scale; including empty and one-word captions."""
    cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
    hyps, refs = corpus()
    hyps = hyps + [[], ["dog"]]
    refs = refs + [refs[0], refs[1]]
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    mean, per_image = cider_mod.Cider().compute_score(gts, res)
    cider = CiderD(refs)
    ours = [cider.score(h, i) for i, h in enumerate(hyps)]
    assert 0.1 < mean < 10 and len(set(per_image.round(6))) > 10  # the corpus is non-trivial
    assert ours == pytest.approx(list(per_image), abs=1e-9, rel=0)
    # scoring one caption does not depend on which others are scored with it (the point of a fixed idf)
    assert cider.score(hyps[3], 3) == ours[3]
    assert cider.score(refs[0][0], 0) > cider.score(refs[0][0], 2)
    with pytest.raises(CaptionerError):
        CiderD([[["a", "dog"]], []])


def test_caption_faults_count_repeated_content_words_and_unk():
    from captioner.training.metrics import caption_faults, repeats_content_word

    assert repeats_content_word("a desk with a laptop with a laptop on it".split())
    assert not repeats_content_word("a man and a woman on a bench in a park".split())  # only function words repeat
    faults = caption_faults(["a dog on a dog", "a cat on a mat", "a <unk> in the snow", "two men play"])
    assert faults == {"repeat_rate": 0.25, "unk_rate": 0.25}


def test_meteor_runs_on_java_and_orders_captions():
    import shutil

    from captioner.training.metrics import meteor

    if shutil.which("java") is None:
        pytest.skip("no Java here (apt-get install default-jre-headless)")
    refs = [[tokenize("a brown dog runs on the grass"), tokenize("a dog running in a field")]]
    good, bad = meteor([tokenize("a dog runs on the grass")], refs), meteor([tokenize("a plate of food")], refs)
    assert 0 <= bad < good <= 1
