"""The argparse pieces every `captioner` command shares: number types with ranges, the common flags,
the model and decoding options, and the one exit-code table.

Imports nothing but the standard library, so that `--help` and every usage error return at once;
the commands import torch, timm and gradio only once their arguments are valid."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = ((EXIT_OK, "all good: every input was processed"),
              (EXIT_FAILED, "nothing could be done (bad model, no usable input, cannot write the output)"),
              (EXIT_USAGE, "usage error (unknown option, a value out of range); nothing was run"),
              (EXIT_PARTIAL, "some inputs failed (each named on stderr), the others were processed"),
              (EXIT_INTERRUPTED, "interrupted (Ctrl-C or SIGTERM)"))
EXIT_EPILOG = "exit codes: " + "; ".join(f"{code} {text}" for code, text in EXIT_CODES) + "."


def outcome(done: int, failed: int) -> int:
    """The exit code of a run over inputs: 0 none failed, 3 some failed, 1 every one failed."""
    if not failed:
        return EXIT_OK
    return EXIT_PARTIAL if done else EXIT_FAILED


# ------------------------------------------------------------------------- number types ------
@dataclass(frozen=True)
class Range:
    """An int or float option's allowed values: lo <= x <= hi (lo < x with lo_open); None = unbounded."""

    kind: type = int
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"in {left}{self.lo:g}, {self.hi:g}{right}" if self.lo_open or self.hi_open or self.kind is float \
                else f"from {self.lo:g} to {self.hi:g}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "a number"

    def check(self, value: float) -> int | float:
        """value as this range's kind, or ValueError("... must be ..."): for numbers that were never text
        (the web app's sliders and API calls)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        if self.kind is int and value != int(value):
            raise ValueError(f"{value:g} is not a whole number")
        value = self.kind(value)
        too_low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        too_high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if too_low or too_high:
            raise ValueError(f"{value:g} is out of range: must be {self.describe()}")
        return value

    def __call__(self, text: str) -> int | float:
        """argparse's type: the text as a number in range, or an ArgumentTypeError (a usage error)."""
        try:
            value = self.kind(text)
        except ValueError:
            name = "an integer" if self.kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {name} ({self.describe()})") from None
        try:
            return self.check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace(f"{value:g}", text, 1)) from None


# Limits shared by the CLI and the web app (ui.py imports them too).
BEAM = Range(int, 1, 16)
MAX_LEN = Range(int, 1, 100)
TOPK = Range(int, 1, 16)
LENGTH_PENALTY = Range(float, 0, 5)
NO_REPEAT_NGRAM = Range(int, 0, 10)
BATCH_SIZE = Range(int, 1, 4096)
WORKERS = Range(int, 0, 64)
WORKER_SECONDS = Range(float, 0, 86400, lo_open=True)
MEGAPIXELS = Range(float, 1, 4096)  # caption --max-pixels
EVERY = Range(float, 0, 3600)  # seconds; 0 only together with --scenes (checked by the video command)
SCENE_THRESHOLD = Range(float, 0, 1, lo_open=True)
DEFAULT_SCENE_THRESHOLD = 0.15  # picked on a labelled set of cuts, fades and pans: bench/scenes.py, docs/video.md
SIMILARITY = Range(float, 0, 1)
MAX_FRAMES = Range(int, 1, 1_000_000)
POSITIVE = Range(int, 1)
NON_NEGATIVE = Range(int, 0)


# ----------------------------------------------------------------------------- errors -------
class UsageError(Exception):
    """A usage error: an option's value, or options that do not go together. main() prints the parser's
    usage line and the message and returns 2."""

    def __init__(self, message: str, parser: argparse.ArgumentParser | None = None) -> None:
        super().__init__(message)
        self.parser = parser


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise UsageError (main prints them and returns 2) instead of
    exiting, so that `main()` returns the exit code of a usage error like any other."""

    def error(self, message: str):  # noqa: ANN201 - argparse's signature
        raise UsageError(message, self)


def usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    """The usage line (or, for a command with dozens of options, a pointer to --help), then the error: exit 2."""
    usage = parser.format_usage()
    if usage.count("\n") > 10:
        usage = f"usage: {parser.prog} [options] ... (`{parser.prog} --help` lists them)\n"
    print(usage + f"{parser.prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


# ------------------------------------------------------------------------------- flags -------
def add_common_args(p: argparse.ArgumentParser, top: bool = False) -> None:
    """-q, -v and --no-progress, on the top parser and on every command (before or after COMMAND)."""
    default: Any = False if top else argparse.SUPPRESS  # a command's copy must not reset the top one's
    g = p.add_argument_group("output") if not top else p
    g.add_argument("-q", "--quiet", action="store_true", default=default, help="only warnings and errors on stderr")
    g.add_argument("-v", "--verbose", action="count", default=0 if top else argparse.SUPPRESS,
                   help="more detail on stderr (e.g. every file skipped while scanning folders); -vv also the "
                        "libraries' debug logs (Pillow, torch, ...)")
    g.add_argument("--no-progress", action="store_true", default=default, help="no progress bars on stderr")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="a model bundle folder (`captioner export-onnx`) or a checkpoint (.pt); default: the model "
                        "shipped in the package")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default: cpu)")


BACKENDS = ("auto", "torch", "onnx", "compiled")


def add_backend_args(p: argparse.ArgumentParser, compile_alias: bool = False) -> None:
    """--backend and --int8 (backends.py), and for `caption` the older --compile."""
    g = p.add_argument_group("backend")
    g.add_argument("--backend", choices=BACKENDS, default=None,
                   help="what runs the model. Default: onnx for a model bundle (the shipped model: ONNX Runtime, "
                        "fp32, no torch, the same captions on every CPU), auto for a checkpoint --model. These need "
                        "torch (captioner[train]) and a checkpoint (the shipped model.pt unless --model): torch; "
                        "auto (for each network the faster of torch and onnx on this CPU, measured once; bf16 where "
                        "the CPU has it, so captions may differ by CPU); onnx with a checkpoint (exported once into "
                        "CAPTIONER_CACHE or ~/.cache/captioner); compiled (the encoder built by AOTInductor; needs a "
                        "C++ compiler)")
    g.add_argument("--int8", action="store_true",
                   help="onnx with the int8 encoder (static quantization; make it once with `captioner calibrate "
                        "FOLDER`); faster, captions may differ in a word")
    if compile_alias:
        g.add_argument("--compile", action="store_true", help="the same as --backend compiled")


def resolve_backend(args: argparse.Namespace) -> None:
    """--compile becomes --backend compiled, --int8 alone means onnx, no --backend stays None (the model's own:
    pipeline/load.py); options that do not go together are a UsageError."""
    if getattr(args, "compile", False):
        if args.backend not in (None, "compiled"):
            raise UsageError(f"--compile is --backend compiled: it does not go with --backend {args.backend}")
        args.backend = "compiled"
    if args.int8:
        if args.backend not in (None, "auto", "onnx"):
            raise UsageError(f"--int8 is for the onnx backend, not --backend {args.backend}")
        args.backend = "onnx"


def add_search_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--beam", type=BEAM, default=None,
                   help=f"beam size, {BEAM.describe()} (1 = greedy; default: the model's, usually 3)")
    g.add_argument("--max-len", type=MAX_LEN, default=None, help=f"maximum caption length in words, {MAX_LEN.describe()}")
    g.add_argument("--length-penalty", type=LENGTH_PENALTY, default=None,
                   help=f"rank beams by logprob / len**P, {LENGTH_PENALTY.describe()} (default: model's)")
    g.add_argument("--no-repeat-ngram", type=NO_REPEAT_NGRAM, default=None,
                   help=f"forbid repeating n-grams of this size, {NO_REPEAT_NGRAM.describe()} (0 = off)")
    g.add_argument("--no-repeat-words", type=parse_bool, default=None, metavar="on|off",
                   help="never repeat a content word within a caption (\"a dog with a dog\"; default: the model's)")


def parse_bool(text: str) -> bool:
    """on/off, true/false, yes/no, 1/0 (any case): the one reading of a boolean option."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not on/off (true/false)")


def search_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"beam": args.beam, "max_len": args.max_len, "length_penalty": args.length_penalty,
            "no_repeat_ngram": args.no_repeat_ngram, "no_repeat_words": getattr(args, "no_repeat_words", None)}


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal and without --no-progress / -q."""
    return not (getattr(args, "no_progress", False) or getattr(args, "quiet", False)) and sys.stderr.isatty()


@contextlib.contextmanager
def progress_disabled(disable: bool) -> Iterator[None]:
    """With --no-progress: every tqdm bar made inside is disabled, whatever its caller asked for."""
    if not disable:
        yield
        return
    from tqdm import std

    original: Callable = std.tqdm.__init__
    old_env = os.environ.get("TQDM_DISABLE")

    def init(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = init
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        std.tqdm.__init__ = original
        if old_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old_env


def cache_root() -> Path:
    """Where exports, measurements and compiled code are cached: $CAPTIONER_CACHE, else ~/.cache/captioner."""
    env = os.environ.get("CAPTIONER_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "captioner"
