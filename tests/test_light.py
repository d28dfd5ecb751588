"""The light install (issue 26): the captioning commands and the app run where torch cannot be imported.

Each command is the real `captioner` (or app.py) in a subprocess with a fresh HOME and cache, and a
sitecustomize that sets sys.modules["torch"] (and torchvision, timm) to None: `import torch` fails there as it
does in a venv without torch, in the command and in its worker processes alike (they inherit PYTHONPATH). The
torch-only commands must say which extra to install, in one line, exit 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shared_or_skip
from test_e2e import COMMAND, ROOT, N, fresh_env, ok, photos, serving_app  # noqa: F401 - photos: the fixture
from test_e2e import captioner as run

BLOCKED = ("torch", "torchvision", "timm", "torchaudio")
TIMEOUT = 240


@pytest.fixture(scope="module")
def light_env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("light")
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in BLOCKED))
    env = fresh_env(root)
    return {**env, "PYTHONPATH": str(site)}


def test_torch_really_cannot_be_imported_there(light_env):
    res = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=light_env,
                         timeout=60)
    assert res.returncode != 0 and ("ModuleNotFoundError" in res.stderr or "ImportError" in res.stderr)


def pairs(lines: list[str]) -> list[tuple[str, str]]:
    return sorted((Path(x.split("\t")[0]).name, x.split("\t")[1]) for x in lines if "\t" in x)


@pytest.mark.timeout(600)
def test_caption_without_torch_matches_the_torch_onnx_path(light_env, photos, tmp_path):  # noqa: F811
    """The default command, torch-free: the shipped bundle's captions are those of the torch install's fp32 onnx
    path on the shipped checkpoint; workers 0 and 2 over three batches agree; JSONL and SQLite + search work."""
    res = ok(run(light_env, "caption", photos, "-v"))
    assert "runtimes: encoder onnx, decoder step onnx" in res.stderr
    light = pairs(res.stdout.splitlines())
    assert len(light) == N and all(c for _, c in light)
    full = ok(subprocess.run([*COMMAND, "caption", str(photos), "--backend", "onnx", "--model",
                              str(ROOT / "captioner" / "assets" / "model.pt")], capture_output=True, text=True,
                             env=fresh_env(tmp_path / "full"), cwd=ROOT, timeout=TIMEOUT))
    assert pairs(full.stdout.splitlines()) == light
    for workers in (0, 2):
        out = tmp_path / f"w{workers}.jsonl"
        ok(run(light_env, "caption", photos, "--batch-size", "2", "--workers", workers, "-o", out))
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert sorted((Path(r["path"]).name, r["caption"]) for r in rows) == light and not any(r["error"] for r in rows)
    ok(run(light_env, "caption", photos, "--workers", "2", "--batch-size", "2", "-o", tmp_path / "lib.sqlite"))
    word = light[0][1].split()[1]
    found = ok(run(light_env, "search", tmp_path / "lib.sqlite", word))
    assert light[0][0] in found.stdout


@pytest.mark.timeout(300)
def test_metadata_without_torch(light_env, photos, tmp_path):  # noqa: F811
    import shutil

    if shutil.which("exiftool") is None:
        pytest.skip("exiftool is not installed (apt-get install libimage-exiftool-perl)")
    folder = shutil.copytree(photos, tmp_path / "photos")
    ok(run(light_env, "caption", folder, "--write-metadata", "--batch-size", "2", "--workers", "2"))
    read = subprocess.run(["exiftool", "-s3", "-XMP-dc:Description", str(next(folder.glob("*.jpg")))],
                          capture_output=True, text=True, timeout=60)
    assert read.stdout.strip(), read.stderr


def test_caption_the_shared_photos_without_torch(light_env):
    photos_dir = shared_or_skip("photos")
    res = ok(run(light_env, "caption", photos_dir))
    assert len([x for x in res.stdout.splitlines() if "\t" in x]) == 5


@pytest.mark.timeout(300)
def test_the_bundle_weights_are_rebuilt_without_torch(light_env, photos, tmp_path):  # noqa: F811
    """A fresh checkout has the shipped bundle's graphs, not its data files: the torch-free command rebuilds them
    from model.pt and the Lite0 weights package (here a copy of the bundle, beside a copy of model.pt), and
    captions as the shipped bundle does."""
    import shutil

    assets = ROOT / "captioner" / "assets"
    (tmp_path / "model").mkdir()
    shutil.copyfile(assets / "model.pt", tmp_path / "model.pt")
    for p in (assets / "model").iterdir():
        if not p.name.endswith(".data"):
            shutil.copyfile(p, tmp_path / "model" / p.name)
    rebuilt = ok(run(light_env, "caption", photos, "--model", tmp_path / "model"))
    assert "weights rebuilt" in rebuilt.stderr and sorted(p.name for p in (tmp_path / "model").glob("*.data"))
    assert pairs(rebuilt.stdout.splitlines()) == pairs(ok(run(light_env, "caption", photos)).stdout.splitlines())
    again = ok(run(light_env, "caption", photos, "--model", tmp_path / "model"))
    assert "weights rebuilt" not in again.stderr


@pytest.mark.timeout(300)
def test_video_without_torch(light_env, tmp_path):
    from test_app import make_video

    clip = make_video(tmp_path / "clip.mp4", seconds=3)
    res = ok(run(light_env, "video", clip, "--every", "1", "-o", tmp_path / "out.srt"))
    text = (tmp_path / "out.srt").read_text(encoding="utf-8")
    assert "-->" in text and res.returncode == 0


def test_info_without_torch(light_env):
    res = ok(run(light_env, "info"))
    assert "torch not installed" in res.stdout and "captioner[train]" in res.stdout
    assert "efficientnet_lite0+" in res.stdout  # the shipped bundle loaded


@pytest.mark.parametrize("argv", [
    ["train", "--data", "x", "--out", "y"],
    ["evaluate", "--data", "x"],
    ["cache", "--data", "x"],
    ["export-onnx", "model.pt", "out"],
    ["calibrate", "."],
    ["caption", ".", "--backend", "torch"],
    ["caption", ".", "--backend", "auto"],
    ["caption", ".", "--int8"],
])
def test_torch_commands_say_which_extra_in_one_line(light_env, argv, photos):  # noqa: F811
    argv = [str(photos) if a == "." else a for a in argv]
    res = run(light_env, *argv)
    assert res.returncode == 1, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs torch" in lines[0] and "captioner[train]" in lines[0], lines


@pytest.mark.timeout(600)
def test_app_serves_all_three_tabs_without_torch(light_env, photos, tmp_path):  # noqa: F811
    gradio_client = pytest.importorskip("gradio_client")
    from test_app import make_video

    clip = make_video(tmp_path / "clip.mp4", seconds=3)
    with serving_app(light_env, []) as client:
        first = sorted(photos.iterdir())[0]
        image_out = client.predict(gradio_client.handle_file(str(first)), 3, 20, 3, api_name="/caption")
        assert image_out[0], image_out
        files = [gradio_client.handle_file(str(p)) for p in sorted(photos.iterdir())]
        _, table, _, _, _ = client.predict(files, 1, api_name="/caption_batch")
        rows = table["data"] if isinstance(table, dict) else table
        assert len(rows) == N and all(r[1] and not r[3] for r in rows), rows
        frames, _, srt, _ = client.predict(gradio_client.handle_file(str(clip)), 1.0, False, 1,
                                           api_name="/caption_video")
        assert len(frames) == 3 and Path(srt).read_text(encoding="utf-8").strip()
