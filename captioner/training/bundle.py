"""`captioner export-onnx CHECKPOINT OUT_DIR`: a model as files that run without torch (issue 26), read by
lite/captioner.py's LiteCaptioner:

- encoder.onnx: the prepared fp32 encoder (BatchNorm folded), images (B, 3, H, W) -> annotation vectors (B, L, D):
  the export `--backend onnx` makes (onnx_encoder.py);
- decoder_init.onnx: `Decoder.prepare`, features (B, L, D) -> annotations, attention keys, h0, c0 (the ImageNet
  attributes path included), and the ImageNet class probabilities of a decoder that has the classifier;
- decoder_step.onnx: `Decoder.step`, as onnx_decoder.py exports it;
- model.json: the vocabulary, the content-word mask (no_repeat_words), the preprocessing, the search defaults, the
  model id and each file's SHA-256 (lite/bundle.py reads it).

Weights are stored compactly: a float32 initializer whose values are all fp16 numbers (the shipped decoder's:
its checkpoint is fp16) is stored as fp16 and cast back to fp32 when the session loads (ONNX Runtime folds the
Cast), so the bundle computes exactly what fp32 files would. `--fp16` stores every weight so (the encoder's then
round to fp16: smaller, not the same numbers); either way the sessions run in fp32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import CaptionerError, UsageProblem
from ..lite.bundle import BUNDLE_FORMAT, FILES, MANIFEST
from ..lite.weights import sha256_file
from ..model.checkpoint import default_model_path
from ..model.decoder import Decoder
from ..runtime.onnx_decoder import _outputs, _Step
from ..runtime.onnx_encoder import (
    INSTALL,
    _Features,
    onnxruntime_version,
    quiet,
    write_export,
)

log = logging.getLogger("captioner")


class _Prepare(torch.nn.Module):
    """What gets exported as decoder_init: features (B, L, D) -> (a, keys, h, c[, imagenet])."""

    def __init__(self, decoder: Decoder, imagenet: bool):
        super().__init__()
        self.decoder, self.imagenet = decoder, imagenet

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:  # named as the ONNX input (dynamic shapes)
        a, keys, (h, c) = self.decoder.prepare(features)
        if not self.imagenet:
            return a, keys, h, c
        return a, keys, h, c, torch.softmax(self.decoder.classifier(features.mean(1)), 1)


@dataclass
class Stored:
    """What compact storage did to one file."""

    file: str
    bytes: int
    fp16: int  # initializers stored as fp16
    fp32: int  # initializers kept as fp32
    rounded: int  # of the fp16 ones, those that were not fp16 numbers already (--fp16 only)


def store_fp16(path: Path, everything: bool) -> Stored:
    """Rewrite the ONNX file `path` with its float32 initializers as fp16 + a Cast back to float32: those whose values
    are fp16 numbers already (exact), or with `everything` all of them (rounded). Inputs and outputs stay float32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    kept, casts, fp16, fp32, rounded = [], [], 0, 0, 0
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            kept.append(init)
            continue
        values = numpy_helper.to_array(init)
        half = values.astype(np.float16)
        exact = bool(np.array_equal(half.astype(np.float32), values, equal_nan=True))
        overflow = bool(np.isfinite(values).all() and not np.isfinite(half).all())
        if values.size < 16 or not (exact or everything) or overflow:
            kept.append(init)  # tiny, not an fp16 number, or too large for one: fp32 as it is
            fp32 += 1
            continue
        name = init.name
        stored = numpy_helper.from_array(half, name + "__fp16")
        kept.append(stored)
        casts.append(helper.make_node("Cast", [stored.name], [name], to=TensorProto.FLOAT, name=name + "__cast"))
        fp16 += 1
        rounded += not exact
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)  # the casts first: the graph stays topologically sorted
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Stored(path.name, path.stat().st_size, fp16, fp32, rounded)


EXTERNAL_MIN_BYTES = 1024  # an initializer this large goes to the graph's data file when its recipe is known...
INLINE_MAX_BYTES = 256 * 1024  # ...or, with no recipe, when it is this large (the data file then has no rebuild)


def _key(array: np.ndarray) -> tuple[str, tuple[int, ...], str]:
    return array.dtype.str, tuple(array.shape), hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def weight_recipes(encoder: Any, checkpoint: Path) -> tuple[dict[tuple, dict[str, Any]], dict[str, dict[str, str]]]:
    """Every tensor the light install can rebuild (lite/weights.py) from the checkpoint and the encoder's weights
    package: {(dtype, shape, sha256 of its bytes): recipe}, plain tensors (cast, transposed) before BatchNorm folds of
    the unprepared `encoder`; and the sources' files and SHA-256s, for model.json."""
    from ..lite.weights import LITE_PACKAGES, Sources, evaluate, lite_weights_path
    from ..model.encoder import conv_bn_pairs, rename_lite_keys

    sources = Sources(checkpoint)
    refs = [f"checkpoint:{k}" for k in sources.load("checkpoint")]
    described = {"checkpoint": {"file": str(checkpoint), "sha256": sha256_file(checkpoint)}}
    name, net = encoder.config.name, encoder.net
    loaded_from: dict[str, str] = {}  # the unprepared network's state key -> the source tensor it was loaded from
    if name in LITE_PACKAGES and encoder.config.pretrained:
        package = list(sources.load(name))
        refs += [f"{name}:{k}" for k in package]
        renamed = rename_lite_keys({k: k for k in package}, [len(stage) for stage in net.blocks])
        loaded_from = {k: f"{name}:{orig}" for k, orig in renamed.items()}
        path = lite_weights_path(name)
        described[name] = {"package": LITE_PACKAGES[name][0], "file": path.name, "sha256": sha256_file(path)}
    for key in net.state_dict():  # the fine-tuned stages: the checkpoint's, over the package's (Encoder.load_tuned)
        if f"checkpoint:encoder/{key}" in refs:
            loaded_from[key] = f"checkpoint:encoder/{key}"

    def value(key: str) -> dict[str, Any]:
        return {"ref": loaded_from[key], "as": "float32"}

    candidates: list[dict[str, Any]] = []
    for ref in refs:
        transposed = sources.tensor(ref).ndim == 2
        for dtype in ("float32", "float16"):
            candidates += [{"ref": ref, "as": dtype}] + ([{"ref": ref, "as": dtype, "T": True}] if transposed else [])
    bn_params = ("weight", "bias", "running_mean", "running_var")
    for parent, module, a, b in conv_bn_pairs(net):
        conv, bn = (f"{parent}.{x}".lstrip(".") for x in (a, b))
        if not all(f"{bn}.{p}" in loaded_from for p in bn_params):
            continue  # a network without package weights: nothing to rebuild from
        fold = {"conv": value(f"{conv}.weight"),
                "conv_bias": value(f"{conv}.bias") if module._modules[a].bias is not None else None,
                "bn": [value(f"{bn}.{p}") for p in bn_params], "eps": float(module._modules[b].eps)}
        candidates += [{"fold": part, **fold, "as": dtype} for part in ("weight", "bias") for dtype in ("float32", "float16")]
    index: dict[tuple, dict[str, Any]] = {}
    for recipe in candidates:
        index.setdefault(_key(evaluate(recipe, sources.tensor)), recipe)
    return index, described


def externalize(path: Path, index: dict[tuple, dict[str, Any]]) -> dict[str, Any] | None:
    """Move the ONNX file's large initializers into a data file beside it (ONNX external data, what ONNX Runtime
    reads), each with its recipe from `index` (None where there is none); returns model.json's entry for it."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    data_name = path.name + ".data"
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    offset = 0
    for init in model.graph.initializer:
        raw = init.raw_data
        if len(raw) < EXTERNAL_MIN_BYTES:
            continue
        recipe = index.get(_key(numpy_helper.to_array(init)))
        if recipe is None and len(raw) < INLINE_MAX_BYTES:
            continue
        entries.append({"name": init.name, "offset": offset, "length": len(raw), "from": recipe})
        for key, val in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = init.external_data.add()
            entry.key, entry.value = key, val
        init.data_location = onnx.TensorProto.EXTERNAL
        init.ClearField("raw_data")
        chunks.append(raw)
        offset += len(raw)
    if not entries:
        return None
    data = path.parent / data_name
    data.write_bytes(b"".join(chunks))
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    return {"file": data_name, "bytes": offset, "sha256": sha256_file(data),
            "rebuildable": all(e["from"] is not None for e in entries), "tensors": entries}


def _publish(tmp: Path, dest: Path) -> None:
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)


def export_bundle(checkpoint: Path | str | None, out: Path, fp16: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Write the bundle of `checkpoint` (None: the shipped model) into the folder `out`; returns model.json's
    content. Each file is written beside its final name and renamed; model.json comes last, so a folder with a
    model.json is a whole bundle."""
    from ..model.encoder import imagenet_categories, preprocessing
    from ..pipeline.captioner import Captioner

    out = Path(out)
    if (out / MANIFEST).exists() and not overwrite:
        raise UsageProblem(f"{out} already holds a model bundle (use --overwrite to replace it)")
    try:
        import onnx  # noqa: F401 - the exporter and the fp16 storage need it
    except ImportError:
        raise CaptionerError(f"export-onnx needs onnx ({INSTALL})") from None
    cap = Captioner.load(checkpoint, prepare=False)
    source = Path(checkpoint) if checkpoint else default_model_path()
    recipes, sources = weight_recipes(cap.encoder, source)  # of the unprepared encoder: its BatchNorms are folded next
    cap.encoder.prepare_inference(torch.device("cpu"), bf16=False)
    encoder, decoder, cfg = cap.encoder, cap.decoder.eval(), cap.decoder.cfg
    height, width = cap.input_size()
    imagenet = getattr(decoder, "classifier", None) is not None and decoder.classifier.out_features == 1000
    try:
        out.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=out, prefix=".export-"))
    except OSError as exc:
        raise CaptionerError(f"cannot write the bundle to {out}: {exc.strerror or exc}") from None
    try:
        (out / MANIFEST).unlink(missing_ok=True)  # not a bundle until the new model.json is in place
        rows, locations = torch.export.Dim("rows", min=1, max=1 << 20), torch.export.Dim("locations", min=1, max=4096)
        d, grid = cfg.feat_proj or cfg.feat_dim, encoder.config.grid
        batch = torch.export.Dim("batch", min=1, max=4096)
        write_export(_Features(encoder), (torch.zeros(2, 3, height, width),), work / FILES["encoder"], ["images"],
                     ["features"], {"images": {0: batch}}, "encoder")
        init_out = ["a", "keys", "h0", "c0"] + (["imagenet"] if imagenet else [])
        write_export(_Prepare(decoder, imagenet), (torch.zeros(2, grid * grid, cfg.feat_dim),),
                     work / FILES["decoder_init"], ["features"], init_out, {"features": {0: rows, 1: locations}},
                     "decoder")
        step_in = (torch.zeros(3, dtype=torch.long), torch.zeros(3, 4, d), torch.zeros(3, 4, cfg.attn_dim),
                   torch.zeros(3, cfg.hidden_dim), torch.zeros(3, cfg.hidden_dim))
        step_rows = torch.export.Dim("step_rows", min=1, max=1 << 20)
        step_locations = torch.export.Dim("step_locations", min=1, max=4096)
        write_export(_Step(decoder), step_in, work / FILES["decoder_step"], ["words", "a", "keys", "h", "c"],
                     _outputs(decoder), {"words": {0: step_rows}, "a": {0: step_rows, 1: step_locations},
                                         "keys": {0: step_rows, 1: step_locations}, "h": {0: step_rows},
                                         "c": {0: step_rows}}, "decoder")
        with quiet():
            stored = {role: store_fp16(work / name, fp16) for role, name in FILES.items()}
        files = {}
        for role, name in FILES.items():
            data = externalize(work / name, recipes)
            files[role] = {"file": name, "bytes": (work / name).stat().st_size, "sha256": sha256_file(work / name),
                           "fp16_initializers": stored[role].fp16, "fp32_initializers": stored[role].fp32,
                           "rounded_to_fp16": stored[role].rounded, **({"data": data} if data else {})}
            if data:
                _publish(work / data["file"], out / data["file"])
            _publish(work / name, out / name)
        # where the data files can be rebuilt from: the checkpoint (a path from this folder) and the weights package
        sources["checkpoint"]["file"] = os.path.relpath(source.resolve(), out.resolve())
        v = cap.vocab
        manifest = {
            "format": BUNDLE_FORMAT,
            "model_id": cap.model_id,
            "weights": "fp16 (every weight rounded to fp16; run in fp32)" if fp16 else
                       "fp32 (weights that are fp16 numbers stored as fp16; run in fp32, exactly as fp32)",
            "vocab": list(v.itos),
            "specials": [v.pad, v.start, v.end, v.unk],
            "content_mask": [bool(x) for x in v.content_mask()],
            "encoder": {"name": encoder.config.name, "grid": grid, "input": [3, height, width], "features": encoder.dim,
                        "preprocessing": preprocessing(encoder.config.name, encoder.config.resize).to_dict()},
            "decoder": {"cell": cfg.cell, "vocab_size": cfg.vocab_size, "hidden_dim": cfg.hidden_dim,
                        "attn_dim": cfg.attn_dim, "annotation_dim": d, "feat_dim": cfg.feat_dim,
                        "init_outputs": init_out, "step_outputs": _outputs(decoder)},
            "search": asdict(cap.search_cfg),
            "imagenet_categories": imagenet_categories() if imagenet else [],
            "files": files,
            "sources": sources,
            "made_by": {"captioner": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime_version(),
                        "onnx": __import__("onnx").__version__, "checkpoint": str(checkpoint or "shipped")},
        }
        tmp = work / MANIFEST
        tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        _publish(tmp, out / MANIFEST)
    except OSError as exc:
        raise CaptionerError(f"cannot write the bundle to {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest
