"""The feature cache: keyed by each file's content (a digest remembered by path, size and mtime), so a cache built
before a file changes is never reused after it, and one built before a dataset was copied, moved or touched is; and filled in fp32 on every CPU, so training and evaluation numbers do not move
with the CPU's vector ISA."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import picture

from captioner.model import encoder as encoder_module
from captioner.training.data import DIGESTS, cache_features, content_digests
from captioner.model.encoder import Encoder, EncoderConfig, image_transform


@pytest.fixture()
def pixels():
    return Encoder(EncoderConfig("pixels", pretrained=False))


def _images(folder, n=3):
    folder.mkdir()
    paths = [folder / f"{i}.png" for i in range(n)]
    for i, p in enumerate(paths):
        picture(i).save(p)
    return paths


def test_a_changed_image_gets_new_features(tmp_path, pixels):
    paths = _images(tmp_path / "img")
    cache = tmp_path / "cache"
    before = np.array(cache_features(paths, pixels, image_transform("pixels"), cache, num_workers=0))
    again = np.array(cache_features(paths, pixels, image_transform("pixels"), cache, num_workers=0))
    assert np.array_equal(before, again) and len(list(cache.glob("*.npy"))) == 1  # reused while unchanged

    picture(7).save(paths[1])  # re-saved in place under the same name
    after = np.array(cache_features(paths, pixels, image_transform("pixels"), cache, num_workers=0))
    assert len(list(cache.glob("*.npy"))) == 2  # a new cache, the stale one is not read
    assert np.array_equal(after[0], before[0]) and np.array_equal(after[2], before[2])
    assert not np.array_equal(after[1], before[1])


def test_a_rewrite_of_the_same_size_with_other_bytes_gets_new_features(tmp_path, pixels):
    """An uncompressed BMP re-saved with another picture: same name and size, other bytes (and mtime)."""
    (tmp_path / "img").mkdir()
    paths = [tmp_path / "img" / f"{i}.bmp" for i in range(2)]
    for i, p in enumerate(paths):
        picture(i).save(p)
    cache = tmp_path / "cache"
    first = np.array(cache_features(paths, pixels, image_transform("pixels"), cache, num_workers=0))
    size = os.path.getsize(paths[0])
    picture(9).save(paths[0])
    assert os.path.getsize(paths[0]) == size
    second = np.array(cache_features(paths, pixels, image_transform("pixels"), cache, num_workers=0))
    assert len(list(cache.glob("feats-*.npy"))) == 2 and not np.array_equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])


def _no_encoding(encoder, monkeypatch):
    def refuse(images):
        raise AssertionError("encoded again")
    monkeypatch.setattr(encoder, "encode_cached", refuse)


def test_a_copied_moved_or_touched_dataset_keeps_its_features(tmp_path, pixels, monkeypatch):
    """The same bytes under new paths and new mtimes (a dataset copied to another disk, re-provisioned, unpacked
    again, or merely touched) find the cache: its files are read once to check, nothing is encoded again."""
    import shutil

    paths = _images(tmp_path / "img", n=3)
    cache = tmp_path / "cache"
    first = np.array(cache_features(paths, pixels, image_transform("pixels"), cache, num_workers=0))
    (tmp_path / "copy").mkdir()
    copies = [Path(shutil.copyfile(p, tmp_path / "copy" / p.name)) for p in paths]  # new files, new mtimes
    for p in paths:
        os.utime(p, ns=(os.stat(p).st_atime_ns, os.stat(p).st_mtime_ns + 5_000_000_000))
    _no_encoding(pixels, monkeypatch)
    for files in (copies, paths):
        again = np.array(cache_features(files, pixels, image_transform("pixels"), cache, num_workers=0))
        assert np.array_equal(again, first)
    assert len(list(cache.glob("feats-*.npy"))) == 1
    index = json.loads((cache / DIGESTS).read_text())
    assert {os.path.abspath(p) for p in [*paths, *copies]} <= set(index)


def test_the_digest_index_is_only_stat_checked_and_rebuilt_when_damaged(tmp_path, pixels, monkeypatch):
    """Unchanged files are not read again (the index answers by size and mtime); a damaged index is rebuilt from
    the files, and the features are still found."""
    from captioner.training import data as data_module

    paths = _images(tmp_path / "img", n=2)
    cache = tmp_path / "cache"
    first = np.array(cache_features(paths, pixels, image_transform("pixels"), cache, num_workers=0))
    read = []
    digest = data_module._digest
    monkeypatch.setattr(data_module, "_digest", lambda p: read.append(p) or digest(p))
    assert content_digests(paths, cache) and read == []
    (cache / DIGESTS).write_text("{not json")
    _no_encoding(pixels, monkeypatch)
    assert np.array_equal(np.array(cache_features(paths, pixels, image_transform("pixels"), cache, num_workers=0)), first)
    assert read == paths and len(json.loads((cache / DIGESTS).read_text())) == 2


def test_a_cache_written_before_content_keys_is_renamed_not_encoded_again(tmp_path, pixels, monkeypatch):
    """Caches from earlier versions (keyed by path, size and mtime) whose files are unchanged are adopted under
    their content key: the hours of encoding a large set are not lost to an upgrade."""
    from captioner.training.data import _legacy_key

    paths = _images(tmp_path / "img", n=2)
    cache = tmp_path / "cache"
    cache.mkdir()
    old = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float16)
    legacy = cache / f"feats-{_legacy_key(paths, pixels.cache_identity(), 0)}.npy"
    np.save(legacy, old)
    _no_encoding(pixels, monkeypatch)
    got = np.array(cache_features(paths, pixels, image_transform("pixels"), cache, num_workers=0))
    assert np.array_equal(got, old) and not legacy.exists() and len(list(cache.glob("feats-*.npy"))) == 1


def _at_second_batch(encoder, monkeypatch, action) -> list:
    """Run action() when `encoder` is asked for its second batch (the temporary cache file exists after the first);
    returns the list of calls made."""
    encode, calls = encoder.encode_cached, []

    def wrapped(images):
        calls.append(1)
        if len(calls) == 2:
            action()
        return encode(images)

    monkeypatch.setattr(encoder, "encode_cached", wrapped)
    return calls


def test_a_cache_file_removed_mid_write_is_one_clear_error(tmp_path, pixels, monkeypatch):
    """The cache folder cleaned while a run writes into it: a CaptionerError naming the file (one line from the
    CLI), not os.replace's FileNotFoundError traceback; nothing half-written is left as the cache."""
    from captioner.errors import CaptionerError

    paths = _images(tmp_path / "img", n=2)
    cache = tmp_path / "cache"

    def clean():
        for f in cache.glob("*.tmp*.npy"):
            f.unlink()

    calls = _at_second_batch(pixels, monkeypatch, clean)
    with pytest.raises(CaptionerError, match="disappeared while it was being written"):
        cache_features(paths, pixels, image_transform("pixels"), cache, batch_size=1, num_workers=0)
    assert len(calls) == 2 and not list(cache.glob("*.npy"))


def test_cached_features_are_fp32_whatever_the_cpu(monkeypatch):
    """Training and `captioner evaluate` cache features from a BatchNorm-folded fp32 network: the same on a CPU
    with AMX / AVX512-BF16 as on one without (no bf16 autocast sneaks in); the bf16 inference path is cached apart."""
    images = torch.stack([image_transform()(picture(i, (256, 256))) for i in range(2)])
    feats = {}
    for fast in (False, True):
        monkeypatch.setattr(encoder_module, "cpu_has_fast_bf16", lambda fast=fast: fast)
        enc = Encoder(EncoderConfig()).prepare_inference(torch.device("cpu"), bf16=False)
        assert enc.cache_identity()["prepared"] == "float32"
        feats[fast] = enc.encode_cached(images)
    assert feats[False].dtype == torch.float32 and torch.equal(feats[False], feats[True])
    plain = Encoder(EncoderConfig())(images)[0]
    assert torch.allclose(feats[False], plain, rtol=1e-3, atol=1e-3)  # folding BN changes only rounding
    bf16 = Encoder(EncoderConfig()).prepare_inference(torch.device("cpu"), bf16=True)
    assert bf16.cache_identity() != enc.cache_identity()


def test_torchrun_shards_the_cache_and_merges_it_into_the_single_process_file(tmp_path):
    """`captioner cache` under torchrun (2 processes, gloo): each rank encodes its shard (seeded random views
    included), rank 0 merges them into the same file, bit for bit, as one process writes; no shards are left."""
    import subprocess
    import sys

    from synth import make_dataset

    data = make_dataset(tmp_path / "shapes", n_train=37, n_val=9, n_test=5)
    args = ["-m", "captioner", "-q", "cache", "--data", str(data), "--encoder", "pixels", "--views", "3", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, "--cache-dir", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *args, "--cache-dir", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=180)
    assert two.returncode == 0, two.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(files) == 3 + 1 + 1 + 1  # train views, val, test; the digest index
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == files  # same keys, no shard or temporary left
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_streamed_rows_equal_the_memory_map_and_refuse_a_truncated_cache(tmp_path):
    """Training streams a large cache with os.preadv (FileRows), row by row: the same values as the memory map,
    writable rows, a picklable reader (DataLoader workers), and one clear error when the file was cut short."""
    import pickle

    from captioner.training.data import CaptionPairs, FileRows
    from captioner.errors import CaptionerError

    path = tmp_path / "feats.npy"
    data = np.random.default_rng(0).standard_normal((7, 4, 3)).astype(np.float16)
    np.save(path, data)
    mapped = np.load(path, mmap_mode="r")
    rows = FileRows(mapped)
    assert len(rows) == 7
    for i in (0, 3, 6):
        assert np.array_equal(rows[i], data[i]) and rows[i].flags.writeable
    assert np.array_equal(pickle.loads(pickle.dumps(rows))[5], data[5])
    pairs = CaptionPairs([mapped], [[[1, 2]]] * 7, in_ram=False)
    assert isinstance(pairs.views[0], FileRows) and torch.equal(pairs.view(2), torch.from_numpy(data[2]))
    assert isinstance(CaptionPairs([data], [[[1, 2]]] * 7, in_ram=False).views[0], np.ndarray)  # not a file: as is
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 5)
    with pytest.raises(CaptionerError, match="truncated feature cache"):
        FileRows(mapped)[6]


def test_an_interrupted_cache_write_leaves_no_temporary_file(tmp_path, pixels, monkeypatch):
    """Ctrl-C or SIGTERM (which the CLI turns into KeyboardInterrupt) mid-cache: the half-written temporary file,
    as large as the whole cache, is removed; the next run starts the cache afresh and completes it."""
    paths = _images(tmp_path / "img", n=3)
    cache = tmp_path / "cache"
    encode = pixels.encode_cached

    def interrupt():
        assert list(cache.glob("*.tmp*.npy"))
        raise KeyboardInterrupt

    calls = _at_second_batch(pixels, monkeypatch, interrupt)
    with pytest.raises(KeyboardInterrupt):
        cache_features(paths, pixels, image_transform("pixels"), cache, batch_size=1, num_workers=0)
    assert len(calls) == 2 and not list(cache.glob("*.npy"))
    monkeypatch.setattr(pixels, "encode_cached", encode)
    assert np.array(cache_features(paths, pixels, image_transform("pixels"), cache, num_workers=0)).shape[0] == 3


def test_cache_command_fills_the_trunk_cache_that_fine_tuning_reads(tmp_path):
    """`captioner cache --finetune 1` (the command, fresh HOME) caches what `train --finetune 1` reads: the run
    then encodes nothing (no new cache files)."""
    import subprocess
    import sys

    from synth import make_dataset

    from captioner.training.train import TrainConfig, train

    data, cache = make_dataset(tmp_path / "d", n_train=8, n_val=4, n_test=0), tmp_path / "cache"
    res = subprocess.run([sys.executable, "-m", "captioner", "cache", "--data", str(data), "--finetune", "1",
                          "--views", "2", "--cache-dir", str(cache), "--workers", "0"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path / "home")})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "train: 2 view(s) of 8 images" in res.stdout
    cached = sorted(cache.rglob("*"))
    train(TrainConfig(data=[str(data)], out=str(tmp_path / "run"), cache_dir=str(cache), encoder="efficientnet_lite0",
                      finetune=1, views=2, epochs=1, feat_proj=32, embed_dim=32, hidden_dim=32, attn_dim=32,
                      batch_size=8, min_count=1, num_workers=0, beam=1))
    assert sorted(cache.rglob("*")) == cached
