"""The ONNX Runtime backend (issue 18; captioner/runtime/onnx_encoder.py, onnx_decoder.py, backends.py): the exports give
the prepared fp32 encoder's features, the decoder step's outputs and the same captions, are built once into the
cache and rebuilt when damaged or stale,
`--backend` / `--int8` work through the CLI, `auto` measures once and keeps its answer, `captioner info` reports
it. All at one thread; behaviour only, never wall-clock time."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from conftest import picture

from captioner.runtime import backends
from captioner.pipeline.batch import read_rows
from captioner.cli.main import main
from captioner.pipeline.captioner import Captioner
from captioner.runtime.onnx_decoder import OnnxDecoder
from captioner.runtime.onnx_encoder import OnnxEncoder, export_path, int8_path, problem

torch.set_num_threads(1)
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: the shipped model is exported once (~15 s), then reused."""
    path = tmp_path_factory.mktemp("onnx-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAPTIONER_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def shipped_onnx(cache):
    return Captioner.load(backend="onnx")


@pytest.fixture
def fp32_cpu(monkeypatch):
    """torch as it runs on a CPU without fast bf16 (the AVX2 EPYC of issue 18): fp32 weights, no autocast."""
    monkeypatch.setattr("captioner.cpu.has_fast_bf16", lambda: False)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for i in range(6):
        picture(i, (320, 240)).save(folder / f"p{i}.jpg")
    return folder


def fp32_reference(images: torch.Tensor) -> torch.Tensor:
    """The shipped encoder, BatchNorm folded, fp32, no autocast: what the export must reproduce."""
    cap = Captioner.load(prepare=False)
    cap.encoder.prepare_inference(cap.device, bf16=False)
    with torch.no_grad():
        return cap.encoder.forward_prepared(images)[0]


def test_shipped_model_onnx_features_match_torch(shipped_onnx):
    """cos > 0.9999 against the prepared fp32 torch network; max abs diff 3.1e-5 here (AMD EPYC, onnxruntime 1.32,
    torch 2.14; features of magnitude ~10), in the message if it fails. The record beside the export names its
    SHA-256 and the versions."""
    assert shipped_onnx.backend == "onnx" and isinstance(shipped_onnx.compiled, OnnxEncoder)
    x = shipped_onnx.preprocess([picture(i, (320, 240)) for i in range(4)])
    onnx, ref = shipped_onnx.encode(x), fp32_reference(x)
    assert onnx.shape == ref.shape == (4, 49, 1280) and onnx.dtype == torch.float32
    diff = float((onnx - ref).abs().max())
    cos = float(torch.nn.functional.cosine_similarity(onnx.flatten(1), ref.flatten(1)).min())
    assert cos > 0.9999 and diff < 1e-3, f"max abs diff {diff:.2e}, min cosine {cos:.6f}"
    path = shipped_onnx.compiled.path
    assert problem(path) is None and json.loads(path.with_suffix(".json").read_text())["input"] == [3, 224, 224]


def test_captions_are_identical_torch_and_onnx(shipped_onnx, fp32_cpu):
    images = [picture(i, (320, 240)) for i in range(6)]
    torch_cap = Captioner.load(backend="torch")
    assert torch_cap.backend == "torch" and torch_cap.encoder.weights_dtype == torch.float32
    assert [c.text for c in shipped_onnx.caption(images)] == [c.text for c in torch_cap.caption(images)]


def test_backend_flag_through_the_cli(shipped_onnx, fp32_cpu, photos, tmp_path):
    """--backend onnx and --backend torch give the same rows, with workers (each makes its own session)."""
    common = ["-q", "caption", str(photos), "--workers", "2", "--batch-size", "2"]
    for backend in ("onnx", "torch"):
        assert main(common + ["--backend", backend, "-o", str(tmp_path / f"{backend}.csv")]) == 0
    rows = {b: read_rows(tmp_path / f"{b}.csv", "csv") for b in ("onnx", "torch")}
    assert len(rows["onnx"]) == 6 and [r["caption"] for r in rows["onnx"]] == [r["caption"] for r in rows["torch"]]


def test_shipped_decoder_step_in_onnx_matches_torch(shipped_onnx):
    """The onnx step's logits, state and attention against the torch decoder's on the same inputs (max abs diff
    ~4e-6 here on logits of magnitude ~10), and the same captions from the same features, greedy and beam 3."""
    assert shipped_onnx.decoder_backend == "onnx" and isinstance(shipped_onnx.step_decoder, OnnxDecoder)
    feats = shipped_onnx.encode(shipped_onnx.preprocess([picture(i, (320, 240)) for i in range(6)]))
    a, keys, state = shipped_onnx.decoder.prepare(feats)
    words = torch.tensor([1, 5, 9, 40, 300, 2000])
    with torch.no_grad():
        ref = shipped_onnx.decoder.step(words, a, keys, state)
    out = shipped_onnx.step_decoder.step(words, a, keys, state)
    for name, x, y in (("logits", out[0], ref[0]), ("h", out[1][0], ref[1][0]), ("c", out[1][1], ref[1][1]),
                       ("alpha", out[2], ref[2])):
        diff = float((x - y).abs().max())
        assert x.shape == y.shape and diff < 1e-4, f"{name}: max abs diff {diff:.2e}"
    onnx_step = shipped_onnx.step_decoder
    for beam in (1, 3):
        cfg = shipped_onnx.search_config(beam=beam)
        onnx = [c.text for c in shipped_onnx.caption_features(feats, cfg)]
        shipped_onnx.step_decoder = shipped_onnx.decoder
        try:
            assert onnx == [c.text for c in shipped_onnx.caption_features(feats, cfg)]
        finally:
            shipped_onnx.step_decoder = onnx_step


def test_info_measures_once_and_names_the_backend(shipped_onnx, capsys):
    assert main(["info", "--measure"]) == 0
    out = capsys.readouterr().out
    enc = next(x for x in out.splitlines() if x.startswith("encoder backend (auto): "))
    dec = next(x for x in out.splitlines() if x.startswith("decoder backend (auto): "))
    chosen, chosen_decoder = enc.split()[3], dec.split()[3]
    assert chosen in ("torch", "onnx") and "torch" in enc and "ms/img" in enc, out
    assert chosen_decoder in ("torch", "onnx") and "a step of 24 rows" in dec, out
    for needed in ("cpu: ", "vector ISA: ", "fast bf16: ", "versions: torch", "onnxruntime", "model: "):
        assert needed in out, needed
    record = json.loads(backends.choice_path(shipped_onnx).read_text())
    assert record["backend"] == chosen and set(record["ms_per_image"]) == {"torch", "onnx"}
    assert record["decoder"] == chosen_decoder and set(record["decoder_ms_per_step"]) == {"torch", "onnx"}
    assert main(["info"]) == 0  # read back, not measured again
    assert enc in capsys.readouterr().out
    again = Captioner.load(backend="auto")
    assert (again.backend, again.decoder_backend) == (chosen, chosen_decoder)


def test_info_without_a_network_or_a_model(tiny_model, tmp_path, capsys):
    assert main(["info", "--model", str(tiny_model)]) == 0
    out = capsys.readouterr().out
    assert "encoder backend (auto): torch (the pixels encoder has no network to speed up)" in out
    assert "decoder backend (auto): torch (the decoder (" in out and "too small to pay for its export" in out
    assert main(["info", "--model", str(tmp_path / "missing.pt")]) == 0
    out = capsys.readouterr().out
    assert "cannot be loaded: model file not found" in out and "cpu: " in out


def test_auto_measures_once_and_keeps_the_answer(tiny_model, tmp_path, monkeypatch):
    """The measurements themselves are stubbed (no timing in tests): their answer is kept as JSON, and read back;
    each network gets its own answer."""
    monkeypatch.setattr(backends, "_fixed", lambda cap: (None, None))
    monkeypatch.setattr(backends, "measure", lambda cap, onnx: {"torch": 2.0, "onnx": 1.0})
    monkeypatch.setattr(backends, "measure_decoder", lambda cap, onnx: {"torch": 1.0, "onnx": 3.0})
    cap = Captioner.load(tiny_model, prepare=False)
    assert backends.use_backend(cap, "auto", root=tmp_path) == "onnx" and isinstance(cap.compiled, OnnxEncoder)
    assert cap.decoder_backend == "torch" and cap.step_decoder is cap.decoder
    (record,) = (tmp_path / "backend").glob("choice-*.json")
    saved = json.loads(record.read_text())
    assert saved["ms_per_image"] == {"torch": 2.0, "onnx": 1.0} and saved["decoder_ms_per_step"]["onnx"] == 3.0

    def never(cap, onnx):
        raise AssertionError("measured twice")

    monkeypatch.setattr(backends, "measure", never)
    monkeypatch.setattr(backends, "measure_decoder", never)
    again = Captioner.load(tiny_model, prepare=False)
    assert backends.use_backend(again, "auto", root=tmp_path) == "onnx" and again.decoder_backend == "torch"
    monkeypatch.setattr(backends, "measure", lambda cap, onnx: {"torch": 1.0, "onnx": 0.99})  # within the margin
    monkeypatch.setattr(backends, "measure_decoder", lambda cap, onnx: {"torch": 2.0, "onnx": 1.0})
    record.unlink()
    third = Captioner.load(tiny_model, prepare=False)
    assert backends.use_backend(third, "auto", root=tmp_path) == "torch"
    assert third.decoder_backend == "onnx" and isinstance(third.step_decoder, OnnxDecoder)


@pytest.mark.parametrize("damage,network", [("truncate", "encoder"), ("overwrite", "encoder"), ("record", "encoder"),
                                            ("stale", "encoder"), ("truncate", "decoder"), ("overwrite", "decoder")])
def test_a_damaged_or_stale_export_is_rebuilt(damage, network, tiny_model, good_folder, tmp_path, monkeypatch, capsys,
                                              caplog):
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path))
    cap = Captioner.load(tiny_model, backend="onnx")
    path = (cap.compiled if network == "encoder" else cap.step_decoder).path
    good = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "overwrite":  # same size, some bytes changed: only the SHA-256 tells
        path.write_bytes(good[:100] + bytes(255 - b for b in good[100:200]) + good[200:])
    elif damage == "record":
        path.with_suffix(".json").unlink()
    else:
        record = json.loads(path.with_suffix(".json").read_text())
        path.with_suffix(".json").write_text(json.dumps(record | {"onnxruntime": "0.0.1"}))
    assert problem(path) is not None
    capsys.readouterr()
    assert main(["caption", str(good_folder), "--model", str(tiny_model), "--backend", "onnx", "--workers", "0"]) == 0
    captured = capsys.readouterr()
    assert "exporting it again" in caplog.text and "Traceback" not in captured.err
    assert problem(path) is None and len(captured.out.splitlines()) == 5


def test_onnx_networks_pickle_by_path(tiny_model, tmp_path):
    cap = Captioner.load(tiny_model, prepare=False)
    backends.use_backend(cap, "onnx", root=tmp_path)
    x = cap.preprocess([picture(i) for i in range(3)])
    clone = pickle.loads(pickle.dumps(cap.compiled))  # what a spawned worker receives
    assert clone._session is None and clone.path == cap.compiled.path
    assert torch.equal(clone(x), cap.encode(x))
    step = pickle.loads(pickle.dumps(cap.step_decoder))
    assert step._session is None and step.path == cap.step_decoder.path
    feats = cap.encode(x)
    assert [c.text for c in cap.caption_features(feats)] == [c.text for c in Captioner.load(tiny_model).caption_features(feats)]
    cap.step_decoder = step
    assert [c.text for c in cap.caption_features(feats)] == [c.text for c in Captioner.load(tiny_model).caption_features(feats)]


def test_usage_and_cache_errors_are_one_clear_line(tiny_model, good_folder, tmp_path, monkeypatch, capsys):
    base = ["caption", str(good_folder), "--model", str(tiny_model)]
    assert main(base + ["--int8", "--backend", "torch"]) == 2
    assert "--int8 is for the onnx backend" in capsys.readouterr().err
    assert main(base + ["--compile", "--backend", "onnx"]) == 2
    assert "--compile is --backend compiled" in capsys.readouterr().err
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path / "empty"))
    assert main(base + ["--int8"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("captioner: error: --int8: no int8 encoder for this model yet") and "calibrate" in err
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path / "a-file"))
    assert main(base + ["--backend", "onnx"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("captioner: error: cannot write ONNX models to") and "CAPTIONER_CACHE" in err
    assert "Traceback" not in err


def test_int8_calibrates_on_real_images_and_encodes(shipped_onnx, photos, tmp_path, capsys):
    """A tiny calibration set (4 of the 6 photos, spread): the int8 model is stored beside the fp32 export, gives
    features of the fp32 shape, and `caption --int8` runs it; a damaged int8 file is refused, not rebuilt."""
    assert main(["calibrate", str(photos), "--count", "4"]) == 0
    assert "calibrated on 4 images (of 6 found)" in capsys.readouterr().out
    fp32, int8 = shipped_onnx.compiled.path, int8_path(shipped_onnx.compiled.path, shipped_onnx.model_id)
    assert int8.is_file() and int8.parent == fp32.parent and problem(int8) is None
    cap = Captioner.load(backend="onnx", int8=True)
    assert cap.backend == "onnx-int8" and cap.compiled.path == int8
    x = cap.preprocess([picture(i, (320, 240)) for i in range(3)])
    feats = cap.encode(x)
    assert feats.shape == (3, 49, 1280) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    cos = torch.nn.functional.cosine_similarity(feats.flatten(1), shipped_onnx.encode(x).flatten(1)).min()
    assert cos > 0.8, f"int8 vs fp32 cosine {cos:.3f} (0.90 here: calibrated on 4 flat synthetic pictures)"
    assert main(["-q", "caption", str(photos), "--int8", "--workers", "0", "-o", str(tmp_path / "int8.csv")]) == 0
    assert len(read_rows(tmp_path / "int8.csv", "csv")) == 6
    kept = tmp_path / "int8.onnx"
    shutil.copy(int8, kept)
    int8.write_bytes(kept.read_bytes()[:1000])
    assert main(["caption", str(photos), "--int8", "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert "the int8 encoder" in err and "damaged" in err and "captioner calibrate" in err
    shutil.copy(kept, int8)
    assert export_path(cap.encoder, cap.input_size()) == fp32


def test_int8_models_are_kept_per_captioning_model(tmp_path):
    """Two captioning models on one encoder export (the shipped one and, say, a UCM one) get an int8 file each."""
    fp32 = tmp_path / "encoder-abc.onnx"
    a, b = int8_path(fp32, "efficientnet_lite0+0123456789ab"), int8_path(fp32, "efficientnet_lite0+ba9876543210")
    assert a != b and a.parent == b.parent == tmp_path and a.name == "encoder-abc.int8-0123456789ab.onnx"


def test_a_onednn_isa_cap_turns_bf16_off_and_is_named(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 runs torch as on an AVX2-only CPU: no bf16, and the CPU line (which keys auto's
    kept measurement) says so, so a capped measurement is never taken for the uncapped CPU's."""
    from captioner import cpu

    monkeypatch.setattr(cpu, "_cpuinfo", lambda: ("Some CPU", frozenset({"avx2", "avx512f", "avx512_bf16"})))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert cpu.has_fast_bf16() and "capped" not in cpu.describe()
    for cap, fast in (("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True), ("ALL", True)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert cpu.has_fast_bf16() is fast, cap
        assert ("oneDNN capped at" in cpu.describe()) is (cap != "ALL"), cap


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_decoder_step_export_matches_torch_for_both_cells(cell, tmp_path):
    """A small random decoder of either cell, on a 3x3 grid (the export's grid is dynamic): the onnx step's logits,
    state and attention equal torch's to float rounding."""
    from captioner.model.decoder import Decoder, DecoderConfig
    from captioner.runtime.onnx_decoder import onnx_decoder

    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(vocab_size=50, feat_dim=16, feat_proj=8, embed_dim=8, hidden_dim=12, attn_dim=6,
                                    cell=cell, tie_weights=False)).eval()
    step = onnx_decoder(decoder, tmp_path)
    a, keys, state = decoder.prepare(torch.rand(4, 9, 16))
    words = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        ref = decoder.step(words, a, keys, state)
    out = step.step(words, a, keys, state)
    for x, y in ((out[0], ref[0]), (out[1][0], ref[1][0]), (out[1][1], ref[1][1]), (out[2], ref[2])):
        assert x.shape == y.shape and float((x - y).abs().max()) < 1e-5
