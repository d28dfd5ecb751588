"""`captioner caption --compile` (captioner/runtime/compiled.py): the AOT-compiled encoder is built once into the cache,
reused, gives the eager encoder's features and captions, and fails with one clear line where it cannot work."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import picture

from captioner.pipeline.batch import read_rows
from captioner.cli.main import main
from captioner.runtime.compiled import CompiledEncoder
from captioner.pipeline.captioner import Captioner

torch.set_num_threads(1)
needs_cxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler (CI has g++)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def packages(cache):
    return sorted((cache / "aoti").glob("encoder-*.pt2"))


@needs_cxx
def test_compile_caption_matches_eager_and_reuses_the_package(tiny_model, good_folder, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONER_CACHE", str(cache))
    common = ["-q", "caption", str(good_folder), "--model", str(tiny_model), "--workers", "2", "--batch-size", "2"]
    assert main(common + ["-o", str(tmp_path / "eager.csv")]) == 0
    assert main(common + ["--compile", "-o", str(tmp_path / "compiled.csv")]) == 0
    (package,) = packages(cache)
    built = package.stat().st_mtime_ns
    assert main(common + ["--compile", "-o", str(tmp_path / "again.csv")]) == 0
    assert packages(cache) == [package] and package.stat().st_mtime_ns == built  # reused, not rebuilt
    eager, compiled = (read_rows(tmp_path / f"{n}.csv", "csv") for n in ("eager", "compiled"))
    assert len(eager) == len(compiled) > 0
    assert [r["caption"] for r in compiled] == [r["caption"] for r in eager]  # fp32 pixels encoder: exact
    assert read_rows(tmp_path / "again.csv", "csv") == compiled


@needs_cxx
def test_compiled_encoder_pickles_by_path_and_loads_lazily(tiny_model, cache, monkeypatch):
    import pickle

    monkeypatch.setenv("CAPTIONER_CACHE", str(cache))
    cap = Captioner.load(tiny_model)
    x = cap.preprocess([picture(i) for i in range(3)])
    eager = cap.encode(x)
    cap.compile_encoder()
    assert torch.allclose(cap.encode(x), eager, atol=1e-5)
    clone = pickle.loads(pickle.dumps(cap.compiled))  # what a spawned worker receives
    assert clone._model is None and clone.path == cap.compiled.path
    assert torch.allclose(clone(x), eager, atol=1e-5)


def test_compile_without_a_compiler_is_one_clear_error(tiny_model, good_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert main(["caption", str(good_folder), "--model", str(tiny_model), "--compile"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("captioner: error: --compile needs a C++ compiler (no-such-compiler not found")
    assert "Traceback" not in err and not (tmp_path / "empty-cache" / "aoti").exists()


@needs_cxx
def test_an_unwritable_cache_is_one_clear_error(tiny_model, good_folder, tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path / "a-file"))
    assert main(["caption", str(good_folder), "--model", str(tiny_model), "--compile"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("captioner: error: cannot write the compiled encoder to") and "CAPTIONER_CACHE" in err
    assert "Traceback" not in err


@needs_cxx
def test_a_damaged_package_is_one_clear_error(tiny_model, good_folder, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path))
    cap = Captioner.load(tiny_model)
    cap.compile_encoder()  # the tiny model's package name, then damage it
    cap.compiled.path.write_bytes(b"not a package")
    assert main(["caption", str(good_folder), "--model", str(tiny_model), "--compile", "--workers", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("captioner: error: cannot load the compiled encoder") and "delete it to rebuild" in err


@needs_cxx
def test_shipped_model_compiled_features_match_eager(tmp_path):
    """The real encoder (EfficientNet-Lite0, bf16 weights): same features to bf16 rounding."""
    cap = Captioner.load()
    x = cap.preprocess([picture(i, (320, 240)) for i in range(4)])
    eager = cap.encode(x)
    cap.compile_encoder(root=tmp_path)
    assert isinstance(cap.compiled, CompiledEncoder)
    compiled = cap.encode(x)
    assert compiled.shape == eager.shape and compiled.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(compiled.flatten(1), eager.flatten(1)).min() > 0.999
