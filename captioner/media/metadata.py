"""`captioner caption --write-metadata / --sidecar`: each caption into the image's own metadata, or into an
XMP sidecar (NAME.xmp beside the image), through exiftool (Debian: libimage-exiftool-perl), run as one
`-stay_open` process for the whole run.

Written: XMP dc:description and Iptc4xmpCore:AltTextAccessibility (language x-default; other languages are
kept), EXIF ImageDescription in JPEG and TIFF, IPTC Caption-Abstract where the file already has one, and the
`captioner` XMP namespace (assets/exiftool.config): Caption (the text written), MachineGenerated,
CaptionModel, CaptionSoftware, CaptionDate. A description that captioner did not write (no
`captioner:Caption` equal to it) is a person's and is kept unless `overwrite`.

Each file is written atomically: exiftool writes a new copy (`-o`) in the same folder, which gets the
original's permissions, owner and times, is synced, and is renamed over the original (os.replace): a file is
always either untouched or complete. exiftool copies the pixel data; it never re-encodes it. Files that are
read-only, in a format without writable metadata, or changed since the run looked at them become error rows.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import json
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

from ..errors import CaptionerError
from .images import display_name

HINT = "apt-get install libimage-exiftool-perl"
CONFIG = Path(__file__).parents[1] / "assets" / "exiftool.config"
EMBED = frozenset({"JPEG", "TIFF", "PNG", "WEBP", "GIF"})  # file types whose own metadata is written
WITH_EXIF = frozenset({"JPEG", "TIFF"})  # ... and those that also get EXIF ImageDescription
DESCRIPTIONS = ("XMP-dc:Description", "XMP-iptcCore:AltTextAccessibility", "IFD0:ImageDescription",
                "IPTC:Caption-Abstract")  # where a description can be (XMP ones also with "-LANG")
READ_TAGS = ("-XMP-dc:Description", "-XMP-dc:Description-*", "-XMP-iptcCore:AltTextAccessibility",
             "-XMP-iptcCore:AltTextAccessibility-*", "-IFD0:ImageDescription", "-IPTC:Caption-Abstract",
             "-XMP-captioner:all", "-File:FileType")
OURS = "XMP-captioner:Caption"
PLACEHOLDERS = frozenset({"olympus digital camera", "sony dsc", "digital camera", "kodak digital still camera",
                          "minolta digital camera", "samsung digital camera", "exif_jpeg_picture"})  # camera defaults
READ_CHUNK = 256  # files per exiftool read
Tags = dict[str, Any]


def find_exiftool() -> str:
    exe = shutil.which("exiftool")
    if exe is None:
        raise CaptionerError(f"--write-metadata and --sidecar need exiftool, which is not installed ({HINT})")
    return exe


def _death_signal() -> Any:
    """For the child between fork and exec (Linux): SIGTERM when captioner dies, even by SIGKILL; a `-stay_open`
    exiftool otherwise keeps polling its closed stdin forever. prctl is looked up here, in the parent: the
    child only makes the system call (no dynamic loading after fork, which could deadlock on a lock held by
    one of torch's threads)."""
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _line_break(path: Path) -> bool:
    """exiftool reads its arguments one per line: such a name cannot be passed."""
    return "\n" in str(path) or "\r" in str(path)


class ExifTool:
    """One `exiftool -stay_open` process: many commands, one Perl start-up (~0.2 s saved per file)."""

    def __init__(self, exe: str) -> None:
        try:
            self.proc = subprocess.Popen([exe, "-config", str(CONFIG), "-stay_open", "True", "-@", "-"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         preexec_fn=_death_signal())
        except OSError as exc:
            raise CaptionerError(f"cannot start exiftool ({exe}): {exc.strerror or exc}") from None
        self.count = 0
        self.errors: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()  # stderr never blocks exiftool

    def _drain(self) -> None:
        for line in iter(self.proc.stderr.readline, b""):
            self.errors.put(line.decode("utf-8", "replace").rstrip("\n"))
        self.errors.put("")  # EOF

    def run(self, args: Sequence[str]) -> tuple[str, list[str]]:
        """One command: (its stdout, its stderr lines). Arguments are one per line (no newlines in them)."""
        self.count += 1
        ready = f"{{ready{self.count}}}"
        lines = [*args, "-echo4", ready, f"-execute{self.count}"]
        try:
            self.proc.stdin.write(b"".join(os.fsencode(a) + b"\n" for a in lines))
            self.proc.stdin.flush()
        except OSError:
            raise CaptionerError("exiftool stopped unexpectedly") from None
        out = []
        for line in iter(self.proc.stdout.readline, b""):
            if line.rstrip(b"\r\n") == ready.encode():
                break
            out.append(line.decode("utf-8", "surrogateescape"))
        else:
            raise CaptionerError("exiftool stopped unexpectedly")
        errors = []
        while (line := self.errors.get()) != ready:
            if line == "" and self.proc.poll() is not None:
                raise CaptionerError("exiftool stopped unexpectedly")
            errors.append(line)
        return "".join(out), errors

    def read(self, paths: Sequence[Path]) -> dict[Path, Tags]:
        """The description-related tags of each readable file (missing from the result: unreadable)."""
        found: dict[Path, Tags] = {}
        for start in range(0, len(paths), READ_CHUNK):
            chunk = {os.path.abspath(p): p for p in paths[start:start + READ_CHUNK] if not _line_break(p)}
            out, _ = self.run(["-json", "-G1", *READ_TAGS, *chunk])
            for entry in json.loads(out or "[]"):
                if entry.get("SourceFile") in chunk:
                    found[chunk[entry["SourceFile"]]] = entry
        return found

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.write(b"-stay_open\nFalse\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------- decisions ------
def descriptions(tags: Tags) -> list[str]:
    """Every description text in the tags (any language), camera placeholders and blanks left out."""
    texts = (str(v).strip() for k, v in tags.items() if k.startswith(DESCRIPTIONS))
    return [t for t in texts if t and t.lower() not in PLACEHOLDERS]


def owner(tags: Tags) -> str:
    """"none" (no description), "captioner" (each description is the one captioner wrote) or "person"."""
    texts = descriptions(tags)
    if not texts:
        return "none"
    ours = str(tags.get(OURS, "")).strip()
    return "captioner" if ours and all(t == ours for t in texts) else "person"


def sidecar_path(path: Path) -> Path:
    """NAME.xmp beside the image, NAME including its extension (photo.jpg.xmp: darktable's and digiKam's
    convention; photo.jpg and photo.cr2 never share one)."""
    return path.with_name(path.name + ".xmp")


def assignments(caption: str, model: str, file_type: str, iptc: bool) -> list[str]:
    """exiftool arguments that write `caption` into a file of `file_type` ("XMP" for a sidecar)."""
    from .. import __version__

    now = datetime.now(timezone.utc).strftime("%Y:%m:%d %H:%M:%S+00:00")
    args = [f"-XMP-dc:Description-x-default={caption}", f"-XMP-iptcCore:AltTextAccessibility-x-default={caption}",
            f"-XMP-captioner:Caption={caption}", "-XMP-captioner:MachineGenerated=True",
            f"-XMP-captioner:CaptionModel={model}", f"-XMP-captioner:CaptionSoftware=captioner {__version__}",
            f"-XMP-captioner:CaptionDate={now}"]
    if file_type in WITH_EXIF:
        args.append(f"-IFD0:ImageDescription={caption}")
    if iptc:  # an existing IPTC-IIM caption would otherwise still show the old text in some tools
        args.append(f"-IPTC:Caption-Abstract={caption}")
    return args


def _fields(file_type: str, iptc: bool) -> str:
    names = ["XMP dc:description", "Iptc4xmpCore:AltTextAccessibility"]
    names += ["EXIF ImageDescription"] if file_type in WITH_EXIF else []
    names += ["IPTC Caption-Abstract"] if iptc else []
    return ", ".join(names)


def _same(a: os.stat_result | None, b: os.stat_result | None) -> bool:
    return a is not None and b is not None and \
        (a.st_size, a.st_mtime_ns, a.st_ino, a.st_dev) == (b.st_size, b.st_mtime_ns, b.st_ino, b.st_dev)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _read_only(path: Path, st: os.stat_result) -> bool:
    """No write permission bit (root included: replacing a file its owner protected would be wrong too)."""
    return not st.st_mode & 0o222 or not os.access(path, os.W_OK)


def _exiftool_error(errors: list[str], target: Path) -> str:
    found = [e for e in errors if e.startswith("Error")] or errors or ["no file written"]
    text = found[0].removeprefix("Error:").strip()
    for name in (os.path.abspath(target), str(target)):
        text = text.removesuffix(f" - {name}")
    return f"exiftool: {text}"


# ------------------------------------------------------------------------ writing ------
@dataclass
class MetadataOptions:
    sidecar: bool = False  # NAME.xmp beside each image; the image itself is never opened for writing
    overwrite: bool = False  # replace descriptions that captioner did not write
    dry_run: bool = False  # say what would be written, write nothing


class MetadataWriter:
    """Called with each batch of result rows (captioner.pipeline.batch): writes the good rows' captions, or with
    dry_run prints what it would write. A file that cannot be written gets `error` set in its row.
    `stamps` holds each file's os.stat from before it was captioned: a file that differs at write time
    changed during the run and is not written. After a write, its stamp is the new file's."""

    def __init__(self, opts: MetadataOptions, model: str, stamps: dict[str, os.stat_result | None],
                 exe: str | None = None, out: TextIO | None = None, notes: Any = None) -> None:
        self.opts, self.model, self.stamps = opts, model, stamps
        self.out = out or sys.stdout
        self.notes = notes or (lambda text: print(text, file=sys.stderr))
        self.tool = ExifTool(exe or find_exiftool())

    def __enter__(self) -> "MetadataWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.tool.close()

    def _tags(self, paths: Sequence[Path]) -> tuple[dict[Path, Tags], dict[Path, Tags]]:
        """(each image's tags, each existing sidecar's tags when writing sidecars)."""
        cars = [sidecar_path(p) for p in paths if self.opts.sidecar and sidecar_path(p).is_file()]
        found = self.tool.read([*paths, *cars])
        return {p: found[p] for p in paths if p in found}, {p: found[p] for p in cars if p in found}

    def done(self, paths: Sequence[Path]) -> set[str]:
        """For --resume: the paths whose description (sidecar's, with sidecars) captioner already wrote."""
        images, cars = self._tags(paths)
        where = (lambda p: cars.get(sidecar_path(p), {})) if self.opts.sidecar else (lambda p: images.get(p, {}))
        return {str(p) for p in paths if owner(where(p)) == "captioner"}

    def __call__(self, rows: list[dict]) -> None:
        good = [r for r in rows if not r["error"] and r["caption"]]
        images, cars = self._tags([Path(r["path"]) for r in good])
        for r in good:
            path = Path(r["path"])
            try:
                r["error"] = self._one(path, r["caption"], images.get(path), cars.get(sidecar_path(path)))
            except OSError as exc:
                r["error"] = f"metadata not written: {exc.strerror or exc}"

    def _one(self, path: Path, caption: str, tags: Tags | None, car: Tags | None) -> str:
        """Write (or plan) one file; returns its error ("" when written or deliberately kept)."""
        if not _same(_stat(path), self.stamps.get(str(path))):
            return "changed during the run: metadata not written (run again to caption it anew)"
        if _line_break(path):
            return "file name contains a line break: metadata not written"
        if tags is None:
            return "exiftool cannot read this file: metadata not written"
        file_type = "XMP" if self.opts.sidecar else str(tags.get("File:FileType", "?")).removeprefix("Extended ")
        if file_type not in EMBED | {"XMP"}:
            return f"{file_type} files cannot hold this metadata: not written (--sidecar writes NAME.xmp instead)"
        existing = car if car is not None else tags  # a sidecar speaks for its image
        kept = owner(existing) == "person" and not self.opts.overwrite
        target = sidecar_path(path) if self.opts.sidecar else Path(os.path.realpath(path))
        if not kept and target.exists() and _read_only(target, os.stat(target)):
            return "read-only file: metadata not written" + ("" if self.opts.sidecar else " (--sidecar writes NAME.xmp)")
        iptc = not self.opts.sidecar and "IPTC:Caption-Abstract" in tags
        if self.opts.dry_run:
            self._plan(path, caption, existing, file_type, iptc, kept)
        elif kept:
            self.notes(f"captioner: {display_name(path)}: kept its own description (--overwrite-metadata replaces it)")
        else:
            return self._write(path, target, assignments(caption, self.model, file_type, iptc))
        return ""

    def _plan(self, path: Path, caption: str, existing: Tags, file_type: str, iptc: bool, kept: bool) -> None:
        where = f" in {display_name(sidecar_path(path))}" if self.opts.sidecar else ""
        if kept:
            print(f"would keep   {display_name(path)}: its own description {descriptions(existing)[0]!r}{where} "
                  "(--overwrite-metadata replaces it)", file=self.out, flush=True)
        else:
            print(f"would write  {display_name(path)}: {caption!r}{where} ({_fields(file_type, iptc)})",
                  file=self.out, flush=True)

    def _write(self, path: Path, target: Path, tags: list[str]) -> str:
        """exiftool writes a new copy beside target; it takes target's permissions and times and replaces it."""
        end = ".xmp" if self.opts.sidecar else ".tmp"  # exiftool makes a new sidecar by its extension; an image
        tmp = target.with_name(f".{target.name}.captioner-{os.getpid()}{end}")  # copy keeps the original's type
        for stale in target.parent.glob(f".{glob.escape(target.name)}.captioner-*{end}"):
            stale.unlink(missing_ok=True)  # left by a killed run
        source = [os.path.abspath(target)] if target.exists() else []  # none: a new sidecar
        try:
            _, errors = self.tool.run(["-P", "-o", os.path.abspath(tmp), *tags, *source])
            if not tmp.is_file():
                return f"metadata not written: {_exiftool_error(errors, target)}"
            if source:
                _copy_owner_and_mode(target, tmp)
            _fsync(tmp)
            if not _same(_stat(path), self.stamps.get(str(path))):
                return "changed during the run: metadata not written (run again to caption it anew)"
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync(target.parent)
        self.stamps[str(path)] = _stat(path)
        return ""


def _copy_owner_and_mode(src: Path, dst: Path) -> None:
    """Permissions, times, flags and extended attributes (shutil.copystat), and owner where allowed."""
    shutil.copystat(src, dst)
    st = os.stat(src)
    with contextlib.suppress(OSError):
        if (st.st_uid, st.st_gid) != (os.stat(dst).st_uid, os.stat(dst).st_gid):
            os.chown(dst, st.st_uid, st.st_gid)
            os.chmod(dst, stat.S_IMODE(st.st_mode))  # chown may clear set-id bits


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- CLI ------
def add_metadata_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image metadata (needs exiftool: " + HINT + ")")
    g.add_argument("--write-metadata", action="store_true",
                   help="write each caption into the image itself: XMP dc:description and IPTC alt text "
                        "(Iptc4xmpCore:AltTextAccessibility), EXIF ImageDescription in JPEG/TIFF, and captioner's "
                        "XMP fields (model, machine-generated). JPEG, PNG, TIFF, WebP and GIF; pixels are never "
                        "re-encoded, other metadata and the file's permissions and modification time are kept, "
                        "each file is replaced atomically. With --resume (and no -o), files that already carry "
                        "captioner's description are skipped")
    g.add_argument("--sidecar", action="store_true",
                   help="write NAME.xmp sidecar files beside the images instead (photo.jpg.xmp; any format, BMP "
                        "too; an existing sidecar is edited); the images themselves are never written")
    g.add_argument("--overwrite-metadata", action="store_true",
                   help="replace existing descriptions that captioner did not write (default: keep them and "
                        "say so on stderr)")
    g.add_argument("--dry-run", action="store_true",
                   help="with --write-metadata/--sidecar: caption, then print what would be written to each "
                        "file on stdout; write nothing (no -o)")


def metadata_options(args: argparse.Namespace) -> MetadataOptions | None:
    """None unless --write-metadata or --sidecar."""
    if not (args.write_metadata or args.sidecar):
        return None
    return MetadataOptions(sidecar=args.sidecar, overwrite=args.overwrite_metadata, dry_run=args.dry_run)


def usage_problem(args: argparse.Namespace) -> str | None:
    wanted = args.write_metadata or args.sidecar
    if args.write_metadata and args.sidecar:
        return "--write-metadata writes into the images, --sidecar beside them (images untouched): use one"
    if (args.overwrite_metadata or args.dry_run) and not wanted:
        return "--overwrite-metadata and --dry-run go with --write-metadata or --sidecar"
    if args.dry_run and args.output is not None:
        return "--dry-run writes nothing: drop -o"
    return None


def stamps(paths: Iterable[Path]) -> dict[str, os.stat_result | None]:
    """Each file's os.stat now (None: cannot stat), before captioning: what 'changed during the run' compares."""
    return {str(p): _stat(p) for p in paths}
