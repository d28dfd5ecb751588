"""Parquet output (pyarrow): `captioner caption ... -o out.parquet` on one machine, and the per-shard files of
the Ray engine (distributed.py). One schema for both (SCHEMA), so a folder of shard files reads as one table.

A Parquet file is only readable once its footer is written, so rows cannot be appended to it batch by batch as
CSV and JSONL are. On one machine each batch is appended (flushed and synced) to a journal beside the output,
OUT.part.jsonl, and the Parquet file is written from the journal (plus OUT's earlier rows with --resume) at the
end, atomically; then the journal is removed. A killed run leaves its journal: --resume picks its rows up."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..errors import CaptionerError
from ..media.images import display_name, path_text
from ..media.shards import PARQUET_HINT, Meta
from .batch import FileWriter, Row, _record, read_rows

COLUMNS = ("path", "key", "shard", "caption", "score", "alternatives", "model", "error", "warning", "json", "txt")


def _pa() -> Any:
    """pyarrow, or the one-line hint to install it."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 - the submodule write_table/read_table need
    except ImportError:
        raise CaptionerError(PARQUET_HINT) from None
    return pyarrow


def schema() -> Any:
    """path (the file, or SHARD/MEMBER for a tar member), key (WebDataset key or a list's `key`), shard (the tar
    or path list the row came from), caption, score, alternatives [{caption, score}] (with --topk > 1), model,
    error, warning, json and txt (the sample's metadata, as text)."""
    pa = _pa()
    alternative = pa.struct([("caption", pa.string()), ("score", pa.float64())])
    return pa.schema([("path", pa.string()), ("key", pa.string()), ("shard", pa.string()),
                      ("caption", pa.string()), ("score", pa.float64()), ("alternatives", pa.list_(alternative)),
                      ("model", pa.string()), ("error", pa.string()), ("warning", pa.string()),
                      ("json", pa.string()), ("txt", pa.string())])


def record(row: Row, model: str, meta: Meta | None, alternatives: bool) -> Row:
    """A caption_files row as a Parquet row (the same rounding and cleaning as CSV/JSONL: batch._record)."""
    r = _record(row, alternatives)
    meta = meta or Meta()
    return {**r, "caption": r["caption"] if not r["error"] else None, "model": model, "key": meta.key,
            "shard": meta.shard, "json": meta.json, "txt": meta.txt}


def _normal(row: Mapping[str, Any]) -> Row:
    """A row with every column; alternatives as [{caption, score}] whether they came as pairs or structs."""
    alts = [a if isinstance(a, dict) else {"caption": a[0], "score": a[1]} for a in row.get("alternatives") or []]
    return {**{c: row.get(c) for c in COLUMNS}, "alternatives": alts}


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a hidden temporary file beside `path`, synced, then renamed onto it: a reader never sees
    half a file. A failure is one CaptionerError; the temporary file is removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CaptionerError(f"cannot write {display_name(path)}: {exc.strerror or exc}") from None


def write_table(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """rows into a Parquet file, atomically."""
    pa = _pa()
    table = pa.Table.from_pylist([_normal(r) for r in rows], schema=schema())
    write_atomically(path, lambda tmp: pa.parquet.write_table(table, tmp))


def read_table(path: Path) -> list[Row]:
    """The rows of a captions Parquet file (for --resume); a CaptionerError if it is not one."""
    pa = _pa()
    try:
        table = pa.parquet.read_table(path)
    except OSError as exc:  # pyarrow's ArrowInvalid is an OSError-free ValueError; both mean "not ours"
        raise CaptionerError(f"cannot read {display_name(path)}: {exc.strerror or exc}") from None
    except Exception:  # noqa: BLE001
        table = None
    if table is None or not {"path", "caption", "error"} <= set(table.column_names):
        raise CaptionerError(f"cannot resume: {display_name(path)} is not a captions Parquet file (columns "
                             f"{', '.join(COLUMNS)}); remove it or drop --resume")
    return [{**_normal(r), "caption": r.get("caption") or "", "error": r.get("error") or ""}
            for r in table.to_pylist()]


def journal(out: Path) -> Path:
    return out.with_name(out.name + ".part.jsonl")


def has_rows(out: Path) -> bool:
    """OUT or its journal holds rows (the CLI refuses to replace them without --resume or --overwrite)."""
    return any(p.is_file() and p.stat().st_size > 0 for p in (out, journal(out)))


class _Journal(FileWriter):
    """FileWriter's JSONL journal (synced per batch, a failed write cut off), with Parquet's columns."""

    def __init__(self, path: Path, append: bool, alternatives: bool, model: str, meta: Mapping[str, Meta]) -> None:
        super().__init__(path, "jsonl", append, alternatives)
        self.model, self.meta = model, meta

    def __call__(self, rows: list[Row]) -> None:
        lines = (json.dumps(record(r, self.model, self.meta.get(r["path"]), self.alternatives), ensure_ascii=False)
                 for r in rows)
        self._put("".join(line + "\n" for line in lines))
        self.rows += len(rows)


class ParquetWriter:
    """`-o out.parquet` on one machine: rows go to the journal as they come (`writer(rows)`); finish() writes
    OUT (its rows from before with resume, then the journal's, each path once) and removes the journal."""

    def __init__(self, out: Path, model: str, meta: Mapping[str, Meta], alternatives: bool, resume: bool) -> None:
        _pa()  # the hint before anything is captioned
        self.out, self.resume = out, resume
        self.old = read_table(out) if resume and out.is_file() and out.stat().st_size else []
        self.earlier = read_rows(journal(out), "jsonl", fix=True) if resume else []  # a killed run's rows
        self.log = _Journal(journal(out), resume, alternatives, model, meta)

    def kept(self) -> list[Row]:
        """The rows already done (--resume): OUT's and a killed run's journal's."""
        return self.old + self.earlier

    def __call__(self, rows: list[Row]) -> None:
        self.log(rows)

    def close(self) -> None:
        self.log.close()

    def finish(self, order: Sequence[object] = ()) -> None:
        """Write OUT from its earlier rows and the journal, in `order` (items or paths; others last)."""
        self.close()
        position = {path_text(p): i for i, p in enumerate(order)}
        rows: dict[str, Row] = {}
        for r in self.old + read_rows(journal(self.out), "jsonl"):
            rows.setdefault(r["path"], r)
        merged = sorted(rows.values(), key=lambda r: position.get(r["path"], len(position)))
        write_table(self.out, ({**r, "caption": r["caption"] or None, "error": r["error"] or None} for r in merged))
        journal(self.out).unlink(missing_ok=True)
