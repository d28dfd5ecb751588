"""Where a small decoder trained on one-object scenes looks (the setting of tests/test_attention.py, other
penalties and seeds): the share of colour and shape words whose peak attention cell lies inside the object's box,
the mean peak weight, and how often colour and shape are both right. One line per run; docs/attention.md.

    .venv/bin/python bench/attention_scenes.py "{'alpha_c': 0.1, 'penalty': 'sum'}"
"""

from __future__ import annotations

import ast
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synth import COLOURS, SHAPES, make_object_dataset  # noqa: E402
from test_attention import _peak_in_box  # noqa: E402

from captioner.pipeline.captioner import Captioner  # noqa: E402
from captioner.training.train import TrainConfig, train  # noqa: E402

THE_TEST = dict(encoder="pixels", pretrained=False, feat_proj=64, embed_dim=32, hidden_dim=64, attn_dim=32,
                dropout=0.0, min_count=1, lr=3e-3, batch_size=32, beam=1, epochs=8, patience=8, num_workers=0,
                seed=0, alpha_c=0.1, penalty="mean")


def main() -> None:
    from PIL import Image

    torch.set_num_threads(1)
    kw = THE_TEST | (ast.literal_eval(sys.argv[1]) if len(sys.argv) > 1 else {})
    root = Path(tempfile.mkdtemp())
    try:
        data, boxes = make_object_dataset(root / "scenes", n_train=600, n_val=40, n_test=60)
        started = time.process_time()
        best = train(TrainConfig(data=[str(data)], out=str(root / "run"), cache_dir=str(root / "cache"), **kw))
        cap = Captioner.load(best)
        tests = sorted(n for n in boxes if n.startswith("test_"))
        caps = cap.caption([Image.open(data.parent / n).convert("RGB") for n in tests], beam=1)
        truth = {r.split(",")[0]: r.split(",")[1].split()[1:] for r in data.read_text().splitlines()[1:]}
        found = {kind: [_peak_in_box(c.attention[k], boxes[n]) for n, c in zip(tests, caps)
                        for k, w in enumerate(c.words) if w in words] for kind, words in (("colour", COLOURS), ("shape", SHAPES))}
        peak = np.mean([float(a.max() / a.sum()) for c in caps for a in c.attention])
        right = np.mean([c.words[1:] == truth[n] for n, c in zip(tests, caps)])
        print(f"{kw} | colour in box {sum(found['colour'])}/{len(found['colour'])} | shape in box "
              f"{sum(found['shape'])}/{len(found['shape'])} | peak {peak:.3f} | both right {right:.0%} | "
              f"{time.process_time() - started:.1f} s CPU")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
