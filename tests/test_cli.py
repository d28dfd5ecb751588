"""The command line as a whole (cli.py, cliargs.py): arguments parsed and checked before torch is imported,
numeric ranges as usage errors, one exit-code table for every command, the common flags everywhere,
and messages that say what is actually wrong with a model file or a video."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import picture

from captioner.cli.main import build_parser, main, train_fields
from captioner.options import EXIT_CODES, EXIT_EPILOG, outcome

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
COMMANDS = ("caption", "video", "train", "evaluate", "export")
# a minimal valid argument list for each command (the inputs need not exist: only parsing is tested)
MINIMAL = {"caption": ["x.jpg"], "video": ["x.mp4"], "train": ["--data", "d"], "evaluate": ["--data", "d"],
           "export": ["a.pt", "b.pt"]}
# (command, option, bad values): every numeric option with a range, each value a usage error
OUT_OF_RANGE = [
    ("caption", "--beam", ["0", "-3", "17", "100000", "two"]),
    ("caption", "--max-len", ["0", "101", "-1"]),
    ("caption", "--topk", ["0", "17"]),
    ("caption", "--batch-size", ["0", "-1"]),
    ("caption", "--workers", ["-1"]),
    ("caption", "--length-penalty", ["-1", "nan", "inf"]),
    ("caption", "--no-repeat-ngram", ["-1", "11"]),
    ("video", "--every", ["-1", "nan"]),
    ("video", "--scene-threshold", ["0", "1.5", "-0.1"]),
    ("video", "--similarity", ["-0.1", "1.1"]),
    ("video", "--max-frames", ["0"]),
    ("video", "--batch-size", ["0"]),
    ("video", "--beam", ["0", "17"]),
    ("evaluate", "--beam", ["0"]),
    ("evaluate", "--workers", ["-2"]),
    ("export", "--max-len", ["0"]),
    ("train", "--epochs", ["0"]),
    ("train", "--lr", ["0", "-1e-3"]),
    ("train", "--beam", ["0"]),
    ("train", "--dropout", ["1", "-0.5"]),
    ("train", "--batch-size", ["0"]),
    ("train", "--grid", ["9"]),
    ("train", "--max-len", ["0"]),
]


def run_main(*argv: object) -> int:
    return main([*map(str, argv)])


def cli(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captioner", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=timeout)


# ------------------------------------------------------------------------ usage errors ------
@pytest.mark.parametrize("command, option, values", OUT_OF_RANGE)
def test_numeric_ranges_are_usage_errors(command, option, values, capsys):
    for value in values:
        assert run_main(command, *MINIMAL[command], option, value) == 2, (option, value)
        err = capsys.readouterr().err
        assert err.startswith("usage: captioner " + command) and f"captioner {command}: error: argument {option}" in err
        assert err.count("\n") <= 12 and "Traceback" not in err, err


def test_cross_option_usage_errors(capsys):
    cases = [("caption", "x.jpg", "-o", "out.txt"), ("caption", "x.jpg", "--resume"),
             ("video", "x.mp4", "--every", "0"), ("video", "x.mp4", "-o", "out.txt")]
    for argv in cases:
        assert run_main(*argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("usage: ") and f"captioner {argv[0]}: error: " in err, err
    assert run_main("video", "x.mp4", "--every", "0", "--scenes", "--model", "missing.pt") == 1  # 0 + --scenes is fine


def test_usage_errors_and_help_import_nothing_heavy():
    """--help and usage errors are answered before torch, timm, gradio, av or numpy are imported."""
    code = ("import sys\nfrom captioner.cli.main import main\n"
            "for argv in (['caption', 'x.jpg', '-o', 'out.txt'], ['caption', 'x', '--beam', '0'], "
            "['video', 'x', '--every', '-1'], ['train', '--data', 'd', '--epochs', '0'], ['export', 'a'], ['nope']):\n"
            "    assert main(argv) == 2, argv\n"
            "for argv in ([], ['caption'], ['video'], ['train'], ['evaluate'], ['export']):\n"
            "    try:\n        main([*argv, '--help'])\n    except SystemExit as e:\n        assert e.code == 0\n"
            "heavy = sorted(m for m in ('torch', 'torchvision', 'timm', 'gradio', 'av', 'numpy', 'tqdm') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout, res.stdout


def test_train_flags_read_from_source_match_the_dataclass():
    from captioner.training.train import TrainConfig

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    assert {name: default for name, default, _ in train_fields()} == fields
    args = build_parser().parse_args(["train", "--data", "d", "--epochs", "3", "--attributes", "true", "--lr", "1e-3"])
    assert (args.epochs, args.attributes, args.lr, args.grid) == (3, True, 1e-3, 7)


# -------------------------------------------------------------------------- exit codes ------
@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_shows_the_exit_code_table(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"] if command else ["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "exit codes: 0 all good" in out and "3 some inputs failed" in out and "2 usage error" in out


def test_exit_code_table():
    assert [code for code, _ in EXIT_CODES] == [0, 1, 2, 3, 130] and EXIT_EPILOG.startswith("exit codes: 0 ")
    assert (outcome(5, 0), outcome(4, 1), outcome(0, 2), outcome(0, 0)) == (0, 3, 1, 0)


def test_caption_exit_codes(good_folder, tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    common = ["--model", tiny_model, "--workers", 0, "--no-progress"]
    assert run_main("caption", good_folder / "ok0.png", *common) == 0
    assert run_main("caption", good_folder / "ok0.png", bad, *common) == 3
    assert run_main("caption", bad, *common) == 1  # the only input failed: nothing could be done
    assert run_main("caption", bad, "-o", tmp_path / "out.csv", *common) == 1
    assert run_main("caption", tmp_path / "missing.png", *common) == 1
    assert run_main("caption", good_folder / "ok0.png", "--model", tmp_path / "missing.pt") == 1
    assert run_main("caption", good_folder / "ok0.png", "--beam", 0) == 2
    capsys.readouterr()


def test_video_exit_codes(tiny_model, tmp_path, capsys):
    from test_bad_inputs import write_video

    good = write_video(tmp_path / "good.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\0" * 100)
    common = ["--model", tiny_model, "--no-progress", "-q"]
    assert run_main("video", good, *common) == 0
    assert run_main("video", good, bad, *common) == 3
    assert run_main("video", bad, *common) == 1
    assert run_main("video", good, "--every", -1) == 2
    capsys.readouterr()


def test_train_evaluate_export_exit_codes(tiny_model, tmp_path, capsys):
    assert run_main("train", "--data", tmp_path / "nope", "--out", tmp_path / "run") == 1
    assert run_main("train", "--data", tmp_path, "--epochs", 0) == 2
    assert run_main("evaluate", "--data", tmp_path / "nope", "--model", tiny_model) == 1
    assert run_main("evaluate", "--data", tmp_path, "--beam", 99) == 2
    assert run_main("export", tmp_path / "missing.pt", tmp_path / "out.pt") == 1
    assert run_main("export", tiny_model) == 2  # DST missing
    assert run_main("export", tiny_model, tmp_path / "out.pt", "--beam", 2, "-q") == 0
    assert (tmp_path / "out.pt").is_file()
    err = capsys.readouterr().err
    assert "Traceback" not in err


# -------------------------------------------------------------------------- common flags ------
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_the_common_flags(command):
    parser = build_parser()
    for flags in (["-q", "--no-progress"], ["-v"], []):
        args = parser.parse_args([command, *MINIMAL[command], *flags])
        assert (args.quiet, args.verbose, args.no_progress) == ("-q" in flags, "-v" in flags, "--no-progress" in flags)
    before = parser.parse_args(["-q", "--no-progress", command, *MINIMAL[command]])  # before COMMAND too
    assert before.quiet and before.no_progress and not before.verbose


def test_no_progress_disables_every_bar():
    from tqdm import tqdm

    from captioner.options import progress_disabled

    with progress_disabled(True):
        assert tqdm(range(3), disable=False).disable
    assert not tqdm(range(3), disable=False).disable  # restored afterwards


# ----------------------------------------------------------------------------- messages ------
def test_model_file_messages_say_what_is_wrong(tiny_model, tmp_path):
    """Item 7: a random-bytes .pt, a folder as --model and a raw pickle each get their own message; a raw
    pickle leaks no torch warning."""
    image = tmp_path / "x.png"
    picture(1).save(image)
    rand = tmp_path / "random.pt"
    rand.write_bytes(random.Random(0).randbytes(4096))
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "best.pt").write_bytes(tiny_model.read_bytes())
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"format": "captioner/1", "vocab": ["a"]}))  # protocol 4/5: torch would warn
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    cases = {rand: "is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle",
             folder: "is a folder, not a model file (it holds best.pt",
             raw: "it is a plain Python pickle, not a torch.save checkpoint",
             empty: "empty file (0 bytes)"}
    for path, phrase in cases.items():
        res = cli("caption", image, "--model", path, "--workers", 0)
        assert res.returncode == 1, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and phrase in lines[0], res.stderr
        assert "pickled Python code" not in lines[0] and "Warning" not in res.stderr and "not found" not in lines[0]


def test_corrupt_mp4_is_not_called_audio_only(tmp_path, tiny_model, capsys):
    """Item 7: an mp4 whose index (moov) is garbage, and a real audio-only file, say different things."""
    from test_bad_inputs import audio_only, write_video

    data = bytearray(write_video(tmp_path / "good.mp4").read_bytes())
    at = data.find(b"moov")
    data[at + 4:at + 400] = random.Random(0).randbytes(396)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(bytes(data))
    audio = audio_only(tmp_path / "audio.m4a")
    assert run_main("video", corrupt, audio, "--model", tiny_model) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert "corrupt.mp4" in lines[0] and "audio" not in lines[0] and "corrupt" in lines[0].split(":", 2)[2]
    assert "audio.m4a: no video stream (audio only: aac)" in lines[1]


def test_json_of_video_still_written_with_progress_flags(tiny_model, tmp_path):
    from test_bad_inputs import write_video

    good = write_video(tmp_path / "good.mp4")
    out = tmp_path / "out.json"
    assert run_main("video", good, "-o", out, "--model", tiny_model, "--no-progress", "-v") == 0
    assert json.loads(out.read_text())["videos"][0]["captions"]
