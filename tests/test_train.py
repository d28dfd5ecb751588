"""Training on the synthetic shapes set: learns from the image, resumes after SIGKILL, runs
under torchrun with two CPU processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from synth import make_dataset

from captioner.model.checkpoint import load_checkpoint, save_checkpoint
from captioner.pipeline.captioner import Captioner
from captioner.training.evaluate import evaluate
from captioner.training.train import TrainConfig, train

SMALL = dict(encoder="pixels", pretrained=False, feat_proj=128, embed_dim=64, hidden_dim=128, attn_dim=64,
             dropout=0.1, alpha_c=0.1, min_count=1, lr=2e-3, batch_size=32, beam=1, lr_patience=3, num_workers=0)


def _cli_args(cfg: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shapes"), n_train=600, n_val=60, n_test=60)


def test_synthetic_model_learns_from_the_image(tmp_path, shapes):
    """BLEU-4 >= 0.5 on held-out images; the same model trained on blank images (image features carry
    nothing) stays far below. (No wall-clock limit: speed is measured in bench/, not asserted in tests.)"""
    best = train(TrainConfig(data=[str(shapes)], out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                             epochs=30, patience=30, **SMALL))
    cap = Captioner.load(best)
    res = evaluate(cap, [str(shapes)], "test", cache_dir=tmp_path / "cache", workers=0, beam=3)
    blank = make_dataset(tmp_path / "blank", n_train=600, n_val=60, n_test=60, blank=True)
    best_blank = train(TrainConfig(data=[str(blank)], out=str(tmp_path / "blank-run"), cache_dir=str(tmp_path / "cache"),
                                   epochs=10, patience=30, **SMALL))
    # the blank-trained model is scored on the real held-out images: it cannot tell them apart
    control = evaluate(Captioner.load(best_blank), [str(shapes)], "test", cache_dir=tmp_path / "cache", workers=0, beam=3)
    print(f"test BLEU-4 {res.scores['BLEU-4']:.3f} blank control {control.scores['BLEU-4']:.3f}")
    assert res.scores["BLEU-4"] >= 0.5
    assert control.scores["BLEU-4"] < res.scores["BLEU-4"] - 0.25
    assert len({p["caption"] for p in control.predictions}) <= 3  # a constant guess, whatever the image


def test_same_seed_same_weights(tmp_path, shapes):
    runs = []
    for name in ("a", "b"):
        best = train(TrainConfig(data=[str(shapes)], out=str(tmp_path / name), cache_dir=str(tmp_path / "cache"),
                                 epochs=1, seed=7, **SMALL))
        runs.append(load_checkpoint(best)["decoder"])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_streamed_views_train_the_same_weights_as_views_in_ram(tmp_path, shapes):
    """--ram-gb 0 reads each drawn view from the memory-mapped cache instead of a RAM copy: same batches, same
    view draws, bit-identical weights (2 epochs, 2 views, per-image and per-caption batches)."""
    for per_image in (True, False):
        runs = []
        for ram_gb in (4.0, 0.0):
            best = train(TrainConfig(data=[str(shapes)], out=str(tmp_path / f"{per_image}-{ram_gb}"),
                                     cache_dir=str(tmp_path / "cache"), epochs=2, patience=9, seed=5, views=2,
                                     per_image=per_image, ram_gb=ram_gb, **SMALL))
            runs.append(load_checkpoint(best.parent / "last.pt")["decoder"])
        assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_a_finished_run_resumes_as_done(tmp_path, shapes):
    """`make model` reruns `train --resume`: a run that already finished returns its best.pt untouched."""
    kw = dict(data=[str(shapes)], out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), epochs=1, **SMALL)
    best = train(TrainConfig(**kw))
    stamp = best.stat().st_mtime_ns, (best.parent / "last.pt").stat().st_mtime_ns
    assert train(TrainConfig(**kw), resume=True) == best
    assert (best.stat().st_mtime_ns, (best.parent / "last.pt").stat().st_mtime_ns) == stamp


def test_resume_with_another_recipe_is_one_error_and_a_longer_run_goes_on(tmp_path, shapes):
    """`captioner train --resume` with a flag that changes what is trained (here --lr, --seed) stops with one line
    naming it (exit 2, the run untouched); --epochs (and where and how fast it runs) may change: it goes on."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path / "home")}
    run = lambda epochs, *extra: subprocess.run(  # noqa: E731
        [sys.executable, *_train_cmd(shapes, out, cache, epochs, ["--batch-size=8", *extra])],
        capture_output=True, text=True, env=env, timeout=300)
    assert run(1).returncode == 0
    before = (out / "last.pt").read_bytes()
    for flag in (["--lr", "0.01"], ["--seed", "7"]):
        res = run(2, "--resume", *flag)
        assert res.returncode == 2, res.stderr[-2000:]
        err = res.stderr.strip().splitlines()[-1]
        assert err.startswith("captioner: error: --resume:") and flag[0] in err and "Traceback" not in res.stderr
        assert (out / "last.pt").read_bytes() == before
    res = run(2, "--resume", "--threads", "1")
    assert res.returncode == 0 and "resuming from" in res.stderr, res.stderr[-2000:]
    assert load_checkpoint(out / "last.pt")["train_state"]["epoch"] == 2


def test_ema_weights_are_validated_saved_and_resumed_exactly(tmp_path, shapes):
    """--ema: best.pt holds the averaged weights (not the raw ones), and a run stopped after epoch 1 and
    resumed ends with the same averaged and raw weights as an uninterrupted run."""
    kw = dict(data=[str(shapes)], cache_dir=str(tmp_path / "cache"), seed=3, ema=0.9, patience=50, **SMALL)
    full = train(TrainConfig(out=str(tmp_path / "full"), epochs=2, **kw))
    train(TrainConfig(out=str(tmp_path / "part"), epochs=1, **kw))
    train(TrainConfig(out=str(tmp_path / "part"), epochs=2, **kw), resume=True)
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "part" / "last.pt")
    for key in ("decoder",):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    raw_a, raw_b = a["train_state"]["raw"], b["train_state"]["raw"]
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)
    assert int(a["train_state"]["ema"]["n_averaged"]) == int(b["train_state"]["ema"]["n_averaged"]) > 1
    # the saved weights are the average: close to, but not the same as, the raw weights
    diff = max((a["decoder"][k] - raw_a[k]).abs().max().item() for k in raw_a if raw_a[k].is_floating_point())
    assert diff > 1e-4
    Captioner.load(full)


def test_text_only_captions_train_the_language(tmp_path):
    """--text-ratio: captions of training entries whose image is missing join the vocabulary and the
    batches (with a blank grid); val/test captions without images never do."""
    import csv

    from captioner.model.vocab import Vocab
    from captioner.training.data import load_dataset, load_text_only

    data = make_dataset(tmp_path / "d", n_train=60, n_val=12, n_test=6)
    with data.open("a", newline="") as f:
        w = csv.writer(f)
        for i in range(20):
            w.writerow([f"gone_{i}.png", f"a striped zebra {i % 3} beside a tall tree", "train"])
        w.writerow(["gone_val.png", "a giraffe eating leaves", "val"])
    assert len(load_dataset(str(data))) == 78  # the missing images are skipped
    assert len(load_text_only(str(data))) == 20
    cfg = dict(SMALL, epochs=2, patience=50)
    best = train(TrainConfig(data=[str(data)], out=str(tmp_path / "run"), cache_dir=str(tmp_path / "c"),
                             text_ratio=0.5, **cfg))
    ckpt = load_checkpoint(best)
    vocab = Vocab.from_dict({"itos": ckpt["vocab"]})
    assert "zebra" in vocab.stoi and "giraffe" not in vocab.stoi
    assert ckpt["config"]["data"]["text_only_captions"] == 20
    Captioner.load(best)


def _train_cmd(shapes: Path, out: Path, cache: Path, epochs: int, extra: list[str]) -> list[str]:
    cfg = {**SMALL, "epochs": epochs, "patience": 50, "cache_dir": cache, "out": out}
    return ["-m", "captioner", "train", "--data", str(shapes), *_cli_args(cfg), *extra]


def test_resume_after_sigkill_mid_epoch(tmp_path, shapes):
    out, cache = tmp_path / "run", tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *_train_cmd(shapes, out, cache, 4, ["--batch-size=8"])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while not (out / "last.pt").exists() and time.time() < deadline:  # epoch 1 written...
            time.sleep(0.05)
        time.sleep(0.5)  # ... and well into epoch 2
        assert proc.poll() is None, "training finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    done = load_checkpoint(out / "last.pt")["train_state"]["epoch"]
    assert 1 <= done < 4
    res = subprocess.run([sys.executable, *_train_cmd(shapes, out, cache, 4, ["--batch-size=8", "--resume"])],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming from" in res.stderr
    epochs = [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert epochs[-1] == 4 and sorted(set(epochs)) == [1, 2, 3, 4]
    assert load_checkpoint(out / "last.pt")["train_state"]["epoch"] == 4
    Captioner.load(out / "best.pt")
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temporaries behind


def _session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (the test starts the command in a session of its own)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: the session id
                pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to find the workers")
def test_sigterm_stops_the_command_and_its_workers(tmp_path, shapes):
    """`kill` / `timeout` send SIGTERM to the command alone: it stops as Ctrl-C does (exit 130, last.pt kept) and
    leaves no fork server or streaming DataLoader worker (--ram-gb 0) behind; they used to outlive it, orphaned."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "stderr.txt").open("w")  # a file: a full pipe would block the command
    proc = subprocess.Popen([sys.executable, *_train_cmd(shapes, out, cache, 50, ["--batch-size=8", "--ram-gb=0"])],
                            stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "last.pt").exists() and time.time() < deadline:  # workers running, epoch 1 written
            time.sleep(0.05)
        time.sleep(0.5)
        assert proc.poll() is None, "training finished before it could be stopped"
        assert len(_session_pids(proc.pid)) >= 3  # the command, the fork server, a DataLoader worker
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        left = _session_pids(proc.pid)
        deadline = time.time() + 20  # the workers' own exit, after the command's
        while left and time.time() < deadline:
            time.sleep(0.2)
            left = _session_pids(proc.pid)
    finally:
        for pid in _session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130, err[-2000:]
    assert "captioner: interrupted" in err and "Traceback" not in err
    assert not left, f"processes left behind: {left}"
    assert load_checkpoint(out / "last.pt")["train_state"]["epoch"] >= 1


def test_a_worker_whose_batch_hand_over_is_abandoned_prints_no_traceback():
    """Stopping the command while it receives a batch closes the connection of the worker's resource-sharer thread
    (the one that passes shared memory): the worker stays quiet about that, not about its other errors (the cause of
    an occasional traceback in the SIGTERM test above)."""
    code = ("import sys\nfrom captioner.runtime.workers import quiet_handover\nquiet_handover(0)\n"
            "for exc in (ConnectionResetError(104, 'reset'), EOFError(), BrokenPipeError(), ValueError('real')):\n"
            "    sys.excepthook(type(exc), exc, None)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "ValueError: real" in res.stderr
    assert "reset" not in res.stderr and "EOFError" not in res.stderr and "BrokenPipe" not in res.stderr


def test_torchrun_two_cpu_processes(tmp_path, shapes):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *_train_cmd(shapes, out, tmp_path / "cache", 2, [])]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("best checkpoint:") == 1  # rank 0 only
    cap = Captioner.load(out / "best.pt")
    assert cap.caption([__import__("PIL.Image").Image.new("RGB", (64, 64), "red")])[0].text
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]


def test_finetune_last_stage_on_cached_trunk_activations(tmp_path):
    """--finetune 1: the trunk is cached, the last stage + head conv train, the checkpoint
    carries those weights and Captioner.load puts them back."""
    data = make_dataset(tmp_path / "ft", n_train=24, n_val=8, n_test=0)
    cfg = {**SMALL, "encoder": "efficientnet_lite0", "pretrained": True, "finetune": 1, "feat_proj": 32,
           "epochs": 1, "batch_size": 8}
    best = train(TrainConfig(data=[str(data)], out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), **cfg))
    ckpt = load_checkpoint(best)
    tuned = ckpt["encoder"]
    assert tuned and all(k.split(".")[0] in ("blocks", "conv_head", "bn2") for k in tuned)
    assert all(k.startswith("blocks.6.") for k in tuned if k.startswith("blocks"))
    from captioner.model.encoder import Encoder, EncoderConfig

    fresh = Encoder(EncoderConfig("efficientnet_lite0")).net.state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in tuned.items() if v.is_floating_point())
    loaded = Captioner.load(best, prepare=False).encoder.net.state_dict()
    assert all(torch.equal(loaded[k].float(), v.float()) for k, v in tuned.items())
    cap = Captioner.load(best)  # prepared for inference: the tuned weights folded with their BatchNorms
    assert cap.caption([__import__("PIL.Image").Image.new("RGB", (64, 64), "red")])[0].text is not None
    from captioner.training.train import export

    small = load_checkpoint(export(best, tmp_path / "small.pt"))
    assert set(small["encoder"]) == set(tuned) and "train_state" not in small
    Captioner.load(tmp_path / "small.pt")
    # the model id (what metadata and libraries record) covers the tuned stage: another one is another model
    name = next(k for k, v in small["encoder"].items() if v.is_floating_point())
    small["encoder"][name] = small["encoder"][name] + 0.5
    save_checkpoint(tmp_path / "other.pt", small)
    assert Captioner.load(tmp_path / "other.pt").model_id != Captioner.load(tmp_path / "small.pt").model_id
    # the ONNX bundle (what `make model` ships) carries the tuned stage: its features are the checkpoint's
    from captioner.lite.captioner import LiteCaptioner
    from captioner.training.bundle import export_bundle

    export_bundle(tmp_path / "small.pt", tmp_path / "bundle")
    image = __import__("PIL.Image").Image.new("RGB", (90, 64), "orange")
    cap = Captioner.load(tmp_path / "small.pt", prepare=False)  # fp32, BatchNorm unfolded
    want = cap.encoder.encode(cap.preprocess([image]), bf16=False)[0].numpy()
    lite = LiteCaptioner.load(tmp_path / "bundle", threads=1)
    np.testing.assert_allclose(lite.encode(lite.preprocess([image])), want, atol=1e-3)
    package = Encoder(EncoderConfig("efficientnet_lite0")).encode(cap.preprocess([image]), bf16=False)[0].numpy()
    assert not np.allclose(package, want, atol=1e-3)  # the package's own last stage gives other features


def test_self_critical_training_goes_on_fine_tuning_from_a_fine_tuned_checkpoint(tmp_path):
    """`captioner train --init FINE_TUNED --scst true` (the command, fresh HOME): the checkpoint's fine-tuned stages
    come back and go on training on the same cached trunk activations (no new cache files); best.pt and last.pt
    carry them, --resume restores them, and a different --finetune count is one clear error."""
    data = make_dataset(tmp_path / "ft", n_train=16, n_val=8, n_test=0)
    cache = tmp_path / "cache"
    cfg = {**SMALL, "encoder": "efficientnet_lite0", "pretrained": True, "finetune": 1, "feat_proj": 32,
           "epochs": 1, "batch_size": 8}
    xe = train(TrainConfig(data=[str(data)], out=str(tmp_path / "xe"), cache_dir=str(cache), **cfg))
    start, cached = load_checkpoint(xe)["encoder"], sorted(cache.rglob("*"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path / "home")}
    base = ["-m", "captioner", "train", "--data", str(data), "--init", str(xe), "--scst", "true", "--cache-dir",
            str(cache), "--out", str(tmp_path / "scst"), "--batch-size", "8", "--lr", "1e-3", "--patience", "50",
            "--num-workers", "0", "--beam", "1"]
    run = lambda *extra: subprocess.run([sys.executable, *base, *extra], capture_output=True, text=True,  # noqa: E731
                                        env=env, timeout=300)
    res = run("--epochs", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(cache.rglob("*")) == cached  # the teacher-forced run's trunk cache, reused as it is
    last = load_checkpoint(tmp_path / "scst" / "last.pt")
    assert set(last["encoder"]) == set(start) and last["config"]["encoder"]["finetune"] == 1
    assert any(not torch.equal(last["encoder"][k], v) for k, v in start.items() if v.is_floating_point())
    assert set(load_checkpoint(tmp_path / "scst" / "best.pt")["encoder"]) == set(start)
    res = run("--epochs", "2", "--resume")
    assert res.returncode == 0 and "resuming from" in res.stderr, res.stderr[-2000:]
    log = [json.loads(line) for line in (tmp_path / "scst" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert any(not torch.equal(load_checkpoint(tmp_path / "scst" / "last.pt")["encoder"][k], v)
               for k, v in last["encoder"].items() if v.is_floating_point())  # epoch 2 went on from epoch 1's
    # `captioner evaluate` of either model from the one cache folder: each gets its own tuned stage's features
    from captioner.training.evaluate import _features, split_items

    items = split_items([str(data)], "val")[:3]
    images = [__import__("PIL.Image").Image.open(it.image).convert("RGB") for it in items]
    direct = []
    for ckpt in (xe, tmp_path / "scst" / "last.pt"):
        cap = Captioner.load(ckpt, prepare=False)
        cap.encoder.prepare_inference(cap.device, bf16=False)  # as the command does
        direct.append(cap.encode(cap.preprocess(images)).numpy())
        got = _features(cap, items, cache, 0)  # the second model reads the trunk cache the first one wrote
        np.testing.assert_allclose(got, direct[-1], atol=0.02)  # the cache holds fp16 trunk activations
    assert np.abs(direct[0] - direct[1]).max() > 0.5  # so a cache of either one's features would fail above
    res = run("--epochs", "1", "--finetune", "2", "--out", str(tmp_path / "other"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "has 1 fine-tuned encoder stages, not --finetune 2" in res.stderr
    # --finetune 1 with a frozen --init: fine-tuning starts there, from the package's weights
    frozen = train(TrainConfig(data=[str(data)], out=str(tmp_path / "frozen"), cache_dir=str(cache),
                               **{**cfg, "finetune": 0}))
    res = run("--epochs", "1", "--init", str(frozen), "--finetune", "1", "--scst", "false", "--out", str(tmp_path / "ft"))
    assert res.returncode == 0, res.stderr[-2000:]
    ft = load_checkpoint(tmp_path / "ft" / "last.pt")
    assert set(ft["encoder"]) == set(start) and ft["config"]["encoder"]["finetune"] == 1
    assert ft["vocab"] == load_checkpoint(frozen)["vocab"]


def test_sampled_captions_and_their_log_probabilities():
    """scst.sample: k draws per image from the decoder's own distribution (<pad>/<start>/<unk> never drawn,
    <end> forced after max_len words); the log-probabilities it returns are those teacher forcing gives the same
    words, and the mask covers each caption up to and including its first <end>."""
    from captioner.model.decoder import Decoder, DecoderConfig
    from captioner.model.vocab import Vocab
    from captioner.training.scst import sample

    torch.manual_seed(0)
    vocab = Vocab(["<pad>", "<start>", "<end>", "<unk>", *[f"w{i}" for i in range(8)]])
    dec = Decoder(DecoderConfig(len(vocab), 12, 8, 8, 16, 8, dropout=0.0)).eval()
    feats = torch.randn(3, 4, 12)
    words, logp, mask = sample(dec, feats, 4, 5, vocab, torch.Generator().manual_seed(1))
    again, _, _ = sample(dec, feats, 4, 5, vocab, torch.Generator().manual_seed(1))
    assert torch.equal(words, again) and words.shape[0] == 12 and words.shape[1] <= 6
    assert not torch.isin(words, torch.tensor([vocab.pad, vocab.start, vocab.unk])).any()
    assert len({tuple(r) for r in words.tolist()}) > 1  # draws, not a deterministic decode
    for row, m in zip(words.tolist(), mask.tolist()):
        assert vocab.end in row  # every caption ends, by max_len at the latest
        assert m == [1.0] * (row.index(vocab.end) + 1) + [0.0] * (len(row) - row.index(vocab.end) - 1)
    caps = torch.cat([torch.full((12, 1), vocab.start), words], 1)
    logits, _ = dec(feats.repeat_interleave(4, 0), caps)
    logits[:, :, [vocab.pad, vocab.start, vocab.unk]] = float("-inf")
    if logits.shape[1] == 6:  # after max_len words only <end> is allowed
        logits[:, 5] = torch.where(torch.arange(len(vocab)) == vocab.end, 0.0, float("-inf"))
    expected = torch.log_softmax(logits, -1).gather(2, words.unsqueeze(2)).squeeze(2)
    assert torch.allclose(logp * mask, expected * mask, atol=1e-5)
    logp.sum().backward()  # gradients flow to the decoder
    assert dec.L_o.bias.grad is not None and dec.L_o.bias.grad.abs().sum() > 0


def test_self_critical_training_from_init(tmp_path, shapes, monkeypatch):
    """--init + --scst: epoch 0 validates the starting weights (best.pt holds them until beaten), the
    samples' mean CIDEr-D reward rises, and the decoder, vocabulary and encoder come from the checkpoint;
    samples are drawn with dropout off (the default --scst-dropout false)."""
    import captioner.training.scst as scst

    modes, draw = [], scst.sample
    monkeypatch.setattr(scst, "sample", lambda decoder, *a, **k: modes.append(decoder.training) or draw(decoder, *a, **k))
    kw = dict(data=[str(shapes)], cache_dir=str(tmp_path / "cache"), seed=0, **{**SMALL, "beam": 1})
    xe = train(TrainConfig(out=str(tmp_path / "xe"), epochs=3, patience=50, **kw))
    start = load_checkpoint(xe)
    kw.update(hidden_dim=32, encoder="unknown-is-not-used", lr=5e-4)  # the first two come from the checkpoint
    best = train(TrainConfig(out=str(tmp_path / "scst"), init=str(xe), scst=True, epochs=4, patience=50, **kw))
    log = [json.loads(line) for line in (tmp_path / "scst" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2, 3, 4] and log[0]["reward"] is None
    assert log[0]["val_BLEU-4"] == pytest.approx(start["config"]["val"]["val_BLEU-4"], abs=1e-4)
    rewards = [r["reward"] for r in log[1:]]
    print("rewards", rewards, "val BLEU-4", [r["val_BLEU-4"] for r in log])
    assert rewards[-1] > rewards[0] + 0.1
    assert max(r["val_BLEU-4"] for r in log[1:]) > log[0]["val_BLEU-4"]  # held-out captions improve too
    ckpt = load_checkpoint(best)
    assert ckpt["vocab"] == start["vocab"] and ckpt["config"]["decoder"] == start["config"]["decoder"]
    best_epoch = max(log, key=lambda r: r["val_BLEU-4"])["epoch"]
    assert ckpt["config"]["val"]["epoch"] == best_epoch
    if best_epoch == 0:
        assert all(torch.equal(ckpt["decoder"][k], start["decoder"][k]) for k in start["decoder"])
    Captioner.load(best)
    # stopped after epoch 2 and resumed: the same samples, rewards and weights as the uninterrupted run
    part = dict(out=str(tmp_path / "part"), init=str(xe), scst=True, patience=50, **kw)
    train(TrainConfig(epochs=2, **part))
    train(TrainConfig(epochs=4, **part), resume=True)
    a, b = load_checkpoint(tmp_path / "scst" / "last.pt"), load_checkpoint(tmp_path / "part" / "last.pt")
    assert all(torch.equal(a["decoder"][k], b["decoder"][k]) for k in a["decoder"])
    assert modes and not any(modes)


def test_select_cider_picks_the_epoch_with_the_best_cider(tmp_path, shapes):
    """--select cider: best.pt is the epoch with the highest validation CIDEr-D (the LR schedule and early
    stopping follow it too), not the one with the highest BLEU-4."""
    kw = dict(data=[str(shapes)], cache_dir=str(tmp_path / "cache"), seed=0, **{**SMALL, "beam": 1})
    best = train(TrainConfig(out=str(tmp_path / "c"), epochs=4, patience=50, select="cider", **kw))
    log = [json.loads(line) for line in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    assert load_checkpoint(best)["config"]["val"]["epoch"] == max(log, key=lambda r: r["val_CIDEr-D"])["epoch"]


def test_end_in_the_reward_marks_a_fragment():
    """--scst-end (the default): <end> is a word of the caption and of its references, so a caption that stops
    mid-phrase loses the n-grams that end a reference, and scores lower against the full caption than without."""
    from captioner.model.vocab import END, Vocab, tokenize
    from captioner.training.metrics import CiderD
    from captioner.training.scst import rewards

    refs = [["a red circle above a blue square", "a red circle above the blue square"],
            ["a green triangle left of a yellow circle", "a green triangle next to a yellow circle"]]
    vocab = Vocab.build([c for rs in refs for c in rs])
    caps = ["a red circle above a blue square", "a red circle above a"]  # image 0: whole, a fragment
    ids = [vocab.encode(c)[1:] for c in caps]
    words = torch.tensor([row + [vocab.pad] * (9 - len(row)) for row in ids])
    plain = rewards(words, [0], 2, vocab, CiderD([[tokenize(c) for c in rs] for rs in refs]))
    ended = rewards(words, [0], 2, vocab, CiderD([[tokenize(c) + [END] for c in rs] for rs in refs]), end=True)
    assert ended[0, 0] > ended[0, 1] and plain[0, 0] > plain[0, 1]
    assert ended[0, 1] / ended[0, 0] < plain[0, 1] / plain[0, 0]  # the fragment is marked down


def test_rewards_are_cider_d_plus_weighted_bleu():
    from captioner.model.vocab import Vocab, tokenize
    from captioner.training.metrics import CiderD, coco_bleu
    from captioner.training.scst import rewards

    refs = [["a red circle above a blue square", "a blue square below a red circle"],
            ["a green triangle left of a yellow circle", "a yellow circle right of a green triangle"]]
    vocab = Vocab.build([c for rs in refs for c in rs])
    cider = CiderD([[tokenize(c) for c in rs] for rs in refs])
    caps = ["a red circle above a blue square", "a red circle above a green triangle",  # image 0: right, half right
            "a green triangle left of a yellow circle", "a red circle above a blue square"]  # image 1: right, wrong
    ids = [vocab.encode(c)[1:] for c in caps]  # no <start>; words, <end>, then padding
    words = torch.tensor([row + [vocab.pad] * (9 - len(row)) for row in ids])
    plain = rewards(words, [0, 1], 2, vocab, cider)
    assert plain.shape == (2, 2)
    assert plain[0, 0] > plain[0, 1] > 0 and plain[1, 0] > plain[1, 1]
    assert plain[0, 1] == pytest.approx(cider.score(tokenize(caps[1]), 0))
    mixed = rewards(words, [0, 1], 2, vocab, cider, bleu_weight=2.0)
    bleu = coco_bleu([tokenize(caps[1])], [cider.tokens[0]])[3]
    assert 0.1 < bleu < 1 and mixed[0, 1] == pytest.approx(plain[0, 1] + 2.0 * bleu)
    assert mixed[0, 0] == pytest.approx(plain[0, 0] + 2.0)  # a reference itself: BLEU-4 1
